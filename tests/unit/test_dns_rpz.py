"""RPZ zone rendering, IP triggers, IXFR journal, serial, zone file; parsed back with dnspython."""

import dns.zone
import pytest

from blockd.dns import rpz
from blockd.model import DomainRule, NetRule, RuleSet

O = frozenset({"o1"})


def rs(*names: str, v4: tuple[tuple[int, int], ...] = ()) -> RuleSet:
    doms = [DomainRule(n[2:], True, O) if n.startswith("*.") else DomainRule(n, False, O) for n in names]
    return RuleSet.build(doms, [NetRule(a, b, O) for a, b in v4])


@pytest.mark.parametrize(
    "version, net, plen, owner",
    [
        (4, 0x0A000000, 16, "16.0.0.0.10.rpz-ip"),
        (4, 0xC0000201, 32, "32.1.2.0.192.rpz-ip"),
        (6, 0x20010DB8 << 96, 32, "32.zz.db8.2001.rpz-ip"),
        (6, (0x20010DB8 << 96) | 1, 128, "128.1.zz.db8.2001.rpz-ip"),
    ],
)
def test_ip_trigger_roundtrip(version: int, net: int, plen: int, owner: str) -> None:
    assert rpz.ip_trigger(version, net, plen) == owner
    bits = 32 if version == 4 else 128
    assert rpz.parse_ip_trigger(owner) == (version, net, net | ((1 << (bits - plen)) - 1))


def test_owners_subtree_has_apex_and_wildcard() -> None:
    assert rpz.owners(rs("a.example", "*.b.example"), False) == {"a.example", "b.example", "*.b.example"}


def test_readback_from_owners_digest() -> None:
    want = rs("a.example", "*.b.example", v4=((0x0A000000, 0x0A0000FF),))
    back = rpz.ruleset_from_owners(rpz.owners(want, True))
    assert back.digest == want.digest


def test_zone_file_parses_with_dnspython(tmp_path) -> None:  # type: ignore[no-untyped-def]
    s = rpz.RpzSettings(zone="rpz.example.", ip_triggers=True)
    want = rs("a.example", "*.b.example", v4=((0x0A000000, 0x0A0000FF),))
    v = rpz.ZoneVersion(s, 7, rpz.owners(want, True), want)
    path = tmp_path / "z"
    rpz.atomic_write(str(path), rpz.zone_text(s, v))
    z = dns.zone.from_file(str(path), origin="rpz.example.", relativize=True)
    names = {n.to_text() for n in z.nodes} - {"@"}
    assert names == {"a.example", "b.example", "*.b.example", "24.0.0.0.10.rpz-ip"}
    assert z.get_soa().serial == 7
    assert "; orders=o1" in path.read_text()


def _msg_rrs(bodies: list[tuple[int, bytes]]) -> list[str]:
    import dns.message

    out = []
    for count, body in bodies:
        wire_ = b"\x00\x01\x84\x00" + bytes((0, 1, count >> 8, count & 255, 0, 0, 0, 0)) + \
            b"\x03rpz\x07example\x00\x00\xfc\x00\x01" + body
        m = dns.message.from_wire(wire_, one_rr_per_rrset=True)
        out += [f"{r.name.relativize(dns.name.from_text('rpz.example.'))} {r.rdtype.name}" for r in m.answer]
    return out


import dns.name  # noqa: E402


def test_axfr_and_ixfr_bodies() -> None:
    s = rpz.RpzSettings(zone="rpz.example.")
    j = rpz.Journal(4)
    v1 = rpz.ZoneVersion(s, 1, rpz.owners(rs("a.example", "b.example"), False), rs())
    v2 = rpz.ZoneVersion(s, 2, rpz.owners(rs("a.example", "*.c.example"), False), rs())
    v3 = rpz.ZoneVersion(s, 3, rpz.owners(rs("*.c.example"), False), rs())
    j.record(v1, v2)
    j.record(v2, v3)
    assert _msg_rrs(v1.axfr_bodies()) == ["@ SOA", "@ NS", "a.example CNAME", "b.example CNAME", "@ SOA"]
    assert _msg_rrs(j.ixfr_bodies(s, 1, v3)) == [  # type: ignore[arg-type]
        "@ SOA", "@ SOA", "b.example CNAME", "@ SOA", "*.c.example CNAME", "c.example CNAME",
        "@ SOA", "a.example CNAME", "@ SOA", "@ SOA",
    ]
    assert j.ixfr_bodies(s, 99, v3) is None  # cannot bridge: caller falls back to AXFR


def test_chunking_and_serial_wrap() -> None:
    bodies = rpz.chunk([b"x" * 1000] * 200)
    assert sum(c for c, _ in bodies) == 200 and all(len(b) <= rpz.MAX_MESSAGE for _, b in bodies)
    assert rpz.next_serial(0xFFFFFFFF) == 1 and rpz.next_serial(5) == 6


def test_state_roundtrip(tmp_path) -> None:  # type: ignore[no-untyped-def]
    p = str(tmp_path / "state.json")
    assert rpz.load_state(p) == {}
    rpz.save_state(p, 42, "abc")
    assert rpz.load_state(p) == {"serial": 42, "digest": "abc"}
