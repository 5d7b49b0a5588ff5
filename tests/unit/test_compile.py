"""compile: guards, unblock, allowlist, provenance, digests; interval algebra against netaddr."""

from __future__ import annotations

from datetime import datetime, timezone
from types import MappingProxyType

import netaddr
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from blockd import ranges
from blockd.compile import CompileSettings, Provenance, compile_policies, segment
from blockd.errors import PolicyError
from blockd.guards import Guards, Provider, SharedInfra, default_psl
from blockd.model import Catalog, RuleSet, Service, diff
from blockd.policy import parse_policy

NOW = datetime(2026, 11, 29, tzinfo=timezone.utc)
PSL = default_psl()
INFRA = SharedInfra.build((
    Provider("AWS", "test", (ranges.parse_cidr("52.0.0.0/10"), ranges.parse_cidr("2600:1f00::/24"))),
    Provider("Cloudflare", "test", (ranges.parse_cidr("104.16.0.0/13"),)),
))
CATALOG = Catalog(
    MappingProxyType({"tg": Service("tg", "Telegram", ("*.telegram.org", "t.me"), (ranges.parse_cidr("91.108.4.0/22"),), (62041,))}),
    MappingProxyType({62041: (ranges.parse_cidr("149.154.160.0/20"),)}),
)
SETTINGS = CompileSettings(Guards(PSL, INFRA))


def policy(*orders: str, issuer: str = "reg", serial: int = 1, window: tuple[str, str] = ("2026-11-01", "2030-01-01")):
    head = (f"issuer: {issuer}\nserial: {serial}\nissued_at: {window[0]}T00:00:00Z\n"
            f"not_before: {window[0]}T00:00:00Z\nnot_after: {window[1]}T00:00:00Z\norders:\n")
    return parse_policy((head + "".join(orders)).encode(), f"{issuer}-{serial}.yaml")


def order(oid: str, targets: str, action: str = "block", extra: str = "") -> str:
    return (f"  - id: {oid}\n    legal_basis: {{authority: Court, reference: {oid}}}\n    action: {action}\n"
            f"    targets: {targets}\n{extra}")


def compile_(*policies, settings=SETTINGS, previous=None):
    return compile_policies(list(policies), CATALOG, settings, NOW, previous=previous)


def v4(rs: RuleSet) -> list[tuple[str, list[str]]]:
    return [(f"{ranges.format_addr(4, a)}-{ranges.format_addr(4, b)}", sorted(o)) for a, b, o in rs.v4]


GUARD_CASES = [
    # target, guard that refuses it (None = passes)
    ('{domains: [com]}', "public_suffix"),
    ('{domains: ["*.co.uk"]}', "public_suffix"),
    ('{domains: ["*.github.io"]}', "public_suffix"),
    ('{domains: [foo.github.io]}', None),
    ('{domains: ["*.example.org"]}', None),
    ('{cidrs: [10.0.0.0/15]}', "min_prefix"),
    ('{cidrs: [10.0.0.0/16]}', None),
    ('{cidrs: ["2001:db8::/31"]}', "min_prefix"),
    ('{cidrs: ["2001:db8::/32"]}', None),
    ('{cidrs: [52.1.2.3/32]}', "shared_infra"),
    ('{cidrs: ["2600:1f00:1::/48"]}', "shared_infra"),
    ('{cidrs: [104.16.0.0/12]}', "min_prefix+shared_infra"),
    ('{cidrs: [52.128.0.0/16]}', None),
    # special-purpose ranges (RFC 6890): blocking them breaks the host, whatever list they came from
    ('{cidrs: [127.0.0.0/18]}', "shared_infra"),
    ('{cidrs: [169.254.10.0/24]}', "shared_infra"),
    ('{cidrs: [224.0.0.251/32]}', "shared_infra"),
    ('{cidrs: ["::1/128"]}', "shared_infra"),
    ('{cidrs: ["::ffff:127.0.0.1/128"]}', "shared_infra"),  # IPv4-mapped: enforced as IPv4
    ('{cidrs: ["fe80::/64"]}', "shared_infra"),
    ('{cidrs: [100.64.0.0/24]}', None),  # shared address space (RFC 6598) is an ISP's own to block
]


@pytest.mark.parametrize("targets, guard", GUARD_CASES, ids=[c[0] for c in GUARD_CASES])
def test_guards(targets: str, guard: str | None) -> None:
    comp = compile_(policy(order("o1", targets)))
    got = "+".join(sorted(f.guard for f in comp.findings))
    assert got == (guard or "")
    assert (len(comp.ruleset) == 0) == bool(guard)
    assert comp.orders["reg/o1"].status == ("refused" if guard else "enforced")


def test_allow_collateral_lets_a_named_rule_through_and_says_so() -> None:
    allow = "    allow_collateral: [{rule: 52.1.2.3/32, guard: shared_infra, reason: court weighed it}]\n"
    comp = compile_(policy(order("o1", "{cidrs: [52.1.2.3/32, 52.1.2.4/32]}", extra=allow)))
    assert [(f.rule, f.allowed) for f in comp.findings] == [("52.1.2.3/32", True), ("52.1.2.4/32", False)]
    assert "allowed: court weighed it" in comp.findings[0].reason
    assert v4(comp.ruleset) == [("52.1.2.3-52.1.2.3", ["reg/o1"])]
    assert comp.orders["reg/o1"].status == "partially_refused"


def test_services_and_asns_expand_with_provenance_in_findings() -> None:
    comp = compile_(policy(order("o1", "{services: [tg]}")))
    assert [(r.name, r.subtree) for r in comp.ruleset.domains] == [("t.me", False), ("telegram.org", True)]
    assert v4(comp.ruleset) == [("91.108.4.0-91.108.7.255", ["reg/o1"]), ("149.154.160.0-149.154.175.255", ["reg/o1"])]
    strict = CompileSettings(Guards(PSL, INFRA, min_prefix_v4=22))
    (finding,) = compile_(policy(order("o1", "{services: [tg]}")), settings=strict).findings
    assert finding.reason.endswith("(via AS62041)")


def test_unknown_service_and_asn_are_errors() -> None:
    with pytest.raises(PolicyError) as e:
        compile_(policy(order("o1", "{services: [tiktok], asns: [64512]}")))
    assert "unknown service 'tiktok'; known: tg" in str(e.value)
    assert "AS64512 has no prefixes" in str(e.value)


def test_provenance_splits_where_orders_overlap() -> None:
    comp = compile_(policy(order("a", "{cidrs: [10.0.0.0/24]}"), order("b", "{cidrs: [10.0.0.128/25, 10.0.1.0/24]}")))
    assert v4(comp.ruleset) == [
        ("10.0.0.0-10.0.0.127", ["reg/a"]),
        ("10.0.0.128-10.0.0.255", ["reg/a", "reg/b"]),
        ("10.0.1.0-10.0.1.255", ["reg/b"]),
    ]


def test_unblock_and_allowlist_split_ranges_and_remove_names() -> None:
    p = policy(
        order("a", '{cidrs: [10.0.0.0/16], domains: ["*.example.org", t.me, x.example.org]}'),
        order("u", '{cidrs: [10.0.1.2/32], domains: [t.me, a.example.org]}', action="unblock"),
    )
    settings = CompileSettings(Guards(PSL, INFRA), allow_cidrs=(ranges.parse_cidr("10.0.255.0/24"),))
    comp = compile_(p, settings=settings)
    assert v4(comp.ruleset) == [("10.0.0.0-10.0.1.1", ["reg/a"]), ("10.0.1.3-10.0.254.255", ["reg/a"])]
    assert [(r.name, r.subtree) for r in comp.ruleset.domains] == [("example.org", True), ("x.example.org", False)]
    assert comp.warnings == ("unblock order reg/u: a.example.org stays blocked: it lies under *.example.org, "
                             "blocked by reg/a",)
    sub = compile_(policy(order("a", '{domains: ["*.example.org", x.example.org]}'),
                          order("u", '{domains: ["*.example.org"]}', action="unblock")))
    assert sub.ruleset.domains == ()


def test_window_and_superseded() -> None:
    old = policy(order("o1", "{domains: [old.example]}"), serial=1)
    new = policy(order("o1", "{domains: [new.example]}"), serial=2)
    future = policy(order("f", "{domains: [f.example]}"), issuer="other", window=("2027-01-01", "2028-01-01"))
    comp = compile_(old, new, future)
    assert [r.name for r in comp.ruleset.domains] == ["new.example"]
    assert comp.orders["other/f"].status == "pending"
    assert dict(comp.policies) == {"reg-1.yaml": "superseded", "reg-2.yaml": "active", "other-1.yaml": "pending"}


def test_growth_guard_refuses_new_orders_not_old_ones() -> None:
    base = compile_(policy(order("a", "{cidrs: [" + ", ".join(f"10.0.{2 * i}.0/24" for i in range(10)) + "]}"))).ruleset
    settings = CompileSettings(Guards(PSL, INFRA), growth_factor=2.0, growth_floor=5)
    big = "{cidrs: [" + ", ".join(f"10.1.{i}.0/24" for i in range(30)) + "]}"
    comp = compile_(policy(order("a", "{cidrs: [10.0.0.0/24]}"), order("b", big)), settings=settings, previous=base)
    (f,) = comp.findings
    assert (f.order_id, f.guard, f.allowed) == ("reg/b", "growth", False)
    assert "the whole order is refused" in f.reason
    assert comp.orders["reg/b"].status == "refused" and comp.orders["reg/a"].status == "enforced"


def test_digest_is_canonical() -> None:
    a = compile_(policy(order("a", "{cidrs: [10.0.0.0/25, 10.0.0.128/25], domains: [b.example, a.example]}")))
    b = compile_(policy(order("z", "{cidrs: [10.0.0.0/24], domains: [a.example]}"),
                        order("y", "{domains: [b.example, a.example]}")))
    assert a.ruleset.digest == b.ruleset.digest  # same names and addresses, other provenance
    c = compile_(policy(order("a", "{cidrs: [10.0.0.0/24], domains: ['*.a.example', b.example]}")))
    assert c.ruleset.digest != a.ruleset.digest  # subtree is not exact
    plan = diff(a.ruleset, c.ruleset)
    assert plan.add_domains == (("a.example", True),) and plan.del_domains == (("a.example", False),)
    assert not plan.add_v4 and not plan.del_v4


# -- interval algebra, property-tested against netaddr ------------------------------------

cidr4 = st.builds(lambda net, plen: (net & ~((1 << (32 - plen)) - 1), plen),
                  st.integers(0, 2**32 - 1), st.integers(8, 32))


def _netaddr(cidrs) -> netaddr.IPSet:
    return netaddr.IPSet(netaddr.IPNetwork((n, p), version=4) for n, p in cidrs)


@settings(max_examples=300, deadline=None)
@given(st.lists(cidr4, max_size=30), st.lists(cidr4, max_size=10))
def test_merge_and_subtract_match_netaddr(keep, remove) -> None:
    def iv(cs):
        return ranges.merge((n, n | ((1 << (32 - p)) - 1)) for n, p in cs)

    result = ranges.subtract(iv(keep), iv(remove))
    expected = _netaddr(keep) - _netaddr(remove)
    cidrs = [netaddr.IPNetwork((n, p), version=4) for n, p in ranges.to_cidrs(4, result)]
    assert netaddr.IPSet(cidrs) == expected
    assert sorted(cidrs) == sorted(expected.iter_cidrs())  # the fewest prefixes, as netaddr finds
    assert all(a[1] + 1 < b[0] for a, b in zip(result, result[1:]))  # disjoint, non-adjacent


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(cidr4, st.sampled_from("abc")), max_size=30))
def test_segment_keeps_exact_provenance(entries) -> None:
    rules = segment([(n, n | ((1 << (32 - p)) - 1), k) for (n, p), k in entries], Provenance())
    for key in "abc":
        mine = [(n, p) for (n, p), k in entries if k == key]
        covered = netaddr.IPSet(netaddr.IPRange(a, b) for a, b, o in rules if key in o)
        assert covered == _netaddr(mine)
    assert all(a.last < b.first for a, b in zip(rules, rules[1:]))
    # the fewest pieces: two that touch never carry the same orders
    assert all(a.last + 1 < b.first or a.orders != b.orders for a, b in zip(rules, rules[1:]))


def test_public_suffix_sets_agree_with_publicsuffixlist() -> None:
    from publicsuffixlist import PublicSuffixList

    reference = PublicSuffixList()
    names = set(PSL.exact) | set(PSL.exception) | {f"x.{w}" for w in PSL.wildcard} | set(PSL.wildcard)
    names |= {f"a.{n}" for n in list(PSL.exact)[:3000]} | {"com", "t.me", "foo", "example.org", "www.ck"}
    for name in sorted(names):
        assert PSL.is_public(name) == reference.is_public(name), name
