"""Structured DNS errors (draft-ietf-dnsop-structured-dns-error-22): the SDE option in the query,
the settings the draft allows, and the exact EDE option on the wire (parsed back with dnspython)."""

from __future__ import annotations

import json
import struct
from datetime import datetime, timezone

import dns.edns
import dns.flags
import dns.message
import dns.rcode
import pytest

from blockd.dns import sde, wire
from blockd.dns.server import SinkholeServer, SinkholeSettings
from blockd.dns.table import Table
from blockd.model import DomainRule, OrderInfo, RuleSet

CODE = 65001  # the SDE option code the tests' clients send (the draft's is "TBD")
NEEDLE = sde.option_needle(CODE)
JUST = "Blocked by order nx of Example Court (2024/nx), see https://example.org/legal"


def query(options: list[dns.edns.Option] | None, edns: int = 0, name: str = "blocked.example",
          payload: int = 1232) -> bytes:
    m = dns.message.make_query(name, "A", use_edns=edns, options=options or [], payload=payload)
    return m.to_wire()


@pytest.mark.parametrize("options,edns,needle,want", [
    ([dns.edns.GenericOption(CODE, b"")], 0, NEEDLE, True),  # §5.4: the SDE option, OPTION-LENGTH 0
    ([dns.edns.GenericOption(CODE, b"xx")], 0, NEEDLE, True),  # non-zero length: data ignored, still the signal
    ([dns.edns.GenericOption(10, b"12345678"), dns.edns.GenericOption(CODE, b"")], 0, NEEDLE, True),
    ([dns.edns.GenericOption(CODE, b"")], 0, None, False),  # no option code configured: nobody signals
    ([dns.edns.GenericOption(CODE, b"")], 0, sde.option_needle(65002), False),  # another code
    ([dns.edns.EDEOption(dns.edns.EDECode.OTHER)], 0, NEEDLE, False),  # the -03..-19 signal is not one (§5.2)
    ([dns.edns.GenericOption(15, b"")], 0, NEEDLE, False),
    ([dns.edns.GenericOption(10, b"\xfd\xe9\xfd\xe9\x00\x00\x00\x00")], 0, NEEDLE, False),  # code bytes in data
    (None, 0, NEEDLE, False),
    (None, -1, NEEDLE, False),  # no EDNS at all
])
def test_wants(options: list[dns.edns.Option] | None, edns: int, needle: bytes | None, want: bool) -> None:
    data = query(options, edns)
    assert sde.wants(data, wire.parse(data), needle) is want


def test_wants_survives_truncated_opt() -> None:
    data = query([dns.edns.GenericOption(10, b"12345678"), dns.edns.GenericOption(CODE, b"")])
    q = wire.parse(data)
    assert sde.wants(data, q, NEEDLE)
    for cut in range(q.qend + 4, len(data)):
        assert sde.wants(data[:cut], q, NEEDLE) in (False, True)  # never raises


def test_extra_text_exact_form() -> None:
    """Minified, names in the draft's order (§8 example: c, j, s, o, l), absent members left out."""
    assert sde.extra_text(JUST, "ISP Example", ("tel:+84-24-1234-5678", "mailto:noc@isp.example"), 5, "vi", 15) == (
        '{"c":["tel:+84-24-1234-5678","mailto:noc@isp.example"],"j":"' + JUST + '","s":5,'
        '"o":"ISP Example","l":"vi"}')
    assert sde.extra_text("j") == '{"j":"j","l":"en"}'
    assert sde.extra_text("", "", ("mailto:a@b.example",)) == '{"c":["mailto:a@b.example"]}'  # no j/o: no l
    assert sde.extra_text("", "ISP") == '{"o":"ISP","l":"en"}'
    # §5.2: sub-errors MUST NOT accompany Censored (16); 0 is reserved, never sent
    assert "s" not in json.loads(sde.extra_text(JUST, sub_error=5, ede_code=16))
    assert "s" not in json.loads(sde.extra_text(JUST, sub_error=0, ede_code=15))
    assert json.loads(sde.extra_text(JUST, sub_error=1, ede_code=17))["s"] == 1


@pytest.mark.parametrize("justification", [
    "Bộ Thông tin và Truyền thông " * 40, '"\\' * 500, "x" * 1000, "\ud800 lone surrogate \ufffe\x00",
])
def test_extra_text_fits_and_stays_valid(justification: str) -> None:
    text = sde.extra_text(justification, "ISP", ("mailto:noc@isp.example",), 1, "en", 15)
    raw = text.encode("utf-8")  # I-JSON: encodable UTF-8 (no surrogates), within blockd's EXTRA-TEXT cap
    assert len(raw) <= sde.MAX_EXTRA
    doc = json.loads(raw)
    assert doc["o"] == "ISP" and doc["c"] == ["mailto:noc@isp.example"] and doc["s"] == 1 and doc["l"] == "en"
    assert doc["j"]  # never an empty string (§4)
    if len(justification.encode("utf-8", "surrogatepass")) > 300:
        assert doc["j"].endswith(wire.CUT_MARK) and len(raw) > sde.MAX_EXTRA - 8  # cut, not emptied


def test_extra_text_leaves_out_a_j_that_cannot_fit() -> None:
    doc = json.loads(sde.extra_text("x" * 1000, "o" * 380))
    assert doc == {"o": "o" * 380, "l": "en"}


@pytest.mark.parametrize("change,field", [
    ({"sde_contact": ("https://isp.example/blocking",)}, "sde_contact[0]"),  # not in the Contact URI registry
    ({"sde_contact": ("sips:bob@isp.example",)}, "sde_contact[0]"),  # removed after -22
    ({"sde_contact": ("mailto:noc@isp.example", "tel:12345")}, "sde_contact[1]"),  # not a global number
    ({"sde_contact": ("mailto:nobody",)}, "sde_contact[0]"),
    ({"sde_sub_error": 5}, "sde_sub_error"),  # with Censored (16): MUST NOT
    ({"sde_sub_error": 0, "ede_code": 15}, "sde_sub_error"),  # reserved
    ({"sde_sub_error": 7, "ede_code": 15}, "sde_sub_error"),  # not registered
    ({"sde_sub_error": 5, "ede_code": 17}, "sde_sub_error"),  # network operator policy: Blocked only
    ({"sde_language": "en_US"}, "sde_language"),
    ({"sde_language": ""}, "sde_language"),
    ({"sde_option_code": 15}, "sde_option_code"),  # EDE's own code
    ({"sde_option_code": 70000}, "sde_option_code"),
    ({"sde_organization": "ISP \ud800"}, "sde_organization"),
    ({"sde_organization": "O" * 350}, "sde_organization and sde_contact"),  # leaves no room for j
])
def test_settings_refuse_what_the_draft_does_not_allow(change: dict[str, object], field: str) -> None:
    with pytest.raises(ValueError) as e:
        SinkholeSettings(**{"sde_option_code": CODE, **change})  # type: ignore[arg-type]
    msg = str(e.value)
    assert msg.startswith(field) and ("valid" in msg or "forbids" in msg), msg


@pytest.mark.parametrize("change", [
    {}, {"sde_option_code": None}, {"sde_contact": ("tel:+84-24-1234-5678", "mailto:noc@isp.example?subject=blocked")},
    {"sde_sub_error": 6, "ede_code": 15}, {"sde_sub_error": 4, "ede_code": 17},
    {"sde_language": "vi-VN"}, {"sde_language": "zh-Hant-TW"}, {"sde_language": "i-klingon"},
    {"sde_contact": ("tel:1234;phone-context=+84-24",)},
])
def test_settings_accept(change: dict[str, object]) -> None:
    SinkholeSettings(**{"sde_option_code": CODE, **change})  # type: ignore[arg-type]


T0 = datetime(2026, 1, 1, tzinfo=timezone.utc)
RULES = RuleSet.build([DomainRule("blocked.example", True, frozenset({"nx"}))],
                      orders={"nx": OrderInfo("nx", "regulator", 1, "Example Court", "2024/nx",
                                              "https://example.org/legal", "block", None, None, T0)})


def server(**kw: object) -> SinkholeServer:
    s = SinkholeSettings(listen=(("127.0.0.1", 0),), udp_batch=False, sde_option_code=CODE,
                         sde_organization="ISP Example", sde_contact=("mailto:noc@isp.example",), **kw)  # type: ignore[arg-type]
    srv = SinkholeServer(s)
    srv.swap(Table.build(RULES, s.answers()))
    return srv


def ede_bytes(code: int, text: str) -> bytes:
    body = struct.pack("!H", code) + text.encode("utf-8")
    return struct.pack("!HH", 15, len(body)) + body


def test_answer_wire_form() -> None:
    """The EDE option of the answer, byte for byte, and as dnspython parses it: JSON for a client
    that sends the SDE option, plain text for one that does not (or sends the old INFO-CODE 0)."""
    srv = server()
    want = '{"c":["mailto:noc@isp.example"],"j":"' + JUST + '","o":"ISP Example","l":"en"}'
    for options, text in (([dns.edns.GenericOption(CODE, b"")], want), (None, JUST),
                          ([dns.edns.EDEOption(dns.edns.EDECode.OTHER)], JUST)):
        for tcp in (False, True):
            out = srv.answer(query(options), "127.0.0.1", tcp)
            assert isinstance(out, bytes)
            assert out.endswith(ede_bytes(16, text))  # the OPT's only option, last in the message
            r = dns.message.from_wire(out)
            (o,) = r.options
            assert isinstance(o, dns.edns.EDEOption) and o.code == dns.edns.EDECode.CENSORED and o.text == text
            assert r.rcode() == dns.rcode.NXDOMAIN


def test_udp_overflow_drops_j_and_o_first() -> None:
    """§5.2: over UDP, an answer the JSON would push past the client's payload size loses j and o
    first, then the EXTRA-TEXT; over TCP it keeps them."""
    long_name = ".".join(["a" * 60] * 3) + ".blocked.example"
    rules = RuleSet.build([DomainRule("blocked.example", True, frozenset({"nx"}))], orders={
        "nx": OrderInfo("nx", "regulator", 1, "Example Court " * 8, "2024/nx", "https://example.org/legal", "block",
                        None, None, T0)})
    for contact, sub, compact in ((("mailto:noc@isp.example",), None, '{"c":["mailto:noc@isp.example"]}'),
                                  ((), None, ""), (("mailto:noc@isp.example",), 6,
                                                   '{"c":["mailto:noc@isp.example"],"s":6}')):
        s = SinkholeSettings(listen=(("127.0.0.1", 0),), udp_batch=False, sde_option_code=CODE, ede_code=15,
                             sde_organization="ISP Example", sde_contact=contact, sde_sub_error=sub)
        srv = SinkholeServer(s)
        srv.swap(Table.build(rules, s.answers()))
        data = query([dns.edns.GenericOption(CODE, b"")], name=long_name, payload=512)
        udp, tcp = srv.answer(data, "127.0.0.1", False), srv.answer(data, "127.0.0.1", True)
        assert isinstance(udp, bytes) and isinstance(tcp, bytes)
        assert len(tcp) > 512 >= len(udp)
        assert udp.endswith(ede_bytes(15, compact)) and not dns.message.from_wire(udp).flags & dns.flags.TC
        (o,) = dns.message.from_wire(tcp).options
        assert isinstance(o, dns.edns.EDEOption) and json.loads(o.text or "")["o"] == "ISP Example"
        # a contact list too long for the compact form to fit: the EDE without EXTRA-TEXT, not TC=1
        if contact:
            s2 = SinkholeSettings(listen=(("127.0.0.1", 0),), udp_batch=False, sde_option_code=CODE, ede_code=15,
                                  sde_contact=tuple(f"mailto:noc-desk-{i}@isp.example" for i in range(8)))
            srv2 = SinkholeServer(s2)
            srv2.swap(Table.build(rules, s2.answers()))
            bare = srv2.answer(data, "127.0.0.1", False)
            assert isinstance(bare, bytes) and len(bare) <= 512 and bare.endswith(ede_bytes(15, ""))
            assert not dns.message.from_wire(bare).flags & dns.flags.TC
        # with room (payload 1232), UDP gets the full JSON
        full = srv.answer(query([dns.edns.GenericOption(CODE, b"")], name=long_name), "127.0.0.1", False)
        assert isinstance(full, bytes) and full[2:] == tcp[2:]  # the same answer but the id



def test_config_file(tmp_path) -> None:  # type: ignore[no-untyped-def]
    """The settings from blockd.yaml: typed, and a bad one refused with its path and what is valid."""
    from blockd.errors import ConfigError
    from blockd.settings import load_settings

    base = "trust_store: t\npolicy_dir: p\ncatalog_dir: c\nstate_dir: s\n"
    path = tmp_path / "blockd.yaml"
    path.write_text(base + 'enforcers:\n  dns:\n    sde_option_code: 65001\n    sde_organization: "ISP Example"\n'
                    '    sde_contact: ["mailto:noc@isp.example", "tel:+84-24-1234-5678"]\n    sde_language: vi\n')
    d = load_settings(path).enforcers.dns
    assert d is not None and d.sde_option_code == 65001 and d.sde_language == "vi"
    assert d.sde_contact == ("mailto:noc@isp.example", "tel:+84-24-1234-5678")
    path.write_text(base + 'enforcers:\n  dns: {sde_option_code: 65001, sde_contact: ["https://isp.example/x"],'
                    " sde_sub_error: 5}\n")
    with pytest.raises(ConfigError) as e:
        load_settings(path)
    msg = str(e.value)
    assert "enforcers.dns: sde_contact[0]: 'https://isp.example/x' has scheme 'https'; valid: tel:, mailto:" in msg
    assert "sde_sub_error: 5 (Network operator policy) does not apply to ede_code 16 (Censored)" in msg
