"""Wire fast path: parse, blocked answers, error answers; checked with dnslib and dnspython."""

import struct
from datetime import datetime, timezone

import dns.edns
import dns.message
import dns.rcode
import dns.rdatatype
import pytest
from dnslib import EDNS0, DNSRecord
from hypothesis import given, settings
from hypothesis import strategies as st

from blockd.dns import wire
from blockd.dns.server import SinkholeServer, SinkholeSettings
from blockd.dns.table import AnswerSettings, Table
from blockd.model import DomainRule, OrderInfo, RuleSet


def q(name: str, qtype: str = "A", edns: bool = True, **kw: object) -> bytes:
    m = dns.message.make_query(name, qtype, use_edns=0 if edns else False, **kw)
    return m.to_wire()


def order(oid: str, answer: str | None = None) -> OrderInfo:
    t = datetime(2026, 1, 1, tzinfo=timezone.utc)
    return OrderInfo(oid, "issuer", 1, "Example Court", f"ref-{oid}", "https://example.org/x", "block", answer, None, t)


@pytest.mark.parametrize(
    "name, labels",
    [("a.b.example.com", [0, 2, 4, 12]), (".", []), ("xn--bcher-kva.de", [0, 14])],
)
def test_parse_labels(name: str, labels: list[int]) -> None:
    p = wire.parse(q(name))
    assert p.labels == labels
    assert p.qtype == 1 and p.qclass == 1 and p.edns >= 512 and p.version == 0


def test_parse_no_edns_and_do_bit() -> None:
    assert wire.parse(q("x.com", edns=False)).edns == -1
    assert wire.parse(q("x.com", want_dnssec=True)).do is True


@pytest.mark.parametrize(
    "mutate, rcode",
    [
        (lambda d: d[:5], wire.DROP),  # too short
        (lambda d: d[:2] + bytes((d[2] | 0x80,)) + d[3:], wire.DROP),  # a response: never answered
        (lambda d: d[:2] + bytes((d[2] | 0x28,)) + d[3:], wire.NOTIMP),  # opcode 5 (UPDATE)
        (lambda d: d[:4] + b"\x00\x02" + d[6:], wire.FORMERR),  # QDCOUNT 2
        (lambda d: d[:12] + b"\xc0\x0c" + d[-15:], wire.FORMERR),  # compressed qname
        (lambda d: d[:20], wire.FORMERR),  # cut inside the question
        (lambda d: d[:-2], wire.FORMERR),  # cut inside QTYPE/QCLASS
        (lambda d: d[:10] + b"\x00\x01" + d[12:], wire.FORMERR),  # ARCOUNT 1, no record
        (lambda d: d[:10] + b"\x00\x01" + d[12:] + b"\xc0", wire.FORMERR),  # additional name cut
        (lambda d: d[:10] + b"\x00\x01" + d[12:] + b"\x00\x00\x29\x04\xd0\x00\x00\x00\x00\x00\x09", wire.FORMERR),
    ],
)
def test_parse_malformed(mutate, rcode) -> None:  # type: ignore[no-untyped-def]
    assert wire.parse(mutate(q("www.example.com", edns=False))) == rcode


def test_two_opt_records_is_formerr() -> None:
    r = DNSRecord.question("x.com")
    r.add_ar(EDNS0())
    r.add_ar(EDNS0())
    assert wire.parse(bytes(r.pack())) == wire.FORMERR


def test_name_wire_roundtrip() -> None:
    for n in ("example.com", "a.b.c.d", "xn--fa-hia.de"):
        assert wire.wire_to_name(wire.name_to_wire(n)) == n
    assert wire.name_to_wire("www.example.com") == b"\x03www\x07example\x03com\x00"


def test_ede_option_layout_and_utf8_cut() -> None:
    o = wire.ede_option(16, "é" * 300)
    code, ln, info = struct.unpack_from("!HHH", o)
    assert (code, info) == (15, 16) and ln == len(o) - 4
    o[6:].decode("utf-8")  # never cut inside a character


def _answer(rs: RuleSet, data: bytes, s: AnswerSettings | None = None) -> dns.message.Message:
    t = Table.build(rs, s or AnswerSettings(sinkhole_v4="192.0.2.80", sinkhole_v6="2001:db8::80"))
    p = wire.parse(data)
    hit = t.lookup(data[12 : p.qend].lower(), p.labels)
    assert hit is not None
    return dns.message.from_wire(t.answers.render(data, p, hit[1], hit[0]))


RS = RuleSet.build(
    [DomainRule("bad.example", True, frozenset({"o1"})), DomainRule("sink.example", False, frozenset({"o2"}))],
    orders={"o1": order("o1"), "o2": order("o2", "sinkhole")},
)


def test_nxdomain_answer_has_soa_ede_and_echoes_case() -> None:
    m = _answer(RS, q("WwW.Bad.Example"))
    assert m.rcode() == dns.rcode.NXDOMAIN
    assert str(m.question[0].name) == "WwW.Bad.Example."
    assert str(m.authority[0].name) == "Bad.Example." and m.authority[0].rdtype == dns.rdatatype.SOA
    assert not m.flags & dns.flags.AA and not m.flags & dns.flags.AD and m.flags & dns.flags.RA
    (ede,) = [o for o in m.options if o.otype == dns.edns.EDE]
    assert ede.code == 16 and "order o1" in ede.text and "Example Court" in ede.text and "ref-o1" in ede.text


def test_no_opt_without_edns() -> None:
    m = _answer(RS, q("bad.example", edns=False))
    assert m.edns == -1 and m.rcode() == dns.rcode.NXDOMAIN


@pytest.mark.parametrize("qtype, rdata", [("A", "192.0.2.80"), ("AAAA", "2001:db8::80"), ("MX", None)])
def test_sinkhole_answers(qtype: str, rdata: str | None) -> None:
    m = _answer(RS, q("sink.example", qtype))
    assert m.rcode() == dns.rcode.NOERROR
    if rdata is None:  # other types: NODATA with SOA
        assert not m.answer and m.authority
    else:
        assert m.answer[0][0].to_text() == rdata


def test_error_response_badvers() -> None:
    data = q("x.com")
    m = dns.message.from_wire(wire.error_response(data, 16, wire.parse(data)))
    assert m.rcode() == dns.rcode.BADVERS and m.edns == 0


@settings(max_examples=400, deadline=None)
@given(st.binary(max_size=300))
def test_server_never_raises_on_garbage(data: bytes) -> None:
    srv = SinkholeServer(SinkholeSettings(listen=()), Table.build(RS, AnswerSettings()))
    out = srv.answer(data, "127.0.0.1", False)
    assert out is None or isinstance(out, (bytes, wire.Query))


@settings(max_examples=200, deadline=None)
@given(st.binary(min_size=12, max_size=60))
def test_server_never_raises_on_mutated_queries(tail: bytes) -> None:
    srv = SinkholeServer(SinkholeSettings(listen=()), Table.build(RS, AnswerSettings()))
    base = q("www.bad.example")
    for data in (base[:12] + tail, base[: len(base) // 2] + tail, base + tail):
        srv.answer(data, "127.0.0.1", False)
