"""Test and benchmark helpers: an event loop in a thread, and a tiny authoritative upstream.

`Upstream` stands in for the internet on loopback: every name under `zone` has an A record
(TTL 300), `big.<zone>` has 60 A records (for truncation), other names are NXDOMAIN. It
counts the queries it received, so tests can tell a cache hit from a forward. `cnames` maps a
name to a CNAME target (answered with the CNAME and an A record for the target, as a resolver
that followed the chain would), `dnames` an owner to a DNAME target (with the synthesised
CNAME); a name in `hold` is answered over UDP only once its event is set.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Coroutine
from typing import Any, TypeVar

from dnslib import CNAME, DNAME, QTYPE, RCODE, RR, SOA, A, DNSLabel, DNSRecord

T = TypeVar("T")


class LoopThread:
    """Runs an asyncio loop in a daemon thread; `run(coro)` from the test thread."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self._thread = threading.Thread(target=self.loop.run_forever, name="dns-test-loop", daemon=True)
        self._thread.start()

    def run(self, coro: Coroutine[Any, Any, T], timeout: float = 60) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def close(self) -> None:
        async def _drain() -> None:
            tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
            for t in tasks:
                t.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

        self.run(_drain())
        self.loop.call_soon_threadsafe(self.loop.stop)
        self._thread.join(10)
        self.loop.run_until_complete(self.loop.shutdown_asyncgens())
        self.loop.run_until_complete(self.loop.shutdown_default_executor())
        self.loop.close()


class Upstream:
    def __init__(self, zone: str = "example.net", host: str = "127.0.0.1") -> None:
        self.zone = DNSLabel(zone)
        self.host = host
        self.port = 0
        self.queries = 0
        self.cnames: dict[str, str] = {}
        self.dnames: dict[str, str] = {}
        self.hold: dict[str, asyncio.Event] = {}
        self._held: set[asyncio.Task[None]] = set()
        self._udp: asyncio.DatagramTransport | None = None
        self._tcp: asyncio.base_events.Server | None = None

    def reply(self, data: bytes, limit: int | None) -> bytes:
        self.queries += 1
        req = DNSRecord.parse(data)
        rep = req.reply(ra=1, aa=1)
        rep.header.ad = 0
        qn = req.q.qname
        name = str(qn).rstrip(".").lower()
        dname = next((o for o in self.dnames if name.endswith("." + o)), None)
        if name in self.cnames or dname is not None:
            if dname is not None:
                target = name[: -len(dname)] + self.dnames[dname]
                rep.add_answer(RR(dname, QTYPE.DNAME, ttl=300, rdata=DNAME(self.dnames[dname])))
            else:
                target = self.cnames[name]
            rep.add_answer(RR(qn, QTYPE.CNAME, ttl=300, rdata=CNAME(target)))
            if req.q.qtype in (QTYPE.A, QTYPE.ANY):
                rep.add_answer(RR(target, QTYPE.A, ttl=300, rdata=A("192.0.2.99")))
        elif qn.matchSuffix(self.zone):
            if req.q.qtype in (QTYPE.A, QTYPE.ANY):
                n = 60 if str(qn).lower().startswith("big.") else 1
                for i in range(n):
                    rep.add_answer(RR(qn, QTYPE.A, ttl=300, rdata=A(f"192.0.2.{i + 1}")))
        else:
            rep.header.rcode = RCODE.NXDOMAIN
        if not rep.rr:
            rep.add_auth(RR(self.zone, QTYPE.SOA, ttl=60, rdata=SOA("ns." + str(self.zone), "h." + str(self.zone),
                                                                    (1, 3600, 600, 86400, 60))))
        out = bytes(rep.pack())
        if limit is not None and len(out) > limit:
            rep = req.reply(ra=1, aa=1)
            rep.header.tc = 1
            rep.header.ad = 0
            out = bytes(rep.pack())
        return out

    async def start(self) -> None:
        loop = asyncio.get_running_loop()
        up = self

        class Udp(asyncio.DatagramProtocol):
            def connection_made(self, t: asyncio.BaseTransport) -> None:
                self.t = t

            def datagram_received(self, data: bytes, addr: tuple[str, int]) -> None:
                try:
                    req = DNSRecord.parse(data)
                except Exception:  # dnslib refuses some valid names (non-UTF-8 labels): no answer
                    return
                limit = max(512, req.ar[0].rclass if req.ar and req.ar[0].rtype == QTYPE.OPT else 512)
                gate = up.hold.get(str(req.q.qname).rstrip(".").lower())
                if gate is None:
                    self.t.sendto(up.reply(data, limit), addr)  # type: ignore[attr-defined]
                    return

                async def later() -> None:
                    await gate.wait()
                    self.t.sendto(up.reply(data, limit), addr)  # type: ignore[attr-defined]

                up._held.add(asyncio.get_running_loop().create_task(later()))

        async def tcp(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
            try:
                while True:
                    n = int.from_bytes(await reader.readexactly(2), "big")
                    try:
                        out = self.reply(await reader.readexactly(n), None)
                    except (asyncio.IncompleteReadError, ConnectionError):
                        raise
                    except Exception:
                        return
                    writer.write(len(out).to_bytes(2, "big") + out)
            except (asyncio.IncompleteReadError, ConnectionError):
                pass
            finally:
                writer.close()

        # UDP on a port the kernel picks, then TCP on the same one, which another socket may
        # hold already (an outgoing connection, a flood test's sockets): then another pair
        for attempt in range(50):
            self._udp, _ = await loop.create_datagram_endpoint(Udp, local_addr=(self.host, 0))  # type: ignore[assignment]
            self.port = self._udp.get_extra_info("sockname")[1]  # type: ignore[union-attr]
            try:
                self._tcp = await asyncio.start_server(tcp, self.host, self.port)
                return
            except OSError:
                self._udp.close()  # type: ignore[union-attr]
                if attempt == 49:
                    raise

    async def aclose(self) -> None:
        if self._udp is not None:
            self._udp.close()
        if self._tcp is not None:
            self._tcp.close()
            await self._tcp.wait_closed()
