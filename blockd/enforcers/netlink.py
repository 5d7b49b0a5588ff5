"""Raw nfnetlink for the kernel enforcers: bytes in -> one sendmsg, ACKs or dump payloads out.

pyroute2's message encoder costs ~125 us per set element (27 s per 1M prefixes) and its sync
classes refuse to run inside an asyncio loop, so the hot path packs TLVs with `struct` and
talks to a plain AF_NETLINK socket; the kernel then dominates the cost (see
docs/kernel.md). pyroute2 is used only to enter a named network namespace.

    attr/nest/msg            pack netlink attributes and nfnetlink messages
    attrs(buf)               walk attributes -> {type: payload}
    NetlinkSocket.transact   send messages (a batch in one datagram), return the failures
    NetlinkSocket.dump       one NLM_F_DUMP request -> iterator of message payloads
    KernelStats              element and counter figures the metrics collector reads
    held_ruleset             intervals read back from the kernel -> RuleSet
    ProvenKeys               the keys a set holds, kept as the rules its read-back proved
    pack/parse_intervals     nft interval-set elements <-> (first, last), packed with struct
"""

from __future__ import annotations

import asyncio
import errno as errno_mod
import operator
import os
import re
import socket
import struct
import threading
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from itertools import repeat
from types import MappingProxyType

from blockd.errors import EnforcerError
from blockd.model import Applied, Change, NetRule, Plan, RuleSet, seq_bisect

NETLINK_NETFILTER = 12
NLM_F_REQUEST, NLM_F_ACK, NLM_F_EXCL, NLM_F_CREATE = 0x1, 0x4, 0x200, 0x400
NLM_F_DUMP = 0x300
NLM_F_ACK_TLVS = 0x200  # on an NLMSG_ERROR: extended-ACK attributes follow
NLMSG_ERROR, NLMSG_DONE = 2, 3
NLMSGERR_ATTR_MSG = 1
NLA_F_NESTED, NLA_F_NET_BYTEORDER = 0x8000, 0x4000
NFNL_MSG_BATCH_BEGIN, NFNL_MSG_BATCH_END = 16, 17
NFNL_SUBSYS_IPSET, NFNL_SUBSYS_NFTABLES = 6, 10
SOL_NETLINK, NETLINK_CAP_ACK, NETLINK_EXT_ACK = 270, 10, 11
SO_SNDBUFFORCE, SO_RCVBUFFORCE = 32, 33

_HDR = struct.Struct("=IHHII")  # nlmsghdr: len, type, flags, seq, pid
_NFGEN = struct.Struct("=BBH")  # nfgenmsg: family, version, res_id (big endian value)
_ATTR = struct.Struct("=HH")
_RECV = 1 << 20
#: requests sent per datagram where no transaction binds them (queries, ipset TESTs): the
#: kernel queues every answer before it is read, and a socket's receive buffer stops at 1 GiB
#: (INT_MAX / 2), so a read-back of a million points sent at once ends in ENOBUFS
QUERY_CHUNK = 16384


def attr(kind: int, payload: bytes) -> bytes:
    n = 4 + len(payload)
    return _ATTR.pack(n, kind) + payload + b"\0" * (-n % 4)


def nest(kind: int, *children: bytes) -> bytes:
    return attr(kind | NLA_F_NESTED, b"".join(children))


def attr_str(kind: int, text: str) -> bytes:
    return attr(kind, text.encode() + b"\0")


def attr_be32(kind: int, value: int) -> bytes:
    return attr(kind, struct.pack(">I", value & 0xFFFFFFFF))


def msg(kind: int, flags: int, family: int, payload: bytes, res_id: int = 0, seq: int = 0) -> bytes:
    """One nfnetlink message; `seq` is normally filled in later by `NetlinkSocket.transact`."""
    body = _NFGEN.pack(family, 0, socket.htons(res_id)) + payload
    return _HDR.pack(16 + len(body), kind, NLM_F_REQUEST | flags, seq, 0) + body


def attrs(buf: bytes | memoryview, start: int = 0, end: int | None = None) -> dict[int, memoryview]:
    """Attributes of one level, type (flags masked off) -> payload; the last one of a type wins."""
    view = memoryview(buf)
    end = len(view) if end is None else end
    out: dict[int, memoryview] = {}
    while start + 4 <= end:
        n, kind = _ATTR.unpack_from(view, start)
        if n < 4:
            break
        out[kind & 0x3FFF] = view[start + 4 : start + n]
        start += (n + 3) & ~3
    return out


def iter_attrs(buf: memoryview) -> Iterator[tuple[int, memoryview]]:
    """Every attribute of one level in order (for lists such as NFTA_LIST_ELEM)."""
    start, end = 0, len(buf)
    while start + 4 <= end:
        n, kind = _ATTR.unpack_from(buf, start)
        if n < 4:
            return
        yield kind & 0x3FFF, buf[start + 4 : start + n]
        start += (n + 3) & ~3


def be(view: memoryview) -> int:
    return int.from_bytes(view, "big")


def text(view: memoryview) -> str:
    return bytes(view).split(b"\0", 1)[0].decode(errors="replace")


def held_ruleset(v4: Mapping[int, int], v6: Mapping[int, int]) -> RuleSet:
    """Intervals read from the kernel, {first: last} (disjoint, any order) -> a RuleSet.

    Sorting the int keys instead of (first, last) tuples is ~4x faster at 1M.
    """
    none: frozenset[str] = frozenset()
    rules = []
    for spans in (v4, v6):
        firsts: list[int] = []
        lasts: list[int] = []
        end = -2
        for first in sorted(spans):
            last = spans[first]
            if first <= end + 1:  # touching pieces (shard cuts, adjacent CIDRs) merge
                if last > end:
                    lasts[-1] = end = last
            else:
                firsts.append(first)
                lasts.append(last)
                end = last
        rules.append(list(map(NetRule, firsts, lasts, repeat(none))))
    return RuleSet.build(v4=rules[0], v6=rules[1])


@dataclass(frozen=True, slots=True)
class Failure:
    """The kernel refused message `index` (0-based, in the order given to `transact`)."""

    index: int
    errno: int
    text: str

    def describe(self, codes: Mapping[int, str] | None = None) -> str:
        """`codes`: subsystem error numbers beyond errno (ipset's start at 4096)."""
        detail = f": {self.text}" if self.text else ""
        name = errno_mod.errorcode.get(self.errno, str(self.errno))
        meaning = (codes or {}).get(self.errno) or os.strerror(self.errno)
        return f"message {self.index}: {name} ({meaning}){detail}"


@dataclass(frozen=True, slots=True)
class Commit:
    """What the last transaction sent: netlink messages, set elements and bytes."""

    messages: int
    elements: int
    bytes: int
    duration_s: float


def union_at(rules: Sequence[NetRule], point: int) -> tuple[int, int] | None:
    """The interval of the union of `rules` (sorted, disjoint) that holds `point`, or None:
    found by bisection, then widened over the rules that touch it (adjacent pieces of other
    orders are one interval to the kernel)."""
    i = seq_bisect(rules, point + 1, _first) - 1  # the last rule that starts at or before it
    if i < 0 or rules[i].last < point:
        return None
    lo = hi = i
    while lo > 0 and rules[lo - 1].last + 1 == rules[lo].first:
        lo -= 1
    while hi + 1 < len(rules) and rules[hi].last + 1 == rules[hi + 1].first:
        hi += 1
    return rules[lo].first, rules[hi].last


_first = operator.itemgetter(0)  # NetRule.first (module-level: Chunked caches bisection keys by it)


class ProvenKeys:
    """One family's keys (nft pieces, ipset CIDRs) that a kernel enforcer's sets hold, kept as
    the share of the rule set they were made from, which its commit and read-back proved the
    kernel holds: the reconciler holds those rules anyway, where a set of the keys costs 70 MB
    at 1M, per enforcer. A lookup costs O(log N) (`holds`); what needs every key (a diff in
    full) makes them again (`keys_of`)."""

    __slots__ = ("share", "version", "count", "_keys_of", "_holds")

    def __init__(self, share: RuleSet, version: int, count: int,
                 keys_of: Callable[[int, Iterable[NetRule]], set[int]],
                 holds: Callable[[int, Sequence[NetRule], int], bool]) -> None:
        self.share, self.version, self.count = share, version, count
        self._keys_of, self._holds = keys_of, holds

    @property
    def rules(self) -> Sequence[NetRule]:
        return self.share.v4 if self.version == 4 else self.share.v6

    def keys(self) -> set[int]:
        return self._keys_of(self.version, self.rules)

    def __contains__(self, key: object) -> bool:
        return isinstance(key, int) and self._holds(self.version, self.rules, key)

    def __len__(self) -> int:
        return self.count

    def __iter__(self) -> Iterator[int]:
        return iter(self.keys())

    def __sub__(self, other: Iterable[int]) -> set[int]:
        return self.keys().difference(other)

    def __rsub__(self, other: Iterable[int]) -> set[int]:
        return set(other).difference(self.keys())

    def __ge__(self, other: Iterable[int]) -> bool:
        return all(k in self for k in other)

    def __eq__(self, other: object) -> bool:
        if isinstance(other, ProvenKeys):
            return self.count == other.count and self.keys() == other.keys()
        if isinstance(other, (set, frozenset)):
            return len(other) == self.count and self.keys() == other
        return NotImplemented

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        return f"ProvenKeys(v{self.version}, {self.count} keys)"


def as_sets(held: Mapping[int, set[int] | ProvenKeys]) -> dict[int, set[int]]:
    """Every key, once, for a diff in full."""
    return {v: h.keys() if isinstance(h, ProvenKeys) else h for v, h in held.items()}


def share_digest(desired: RuleSet) -> str:
    """`addresses(desired).digest`, in constant time."""
    return desired.share_digest(names=False)


def addresses(desired: RuleSet) -> RuleSet:
    """The part of a RuleSet a kernel enforcer holds: the address intervals, no names."""
    return desired.share(names=False)


@dataclass(frozen=True, slots=True)
class KernelStats:
    """What metrics need from a kernel enforcer (shared by nft and ipset).

    `elements`: set name -> elements held. `counters`: rule or counter name -> (packets, bytes).
    """

    enforcer: str
    elements: Mapping[str, int] = field(default_factory=lambda: MappingProxyType({}))
    counters: Mapping[str, tuple[int, int]] = field(default_factory=lambda: MappingProxyType({}))


class KernelEnforcer:
    """The Enforcer face shared by the nft and ipset enforcers.

    Netlink work is blocking: it runs in a worker thread, one call at a time (`_lock`), so the
    event loop keeps answering DNS meanwhile. Subclasses call `__init__(name, netns)` (it opens
    the socket) and implement `_apply(addresses)`, `_apply_plan(desired, plan)`, `_readback()`
    and `_stats()`.

    Deltas: after an apply that read back equal, `_base` is the digest of the whole RuleSet
    given (names included) and `_base_share` that of the addresses held. An apply whose
    `change.base` is `_base` hands the plan to `_apply_plan`, which commits only it (no diff
    of the whole desired state) and reads back what it touched; anything else (first apply,
    a failure, a read-back that found other contents, a plan that does not fit what is held)
    takes the full path `_apply`, which diffs against what the kernel holds.
    """

    def __init__(self, name: str, netns: str | None) -> None:
        self.name = name
        self.last_commit: Commit | None = None
        #: seconds the last apply spent reading back what its commit touched
        self.last_readback_s = 0.0
        try:
            self._sock = NetlinkSocket(netns)
        except OSError as exc:
            where = f" in netns {netns!r}" if netns else ""
            raise EnforcerError(name, f"open netlink socket{where}: {exc.strerror}", errno=exc.errno) from exc
        self._lock = asyncio.Lock()
        self._base: str | None = None
        self._base_share: str | None = None
        #: the share last applied in sync (a read-back equal to it keeps `ProvenKeys` again)
        self._share: RuleSet | None = None
        #: how the last apply went: "plan" (only the change), "full" (diffed against the kernel)
        self.last_path = "full"

    async def apply(self, desired: RuleSet, change: Change | None = None) -> Applied:
        async with self._lock:
            return await asyncio.to_thread(self._apply_any, desired, change)

    def _apply_any(self, desired: RuleSet, change: Change | None) -> Applied:
        base, self._base = self._base, None  # unknown until this apply reads back equal
        applied = None
        if change is not None and base is not None and change.base == base:
            applied = self._apply_plan(desired, change.plan)
        self.last_path = "plan" if applied is not None else "full"
        if applied is None:
            applied = self._apply(addresses(desired))
        if applied.in_sync:
            self._base, self._base_share = desired.digest, applied.desired_digest
            self._share = addresses(desired)
        return applied

    async def readback(self) -> RuleSet:
        """What the kernel holds; a backend may answer without dumping everything when the
        kernel proves nothing changed (nft: the ruleset generation; `last_readback` says so)."""
        return await self._readback_locked(False)

    async def readback_full(self) -> RuleSet:
        """A full dump, whatever the kernel says changed (for the periodic statement)."""
        return await self._readback_locked(True)

    async def _readback_locked(self, full: bool) -> RuleSet:
        async with self._lock:
            held = await asyncio.to_thread(self._readback, full) if full else await asyncio.to_thread(self._readback)
            if held.digest != self._base_share:  # someone changed the sets: no plan fits them
                self._base = None
            return held

    async def stats(self) -> KernelStats:
        async with self._lock:
            return await asyncio.to_thread(self._stats)

    async def aclose(self) -> None:
        self._sock.close()

    @staticmethod
    def enforced(desired: RuleSet) -> RuleSet:
        return addresses(desired)

    def _apply(self, desired: RuleSet) -> Applied:
        raise NotImplementedError

    def _apply_plan(self, desired: RuleSet, plan: Plan) -> Applied | None:
        """Commit only `plan` (from exactly what is held); None when it does not fit what is held."""
        return None

    def _readback(self) -> RuleSet:
        raise NotImplementedError

    def _stats(self) -> KernelStats:
        raise NotImplementedError


class NetlinkSocket:
    """A NETLINK_NETFILTER socket in the caller's network namespace, or in `netns` if given.

    A netlink socket belongs to the namespace of the thread that creates it, for its whole
    life; a throwaway thread enters `netns` to create it, so the rest of the process (and the
    event loop) never changes namespace.
    """

    def __init__(self, netns: str | None = None) -> None:
        self._seq = 1
        if netns is None:
            self._sock = self._open()
        else:
            self._sock = self._open_in(netns)
        self._sock.settimeout(300)  # a kernel that never answers must not hang the daemon
        self._sock.setsockopt(SOL_NETLINK, NETLINK_CAP_ACK, 1)  # ACKs don't echo 64 KiB payloads
        self._sock.setsockopt(SOL_NETLINK, NETLINK_EXT_ACK, 1)  # kernel's reason text on errors
        self._rcvbuf = 0
        self._ensure_rcvbuf(8 << 20)

    @staticmethod
    def _open() -> socket.socket:
        sock = socket.socket(socket.AF_NETLINK, socket.SOCK_RAW, NETLINK_NETFILTER)
        sock.bind((0, 0))
        return sock

    @classmethod
    def _open_in(cls, netns: str) -> socket.socket:
        from pyroute2 import netns as pr2netns

        result: list[socket.socket | BaseException] = []

        def enter_and_open() -> None:
            try:
                pr2netns.setns(netns, flags=0)  # flags=0: never create a missing namespace
                result.append(cls._open())
            except BaseException as exc:  # handed to the caller's thread below
                result.append(exc)

        t = threading.Thread(target=enter_and_open, name=f"netns-{netns}")
        t.start()
        t.join()
        if isinstance(result[0], BaseException):
            raise result[0]
        return result[0]

    def close(self) -> None:
        self._sock.close()

    def _ensure_rcvbuf(self, size: int) -> None:
        if size > self._rcvbuf:
            # FORCE ignores rmem_max (needs CAP_NET_ADMIN): ACKs for a 1M-element batch must
            # all fit, or recv fails with ENOBUFS although the kernel committed (notes §4).
            self._sock.setsockopt(socket.SOL_SOCKET, SO_RCVBUFFORCE, size)
            self._rcvbuf = size

    def _number(self, msgs: list[bytes], ack: range = range(0)) -> tuple[bytes, int]:
        """Concatenate `msgs`, giving them consecutive sequence numbers; ACK those in `ack`."""
        first = self._seq
        out = bytearray(b"".join(msgs))
        off = 0
        for i in range(len(msgs)):
            n, _kind, flags = struct.unpack_from("=IHH", out, off)
            struct.pack_into("=HI", out, off + 6, flags | (NLM_F_ACK if i in ack else 0), first + i)
            off += n
        self._seq += len(msgs)
        return bytes(out), first

    def transact(self, msgs: list[bytes], batch_subsys: int | None = None) -> list[Failure]:
        """Send `msgs`, each with NLM_F_ACK, and collect every ACK.

        With `batch_subsys`, the messages are wrapped in BATCH_BEGIN/END, in ONE datagram:
        nfnetlink applies them as one transaction and, if any fails, aborts all of them.
        Without, nothing binds them, and they go QUERY_CHUNK at a time. Returns the failures
        in message order (empty on success).
        """
        if batch_subsys is None and len(msgs) > QUERY_CHUNK:  # no transaction: in chunks (QUERY_CHUNK)
            out: list[Failure] = []
            for start in range(0, len(msgs), QUERY_CHUNK):
                out += [Failure(f.index + start, f.errno, f.text)
                        for f in self.transact(msgs[start:start + QUERY_CHUNK])]
            return out
        if batch_subsys is not None:
            begin = msg(NFNL_MSG_BATCH_BEGIN, 0, socket.AF_UNSPEC, b"", res_id=batch_subsys)
            end = msg(NFNL_MSG_BATCH_END, 0, socket.AF_UNSPEC, b"", res_id=batch_subsys)
            data, first = self._number([begin, *msgs, end], range(1, len(msgs) + 1))
            first += 1
        else:
            data, first = self._number(msgs, range(len(msgs)))
        # One sendmsg: a batch must arrive in one skb, so the send buffer must hold all of it.
        self._sock.setsockopt(socket.SOL_SOCKET, SO_SNDBUFFORCE, len(data) + (1 << 20))
        self._ensure_rcvbuf(len(msgs) * 2048 + (8 << 20))
        self._sock.sendall(data)
        pending = set(range(first, first + len(msgs)))
        failures: list[Failure] = []
        while pending:
            for kind, seq, body in self._recv():
                if kind != NLMSG_ERROR:
                    continue
                code = -struct.unpack_from("=i", body, 0)[0]
                if seq in pending:
                    pending.discard(seq)
                    if code:
                        failures.append(Failure(seq - first, code, _ext_ack_text(body)))
                elif code and first - 1 <= seq <= first + len(msgs):
                    # BEGIN or END refused (e.g. EPERM): nothing was applied, no more ACKs come.
                    return [Failure(-1, code, _ext_ack_text(body))]
        return sorted(failures, key=lambda f: f.index)

    def query(self, requests: list[bytes]) -> list[tuple[int, list[bytes]]]:
        """Send non-dump requests (e.g. GETSETELEM of given keys, ipset TEST), QUERY_CHUNK to a
        datagram, each with NLM_F_ACK; per request, in order: (errno, reply payloads after
        nfgenmsg).

        errno 0 with replies: found; ENOENT (or a subsystem code): the kernel says no.
        """
        if not requests:
            return []
        if len(requests) > QUERY_CHUNK:
            return [answer for start in range(0, len(requests), QUERY_CHUNK)
                    for answer in self.query(requests[start:start + QUERY_CHUNK])]
        data, first = self._number(requests, range(len(requests)))
        self._sock.setsockopt(socket.SOL_SOCKET, SO_SNDBUFFORCE, len(data) + (1 << 20))
        # each answer: the reply (<= ~200 B for one element) plus the ACK
        self._ensure_rcvbuf(len(requests) * 1024 + (8 << 20))
        self._sock.sendall(data)
        replies: list[list[bytes]] = [[] for _ in requests]
        codes = [0] * len(requests)
        pending = set(range(first, first + len(requests)))
        while pending:
            for kind, seq, body in self._recv():
                if seq not in pending:
                    continue
                if kind == NLMSG_ERROR:
                    codes[seq - first] = -struct.unpack_from("=i", body, 0)[0]
                    pending.discard(seq)
                elif kind != NLMSG_DONE:
                    replies[seq - first].append(bytes(body[4:]))
        return list(zip(codes, replies))

    def dump(self, request: bytes) -> Iterator[memoryview]:
        """Payloads (after nfgenmsg) of the answers to one dump request; OSError on failure."""
        data, seq = self._number([request])
        self._sock.sendall(data)
        while True:
            for kind, rseq, body in self._recv():
                if rseq != seq:
                    continue
                if kind == NLMSG_DONE:
                    return
                if kind == NLMSG_ERROR:
                    code = -struct.unpack_from("=i", body, 0)[0]
                    if code:
                        raise OSError(code, os.strerror(code) + _suffix(_ext_ack_text(body)))
                    return
                yield body[4:]

    def _recv(self) -> Iterator[tuple[int, int, memoryview]]:
        data = memoryview(self._sock.recv(_RECV))
        off = 0
        while off + 16 <= len(data):
            n, kind, _flags, seq, _pid = _HDR.unpack_from(data, off)
            if n < 16:
                return
            yield kind, seq, data[off + 16 : off + n]
            off += (n + 3) & ~3


def _ext_ack_text(body: memoryview) -> str:
    # nlmsgerr = error (4) + the request's nlmsghdr (16, payload capped by NETLINK_CAP_ACK);
    # then the extended-ACK attributes.
    found = attrs(body, 20).get(NLMSGERR_ATTR_MSG)
    return text(found) if found is not None else ""


def _suffix(detail: str) -> str:
    return f": {detail}" if detail else ""


# --- nft interval-set elements -------------------------------------------------------------

def _elem_struct(klen: int) -> tuple[struct.Struct, bytes, bytes, bytes]:
    """Packer for one interval: start element, then end element (last + 1, INTERVAL_END)."""
    hdr = struct.Struct("=HH").pack
    start = hdr(12 + klen, 0x8001) + hdr(8 + klen, 0x8001) + hdr(4 + klen, 1)
    end = hdr(20 + klen, 0x8001) + hdr(8 + klen, 0x8001) + hdr(4 + klen, 1)
    return struct.Struct(f">12s{klen}s12s{klen}s8s"), start, end, hdr(8, 3) + struct.pack(">I", 1)


_PACK = {32: _elem_struct(4), 128: _elem_struct(16)}


def pack_intervals(bits: int, items: list[tuple[int, int]]) -> bytes:
    """Intervals -> nft set elements (NFTA_LIST_ELEMs) for an interval set of `bits`-bit keys."""
    top, klen = (1 << bits) - 1, bits // 8
    packer, start, end, flag = _PACK[bits]
    pack = packer.pack
    out = []
    for first, last in items:
        if last == top:  # no end element past the top of the address space: open interval
            out.append(start + first.to_bytes(klen, "big"))
        else:
            out.append(pack(start, first.to_bytes(klen, "big"), end, (last + 1).to_bytes(klen, "big"), flag))
    return b"".join(out)


def parse_intervals(bits: int, payloads: Iterable[memoryview]) -> list[tuple[int, int]]:
    """NEWSETELEM dump payloads of one interval set -> sorted (first, last) intervals."""
    klen = bits // 8
    starts: list[int] = []
    ends: list[int] = []
    for payload in payloads:
        found = attrs(payload).get(3)  # NFTA_SET_ELEM_LIST_ELEMENTS
        if found is None:
            continue
        raw = bytes(found)
        hits = _elem_re(klen).findall(raw)
        if sum(12 + klen + (8 if end else 0) for end, _, _ in hits) != len(raw):
            hits = list(_slow_elements(found))  # an element carries more than key and flags
        for end, key, flags in hits:
            (ends if end and flags == b"\0\0\0\1" else starts).append(int.from_bytes(key, "big"))
    starts.sort()
    ends.sort()
    top = (1 << bits) - 1
    # Pair each start with the first end above it. An end not above any open start is skipped:
    # `nft add element` writes a leading 0.0.0.0 INTERVAL_END of its own.
    out = []
    j, n = 0, len(ends)
    for s in starts:
        while j < n and ends[j] <= s:
            j += 1
        if j < n:
            out.append((s, ends[j] - 1))
            j += 1
        else:
            out.append((s, top))
    return out


_ELEM_RE: dict[int, re.Pattern[bytes]] = {}


def _elem_re(klen: int) -> re.Pattern[bytes]:
    # One element as the kernel dumps it: LIST_ELEM { KEY { VALUE }, [FLAGS] }; group 1 is
    # set for an element with FLAGS. Matches are checked to cover the whole buffer.
    if klen not in _ELEM_RE:
        n = 12 + klen
        _ELEM_RE[klen] = re.compile(
            b"(?:" + re.escape(bytes([n])) + b"|(" + re.escape(bytes([n + 8])) + b"))\\x00\\x01[\\x00\\x80]"
            + re.escape(bytes([8 + klen])) + b"\\x00\\x01[\\x00\\x80]" + re.escape(bytes([4 + klen]))
            + b"\\x00\\x01\\x00(.{" + str(klen).encode() + b"})(?(1)\\x08\\x00\\x03\\x00(.{4}))",
            re.DOTALL,
        )
    return _ELEM_RE[klen]


def element_keys(bits: int, payload: bytes | memoryview) -> list[tuple[int, bool]]:
    """One GETSETELEM answer -> its elements as (key, is_interval_end)."""
    found = attrs(payload).get(3)  # NFTA_SET_ELEM_LIST_ELEMENTS
    if found is None:
        return []
    return [(int.from_bytes(key, "big"), bool(flags) and flags[-1] & 1 == 1)
            for _, key, flags in _slow_elements(found)]


def _slow_elements(elements: memoryview) -> Iterator[tuple[bytes, bytes, bytes]]:
    for _, elem in iter_attrs(elements):
        a = attrs(elem)
        key = attrs(a[1])[1]
        flags = bytes(a[3]) if 3 in a else b""
        yield (b"e" if flags else b""), bytes(key), flags
