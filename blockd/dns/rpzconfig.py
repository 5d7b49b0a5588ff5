"""RpzSettings + the rules in force -> the resolver configuration that consumes blockd's zones.

`blockd rpz config --for powerdns|unbound|bind|knot` prints it, so nobody copies zone names,
primaries, TSIG keys or legal-basis texts by hand. One stanza per zone, in one order (the
default zone first, then by name): every resolver applies the first zone that matches.

* PowerDNS Recursor (4.8): `rpzPrimary` per zone with `extendedErrorCode=16` and
  `extendedErrorExtra` naming the zone's authority (and, per order, the order and its URL);
  `refresh=` (4.8 does not transfer on NOTIFY: it polls the SOA this often) and
  `seedFile=`/`dumpFile=` (a restart filters from the first query instead of after the first
  AXFR). The recursor.conf lines let blockd's NOTIFY through (`allow-notify-from`).
* Unbound (1.17): an `rpz:` clause per zone, `zonefile` kept for restarts. No EDE on RPZ hits.
* BIND (9.18): one `response-policy` with every zone, a secondary `zone` statement each
  (with TSIG when blockd requires it). No EDE on RPZ hits before 9.19.5.
* Knot Resolver (5.6): no transfer client; `policy.rpz` loads the zone file blockd writes
  atomically for each zone and reloads it when it is replaced (needs lua-cqueues); with
  `zone_file_shards` it loads each zone's shard files instead, so a change re-reads one shard.
  `DENY_MSG` gives NXDOMAIN, EDE 16 and the legal basis as a TXT in ADDITIONAL
  (`explanation.invalid.`); kresd's EDE EXTRA-TEXT is its own code ("CR36").
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from blockd.dns import rpz
from blockd.model import RuleSet

RESOLVERS = ("powerdns", "unbound", "bind", "knot")
MAX_TEXT = 250  # kresd's DENY_MSG takes < 256 bytes; EDE EXTRA-TEXT should stay short too


@dataclass(frozen=True, slots=True)
class ZoneInfo:
    origin: str  # "example-court.rpz.blockd."
    key: str | None  # the authority (layout authority) or order id (layout order)
    text: str  # the legal basis, as the EDE EXTRA-TEXT / kresd message
    zone_file: str | None  # the file blockd writes for this zone, if any
    shards: int = 1  # zone_file_shards: the zone is also written as this many shard files


def legal_text(s: rpz.RpzSettings, key: str | None, rs: RuleSet) -> str:
    """What the subscriber should read: who ordered the block and where the decision is."""
    if key is None:
        return "Blocked by order of a public authority"
    if s.layout == "order":
        info = rs.orders.get(key)
        if info is None:
            return f"Blocked by order {key}"
        text = f"Blocked by {info.authority}, order {key} ({info.reference})"
        return (text + (f", see {info.url}" if info.url else ""))[:MAX_TEXT]
    urls = sorted({o.url for o in rs.orders.values() if o.authority == key and o.url})
    text = f"Blocked by order of {key}"
    return (text + (f", see {urls[0]}" if len(urls) == 1 else ""))[:MAX_TEXT]


def zones_for(s: rpz.RpzSettings, rs: RuleSet, known: Iterable[str] = ()) -> list[ZoneInfo]:
    """Every zone blockd serves for `rs` (plus `known` origins it served before), default zone first."""
    parts = rpz.partition(s, rs)
    for origin in known:
        parts.setdefault(origin, (None, RuleSet.empty()))
    parts.setdefault(s.origin, (None, RuleSet.empty()))
    out = []
    for origin in sorted(parts, key=lambda o: (o != s.origin, o)):
        key, _ = parts[origin]
        zs = rpz.for_zone(s, origin, key) if s.layout != "one" else s
        out.append(ZoneInfo(origin, key, legal_text(s, key, rs), zs.zone_file, zs.zone_file_shards))
    return out


def lua_str(text: str) -> str:
    """A Lua string literal: printable ASCII as is, everything else as decimal byte escapes."""
    out = []
    for b in text.encode("utf-8"):
        ch = chr(b)
        out.append(ch if 32 <= b < 127 and ch not in '"\\' else f"\\{b:03d}")
    return '"' + "".join(out) + '"'


def policy_name(z: ZoneInfo) -> str:
    return z.origin.split(".")[0] if z.key is not None else "blockd"


def render(kind: str, s: rpz.RpzSettings, zones: Sequence[ZoneInfo], primary: tuple[str, int], *,
           state_dir: str | None = None, refresh: int = 1) -> str:
    """The config text for resolver `kind` (one of RESOLVERS)."""
    host, port = primary
    if kind == "powerdns":
        return _powerdns(s, zones, host, port, state_dir or "/var/lib/pdns-recursor", refresh)
    if kind == "unbound":
        return _unbound(zones, host, port, state_dir or "/var/lib/unbound")
    if kind == "bind":
        return _bind(s, zones, host, port)
    if kind == "knot":
        return _knot(zones, s.ip_triggers)
    raise ValueError(f"resolver {kind!r} unknown; known: {', '.join(RESOLVERS)}")


def recursor_conf_lines(lua: str) -> list[str]:
    """The recursor.conf lines named in the header of `render("powerdns", ...)` (without the Lua file)."""
    return [line[5:] for line in lua.splitlines()
            if line.startswith("--   ") and "=" in line and not line.startswith("--   lua-config-file")]


def _powerdns(s: rpz.RpzSettings, zones: Sequence[ZoneInfo], host: str, port: int, state_dir: str,
              refresh: int) -> str:
    addr = f"[{host}]:{port}" if ":" in host else f"{host}:{port}"
    lines = [
        "-- PowerDNS Recursor: lua-config-file (generated by `blockd rpz config --for powerdns`)",
        "-- recursor.conf needs:",
        "--   lua-config-file=<this file>",
        "--   extended-resolution-errors=yes",
        f"--   allow-notify-from={host}",
        # with wipe_cache blockd NOTIFYs each changed name (PowerDNS wipes it and what is below it)
        "--   allow-notify-for=" + ("." if s.wipe_cache else ",".join(z.origin.rstrip(".") for z in zones)),
        f"-- refresh={refresh}: 4.8 transfers on its SOA poll, not on NOTIFY; the poll is one small SOA query.",
        "-- seedFile/dumpFile: a restart filters from the first query, before the first transfer.",
    ]
    for z in zones:
        seed = f"{state_dir}/{z.origin}zone"
        opts = [f"policyName={lua_str(policy_name(z))}", "extendedErrorCode=16",
                f"extendedErrorExtra={lua_str(z.text)}", f"refresh={refresh}",
                f"seedFile={lua_str(seed)}", f"dumpFile={lua_str(seed)}"]
        if s.tsig is not None:
            opts += [f"tsigname={lua_str(s.tsig.name)}", f"tsigalgo={lua_str(s.tsig.algorithm)}",
                     f"tsigsecret={lua_str(s.tsig.secret)}"]
        lines.append(f'rpzPrimary({{"{addr}"}}, {lua_str(z.origin)}, {{{", ".join(opts)}}})')
    return "\n".join(lines) + "\n"


def _unbound(zones: Sequence[ZoneInfo], host: str, port: int, state_dir: str) -> str:
    lines = ["# Unbound: rpz clauses (generated by `blockd rpz config --for unbound`)",
             '# server: needs module-config: "respip validator iterator" (or "respip iterator")',
             "# Unbound cannot sign transfers with TSIG: blockd's allow_transfer must list this resolver."]
    for z in zones:
        lines += ["rpz:", f'    name: "{z.origin}"', f"    primary: {host}@{port}",
                  f'    zonefile: "{state_dir}/{z.origin}zone"', "    rpz-log: yes",
                  f'    rpz-log-name: "{policy_name(z)}"']
    return "\n".join(lines) + "\n"


def _bind(s: rpz.RpzSettings, zones: Sequence[ZoneInfo], host: str, port: int) -> str:
    key = f" key {s.tsig.name.rstrip('.')}" if s.tsig is not None else ""
    lines = ["// BIND 9.18: named.conf fragments (generated by `blockd rpz config --for bind`)"]
    if s.tsig is not None:
        lines += [f'key "{s.tsig.name.rstrip(".")}" {{', f"    algorithm {s.tsig.algorithm};",
                  f'    secret "{s.tsig.secret}";', "};"]
    lines.append("// inside options { }:")
    policy = " ".join(f'zone "{z.origin.rstrip(".")}" min-update-interval 0;' for z in zones)
    lines.append(f"response-policy {{ {policy} }} qname-wait-recurse no break-dnssec yes;")
    for z in zones:
        name = z.origin.rstrip(".")
        lines += [f'zone "{name}" {{', "    type secondary;", f"    primaries {{ {host} port {port}{key}; }};",
                  f'    file "{name}.db";', "    allow-query { localhost; };", f"    allow-notify {{ {host}; }};",
                  "};"]
    return "\n".join(lines) + "\n"


def _knot(zones: Sequence[ZoneInfo], ip_triggers: bool = False) -> str:
    lines = ["-- Knot Resolver 5: policy rules (generated by `blockd rpz config --for knot`)",
             "-- kresd has no zone transfer client: it loads the zone file blockd writes (zone_file) and",
             "-- reloads it when blockd replaces it (watch=true needs the lua-cqueues package)."]
    if ip_triggers:
        lines.append("-- WARNING: enforcers.rpz.ip_triggers is on, and kresd ignores rpz-ip triggers without a word:"
                     " addresses are not blocked by this resolver (use the nft/ipset/bgp enforcers for them).")
    for z in zones:
        if z.zone_file is None:
            lines.append(f"-- {z.origin}: set enforcers.rpz.zone_file in blockd.yaml; kresd reads zone files only")
            continue
        files = [z.zone_file] if z.shards == 1 else [rpz.shard_path(z.zone_file, i) for i in range(z.shards)]
        if z.shards > 1:
            lines.append(f"-- {z.origin}: {z.shards} shard files (zone_file_shards): a change re-reads only the "
                         "shards it touches")
        lines += [f"policy.add(policy.rpz(policy.DENY_MSG({lua_str(z.text)}, kres.extended_error.CENSORED), "
                  f"{lua_str(f)}, true))" for f in files]
    return "\n".join(lines) + "\n"
