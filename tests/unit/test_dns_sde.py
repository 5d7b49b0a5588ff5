"""Structured DNS errors: the client's signal in the query's OPT, and the JSON that fits EXTRA-TEXT."""

from __future__ import annotations

import json

import dns.edns
import dns.message
import pytest

from blockd.dns import sde, wire


def query(options: list[dns.edns.Option] | None, edns: int = 0) -> bytes:
    m = dns.message.make_query("blocked.example", "A", use_edns=edns, options=options or [])
    return m.to_wire()


@pytest.mark.parametrize("options,edns,want", [
    ([dns.edns.EDEOption(dns.edns.EDECode.OTHER)], 0, True),  # the draft's signal: INFO-CODE 0, no text
    ([dns.edns.GenericOption(15, b"")], 0, True),  # OPTION-LENGTH 0 (earlier revisions)
    ([dns.edns.GenericOption(10, b"12345678"), dns.edns.EDEOption(dns.edns.EDECode.OTHER)], 0, True),
    ([dns.edns.EDEOption(dns.edns.EDECode.CENSORED)], 0, False),  # not the signal
    ([dns.edns.GenericOption(10, b"12345678")], 0, False),  # a cookie only
    (None, 0, False),
    (None, -1, False),  # no EDNS at all
])
def test_wants(options: list[dns.edns.Option] | None, edns: int, want: bool) -> None:
    data = query(options, edns)
    assert sde.wants(data, wire.parse(data)) is want


def test_wants_survives_truncated_opt() -> None:
    data = query([dns.edns.EDEOption(dns.edns.EDECode.OTHER)])
    q = wire.parse(data)
    for cut in range(q.qend + 4, len(data)):
        assert sde.wants(data[:cut], q) in (False, True)  # never raises


def test_extra_text_fields_and_limit() -> None:
    doc = json.loads(sde.extra_text("Blocked by X, order 1 (r)", "ISP Example", ("mailto:noc@isp.example",), 5))
    assert doc == {"j": "Blocked by X, order 1 (r)", "o": "ISP Example", "c": ["mailto:noc@isp.example"], "s": 5,
                   "l": "en"}
    assert json.loads(sde.extra_text("j")) == {"j": "j", "l": "en"}
    long = sde.extra_text("Bộ Thông tin và Truyền thông " * 40, "ISP", ("https://isp.example/contact",))
    assert len(long.encode("utf-8")) <= sde.MAX_EXTRA
    doc = json.loads(long)  # still valid JSON: the justification gave way
    assert doc["j"].endswith("…") and doc["o"] == "ISP"
