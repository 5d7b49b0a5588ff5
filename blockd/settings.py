"""blockd.yaml -> Settings (frozen), validated once, every problem reported together.

Relative paths are resolved against the config file's directory. Without a config file the
defaults point into a source checkout (`policies/…`), which is what `make demo` uses.
See `systemd/blockd.yaml` for the installed default.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from blockd import ranges, strictyaml
from blockd.errors import ConfigError, InputError
from blockd.fsutil import read_regular
from blockd.model import Cidr
from blockd.names import display, normalise
from blockd.blockpage import BlockPageSettings
from blockd.dns.rpz import RpzSettings
from blockd.dns.server import SinkholeSettings
from blockd.enforcers.bgp import BgpSettings
from blockd.enforcers.ipset import IpsetSettings
from blockd.enforcers.nft import NftSettings
from blockd.schema import Reader, dataclass_from, join


@dataclass(frozen=True, slots=True)
class GuardSettings:
    min_prefix_v4: int = 16
    min_prefix_v6: int = 32
    growth_factor: float = 2.0
    growth_floor: int = 1000


@dataclass(frozen=True, slots=True)
class EnforcerSettings:
    """Which enforcers run (a key present = on), each with its own settings."""

    nft: NftSettings | None = None
    ipset: IpsetSettings | None = None
    dns: SinkholeSettings | None = None
    rpz: RpzSettings | None = None
    bgp: BgpSettings | None = None


@dataclass(frozen=True, slots=True)
class DaemonSettings:
    metrics_listen: tuple[str, int] | None = ("127.0.0.1", 9153)
    #: how often every enforcer is read back and repaired if it drifted
    drift_check_s: float = 60.0
    #: leave kernel rules in place on SIGTERM, so a restart has no gap
    keep_rules_on_stop: bool = True
    #: policy directory polling interval when inotify is unavailable
    poll_s: float = 2.0
    operator: str = "operator"
    #: how a regulator reaches the operator (statement `operator.contact`), e.g. noc@example.net
    operator_contact: str = ""
    #: the operator's minisign secret key, to sign attestations
    operator_key: str | None = None
    attest_dir: str | None = None
    attest_period_s: float = 86400.0
    audit_log: str | None = None
    #: enforcers whose failure does not hold back readiness (READY=1, DNS listeners); they are
    #: still retried, counted, alerted and attested as failed
    optional_enforcers: tuple[str, ...] = ()
    #: longest wait between retries of a failed apply or write (doubling from 1 s)
    retry_max_s: float = 60.0

    def __post_init__(self) -> None:
        bad = [n for n in self.optional_enforcers if n not in ENFORCER_NAMES]
        if bad:
            raise ConfigError(f"daemon.optional_enforcers: {bad!r} unknown; known: {', '.join(ENFORCER_NAMES)}")
        if not self.retry_max_s > 0:
            raise ConfigError(f"daemon.retry_max_s: {self.retry_max_s!r} must be > 0 seconds")


ENFORCER_NAMES = ("nft", "ipset", "dns", "rpz", "bgp")


@dataclass(frozen=True, slots=True)
class Settings:
    trust_store: Path
    policy_dir: Path
    catalog_dir: Path
    prefix_table: Path | None
    shared_infra_dir: Path | None
    state_dir: Path
    guards: GuardSettings = field(default_factory=GuardSettings)
    allow_domains: tuple[str, ...] = ()
    allow_cidrs: tuple[Cidr, ...] = ()
    max_policy_bytes: int = 64 << 20
    enforcers: EnforcerSettings = field(default_factory=EnforcerSettings)
    daemon: DaemonSettings = field(default_factory=DaemonSettings)
    source: str = "(defaults)"
    #: the HTTP 451 page on the sinkhole address (blockd/blockpage.py); None = off
    block_page: BlockPageSettings | None = None


def defaults(base: Path = Path(".")) -> Settings:
    pol = base / "policies"
    return Settings(
        trust_store=pol / "trust",
        policy_dir=pol / "examples",
        catalog_dir=pol / "catalog",
        prefix_table=pol / "asn" / "prefix2as.txt",
        shared_infra_dir=pol / "shared-infra",
        state_dir=base / "var" / "state",
    )


MAX_CONFIG_BYTES = 1 << 20
_PATHS = ("trust_store", "policy_dir", "catalog_dir", "prefix_table", "shared_infra_dir", "state_dir")


def load_settings(path: Path | None) -> Settings:
    if path is None:
        return defaults()
    source = str(path)
    try:
        data = read_regular(path, MAX_CONFIG_BYTES, what="config file")
    except InputError as e:
        raise ConfigError(e.message, where=e.where) from None
    try:
        doc = strictyaml.load(data, source, max_bytes=MAX_CONFIG_BYTES)
    except InputError as e:
        raise ConfigError(e.message, where=e.where) from None
    r = Reader(source)
    m = r.mapping(doc, "", 1, required=("trust_store", "policy_dir", "catalog_dir", "state_dir"),
                  optional=("prefix_table", "shared_infra_dir", "guards", "allowlist",
                            "max_policy_bytes", "enforcers", "daemon", "block_page"))
    if m is None:
        r.raise_if_any(ConfigError)
        raise AssertionError("unreachable")
    base = path.parent
    paths: dict[str, Path | None] = {}
    for key in _PATHS:
        value = r.optional_string(m.get(key), key, m.lines.get(key))
        paths[key] = (base / value) if value else None
    guards = GuardSettings()
    if "guards" in m:
        g = r.mapping(m["guards"], "guards", m.lines["guards"],
                      optional=("min_prefix_v4", "min_prefix_v6", "growth_factor", "growth_floor"))
        if g is not None:
            def num(key: str, default: int, lo: int, hi: int) -> int:
                if key not in g:
                    return default
                value = r.integer(g[key], join("guards", key), g.lines[key], minimum=lo)
                if value is not None and value > hi:
                    r.error(join("guards", key), g.lines[key], f"{value} is above the maximum {hi}")
                return value if value is not None else default
            factor = guards.growth_factor
            if "growth_factor" in g:
                try:
                    factor = float(str(g["growth_factor"]))
                    if factor < 1.0:
                        raise ValueError
                except ValueError:
                    r.error("guards.growth_factor", g.lines["growth_factor"],
                            f"bad value {g['growth_factor']!r}; expected a number >= 1.0")
            guards = GuardSettings(num("min_prefix_v4", 16, 0, 32), num("min_prefix_v6", 32, 0, 128), factor,
                                   num("growth_floor", 1000, 0, 1 << 40))
    allow_domains: list[str] = []
    allow_cidrs: list[Cidr] = []
    if "allowlist" in m:
        a = r.mapping(m["allowlist"], "allowlist", m.lines["allowlist"], optional=("domains", "cidrs"))
        if a is not None:
            allow_domains = r.each(a.get("domains"), "allowlist.domains", a.lines.get("domains"),
                                   lambda s: display(*normalise(s)), "a domain name")
            allow_cidrs = r.each(a.get("cidrs"), "allowlist.cidrs", a.lines.get("cidrs"), ranges.parse_cidr, "a prefix")
            for i, c in enumerate(allow_cidrs):
                floor = guards.min_prefix_v4 if c.version == 4 else guards.min_prefix_v6
                if c.prefixlen < floor:
                    r.error(f"allowlist.cidrs[{i}]", a.lines.get("cidrs"),
                            f"{ranges.format_cidr(c.version, c.network, c.prefixlen)} is wider than the guards' "
                            f"min_prefix_v{c.version} (/{floor}); an allowlist that wide would unblock most orders")
    max_bytes = 64 << 20
    if "max_policy_bytes" in m:
        max_bytes = r.integer(m["max_policy_bytes"], "max_policy_bytes", m.lines["max_policy_bytes"], minimum=1024) or max_bytes
    enforcers = dataclass_from(r, EnforcerSettings, m.get("enforcers"), "enforcers", m.lines.get("enforcers"))
    daemon = dataclass_from(r, DaemonSettings, m.get("daemon"), "daemon", m.lines.get("daemon"))
    block_page = None
    if "block_page" in m:
        block_page = dataclass_from(r, BlockPageSettings, m["block_page"], "block_page", m.lines["block_page"])
    if daemon is not None:
        daemon = _resolve(daemon, base)
    if enforcers is not None and daemon is not None:
        _validate(r, m, enforcers, daemon, block_page)
    r.raise_if_any(ConfigError)
    assert enforcers is not None and daemon is not None
    return Settings(
        trust_store=paths["trust_store"],  # type: ignore[arg-type]
        policy_dir=paths["policy_dir"],  # type: ignore[arg-type]
        catalog_dir=paths["catalog_dir"],  # type: ignore[arg-type]
        prefix_table=paths["prefix_table"],
        shared_infra_dir=paths["shared_infra_dir"],
        state_dir=paths["state_dir"],  # type: ignore[arg-type]
        guards=guards,
        allow_domains=tuple(allow_domains),
        allow_cidrs=tuple(allow_cidrs),
        max_policy_bytes=max_bytes,
        enforcers=enforcers,
        daemon=daemon,
        source=source,
        block_page=block_page,
    )


def _resolve(d: DaemonSettings, base: Path) -> DaemonSettings:
    """Relative file names in the daemon section are relative to the config file."""
    from dataclasses import replace

    fix = {k: str(base / v) for k in ("operator_key", "attest_dir", "audit_log") if (v := getattr(d, k))}
    return replace(d, **fix)


def _line(m: object, *keys: str) -> int | None:
    """The line of a nested key (or of the nearest parent that has one)."""
    line = None
    for key in keys:
        lines = getattr(m, "lines", None)
        if not isinstance(lines, dict) or key not in lines:
            break
        line = lines[key]
        m = m[key]  # type: ignore[index]
    return line


def _validate(r: Reader, m: object, e: EnforcerSettings, d: DaemonSettings,
              block_page: BlockPageSettings | None = None) -> None:
    """Values that parse but cannot work: every one is reported with the others."""
    from blockd.model import DNS_ANSWERS

    for key, minimum, why in (("drift_check_s", 1.0, "a read-back loop at 0 s would spin the CPU"),
                              ("poll_s", 0.1, "polling at 0 s would spin the CPU"),
                              ("attest_period_s", 1.0, "statements at that rate would fill the disk")):
        value = getattr(d, key)
        if not value >= minimum:
            r.error(join("daemon", key), _line(m, "daemon", key), f"{value!r} is too small ({why}); expected a "
                    f"number of seconds >= {minimum:g}")
    if e.dns is not None:
        for key in ("default_answer", "override_answer"):
            value = getattr(e.dns, key)
            if value is not None and value not in DNS_ANSWERS:
                r.error(join("enforcers.dns", key), _line(m, "enforcers", "dns", key),
                        f"bad value {value!r}; expected one of {', '.join(DNS_ANSWERS)}")
    if d.attest_dir and not d.operator_key:
        r.error("daemon.operator_key", _line(m, "daemon"), "attest_dir is set but operator_key is not; attestations "
                "are signed with the operator's minisign secret key")
    for key in ("attest_dir", "audit_log"):
        value = getattr(d, key)
        if not value:
            continue
        parent = Path(value) if key == "attest_dir" else Path(value).parent
        if parent.exists() and not parent.is_dir():
            r.error(join("daemon", key), _line(m, "daemon", key), f"{str(parent)!r} is not a directory")
    _clashes(r, m, e, d, block_page)


def _clashes(r: Reader, m: object, e: EnforcerSettings, d: DaemonSettings,
             block_page: BlockPageSettings | None = None) -> None:
    """Two listeners on one address and port (a wildcard address overlaps every address)."""
    listeners: list[tuple[str, str, int, str, int | None]] = []  # (proto, host, port, path, line)
    if e.dns is not None:
        for i, (host, port) in enumerate(e.dns.listen):
            for proto in ("udp", "tcp"):
                listeners.append((proto, host, port, f"enforcers.dns.listen[{i}]", _line(m, "enforcers", "dns", "listen")))
    if e.rpz is not None:
        for i, (host, port) in enumerate(e.rpz.listen):
            for proto in ("udp", "tcp"):
                listeners.append((proto, host, port, f"enforcers.rpz.listen[{i}]", _line(m, "enforcers", "rpz", "listen")))
    if d.metrics_listen is not None:
        host, port = d.metrics_listen
        listeners.append(("tcp", host, port, "daemon.metrics_listen", _line(m, "daemon", "metrics_listen")))
    if block_page is not None:
        for i, (host, port) in enumerate(block_page.listen):
            listeners.append(("tcp", host, port, f"block_page.listen[{i}]", _line(m, "block_page", "listen")))
    for i, (proto, host, port, path, line) in enumerate(listeners):
        for proto2, host2, port2, path2, _ in listeners[:i]:
            if proto == proto2 and port == port2 and path != path2 and _overlap(host, host2):
                r.error(path, line, f"{host}:{port} ({proto}) is also {path2} ({host2}:{port2}); each listener "
                        f"needs its own address or port")
                break


def _overlap(a: str, b: str) -> bool:
    wild = {"0.0.0.0", "::", ""}
    if a == b:
        return True
    v6 = lambda h: ":" in h  # noqa: E731
    # `::` is dual-stack on Linux by default: it overlaps IPv4 addresses too.
    return (a in wild and (b == "::" or v6(a) or not v6(b))) or (b in wild and (a == "::" or v6(b) or not v6(a)))
