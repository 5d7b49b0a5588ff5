"""The RPZ primary on the network: SOA/NS queries, AXFR and IXFR over TCP, NOTIFY out.

Queries are parsed with dnspython (transfers are rare; TSIG needs it); answers are built from
the pre-rendered wire bodies of `rpz.ZoneVersion` / `rpz.Journal`. Transfer ACL: loopback and
`allow_transfer` prefixes; with `tsig`, transfers must also be signed with that key and every
response message is signed (RFC 8945 4.4 multi-message chaining).

Per-secondary state (`secondaries()`), keyed by source address: the serial each secondary is
known to hold, learnt only from what it tells us or what we delivered to it: the SOA serial in
its IXFR query, and the serial of a transfer we finished sending it. A SOA refresh probe says
nothing about the prober's serial, so it only counts as a sign of life. Entries exist for the
`notify` targets from the start and for addresses that asked for a transfer (at most
`MAX_SECONDARIES`; the least recently seen non-notify entry makes room).
"""

from __future__ import annotations

import asyncio
import base64
import ipaddress
import socket
import struct
import time
from collections.abc import Coroutine
from dataclasses import dataclass, replace

import dns.exception
import dns.flags
import dns.message
import dns.name
import dns.opcode
import dns.rcode
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

MAX_SECONDARIES = 256


@dataclass(frozen=True, slots=True)
class SecondaryState:
    """What the primary knows about one secondary. Times are `time.time()`, None = never."""

    serial: int | None  # the last serial it is known to hold; None until it tells us or we send one
    last_seen: float | None  # its last query to us, or its last NOTIFY answer
    last_transfer: float | None  # when we finished sending it an AXFR/IXFR


_UNKNOWN = SecondaryState(None, None, None)


def secondary_key(host: str) -> str:
    """A source address as the secondary's key: canonical text, IPv4-mapped IPv6 as IPv4."""
    try:
        ip = ipaddress.ip_address(host.split("%")[0])
    except ValueError:
        return host
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        return str(ip.ipv4_mapped)
    return str(ip)


class Zone:
    """One zone the primary serves: its settings, version, journal, ACL and secondaries."""

    def __init__(self, settings: RpzSettings) -> None:
        self.settings = settings
        self.name = dns.name.from_text(settings.origin)
        self.version: ZoneVersion | None = None  # None until the first apply: refuse transfers
        self.journal = Journal(settings.journal_versions)
        self.acl = Acl((LOOPBACK if settings.allow_loopback else ()) + tuple(settings.allow_transfer))
        self.notifying: set[tuple[str, int]] = set()  # targets with a NOTIFY episode in flight
        self.notify_keys = frozenset(secondary_key(h) for h, _ in settings.notify)
        self.secondaries: dict[str, SecondaryState] = {k: _UNKNOWN for k in sorted(self.notify_keys)}

    def saw(self, host: str, *, serial: int | None = None, transfer: bool = False, create: bool = False) -> None:
        """Record a sign of life from `host` (and the serial it holds, when known)."""
        key = secondary_key(host)
        cur = self.secondaries.get(key)
        if cur is None:
            if not create:
                return
            if len(self.secondaries) >= MAX_SECONDARIES:
                evictable = [k for k in self.secondaries if k not in self.notify_keys]
                if not evictable:
                    return
                del self.secondaries[min(evictable, key=lambda k: self.secondaries[k].last_seen or 0.0)]
            cur = _UNKNOWN
        now = time.time()
        self.secondaries[key] = replace(cur, last_seen=now, serial=cur.serial if serial is None else serial,
                                        last_transfer=now if transfer else cur.last_transfer)


class RpzServer:
    """The primary for every zone of one `RpzSettings` (one zone, or one per authority/order).

    The attributes `settings`, `version`, `journal`, `serial` and `secondaries()` speak of the
    default zone (`settings.zone`), which is the only zone with layout `one`.
    """

    def __init__(self, settings: RpzSettings) -> None:
        self.settings = settings
        self.zones: dict[dns.name.Name, Zone] = {}
        self.addresses: list[tuple[str, int]] = []
        self._renotifying = False
        self.default = self.add_zone(settings)
        self._keyring = None
        if settings.tsig is not None:
            k = settings.tsig
            self._keyring = {dns.name.from_text(k.name): dns.tsig.Key(k.name, base64.b64decode(k.secret), k.algorithm)}
        self._servers: list[asyncio.base_events.Server] = []
        self._udp: list[asyncio.DatagramTransport] = []
        self._tasks: set[asyncio.Task[None]] = set()
        self.stats: dict[str, int] = {"axfr": 0, "ixfr": 0, "ixfr_as_axfr": 0, "soa": 0, "refused": 0,
                                      "notify_sent": 0, "notify_acked": 0, "notify_failed": 0}

    def add_zone(self, settings: RpzSettings) -> Zone:
        """The zone for `settings.origin`, created (serving nothing yet) if it is new."""
        name = dns.name.from_text(settings.origin)
        z = self.zones.get(name)
        if z is None:
            z = self.zones[name] = Zone(settings)
            if self.addresses and settings.notify and settings.renotify_s > 0 and not self._renotifying:
                self._renotifying = True
                self._spawn(self._renotify_loop())
        return z

    def zone(self, origin: str) -> Zone | None:
        return self.zones.get(dns.name.from_text(origin))

    @property
    def version(self) -> ZoneVersion | None:
        return self.default.version

    @version.setter
    def version(self, v: ZoneVersion | None) -> None:
        self.default.version = v

    @property
    def journal(self) -> Journal:
        return self.default.journal

    @property
    def zone_name(self) -> dns.name.Name:
        return self.default.name

    @property
    def serial(self) -> int | None:
        """The serial being served in the default zone (None before the first apply)."""
        return self.version.serial if self.version is not None else None

    def secondaries(self) -> dict[str, SecondaryState]:
        """A copy of the default zone's per-secondary state, by source address."""
        return dict(self.default.secondaries)

    def zone_states(self) -> dict[str, tuple[int | None, dict[str, SecondaryState]]]:
        """Every zone served: origin -> (serial, per-secondary state). Zones not yet applied are left out."""
        return {z.settings.origin: (z.version.serial, dict(z.secondaries))
                for z in self.zones.values() if z.version is not None}

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
        if any(z.settings.notify for z in self.zones.values()) and self.settings.renotify_s > 0 \
                and not self._renotifying:
            self._renotifying = True
            self._spawn(self._renotify_loop())

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
        return self._answer(data, host, tcp)[0]

    def _answer(self, data: bytes, host: str, tcp: bool) -> tuple[list[bytes], int | None]:
        """-> (response messages, the serial they bring the client to if they are a transfer)."""
        out, delivered, _ = self._answer_zone(data, host, tcp)
        return out, delivered

    def _answer_zone(self, data: bytes, host: str, tcp: bool) -> tuple[list[bytes], int | None, Zone | None]:
        m = self._parse(data)
        if m is None or isinstance(m, bytes):
            return ([m] if m else []), None, None
        if m.flags & dns.flags.QR:
            return [], None, None
        if m.opcode() != dns.opcode.QUERY:
            return [wire.error_response(data, wire.NOTIMP)], None, None
        if len(m.question) != 1:
            return [wire.error_response(data, wire.FORMERR)], None, None
        qrr = m.question[0]
        qend = 12 + len(qrr.name.to_wire())
        z = self.zones.get(qrr.name)
        if z is None or qrr.rdclass != dns.rdataclass.IN:
            self.stats["refused"] += 1
            return [self._msg(data, qend, wire.REFUSED, [], m)], None, None
        v = z.version
        if v is None:
            return [self._msg(data, qend, wire.SERVFAIL, [], m)], None, None
        qtype = qrr.rdtype
        allowed = z.acl.allowed(host) and (self._keyring is None or m.had_tsig)
        since = None
        if qtype == dns.rdatatype.IXFR:
            try:
                since = dns.xfr.extract_serial_from_query(m)
            except KeyError:  # RFC 1995 3: an IXFR query carries the client's SOA in AUTHORITY
                return [self._msg(data, qend, wire.FORMERR, [], m)], None, None
        z.saw(host, serial=since if allowed else None, create=allowed and since is not None)
        if qtype in (dns.rdatatype.AXFR, dns.rdatatype.IXFR):
            if not tcp:
                if qtype == dns.rdatatype.AXFR:
                    return [self._msg(data, qend, wire.FORMERR, [], m)], None, None
                # RFC 1995 2: the incremental answer when it fits one UDP message, else the SOA
                # only (the client retries over TCP). Unbound takes a small change this way
                # without opening a TCP connection.
                if allowed and since is not None and since != v.serial:
                    bodies = z.journal.ixfr_bodies(z.settings, since, v)
                    if bodies is not None and len(bodies) == 1:
                        msg = self._msg(data, qend, wire.NOERROR, bodies, m)
                        if len(msg) <= (max(512, m.payload) if m.edns >= 0 else 512):
                            self.stats["ixfr"] += 1
                            return [msg], v.serial, z
                return [self._msg(data, qend, wire.NOERROR, [(1, v.soa)], m)], None, None
            if not allowed:
                self.stats["refused"] += 1
                return [self._msg(data, qend, wire.REFUSED, [], m)], None, None
            if since == v.serial:  # up to date: one SOA, nothing delivered
                return self._stream(data, qend, [(1, v.soa)], m), None, None
            bodies = None
            if qtype == dns.rdatatype.IXFR:
                bodies = z.journal.ixfr_bodies(z.settings, since, v) if since is not None else None
                self.stats["ixfr" if bodies is not None else "ixfr_as_axfr"] += 1
            else:
                self.stats["axfr"] += 1
            if bodies is None:
                bodies = v.axfr_bodies()
            return self._stream(data, qend, bodies, m), v.serial, z
        if qtype == dns.rdatatype.SOA:  # a refresh probe: tells us nothing about the prober's serial
            self.stats["soa"] += 1
            return [self._msg(data, qend, wire.NOERROR, [(1, v.soa)], m)], None, None
        if qtype == dns.rdatatype.NS:
            return [self._msg(data, qend, wire.NOERROR, [(1, ns_rr(z.settings))], m)], None, None
        return [self._msg(data, qend, wire.NOERROR, [], m, authority=v.soa)], None, None

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
                out, delivered, z = self._answer_zone(data, host, True)
                for msg in out:
                    writer.write(len(msg).to_bytes(2, "big") + msg)
                    await writer.drain()
                if delivered is not None and z is not None:  # the whole transfer was handed to the kernel
                    self.delivered(z, host, delivered)
        except (asyncio.IncompleteReadError, TimeoutError, ConnectionError):
            pass
        finally:
            writer.close()

    def delivered(self, z: Zone, host: str, serial: int) -> None:
        """A transfer bringing `host` to `serial` was handed to the kernel (TCP, or one UDP IXFR)."""
        held = z.secondaries.get(secondary_key(host))
        z.saw(host, serial=serial, transfer=True, create=True)
        if held is not None and held.serial is not None:
            self._wipe(z, host, held.serial, serial)

    # ---- NOTIFY ----------------------------------------------------------------------------
    def notify_all(self, zone: Zone | None = None) -> None:
        """Send NOTIFY (RFC 1996) for `zone` (default: the default zone) to its secondaries, retrying
        in the background."""
        z = zone or self.default
        v = z.version
        for target in z.settings.notify:
            self._spawn(self._notify(z, target, v.serial if v else 0))

    def _wipe(self, z: Zone, host: str, before: int, after: int) -> None:
        """After `host` took a transfer from `before` to `after`, wipe the changed names from the
        answer cache of each `wipe_cache` target at that address (NOTIFY per name, RFC 1996 opcode;
        PowerDNS Recursor wipes the name and everything below it when `allow-notify-for` covers it)."""
        key = secondary_key(host)
        targets = [t for t in self.settings.wipe_cache if secondary_key(t[0]) == key]
        if not targets:
            return
        names = z.journal.changed(before, after)
        if names is None or not names:
            return
        if len(names) > self.settings.max_wipe_names:
            names = ["."]
        for target in targets:
            self._spawn(self._wipe_episode(target, names))

    async def _wipe_episode(self, target: tuple[str, int], names: list[str]) -> None:
        # The resolver applies a transfer a moment after its last byte left us; a wipe before
        # that would let the old answer back into the cache. Wipe at once and again a little later.
        for delay in (0.0, 1.0):
            await asyncio.sleep(delay)
            ok = 0
            for name in names:
                m = dns.message.make_query(dns.name.from_text(name), dns.rdatatype.SOA)
                m.flags = dns.flags.AA
                m.set_opcode(dns.opcode.NOTIFY)
                if self._keyring is not None:
                    m.use_tsig(self._keyring)
                try:
                    ok += await notify_once(m, target, self.settings.notify_timeout_s, self._keyring)
                except OSError:
                    pass
            self.stats["cache_wipes"] = self.stats.get("cache_wipes", 0) + ok
            if ok < len(names):
                self.stats["cache_wipes_failed"] = self.stats.get("cache_wipes_failed", 0) + len(names) - ok
                log.warning("rpz_cache_wipe_failed", target=f"{target[0]}@{target[1]}", names=len(names),
                            acked=ok)
                return

    def _spawn(self, coro: Coroutine[object, object, None]) -> None:
        task = asyncio.get_running_loop().create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _renotify_loop(self) -> None:
        """NOTIFY the targets that lag (or whose serial is unknown) again, one episode at a time."""
        while True:
            await asyncio.sleep(self.settings.renotify_s)
            for z in list(self.zones.values()):
                v = z.version
                if v is None:
                    continue
                for target in z.settings.notify:
                    held = z.secondaries.get(secondary_key(target[0]))
                    if target not in z.notifying and (held is None or held.serial != v.serial):
                        log.debug("rpz_renotify", zone=z.settings.origin, target=f"{target[0]}@{target[1]}",
                                  serial=v.serial, held=held.serial if held else None)
                        self._spawn(self._notify(z, target, v.serial))

    def notify_message(self, zone: Zone | None = None) -> dns.message.Message:
        m = dns.message.make_query((zone or self.default).name, dns.rdatatype.SOA)
        # Flags first, then the opcode: assigning flags after set_opcode would reset the opcode
        # to QUERY (the opcode lives in the flags word), and secondaries ignore such a "NOTIFY".
        m.flags = dns.flags.AA
        m.set_opcode(dns.opcode.NOTIFY)
        if self._keyring is not None:
            m.use_tsig(self._keyring)
        return m

    async def _notify(self, z: Zone, target: tuple[str, int], serial: int) -> None:
        z.notifying.add(target)
        try:
            await self._notify_episode(z, target, serial)
        finally:
            z.notifying.discard(target)

    async def _notify_episode(self, z: Zone, target: tuple[str, int], serial: int) -> None:
        s = z.settings
        for _ in range(s.notify_retries):
            m = self.notify_message(z)
            self.stats["notify_sent"] += 1
            try:
                ok = await notify_once(m, target, s.notify_timeout_s, self._keyring)
            except OSError:
                continue
            if ok:
                self.stats["notify_acked"] += 1
                z.saw(target[0])
                log.debug("rpz_notify_acked", zone=s.origin, target=f"{target[0]}@{target[1]}", serial=serial)
                return
        self.stats["notify_failed"] += 1
        log.warning("rpz_notify_failed", zone=s.origin, target=f"{target[0]}@{target[1]}", serial=serial)


async def notify_once(m: dns.message.Message, target: tuple[str, int], timeout: float,
                      keyring: dict[dns.name.Name, dns.tsig.Key] | None) -> bool:
    """Send one NOTIFY and wait for its answer: True when `target` acknowledged it.

    The acknowledgement is matched by id, opcode and question. With TSIG, a signed answer must
    verify; an unsigned answer is still an acknowledgement (PowerDNS Recursor answers a signed
    NOTIFY unsigned). A NOTIFY answer carries no data: what the secondary then holds is learnt
    from its (signed) transfer, never from the acknowledgement.
    """
    loop = asyncio.get_running_loop()
    fam = socket.AF_INET6 if ":" in target[0] else socket.AF_INET
    sock = socket.socket(fam, socket.SOCK_DGRAM)
    sock.setblocking(False)
    try:
        wire_q = m.to_wire()
        await loop.sock_sendto(sock, wire_q, target)
        async with asyncio.timeout(timeout):
            while True:
                data, _ = await loop.sock_recvfrom(sock, 65535)
                if len(data) < 12 or data[:2] != wire_q[:2]:
                    continue
                try:
                    r = dns.message.from_wire(data, keyring=keyring, request_mac=m.mac if keyring else b"",
                                              ignore_trailing=True)
                except (dns.message.UnknownTSIGKey, dns.tsig.BadSignature, dns.tsig.BadTime, dns.tsig.PeerError):
                    return False  # signed, but not by our key or not validly: not an acknowledgement
                except dns.exception.DNSException:
                    try:  # an unsigned answer to a signed NOTIFY: parse it without the keyring
                        r = dns.message.from_wire(data, ignore_trailing=True)
                    except dns.exception.DNSException:
                        continue
                    if r.had_tsig:
                        return False
                if r.flags & dns.flags.QR and r.opcode() == dns.opcode.NOTIFY and r.question == m.question:
                    return bool(r.rcode() == dns.rcode.NOERROR)
    except TimeoutError:
        return False
    finally:
        sock.close()


class _Udp(asyncio.DatagramProtocol):
    def __init__(self, server: RpzServer) -> None:
        self.server = server
        self.transport: asyncio.DatagramTransport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = transport  # type: ignore[assignment]

    def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
        try:
            out, delivered, z = self.server._answer_zone(data, addr[0], False)
        except Exception:
            log.debug("rpz_query_error", exc_info=True)
            return
        if out and self.transport is not None:
            self.transport.sendto(out[0], addr)
            if delivered is not None and z is not None:
                self.server.delivered(z, addr[0], delivered)

    def error_received(self, exc: Exception) -> None:
        return None
