"""Lookup table: exact vs subtree, precedence, shadow mode, readback digest, forward cache."""

from datetime import datetime, timezone

import pytest

from blockd.dns import wire
from blockd.dns.forward import Cache
from blockd.dns.table import AnswerSettings, Table
from blockd.model import DomainRule, OrderInfo, RuleSet


def order(oid: str, answer: str | None = None) -> OrderInfo:
    t = datetime(2026, 1, 1, tzinfo=timezone.utc)
    return OrderInfo(oid, "issuer", 1, f"Authority {oid}", f"ref-{oid}", None, "block", answer, None, t)


def rules(*specs: tuple[str, bool, str]) -> list[DomainRule]:
    return [DomainRule(n, s, frozenset(o.split(","))) for n, s, o in specs]


def look(t: Table, name: str) -> tuple[str, str | None, str] | None:
    w = wire.name_to_wire(name.rstrip("."))
    labels, i = [], 0
    while w[i]:
        labels.append(i)
        i += w[i] + 1
    hit = t.lookup(w.lower(), labels)
    if hit is None:
        return None
    v, off = hit
    return v.mode, v.order, wire.wire_to_name(w[off:].lower())


RS = RuleSet.build(
    rules(
        ("exact.example", False, "e"),
        ("tree.example", True, "t"),
        ("www.tree.example", False, "sink"),
        ("shadow.example", True, "log"),
        ("x.shadow.example", False, "e"),
        ("log.tree.example", True, "log"),
        ("multi.example", True, "a2,a1,dr"),
        ("both.example", False, "e"),
        ("both.example", True, "t"),
    ),
    orders={"e": order("e"), "t": order("t", "nodata"), "sink": order("sink", "sinkhole"),
            "log": order("log", "log"), "dr": order("dr", "drop")},
)


@pytest.mark.parametrize(
    "name, expect",
    [
        ("exact.example", ("nxdomain", "e", "exact.example")),
        ("www.exact.example", None),  # exact rules do not cover children
        ("EXACT.Example", ("nxdomain", "e", "exact.example")),
        ("tree.example", ("nodata", "t", "tree.example")),  # our subtree includes the apex
        ("a.b.tree.example", ("nodata", "t", "tree.example")),
        ("www.tree.example", ("sinkhole", "sink", "www.tree.example")),  # most specific wins
        ("a.www.tree.example", ("nodata", "t", "tree.example")),  # the exact rule does not reach below
        ("shadow.example", ("log", "log", "shadow.example")),
        ("x.shadow.example", ("nxdomain", "e", "x.shadow.example")),
        ("y.log.tree.example", ("nodata", "t", "tree.example")),  # enforcing beats a more specific shadow rule
        ("multi.example", ("nxdomain", "a1", "multi.example")),  # mode rank, then smallest order id
        ("both.example", ("nxdomain", "e", "both.example")),
        ("c.both.example", ("nodata", "t", "both.example")),
        ("example", None),
        ("unrelated.org", None),
    ],
)
def test_lookup_precedence(name: str, expect: tuple[str, str, str] | None) -> None:
    assert look(Table.build(RS, AnswerSettings()), name) == expect


def test_override_answer_and_default() -> None:
    t = Table.build(RS, AnswerSettings(override_answer="log"))
    assert look(t, "exact.example") == ("log", "e", "exact.example")
    t = Table.build(RuleSet.build(rules(("a.example", False, "zz"))), AnswerSettings(default_answer="refused"))
    assert look(t, "a.example") == ("refused", "zz", "a.example")


def test_readback_digest_equals_compiled() -> None:
    t = Table.build(RS, AnswerSettings())
    back = t.to_ruleset()
    assert back.digest == RS.digest
    assert {(r.name, r.subtree) for r in back.domains} == {(r.name, r.subtree) for r in RS.domains}


def test_ede_text_names_authority_and_others() -> None:
    t = Table.build(RS, AnswerSettings())
    v = t.exact_verdict(wire.name_to_wire("multi.example")) or \
        t.subtree_verdict(wire.name_to_wire("multi.example"))
    assert v.text == "Blocked by order a1; +2 more order(s)"  # a1 has no OrderInfo here


def test_bad_settings_say_what_is_valid() -> None:
    with pytest.raises(ValueError, match="'censor' is not an answer mode; valid: nxdomain"):
        AnswerSettings(default_answer="censor")
    with pytest.raises(ValueError, match="ede_code: 18"):
        AnswerSettings(ede_code=18)


def _resp(ttl: int, rcode: int = 0) -> bytes:
    import dns.message
    import dns.rrset

    m = dns.message.make_response(dns.message.make_query("a.example", "A"))
    m.set_rcode(rcode)
    m.answer.append(dns.rrset.from_text("a.example.", ttl, "IN", "A", "192.0.2.1"))
    return m.to_wire()


def test_cache_counts_ttl_down_and_expires() -> None:
    c = Cache(2, 3600)
    c.put(b"k", _resp(100), 1000)
    import dns.message

    assert dns.message.from_wire(c.get(b"k", 1030).wire).answer[0].ttl == 70  # type: ignore[arg-type]
    assert c.get(b"k", 1100) is None
    c.put(b"s", _resp(100, 2), 0)  # SERVFAIL is never cached
    assert c.get(b"s", 1) is None
    for i in range(5):  # bounded
        c.put(bytes([i]), _resp(100), 0)
    assert len(c) == 2


def test_a_name_one_rule_names_keeps_its_one_set_of_orders_not_a_pair() -> None:
    """Memory at registry scale: a verdict index whose own and combined orders are the same
    set keeps that set (not an (own, combined) pair, 56 bytes a name); a name with both an
    exact and a subtree rule keeps the pair. Lookups, the dump and the reload agree either way."""
    t = Table.build(RS, AnswerSettings())
    items = t.specs.items  # type: ignore[union-attr]
    pairs = [s for s in items if type(s) is tuple]
    assert [tuple(sorted(x) for x in p) for p in pairs] == [(["e"], ["e", "t"])]  # both.example alone
    assert len(items) == len(pairs) + sum(1 for s in items if type(s) is not tuple)
    for i in range(len(items)):
        own, comb, _ = t.specs.get(i)
        assert own <= comb and (own == comb) == (type(items[i]) is not tuple)
