"""Queries for names that are not blocked -> upstream resolvers, with a small TTL cache.

Spoofing resistance, as a real resolver does it (RFC 5452):
* every upstream query leaves from a **fresh UDP socket** connected to that upstream, so the
  kernel picks a random ephemeral source port per query and delivers only datagrams from the
  queried server's address and port;
* a **16-bit id from `secrets`**, and (`case_randomize`, default on) **0x20 mixed case** in the
  qname: a reply is taken only if it is a response with our id and our question byte for byte,
  case included. Forged replies are counted in `rejected` by reason and the socket keeps
  waiting for the real one until the timeout.
TCP when the reply is truncated (same checks), the next upstream on timeout, SERVFAIL when all
fail. The cache stores whole answers keyed by (lowercased question, EDNS present, DO, CD); a hit
copies bytes, patches the id and the question (to keep the client's 0x20 case) and rewrites the
TTLs at most once a second. Each entry keeps the CNAME/DNAME targets of its answer, so the
server checks them against the table in force at every hit (CNAME cloaking).
"""

from __future__ import annotations

import asyncio
import secrets
import socket
import struct
import time
from collections import Counter
from dataclasses import dataclass

import structlog

from blockd.dns import wire

log = structlog.get_logger("blockd.dns.forward")

#: Why an upstream reply was refused (labels of blockd_dns_upstream_replies_rejected_total).
REJECT_REASONS = ("malformed", "id", "question")


@dataclass(frozen=True, slots=True)
class ForwardSettings:
    upstreams: tuple[tuple[str, int], ...] = ()
    timeout_s: float = 1.0  # per upstream attempt
    attempts: int = 3  # total attempts across upstreams before SERVFAIL
    cache_size: int = 100_000  # answers
    max_ttl: int = 3600
    tcp_timeout_s: float = 3.0
    case_randomize: bool = True  # 0x20: turn off only for an upstream that does not echo the case


class Entry:
    """A cached answer: `wire` (TTLs counted down), and `targets`, the CNAME/DNAME targets in its
    answer section as `wire.read_name` gives them (empty for most answers)."""

    __slots__ = ("expires", "stored", "rendered", "wire", "offs", "ttls", "targets")

    def __init__(self, now: int, ttl: int, data: bytes, offs: list[int], ttls: list[int],
                 targets: list[tuple[bytes, list[int]]]) -> None:
        self.expires = now + ttl
        self.stored = self.rendered = now
        self.wire = data
        self.offs = offs
        self.ttls = ttls
        self.targets = targets


class Cache:
    def __init__(self, size: int, max_ttl: int) -> None:
        self.size = size
        self.max_ttl = max_ttl
        self._d: dict[bytes, Entry] = {}

    def __len__(self) -> int:
        return len(self._d)

    def get(self, key: bytes, now: int) -> Entry | None:
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
        return e

    def put(self, key: bytes, data: bytes, now: int) -> None:
        rcode = data[3] & 0x0F
        if self.size <= 0 or data[2] & 0x02 or rcode not in (wire.NOERROR, wire.NXDOMAIN):
            return
        walked = wire.response_ttls(data)
        targets = wire.chain_targets(data)
        if walked is None or targets is None:
            return
        offs, ttls, ttl = walked
        ttl = min(ttl, self.max_ttl)
        if ttl <= 0:
            return
        if len(self._d) >= self.size:  # evict the oldest insert (FIFO): cheap and bounded
            # pop, not del: another thread may have expired the same entry a moment ago
            self._d.pop(next(iter(self._d), b""), None)
        self._d[key] = Entry(now, ttl, data, offs, ttls, targets)


def cache_key(data: bytes, q: wire.Query) -> bytes:
    flags = (1 if q.edns >= 0 else 0) | (2 if q.do else 0) | (4 if data[3] & 0x10 else 0)
    return data[12 : q.qend].lower() + data[q.qend : q.qend + 4] + wire._LEN[flags]


def mix_case(name: bytes) -> bytes:
    """0x20 (draft-vixie-dnsext-dns0x20): each ASCII letter of a wire name in random case."""
    bits = secrets.token_bytes(len(name))
    return bytes([c ^ 0x20 if b & 1 and 0x61 <= (c | 0x20) <= 0x7A else c for c, b in zip(name, bits)])


def check_reply(reply: bytes, qid: bytes, question: bytes, exact: bool) -> str | None:
    """None if `reply` answers our query (a response with id `qid` and our question, case
    included when `exact`), else the reason it is refused (one of REJECT_REASONS)."""
    end = 12 + len(question)
    if len(reply) < end or not reply[2] & 0x80 or reply[2] & 0x78 or reply[4:6] != b"\x00\x01":
        return "malformed"
    if reply[:2] != qid:
        return "id"
    got = reply[12:end]
    if got != question and (exact or got.lower() != question.lower()):
        return "question"
    return None


class Forwarder:
    def __init__(self, settings: ForwardSettings) -> None:
        self.settings = settings
        self.cache = Cache(settings.cache_size, settings.max_ttl)
        self._current = 0  # the upstream that answered last: failover moves it
        self.upstream_errors = 0
        self.rejected: Counter[str] = Counter({r: 0 for r in REJECT_REASONS})  # event loop only
        self._addrs: list[tuple[socket.AddressFamily, tuple[str, int]]] = []

    async def start(self) -> None:
        self._addrs = [(socket.AF_INET6 if ":" in host else socket.AF_INET, (host, port))
                       for host, port in self.settings.upstreams]

    def close(self) -> None:
        self._addrs = []  # queries in flight own their sockets and close them when cancelled

    async def resolve(self, data: bytes, q: wire.Query) -> bytes | None:
        """The upstream answer to `data` with the client's id and question, or None (SERVFAIL)."""
        n = len(self._addrs)
        if n == 0:
            return None
        for attempt in range(self.settings.attempts):
            idx = (self._current + attempt) % n
            qname = data[12 : q.qend]
            if self.settings.case_randomize:
                qname = mix_case(qname)
            question = qname + data[q.qend : q.qend + 4]
            reply = await self._udp_query(self._addrs[idx], data, q, question)
            if reply is None:
                self.upstream_errors += 1
                continue
            if reply[2] & 0x02:  # truncated: ask the same upstream over TCP
                full = await self._tcp_query(self._addrs[idx][1], data, q, question)
                if full is not None:
                    reply = full
            if reply[3] & 0x0F == wire.SERVFAIL and attempt + 1 < self.settings.attempts:
                self.upstream_errors += 1
                continue
            self._current = idx
            return data[:2] + reply[2:12] + data[12 : q.qend + 4] + reply[q.qend + 4 :]
        self._current = (self._current + 1) % n
        return None

    def _message(self, qid: bytes, data: bytes, q: wire.Query, question: bytes) -> bytes:
        return qid + data[2:12] + question + data[q.qend + 4 :]

    async def _udp_query(self, upstream: tuple[socket.AddressFamily, tuple[str, int]], data: bytes,
                         q: wire.Query, question: bytes) -> bytes | None:
        """One attempt on a socket of its own: a fresh random source port, connected to the upstream."""
        loop = asyncio.get_running_loop()
        fam, addr = upstream
        try:
            sock = socket.socket(fam, socket.SOCK_DGRAM | socket.SOCK_NONBLOCK | socket.SOCK_CLOEXEC)
        except OSError:  # EMFILE/ENFILE: this attempt fails, the caller tries again or SERVFAILs
            return None
        fd = sock.fileno()
        reading = False
        try:
            sock.connect(addr)  # UDP: no packet; binds a random ephemeral port, filters replies by peer
            qid = secrets.token_bytes(2)
            fut: asyncio.Future[bytes | None] = loop.create_future()
            exact = self.settings.case_randomize
            rejected = self.rejected

            def readable() -> None:
                while not fut.done():
                    try:
                        reply = sock.recv(65535)
                    except BlockingIOError:
                        return
                    except OSError:  # ECONNREFUSED (ICMP port unreachable): this attempt failed
                        fut.set_result(None)
                        return
                    reason = check_reply(reply, qid, question, exact)
                    if reason is None:
                        fut.set_result(reply)
                    else:
                        rejected[reason] += 1

            loop.add_reader(fd, readable)
            reading = True
            sock.send(self._message(qid, data, q, question))
            return await asyncio.wait_for(fut, self.settings.timeout_s)
        except (TimeoutError, OSError):
            return None
        finally:
            if reading:
                loop.remove_reader(fd)
            sock.close()

    async def _tcp_query(self, upstream: tuple[str, int], data: bytes, q: wire.Query,
                         question: bytes) -> bytes | None:
        writer = None
        try:
            async with asyncio.timeout(self.settings.tcp_timeout_s):
                reader, writer = await asyncio.open_connection(*upstream)
                qid = secrets.token_bytes(2)
                msg = self._message(qid, data, q, question)
                writer.write(len(msg).to_bytes(2, "big") + msg)
                n = int.from_bytes(await reader.readexactly(2), "big")
                reply = await reader.readexactly(n)
                reason = check_reply(reply, qid, question, self.settings.case_randomize)
                if reason is not None:
                    self.rejected[reason] += 1
                    return None
                return reply
        except (TimeoutError, OSError, asyncio.IncompleteReadError):
            return None
        finally:
            if writer is not None:
                writer.close()


def now_s() -> int:
    return int(time.monotonic())
