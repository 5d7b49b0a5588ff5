"""Block page (RFC 7725): language choice, which orders a Host matches, the response, the settings."""

from __future__ import annotations

from datetime import datetime, timezone
from pathlib import Path

import pytest

from blockd.blockpage import BlockPageSettings, choose_language, find_orders, index, respond
from blockd.errors import ConfigError
from blockd.model import DomainRule, OrderInfo, RuleSet
from blockd.settings import load_settings

T = datetime(2026, 1, 1, tzinfo=timezone.utc)


def o(oid: str, answer: str | None) -> OrderInfo:
    return OrderInfo(oid, "reg", 1, f"Authority {oid}", f"ref-{oid}", f"https://a.example/{oid}", "block", answer,
                     None, T)


ORDERS = {"s1": o("s1", "sinkhole"), "s2": o("s2", "sinkhole"), "n1": o("n1", "nxdomain"), "d1": o("d1", None)}
RS = RuleSet.build([DomainRule("tree.example", True, frozenset({"s1"})),
                    DomainRule("a.tree.example", False, frozenset({"s2", "n1"})),
                    DomainRule("nx.example", True, frozenset({"n1"})),
                    DomainRule("default.example", False, frozenset({"d1"}))], orders=ORDERS)


@pytest.mark.parametrize("accept,want", [
    (None, "en"), ("", "en"), ("vi", "vi"), ("vi-VN,vi;q=0.9,en-US;q=0.8,en;q=0.7", "vi"),
    ("en-US,en;q=0.9,vi;q=0.8", "en"), ("fr;q=1, vi;q=0.1", "vi"), ("*", "en"), ("vi;q=0, en;q=0.1", "en"),
    ("vi;q=abc", "en"), ("de, fr", "en"),
])
def test_choose_language(accept: str | None, want: str) -> None:
    assert choose_language(accept, ("en", "vi")) == want


@pytest.mark.parametrize("host,want", [
    ("a.tree.example", ["s2", "s1"]),  # the exact rule first, then the subtree above it
    ("A.Tree.Example.", ["s2", "s1"]),
    ("x.a.tree.example", ["s1"]),  # the exact rule does not cover names below it
    ("tree.example", ["s1"]),
    ("nx.example", []),  # an NXDOMAIN order never sends browsers here
    ("default.example", []),  # default answer nxdomain
    ("other.example", []), ("", []),
])
def test_find_orders(host: str, want: list[str]) -> None:
    assert [i.id for i in find_orders(index(RS, "nxdomain"), host)] == want


def test_default_answer_sinkhole_counts() -> None:
    assert [i.id for i in find_orders(index(RS, "sinkhole"), "default.example")] == ["d1"]


def test_response() -> None:
    s = BlockPageSettings("https://isp.example/b", languages=("vi", "en"))
    out = respond(s, index(RS, "nxdomain"), b"GET / HTTP/1.1\r\nHost: a.tree.example:80\r\nAccept-Language: en")
    head, _, body = out.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 451 Unavailable For Legal Reasons\r\n")
    assert b'Link: <https://isp.example/b>; rel="blocked-by"' in head and b"Content-Language: en" in head
    assert b"Authority s2" in body and b"Further orders apply to this name: 1." in body
    assert f"Content-Length: {len(body)}".encode() in head
    html_inj = respond(s, index(RuleSet.build([DomainRule("x.example", False, frozenset({"s1"}))],
                                              orders={"s1": OrderInfo("s1", "r", 1, "<script>", "r", None, "block",
                                                                      "sinkhole", None, T)}), "nxdomain"),
                       b"GET / HTTP/1.1\r\nHost: x.example")
    assert b"<script>" not in html_inj and b"&lt;script&gt;" in html_inj
    assert respond(s, {}, b"garbage").startswith(b"HTTP/1.1 400 ")
    assert respond(s, {}, b"DELETE / HTTP/1.1\r\nHost: a").startswith(b"HTTP/1.1 405 ")


@pytest.mark.parametrize("kwargs,match", [
    ({"blocked_by": "isp.example"}, r"blocked_by: 'isp.example' is not an http\(s\) URL"),
    ({"blocked_by": "https://x", "languages": ("en", "fr")}, r"languages: \['fr'\] not available; available: en, vi"),
    ({"blocked_by": "https://x", "languages": ()}, r"languages: \[\] not available"),
])
def test_bad_settings(kwargs: dict[str, object], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        BlockPageSettings(**kwargs)  # type: ignore[arg-type]


def test_settings_from_yaml(tmp_path: Path) -> None:
    p = tmp_path / "blockd.yaml"
    p.write_text("trust_store: t\npolicy_dir: p\ncatalog_dir: c\nstate_dir: s\nblock_page:\n"
                 "  blocked_by: https://isp.example/blocking\n  listen: ['192.0.2.1:80']\n  languages: [vi, en]\n")
    bp = load_settings(p).block_page
    assert bp == BlockPageSettings("https://isp.example/blocking", (("192.0.2.1", 80),), ("vi", "en"))
    p.write_text(p.read_text().replace("[vi, en]", "[vi, klingon]"))
    with pytest.raises(ConfigError, match=r"block_page: languages: \['klingon'\] not available"):
        load_settings(p)
