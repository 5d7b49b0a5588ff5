"""The sinkhole under hostile traffic, each defence shown by sending the traffic (issue 12).

TCP slot exhaustion (per-source cap, whole-message deadline, eviction, ACL at accept),
clients that never read, forged upstream replies flooded at the forwarder's real ports with a
raw socket (source address and port of the upstream), CNAME/DNAME cloaking, dual-stack TCP.
The server runs in an event loop thread of the test process (`Env`); waits poll a condition
with a generous deadline, never a fixed sleep.
"""

from __future__ import annotations

import asyncio
import socket
import struct
import threading
import time
from collections.abc import Callable, Iterator

import dns.edns
import dns.message
import dns.query
import dns.rcode
import dns.rdatatype
import dns.rrset
import pytest

from blockd.dns.server import SinkholeSettings
from blockd.model import DomainRule, RuleSet
from tests.e2e.test_sinkhole import BASE, ORDERS, Env, _fields, order

pytestmark = pytest.mark.e2e


def settings(**kw: object) -> SinkholeSettings:
    return SinkholeSettings(**{**_fields(BASE), **kw})


def wait_for(cond: Callable[[], object], what: str, timeout: float = 30.0) -> None:
    deadline = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        time.sleep(0.0005)


def closed_by_peer(s: socket.socket, timeout: float = 30.0) -> bool:
    """True once the server closed `s` (EOF or reset), False if it stays open for `timeout`."""
    s.settimeout(timeout)
    try:
        while True:
            if s.recv(65535) == b"":
                return True
    except (ConnectionResetError, BrokenPipeError):
        return True
    except TimeoutError:
        return False


def tcp_query(port: int, name: str, source: str = "127.0.0.1", host: str = "127.0.0.1") -> dns.message.Message:
    fam = socket.AF_INET6 if ":" in host else socket.AF_INET
    with socket.socket(fam, socket.SOCK_STREAM) as s:
        s.bind((source, 0))
        s.settimeout(10)
        s.connect((host, port))
        w = dns.message.make_query(name, "A").to_wire()
        s.sendall(len(w).to_bytes(2, "big") + w)
        buf = b""
        while len(buf) < 2 or len(buf) < 2 + int.from_bytes(buf[:2], "big"):
            chunk = s.recv(65535)
            if not chunk:
                raise EOFError("closed before the answer")
            buf += chunk
        return dns.message.from_wire(buf[2:])


def connect(port: int, source: str) -> socket.socket:
    s = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    s.bind((source, 0))
    s.connect(("127.0.0.1", port))
    return s


def clients(env: Env) -> int:
    async def n() -> int:
        return len(env.server.tcp_clients)
    return env.lt.run(n())


@pytest.fixture()
def tcp_env() -> Iterator[Env]:
    e = Env(settings(tcp_max_clients=6, tcp_max_per_source=3, tcp_idle_s=1.0, tcp_message_s=2.0))
    yield e
    e.close()


# ---- TCP -----------------------------------------------------------------------------------
def test_per_source_cap_keeps_other_sources_served(tcp_env: Env) -> None:
    held = [connect(tcp_env.port, "127.0.0.2") for _ in range(3)]
    try:
        wait_for(lambda: clients(tcp_env) == 3, "3 connections admitted")
        extra = connect(tcp_env.port, "127.0.0.2")  # the 4th from the same source: closed at once
        assert closed_by_peer(extra)
        extra.close()
        assert tcp_env.server.tcp_closed["source_limit"] == 1
        assert tcp_query(tcp_env.port, "blocked.example.org", source="127.0.0.3").rcode() == dns.rcode.NXDOMAIN
    finally:
        for s in held:
            s.close()


def test_dripping_one_byte_at_a_time_is_cut_at_the_message_deadline(tcp_env: Env) -> None:
    """Each byte comes well inside tcp_idle_s (1 s); the message never completes, so the
    connection is cut tcp_message_s (2 s) after its first byte, however long the drip goes on."""
    s = connect(tcp_env.port, "127.0.0.2")
    s.settimeout(0.25)  # the drip interval: a byte every 0.25 s while waiting for the close
    w = dns.message.make_query("blocked.example.org", "A").to_wire()
    frame = len(w).to_bytes(2, "big") + w
    closed = False
    start = time.monotonic()
    try:
        for b in frame * 4:  # up to 4 messages' worth: 30+ s of dripping
            try:
                s.send(bytes((b,)))
                if s.recv(65535) == b"":
                    closed = True
                    break
            except TimeoutError:
                continue
            except (ConnectionResetError, BrokenPipeError):
                closed = True
                break
    finally:
        s.close()
    assert closed, f"a dripping client was never closed ({time.monotonic() - start:.0f} s)"
    assert tcp_env.server.tcp_closed["message_deadline"] == 1
    assert tcp_env.server.tcp_closed["idle"] == 0  # idle restarts on whole messages only


def test_full_table_evicts_the_longest_idle_connection(tcp_env: Env) -> None:
    held = [connect(tcp_env.port, f"127.0.0.{10 + i}") for i in range(6)]
    try:
        wait_for(lambda: clients(tcp_env) == 6, "6 connections admitted")
        assert tcp_query(tcp_env.port, "blocked.example.org", source="127.0.0.50").rcode() == dns.rcode.NXDOMAIN
        assert closed_by_peer(held[0], timeout=5)  # the oldest made room
        assert tcp_env.server.tcp_closed["evicted"] == 1
    finally:
        for s in held:
            s.close()


def test_idle_connection_is_closed(tcp_env: Env) -> None:
    s = connect(tcp_env.port, "127.0.0.2")
    try:
        assert closed_by_peer(s)
        assert tcp_env.server.tcp_closed["idle"] == 1
    finally:
        s.close()


def test_client_that_never_reads_stops_being_read_and_is_cut() -> None:
    e = Env(settings(tcp_idle_s=1.0, tcp_max_per_source=4))
    try:
        w = dns.message.make_query("blocked.example.org", "A", use_edns=0).to_wire()
        frame = (len(w).to_bytes(2, "big") + w) * 2000
        s = connect(e.port, "127.0.0.2")
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        s.setblocking(False)
        sent = 0
        deadline = time.monotonic() + 30
        stalled = False
        while time.monotonic() < deadline and sent < 200 << 20:
            try:
                sent += s.send(frame)
            except BlockingIOError:  # the server stopped reading: the kernel buffers are full
                stalled = True
                break
        assert stalled, f"the server kept reading {sent} bytes of queries whose answers were never read"
        assert closed_by_peer(s)
        peak = e.server.tcp_write_peak  # the backlog when the last reply was queued on the paused connection
        assert 0 < peak <= e.server.settings.tcp_write_buffer + 4096, peak
        s.close()
        assert e.server.tcp_closed["write_stalled"] == 1
        assert e.tcp("blocked.example.org").rcode() == dns.rcode.NXDOMAIN
    finally:
        e.close()


def test_dual_stack_tcp_and_udp_on_the_ipv6_wildcard() -> None:
    e = Env(settings(listen=(("::", 0),), allow=()))
    try:
        for host in ("127.0.0.1", "::1"):
            q = dns.message.make_query("blocked.example.org", "A")
            assert dns.query.udp(q, host, 5, port=e.port).rcode() == dns.rcode.NXDOMAIN
            assert tcp_query(e.port, "blocked.example.org", source="127.0.0.1" if "." in host else "::1",
                             host=host).rcode() == dns.rcode.NXDOMAIN
    finally:
        e.close()


# ---- forged upstream replies -----------------------------------------------------------------
def _ports_connected_to(port: int) -> list[int]:
    """Local ports of UDP sockets connected to 127.0.0.1:`port`, read as `ss -u` would."""
    want = f"0100007F:{port:04X}"
    out = []
    with open("/proc/net/udp") as f:
        next(f)
        for line in f:
            fields = line.split()
            if fields[2] == want:
                out.append(int(fields[1].split(":")[1], 16))
    return out


def _forger(src_port: int, dst_port: int, qname: str, src: str = "127.0.0.1") -> Callable[[int], bytes]:
    """IPv4+UDP datagrams from src:src_port to 127.0.0.1:dst_port carrying a forged answer for
    `qname` (lowercase, as the attacker cannot know the 0x20 case), one per id."""
    dnsmsg = dns.message.make_response(dns.message.make_query(qname, "A"))
    dnsmsg.answer.append(dns.rrset.from_text(qname + ".", 86400, "IN", "A", "203.0.113.66"))
    body = dnsmsg.to_wire()[2:]
    udp = struct.pack("!HHHH", src_port, dst_port, 10 + len(body), 0)  # checksum 0: none (IPv4)
    lo = socket.inet_aton("127.0.0.1")
    ip = struct.pack("!BBHHHBBH4s4s", 0x45, 0, 30 + len(body), 0, 0, 64, socket.IPPROTO_UDP, 0,
                     socket.inet_aton(src), lo)
    head = ip + udp  # the kernel fills in the IP checksum (IP_HDRINCL)
    return lambda qid: head + qid.to_bytes(2, "big") + body


def test_forged_replies_flooded_at_the_ports_in_use_never_reach_the_cache() -> None:
    """The attacker knows the upstream and reads the forwarder's port from /proc/net/udp, then
    sends a forged answer for every one of the 65536 ids, from the upstream's own address and
    port (a raw socket). None may be taken; the real answer is, and only it is cached."""
    name = "poison-target-victim.example.net"
    e = Env(settings(upstream_timeout_s=60.0, upstream_attempts=1))
    raw = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_RAW)
    try:
        async def hold() -> None:
            e.up.hold[name] = asyncio.Event()
        e.lt.run(hold())
        got: list[dns.message.Message] = []
        client = threading.Thread(target=lambda: got.append(e.udp(name, timeout=120)))
        client.start()
        wait_for(lambda: _ports_connected_to(e.up.port), "the forwarder's socket to the upstream")
        ports = _ports_connected_to(e.up.port)
        assert len(ports) == 1
        rej = e.server.forwarder.rejected
        forged = _forger(e.up.port, ports[0], name)
        sent = 0
        for start in range(0, 65536, 128):  # in bursts the socket buffer holds, each examined before the next
            for qid in range(start, start + 128):
                raw.sendto(forged(qid), ("127.0.0.1", 0))
            sent += 128
            wait_for(lambda: sum(rej.values()) >= sent or not client.is_alive(), f"{sent} forged replies examined")
            assert client.is_alive(), f"a forged reply was taken: {got[0].answer if got else 'no answer'}"
        assert sum(rej.values()) == sent == 65536  # every id was tried, and every one refused
        assert rej["question"] >= 1  # the one with the right id: wrong 0x20 case
        assert not got  # nothing answered the client yet
        e.lt.loop.call_soon_threadsafe(e.up.hold[name].set)
        client.join(60)
        assert got and got[0].answer[0][0].to_text() == "192.0.2.1"
        before = e.up.queries
        again = e.udp(name.upper())  # another client: from the cache
        assert again.answer[0][0].to_text() == "192.0.2.1" and e.up.queries == before
    finally:
        raw.close()
        e.close()


@pytest.mark.parametrize("src, port_delta", [("127.0.0.1", 1), ("127.0.0.2", 0)])
def test_replies_from_another_address_or_port_never_reach_the_socket(src: str, port_delta: int) -> None:
    """With 0x20 off, so that only the id stands in the way, every id forged from the wrong
    source port or address: the connected socket never sees them, the real answer wins."""
    name = "other-source.example.net"
    e = Env(settings(upstream_timeout_s=60.0, upstream_attempts=1, upstream_case_randomize=False))
    raw = socket.socket(socket.AF_INET, socket.SOCK_RAW, socket.IPPROTO_RAW)
    try:
        async def hold() -> None:
            e.up.hold[name] = asyncio.Event()
        e.lt.run(hold())
        got: list[dns.message.Message] = []
        client = threading.Thread(target=lambda: got.append(e.udp(name, timeout=120)))
        client.start()
        wait_for(lambda: _ports_connected_to(e.up.port), "the forwarder's socket to the upstream")
        port = _ports_connected_to(e.up.port)[0]
        forged = _forger(e.up.port + port_delta, port, name, src)
        # after each burst, a marker from the right address and port for another name: the socket
        # refuses it (and counts it), so once it is counted the burst before it was handled too
        marker = _forger(e.up.port, port, "marker.example.org")
        rej = e.server.forwarder.rejected
        markers = 0
        for start in range(0, 65536, 128):
            for qid in range(start, start + 128):
                raw.sendto(forged(qid), ("127.0.0.1", 0))
            raw.sendto(marker(start), ("127.0.0.1", 0))
            markers += 1
            wait_for(lambda: sum(rej.values()) >= markers or not client.is_alive(), f"marker {markers}")
            assert client.is_alive(), f"a forged reply was taken: {got[0].answer if got else 'no answer'}"
        assert sum(rej.values()) == markers  # only the markers reached the socket
        e.lt.loop.call_soon_threadsafe(e.up.hold[name].set)
        client.join(60)
        assert got and got[0].answer[0][0].to_text() == "192.0.2.1"
    finally:
        raw.close()
        e.close()


def test_each_upstream_query_has_a_random_id_and_mixed_case() -> None:
    e = Env(settings())
    seen: list[bytes] = []
    try:
        orig = e.up.reply

        def reply(data: bytes, limit: int | None) -> bytes:
            seen.append(data)
            return orig(data, limit)
        e.up.reply = reply  # type: ignore[method-assign]
        for i in range(40):
            assert e.udp(f"port-{i}.example.net").answer[0][0].to_text() == "192.0.2.1"
        assert len(seen) == 40 and len({d[:2] for d in seen}) >= 38  # random ids
        names = [d[12:40] for d in seen]
        assert sum(n != n.lower() for n in names) >= 38  # 0x20: mixed case sent upstream
    finally:
        e.close()


# ---- CNAME cloaking --------------------------------------------------------------------------
CLOAK_ORDERS = {**ORDERS, "tg": order("tg"), "sk": order("sk", "sinkhole"), "sh": order("sh", "log")}
CLOAK_RULES = RuleSet.build(
    [DomainRule("telegram.org", True, frozenset({"tg"})), DomainRule("sink-target.org", False, frozenset({"sk"})),
     DomainRule("shadow-target.org", False, frozenset({"sh"}))],
    orders=CLOAK_ORDERS,
)


@pytest.fixture()
def cloak_env() -> Iterator[Env]:
    e = Env(settings(), rules=CLOAK_RULES)
    e.up.cnames.update({"cloak.example.net": "web.telegram.org", "sinkcloak.example.net": "sink-target.org",
                        "shadowcloak.example.net": "shadow-target.org", "plain.example.net": "www.example.net"})
    e.up.dnames["dn.example.net"] = "telegram.org"
    yield e
    e.close()


def _ede(m: dns.message.Message) -> list[str]:
    return [o.text for o in m.options if o.otype == dns.edns.EDE]


@pytest.mark.parametrize("name", ["cloak.example.net", "x.dn.example.net"])
def test_cname_or_dname_into_a_blocked_subtree_is_blocked_as_that_name(cloak_env: Env, name: str) -> None:
    for attempt in ("forwarded", "cached"):
        before = cloak_env.server.stats.by_order().get("tg", 0)
        m = cloak_env.udp(name, use_edns=0)
        assert m.rcode() == dns.rcode.NXDOMAIN, attempt
        assert not m.answer and _ede(m) == ["Blocked by order tg of Example Court (2024/tg), see https://example.org/legal"]
        assert cloak_env.server.stats.by_order()["tg"] == before + 1, attempt
    assert cloak_env.up.queries == 1  # the second answer came from the cache, and was checked again


def test_cname_into_a_sinkholed_name_gets_the_block_page(cloak_env: Env) -> None:
    m = cloak_env.udp("sinkcloak.example.net", use_edns=0)
    assert m.rcode() == dns.rcode.NOERROR and m.answer[0][0].to_text() == "192.0.2.80"
    assert str(m.answer[0].name) == "sinkcloak.example.net." and _ede(m)


def test_cname_into_log_only_or_unblocked_names_passes_and_counts(cloak_env: Env) -> None:
    m = cloak_env.udp("shadowcloak.example.net")
    assert m.rcode() == dns.rcode.NOERROR and m.answer[-1][0].to_text() == "192.0.2.99"
    assert cloak_env.server.stats.by_order()["sh"] == 1
    m = cloak_env.udp("plain.example.net")
    assert m.rcode() == dns.rcode.NOERROR and any(r.rdtype == dns.rdatatype.CNAME for r in m.answer)


def test_cached_chain_is_checked_against_the_table_in_force(cloak_env: Env) -> None:
    assert cloak_env.udp("plain.example.net").rcode() == dns.rcode.NOERROR  # cached, target unblocked
    rules = RuleSet.build([*CLOAK_RULES.domains, DomainRule("www.example.net", False, frozenset({"tg"}))],
                          orders=CLOAK_ORDERS)
    assert cloak_env.lt.run(cloak_env.enf.apply(rules)).in_sync
    before = cloak_env.up.queries
    assert cloak_env.udp("plain.example.net").rcode() == dns.rcode.NXDOMAIN
    assert cloak_env.up.queries == before  # from the cache, blocked by the new table
    assert cloak_env.tcp("plain.example.net").rcode() == dns.rcode.NXDOMAIN


def test_acl_refused_tcp_source_gets_no_slot() -> None:
    e = Env(settings(allow_loopback=False, allow=("192.0.2.0/24",), tcp_max_clients=2))
    try:
        for _ in range(5):
            s = connect(e.port, "127.0.0.2")
            assert closed_by_peer(s, timeout=5)
            s.close()
        assert e.server.tcp_closed["acl"] == 5 and clients(e) == 0
    finally:
        e.close()


def test_send_errors_are_not_raised(tcp_env: Env) -> None:
    """A client that resets mid-answer must not break the server."""
    for _ in range(20):
        s = connect(tcp_env.port, "127.0.0.4")
        w = dns.message.make_query("blocked.example.org", "A").to_wire()
        s.sendall(len(w).to_bytes(2, "big") + w)
        s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        s.close()  # RST
    assert tcp_query(tcp_env.port, "blocked.example.org").rcode() == dns.rcode.NXDOMAIN


def test_ipv6_wildcard_next_to_an_ipv4_address_binds_both() -> None:
    """`[::]` and 127.0.0.1 on one port: the IPv6 socket is IPv6-only, so both bind and serve."""
    from blockd.dns import resolvers

    port = resolvers.free_port()
    e = Env(settings(listen=(("::", port), ("127.0.0.1", port))))
    try:
        for host in ("127.0.0.1", "::1"):
            q = dns.message.make_query("blocked.example.org", "A")
            assert dns.query.udp(q, host, 5, port=port).rcode() == dns.rcode.NXDOMAIN
            assert dns.query.tcp(q, host, 5, port=port).rcode() == dns.rcode.NXDOMAIN
    finally:
        e.close()


def test_full_table_of_busy_connections_refuses_the_new_one() -> None:
    """Every slot has a query in flight (the upstream holds its answer): nothing may be evicted,
    so the new connection is refused; once the answers come, slots serve again."""
    name = "slow.example.net"
    e = Env(settings(tcp_max_clients=2, upstream_timeout_s=60.0, upstream_attempts=1))
    try:
        async def hold() -> None:
            e.up.hold[name] = asyncio.Event()
        e.lt.run(hold())
        w = dns.message.make_query(name, "A").to_wire()
        busy = [connect(e.port, f"127.0.0.{20 + i}") for i in range(2)]
        for s in busy:
            s.sendall(len(w).to_bytes(2, "big") + w)

        async def in_flight() -> int:
            return sum(c.pending for c in e.server.tcp_clients)
        wait_for(lambda: e.lt.run(in_flight()) == 2, "2 queries in flight")
        extra = connect(e.port, "127.0.0.30")
        assert closed_by_peer(extra, timeout=5)
        extra.close()
        assert e.server.tcp_closed["global_limit"] == 1 and e.server.tcp_closed["evicted"] == 0
        e.lt.loop.call_soon_threadsafe(e.up.hold[name].set)
        for s in busy:
            s.settimeout(10)
            assert len(s.recv(65535)) > 2  # the held answers arrive on the busy connections
            s.close()
    finally:
        e.close()
