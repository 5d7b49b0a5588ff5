"""Wire fast path: parse, blocked answers, error answers; checked with dnslib and dnspython."""

import struct
from datetime import datetime, timezone

import dns.edns
import dns.message
import dns.rcode
import dns.rdatatype
import dns.rrset
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


# ---- issue 12: junk allocates nothing kept; EDE text cap; chains; reply checks ---------------
JUNK = [b"", b"\x00" * 5, b"\xff" * 40, q("x.com")[:5] + b"\x80", q("x.com")[:2] + b"\x28" + q("x.com")[3:],
        q("x.com")[:4] + b"\x00\x02" + q("x.com")[6:], q("www.example.com")[:20]]


def test_rejected_packets_keep_no_memory() -> None:
    import tracemalloc

    srv = SinkholeServer(SinkholeSettings(listen=()), Table.build(RS, AnswerSettings()))
    for data in JUNK:  # warm up: memos, counters
        srv.answer(data, "127.0.0.1", False)
    tracemalloc.start()
    try:
        before = tracemalloc.get_traced_memory()[0]
        for _ in range(5000):
            for data in JUNK:
                wire.parse(data)
                srv.answer(data, "127.0.0.1", False)
        grown = tracemalloc.get_traced_memory()[0] - before
    finally:
        tracemalloc.stop()
    assert grown < 16 << 10, f"{grown} bytes kept after {5000 * len(JUNK)} rejected packets"


def test_ede_text_order_first_capped_with_mark() -> None:
    from blockd.dns.table import ede_text

    t = datetime(2026, 1, 1, tzinfo=timezone.utc)
    info = OrderInfo("o-77", "issuer", 1, "Суд " * 200, "ref-1", "https://example.org/x", "block", None, None, t)
    text = ede_text("o-77", info, 3)
    raw = text.encode("utf-8")
    assert text.startswith("Blocked by order o-77 of Суд")
    assert len(raw) <= wire.EDE_TEXT_MAX and text.endswith(wire.CUT_MARK)
    opt = wire.ede_option(16, text)
    assert opt[6:].decode("utf-8") == text  # sent as built, never cut again
    short = ede_text("o-1", order("o-1"), 0)
    assert short == "Blocked by order o-1 of Example Court (ref-o-1), see https://example.org/x"
    assert not short.endswith(wire.CUT_MARK)


@pytest.mark.parametrize("text, limit, want", [
    ("abc", 3, "abc"),
    ("abcd", 3, "\u2026"),
    ("abcdefgh", 6, "abc\u2026"),
    ("ééé", 6, "ééé"),
    ("éééé", 7, "éé\u2026"),  # 2+2+3: never half a character
    ("a\x00b", 400, "ab"),
])
def test_cap_text(text: str, limit: int, want: str) -> None:
    assert wire.cap_text(text, limit) == want


def test_chain_targets_and_read_name() -> None:
    m = dns.message.make_response(dns.message.make_query("cloak.example", "A"))
    m.answer.append(dns.rrset.from_text("cloak.example.", 60, "IN", "CNAME", "Web.Telegram.ORG."))
    m.answer.append(dns.rrset.from_text("web.telegram.org.", 60, "IN", "A", "192.0.2.1"))
    m.answer.append(dns.rrset.from_text("x.example.", 60, "IN", "DNAME", "telegram.org."))
    targets = wire.chain_targets(m.to_wire())
    assert targets == [(wire.name_to_wire("web.telegram.org"), [0, 4, 13]),
                       (wire.name_to_wire("telegram.org"), [0, 9])]
    loop = b"\x00" * 12 + b"\xc0\x0c"
    assert wire.read_name(loop, 12) is None  # a pointer to itself
    assert wire.chain_targets(m.to_wire()[:-3]) is None


def test_mix_case_and_check_reply() -> None:
    from blockd.dns.forward import check_reply, mix_case

    name = wire.name_to_wire("abcdefghijklmnopqrstuvwxyz.example")
    mixed = {mix_case(name) for _ in range(20)}
    assert all(m.lower() == name for m in mixed) and len(mixed) > 15
    assert mix_case(b"\x03\x40\x5b\x7b\x00") == b"\x03\x40\x5b\x7b\x00"  # only letters change
    qid = b"\x12\x34"
    question = mix_case(name) + b"\x00\x01\x00\x01"
    ok = qid + b"\x81\x80\x00\x01\x00\x00\x00\x00\x00\x00" + question
    cases = [(ok, None), (b"\x99\x99" + ok[2:], "id"), (ok[:2] + b"\x01\x00" + ok[4:], "malformed"),
             (ok[:12] + question.lower() + b"", "question" if question != question.lower() else None),
             (ok[:20], "malformed"), (ok[:4] + b"\x00\x02" + ok[6:], "malformed")]
    for reply, want in cases:
        assert check_reply(reply, qid, question, True) == want
    assert check_reply(ok[:12] + question.lower(), qid, question, False) is None  # 0x20 off


@pytest.mark.parametrize("host, key", [
    ("192.0.2.7", "192.0.2.7"), ("::ffff:192.0.2.7", "192.0.2.7"),
    ("2001:db8:1:2:aaaa::1", "2001:db8:1:2::/64"), ("2001:db8:1:2:bbbb::9", "2001:db8:1:2::/64"),
])
def test_tcp_source_key(host: str, key: str) -> None:
    from blockd.dns.tcp import source_key

    assert source_key(host) == key
