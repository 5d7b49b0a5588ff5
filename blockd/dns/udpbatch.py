"""Batched UDP for the sinkhole: datagrams -> `SinkholeServer.answer` -> replies, up to 256 at a time.

One thread per UDP listen socket: a blocking `recvmmsg(2)` (MSG_WAITFORONE: wait for the first
datagram, then take whatever else is queued, up to `BATCH`), `answer()` for each datagram, and all
replies of the batch in one `sendmmsg(2)`. Under load that is two syscalls per batch instead of two
per query, and no event-loop work per datagram. Queries that must be forwarded are handed to the
event loop (`call_soon_threadsafe(server.forward, ...)`); their replies go out with a plain
`sendto` from the loop.

ctypes only (no C extension, no callbacks: the unit runs with MemoryDenyWriteExecute=yes). All
buffers are allocated once per socket and reused: the mmsghdr/iovec/sockaddr arrays, and two
anonymous mappings of `BATCH` x 64 KiB slots for queries and replies (only the pages datagrams
touch become resident, so any UDP size works without growing RSS).

Counters: each worker writes only its own `Tally` (results and per-verdict hits); `Stats` sums
the tallies when read, so no increment is lost to the event loop or another worker.
"""

from __future__ import annotations

import asyncio
import ctypes
import ctypes.util
import errno
import mmap
import socket
import struct
import sys
import threading
import time
from typing import TYPE_CHECKING

import structlog

if TYPE_CHECKING:
    from blockd.dns.server import SinkholeServer, Tally

log = structlog.get_logger("blockd.dns.udpbatch")

BATCH = 256
SLOT = 65536  # bytes per datagram buffer: the largest UDP payload fits
NAME = 32  # bytes per source address buffer (sockaddr_in6 is 28)
MSG_WAITFORONE = 0x10000
MSG_TRUNC = 0x20


class _Iovec(ctypes.Structure):
    _fields_ = [("iov_base", ctypes.c_void_p), ("iov_len", ctypes.c_size_t)]


class _Msghdr(ctypes.Structure):
    _fields_ = [("msg_name", ctypes.c_void_p), ("msg_namelen", ctypes.c_uint32),
                ("msg_iov", ctypes.c_void_p), ("msg_iovlen", ctypes.c_size_t),
                ("msg_control", ctypes.c_void_p), ("msg_controllen", ctypes.c_size_t),
                ("msg_flags", ctypes.c_int)]


class _Mmsghdr(ctypes.Structure):
    _fields_ = [("msg_hdr", _Msghdr), ("msg_len", ctypes.c_uint)]


_H = ctypes.sizeof(_Mmsghdr)
_IOV = ctypes.sizeof(_Iovec)
_O_NAMELEN = _Msghdr.msg_namelen.offset
_O_FLAGS = _Msghdr.msg_flags.offset
_O_LEN = _Mmsghdr.msg_len.offset
_O_IOVLEN = _Iovec.iov_len.offset
# (namelen, flags, msg_len) of one received mmsghdr, read in one unpack
_RESULT = struct.Struct(f"={_O_NAMELEN}xI{_O_FLAGS - _O_NAMELEN - 4}xi{_O_LEN - _O_FLAGS - 4}xI"
                        f"{_H - _O_LEN - 4}x")
_NAME_PTR = struct.Struct("=QI")  # msg_name, msg_namelen (adjacent at the start of msghdr)
_SIZE_T = struct.Struct("=Q")
_IOVEC = struct.Struct("=QQ")
# msg_name, msg_namelen, msg_iov, msg_iovlen (control NULL, flags 0: the buffers start zeroed)
_HDR = struct.Struct(f"=QI{_Msghdr.msg_iov.offset - 12}xQQ")


def _libc() -> ctypes.CDLL | None:
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
    except OSError:
        return None
    lp64 = ctypes.sizeof(ctypes.c_void_p) == ctypes.sizeof(ctypes.c_size_t) == 8  # the structs below
    if not lp64 or not hasattr(libc, "recvmmsg") or not hasattr(libc, "sendmmsg"):
        return None
    for f in (libc.recvmmsg, libc.sendmmsg):
        f.restype = ctypes.c_int
    libc.recvmmsg.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_uint, ctypes.c_int, ctypes.c_void_p]
    libc.sendmmsg.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_uint, ctypes.c_int]
    return libc


_LIBC = _libc()


def available() -> bool:
    """True where recvmmsg/sendmmsg can be called (Linux with glibc or musl)."""
    return _LIBC is not None


def _address(buf: mmap.mmap) -> int:
    return ctypes.addressof(ctypes.c_char.from_buffer(buf))


class UdpBatchWorker:
    """Serves one bound UDP socket from a thread until `stop()`. The socket is the caller's to bind
    and, after `stop()`, this worker closes it."""

    def __init__(self, server: SinkholeServer, sock: socket.socket, loop: asyncio.AbstractEventLoop,
                 tally: Tally) -> None:
        assert _LIBC is not None
        self.server = server
        self.sock = sock
        self.loop = loop
        self.tally = tally
        self._stopping = False
        self._v6 = sock.family == socket.AF_INET6
        sock.setblocking(True)
        n = BATCH
        namelen = 28 if self._v6 else 16  # sizeof(sockaddr_in6) / sizeof(sockaddr_in)
        self._rbuf = mmap.mmap(-1, n * SLOT)  # anonymous: zero pages until written
        self._sbuf = mmap.mmap(-1, n * SLOT)
        self._names = ctypes.create_string_buffer(n * NAME)
        self._rhdr = ctypes.create_string_buffer(n * _H)
        self._shdr = ctypes.create_string_buffer(n * _H)
        self._riov = ctypes.create_string_buffer(n * _IOV)
        self._siov = ctypes.create_string_buffer(n * _IOV)
        rbase, sbase = _address(self._rbuf), _address(self._sbuf)
        names, riov, siov = (ctypes.addressof(b) for b in (self._names, self._riov, self._siov))
        for i in range(n):
            _IOVEC.pack_into(self._riov, i * _IOV, rbase + i * SLOT, SLOT)
            _IOVEC.pack_into(self._siov, i * _IOV, sbase + i * SLOT, 0)
            _HDR.pack_into(self._rhdr, i * _H, names + i * NAME, NAME, riov + i * _IOV, 1)
            _HDR.pack_into(self._shdr, i * _H, names + i * NAME, namelen, siov + i * _IOV, 1)
        self._rtemplate = bytes(self._rhdr)  # copied back before each recvmmsg (resets namelen)
        self._stemplate = bytes(self._shdr)
        self._thread = threading.Thread(target=self._run, name=f"dns-udp-{sock.getsockname()[1]}", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def stop(self, timeout: float = 5.0) -> None:
        """Wake the thread (shutdown(SHUT_RD) ends a blocked recvmmsg), join it, close the socket."""
        self._stopping = True
        if self._thread.is_alive():
            try:
                self.sock.shutdown(socket.SHUT_RD)
            except OSError:  # ENOTCONN on an unconnected UDP socket; the wakeup still happens
                pass
            self._thread.join(timeout)
            if self._thread.is_alive():  # belt and braces: a datagram to ourselves
                self._poke()
                self._thread.join(timeout)
        self.sock.close()
        if not self._thread.is_alive():
            for m in (self._rbuf, self._sbuf):
                try:
                    m.close()
                except BufferError:  # still exported by a frame of the failed thread: GC frees it
                    pass

    def _poke(self) -> None:
        host, port = self.sock.getsockname()[:2]
        if host in ("0.0.0.0", "::"):
            host = "::1" if self._v6 else "127.0.0.1"
        try:
            with socket.socket(self.sock.family, socket.SOCK_DGRAM) as s:
                s.sendto(b"", (host, port))
        except OSError:
            log.debug("dns_udp_wakeup_failed", exc_info=True)

    def _run(self) -> None:
        while not self._stopping:
            try:
                self._serve()  # returns on stop() or when the socket is gone
                return
            except Exception:  # only a bug gets here: log it and keep serving
                log.error("dns_udp_worker_error", exc_info=True)
                time.sleep(0.1)  # never spin on a persistent error

    def _serve(self) -> None:
        libc = _LIBC
        assert libc is not None
        recvmmsg, sendmmsg = libc.recvmmsg, libc.sendmmsg
        fd = self.sock.fileno()
        answer = self.server.answer
        tally = self.tally
        res = tally.results
        rhdr, shdr, cnames, rbuf = self._rhdr, self._shdr, self._names, self._rbuf
        hmv = memoryview(rhdr).cast("B")
        shmv = memoryview(shdr).cast("B")
        ivmv = memoryview(self._siov).cast("B")
        smv = memoryview(self._sbuf)
        names = ctypes.addressof(cnames)
        rtemplate, stemplate = self._rtemplate, self._stemplate
        results = _RESULT.iter_unpack
        name_into = _NAME_PTR.pack_into
        size_into = _SIZE_T.pack_into
        a0, a1 = (8, 24) if self._v6 else (4, 8)  # address bytes inside sockaddr_in6 / sockaddr_in
        hosts: dict[bytes, str] = {}
        moved = False  # a send header points at another datagram's address: restore before reuse
        while not self._stopping:
            hmv[:] = rtemplate  # the kernel overwrote msg_namelen/msg_len/msg_flags
            if moved:
                shmv[:] = stemplate
                moved = False
            n = recvmmsg(fd, rhdr, BATCH, MSG_WAITFORONE, None)
            if self._stopping:  # after shutdown(SHUT_RD) Linux returns one empty "datagram"
                break
            if n <= 0:
                e = ctypes.get_errno()
                if e in (errno.EBADF, errno.ENOTSOCK):
                    return
                if e != errno.EINTR:
                    log.debug("dns_udp_recv_error", errno=e)
                continue
            raw = cnames.raw  # one copy of all source addresses of the batch
            k = 0
            base = -SLOT
            o = -NAME
            for namelen, flags, ln in results(hmv[: n * _H]):
                base += SLOT
                o += NAME
                if flags & MSG_TRUNC:  # larger than a slot: cannot be a DNS message over UDP
                    res["malformed_dropped"] += 1
                    continue
                key = raw[o + a0 : o + a1]
                host = hosts.get(key)
                if host is None:
                    host = self._host(hosts, key)
                data = rbuf[base : base + ln]
                try:
                    out = answer(data, host, False, tally)
                except Exception:  # never die of one packet; the counter shows it
                    res["servfail"] += 1
                    log.debug("dns_query_error", exc_info=True)
                    continue
                if out is None:
                    continue
                if type(out) is bytes:
                    sb = k * SLOT
                    smv[sb : sb + len(out)] = out
                    size_into(ivmv, k * _IOV + _O_IOVLEN, len(out))
                    if o != k * NAME:  # send header k presets address slot k
                        name_into(shmv, k * _H, names + o, namelen)
                        moved = True
                    k += 1
                    continue
                self._forward(data, out, raw[o : o + namelen])  # type: ignore[arg-type]
            if k:
                self._send(sendmmsg, fd, shdr, k)

    def _host(self, hosts: dict[bytes, str], key: bytes) -> str:
        if len(hosts) >= 4096:  # bounded: a scan from many sources must not grow it
            hosts.clear()
        host = hosts[key] = socket.inet_ntop(socket.AF_INET6 if self._v6 else socket.AF_INET, key)
        return host

    def _send(self, sendmmsg: ctypes._NamedFuncPointer, fd: int, shdr: ctypes.Array[ctypes.c_char], k: int) -> None:
        done = 0
        while done < k:
            sent = sendmmsg(fd, ctypes.byref(shdr, done * _H), k - done, 0)
            if sent < 0:
                e = ctypes.get_errno()
                if e == errno.EINTR:
                    continue
                if e in (errno.EBADF, errno.ENOTSOCK):
                    return
                sent = 1  # this reply cannot go out (e.g. EPERM from a firewall): skip it, like sendto
            done += sent

    def _forward(self, data: bytes, q: object, name: bytes) -> None:
        addr = _decode(name)
        sock = self.sock

        def send(reply: bytes) -> None:
            try:
                sock.sendto(reply, socket.MSG_DONTWAIT, addr)
            except OSError:  # closed on shutdown, or a full buffer: UDP may drop
                pass

        try:
            self.loop.call_soon_threadsafe(self.server.forward, data, q, False, send)
        except RuntimeError:  # the loop is closed: we are shutting down, the query is dropped
            pass


def _decode(name: bytes) -> tuple[str, int] | tuple[str, int, int, int]:
    """sockaddr_in / sockaddr_in6 bytes -> the address tuple `socket.sendto` takes."""
    fam = int.from_bytes(name[:2], sys.byteorder)
    port = int.from_bytes(name[2:4], "big")
    if fam == socket.AF_INET6:
        flow = int.from_bytes(name[4:8], "big")
        scope = int.from_bytes(name[24:28], sys.byteorder)
        return socket.inet_ntop(socket.AF_INET6, name[8:24]), port, flow, scope
    return socket.inet_ntop(socket.AF_INET, name[4:8]), port
