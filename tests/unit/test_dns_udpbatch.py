"""The batched UDP path (recvmmsg/sendmmsg thread per socket) on real loopback sockets.

Bursts are sent without waiting so that the worker receives many datagrams per recvmmsg; every
reply is matched to its query by id and question.
"""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator

import dns.edns
import dns.flags
import dns.message
import dns.query
import dns.rcode
import pytest

from blockd.dns import udpbatch
from blockd.dns.server import SinkholeServer, SinkholeSettings
from blockd.dns.testing import LoopThread, Upstream
from blockd.enforcers.dns import SinkholeEnforcer
from blockd.model import DomainRule, RuleSet

pytestmark = pytest.mark.skipif(not udpbatch.available(), reason="recvmmsg/sendmmsg need Linux")

RULES = RuleSet.build([DomainRule("blocked.test", True, frozenset({"o1"}))])
SWAPPED = RuleSet.build([DomainRule("blocked.test", True, frozenset({"o2"})),
                         DomainRule("other.test", False, frozenset({"o2"}))])


class Env:
    def __init__(self, **kw: object) -> None:
        self.lt = LoopThread()
        self.up = Upstream("example.net")
        self.lt.run(self.up.start())
        listen = kw.pop("listen", (("127.0.0.1", 0), ("::1", 0)))
        self.server = SinkholeServer(SinkholeSettings(listen=listen, upstreams=(("127.0.0.1", self.up.port),),
                                                      **kw))  # type: ignore[arg-type]
        self.lt.run(self.server.start())
        self.enf = SinkholeEnforcer(self.server)
        self.lt.run(self.enf.apply(RULES))

    def addr(self, v6: bool = False) -> tuple[str, int]:
        return next(a for a in self.server.addresses if (":" in a[0]) is v6)

    def close(self) -> None:
        self.lt.run(self.server.aclose())
        self.lt.run(self.up.aclose())
        self.lt.close()


@pytest.fixture()
def env() -> Iterator[Env]:
    e = Env()
    yield e
    e.close()


def burst(addr: tuple[str, int], wires: list[bytes], expect: int, timeout: float = 5) -> dict[int, bytes]:
    """Send the datagrams back to back in windows of 200 (the server's default receive buffer
    holds about 270), collecting replies by id until `expect` have arrived."""
    fam = socket.AF_INET6 if ":" in addr[0] else socket.AF_INET
    got: dict[int, bytes] = {}
    with socket.socket(fam, socket.SOCK_DGRAM) as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
        s.settimeout(timeout)
        deadline = time.monotonic() + timeout
        for start in range(0, len(wires), 200):
            for w in wires[start : start + 200]:
                s.sendto(w, addr)
            while len(got) < min(expect, start + 200) and time.monotonic() < deadline:
                try:
                    data = s.recv(65535)
                except TimeoutError:
                    break
                got[int.from_bytes(data[:2], "big")] = data
    return got


def queries(n: int, name: str = "www{i}.blocked.test", **kw: object) -> list[dns.message.Message]:
    out = []
    for i in range(n):
        m = dns.message.make_query(name.format(i=i), "A", use_edns=0, **kw)  # type: ignore[arg-type]
        m.id = i
        out.append(m)
    return out


def test_batched_by_default_and_same_port_for_tcp(env: Env) -> None:
    assert env.server.udp_batched
    assert sorted(t.name for t in threading.enumerate() if t.name.startswith("dns-udp-")) == sorted(
        f"dns-udp-{p}" for _, p in env.server.addresses)
    for host, port in env.server.addresses:
        m = dns.message.make_query("blocked.test", "A")
        assert dns.query.tcp(m, host, 2, port=port).rcode() == dns.rcode.NXDOMAIN


@pytest.mark.parametrize("v6", [False, True])
def test_burst_answered_with_ids_questions_and_ede(env: Env, v6: bool) -> None:
    qs = queries(1000, name="W{i}.Blocked.test")  # 0x20 case must be echoed
    got = burst(env.addr(v6), [q.to_wire() for q in qs], len(qs))
    assert len(got) == len(qs)
    for q in qs:
        r = dns.message.from_wire(got[q.id])
        assert r.id == q.id and r.question[0].name.to_text() == q.question[0].name.to_text()
        assert r.rcode() == dns.rcode.NXDOMAIN and r.flags & dns.flags.QR and not r.flags & dns.flags.AA
        assert [o.code for o in r.options if o.otype == dns.edns.EDE] == [16]
    assert env.server.stats.results["nxdomain"] == len(qs)
    assert env.server.stats.by_order() == {"o1": len(qs)}


def test_acl_uses_decoded_v4_and_v6_sources() -> None:
    e = Env(allow_loopback=False, allow=("::1/128",))
    try:
        m = dns.message.make_query("blocked.test", "A")
        host, port = e.addr(v6=False)
        assert dns.query.udp(m, host, 2, port=port).rcode() == dns.rcode.REFUSED
        host, port = e.addr(v6=True)
        assert dns.query.udp(m, host, 2, port=port).rcode() == dns.rcode.NXDOMAIN
        assert e.server.stats.results["acl_refused"] == 1 and e.up.queries == 0
    finally:
        e.close()


@pytest.mark.parametrize("v6", [False, True])
def test_forward_through_the_event_loop_then_cache_in_the_thread(env: Env, v6: bool) -> None:
    host, port = env.addr(v6)
    r = dns.query.udp(dns.message.make_query("fwd.example.net", "A"), host, 3, port=port)
    assert r.rcode() == dns.rcode.NOERROR and r.answer[0][0].to_text() == "192.0.2.1"
    r = dns.query.udp(dns.message.make_query("FWD.example.net", "A"), host, 3, port=port)
    assert r.answer[0][0].to_text() == "192.0.2.1" and r.question[0].name.to_text() == "FWD.example.net."
    assert env.up.queries == 1
    res = env.server.stats.results
    assert res["forwarded"] == 1 and res["cached"] == 1


def test_forwards_mixed_into_a_burst(env: Env) -> None:
    qs = queries(200) + queries(50, name="f{i}.example.net")
    for i, q in enumerate(qs):
        q.id = i
    got = burst(env.addr(), [q.to_wire() for q in qs], len(qs))
    assert len(got) == len(qs)
    assert all(dns.message.from_wire(got[i]).rcode() == dns.rcode.NXDOMAIN for i in range(200))
    assert all(dns.message.from_wire(got[i]).answer for i in range(200, 250))
    res = env.server.stats.results
    assert res["nxdomain"] == 200 and res["forwarded"] + res["cached"] == 50


def test_malformed_in_the_middle_of_a_batch(env: Env) -> None:
    good = queries(40)
    formerr = bytearray(dns.message.make_query("blocked.test", "A").to_wire())
    formerr[:2] = (1000).to_bytes(2, "big")
    formerr[4:6] = b"\x00\x02"  # QDCOUNT 2
    junk = [b"", b"\x00", b"\xff" * 40, b"\x12\x34\x81\x00" + b"\x00" * 30]  # short, or QR=1: dropped
    wires = [q.to_wire() for q in good[:20]] + junk + [bytes(formerr)] + [q.to_wire() for q in good[20:]]
    got = burst(env.addr(), wires, len(good) + 1)
    assert sorted(got) == list(range(40)) + [1000]
    assert got[1000][3] & 0x0F == dns.rcode.FORMERR
    res = env.server.stats.results
    assert res["malformed_dropped"] == len(junk) and res["formerr"] == 1 and res["nxdomain"] == 40
    m = dns.message.make_query("blocked.test", "A")
    assert dns.query.udp(m, *env.addr()[:1], 2, port=env.addr()[1]).rcode() == dns.rcode.NXDOMAIN


def test_table_swaps_under_load_keep_exact_counts(env: Env) -> None:
    stop = threading.Event()
    sent = received = 0
    ok = True

    def load() -> None:
        nonlocal sent, received, ok
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4 << 20)
            s.settimeout(5)
            while not stop.is_set():
                qs = queries(100)
                for q in qs:
                    s.sendto(q.to_wire(), env.addr())
                sent += len(qs)
                for _ in qs:
                    r = dns.message.from_wire(s.recv(65535))
                    ok = ok and r.rcode() == dns.rcode.NXDOMAIN and any(
                        o.otype == dns.edns.EDE for o in r.options)
                    received += 1

    t = threading.Thread(target=load)
    t.start()
    try:
        for rules in (SWAPPED, RULES, SWAPPED, RULES, SWAPPED):
            assert env.lt.run(env.enf.apply(rules)).in_sync
    finally:
        stop.set()
        t.join(30)
    assert ok and received == sent and sent > 0
    assert env.server.stats.results["nxdomain"] == sent
    orders = env.server.stats.by_order()
    assert sum(orders.values()) == sent and set(orders) <= {"o1", "o2"}


def test_counters_exact_from_thread_and_event_loop(env: Env) -> None:
    n = 3000
    got = burst(env.addr(), [q.to_wire() for q in queries(n)], n)
    assert len(got) == n
    for _ in range(20):  # TCP answers counted by the event loop at the same time
        dns.query.tcp(dns.message.make_query("blocked.test", "A"), "127.0.0.1", 2, port=env.addr()[1])
    assert env.server.stats.results["nxdomain"] == n + 20
    assert env.server.stats.by_order() == {"o1": n + 20}


def test_truncation_unchanged() -> None:
    e = Env(listen=(("127.0.0.1", 0),))
    try:
        host, port = e.addr()
        m = dns.message.make_query("big.example.net", "A", use_edns=False)
        r = dns.query.udp(m, host, 3, port=port)
        assert r.flags & dns.flags.TC and not r.answer
        r = dns.query.udp(dns.message.make_query("big.example.net", "A", use_edns=0, payload=4096), host, 3, port=port)
        assert len(r.answer[0]) == 60
    finally:
        e.close()


def test_clean_shutdown_leaves_no_thread_and_frees_the_port() -> None:
    e = Env()
    addrs = list(e.server.addresses)
    t0 = time.monotonic()
    e.lt.run(e.server.aclose())
    assert time.monotonic() - t0 < 1
    assert not [t for t in threading.enumerate() if t.name.startswith("dns-udp-")]
    for host, port in addrs:
        with socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET, socket.SOCK_DGRAM) as s:
            s.bind((host, port))
    e.lt.run(e.up.aclose())
    e.lt.close()


def test_setting_off_uses_the_event_loop() -> None:
    e = Env(udp_batch=False, listen=(("127.0.0.1", 0),))
    try:
        assert not e.server.udp_batched
        assert not [t for t in threading.enumerate() if t.name.startswith("dns-udp-")]
        got = burst(e.addr(), [q.to_wire() for q in queries(100)], 100)
        assert len(got) == 100 and e.server.stats.results["nxdomain"] == 100
    finally:
        e.close()


def test_reuse_port_lets_two_servers_share_a_port() -> None:
    a = Env(reuse_port=True, listen=(("127.0.0.1", 0),))
    try:
        b = Env(reuse_port=True, listen=(("127.0.0.1", a.addr()[1]),))
        try:
            assert b.addr() == a.addr()
            got = burst(a.addr(), [q.to_wire() for q in queries(200)], 200)
            assert len(got) == 200
            total = a.server.stats.results["nxdomain"] + b.server.stats.results["nxdomain"]
            assert total == 200
        finally:
            b.close()
    finally:
        a.close()
