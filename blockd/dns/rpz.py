"""RuleSet -> RPZ zone (draft-vixie-dnsop-dns-rpz): owners, wire RRs, IXFR journal, zone file.

Layout of zone Z (default `rpz.blockd.`), every trigger with action `CNAME .` (NXDOMAIN):
    name.Z    CNAME .     exact rule, and the apex of a subtree rule
    *.name.Z  CNAME .     subtree rule (our subtree includes the apex, RPZ wildcards do not)
    P.<reversed address>.rpz-ip.Z  CNAME .   IP triggers (optional), one per CIDR
Order ids are carried as comments in the zone file (`; orders=...`), and an `; order` header
lists each order's authority and reference.

A `ZoneVersion` is immutable: serial + the set of owner names served. The `Journal` keeps the
owner-set differences between consecutive versions for IXFR (RFC 1995).
"""

from __future__ import annotations

import ipaddress
import itertools
import json
import os
import struct
import tempfile
import zlib
from collections import deque
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from typing import Any

from blockd.dns import wire
from blockd.model import DomainRule, NetRule, OrderInfo, Plan, RuleSet, gc_paused, seq_bisect
from blockd.ranges import to_cidrs

MAX_MESSAGE = 60_000  # bytes of RRs per AXFR/IXFR message (TCP messages may be up to 65535)
_CNAME_ROOT_TAIL = b"\xc0\x0c"  # owner suffix: pointer to the zone name in the question


@dataclass(frozen=True, slots=True)
class TsigKey:
    name: str
    secret: str  # base64
    algorithm: str = "hmac-sha256"


MAX_SHARDS = 256
#: how rules are cut into zones: all in `zone`; one zone per authority; one zone per order
LAYOUTS = ("one", "authority", "order")


@dataclass(frozen=True, slots=True)
class ZoneOverride:
    """Settings for the zone of one authority (layout `authority`) or order (layout `order`)."""

    match: str  # the authority's name as the orders give it, or the order id
    zone: str | None = None  # the zone's name instead of the derived `<label>.<zone>`
    notify: tuple[tuple[str, int], ...] | None = None  # instead of RpzSettings.notify
    allow_transfer: tuple[str, ...] | None = None  # instead of RpzSettings.allow_transfer


@dataclass(frozen=True, slots=True)
class RpzSettings:
    zone: str = "rpz.blockd."
    layout: str = "one"
    zones: tuple[ZoneOverride, ...] = ()
    #: at most this many zones (default zone included); further authorities' rules go to the default zone
    max_zones: int = 256
    listen: tuple[tuple[str, int], ...] = (("127.0.0.1", 53),)
    notify: tuple[tuple[str, int], ...] = ()
    allow_transfer: tuple[str, ...] = ()  # prefixes allowed to AXFR/IXFR, in addition to loopback
    allow_loopback: bool = True
    tsig: TsigKey | None = None  # when set, transfers must be signed with this key
    zone_file: str | None = None  # also write the zone here (atomically) for file-loading resolvers
    state_file: str | None = None  # persists the SOA serial across restarts
    ip_triggers: bool = False
    ttl: int = 60
    refresh: int = 3600  # the fallback when NOTIFY is lost
    retry: int = 60
    expire: int = 1_209_600  # two weeks: a secondary keeps blocking if the primary is down
    minimum: int = 60
    mname: str = "localhost."
    rname: str = "hostmaster.blockd.invalid."
    journal_versions: int = 32
    notify_retries: int = 3
    notify_timeout_s: float = 2.0
    #: NOTIFY again, this often, each `notify` target not known to hold the current serial
    #: (a secondary restarted from its zone file otherwise waits for `refresh`); 0 = never
    renotify_s: float = 60.0
    #: resolvers whose answer cache blockd wipes, by a NOTIFY for each name a transfer changed,
    #: once they have taken the transfer (PowerDNS Recursor `allow-notify-for`); host:port
    wipe_cache: tuple[tuple[str, int], ...] = ()
    max_wipe_names: int = 1000  # a bigger change wipes "." (the whole cache) instead
    #: also write each zone as this many shard files (`shard_path`), names spread by a stable
    #: hash, replacing only the shards a change touches: for resolvers that re-read a whole file
    #: on every change and stall meanwhile (Knot Resolver; docs/dns.md). 1 = no shard files
    zone_file_shards: int = 1

    def __post_init__(self) -> None:
        if not 1 <= self.zone_file_shards <= MAX_SHARDS:
            raise ValueError(f"zone_file_shards: {self.zone_file_shards!r}; valid: 1 to {MAX_SHARDS}")
        if self.zone_file_shards > 1 and not self.zone_file:
            raise ValueError(f"zone_file_shards: {self.zone_file_shards} needs zone_file (the shards are written "
                             "beside it)")
        if self.layout not in LAYOUTS:
            raise ValueError(f"layout: bad value {self.layout!r}; expected one of {', '.join(LAYOUTS)}")
        if self.layout != "one" and self.zone_file and "{zone}" not in self.zone_file:
            raise ValueError(f"zone_file: {self.zone_file!r} must contain '{{zone}}' with layout "
                             f"{self.layout!r} (one file per zone, e.g. /var/lib/blockd/{{zone}}zone)")
        seen: set[str] = set()
        for i, z in enumerate(self.zones):
            if z.match in seen:
                raise ValueError(f"zones[{i}]: match {z.match!r} is given twice")
            seen.add(z.match)
            for p in z.allow_transfer or ():
                try:
                    ipaddress.ip_network(p, strict=True)
                except ValueError as e:
                    raise ValueError(f"zones[{i}].allow_transfer: {p!r} is not a prefix with host bits zero "
                                     f"({e})") from None
        import re

        for i, z in enumerate(self.zones):
            if z.zone is not None and not re.fullmatch(r"([a-z0-9_]([a-z0-9_-]{0,61}[a-z0-9_])?\.)+",
                                                        z.zone.rstrip(".").lower() + "."):
                raise ValueError(f"zones[{i}].zone: {z.zone!r} is not a zone name (labels of letters, digits, "
                                 f"'-' and '_', e.g. court.rpz.blockd.)")
        if self.max_zones < 1:
            raise ValueError(f"max_zones: {self.max_zones!r} must be >= 1")
        names = [z.zone.rstrip(".").lower() for z in self.zones if z.zone]
        dup = sorted({n for n in names if names.count(n) > 1})
        if dup:
            raise ValueError(f"zones: zone {dup[0]!r} is given to two authorities/orders; each needs its own")

    @property
    def origin(self) -> str:
        return self.zone.rstrip(".").lower() + "."


# ---- zones ----------------------------------------------------------------------------------
def label(text: str) -> str:
    """A DNS label for an authority or order: ASCII letters, digits, '-' (diacritics dropped)."""
    import unicodedata

    folded = unicodedata.normalize("NFKD", text.replace("đ", "d").replace("Đ", "D"))
    out, dash = [], False
    for ch in folded.lower():
        if ch.isascii() and ch.isalnum():
            out.append(ch)
            dash = False
        elif not unicodedata.combining(ch) and out and not dash:
            out.append("-")
            dash = True
    return "".join(out).strip("-")[:40].strip("-")


def zone_names(s: RpzSettings, keys: Iterable[str]) -> dict[str, str]:
    """Authority (or order id) -> zone origin. Two keys with the same label both get a hash suffix;
    a key whose label is empty gets `z-<hash>`; an override's `zone` is taken as given."""
    import hashlib

    keys = sorted(set(keys))
    overrides = {z.match: z.zone for z in s.zones if z.zone}
    labels = {k: label(k) for k in keys}
    counts: dict[str, int] = {}
    for k in keys:
        counts[labels[k]] = counts.get(labels[k], 0) + 1
    out = {}
    for k in keys:
        if k in overrides:
            out[k] = overrides[k].rstrip(".").lower() + "."
            continue
        lab = labels[k]
        if not lab or counts[lab] > 1:
            lab = (lab or "z") + "-" + hashlib.sha256(k.encode()).hexdigest()[:6]
        out[k] = f"{lab}.{s.origin}"
    return out


def zone_key(s: RpzSettings, rs: RuleSet, order_id: str) -> str | None:
    """The authority (layout authority) or order id (layout order) an order's rules go to."""
    if s.layout == "order":
        return order_id
    info = rs.orders.get(order_id)
    return info.authority if info is not None else None


def partition(s: RpzSettings, rs: RuleSet) -> dict[str, tuple[str | None, RuleSet]]:
    """Zone origin -> (authority or order id, the part of `rs` it carries). Layout `one`: everything
    in `s.origin`. A rule of orders from two authorities is in both zones. Rules whose order has
    no known authority, and those of authorities beyond `max_zones`, stay in `s.origin`."""
    return partition_keys(s, rs)[0]


def partition_keys(s: RpzSettings, rs: RuleSet) -> tuple[dict[str, tuple[str | None, RuleSet]], int]:
    """`partition`, and how many authorities (or orders) the rules name in all (more than
    `max_zones - 1` means some share the default zone)."""
    if s.layout == "one":
        return {s.origin: (None, rs)}, 0
    keys = {k for r in (*rs.domains, *rs.v4, *rs.v6) for o in r.orders if (k := zone_key(s, rs, o)) is not None}
    total = len(keys)
    if len(keys) > s.max_zones - 1:  # the rest stay enforced, in the default zone, under its generic text
        keys = set(sorted(keys)[: s.max_zones - 1])
    names = zone_names(s, keys)
    keys_of = {origin: k for k, origin in names.items()}
    buckets: dict[str, tuple[list[DomainRule], list[NetRule], list[NetRule], dict[str, OrderInfo]]] = {}

    def put(r: Any, kind: int) -> None:
        by_zone: dict[str, set[str]] = {}
        for o in r.orders:
            k = zone_key(s, rs, o)
            by_zone.setdefault(names.get(k, s.origin) if k is not None else s.origin, set()).add(o)
        for origin, orders in by_zone.items():
            b = buckets.setdefault(origin, ([], [], [], {}))
            b[kind].append(r._replace(orders=frozenset(orders)))  # type: ignore[arg-type]
            for o in orders:
                if o in rs.orders:
                    b[3][o] = rs.orders[o]

    for r in rs.domains:
        put(r, 0)
    for r in rs.v4:
        put(r, 1)
    for r in rs.v6:
        put(r, 2)
    return {origin: (keys_of.get(origin), RuleSet.build(d, v4, v6, orders))
            for origin, (d, v4, v6, orders) in buckets.items()}, total


def for_zone(s: RpzSettings, origin: str, key: str | None = None) -> RpzSettings:
    """The settings of one zone: its name, its zone file, the override's notify and ACL."""
    from dataclasses import replace

    o = next((z for z in s.zones if key is not None and z.match == key), None)
    zone_file = s.zone_file.replace("{zone}", origin) if s.zone_file else None
    return replace(s, zone=origin, layout="one", zones=(), zone_file=zone_file,
                   notify=o.notify if o is not None and o.notify is not None else s.notify,
                   allow_transfer=o.allow_transfer if o is not None and o.allow_transfer is not None
                   else s.allow_transfer)


# ---- owners ---------------------------------------------------------------------------------
def owners(rs: RuleSet, ip_triggers: bool) -> frozenset[str]:
    """Relative owner names (lowercase, no trailing dot) that the zone serves for `rs`."""
    out: set[str] = set()
    for name, subtree, _ in rs.domains:
        out.add(name)
        if subtree:
            out.add("*." + name)
    if ip_triggers:
        out.update(ip_owners(rs))
    return frozenset(out)


def ip_owners(rs: RuleSet) -> Iterator[str]:
    from blockd.model import union_intervals

    for version, rules in ((4, rs.v4), (6, rs.v6)):
        for net, plen in to_cidrs(version, union_intervals(rules)):
            yield ip_trigger(version, net, plen)


def ip_trigger(version: int, net: int, plen: int) -> str:
    """`10.1.0.0/16` -> `16.0.0.1.10.rpz-ip`; `2001:db8::/32` -> `32.zz.db8.2001.rpz-ip`."""
    if version == 4:  # integer arithmetic: ipaddress costs ~10 us a call, 2M calls at 1M prefixes
        return f"{plen}.{net & 255}.{(net >> 8) & 255}.{(net >> 16) & 255}.{net >> 24}.rpz-ip"
    text = ipaddress.IPv6Address(net).compressed
    if "::" in text:
        left, right = text.split("::")
        parts = (left.split(":") if left else []) + ["zz"] + (right.split(":") if right else [])
    else:
        parts = text.split(":")
    return f"{plen}." + ".".join(reversed(parts)) + ".rpz-ip"


def parse_ip_trigger(owner: str) -> tuple[int, int, int]:
    """Inverse of `ip_trigger`: -> (version, first, last)."""
    labels = owner.split(".")[:-1]
    plen, parts = int(labels[0]), list(reversed(labels[1:]))
    if len(parts) == 4 and "zz" not in parts:
        a, b, c, d = map(int, parts)
        version, net = 4, (a << 24) | (b << 16) | (c << 8) | d
    else:
        if "zz" in parts:
            i = parts.index("zz")
            text = ":".join(parts[:i]) + "::" + ":".join(parts[i + 1 :])
        else:
            text = ":".join(parts)
        version, net = 6, int(ipaddress.IPv6Address(text))
    bits = 32 if version == 4 else 128
    return version, net, net | ((1 << (bits - plen)) - 1)


def ruleset_from_owners(own: Iterable[str]) -> RuleSet:
    """What a zone holding these owners enforces (no provenance): the RPZ read-back."""
    with gc_paused():
        own = set(own)
        doms, v4, v6 = [], [], []
        none: frozenset[str] = frozenset()
        for o in own:
            if o.endswith(".rpz-ip"):
                version, first, last = parse_ip_trigger(o)
                (v4 if version == 4 else v6).append(NetRule(first, last, none))
            elif o.startswith("*."):
                doms.append(DomainRule(o[2:], True, none))
            elif "*." + o not in own:
                doms.append(DomainRule(o, False, none))
        return RuleSet.build(doms, v4, v6)


def holds(rs: RuleSet, name: str, subtree: bool) -> bool:
    """Whether `rs` has the rule (name, subtree): one bisection, compared in C (a 2-tuple sorts
    just before the DomainRule it is a prefix of, and the orders are never compared)."""
    d = rs.domains
    i = seq_bisect(d, (name, subtree))
    return i < len(d) and d[i].name == name and d[i].subtree == subtree


def owner_delta(old: RuleSet, new: RuleSet, plan: Plan, ip_triggers: bool) -> tuple[set[str], set[str]]:
    """The owners a zone deletes and adds going from the rules `old` to `new`, `plan` being
    the Plan between them (`RuleSet.patched`): O(k log N), the zone itself is not looked at.

    An exact and a subtree rule of one name share the apex owner: it goes only when neither
    is left, and comes only when neither was there. IP triggers are the CIDRs of the union
    intervals that left and came (a CIDR in both stays)."""
    dele: set[str] = set()
    add: set[str] = set()
    for name, sub in plan.del_domains:
        if sub:
            dele.add("*." + name)
        if not holds(new, name, not sub):
            dele.add(name)
    for name, sub in plan.add_domains:
        if sub:
            add.add("*." + name)
        if not holds(old, name, not sub):
            add.add(name)
    if ip_triggers:
        for version, gone, came in ((4, plan.del_v4, plan.add_v4), (6, plan.del_v6, plan.add_v6)):
            g = {ip_trigger(version, n, p) for n, p in to_cidrs(version, list(gone))}
            c = {ip_trigger(version, n, p) for n, p in to_cidrs(version, list(came))}
            dele |= g - c
            add |= c - g
    both = dele & add
    return dele - both, add - both


def touched_hold(v: ZoneVersion, part: RuleSet, plan: Plan, deleted: set[str], added: set[str]) -> bool:
    """The touched read-back: what the served version `v` holds for every owner a change
    touched agrees with the rules `part` (apex held iff an exact or subtree rule of the name is,
    wildcard iff a subtree rule is; each IP trigger added held, each deleted gone)."""
    for name, _ in (*plan.del_domains, *plan.add_domains):
        sub = holds(part, name, True)
        if v.has("*." + name) != sub or v.has(name) != (sub or holds(part, name, False)):
            return False
    return all(v.has(o) for o in added if o.endswith(".rpz-ip")) and \
        not any(v.has(o) for o in deleted if o.endswith(".rpz-ip"))


# ---- wire -----------------------------------------------------------------------------------
def owner_rr(owner: str, ttl: int) -> bytes:
    """`owner CNAME .` with the owner relative to the zone name at offset 12 of the message."""
    rel = b"".join([bytes((len(p),)) + p for p in owner.encode("ascii").split(b".")])
    return rel + _CNAME_ROOT_TAIL + struct.pack("!HHIH", wire.T_CNAME, 1, ttl, 1) + b"\x00"


def soa_rr(s: RpzSettings, serial: int) -> bytes:
    rdata = wire.soa_rdata(s.mname.rstrip("."), s.rname.rstrip("."), serial, s.refresh, s.retry, s.expire, s.minimum)
    return wire.rr(b"\xc0\x0c", wire.T_SOA, s.ttl, rdata)


def ns_rr(s: RpzSettings) -> bytes:
    return wire.rr(b"\xc0\x0c", wire.T_NS, s.ttl, wire.name_to_wire(s.mname.rstrip(".")))


def chunk(rrs: Iterable[bytes]) -> list[tuple[int, bytes]]:
    """RRs -> message bodies of at most MAX_MESSAGE bytes: [(rr count, bytes)]."""
    out: list[tuple[int, bytes]] = []
    cur: list[bytes] = []
    size = 0
    for r in rrs:
        if size + len(r) > MAX_MESSAGE and cur:
            out.append((len(cur), b"".join(cur)))
            cur, size = [], 0
        cur.append(r)
        size += len(r)
    if cur:
        out.append((len(cur), b"".join(cur)))
    return out


_UIDS = itertools.count(1)


class ZoneVersion:
    """One served version of the zone: serial + the owner names it holds. Immutable in content.

    The owners are a base set plus an overlay (owners added since, base owners deleted since):
    `next` makes the following version from a delta in O(overlay + change), sharing the base,
    so a small change to a 2M-owner zone copies nothing of it. `owners` materialises the whole
    set once (an AXFR, a full read-back) and keeps it as the new base: the content is the same,
    only its representation changes (one attribute assignment, safe beside readers).
    AXFR bodies are rendered on first use and kept.
    """

    def __init__(self, settings: RpzSettings, serial: int, owner_set: frozenset[str], ruleset: RuleSet) -> None:
        self.settings = settings
        self.serial = serial
        self._rep: tuple[frozenset[str], frozenset[str], frozenset[str]] = (owner_set, frozenset(), frozenset())
        self._size = len(owner_set)
        self.ruleset = ruleset
        self.soa = soa_rr(settings, serial)
        self._axfr: list[tuple[int, bytes]] | None = None
        self.uid = next(_UIDS)  # unique for the process's life (an id() is reused once freed)

    @classmethod
    def next(cls, prev: ZoneVersion, settings: RpzSettings, serial: int, deleted: Iterable[str],
             added: Iterable[str], ruleset: RuleSet) -> ZoneVersion:
        """`prev` minus `deleted` (each held) plus `added` (none held), without copying the base."""
        base, plus, minus = prev._rep
        deleted, added = frozenset(deleted), frozenset(added)
        v = cls(settings, serial, frozenset(), ruleset)
        v._rep = (base, (plus - deleted) | frozenset(a for a in added if a not in base),
                  (minus - added) | frozenset(d for d in deleted if d in base))
        v._size = prev._size - len(deleted) + len(added)
        return v

    def has(self, owner: str) -> bool:
        base, plus, minus = self._rep
        return owner in plus or (owner in base and owner not in minus)

    @property
    def overlay(self) -> int:
        """Owners held apart from the base (what `next` copies): compact when it grows."""
        _, plus, minus = self._rep
        return len(plus) + len(minus)

    @property
    def owners(self) -> frozenset[str]:
        """Every owner name held (materialised on first use after a `next`: O(N))."""
        base, plus, minus = self._rep
        if not plus and not minus:
            return base
        full = (base - minus) | plus
        self._rep = (full, frozenset(), frozenset())
        return full

    def __len__(self) -> int:
        return self._size

    def axfr_bodies(self) -> list[tuple[int, bytes]]:
        """SOA, NS, every trigger, SOA (RFC 5936), cut into message bodies."""
        if self._axfr is None:
            ttl = self.settings.ttl
            rrs = [self.soa, ns_rr(self.settings)]
            rrs += [owner_rr(o, ttl) for o in sorted(self.owners)]
            rrs.append(self.soa)
            self._axfr = chunk(rrs)
        return self._axfr


@dataclass(frozen=True, slots=True)
class Delta:
    old: int
    new: int
    deleted: tuple[str, ...]
    added: tuple[str, ...]


class Journal:
    """The last N deltas; `ixfr_bodies` bridges from a client's serial, or returns None."""

    def __init__(self, keep: int) -> None:
        self.deltas: deque[Delta] = deque(maxlen=keep)

    def record(self, old: ZoneVersion, new: ZoneVersion) -> Delta:
        """The delta between two whole versions (O(N): the full path)."""
        return self.append(old.serial, new.serial, old.owners - new.owners, new.owners - old.owners)

    def append(self, old: int, new: int, deleted: Iterable[str], added: Iterable[str]) -> Delta:
        """The delta from serial `old` to `new`, as given (the delta path: O(change))."""
        d = Delta(old, new, tuple(sorted(deleted)), tuple(sorted(added)))
        self.deltas.append(d)
        return d

    def changed(self, since: int, to: int) -> list[str] | None:
        """The names (subtree owners as their apex) added or deleted from `since` to `to`, or None."""
        chain = self.path(since, to)
        if chain is None:
            return None
        return sorted({o.removeprefix("*.") for d in chain for o in (*d.added, *d.deleted)
                       if not o.endswith(".rpz-ip")})

    def path(self, since: int, to: int) -> list[Delta] | None:
        chain = []
        serial = since
        for d in self.deltas:
            if d.old == serial:
                chain.append(d)
                serial = d.new
        return chain if chain and serial == to else None

    def ixfr_bodies(self, s: RpzSettings, since: int, current: ZoneVersion) -> list[tuple[int, bytes]] | None:
        chain = self.path(since, current.serial)
        if chain is None:
            return None
        ttl = s.ttl
        rrs = [current.soa]
        for d in chain:  # RFC 1995 4: old SOA, deletions, new SOA, additions
            rrs.append(soa_rr(s, d.old))
            rrs += [owner_rr(o, ttl) for o in d.deleted]
            rrs.append(soa_rr(s, d.new))
            rrs += [owner_rr(o, ttl) for o in d.added]
        rrs.append(current.soa)
        return chunk(rrs)


def next_serial(serial: int) -> int:
    """RFC 1982 increment, skipping 0 (some tools treat serial 0 as 'no zone')."""
    n = (serial + 1) & 0xFFFFFFFF
    return n or 1


# ---- files ----------------------------------------------------------------------------------
def atomic_write(path: str, chunks: Iterable[str]) -> None:
    """Write text atomically (blockd.fsutil.atomic_write: temporary file, fsync, rename, fsync
    of the directory), streamed chunk by chunk: a 1M-name zone is never joined in memory."""
    from pathlib import Path

    from blockd.fsutil import atomic_write as write

    write(Path(path), (c.encode("ascii", "backslashreplace") for c in chunks))


def load_state(path: str | None) -> dict[str, object]:
    if not path or not os.path.exists(path):
        return {}
    with open(path, encoding="utf-8") as f:
        data = json.load(f)
    return data if isinstance(data, dict) else {}


def save_state(path: str | None, serial: int, digest: str) -> None:
    if path:
        atomic_write(path, [json.dumps({"serial": serial, "digest": digest}) + "\n"])


def zone_text(s: RpzSettings, v: ZoneVersion) -> Iterator[str]:
    """The zone in master-file format, relative owners, order ids as comments."""
    rs = v.ruleset
    yield f"; RPZ zone written by blockd; serial {v.serial}; ruleset digest {rs.digest}\n"
    named: set[str] = set()  # a zone's rule set may carry every order's info (the delta path shares it)
    for r in (*rs.domains, *rs.v4, *rs.v6):
        named.update(r.orders)
    for oid, info in sorted(rs.orders.items()):
        if oid not in named:
            continue
        # one comment line whatever the texts hold: a newline would start a record (Knot loads this file)
        note = " ".join(f"{oid}: {info.authority} {info.reference} {info.url or ''}".split())
        yield f"; order {note}\n"
    yield f"$ORIGIN {s.origin}\n$TTL {s.ttl}\n"
    yield f"@ SOA {s.mname} {s.rname} {v.serial} {s.refresh} {s.retry} {s.expire} {s.minimum}\n"
    yield f"@ NS {s.mname}\n"
    lines: list[str] = []
    prev = None
    for name, subtree, orders in rs.domains:
        note = ",".join(sorted(orders))
        if name != prev:  # an exact and a subtree rule for one name share the apex record
            lines.append(f"{name} CNAME . ; orders={note}\n")
        prev = name
        if subtree:
            lines.append(f"*.{name} CNAME . ; orders={note}\n")
        if len(lines) >= 10_000:
            yield "".join(lines)
            lines = []
    yield "".join(lines)
    if s.ip_triggers:
        yield "".join(f"{o} CNAME .\n" for o in sorted(ip_owners(rs)))


# ---- shard files (zone_file_shards) ---------------------------------------------------------
def shard_path(zone_file: str, i: int) -> str:
    return f"{zone_file}.shard-{i}"


def shard_of(key: str, k: int) -> int:
    """The shard of a key: a hash that is the same in every process and release (crc32)."""
    return zlib.crc32(key.encode("utf-8", "backslashreplace")) % k


def shard_texts(s: RpzSettings, v: ZoneVersion) -> list[str]:
    """The zone cut into `s.zone_file_shards` master files of the same origin. A name goes to the
    shard of the first order of its first rule, so the names of one order stay together and a new, changed
    or lifted order rewrites one shard (a name shared with another order may move once). A
    shard's text depends only on its own records (no zone serial or digest in it: its SOA serial
    is a crc32 of its records), so shards a change does not touch stay byte for byte the same."""
    k = s.zone_file_shards
    rs = v.ruleset
    lines: list[list[str]] = [[] for _ in range(k)]
    used: list[set[str]] = [set() for _ in range(k)]
    memo: dict[str, int] = {}
    prev, i = None, 0
    for name, subtree, orders in rs.domains:
        note = ",".join(sorted(orders))
        if name != prev:  # the name's first rule picks its shard; its other rule (if any) follows
            key = min(orders) if orders else name
            i = memo.get(key, -1)
            if i < 0:
                i = memo[key] = shard_of(key, k)
            lines[i].append(f"{name} CNAME . ; orders={note}\n")  # as zone_text: one apex record per name
        prev = name
        if subtree:
            lines[i].append(f"*.{name} CNAME . ; orders={note}\n")
        used[i].update(orders)
    if s.ip_triggers:
        for o in sorted(ip_owners(rs)):
            lines[shard_of(o, k)].append(f"{o} CNAME .\n")
    out = []
    for i in range(k):
        notes = "".join("; order " + " ".join(f"{oid}: {info.authority} {info.reference} {info.url or ''}".split())
                        + "\n" for oid, info in sorted(rs.orders.items()) if oid in used[i])
        body = "".join(lines[i])
        serial = zlib.crc32((notes + body).encode("ascii", "backslashreplace")) or 1
        out.append(f"; RPZ zone {s.origin} shard {i} of {k}, written by blockd (zone_file_shards); "
                   "a change replaces only the shards it touches\n" + notes
                   + f"$ORIGIN {s.origin}\n$TTL {s.ttl}\n"
                   + f"@ SOA {s.mname} {s.rname} {serial} {s.refresh} {s.retry} {s.expire} {s.minimum}\n"
                   + f"@ NS {s.mname}\n" + body)
    return out


def write_shards(s: RpzSettings, v: ZoneVersion) -> int:
    """Replace the shard files whose text changed (or that are missing): all new texts are written
    and fsynced to temporary files first, then renamed into place, so a full disk leaves every
    shard as it was. Returns how many were replaced."""
    assert s.zone_file
    todo: list[tuple[str, str]] = []
    for i, text in enumerate(shard_texts(s, v)):
        path = shard_path(s.zone_file, i)
        try:
            with open(path, "rb") as f:
                if f.read() == text.encode("ascii", "backslashreplace"):
                    continue
        except FileNotFoundError:
            pass
        todo.append((path, text))
    temps: list[tuple[str, str]] = []
    try:
        for path, text in todo:
            fd, tmp = tempfile.mkstemp(prefix=".tmp-", dir=os.path.dirname(os.path.abspath(path)))
            temps.append((tmp, path))
            with os.fdopen(fd, "w", encoding="ascii", errors="backslashreplace") as f:
                f.write(text)
                f.flush()
                os.fsync(f.fileno())
            os.chmod(tmp, 0o644)
    except BaseException:
        for tmp, _ in temps:
            try:
                os.unlink(tmp)
            except FileNotFoundError:
                pass
        raise
    for tmp, path in temps:
        os.replace(tmp, path)
    return len(temps)
