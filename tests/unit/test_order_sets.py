"""A rule's orders: a `One` where one order names it (a registry's million rules), a frozenset
where several do. A One is a set of one key in every way a caller can tell: equal to and
hashing as the frozenset, the same answers to every set operation, a dict key interchangeable
with it; and a fifth of its size, which is what issue 14's memory goal needs of it."""

from __future__ import annotations

import operator
import sys

import pytest
from hypothesis import given
from hypothesis import strategies as st

from blockd.compile import Provenance, segment
from blockd.model import One

KEYS = st.sampled_from(["a/1", "a/2", "b/1", "b/9"])
SETS = st.frozensets(KEYS, max_size=4)
BINARY = [operator.or_, operator.and_, operator.sub, operator.xor,
          operator.eq, operator.ne, operator.le, operator.lt, operator.ge, operator.gt]


@given(KEYS, SETS)
def test_a_one_answers_every_operation_as_the_frozenset_of_its_key(key: str, other: frozenset[str]) -> None:
    one, ref = One((key,)), frozenset((key,))
    for op in BINARY:
        assert op(one, other) == op(ref, other), op
        assert op(other, one) == op(other, ref), op
        assert op(one, One((key,))) == op(ref, ref), op
    for name in ("isdisjoint", "issubset", "issuperset", "union", "intersection", "difference"):
        assert getattr(one, name)(other) == getattr(ref, name)(other), name
        assert getattr(one, name)(list(other)) == getattr(ref, name)(list(other)), name
    assert (key in one, "x" in one, len(one), list(one), bool(one)) == (True, False, 1, [key], True)


@given(KEYS)
def test_a_one_is_a_dict_key_interchangeable_with_its_frozenset(key: str) -> None:
    assert hash(One((key,))) == hash(frozenset((key,)))
    table = {frozenset((key,)): "x"}
    assert table[One((key,))] == "x"
    assert {One((key,)): "y"}[frozenset((key,))] == "y"
    assert len({One((key,)), frozenset((key,))}) == 1


@pytest.mark.parametrize("value, kind", [
    (frozenset({"a/1"}), One),           # a frozenset result of one key comes back a One
    (One(("a/1",)), One),
    (frozenset({"a/1", "a/2"}), frozenset),
    (frozenset(), frozenset),
])
def test_provenance_hands_out_a_one_for_one_key(value: frozenset[str], kind: type) -> None:
    p = Provenance()
    got = p.intern(value)
    assert type(got) is kind and got == value
    assert p.intern(frozenset(value)) is got  # interned: every rule of it shares one object
    if len(value) == 1:
        assert p.of(next(iter(value))) is got


def test_a_registrys_pieces_carry_ones_a_fifth_of_a_frozensets_size() -> None:
    pieces = segment([(10, 20, "r/1"), (30, 40, "r/2"), (35, 50, "r/3")], Provenance())
    assert [(r.first, r.last, sorted(r.orders)) for r in pieces] == [
        (10, 20, ["r/1"]), (30, 34, ["r/2"]), (35, 40, ["r/2", "r/3"]), (41, 50, ["r/3"])]
    assert [type(r.orders) for r in pieces] == [One, One, frozenset, One]
    assert sys.getsizeof(pieces[0].orders) * 4 < sys.getsizeof(frozenset(pieces[0].orders))


def test_a_policys_blocks_are_pairs_held_as_two_columns() -> None:
    """`Prepared.blocks` (a million block orders for a registry) is two tuples, read as the
    (key, expansion) pairs it stands for: iterated, indexed, sliced, given to dict(), compared."""
    from blockd.compile import Pairs

    pairs = [("r/1", "e1"), ("r/2", "e2"), ("r/3", "e3")]
    got = Pairs.of(pairs)  # type: ignore[arg-type]
    assert list(got) == pairs and len(got) == 3 and got[1] == ("r/2", "e2") and list(got[1:]) == pairs[1:]
    assert dict(got) == dict(pairs) and {}.update(got) is None
    assert got == tuple(pairs) and got == Pairs.of(pairs) and got != tuple(pairs[:2])  # type: ignore[arg-type]
    assert hash(got) == hash(Pairs.of(pairs))  # type: ignore[arg-type]
