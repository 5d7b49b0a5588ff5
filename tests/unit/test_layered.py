"""blockd.layered: derived mappings equal the dict they stand for, and never change."""

from __future__ import annotations

import random

import pytest

from blockd.layered import Layered, Overlay


def test_derive_matches_a_dict_and_leaves_the_original_alone() -> None:
    rng = random.Random(7)
    ref = {f"k{i}": i for i in range(300)}
    cur = Layered(ref)
    history = [(cur, dict(ref))]
    for step in range(400):
        updates = {f"k{rng.randrange(400)}": -step for _ in range(rng.randint(0, 5))}
        deletions = [f"k{rng.randrange(400)}" for _ in range(rng.randint(0, 5))]
        deletions = [d for d in deletions if d not in updates]
        cur = cur.derive(updates, deletions)
        for d in deletions:
            ref.pop(d, None)
        ref.update(updates)
        history.append((cur, dict(ref)))
    for m, want in history:  # every version, old ones included, is what it was
        assert dict(m) == want and len(m) == len(want)
        assert all(k in m and m[k] == v for k, v in want.items())
        assert "absent" not in m and m.get("absent") is None


def test_by_issuer_is_the_union_of_its_parts() -> None:
    from blockd.layered import ByIssuer

    parts = {"reg": {"reg/a": 1, "reg/b": 2}, "tickets": {"tickets/t1": 3}, "empty": {}}
    m = ByIssuer(parts)
    union = {k: v for p in parts.values() for k, v in p.items()}
    assert dict(m) == union and len(m) == 3 and m == union
    for key in ("reg/a", "tickets/t1"):
        assert key in m and m[key] == union[key]
    for key in ("reg/c", "other/a", "reg", "", "tickets/t1/x", 7):
        assert key not in m
        if isinstance(key, str):
            try:
                m[key]
            except KeyError:
                pass
            else:
                raise AssertionError(f"{key!r} found")


def test_order_infos_are_the_infos_made_up_front() -> None:
    """Made when read, equal to those `_info` makes for every order, deadlines included."""
    from blockd.compile import OrderInfos, _info, deadlines_of, infos_of, order_key, prepare
    from tests.unit.test_compile import CATALOG, order, policy
    from tests.unit.test_incremental import SETTINGS

    p = policy(order("a", "{domains: [a.example]}"), order("b", "{domains: [b.example]}",
                                                       extra="    deadline: 2026-12-01T00:00:00Z\n"))
    prep = prepare(p, CATALOG, SETTINGS.guards)
    assert isinstance(prep.infos, OrderInfos)
    eager = {order_key(p, o): _info(p, o) for o in p.orders}
    assert dict(prep.infos) == eager and set(prep.infos.keys()) == set(eager)
    assert deadlines_of([prep]) == {k: i.deadline for k, i in eager.items() if i.deadline is not None} != {}
    assert dict(infos_of([prep])) == eager


def test_peek_gives_an_order_info_without_keeping_it() -> None:
    """A dump of the sinkhole's table reads every order's info once: `peek` makes it as `[]`
    does, without keeping a million of them behind."""
    from blockd.compile import OrderInfos, order_key
    from blockd.layered import ByIssuer
    from tests.unit.test_incremental import REG2 as policy

    orders = {order_key(policy, o): (o, ("block", None, ())) for o in policy.orders}  # (order, hit) entries
    reference = OrderInfos(policy, orders)  # type: ignore[arg-type]
    fresh = OrderInfos(policy, dict(orders))  # type: ignore[arg-type]
    both = ByIssuer({policy.issuer: fresh, "other": {"other/x": "plain"}})
    assert [both.peek(k) for k in orders] == [reference[k] for k in orders] and len(orders) == 3
    assert fresh._made == {}  # nothing kept
    assert both.peek("other/x") == "plain" and both.peek("nobody/x") is None
    assert both.peek(f"{policy.issuer}/zz") is None


@pytest.mark.parametrize("seed", range(6))
def test_an_overlay_behaves_as_a_copy_and_never_changes_its_base(seed: int) -> None:
    """The merge by delta's results sit over the merge's own dict, which a Compilation shares:
    every write and deletion answers as on a copy, across folds, and the base stays as it was."""
    rng = random.Random(seed)
    base = {k: rng.randrange(100) for k in range(rng.choice([10, 3000, 20000]))}
    frozen = dict(base)
    gone = rng.sample(sorted(base), min(5, len(base)))
    over, model = Overlay(base, gone), {k: v for k, v in base.items() if k not in gone}
    for _ in range(6000):
        k = rng.randrange(len(base) + 50)
        op = rng.random()
        if op < 0.4:
            v = rng.randrange(100)
            over[k] = v
            model[k] = v
        elif op < 0.7:
            assert over.pop(k, None) == model.pop(k, None)
        else:
            assert over.get(k) == model.get(k) and (k in over) == (k in model)
    assert len(over) == len(model)
    assert all(over.get(k) == model.get(k) for k in range(len(base) + 50))
    assert base == frozen  # the shared base was never written
