"""Policy intake: hostile YAML, schema errors (what, where, bad value, what is valid), time window."""

from __future__ import annotations

from datetime import datetime, timezone

import pytest

from blockd import strictyaml
from blockd.errors import ExpiredError, InputError, NotYetValidError, PolicyError
from blockd.policy import check_window, parse_policy

GOOD = """\
issuer: reg
serial: 7
issued_at: 2026-11-01T00:00:00Z
not_before: 2026-11-01T00:00:00Z
not_after: 2027-11-01T00:00:00+03:00
orders:
  - id: o-1
    legal_basis: {authority: Court, reference: "2-1/26", url: "https://example.org/x"}
    action: block
    deadline: 2026-11-02T00:00:00Z
    dns_answer: refused
    targets:
      services: [telegram]
      domains: ["*.Example.ORG.", "bücher.de", t.me]
      cidrs: [91.108.4.0/22, "2001:b28:f23c::/47", 192.0.2.7]
      asns: [62041, AS59930]
    allow_collateral:
      - {rule: "91.108.4.0/22", guard: shared_infra, reason: "own range"}
"""


def test_good_policy_is_normalised() -> None:
    p = parse_policy(GOOD.encode(), "p.yaml")
    o = p.orders[0]
    assert (p.issuer, p.serial, len(p.orders)) == ("reg", 7, 1)
    assert p.not_after == datetime(2027, 10, 31, 21, 0, tzinfo=timezone.utc)
    assert o.targets.domains == ("*.example.org", "xn--bcher-kva.de", "t.me")
    assert [str(c) for c in o.targets.cidrs] == ["91.108.4.0/22", "2001:b28:f23c::/47", "192.0.2.7/32"]
    assert o.targets.asns == (62041, 59930)
    assert o.dns_answer == "refused"
    assert o.allow_collateral[0].rule == "91.108.4.0/22"


def test_digest_is_of_the_exact_bytes() -> None:
    a = parse_policy(GOOD.encode(), "p.yaml")
    b = parse_policy(GOOD.replace("serial: 7", "serial:  7").encode(), "p.yaml")
    assert a.digest != b.digest


BAD = [
    # (replace this, with that, error must match)
    ("serial: 7", "serial: seven", r"p\.yaml:2: serial: expected an integer; got 'seven'"),
    ("serial: 7", "serial: 0", r"serial: 0 is below the minimum 1"),
    ("issuer: reg", "issuer: Reg Office", r"issuer: bad value 'Reg Office'; expected an issuer name"),
    ("not_before: 2026-11-01T00:00:00Z", "not_before: 2026-11-01", r"not_before: time '2026-11-01' has no time zone"),
    ("not_after: 2027-11-01T00:00:00+03:00", "not_after: 2026-10-01T00:00:00Z", r"not_after: .* is not after not_before"),
    ("action: block", "action: ban", r"orders\[0\]\.action: bad value 'ban'; expected one of block, unblock"),
    ("t.me]", "t..me]", r"orders\[0\]\.targets\.domains\[2\]: 't\.\.me': bad label ''"),
    ("t.me]", "ex*ample.org]", r"'\*' is only allowed as the whole first label"),
    ("192.0.2.7]", "192.0.2.7/24]", r"cidrs\[2\]: '192\.0\.2\.7/24': host bits set .* the network is 192\.0\.2\.0/24"),
    ("192.0.2.7]", "300.1.1.1]", r"not an IPv4 address: '300\.1\.1\.1'"),
    ("192.0.2.7]", "10.0.0.0/33]", r"prefix length '33' is not an integer in 0\.\.32"),
    ("AS59930]", "AS0]", r"asns\[1\]: 'AS0': expected an AS number"),
    ("    action: block", "    action: block\n    colour: red", r"orders\[0\]\.colour: unknown key 'colour'; valid keys: "),
    ("guard: shared_infra", "guard: luck", r"guard: bad value 'luck'; expected one of public_suffix, min_prefix"),
    ("dns_answer: refused", "dns_answer: teapot", r"dns_answer: bad value 'teapot'; expected one of nxdomain"),
    ("services: [telegram]", "services: [Tele Gram]", r"services\[0\]: bad value 'Tele Gram'"),
    ("issuer: reg\n", "", r"missing required key 'issuer'"),
    ("serial: 7", "serial: 7\nserial: 8", r"p\.yaml:3: duplicate key 'serial' \(first at line 2\)"),
]


@pytest.mark.parametrize("old, new, match", BAD, ids=[b[2][:40] for b in BAD])
def test_schema_errors_say_what_where_and_what_is_valid(old: str, new: str, match: str) -> None:
    assert old in GOOD
    with pytest.raises(PolicyError, match=match):
        parse_policy(GOOD.replace(old, new, 1).encode(), "p.yaml")


def test_all_problems_are_reported_together() -> None:
    text = GOOD.replace("serial: 7", "serial: x").replace("action: block", "action: ban")
    with pytest.raises(PolicyError) as e:
        parse_policy(text.encode(), "p.yaml")
    assert "2 problem(s)" in str(e.value)
    assert "serial" in str(e.value) and "action" in str(e.value)


def test_order_without_targets_and_duplicate_ids() -> None:
    order = "  - {id: a, legal_basis: {authority: C, reference: R}, action: block, targets: {}}\n"
    text = GOOD.split("orders:")[0] + "orders:\n" + order + order
    with pytest.raises(PolicyError) as e:
        parse_policy(text.encode(), "p.yaml")
    assert "no targets" in str(e.value) and "duplicate order id 'a'" in str(e.value)


HOSTILE = [
    ("billion laughs", b"a: &a [x,x,x,x,x,x,x,x]\nb: &b [*a,*a,*a,*a,*a,*a,*a,*a]\nc: [*b,*b,*b,*b,*b,*b,*b,*b]\n",
     "anchor &a is not allowed"),
    ("alias", b"a: *x\n", "alias|undefined"),
    ("deep flow nesting", b"[" * 100_000 + b"]" * 100_000, "nesting deeper than 32 levels"),
    ("deep block nesting", b"".join(b" " * i + b"a:\n" for i in range(2000)), "nesting deeper than 32 levels"),
    ("not utf-8", b"issuer: caf\xe9\n", r"p\.yaml:1: not UTF-8: byte b'\\xe9' at offset 11"),
    ("python tag", b"a: !!python/object/apply:os.system [echo]\n", "tag .* is not allowed"),
    ("two documents", b"a: 1\n---\na: 2\n", "more than one YAML document"),
    ("broken yaml", b"a: [1\n", "invalid YAML"),
    ("duplicate key", b"a: 1\nb: 2\na: 3\n", "duplicate key 'a'"),
    ("complex key", b"? [a]\n: 1\n", "mapping keys must be plain strings"),
]


@pytest.mark.parametrize("name, data, match", HOSTILE, ids=[h[0] for h in HOSTILE])
def test_hostile_yaml_is_refused_quickly(name: str, data: bytes, match: str) -> None:
    with pytest.raises(InputError, match=match):
        strictyaml.load(data, "p.yaml")


def test_size_limit_is_checked_before_parsing() -> None:
    with pytest.raises(InputError, match="file is 2049 bytes; the limit is 2048 bytes"):
        strictyaml.load(b"a" * 2049, "p.yaml", max_bytes=2048)


def test_node_limit() -> None:
    with pytest.raises(InputError, match="more than 100 YAML nodes"):
        strictyaml.load(b"[" + b"1," * 200 + b"1]", "p.yaml", max_nodes=100)


def test_hostile_policy_surfaces_as_policy_error() -> None:
    with pytest.raises(PolicyError, match="anchor"):
        parse_policy(b"issuer: &x a\n", "p.yaml")


@pytest.mark.parametrize(
    "now, error, match",
    [
        ("2026-10-31T23:00:00Z", NotYetValidError, r"not valid yet: not_before is 2026-11-01T00:00:00Z, 1h 0m after now"),
        ("2027-12-01T00:00:00Z", ExpiredError, r"expired: not_after was 2027-10-31T21:00:00Z, 30d 3h 0m before now"),
    ],
)
def test_time_window(now: str, error: type, match: str) -> None:
    p = parse_policy(GOOD.encode(), "p.yaml")
    with pytest.raises(error, match=match):
        check_window(p, datetime.fromisoformat(now))
    check_window(p, datetime(2026, 12, 1, tzinfo=timezone.utc))
