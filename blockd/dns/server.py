"""The embedded sinkhole: DNS queries (UDP and TCP) -> blocked answer, cached or forwarded answer.

Per query: parse the wire (`wire.parse`), check the client ACL, look the qname up in the current
`Table` (one attribute read, so a swap is atomic for every query), then either render the blocked
answer from pre-built bytes, answer from the cache, or hand the query to the `Forwarder`.
No per-query logging and no dnslib objects; outcomes are counted in `stats`.

UDP is served by one thread per socket with recvmmsg/sendmmsg (`udpbatch`, Linux, `udp_batch`),
or else by the event loop (`_Udp`). Counters are per writer (`Tally`) and summed when read.

Forwarded and cached answers are checked for CNAME cloaking: every CNAME/DNAME target in the
answer is looked up in the table; a chain that reaches a blocked name gets that name's blocked
answer (its order's mode and EDE text) and is counted for that order.

TCP follows RFC 7766: 2-byte length framing, pipelined queries answered as they complete (out of
order). Under hostile traffic (`tcp.TcpClient`, admitted here by `tcp_admit`): sources outside the ACL are closed at accept; at most
`tcp_max_per_source` connections per IPv4 address or IPv6 /64 and `tcp_max_clients` in all (the
longest-idle connection makes room for a new one); an idle connection is closed after
`tcp_idle_s`, a message must arrive whole within `tcp_message_s` of its first byte (bytes that
trickle in do not extend it); a client that does not read its replies stops being read, and is
closed after `tcp_idle_s` of that. Every close for a reason is counted in `tcp_closed`.
"""

from __future__ import annotations

import asyncio
import socket
import threading
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass

import structlog

from blockd.dns import sde, udpbatch, wire
from blockd.dns.acl import LOOPBACK, Acl
from blockd.dns.forward import Forwarder, ForwardSettings, cache_key, now_s
from blockd.dns.table import AnswerSettings, Table, Verdict
from blockd.dns.tcp import TCP_CLOSE_REASONS, TcpClient, source_key

log = structlog.get_logger("blockd.dns.server")

RESULTS = ("nxdomain", "nodata", "sinkhole", "refused", "drop", "log", "forwarded", "cached", "servfail",
           "formerr", "notimp", "badvers", "acl_refused", "malformed_dropped", "truncated", "overload")


@dataclass(frozen=True, slots=True)
class SinkholeSettings:
    listen: tuple[tuple[str, int], ...] = (("127.0.0.1", 53), ("::1", 53))
    default_answer: str = "nxdomain"
    override_answer: str | None = None
    ede_code: int = 16
    sinkhole_v4: str | None = None
    sinkhole_v6: str | None = None
    answer_ttl: int = 60
    negative_ttl: int = 300
    upstreams: tuple[tuple[str, int], ...] = ()
    upstream_timeout_s: float = 1.0
    upstream_attempts: int = 3
    cache_size: int = 100_000
    cache_max_ttl: int = 3600
    allow: tuple[str, ...] = ()  # client prefixes allowed in addition to loopback
    allow_loopback: bool = True
    tcp_idle_s: float = 10.0  # idle between messages, and how long a client may leave replies unread
    tcp_message_s: float = 5.0  # a whole message, from its first byte (not extended by more bytes)
    tcp_max_clients: int = 512
    tcp_max_per_source: int = 16  # connections per IPv4 address or IPv6 /64
    tcp_max_pending: int = 64  # queries in flight per TCP connection
    tcp_write_buffer: int = 65536  # reply bytes buffered per connection before it stops being read
    max_forwards: int = 10_000  # queries in flight upstream, all clients
    reuse_port: bool = False
    udp_batch: bool = True  # UDP via recvmmsg/sendmmsg in a thread per socket (Linux); else the event loop
    upstream_case_randomize: bool = True  # 0x20 in forwarded qnames (off for an upstream that loses case)
    #: structured DNS errors (blockd/dns/sde.py): the operator's name and contact URIs, a sub-error
    sde_organization: str = ""
    sde_contact: tuple[str, ...] = ()
    sde_sub_error: int | None = None
    sde_option_code: int | None = None  # the SDE option's code (draft: "TBD"); unset, plain text for all
    sde_language: str = "en"  # RFC 5646 tag of the JSON's j and o

    def __post_init__(self) -> None:
        bad = [f"{name}: {value!r} is below the minimum {lo}"
               for name, value, lo in (("tcp_max_clients", self.tcp_max_clients, 1),
                                       ("tcp_max_per_source", self.tcp_max_per_source, 1),
                                       ("tcp_max_pending", self.tcp_max_pending, 1),
                                       ("tcp_write_buffer", self.tcp_write_buffer, 4096),
                                       ("tcp_idle_s", self.tcp_idle_s, 0.1),
                                       ("tcp_message_s", self.tcp_message_s, 0.1))
               if value < lo]
        bad += sde.problems(self.ede_code, self.sde_option_code, self.sde_organization, self.sde_contact,
                            self.sde_sub_error, self.sde_language)
        if bad:
            raise ValueError("; ".join(bad))

    def answers(self) -> AnswerSettings:
        return AnswerSettings(
            default_answer=self.default_answer, override_answer=self.override_answer, ede_code=self.ede_code,
            sinkhole_v4=self.sinkhole_v4, sinkhole_v6=self.sinkhole_v6, answer_ttl=self.answer_ttl,
            negative_ttl=self.negative_ttl,
            sde_organization=self.sde_organization, sde_contact=self.sde_contact, sde_sub_error=self.sde_sub_error,
            sde_option_code=self.sde_option_code, sde_language=self.sde_language,
        )

    def forwarding(self) -> ForwardSettings:
        return ForwardSettings(upstreams=self.upstreams, timeout_s=self.upstream_timeout_s,
                               attempts=self.upstream_attempts, cache_size=self.cache_size,
                               max_ttl=self.cache_max_ttl, case_randomize=self.upstream_case_randomize)


class Tally:
    """Counters written by one thread only (the event loop, or one UDP worker): results, and hits
    per verdict of the table it last answered from. `state` is replaced in one assignment, so a
    reader in another thread always sees a consistent (verdicts, hits, done) triple."""

    __slots__ = ("results", "state")

    def __init__(self) -> None:
        self.results: Counter[str] = Counter({r: 0 for r in RESULTS})
        self.state: tuple[list[Verdict], list[int], dict[str, int]] = ([], [], {})

    def rebase(self, verdicts: list[Verdict]) -> tuple[list[Verdict], list[int], dict[str, int]]:
        """Start counting hits for a new table; the old table's hits move to `done` (by order)."""
        self.state = st = (verdicts, [0] * len(verdicts), self.by_order())
        return st

    def by_order(self) -> dict[str, int]:
        verdicts, hits, done = self.state
        out = dict(done)
        for v, h in zip(verdicts, hits):
            if h and v.order is not None:
                out[v.order] = out.get(v.order, 0) + h
        return out


class Stats:
    """Counters for metrics: answers by result, blocked answers by the order named in them.
    The sum of every writer's `Tally`, so no increment is lost between threads."""

    def __init__(self) -> None:
        self.tallies: list[Tally] = []
        self._lock = threading.Lock()  # guards `tallies` (added at start, read by metrics)

    def tally(self) -> Tally:
        t = Tally()
        with self._lock:
            self.tallies.append(t)
        return t

    @property
    def results(self) -> Counter[str]:
        out: Counter[str] = Counter({r: 0 for r in RESULTS})
        with self._lock:
            tallies = list(self.tallies)
        for t in tallies:
            out.update(dict(t.results))  # dict(): one C-level copy, atomic under the GIL
        return out

    def by_order(self) -> dict[str, int]:
        out: Counter[str] = Counter()
        with self._lock:
            tallies = list(self.tallies)
        for t in tallies:
            out.update(t.by_order())
        return dict(out)

    def snapshot(self) -> dict[str, dict[str, int]]:
        return {"results": dict(self.results), "orders": self.by_order()}


class SinkholeServer:
    def __init__(self, settings: SinkholeSettings, table: Table | None = None) -> None:
        self.settings = settings
        self.answer_settings = settings.answers()
        self.table = table or Table.empty(self.answer_settings)
        self.stats = Stats()
        self.loop_tally = self.stats.tally()  # the event loop's: TCP, asyncio UDP, forward results
        self.forwarder = Forwarder(settings.forwarding())
        self._acl = Acl((LOOPBACK if settings.allow_loopback else ()) + tuple(settings.allow))
        self._transports: list[asyncio.BaseTransport] = []
        self._workers: list[udpbatch.UdpBatchWorker] = []
        self._servers: list[asyncio.base_events.Server] = []
        self._tasks: set[asyncio.Task[None]] = set()
        self.tcp_clients: set[TcpClient] = set()
        self.tcp_per_source: dict[str, int] = {}
        self.tcp_closed: Counter[str] = Counter({r: 0 for r in TCP_CLOSE_REASONS})  # event loop only
        self.tcp_write_peak = 0  # the largest reply backlog (bytes) seen on a paused connection
        self.addresses: list[tuple[str, int]] = []

    # ---- policy -------------------------------------------------------------------------
    def swap(self, table: Table) -> Table:
        """Serve `table` from the next query on; returns the previous one."""
        old, self.table = self.table, table
        self.loop_tally.rebase(table.verdicts)  # UDP workers rebase on their next hit
        return old

    # ---- lifecycle ----------------------------------------------------------------------
    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        await self.forwarder.start()
        try:
            for host, port in self.settings.listen:
                await self._listen(loop, host, port)
        except OSError:
            await self.aclose()
            raise
        log.info("dns_sinkhole_started", listen=[f"{h}@{p}" for h, p in self.addresses], names=len(self.table),
                 udp="batch" if self.udp_batched else "asyncio")

    @property
    def udp_batched(self) -> bool:
        return self.settings.udp_batch and udpbatch.available()

    async def _listen(self, loop: asyncio.AbstractEventLoop, host: str, port: int) -> None:
        fam = socket.AF_INET6 if ":" in host else socket.AF_INET
        # IPv6 sockets serve IPv4 too (`::` is dual-stack, UDP and TCP alike), unless IPv4
        # addresses are listed as well: those are bound on their own and must not collide
        v6only = fam == socket.AF_INET6 and any(":" not in h for h, _ in self.settings.listen)
        for attempt in range(20):  # port 0: the same free port for UDP and TCP
            sock = self._socket(fam, socket.SOCK_DGRAM, host, port, v6only)
            bound = sock.getsockname()[1]
            try:
                tsock = self._socket(fam, socket.SOCK_STREAM, host, bound, v6only)
            except OSError:
                sock.close()
                if port != 0 or attempt == 19:
                    raise
                continue
            srv = await loop.create_server(lambda: TcpClient(self), sock=tsock)
            if self.udp_batched:
                w = udpbatch.UdpBatchWorker(self, sock, loop, self.stats.tally())
                self._workers.append(w)
                w.start()
            else:
                sock.setblocking(False)
                udp, _ = await loop.create_datagram_endpoint(lambda: _Udp(self), sock=sock)
                self._transports.append(udp)
            self._servers.append(srv)
            self.addresses.append((host, bound))
            return

    def _socket(self, fam: socket.AddressFamily, kind: socket.SocketKind, host: str, port: int,
                v6only: bool) -> socket.socket:
        """A bound UDP socket or listening TCP socket, IPV6_V6ONLY set explicitly for IPv6."""
        sock = socket.socket(fam, kind)
        try:
            if kind == socket.SOCK_STREAM:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            if self.settings.reuse_port:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            if fam == socket.AF_INET6:
                sock.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 1 if v6only else 0)
            sock.bind(socket.getaddrinfo(host, port, fam, kind)[0][4])
            if kind == socket.SOCK_STREAM:
                sock.listen(1024)
                sock.setblocking(False)
        except OSError:
            sock.close()
            raise
        return sock

    async def aclose(self) -> None:
        for w in self._workers:
            w.stop()
        self._workers.clear()
        for t in self._transports:
            t.close()
        for s in self._servers:
            s.close()
        for c in list(self.tcp_clients):
            c.close()
        for task in list(self._tasks):
            task.cancel()
        for s in self._servers:
            await s.wait_closed()
        self.forwarder.close()
        self._transports.clear()
        self._servers.clear()

    # ---- the query path -----------------------------------------------------------------
    def answer(self, data: bytes, host: str, tcp: bool, tally: Tally | None = None) -> bytes | wire.Query | None:
        """Answer now (bytes), drop (None), or forward (the parsed query is returned). Counts go to
        `tally`, which only the calling thread may write (default: the event loop's)."""
        if tally is None:
            tally = self.loop_tally
        res = tally.results
        q = wire.parse(data)
        if type(q) is int:
            if q == wire.DROP:
                res["malformed_dropped"] += 1
                return None
            res["formerr" if q == wire.FORMERR else "notimp"] += 1
            return wire.error_response(data, q)
        if not self._acl.allowed(host):
            res["acl_refused"] += 1
            return wire.error_response(data, wire.REFUSED, q)
        if q.version:
            res["badvers"] += 1
            return wire.error_response(data, 16, q)  # BADVERS, answered by us, never forwarded
        t = self.table
        hit = t.lookup(data[12 : q.qend].lower(), q.labels)
        if hit is not None:  # the hot path: inline, not self._count / self._blocked
            v, off = hit
            st = tally.state
            if st[0] is not t.verdicts:
                st = tally.rebase(t.verdicts)
            st[1][v.index] += 1
            res[v.mode] += 1
            if v.enforce:
                if v.mode == "drop":
                    return None
                out = t.answers.render(data, q, off, v, tcp)
                if not tcp and len(out) > (q.edns if q.edns > 512 else 512):
                    res["truncated"] += 1
                    return wire.truncated(data, q)
                return out
        e = self.forwarder.cache.get(cache_key(data, q), now_s())
        if e is not None:
            if e.targets:
                v = self._chain(t, e.targets, tally)
                if v is not None:
                    return self._blocked(t, data, q, 0, v, tcp, tally)
            res["cached"] += 1
            c = e.wire
            out = data[:2] + c[2:12] + data[12 : q.qend + 4] + c[q.qend + 4 :]
            if not tcp and len(out) > (q.edns if q.edns > 512 else 512):
                res["truncated"] += 1
                return wire.truncated(data, q)
            return out
        if len(self._tasks) >= self.settings.max_forwards:
            res["overload"] += 1
            return wire.error_response(data, wire.SERVFAIL, q)
        return q

    @staticmethod
    def _count(tally: Tally, t: Table, v: Verdict) -> None:
        """One answer by verdict `v` of table `t`: by mode, and for its orders."""
        st = tally.state
        if st[0] is not t.verdicts:
            st = tally.rebase(t.verdicts)
        st[1][v.index] += 1
        tally.results[v.mode] += 1

    def _blocked(self, t: Table, data: bytes, q: wire.Query, off: int, v: Verdict, tcp: bool,
                 tally: Tally) -> bytes | None:
        """The blocked answer for verdict `v` (already counted), rule name at label offset `off`."""
        if v.mode == "drop":
            return None
        out = t.answers.render(data, q, off, v, tcp)
        if not tcp and len(out) > (q.edns if q.edns > 512 else 512):
            tally.results["truncated"] += 1
            return wire.truncated(data, q)
        return out

    def _chain(self, t: Table, targets: list[tuple[bytes, list[int]]], tally: Tally) -> Verdict | None:
        """The first enforcing verdict a CNAME/DNAME target reaches (counted), or None; log-only
        (shadow) hits on the way are counted and do not change the answer."""
        for name, labels in targets:
            hit = t.lookup(name, labels)
            if hit is not None:
                self._count(tally, t, hit[0])
                if hit[0].enforce:
                    return hit[0]
        return None

    def forward(self, data: bytes, q: wire.Query, tcp: bool, send: Callable[[bytes], None]) -> None:
        task = asyncio.get_running_loop().create_task(self._forward(data, q, tcp, send))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _forward(self, data: bytes, q: wire.Query, tcp: bool, send: Callable[[bytes], None]) -> None:
        tally = self.loop_tally
        res = tally.results
        reply = await self.forwarder.resolve(data, q)
        targets = None if reply is None else wire.chain_targets(reply)
        if reply is None or targets is None:  # no answer, or one we cannot check: never pass it on
            res["servfail"] += 1
            send(wire.error_response(data, wire.SERVFAIL, q))
            return
        self.forwarder.cache.put(cache_key(data, q), reply, now_s())  # its targets are checked per hit
        if targets:
            t = self.table
            v = self._chain(t, targets, tally)
            if v is not None:
                out = self._blocked(t, data, q, 0, v, tcp, tally)
                if out is not None:
                    send(out)
                return
        res["forwarded"] += 1
        if not tcp and len(reply) > (q.edns if q.edns > 512 else 512):
            res["truncated"] += 1
            reply = wire.truncated(data, q)
        send(reply)

    # ---- TCP admission ------------------------------------------------------------------
    def tcp_admit(self, conn: TcpClient, host: str) -> str | None:
        """Admit a new TCP connection from `host`, or return why not (a TCP_CLOSE_REASONS entry).
        When every slot is taken, the connection idle for longest makes room, if any is idle."""
        if not self._acl.allowed(host):
            return "acl"
        key = source_key(host)
        if self.tcp_per_source.get(key, 0) >= self.settings.tcp_max_per_source:
            return "source_limit"
        if len(self.tcp_clients) >= self.settings.tcp_max_clients:
            idle = [c for c in self.tcp_clients if c.pending == 0]
            if not idle:
                return "global_limit"
            victim = min(idle, key=lambda c: c.active)
            victim.cut("evicted")
        conn.source = key
        self.tcp_per_source[key] = self.tcp_per_source.get(key, 0) + 1
        self.tcp_clients.add(conn)
        return None

    def tcp_release(self, conn: TcpClient) -> None:
        if conn in self.tcp_clients:
            self.tcp_clients.discard(conn)
            left = self.tcp_per_source.get(conn.source, 0) - 1
            if left > 0:
                self.tcp_per_source[conn.source] = left
            else:
                self.tcp_per_source.pop(conn.source, None)


class _Udp(asyncio.DatagramProtocol):
    def __init__(self, server: SinkholeServer) -> None:
        self.server = server
        self.transport: asyncio.DatagramTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        try:
            out = self.server.answer(data, addr[0], False)
        except Exception:  # never die of one packet; the counter shows it
            self.server.loop_tally.results["servfail"] += 1
            log.debug("dns_query_error", exc_info=True)
            return
        if out is None:
            return
        if type(out) is bytes:
            self.transport.sendto(out, addr)  # type: ignore[union-attr]
            return
        t = self.transport
        self.server.forward(data, out, False, lambda r: t.sendto(r, addr))  # type: ignore[union-attr,arg-type]

    def error_received(self, exc: Exception) -> None:
        return None
