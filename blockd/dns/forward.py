"""Queries for names that are not blocked -> upstream resolvers, with a small TTL cache.

UDP first (random 16-bit id per query, the reply's question must match), TCP when the reply is
truncated, the next upstream on timeout, SERVFAIL when all fail. The cache stores whole answers
keyed by (lowercased question, EDNS present, DO, CD); a hit copies bytes, patches the id and
the question (to keep the client's 0x20 case) and rewrites the TTLs at most once a second.
"""

from __future__ import annotations

import asyncio
import random
import socket
import struct
import time
from dataclasses import dataclass

import structlog

from blockd.dns import wire

log = structlog.get_logger("blockd.dns.forward")


@dataclass(frozen=True, slots=True)
class ForwardSettings:
    upstreams: tuple[tuple[str, int], ...] = ()
    timeout_s: float = 1.0  # per upstream attempt
    attempts: int = 3  # total attempts across upstreams before SERVFAIL
    cache_size: int = 100_000  # answers
    max_ttl: int = 3600
    tcp_timeout_s: float = 3.0


class _Entry:
    __slots__ = ("expires", "stored", "rendered", "wire", "offs", "ttls")

    def __init__(self, now: int, ttl: int, data: bytes, offs: list[int], ttls: list[int]) -> None:
        self.expires = now + ttl
        self.stored = self.rendered = now
        self.wire = data
        self.offs = offs
        self.ttls = ttls


class Cache:
    def __init__(self, size: int, max_ttl: int) -> None:
        self.size = size
        self.max_ttl = max_ttl
        self._d: dict[bytes, _Entry] = {}

    def __len__(self) -> int:
        return len(self._d)

    def get(self, key: bytes, now: int) -> bytes | None:
        e = self._d.get(key)
        if e is None:
            return None
        if now >= e.expires:
            self._d.pop(key, None)  # the UDP worker thread and the event loop may both expire it
            return None
        if now != e.rendered:  # count the TTLs down, once a second at most
            buf = bytearray(e.wire)
            age = now - e.stored
            for off, ttl in zip(e.offs, e.ttls):
                struct.pack_into("!I", buf, off, max(ttl - age, 0))
            e.wire = bytes(buf)
            e.rendered = now
        return e.wire

    def put(self, key: bytes, data: bytes, now: int) -> None:
        rcode = data[3] & 0x0F
        if self.size <= 0 or data[2] & 0x02 or rcode not in (wire.NOERROR, wire.NXDOMAIN):
            return
        walked = wire.response_ttls(data)
        if walked is None:
            return
        offs, ttls, ttl = walked
        ttl = min(ttl, self.max_ttl)
        if ttl <= 0:
            return
        if len(self._d) >= self.size:  # evict the oldest insert (FIFO): cheap and bounded
            # pop, not del: another thread may have expired the same entry a moment ago
            self._d.pop(next(iter(self._d), b""), None)
        self._d[key] = _Entry(now, ttl, data, offs, ttls)


def cache_key(data: bytes, q: wire.Query) -> bytes:
    flags = (1 if q.edns >= 0 else 0) | (2 if q.do else 0) | (4 if data[3] & 0x10 else 0)
    return data[12 : q.qend].lower() + data[q.qend : q.qend + 4] + wire._LEN[flags]


class _UpstreamUdp(asyncio.DatagramProtocol):
    def __init__(self) -> None:
        self.pending: dict[int, tuple[bytes, asyncio.Future[bytes]]] = {}
        self.transport: asyncio.DatagramTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        if len(data) < 12:
            return
        ent = self.pending.get(int.from_bytes(data[:2], "big"))
        if ent is None:
            return
        question, fut = ent
        # anti-spoofing: the reply must carry our random id AND our question
        if data[12 : 12 + len(question)].lower() != question or fut.done():
            return
        fut.set_result(data)

    def error_received(self, exc: Exception) -> None:  # ICMP port unreachable etc.: attempts time out
        return None


class Forwarder:
    def __init__(self, settings: ForwardSettings) -> None:
        self.settings = settings
        self.cache = Cache(settings.cache_size, settings.max_ttl)
        self._udp: list[_UpstreamUdp] = []
        self._current = 0  # the upstream that answered last: failover moves it
        self.upstream_errors = 0

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        for host, port in self.settings.upstreams:
            fam = socket.AF_INET6 if ":" in host else socket.AF_INET
            _, proto = await loop.create_datagram_endpoint(_UpstreamUdp, remote_addr=(host, port), family=fam)
            self._udp.append(proto)

    def close(self) -> None:
        for p in self._udp:
            if p.transport is not None:
                p.transport.close()
            for _, fut in p.pending.values():
                if not fut.done():
                    fut.cancel()
        self._udp.clear()

    async def resolve(self, data: bytes, q: wire.Query) -> bytes | None:
        """The upstream answer to `data` with the client's id, or None (the caller SERVFAILs)."""
        n = len(self._udp)
        if n == 0:
            return None
        question = data[12 : q.qend + 4].lower()
        for attempt in range(self.settings.attempts):
            idx = (self._current + attempt) % n
            proto = self._udp[idx]
            reply = await self._udp_query(proto, data, question)
            if reply is None:
                self.upstream_errors += 1
                continue
            if reply[2] & 0x02:  # truncated: ask the same upstream over TCP
                full = await self._tcp_query(self.settings.upstreams[idx], data)
                if full is not None:
                    reply = full
            if reply[3] & 0x0F == wire.SERVFAIL and attempt + 1 < self.settings.attempts:
                self.upstream_errors += 1
                continue
            self._current = idx
            return data[:2] + reply[2:12] + data[12 : q.qend + 4] + reply[q.qend + 4 :]
        self._current = (self._current + 1) % n
        return None

    async def _udp_query(self, proto: _UpstreamUdp, data: bytes, question: bytes) -> bytes | None:
        if proto.transport is None or proto.transport.is_closing():
            return None
        for _ in range(8):
            qid = random.getrandbits(16)
            if qid not in proto.pending:
                break
        else:
            return None
        fut: asyncio.Future[bytes] = asyncio.get_running_loop().create_future()
        proto.pending[qid] = (question, fut)
        try:
            proto.transport.sendto(qid.to_bytes(2, "big") + data[2:])
            return await asyncio.wait_for(fut, self.settings.timeout_s)
        except (TimeoutError, OSError):
            return None
        finally:
            proto.pending.pop(qid, None)

    async def _tcp_query(self, upstream: tuple[str, int], data: bytes) -> bytes | None:
        writer = None
        try:
            async with asyncio.timeout(self.settings.tcp_timeout_s):
                reader, writer = await asyncio.open_connection(*upstream)
                qid = random.getrandbits(16).to_bytes(2, "big")
                writer.write(len(data).to_bytes(2, "big") + qid + data[2:])
                n = int.from_bytes(await reader.readexactly(2), "big")
                reply = await reader.readexactly(n)
                return reply if reply[:2] == qid else None
        except (TimeoutError, OSError, asyncio.IncompleteReadError):
            return None
        finally:
            if writer is not None:
                writer.close()


def now_s() -> int:
    return int(time.monotonic())
