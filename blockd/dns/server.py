"""The embedded sinkhole: DNS queries (UDP and TCP) -> blocked answer, cached or forwarded answer.

Per query: parse the wire (`wire.parse`), check the client ACL, look the qname up in the current
`Table` (one attribute read, so a swap is atomic for every query), then either render the blocked
answer from pre-built bytes, answer from the cache, or hand the query to the `Forwarder`.
No per-query logging and no dnslib objects; outcomes are counted in `stats`.

UDP is served by one thread per socket with recvmmsg/sendmmsg (`udpbatch`, Linux, `udp_batch`),
or else by the event loop (`_Udp`). Counters are per writer (`Tally`) and summed when read.

TCP follows RFC 7766: 2-byte length framing, pipelined queries answered as they complete (out of
order), an idle timeout, a cap on connections and on queries in flight per connection.
"""

from __future__ import annotations

import asyncio
import socket
import threading
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass

import structlog

from blockd.dns import udpbatch, wire
from blockd.dns.acl import LOOPBACK, Acl
from blockd.dns.forward import Forwarder, ForwardSettings, cache_key, now_s
from blockd.dns.table import AnswerSettings, Table, Verdict

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
    tcp_idle_s: float = 10.0
    tcp_max_clients: int = 512
    tcp_max_pending: int = 64  # queries in flight per TCP connection
    max_forwards: int = 10_000  # queries in flight upstream, all clients
    reuse_port: bool = False
    udp_batch: bool = True  # UDP via recvmmsg/sendmmsg in a thread per socket (Linux); else the event loop
    #: structured DNS errors (blockd/dns/sde.py): the operator's name and contact URIs, a sub-error
    sde_organization: str = ""
    sde_contact: tuple[str, ...] = ()
    sde_sub_error: int | None = None

    def answers(self) -> AnswerSettings:
        return AnswerSettings(
            default_answer=self.default_answer, override_answer=self.override_answer, ede_code=self.ede_code,
            sinkhole_v4=self.sinkhole_v4, sinkhole_v6=self.sinkhole_v6, answer_ttl=self.answer_ttl,
            negative_ttl=self.negative_ttl,
            sde_organization=self.sde_organization, sde_contact=self.sde_contact, sde_sub_error=self.sde_sub_error,
        )

    def forwarding(self) -> ForwardSettings:
        return ForwardSettings(upstreams=self.upstreams, timeout_s=self.upstream_timeout_s,
                               attempts=self.upstream_attempts, cache_size=self.cache_size,
                               max_ttl=self.cache_max_ttl)


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
        self.tcp_clients: set[_Tcp] = set()
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
        for attempt in range(20):  # port 0: the same free port for UDP and TCP
            if self.udp_batched:
                sock = self._udp_socket(fam, host, port)
                bound = sock.getsockname()[1]
                close: Callable[[], None] = sock.close
            else:
                udp, _ = await loop.create_datagram_endpoint(
                    lambda: _Udp(self), local_addr=(host, port), family=fam,
                    reuse_port=self.settings.reuse_port or None)
                bound = udp.get_extra_info("sockname")[1]
                close = udp.close
            try:
                srv = await loop.create_server(lambda: _Tcp(self), host, bound, family=fam,
                                               reuse_address=True, reuse_port=self.settings.reuse_port or None)
            except OSError:
                close()
                if port != 0 or attempt == 19:
                    raise
                continue
            if self.udp_batched:
                w = udpbatch.UdpBatchWorker(self, sock, loop, self.stats.tally())
                self._workers.append(w)
                w.start()
            else:
                self._transports.append(udp)
            self._servers.append(srv)
            self.addresses.append((host, bound))
            return

    def _udp_socket(self, fam: socket.AddressFamily, host: str, port: int) -> socket.socket:
        """A bound, blocking UDP socket, set up as `create_datagram_endpoint` would."""
        sock = socket.socket(fam, socket.SOCK_DGRAM)
        try:
            if self.settings.reuse_port:
                sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
            sock.bind(socket.getaddrinfo(host, port, fam, socket.SOCK_DGRAM)[0][4])
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
        try:
            q = wire.parse(data)
        except wire.Malformed as e:
            if e.rcode is None:
                res["malformed_dropped"] += 1
                return None
            res["formerr" if e.rcode == wire.FORMERR else "notimp"] += 1
            return wire.error_response(data, e.rcode)
        if not self._acl.allowed(host):
            res["acl_refused"] += 1
            return wire.error_response(data, wire.REFUSED, q)
        if q.version:
            res["badvers"] += 1
            return wire.error_response(data, 16, q)  # BADVERS, answered by us, never forwarded
        t = self.table
        hit = t.lookup(data[12 : q.qend].lower(), q.labels)
        if hit is not None:
            v, off = hit
            st = tally.state
            if st[0] is not t.verdicts:
                st = tally.rebase(t.verdicts)
            st[1][v.index] += 1
            res[v.mode] += 1
            if v.enforce:
                if v.mode == "drop":
                    return None
                out = t.answers.render(data, q, off, v)
                if not tcp and len(out) > (q.edns if q.edns > 512 else 512):
                    res["truncated"] += 1
                    return wire.truncated(data, q)
                return out
        c = self.forwarder.cache.get(cache_key(data, q), now_s())
        if c is not None:
            res["cached"] += 1
            out = data[:2] + c[2:12] + data[12 : q.qend + 4] + c[q.qend + 4 :]
            if not tcp and len(out) > (q.edns if q.edns > 512 else 512):
                res["truncated"] += 1
                return wire.truncated(data, q)
            return out
        if len(self._tasks) >= self.settings.max_forwards:
            res["overload"] += 1
            return wire.error_response(data, wire.SERVFAIL, q)
        return q

    def forward(self, data: bytes, q: wire.Query, tcp: bool, send: Callable[[bytes], None]) -> None:
        task = asyncio.get_running_loop().create_task(self._forward(data, q, tcp, send))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _forward(self, data: bytes, q: wire.Query, tcp: bool, send: Callable[[bytes], None]) -> None:
        res = self.loop_tally.results
        reply = await self.forwarder.resolve(data, q)
        if reply is None:
            res["servfail"] += 1
            send(wire.error_response(data, wire.SERVFAIL, q))
            return
        res["forwarded"] += 1
        self.forwarder.cache.put(cache_key(data, q), reply, now_s())
        if not tcp and len(reply) > (q.edns if q.edns > 512 else 512):
            res["truncated"] += 1
            reply = wire.truncated(data, q)
        send(reply)


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


class _Tcp(asyncio.Protocol):
    def __init__(self, server: SinkholeServer) -> None:
        self.server = server
        self.buf = bytearray()
        self.transport: asyncio.Transport | None = None
        self.host = ""
        self.pending = 0
        self.last = 0.0
        self.timer: asyncio.TimerHandle | None = None
        self.paused = False

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        s = self.server
        if len(s.tcp_clients) >= s.settings.tcp_max_clients:
            s.loop_tally.results["overload"] += 1
            transport.close()
            return
        s.tcp_clients.add(self)
        peer = transport.get_extra_info("peername")
        self.host = peer[0] if peer else ""
        loop = asyncio.get_running_loop()
        self.last = loop.time()
        self.timer = loop.call_later(s.settings.tcp_idle_s, self._idle)

    def _idle(self) -> None:
        loop = asyncio.get_running_loop()
        left = self.last + self.server.settings.tcp_idle_s - loop.time()
        if self.pending == 0 and left <= 0:
            self.close()
        else:
            self.timer = loop.call_later(max(left, 0.5), self._idle)

    def close(self) -> None:
        if self.transport is not None:
            self.transport.close()

    def connection_lost(self, exc: Exception | None) -> None:
        self.server.tcp_clients.discard(self)
        if self.timer is not None:
            self.timer.cancel()

    def data_received(self, data: bytes) -> None:
        buf = self.buf
        buf += data
        if self.transport is None or self.transport.is_closing():
            return
        self.last = asyncio.get_running_loop().time()
        while len(buf) >= 2:
            n = (buf[0] << 8) | buf[1]
            if n == 0:
                self.close()
                return
            if len(buf) < 2 + n:
                break
            msg = bytes(buf[2 : 2 + n])
            del buf[: 2 + n]
            self._query(msg)

    def _query(self, msg: bytes) -> None:
        try:
            out = self.server.answer(msg, self.host, True)
        except Exception:
            self.server.loop_tally.results["servfail"] += 1
            log.debug("dns_query_error", exc_info=True)
            return
        if out is None:
            return
        if type(out) is bytes:
            self._send(out)
            return
        self.pending += 1
        if self.pending >= self.server.settings.tcp_max_pending and not self.paused:
            self.paused = True
            self.transport.pause_reading()  # type: ignore[union-attr]
        self.server.forward(msg, out, True, self._done)  # type: ignore[arg-type]

    def _done(self, reply: bytes) -> None:
        self.pending -= 1
        if self.paused and self.pending < self.server.settings.tcp_max_pending:
            self.paused = False
            if self.transport is not None and not self.transport.is_closing():
                self.transport.resume_reading()
        self._send(reply)

    def _send(self, reply: bytes) -> None:
        if self.transport is not None and not self.transport.is_closing() and reply:
            self.transport.write(len(reply).to_bytes(2, "big") + reply)
