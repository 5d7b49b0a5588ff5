"""Pure parts of the kernel enforcers: shard cutting, element packing and parsing, set sizing."""

from __future__ import annotations

from collections.abc import Callable

import pytest
from hypothesis import given
from hypothesis import strategies as st

from blockd.enforcers import netlink as nl
from blockd.enforcers.ipset import IpsetSettings, cidr_held, cidr_keys, pack_entries, parse_entries
from blockd.enforcers.nft import FAMILY, NftSettings, piece_held, piece_keys, shard, split_key
from blockd.errors import ConfigError
from blockd.model import NetRule, RuleSet
from blockd.ranges import merge, to_cidrs

intervals4 = st.lists(st.tuples(st.integers(0, 2**32 - 1), st.integers(0, 2**20)), max_size=60).map(
    lambda xs: merge((a, min(a + n, 2**32 - 1)) for a, n in xs))
intervals6 = st.lists(st.tuples(st.integers(0, 2**128 - 1), st.integers(0, 2**118)), max_size=40).map(
    lambda xs: merge((a, min(a + n, 2**128 - 1)) for a, n in xs))


def _as_dump(payload: bytes) -> memoryview:
    """What the kernel would send: the element list inside NFTA_SET_ELEM_LIST_ELEMENTS."""
    return memoryview(nl.attr(3, payload))


@given(st.sampled_from([4, 6]).flatmap(lambda v: st.tuples(st.just(v), intervals4 if v == 4 else intervals6)))
def test_pieces_pack_parse_roundtrip(case: tuple[int, list[tuple[int, int]]]) -> None:
    version, ivs = case
    cut = sorted(split_key(version, k) for k in piece_keys(version, [(a, b, None) for a, b in ivs]))
    assert merge(cut) == ivs
    by_shard: dict[int, list[tuple[int, int]]] = {}
    for first, last in cut:
        assert shard(version, first) == shard(version, last)
        by_shard.setdefault(shard(version, first), []).append((first, last))
    back = [iv for items in by_shard.values() for iv in nl.parse_intervals(FAMILY[version][0], [_as_dump(nl.pack_intervals(FAMILY[version][0], items))])]
    assert merge(back) == ivs


def test_shard_spreads_v6_allocations() -> None:
    assert [shard(6, p << 112) for p in (0x2A00, 0x2A10, 0x2400, 0x2600)] == [0xA0, 0xA1, 0x40, 0x60]
    assert shard(4, 0x0A000001) == 0x0A


def test_ipset_entries_roundtrip() -> None:
    cidrs = [(0x0A000000, 8), (0xC0000201, 32), (0, 1)]
    assert list(parse_entries(4, memoryview(pack_entries(4, cidrs)))) == cidrs
    v6 = [(0x2A01 << 112, 48), ((1 << 128) - 1, 128)]
    assert list(parse_entries(6, memoryview(pack_entries(6, v6)))) == v6


def test_ipset_maxelem_grows_with_the_rule_count() -> None:
    s = IpsetSettings()
    assert s.maxelem(10) == 65536 and s.maxelem(1_000_000) == 2**21


@given(intervals4)
def test_cidr_keys_equal_ranges_to_cidrs(ivs: list[tuple[int, int]]) -> None:
    keys = cidr_keys(4, [(a, b, None) for a, b in ivs])
    assert sorted((k >> 8, k & 0xFF) for k in keys) == sorted(to_cidrs(4, ivs))


@pytest.mark.parametrize(("make", "message"), [
    (lambda: NftSettings(hooks=("forwrd",)), r"nft.hooks: \['forwrd'\] invalid; known: prerouting, input"),
    (lambda: NftSettings(verdict="deny"), r"nft.verdict: 'deny' invalid; known: drop, reject, log"),
    (lambda: IpsetSettings(prefix="x" * 30), r"ipset.prefix: 'x{30}' must be 1-26 characters"),
])
def test_settings_say_what_is_valid(make: Callable[[], object], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        make()


def test_ipset_holds_everything_as_two_halves() -> None:
    assert sorted(cidr_keys(4, [(0, 2**32 - 1, None)])) == [1, (2**31) << 8 | 1]


def _touching_rules(ivs: list[tuple[int, int]], cuts: list[int]) -> list[NetRule]:
    """Disjoint union intervals as rules, some cut into touching pieces (of other orders: the
    kernel holds one interval where blockd has several rules)."""
    rules = []
    for i, (a, b) in enumerate(ivs):
        cut = a + cuts[i % len(cuts)] % (b - a + 1) if cuts else a
        if a < cut <= b:
            rules += [NetRule(a, cut - 1, frozenset({"x/1"})), NetRule(cut, b, frozenset({"x/2"}))]
        else:
            rules.append(NetRule(a, b, frozenset({"x/1"})))
    return rules


@pytest.mark.parametrize("keys_of, holds", [(piece_keys, piece_held), (cidr_keys, cidr_held)],
                         ids=["nft pieces", "ipset cidrs"])
@given(st.sampled_from([4, 6]).flatmap(lambda v: st.tuples(st.just(v), intervals4 if v == 4 else intervals6,
                                                          intervals4 if v == 4 else intervals6,
                                                          st.lists(st.integers(0, 2**20), max_size=5))))
def test_a_key_is_held_exactly_when_the_rules_make_it(
        keys_of: Callable[..., set[int]], holds: Callable[..., bool],
        case: tuple[int, list[tuple[int, int]], list[tuple[int, int]], list[int]]) -> None:
    """What ProvenKeys answers from the rules (no set of a million keys) is what the set of their
    keys would: every key they make is held, and no key of other intervals that they do not make."""
    version, ivs, others, cuts = case
    if version == 6:
        others = [(a >> 10, b >> 10) for a, b in others]  # some within reach of the rules too
    rules = _touching_rules(ivs, cuts)
    made = keys_of(version, rules)
    assert all(holds(version, rules, k) for k in made)
    strangers = keys_of(version, _touching_rules(others, cuts)) | {k + 1 for k in made} | {k - 1 for k in made if k}
    for rule in rules:  # each rule's keys as if it stood alone: not held where it touches another
        strangers |= keys_of(version, [rule])
    assert all(holds(version, rules, k) == (k in made) for k in strangers)
    proven = nl.ProvenKeys(RuleSet.build(v4=rules) if version == 4 else RuleSet.build(v6=rules), version,
                           len(made), keys_of, holds)
    assert proven == made and len(proven) == len(made) and set(proven) == made
    assert made - proven == set() and proven - set() == made and set(made) <= proven  # type: ignore[operator]
