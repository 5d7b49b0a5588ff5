"""Zones per authority, consumed by PowerDNS Recursor, Knot Resolver and Unbound from the Debian
packages, each configured by what `rpzconfig` generates (`blockd rpz config --for ...`).

* PowerDNS: AXFR/IXFR (refresh=1), EDE 16 whose text names the zone's authority, a name it had
  cached before the block is wiped from its cache by blockd's NOTIFY once it took the transfer.
* Knot: loads the zone files blockd writes atomically and reloads them when they are replaced;
  NXDOMAIN with EDE 16 and the authority in a TXT (`explanation.invalid.`).
* Unbound: one `rpz:` clause per zone, NOTIFY + IXFR.
* A stopped resolver shows up as lagging in `blockd_rpz_zone_secondary_in_sync` and
  `blockd_rpz_secondary_in_sync` (the series the BlockdRpzSecondaryLagging alert reads).
Every process listens on loopback; PowerDNS on 127.0.0.2 so the primary tells it apart.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from collections.abc import Callable, Iterator
from datetime import datetime, timezone
from pathlib import Path

import dns.edns
import dns.message
import dns.query
import dns.rcode
import pytest
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from blockd.dns import rpz, rpzconfig
from blockd.dns.resolvers import (KRESD, PDNS, UNBOUND, free_port, kresd_conf, pdns_conf, start, stop,
                                  unbound_conf)
from blockd.dns.rpzserver import RpzServer
from blockd.dns.testing import LoopThread, Upstream
from blockd.enforcers.rpz import RpzEnforcer
from blockd.metrics import Live, LiveCollector
from blockd.model import DomainRule, OrderInfo, RuleSet

pytestmark = [pytest.mark.e2e, pytest.mark.slow]
T = datetime(2026, 1, 1, tzinfo=timezone.utc)
VN = "Bộ Thông tin và Truyền thông"
ORDERS = {
    "court-1": OrderInfo("court-1", "regulator", 1, "Example Court", "2026/1", "https://court.example/1", "block",
                         None, None, T),
    "mic-7": OrderInfo("mic-7", "regulator", 1, VN, "QD-7", "https://mic.example/7", "block", None, None, T),
}
PDNS_HOST = "127.0.0.2"


def rules(*pairs: tuple[str, str]) -> RuleSet:
    return RuleSet.build([DomainRule(n, False, frozenset({o})) for n, o in pairs], orders=ORDERS)


BASE = (("court.example.net", "court-1"), ("mic.example.net", "mic-7"))


def wait_for(check: Callable[[], bool], what: str, timeout: float = 40) -> float:
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        if check():
            return time.monotonic() - t0
        time.sleep(0.02)  # a poll interval under a deadline
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


def ask(host: str, port: int, name: str) -> dns.message.Message | None:
    try:
        return dns.query.udp(dns.message.make_query(name, "A", use_edns=0), host, 1.0, port=port)
    except (dns.exception.Timeout, OSError):
        return None


def rc(host: str, port: int, name: str) -> int | None:
    r = ask(host, port, name)
    return r.rcode() if r is not None else None


def ede(r: dns.message.Message) -> list[tuple[int, str]]:
    return [(int(o.code), o.text or "") for o in r.options if isinstance(o, dns.edns.EDEOption)]


class Fleet:
    def __init__(self, tmp: Path, tsig: rpz.TsigKey | None = None, with_unbound: bool = True) -> None:
        self.tmp = tmp
        self.procs: dict[str, subprocess.Popen[bytes]] = {}
        self.lt = LoopThread()
        self.up = Upstream("example.net")
        self.lt.run(self.up.start())
        self.pdns_port, self.kresd_port, self.ub_port = free_port(PDNS_HOST), free_port(), free_port()
        (tmp / "zones").mkdir()
        self.settings = rpz.RpzSettings(
            listen=(("127.0.0.1", 0),), layout="authority", tsig=tsig,
            notify=((PDNS_HOST, self.pdns_port),) + ((("127.0.0.1", self.ub_port),) if with_unbound else ()),
            wipe_cache=((PDNS_HOST, self.pdns_port),), renotify_s=1.0,
            zone_file=str(tmp / "zones" / "{zone}zone"), state_file=str(tmp / "rpz.state"))
        self.primary = RpzServer(self.settings)
        self.lt.run(self.primary.start())
        self.enf = RpzEnforcer(self.primary)
        self.live = Live(rpz=lambda: (self.primary.serial, {}, dict(self.primary.stats)),
                         rpz_zones=lambda: {z: (n, {a: s.serial for a, s in held.items()})
                                            for z, (n, held) in self.primary.zone_states().items()})

    def configs(self, rs: RuleSet, kind: str, state_dir: Path | None = None) -> str:
        zones = rpzconfig.zones_for(self.settings, rs)
        return rpzconfig.render(kind, self.settings, zones, ("127.0.0.1", self.primary.addresses[0][1]),
                                state_dir=str(state_dir) if state_dir else None)

    def start(self, rs: RuleSet, which: tuple[str, ...] = ("pdns", "kresd", "unbound")) -> None:
        if "pdns" in which:
            d = self.tmp / "pdns"
            d.mkdir(exist_ok=True)
            lua = self.configs(rs, "powerdns", d)
            generated = rpzconfig.recursor_conf_lines(lua)  # allow-notify-from/-for, EDE on
            assert "allow-notify-for=." in generated and "allow-notify-from=127.0.0.1" in generated
            conf = pdns_conf(d, (PDNS_HOST, self.pdns_port), self.up.port, lua,
                             extra=[f"query-local-address={PDNS_HOST}", *generated])
            self.procs["pdns"] = start("pdns", d, conf, lua=lua)
        if "kresd" in which:
            d = self.tmp / "kresd"
            d.mkdir(exist_ok=True)
            self.procs["kresd"] = start("kresd", d, kresd_conf(("127.0.0.1", self.kresd_port), self.up.port,
                                                               self.configs(rs, "knot")))
        if "unbound" in which:
            d = self.tmp / "unbound"
            d.mkdir(exist_ok=True)
            conf = unbound_conf(d, ("127.0.0.1", self.ub_port), self.up.port, zone=None)
            self.procs["unbound"] = start("unbound", d, conf + self.configs(rs, "unbound", d))

    def scrape(self) -> dict[tuple[str, tuple[str, ...]], float]:
        reg = CollectorRegistry()
        reg.register(LiveCollector(self.live))
        out = {}
        for fam in text_string_to_metric_families(generate_latest(reg).decode()):
            for s in fam.samples:
                out[(s.name, tuple(s.labels[k] for k in sorted(s.labels)))] = s.value
        return out

    def logs(self) -> str:
        return "\n".join(f"--- {n}\n" + (self.tmp / n / "log").read_text(errors="replace")[-2500:]
                         for n in self.procs if (self.tmp / n / "log").exists())

    def close(self) -> None:
        for p in self.procs.values():
            if p.poll() is None:
                p.send_signal(signal.SIGCONT)
        stop(*self.procs.values())
        self.lt.run(self.primary.aclose())
        self.lt.run(self.up.aclose())
        self.lt.close()


def _need(*paths: str) -> None:
    missing = [p for p in paths if not os.path.exists(p)]
    if missing:
        pytest.fail(f"{missing} required (scripts/deps.sh installs pdns-recursor, knot-resolver, unbound)")


@pytest.fixture(scope="module")
def fleet(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Fleet]:
    _need(PDNS, KRESD, UNBOUND)
    f = Fleet(tmp_path_factory.mktemp("consumers"))
    try:
        f.lt.run(f.enf.apply(rules(*BASE)))
        f.start(rules(*BASE))
        yield f
    finally:
        f.close()


def test_each_resolver_blocks_and_names_the_authority(fleet: Fleet) -> None:
    kp, pp, up = fleet.kresd_port, fleet.pdns_port, fleet.ub_port
    try:
        for host, port in ((PDNS_HOST, pp), ("127.0.0.1", kp), ("127.0.0.1", up)):
            wait_for(lambda: rc(host, port, "mic.example.net") == dns.rcode.NXDOMAIN
                     and rc(host, port, "court.example.net") == dns.rcode.NXDOMAIN, f"{host}:{port} to block")
            assert rc(host, port, "free.example.net") == dns.rcode.NOERROR
        # PowerDNS: EDE 16, the text of the zone that matched: one zone per authority.
        r = ask(PDNS_HOST, pp, "mic.example.net")
        assert r is not None and ede(r) == [(16, f"Blocked by order of {VN}, see https://mic.example/7")]
        r = ask(PDNS_HOST, pp, "court.example.net")
        assert r is not None and ede(r) == [(16, "Blocked by order of Example Court, see https://court.example/1")]
        # Knot: EDE 16 (its own EXTRA-TEXT) and the legal basis as TXT in ADDITIONAL.
        r = ask("127.0.0.1", kp, "court.example.net")
        assert r is not None and [c for c, _ in ede(r)] == [16]
        txt = [rd.strings[0].decode() for rr in r.additional for rd in rr if rr.rdtype == dns.rdatatype.TXT]
        assert txt == ["Blocked by order of Example Court, see https://court.example/1"]
        r = ask("127.0.0.1", kp, "mic.example.net")
        assert r is not None
        txt = [rd.strings[0].decode("utf-8") for rr in r.additional for rd in rr if rr.rdtype == dns.rdatatype.TXT]
        assert txt == [f"Blocked by order of {VN}, see https://mic.example/7"]
    except AssertionError as e:
        raise AssertionError(f"{e}\n{fleet.logs()}") from None
    # three zones: the default (empty) one and one per authority, each with its own serial
    assert set(fleet.primary.zone_states()) == {"rpz.blockd.", "example-court.rpz.blockd.",
                                               "bo-thong-tin-va-truyen-thong.rpz.blockd."}


def test_change_reaches_every_resolver_and_cached_names_are_wiped(fleet: Fleet) -> None:
    """A name each resolver answered (and cached, TTL 300) before the order is blocked everywhere."""
    targets = {"pdns": (PDNS_HOST, fleet.pdns_port), "knot": ("127.0.0.1", fleet.kresd_port),
               "unbound": ("127.0.0.1", fleet.ub_port)}
    for who, (host, port) in targets.items():
        wait_for(lambda: rc(host, port, "court.example.net") == dns.rcode.NXDOMAIN, f"{who} up")
    took: dict[str, list[float]] = {k: [] for k in targets}
    before = fleet.primary.stats.get("cache_wipes", 0)
    try:
        for i in range(3):
            name = f"late{i}.example.net"
            for who, (host, port) in targets.items():
                assert rc(host, port, name) == dns.rcode.NOERROR  # now in the caches
            t0 = time.monotonic()
            fleet.lt.run(fleet.enf.apply(rules(*BASE, *((f"late{j}.example.net", "court-1") for j in range(i + 1)))))
            pending = dict(targets)
            while pending and time.monotonic() - t0 < 30:  # every resolver polled in turn, each timed
                for who, (host, port) in list(pending.items()):
                    if rc(host, port, name) == dns.rcode.NXDOMAIN:
                        took[who].append(time.monotonic() - t0)
                        del pending[who]
                time.sleep(0.01)  # poll interval under the deadline
            assert not pending, f"{sorted(pending)} still answer the cached {name} 30 s after the change"
    except AssertionError as e:
        raise AssertionError(f"{e}\n{fleet.logs()}") from None
    assert fleet.primary.stats.get("cache_wipes", 0) > before
    last = [max(took[w][i] for w in took) for i in range(3)]
    print(f"\napply -> NXDOMAIN s: " + ", ".join(f"{w} {sorted(v)[1]:.2f} (max {max(v):.2f})" for w, v in took.items())
          + f"; last resolver p50 {sorted(last)[1]:.2f} max {max(last):.2f}")


def test_lagging_resolver_in_metrics(fleet: Fleet) -> None:
    pdns = fleet.procs["pdns"]
    zone = "example-court.rpz.blockd."
    wait_for(lambda: fleet.scrape().get(("blockd_rpz_zone_secondary_in_sync", (PDNS_HOST, zone))) == 1.0,
             "PowerDNS in sync")
    pdns.send_signal(signal.SIGSTOP)
    try:
        fleet.lt.run(fleet.enf.apply(rules(*BASE, ("lag.example.net", "court-1"))))
        m = fleet.scrape()
        assert m[("blockd_rpz_zone_secondary_in_sync", (PDNS_HOST, zone))] == 0.0
        assert m[("blockd_rpz_secondary_in_sync", (PDNS_HOST,))] == 0.0
        serial = m[("blockd_rpz_zone_serial", (zone,))]
        assert m[("blockd_rpz_zone_secondary_serial", (PDNS_HOST, zone))] < serial
        # the other zones it holds are still in sync: the lag is per zone
        assert m[("blockd_rpz_zone_secondary_in_sync", (PDNS_HOST, "rpz.blockd."))] == 1.0
        wait_for(lambda: fleet.scrape().get(("blockd_rpz_zone_secondary_in_sync", ("127.0.0.1", zone))) == 1.0,
                 "Unbound in sync while PowerDNS lags")
    finally:
        pdns.send_signal(signal.SIGCONT)
    wait_for(lambda: fleet.scrape().get(("blockd_rpz_secondary_in_sync", (PDNS_HOST,))) == 1.0, "PowerDNS catch up")
    assert rc(PDNS_HOST, fleet.pdns_port, "lag.example.net") == dns.rcode.NXDOMAIN


def test_powerdns_seed_file_filters_before_any_transfer(fleet: Fleet, tmp_path: Path) -> None:
    """A restarted PowerDNS that cannot reach the primary still blocks, from the dumpFile/seedFile
    the generated config made its running twin write."""
    d = fleet.tmp / "pdns"
    wait_for(lambda: (d / "example-court.rpz.blockd.zone").exists(), "PowerDNS dumpFile")
    dead = free_port()  # nothing listens there: no transfer can happen
    lua = (d / "rpz.lua").read_text().replace(f'"127.0.0.1:{fleet.primary.addresses[0][1]}"', f'"127.0.0.1:{dead}"')
    assert f"127.0.0.1:{dead}" in lua
    d2, port = tmp_path / "pdns-seed", free_port(PDNS_HOST)
    d2.mkdir()
    conf = pdns_conf(d2, (PDNS_HOST, port), fleet.up.port, lua, extra=[f"query-local-address={PDNS_HOST}"])
    p = start("pdns", d2, conf, lua=lua)
    try:
        wait_for(lambda: rc(PDNS_HOST, port, "free.example.net") == dns.rcode.NOERROR, "the seeded PowerDNS up")
        assert rc(PDNS_HOST, port, "court.example.net") == dns.rcode.NXDOMAIN
        r = ask(PDNS_HOST, port, "mic.example.net")
        assert r is not None and r.rcode() == dns.rcode.NXDOMAIN and ede(r)[0][0] == 16
    finally:
        stop(p)


def test_knot_reads_complete_zone_files_only(fleet: Fleet) -> None:
    """The zone file is replaced by rename: kresd never parses a half-written file."""
    zone_file = Path(fleet.settings.zone_file.replace("{zone}", "example-court.rpz.blockd."))  # type: ignore[union-attr]
    ino = zone_file.stat().st_ino
    fleet.lt.run(fleet.enf.apply(rules(*BASE, ("knot.example.net", "court-1"))))
    assert zone_file.stat().st_ino != ino  # a new file took the name, the old one was never written into
    wait_for(lambda: rc("127.0.0.1", fleet.kresd_port, "knot.example.net") == dns.rcode.NXDOMAIN, "kresd reload")
    assert "knot.example.net CNAME ." in zone_file.read_text()


def test_tsig_notify_and_transfer_with_powerdns(tmp_path: Path) -> None:
    """PowerDNS answers a signed NOTIFY unsigned: that is an acknowledgement, not a failure;
    its transfers are signed (blockd refuses unsigned ones)."""
    _need(PDNS)
    key = rpz.TsigKey("xfr-key.", "c2VjcmV0LXNlY3JldC1zZWNyZXQtc2VjcmV0LTEyMzQ=")
    f = Fleet(tmp_path, tsig=key, with_unbound=False)
    try:
        f.lt.run(f.enf.apply(rules(*BASE)))
        f.start(rules(*BASE), which=("pdns",))
        wait_for(lambda: rc(PDNS_HOST, f.pdns_port, "court.example.net") == dns.rcode.NXDOMAIN, "signed AXFR")
        acked = f.primary.stats["notify_acked"]
        f.lt.run(f.enf.apply(rules(*BASE, ("signed.example.net", "court-1"))))
        wait_for(lambda: f.primary.stats["notify_acked"] > acked, "NOTIFY acknowledged")
        wait_for(lambda: rc(PDNS_HOST, f.pdns_port, "signed.example.net") == dns.rcode.NXDOMAIN, "signed IXFR")
        assert f.primary.stats["notify_failed"] == 0
        assert f.primary.stats["refused"] == 0
    except AssertionError as e:
        raise AssertionError(f"{e}\n{f.logs()}") from None
    finally:
        f.close()


def test_generated_unbound_and_bind_configs_pass_their_checkers(tmp_path: Path) -> None:
    """`unbound-checkconf` and `named-checkconf` accept what `rpz config` generates for 3 zones + TSIG."""
    import shutil

    s = rpz.RpzSettings(layout="authority", tsig=rpz.TsigKey("xfr-key.", "c2VjcmV0LXNlY3JldA=="))
    zones = rpzconfig.zones_for(s, rules(*BASE))
    ub = unbound_conf(tmp_path, ("127.0.0.1", 5399), 5398, zone=None)
    (tmp_path / "unbound.conf").write_text(ub + rpzconfig.render("unbound", s, zones, ("127.0.0.1", 5300),
                                                                 state_dir=str(tmp_path)))
    r = subprocess.run([shutil.which("unbound-checkconf") or "/usr/sbin/unbound-checkconf",
                        str(tmp_path / "unbound.conf")], capture_output=True, text=True, timeout=30)
    assert r.returncode == 0, r.stdout + r.stderr
    bind = rpzconfig.render("bind", s, zones, ("127.0.0.1", 5300))
    head, _, rest = bind.partition("// inside options { }:\n")
    policy, _, zone_stmts = rest.partition("\n")
    conf = (head + f'options {{\n    directory "{tmp_path}";\n    recursion yes;\n    {policy}\n}};\n' + zone_stmts)
    (tmp_path / "named.conf").write_text(conf)
    r = subprocess.run([shutil.which("named-checkconf") or "/usr/bin/named-checkconf", str(tmp_path / "named.conf")],
                       capture_output=True, text=True, timeout=30)
    assert r.returncode == 0, conf + r.stdout + r.stderr
