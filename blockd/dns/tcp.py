"""One DNS-over-TCP client of the sinkhole: framed bytes -> `SinkholeServer.answer` -> framed replies.

RFC 7766 framing, pipelined queries answered as they complete (out of order), and the limits
that keep hostile clients from holding the server (docs/dns.md, "Under hostile traffic"): a
deadline for a whole message that trickling bytes do not extend, an idle deadline, write
backpressure (a client that does not read its replies stops being read, and is cut if that
lasts), and a count of every close by reason (`TCP_CLOSE_REASONS`). Admission (ACL, per-source
and global caps) is the server's (`SinkholeServer.tcp_admit`), since it sees every connection.
"""

from __future__ import annotations

import asyncio
import ipaddress
from typing import TYPE_CHECKING

import structlog

if TYPE_CHECKING:
    from blockd.dns.server import SinkholeServer

log = structlog.get_logger("blockd.dns.tcp")

#: Why a TCP connection was refused or cut (labels of blockd_dns_tcp_connections_closed_total).
TCP_CLOSE_REASONS = ("acl", "source_limit", "global_limit", "evicted", "idle", "message_deadline",
                     "write_stalled", "framing")


def source_key(host: str) -> str:
    """What the per-source TCP cap counts by: the IPv4 address, or the IPv6 /64 (one subscriber's
    prefix); IPv4-mapped IPv6 addresses count as their IPv4 address."""
    try:
        addr = ipaddress.ip_address(host.split("%", 1)[0])
    except ValueError:
        return host
    if isinstance(addr, ipaddress.IPv6Address):
        if addr.ipv4_mapped is not None:
            return str(addr.ipv4_mapped)
        return str(ipaddress.IPv6Network((int(addr) >> 64 << 64, 64)))
    return str(addr)


class TcpClient(asyncio.Protocol):
    """One TCP client. At most one timer; its deadline and reason follow the connection's state:
    replies unread (writes paused) -> `tcp_idle_s` from the pause; part of a message buffered ->
    `tcp_message_s` from that message's first byte; nothing in flight -> `tcp_idle_s` from the
    last complete message or reply. Reading stops while writes are paused or `tcp_max_pending`
    queries are in flight."""

    def __init__(self, server: SinkholeServer) -> None:
        self.server = server
        self.buf = bytearray()
        self.transport: asyncio.Transport | None = None
        self.source = ""
        self.host = ""
        self.pending = 0
        self.active = 0.0  # last complete message or reply
        self.msg_start = 0.0  # first byte of the message being received
        self.write_paused_at: float | None = None
        self.reading = True
        self.timer: asyncio.TimerHandle | None = None
        self.timer_at = 0.0
        self.closed = False

    # ---- lifecycle ----------------------------------------------------------------------
    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]
        s = self.server
        peer = transport.get_extra_info("peername")
        self.host = peer[0] if peer else ""
        why = s.tcp_admit(self, self.host)
        if why is not None:
            self.closed = True
            s.tcp_closed[why] += 1
            transport.abort()  # type: ignore[attr-defined]
            return
        self.transport.set_write_buffer_limits(high=s.settings.tcp_write_buffer)  # type: ignore[union-attr]
        self.active = asyncio.get_running_loop().time()
        self._arm()

    def cut(self, reason: str) -> None:
        """Close for `reason` (counted once); what is still unsent is dropped."""
        if self.closed:
            return
        self.server.tcp_closed[reason] += 1
        self.close(abort=True)

    def close(self, abort: bool = False) -> None:
        self.closed = True
        self.server.tcp_release(self)
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None
        if self.transport is not None:
            if abort:
                self.transport.abort()
            else:
                self.transport.close()

    def connection_lost(self, exc: Exception | None) -> None:
        self.closed = True
        self.server.tcp_release(self)
        if self.timer is not None:
            self.timer.cancel()
            self.timer = None

    # ---- deadline -----------------------------------------------------------------------
    def _deadline(self) -> tuple[float, str] | None:
        st = self.server.settings
        out: tuple[float, str] | None = None
        if self.write_paused_at is not None:
            out = (self.write_paused_at + st.tcp_idle_s, "write_stalled")
        if self.buf and self.reading:
            d = (self.msg_start + st.tcp_message_s, "message_deadline")
            out = d if out is None or d < out else out
        if out is None and self.pending == 0:
            out = (self.active + st.tcp_idle_s, "idle")
        return out

    def _arm(self) -> None:
        """(Re)schedule the timer if the deadline moved earlier; a later one is found when it fires."""
        if self.closed:
            return
        d = self._deadline()
        if d is None:
            return
        if self.timer is None or d[0] < self.timer_at:
            if self.timer is not None:
                self.timer.cancel()
            self.timer_at = d[0]
            self.timer = asyncio.get_running_loop().call_at(d[0], self._fire)

    def _fire(self) -> None:
        self.timer = None
        d = self._deadline()
        if d is None:
            return  # re-armed when the state changes (a reply, a byte)
        if d[0] <= asyncio.get_running_loop().time():
            self.cut(d[1])
        else:
            self._arm()

    # ---- flow control -------------------------------------------------------------------
    def pause_writing(self) -> None:
        self.write_paused_at = asyncio.get_running_loop().time()
        self._flow()
        self._arm()

    def resume_writing(self) -> None:
        self.write_paused_at = None
        self._flow()
        self._process()
        self._arm()

    def _flow(self) -> None:
        """Read only while replies are being read and in-flight queries are under the cap."""
        want = self.write_paused_at is None and self.pending < self.server.settings.tcp_max_pending
        t = self.transport
        if want == self.reading or t is None or t.is_closing():
            return
        self.reading = want
        if want:
            t.resume_reading()
        else:
            t.pause_reading()

    # ---- data ---------------------------------------------------------------------------
    def data_received(self, data: bytes) -> None:
        if self.closed:
            return
        if not self.buf:
            self.msg_start = asyncio.get_running_loop().time()
        self.buf += data
        self._process()
        self._arm()

    def _process(self) -> None:
        """Answer the complete messages in `buf` while replies are read and slots are free."""
        buf = self.buf
        cap = self.server.settings.tcp_max_pending
        done = False
        while len(buf) >= 2 and not self.closed and self.write_paused_at is None and self.pending < cap:
            n = (buf[0] << 8) | buf[1]
            if n == 0:
                self.cut("framing")
                return
            if len(buf) < 2 + n:
                break
            msg = bytes(buf[2 : 2 + n])
            del buf[: 2 + n]
            done = True
            self._query(msg)
        if done:
            now = asyncio.get_running_loop().time()
            self.active = now
            if buf:
                self.msg_start = now  # the rest of the buffer is the next message's start
        self._flow()

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
        self.server.forward(msg, out, True, self._done)  # type: ignore[arg-type]

    def _done(self, reply: bytes) -> None:
        self.pending -= 1
        self.active = asyncio.get_running_loop().time()
        self._send(reply)
        if not self.closed:
            self._flow()
            self._process()
            self._arm()

    def _send(self, reply: bytes) -> None:
        t = self.transport
        if t is not None and not t.is_closing() and reply:
            t.write(len(reply).to_bytes(2, "big") + reply)
            if self.write_paused_at is not None:  # rare: replies of forwards finishing while paused
                size = t.get_write_buffer_size()
                if size > self.server.tcp_write_peak:
                    self.server.tcp_write_peak = size
