"""The RPZ primary with real clients: dig AXFR/IXFR, TSIG (dig -y), ACL, persisted serial."""

from __future__ import annotations

import base64
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import dns.message
import dns.query
import dns.rcode
import dns.rdatatype
import dns.tsigkeyring
import dns.xfr
import dns.zone
import pytest

from blockd.dns.rpz import RpzSettings, TsigKey
from blockd.dns.rpzserver import RpzServer
from blockd.dns.testing import LoopThread
from blockd.enforcers.rpz import RpzEnforcer
from blockd.model import DomainRule, RuleSet

pytestmark = pytest.mark.e2e
O = frozenset({"o1"})
SECRET = base64.b64encode(b"0123456789abcdef0123456789abcdef").decode()


def rules(*names: str) -> RuleSet:
    return RuleSet.build([DomainRule(n[2:], True, O) if n.startswith("*.") else DomainRule(n, False, O)
                          for n in names])


class Primary:
    def __init__(self, tmp: Path, **kw: object) -> None:
        self.lt = LoopThread()
        self.s = RpzSettings(listen=(("127.0.0.1", 0),), state_file=str(tmp / "state.json"), **kw)  # type: ignore[arg-type]
        self.srv = RpzServer(self.s)
        self.lt.run(self.srv.start())
        self.enf = RpzEnforcer(self.srv)
        self.port = self.srv.addresses[0][1]

    def close(self) -> None:
        self.lt.run(self.srv.aclose())
        self.lt.close()

    def dig(self, *args: str) -> str:
        return subprocess.run([shutil.which("dig") or "dig", "@127.0.0.1", "-p", str(self.port), "+tries=1",
                               "+time=3", *args], capture_output=True, text=True, timeout=20).stdout


@pytest.fixture
def primary(tmp_path: Path) -> Iterator[Primary]:
    p = Primary(tmp_path)
    yield p
    p.close()


def test_soa_refused_before_first_apply_then_axfr(primary: Primary) -> None:
    assert "status: SERVFAIL" in primary.dig("rpz.blockd", "SOA")
    primary.lt.run(primary.enf.apply(rules("a.example", "*.b.example")))
    out = primary.dig("rpz.blockd", "AXFR")
    assert "*.b.example.rpz.blockd.\t60\tIN\tCNAME\t." in out and "XFR size: 6 records" in out
    z = dns.zone.from_xfr(dns.query.xfr("127.0.0.1", "rpz.blockd", port=primary.port))
    assert {n.to_text() for n in z.nodes} == {"@", "a.example", "b.example", "*.b.example"}
    assert "status: REFUSED" in primary.dig("example.com", "A")  # not our zone


def test_ixfr_incremental_and_fallback(primary: Primary) -> None:
    primary.lt.run(primary.enf.apply(rules("a.example")))
    s1 = primary.enf.serial
    primary.lt.run(primary.enf.apply(rules("a.example", "c.example")))
    out = primary.dig("rpz.blockd", f"IXFR={s1}")
    assert "XFR size: 5 records" in out and "c.example.rpz.blockd." in out  # SOA, SOA old, SOA new, +c, SOA
    assert "XFR size: 5 records" in primary.dig("rpz.blockd", "IXFR=0")  # AXFR style: SOA NS a c SOA
    assert primary.srv.stats["ixfr"] == 1 and primary.srv.stats["ixfr_as_axfr"] == 1
    assert primary.lt.run(primary.enf.apply(rules("a.example", "c.example"))).added == 0  # idempotent
    assert primary.enf.serial == s1 + 1


def test_serial_survives_restart(tmp_path: Path) -> None:
    p = Primary(tmp_path)
    p.lt.run(p.enf.apply(rules("a.example")))
    p.lt.run(p.enf.apply(rules("b.example")))
    assert p.enf.serial == 2
    p.close()
    q = Primary(tmp_path)
    try:
        q.lt.run(q.enf.apply(rules("b.example")))
        assert q.enf.serial == 2  # same content (by digest): same serial, secondaries need no transfer
        assert "SOA" in q.dig("rpz.blockd", "SOA") and " 2 " in q.dig("rpz.blockd", "SOA", "+short")
    finally:
        q.close()
    r = Primary(tmp_path)
    try:
        r.lt.run(r.enf.apply(rules("c.example")))
        assert r.enf.serial == 3  # other content: never under an old serial
    finally:
        r.close()


def test_tsig_required_and_signed(tmp_path: Path) -> None:
    p = Primary(tmp_path, tsig=TsigKey("xfr-key", SECRET))
    try:
        p.lt.run(p.enf.apply(rules(*[f"n{i}.example" for i in range(5000)])))  # several messages
        assert "Transfer failed" in p.dig("rpz.blockd", "AXFR") or "REFUSED" in p.dig("rpz.blockd", "AXFR")
        out = p.dig("-y", f"hmac-sha256:xfr-key:{SECRET}", "rpz.blockd", "AXFR")
        assert "XFR size: 5003 records" in out and "tsig verify failure" not in out.lower()
        keyring = dns.tsigkeyring.from_text({"xfr-key": ("hmac-sha256", SECRET)})
        z = dns.zone.from_xfr(dns.query.xfr("127.0.0.1", "rpz.blockd", port=p.port, keyring=keyring,
                                            keyname="xfr-key"))
        assert len(z.nodes) == 5001
    finally:
        p.close()


def test_transfer_acl(tmp_path: Path) -> None:
    p = Primary(tmp_path, allow_loopback=False, allow_transfer=("192.0.2.0/24",), zone_file=str(tmp_path / "z"))
    try:
        p.lt.run(p.enf.apply(rules("a.example")))
        assert "Transfer failed" in p.dig("rpz.blockd", "AXFR")
        assert "status: NOERROR" in p.dig("rpz.blockd", "SOA")  # SOA stays queryable
        assert "a.example CNAME . ; orders=o1" in (tmp_path / "z").read_text()
    finally:
        p.close()
