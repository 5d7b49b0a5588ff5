"""The RPZ primary on the network: SOA/NS queries, AXFR and IXFR over TCP, NOTIFY out.

Queries are parsed with dnspython (transfers are rare; TSIG needs it); answers are built from
the pre-rendered wire bodies of `rpz.ZoneVersion` / `rpz.Journal`. Transfer ACL: loopback and
`allow_transfer` prefixes; with `tsig`, transfers must also be signed with that key and every
response message is signed (RFC 8945 4.4 multi-message chaining).
"""

from __future__ import annotations

import asyncio
import base64
import socket
import struct
import time

import dns.exception
import dns.flags
import dns.message
import dns.name
import dns.opcode
import dns.rdataclass
import dns.rdatatype
import dns.renderer
import dns.tsig
import dns.xfr
import structlog

from blockd.dns import wire
from blockd.dns.acl import LOOPBACK, Acl
from blockd.dns.rpz import Journal, RpzSettings, ZoneVersion, ns_rr

log = structlog.get_logger("blockd.dns.rpz")


class RpzServer:
    def __init__(self, settings: RpzSettings) -> None:
        self.settings = settings
        self.zone_name = dns.name.from_text(settings.origin)
        self.version: ZoneVersion | None = None  # None until the first apply: refuse transfers
        self.journal = Journal(settings.journal_versions)
        self._acl = Acl((LOOPBACK if settings.allow_loopback else ()) + tuple(settings.allow_transfer))
        self._keyring = None
        if settings.tsig is not None:
            k = settings.tsig
            self._keyring = {dns.name.from_text(k.name): dns.tsig.Key(k.name, base64.b64decode(k.secret), k.algorithm)}
        self._servers: list[asyncio.base_events.Server] = []
        self._udp: list[asyncio.DatagramTransport] = []
        self._tasks: set[asyncio.Task[None]] = set()
        self.addresses: list[tuple[str, int]] = []
        self.stats: dict[str, int] = {"axfr": 0, "ixfr": 0, "ixfr_as_axfr": 0, "soa": 0, "refused": 0,
                                      "notify_sent": 0, "notify_acked": 0, "notify_failed": 0}

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        for host, port in self.settings.listen:
            fam = socket.AF_INET6 if ":" in host else socket.AF_INET
            for attempt in range(20):
                udp, _ = await loop.create_datagram_endpoint(lambda: _Udp(self), local_addr=(host, port), family=fam)
                bound = udp.get_extra_info("sockname")[1]
                try:
                    srv = await asyncio.start_server(self._client, host, bound, family=fam, reuse_address=True)
                except OSError:
                    udp.close()
                    if port != 0 or attempt == 19:
                        raise
                    continue
                self._udp.append(udp)  # type: ignore[arg-type]
                self._servers.append(srv)
                self.addresses.append((host, bound))
                break
        log.info("rpz_primary_started", zone=self.settings.origin, listen=[f"{h}@{p}" for h, p in self.addresses])

    async def aclose(self) -> None:
        for u in self._udp:
            u.close()
        for s in self._servers:
            s.close()
        for t in list(self._tasks):
            t.cancel()
        for s in self._servers:
            await s.wait_closed()
        self._servers.clear()
        self._udp.clear()

    # ---- answering -------------------------------------------------------------------------
    def _parse(self, data: bytes) -> dns.message.Message | bytes | None:
        try:
            return dns.message.from_wire(data, keyring=self._keyring, ignore_trailing=True)
        except dns.message.UnknownTSIGKey:
            return wire.error_response(data, wire.REFUSED) if len(data) >= 12 else None
        except (dns.tsig.BadSignature, dns.tsig.BadTime, dns.tsig.PeerError):
            return wire.error_response(data, wire.REFUSED) if len(data) >= 12 else None
        except dns.exception.DNSException:
            return wire.error_response(data, wire.FORMERR) if len(data) >= 12 and not data[2] & 0x80 else None

    def answer(self, data: bytes, host: str, tcp: bool) -> list[bytes]:
        """All response messages for one query (a transfer may need many)."""
        m = self._parse(data)
        if m is None or isinstance(m, bytes):
            return [m] if m else []
        if m.flags & dns.flags.QR:
            return []
        if m.opcode() != dns.opcode.QUERY:
            return [wire.error_response(data, wire.NOTIMP)]
        if len(m.question) != 1:
            return [wire.error_response(data, wire.FORMERR)]
        qrr = m.question[0]
        qend = 12 + len(qrr.name.to_wire())
        if qrr.name != self.zone_name or qrr.rdclass != dns.rdataclass.IN:
            self.stats["refused"] += 1
            return [self._msg(data, qend, wire.REFUSED, [], m)]
        v = self.version
        if v is None:
            return [self._msg(data, qend, wire.SERVFAIL, [], m)]
        qtype = qrr.rdtype
        if qtype in (dns.rdatatype.AXFR, dns.rdatatype.IXFR):
            if not tcp:  # RFC 1995 2: IXFR over UDP may be answered with the SOA only
                if qtype == dns.rdatatype.AXFR:
                    return [self._msg(data, qend, wire.FORMERR, [], m)]
                return [self._msg(data, qend, wire.NOERROR, [(1, v.soa)], m)]
            if not self._acl.allowed(host) or (self._keyring is not None and not m.had_tsig):
                self.stats["refused"] += 1
                return [self._msg(data, qend, wire.REFUSED, [], m)]
            bodies = None
            if qtype == dns.rdatatype.IXFR:
                since = dns.xfr.extract_serial_from_query(m)
                if since == v.serial:
                    bodies = [(1, v.soa)]
                else:
                    bodies = self.journal.ixfr_bodies(self.settings, since, v) if since is not None else None
                    self.stats["ixfr" if bodies is not None else "ixfr_as_axfr"] += 1
            else:
                self.stats["axfr"] += 1
            if bodies is None:
                bodies = v.axfr_bodies()
            return self._stream(data, qend, bodies, m)
        if qtype == dns.rdatatype.SOA:
            self.stats["soa"] += 1
            return [self._msg(data, qend, wire.NOERROR, [(1, v.soa)], m)]
        if qtype == dns.rdatatype.NS:
            return [self._msg(data, qend, wire.NOERROR, [(1, ns_rr(self.settings))], m)]
        return [self._msg(data, qend, wire.NOERROR, [], m, authority=v.soa)]

    def _msg(self, data: bytes, qend: int, rcode: int, bodies: list[tuple[int, bytes]], m: dns.message.Message,
             authority: bytes = b"") -> bytes:
        return self._stream(data, qend, bodies or [(0, b"")], m, rcode, authority)[0]

    def _stream(self, data: bytes, qend: int, bodies: list[tuple[int, bytes]], m: dns.message.Message,
                rcode: int = wire.NOERROR, authority: bytes = b"") -> list[bytes]:
        question = data[12 : qend + 4]
        out = []
        ctx = None
        for count, body in bodies:
            b2 = 0x84 | (data[2] & 0x01)  # QR, AA, RD copied
            hdr = data[:2] + bytes((b2, rcode)) + struct.pack("!HHHH", 1, count, 1 if authority else 0, 0)
            msg = hdr + question + body + authority
            if self._keyring is not None and m.had_tsig:
                msg, ctx = self._sign(msg, m, ctx, multi=len(bodies) > 1)
            out.append(msg)
        return out

    def _sign(self, msg: bytes, m: dns.message.Message, ctx: object, multi: bool) -> tuple[bytes, object]:
        key = self._keyring[m.keyname]  # type: ignore[index]
        tmpl = dns.renderer._make_tsig(key.name, key.algorithm, 0, 300, b"", struct.unpack("!H", msg[:2])[0], 0, b"")[0]
        rdata, ctx = dns.tsig.sign(msg, key, tmpl, int(time.time()), m.mac if ctx is None else None, ctx, multi)
        rd = rdata.to_wire()
        tsig_rr = key.name.to_wire() + struct.pack("!HHIH", dns.rdatatype.TSIG, dns.rdataclass.ANY, 0, len(rd)) + rd
        ar = struct.unpack_from("!H", msg, 10)[0] + 1
        return msg[:10] + struct.pack("!H", ar) + msg[12:] + tsig_rr, ctx

    async def _client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        peer = writer.get_extra_info("peername")
        host = peer[0] if peer else ""
        try:
            while True:
                async with asyncio.timeout(30):
                    n = int.from_bytes(await reader.readexactly(2), "big")
                    data = await reader.readexactly(n)
                for msg in self.answer(data, host, True):
                    writer.write(len(msg).to_bytes(2, "big") + msg)
                    await writer.drain()
        except (asyncio.IncompleteReadError, TimeoutError, ConnectionError):
            pass
        finally:
            writer.close()

    # ---- NOTIFY ----------------------------------------------------------------------------
    def notify_all(self) -> None:
        """Send NOTIFY (RFC 1996) to every configured secondary, retrying in the background."""
        v = self.version
        for target in self.settings.notify:
            task = asyncio.get_running_loop().create_task(self._notify(target, v.serial if v else 0))
            self._tasks.add(task)
            task.add_done_callback(self._tasks.discard)

    def notify_message(self) -> dns.message.Message:
        m = dns.message.make_query(self.zone_name, dns.rdatatype.SOA)
        # Flags first, then the opcode: assigning flags after set_opcode would reset the opcode
        # to QUERY (the opcode lives in the flags word), and secondaries ignore such a "NOTIFY".
        m.flags = dns.flags.AA
        m.set_opcode(dns.opcode.NOTIFY)
        if self._keyring is not None:
            m.use_tsig(self._keyring)
        return m

    async def _notify(self, target: tuple[str, int], serial: int) -> None:
        import dns.asyncquery

        s = self.settings
        for _ in range(s.notify_retries):
            m = self.notify_message()
            self.stats["notify_sent"] += 1
            try:
                r = await dns.asyncquery.udp(m, target[0], s.notify_timeout_s, port=target[1],
                                             ignore_unexpected=True)
            except (dns.exception.DNSException, OSError):
                continue
            if r.opcode() == dns.opcode.NOTIFY:
                self.stats["notify_acked"] += 1
                log.debug("rpz_notify_acked", target=f"{target[0]}@{target[1]}", serial=serial)
                return
        self.stats["notify_failed"] += 1
        log.warning("rpz_notify_failed", target=f"{target[0]}@{target[1]}", serial=serial)


class _Udp(asyncio.DatagramProtocol):
    def __init__(self, server: RpzServer) -> None:
        self.server = server
        self.transport: asyncio.DatagramTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        try:
            out = self.server.answer(data, addr[0], False)
        except Exception:
            log.debug("rpz_query_error", exc_info=True)
            return
        if out and self.transport is not None:
            self.transport.sendto(out[0], addr)

    def error_received(self, exc: Exception) -> None:
        return None
