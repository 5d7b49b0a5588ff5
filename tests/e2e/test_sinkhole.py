"""The sinkhole on loopback, queried by real clients: dig (bind9-dnsutils) and dnspython.

The server runs in an event loop in a background thread; its upstream is a tiny authoritative
server for example.net started by the test (no traffic leaves loopback).
"""

from __future__ import annotations

import shutil
import socket
import subprocess
import time
from collections.abc import Iterator
from datetime import datetime, timezone

import dns.edns
import dns.flags
import dns.message
import dns.query
import dns.rcode
import pytest

from blockd.dns.server import SinkholeServer, SinkholeSettings
from blockd.dns.testing import LoopThread, Upstream
from blockd.enforcers.dns import SinkholeEnforcer
from blockd.model import DomainRule, OrderInfo, RuleSet

pytestmark = pytest.mark.e2e
DIG = shutil.which("dig")
T0 = datetime(2026, 1, 1, tzinfo=timezone.utc)


def order(oid: str, answer: str | None = None) -> OrderInfo:
    return OrderInfo(oid, "regulator", 1, "Example Court", f"2024/{oid}", "https://example.org/legal", "block",
                     answer, None, T0)


ORDERS = {o: order(o, a) for o, a in [("nx", None), ("nd", "nodata"), ("rf", "refused"), ("sh", "sinkhole"),
                                         ("dr", "drop"), ("lg", "log")]}
RULES = RuleSet.build(
    [
        DomainRule("blocked.example.org", False, frozenset({"nx"})),
        DomainRule("tree.example.org", True, frozenset({"nx"})),
        DomainRule("nodata.example.org", False, frozenset({"nd"})),
        DomainRule("refused.example.org", False, frozenset({"rf"})),
        DomainRule("sink.example.org", False, frozenset({"sh"})),
        DomainRule("drop.example.org", False, frozenset({"dr"})),
        DomainRule("shadow.example.net", False, frozenset({"lg"})),
        DomainRule("xn--bcher-kva.de", False, frozenset({"nx"})),
    ],
    orders=ORDERS,
)


class Env:
    def __init__(self, settings: SinkholeSettings, rules: RuleSet = RULES) -> None:
        self.lt = LoopThread()
        self.up = Upstream("example.net")
        self.lt.run(self.up.start())
        s = SinkholeSettings(**{**_fields(settings), "upstreams": (("127.0.0.1", self.up.port),)})
        self.server = SinkholeServer(s)
        self.lt.run(self.server.start())
        self.enf = SinkholeEnforcer(self.server)
        self.applied = self.lt.run(self.enf.apply(rules))
        self.port = self.server.addresses[0][1]

    def close(self) -> None:
        self.lt.run(self.server.aclose())
        self.lt.run(self.up.aclose())
        self.lt.close()

    def udp(self, name: str, qtype: str = "A", timeout: float = 2, **kw: object) -> dns.message.Message:
        return dns.query.udp(dns.message.make_query(name, qtype, **kw), "127.0.0.1", timeout, port=self.port)

    def tcp(self, name: str, qtype: str = "A", **kw: object) -> dns.message.Message:
        return dns.query.tcp(dns.message.make_query(name, qtype, **kw), "127.0.0.1", 2, port=self.port)

    def dig(self, *args: str) -> str:
        assert DIG, "dig (bind9-dnsutils) is required"
        r = subprocess.run([DIG, "@127.0.0.1", "-p", str(self.port), "+tries=1", "+time=2", *args],
                           capture_output=True, text=True, timeout=20)
        return r.stdout


def _fields(s: SinkholeSettings) -> dict[str, object]:
    return {f: getattr(s, f) for f in s.__dataclass_fields__}


BASE = SinkholeSettings(listen=(("127.0.0.1", 0),), sinkhole_v4="192.0.2.80", sinkhole_v6="2001:db8::80")


@pytest.fixture(scope="module")
def env() -> Iterator[Env]:
    e = Env(BASE)
    yield e
    e.close()


def test_applied_in_sync_and_readback(env: Env) -> None:
    assert env.applied.in_sync
    assert env.lt.run(env.enf.readback()).digest == RULES.digest


def test_dig_prints_ede_16_with_authority_and_order(env: Env) -> None:
    out = env.dig("blocked.example.org", "A")
    assert "status: NXDOMAIN" in out
    assert "; EDE: 16 (Censored): (Blocked by order nx of Example Court (2024/nx), see https://example.org/legal)" in out
    assert "blocked.example.org.\t300\tIN\tSOA\tblockd.invalid." in out  # negative caching (RFC 2308)
    assert "flags: qr rd ra;" in out  # no AA, no AD


def test_dig_no_edns_no_ede(env: Env) -> None:
    out = env.dig("+noedns", "blocked.example.org")
    assert "status: NXDOMAIN" in out and "EDE" not in out and "OPT PSEUDOSECTION" not in out


def test_dig_tcp(env: Env) -> None:
    out = env.dig("+tcp", "a.b.tree.example.org", "TXT")
    assert "status: NXDOMAIN" in out and "EDE: 16 (Censored)" in out and "(TCP)" in out


@pytest.mark.parametrize(
    "name, exact_blocked",
    [("tree.example.org", True), ("deep.er.tree.example.org", True), ("blocked.example.org", True),
     ("www.blocked.example.org", False)],
)
def test_subtree_vs_exact(env: Env, name: str, exact_blocked: bool) -> None:
    r = env.udp(name, use_edns=0)
    assert r.rcode() == dns.rcode.NXDOMAIN  # forwarded ones too: the upstream does not serve example.org
    assert bool([o for o in r.options if o.otype == dns.edns.EDE]) is exact_blocked


def test_answer_modes(env: Env) -> None:
    r = env.udp("nodata.example.org", use_edns=0)
    assert r.rcode() == dns.rcode.NOERROR and not r.answer and r.authority
    assert [o.code for o in r.options if o.otype == dns.edns.EDE] == [16]
    r = env.udp("refused.example.org", use_edns=0)
    assert r.rcode() == dns.rcode.REFUSED and [o.code for o in r.options if o.otype == dns.edns.EDE] == [16]
    assert env.udp("sink.example.org", "A").answer[0][0].to_text() == "192.0.2.80"
    assert env.udp("sink.example.org", "AAAA").answer[0][0].to_text() == "2001:db8::80"
    with pytest.raises(dns.exception.Timeout):
        env.udp("drop.example.org", timeout=0.5)
    r = env.udp("shadow.example.net")  # log-only: answered normally, but counted
    assert r.rcode() == dns.rcode.NOERROR and r.answer[0][0].to_text() == "192.0.2.1"
    snap = env.server.stats.snapshot()
    assert snap["results"]["log"] >= 1 and snap["results"]["drop"] >= 1
    assert snap["orders"]["lg"] >= 1 and snap["orders"]["nd"] >= 1


def test_idn_and_case(env: Env) -> None:
    r = env.udp("bücher.de")  # dnspython encodes with IDNA 2008 (the idna package is installed)
    assert r.rcode() == dns.rcode.NXDOMAIN
    assert "status: NXDOMAIN" in env.dig("+idnin", "bücher.de")
    out = env.dig("BlOcKeD.ExAmPlE.oRg")
    assert "status: NXDOMAIN" in out and ";BlOcKeD.ExAmPlE.oRg." in out


def test_forward_cache_and_ttl(env: Env) -> None:
    before = env.up.queries
    r1 = env.udp("cache-me.example.net")
    r2 = env.udp("CACHE-me.example.net")
    assert r1.answer[0][0].to_text() == "192.0.2.1" == r2.answer[0][0].to_text()
    assert env.up.queries == before + 1  # the second came from the cache
    assert str(r2.question[0].name) == "CACHE-me.example.net."  # client's case kept
    assert r2.answer[0].ttl <= 300
    assert env.udp("nope.example.com").rcode() == dns.rcode.NXDOMAIN  # upstream's NXDOMAIN passes through


def test_truncation_then_tcp(env: Env) -> None:
    out = env.dig("+noedns", "+ignore", "big.example.net")
    assert "flags: qr tc" in out or " tc " in out
    out = env.dig("+noedns", "big.example.net")  # dig retries over TCP by itself
    assert "Truncated, retrying in TCP mode" in out and "ANSWER: 60" in out


def test_tcp_pipelining(env: Env) -> None:
    names = ["blocked.example.org", "p1.example.net", "tree.example.org", "p2.example.net"]
    with socket.create_connection(("127.0.0.1", env.port), timeout=3) as s:
        msgs = [dns.message.make_query(n, "A") for n in names]
        s.sendall(b"".join(len(w).to_bytes(2, "big") + w for w in (m.to_wire() for m in msgs)))
        got = {}
        buf = b""
        while len(got) < len(names):
            buf += s.recv(65535)
            while len(buf) >= 2 and len(buf) >= 2 + int.from_bytes(buf[:2], "big"):
                n = int.from_bytes(buf[:2], "big")
                m = dns.message.from_wire(buf[2 : 2 + n])
                buf = buf[2 + n :]
                got[str(m.question[0].name).rstrip(".")] = m.rcode()
    assert got == {"blocked.example.org": 3, "p1.example.net": 0, "tree.example.org": 3, "p2.example.net": 0}


def test_malformed_packets_do_not_kill_the_server(env: Env) -> None:
    with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
        s.settimeout(1)
        for junk in (b"", b"\x00", b"\xff" * 40, b"\x12\x34\x01\x00\x00\x02" + b"\x00" * 30):
            s.sendto(junk, ("127.0.0.1", env.port))
        q = bytearray(dns.message.make_query("blocked.example.org", "A").to_wire())
        q[4:6] = b"\x00\x02"  # QDCOUNT 2
        s.sendto(bytes(q), ("127.0.0.1", env.port))
        deadline = time.monotonic() + 3
        while time.monotonic() < deadline:
            data = s.recv(512)
            if data[:2] == q[:2]:
                assert data[3] & 0x0F == dns.rcode.FORMERR
                break
    assert env.udp("blocked.example.org").rcode() == dns.rcode.NXDOMAIN
    m = dns.message.make_query("blocked.example.org", "A")
    m.set_opcode(dns.opcode.UPDATE)
    assert dns.query.udp(m, "127.0.0.1", 2, port=env.port).rcode() == dns.rcode.NOTIMP


def test_badvers_not_forwarded(env: Env) -> None:
    before = env.up.queries
    r = env.udp("anything.example.net", use_edns=1)
    assert r.rcode() == dns.rcode.BADVERS and env.up.queries == before
    assert "status: BADVERS" in env.dig("+edns=1", "+noednsneg", "blocked.example.org")


def test_swap_is_atomic_and_readback_follows(env: Env) -> None:
    swap = RuleSet.build([DomainRule(f"n{i}.example.org", False, frozenset({"nx"})) for i in range(50_000)]
                         + [DomainRule("tree.example.org", True, frozenset({"nx"}))], orders=ORDERS)
    applied = env.lt.run(env.enf.apply(swap))
    assert applied.in_sync and applied.added == 50_000
    assert env.udp("n49999.example.org").rcode() == dns.rcode.NXDOMAIN
    assert not [o for o in env.udp("blocked.example.org", use_edns=0).options if o.otype == dns.edns.EDE]
    assert env.lt.run(env.enf.apply(RULES)).in_sync  # back to the module's rules
    assert env.udp("n1.example.org", use_edns=0).rcode() == dns.rcode.NXDOMAIN  # upstream does not serve .org
    assert not [o for o in env.udp("n1.example.org", use_edns=0).options if o.otype == dns.edns.EDE]


@pytest.mark.parametrize("code, label", [(15, "Blocked"), (17, "Filtered")])
def test_ede_code_configurable(code: int, label: str) -> None:
    e = Env(SinkholeSettings(**{**_fields(BASE), "ede_code": code}))
    try:
        assert f"; EDE: {code} ({label}):" in e.dig("blocked.example.org")
    finally:
        e.close()


def test_acl_refuses_unlisted_clients() -> None:
    e = Env(SinkholeSettings(**{**_fields(BASE), "allow_loopback": False, "allow": ("192.0.2.0/24",)}))
    try:
        before = e.up.queries
        assert e.udp("www.example.net").rcode() == dns.rcode.REFUSED
        with pytest.raises((EOFError, ConnectionError)):  # TCP: closed at accept, holds no slot
            e.tcp("blocked.example.org")
        assert e.up.queries == before and e.server.stats.results["acl_refused"] == 1
        assert e.server.tcp_closed["acl"] == 1 and not e.server.tcp_clients
    finally:
        e.close()


def test_upstream_failover_and_servfail() -> None:
    dead = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
    dead.bind(("127.0.0.1", 0))  # bound but never answers
    try:
        lt = LoopThread()
        up = Upstream("example.net")
        lt.run(up.start())
        s = SinkholeSettings(listen=(("127.0.0.1", 0),), upstream_timeout_s=0.3, upstream_attempts=2,
                             upstreams=(dead.getsockname(), ("127.0.0.1", up.port)))
        srv = SinkholeServer(s)
        lt.run(srv.start())
        port = srv.addresses[0][1]
        r = dns.query.udp(dns.message.make_query("a.example.net", "A"), "127.0.0.1", 3, port=port)
        assert r.answer[0][0].to_text() == "192.0.2.1"
        lt.run(up.aclose())
        r = dns.query.udp(dns.message.make_query("b.example.net", "A"), "127.0.0.1", 3, port=port)
        assert r.rcode() == dns.rcode.SERVFAIL
        lt.run(srv.aclose())
        lt.close()
    finally:
        dead.close()


def test_structured_dns_error_only_for_clients_that_ask() -> None:
    """draft-ietf-dnsop-structured-dns-error-22 §5.1/§5.4: a query with the SDE option (here code
    65001, the operator's sde_option_code) gets the JSON in the EDE EXTRA-TEXT; other EDNS clients,
    including ones sending the old INFO-CODE 0 signal of -03..-19, keep the plain text; dig too."""
    import json

    s = SinkholeSettings(**{**_fields(BASE), "sde_option_code": 65001, "sde_organization": "ISP Example",
                            "sde_contact": ("mailto:noc@isp.example", "tel:+84-24-1234-5678")})
    e = Env(s)
    just = "Blocked by order nx of Example Court (2024/nx), see https://example.org/legal"
    try:
        for signal in (None, dns.edns.EDEOption(dns.edns.EDECode.OTHER), dns.edns.GenericOption(15, b"")):
            plain = e.udp("blocked.example.org", use_edns=0, options=[signal] if signal else [])
            (o,) = [x for x in plain.options if isinstance(x, dns.edns.EDEOption)]
            assert o.code == 16 and o.text == just
        for r in (e.udp("www.tree.example.org", use_edns=0, options=[dns.edns.GenericOption(65001, b"")]),
                  e.tcp("www.tree.example.org", use_edns=0, options=[dns.edns.GenericOption(65001, b"")])):
            assert r.rcode() == dns.rcode.NXDOMAIN
            (o,) = [x for x in r.options if isinstance(x, dns.edns.EDEOption)]
            assert o.code == 16
            assert o.text == ('{"c":["mailto:noc@isp.example","tel:+84-24-1234-5678"],"j":"' + just
                              + '","o":"ISP Example","l":"en"}')
        r = e.tcp("sink.example.org", use_edns=0, options=[dns.edns.GenericOption(65001, b"")])
        (o,) = [x for x in r.options if isinstance(x, dns.edns.EDEOption)]
        assert json.loads(o.text or "")["j"].startswith("Blocked by order sh of Example Court")
        assert [rd.address for rr in r.answer for rd in rr] == ["192.0.2.80"]
        if DIG:  # dig's +ednsopt sends the SDE option as a client of the draft would
            out = e.dig("+ednsopt=65001", "blocked.example.org", "A")
            assert '"j":"Blocked by order nx of Example Court' in out and '"l":"en"' in out, out
    finally:
        e.close()
