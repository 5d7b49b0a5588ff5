"""The primary with one zone per authority, asked by dnspython over real sockets: each zone's AXFR,
IXFR, serial, transfer ACL and NOTIFY list are its own; serials survive a restart; a zone whose
authority has no rules left stays served, empty, with a new serial."""

from __future__ import annotations

import socket
from collections.abc import Iterator
from datetime import datetime, timezone
from pathlib import Path

import dns.message
import dns.query
import dns.rcode
import dns.rdatatype
import dns.rrset
import dns.xfr
import dns.zone
import pytest

from blockd.dns import rpz
from blockd.dns.rpzserver import RpzServer
from blockd.dns.testing import LoopThread
from blockd.enforcers.rpz import RpzEnforcer
from blockd.model import DomainRule, OrderInfo, RuleSet

pytestmark = pytest.mark.e2e
T = datetime(2026, 1, 1, tzinfo=timezone.utc)
ORDERS = {"a1": OrderInfo("a1", "r", 1, "Court A", "ra", None, "block", None, None, T),
          "b1": OrderInfo("b1", "r", 1, "Court B", "rb", None, "block", None, None, T)}
A, B = "court-a.rpz.blockd.", "court-b.rpz.blockd."


def rules(*pairs: tuple[str, str]) -> RuleSet:
    return RuleSet.build([DomainRule(n, False, frozenset({o})) for n, o in pairs], orders=ORDERS)


class Notified:
    """A UDP socket that answers NOTIFYs and records their zone names."""

    def __init__(self) -> None:
        self.sock = socket.socket(socket.AF_INET, socket.SOCK_DGRAM)
        self.sock.bind(("127.0.0.1", 0))
        self.sock.settimeout(0.2)
        self.port = self.sock.getsockname()[1]

    def drain(self, seconds: float = 3.0) -> set[str]:
        import time

        seen: set[str] = set()
        end = time.monotonic() + seconds
        while time.monotonic() < end:
            try:
                data, peer = self.sock.recvfrom(4096)
            except TimeoutError:
                continue
            m = dns.message.from_wire(data)
            seen.add(m.question[0].name.to_text())
            r = dns.message.make_response(m)
            self.sock.sendto(r.to_wire(), peer)
        return seen


@pytest.fixture
def lt() -> Iterator[LoopThread]:
    t = LoopThread()
    yield t
    t.close()


def start(lt: LoopThread, s: rpz.RpzSettings) -> tuple[RpzServer, RpzEnforcer, int]:
    srv = RpzServer(s)
    lt.run(srv.start())
    return srv, RpzEnforcer(srv), srv.addresses[0][1]


def axfr(port: int, zone: str) -> set[str]:
    z = dns.zone.from_xfr(dns.query.xfr("127.0.0.1", zone, port=port, timeout=5))
    return {n.to_text() for n, node in z.nodes.items() if node.get_rdataset(1, dns.rdatatype.CNAME)}


@pytest.fixture
def notified() -> Iterator[Notified]:
    n = Notified()
    yield n
    n.sock.close()


def test_zones_per_authority(tmp_path: Path, lt: LoopThread, notified: Notified) -> None:
    n = notified
    s = rpz.RpzSettings(listen=(("127.0.0.1", 0),), layout="authority", allow_loopback=False,
                        state_file=str(tmp_path / "state"), zone_file=str(tmp_path / "{zone}zone"),
                        zones=(rpz.ZoneOverride("Court A", allow_transfer=("127.0.0.0/8",),
                                                notify=(("127.0.0.1", n.port),)),))
    srv, enf, port = start(lt, s)
    try:
        a = lt.run(enf.apply(rules(("x.example", "a1"), ("y.example", "b1"), ("both.example", "a1"))))
        assert a.in_sync
        assert n.drain() == {A}  # only zone A has this NOTIFY target
        assert axfr(port, A) == {"x.example", "both.example"}
        # zone B inherits the global ACL: nothing but loopback was allowed, and loopback is off
        with pytest.raises(dns.xfr.TransferError):
            axfr(port, B)
        states = srv.zone_states()
        assert set(states) == {"rpz.blockd.", A, B} and all(st[0] == 1 for st in states.values())
        assert (tmp_path / f"{B}zone").read_text().count("CNAME") == 1
    finally:
        lt.run(srv.aclose())

    # restart, same rules: every zone keeps its serial (no transfer needed anywhere)
    srv, enf, port = start(lt, s)
    try:
        lt.run(enf.apply(rules(("x.example", "a1"), ("y.example", "b1"), ("both.example", "a1"))))
        assert {z: st[0] for z, st in srv.zone_states().items()} == {"rpz.blockd.": 1, A: 1, B: 1}
        # Court B's last order ends: its zone stays, empty, under a new serial; A is untouched
        lt.run(enf.apply(rules(("x.example", "a1"), ("both.example", "a1"))))
        assert {z: st[0] for z, st in srv.zone_states().items()} == {"rpz.blockd.": 1, A: 1, B: 2}
        zb = srv.zone(B)
        assert zb is not None and zb.version is not None and zb.version.owners == frozenset()
        assert zb.journal.changed(1, 2) == ["y.example"]
        # IXFR of zone A from serial 1 is one SOA: up to date
        q = dns.message.make_query(A, "IXFR")
        q.authority.append(dns.rrset.from_text(A, 60, "IN", "SOA", "localhost. h. 1 3600 60 1209600 60"))
        r = dns.query.tcp(q, "127.0.0.1", 5, port=port)
        assert [rr.rdtype for rr in r.answer] == [dns.rdatatype.SOA]
        assert lt.run(enf.readback()).digest == rules(("x.example", "a1"), ("both.example", "a1")).digest
    finally:
        lt.run(srv.aclose())
    # the state file carries every zone
    assert set(rpz.load_state(s.state_file)["zones"]) == {"rpz.blockd.", A, B}  # type: ignore[arg-type]
