"""The sinkhole table patched by a change equals one built from scratch; patches never change the
table being served; the persisted table loads back equal and a damaged one is refused; the
enforcer patches, reads back what it touched, and restores a persisted table."""

from __future__ import annotations

import asyncio
import random
import shutil
import threading
import time
from dataclasses import replace
from datetime import datetime, timezone
from pathlib import Path

import pytest

from blockd.dns import wire
from blockd.dns.server import SinkholeServer, SinkholeSettings
from blockd.dns.table import AnswerSettings, Table, TableFileError
from blockd.enforcers.dns import SinkholeEnforcer, TableStore
from blockd.model import Change, DomainRule, OrderInfo, RuleSet, diff, rule_delta

T0 = datetime(2026, 1, 1, tzinfo=timezone.utc)
ANSWERS = (None, None, None, "nodata", "sinkhole", "refused", "drop", "log")
SETTINGS = AnswerSettings(sinkhole_v4="192.0.2.80", sde_organization="Example ISP")


def info(oid: str, answer: str | None, ref: str = "") -> OrderInfo:
    return OrderInfo(oid, "issuer", 1, f"Court {oid}", ref or f"ref-{oid}", None, "block", answer, None, T0)


def labels_of(w: bytes) -> list[int]:
    out, i = [], 0
    while w[i]:
        out.append(i)
        i += w[i] + 1
    return out


def answer(t: Table, name: str) -> tuple[object, ...] | None:
    w = wire.name_to_wire(name)
    hit = t.lookup(w, labels_of(w))
    if hit is None:
        return None
    v, off = hit
    return v.mode, v.order, v.text, v.opt_sde, v.own_orders, v.orders, off


def probes(rs_list: list[RuleSet]) -> list[str]:
    names = {r.name for rs in rs_list for r in rs.domains}
    return sorted(names | {f"x.{n}" for n in names} | {f"a.b.{n}" for n in names} | {"unrelated.example"})


def random_world(rnd: random.Random, n_names: int = 60, n_orders: int = 12) -> tuple[list[str], dict[str, OrderInfo]]:
    base = [f"n{i}.example" for i in range(n_names // 3)]
    names = base + [f"s{i}.{rnd.choice(base)}" for i in range(n_names - len(base))]  # parents and children
    orders = {f"o{i}": info(f"o{i}", rnd.choice(ANSWERS)) for i in range(n_orders)}
    return names, orders


def random_rules(rnd: random.Random, names: list[str], orders: dict[str, OrderInfo], k: int) -> list[DomainRule]:
    out = []
    for _ in range(k):
        ords = frozenset(rnd.sample(sorted(orders), rnd.choice((1, 1, 2, 3))))
        out.append(DomainRule(rnd.choice(names), rnd.random() < 0.4, ords))
    return out


def unique(rules: list[DomainRule]) -> list[DomainRule]:
    """One rule per (name, kind), as the compiler makes them (orders merged)."""
    out: dict[tuple[str, bool], frozenset[str]] = {}
    for r in rules:
        out[(r.name, r.subtree)] = out.get((r.name, r.subtree), frozenset()) | r.orders
    return [DomainRule(n, s, o) for (n, s), o in out.items()]


def touched(current: RuleSet, desired: RuleSet) -> set[str]:
    removed, added = rule_delta(current, desired)
    return {r.name for r in removed.domains} | {r.name for r in added.domains}


def mutate(rnd: random.Random, rs: RuleSet, names: list[str], orders: dict[str, OrderInfo]) -> RuleSet:
    """Drop some rules, add some, re-tag some (other orders), and change some orders' answers."""
    doms = [r for r in rs.domains if rnd.random() > 0.1]
    doms = [r._replace(orders=frozenset(rnd.sample(sorted(orders), 1))) if rnd.random() < 0.1 else r for r in doms]
    doms += random_rules(rnd, names, orders, rnd.randint(0, 8))
    new_orders = dict(rs.orders)
    for oid in rnd.sample(sorted(new_orders), 2):
        new_orders[oid] = replace(new_orders[oid], dns_answer=rnd.choice(ANSWERS), reference=f"r{rnd.random()}")
    return RuleSet.build(unique(doms), orders=new_orders)


@pytest.mark.parametrize("seed", range(25))
def test_patch_equals_rebuild_over_random_deltas(seed: int) -> None:
    rnd = random.Random(seed)
    names, orders = random_world(rnd)
    rs = RuleSet.build(unique(random_rules(rnd, names, orders, 50)), orders=orders)
    t = Table.build(rs, SETTINGS)
    history = [rs]
    for step in range(6):
        new = mutate(rnd, rs, names, orders)
        history.append(new)
        patched = t.patched(new, touched(rs, new))
        ref = Table.build(new, SETTINGS)
        for p in probes(history):
            assert answer(patched, p) == answer(ref, p), (seed, step, p)
        assert len(patched) == len(ref)
        assert patched.to_ruleset().digest == new.digest == ref.to_ruleset().digest
        e, s = patched.name_parts()
        assert (e.value, s.value) == (new.parts[0].value, new.parts[1].value)
        if step % 2:
            merged = patched.merged()
            assert merged.overlay == 0 and len(merged) == len(ref)
            for p in probes(history):
                assert answer(merged, p) == answer(ref, p), (seed, step, p, "merged")
            patched = merged
        rs, t = new, patched


def test_patch_never_changes_the_table_being_served() -> None:
    rnd = random.Random(3)
    names, orders = random_world(rnd)
    rs = RuleSet.build(unique(random_rules(rnd, names, orders, 50)), orders=orders)
    t = Table.build(rs, SETTINGS)
    before = {p: answer(t, p) for p in probes([rs])}
    new = mutate(rnd, rs, names, orders)
    p1 = t.patched(new, touched(rs, new))
    p1.merged()
    assert {p: answer(t, p) for p in probes([rs])} == before  # the old table still answers as before


def test_a_reader_never_sees_half_a_change() -> None:
    """Two names enter in one change and leave in the next; a reader that takes the table once
    per query pair sees both or neither, while patches and merges run beside it."""
    orders = {"a": info("a", None)}
    filler = [DomainRule(f"f{i}.example", i % 2 == 0, frozenset("a")) for i in range(2000)]
    pair = [DomainRule("left.example", False, frozenset("a")), DomainRule("right.example", True, frozenset("a"))]
    without, with_pair = RuleSet.build(filler, orders=orders), RuleSet.build(filler + pair, orders=orders)
    srv = SinkholeServer(SinkholeSettings(listen=()), Table.build(without, SETTINGS))
    stop = threading.Event()
    seen: set[tuple[bool, bool]] = set()
    reads = [0]

    def reader() -> None:
        while not stop.is_set():
            t = srv.table
            seen.add((answer(t, "left.example") is not None, answer(t, "x.right.example") is not None))
            reads[0] += 1

    th = threading.Thread(target=reader)
    th.start()
    try:
        cur, rs = srv.table, without
        for i in range(200):
            nxt = with_pair if rs is without else without
            cur = cur.patched(nxt, {"left.example", "right.example"})
            if i % 50 == 49:
                cur = cur.merged()
            srv.swap(cur)
            rs = nxt
            target = reads[0] + 2
            while reads[0] < target and th.is_alive():  # the reader looks at every table swapped in
                time.sleep(0.0001)
    finally:
        stop.set()
        th.join()
    assert seen <= {(True, True), (False, False)} and (True, True) in seen


def test_persisted_table_loads_back_equal(tmp_path: Path) -> None:
    rnd = random.Random(5)
    names, orders = random_world(rnd)
    rs = RuleSet.build(unique(random_rules(rnd, names, orders, 50)), orders=orders)
    new = mutate(rnd, rs, names, orders)
    t = Table.build(rs, SETTINGS).patched(new, touched(rs, new))  # with an overlay
    path = tmp_path / "t.bin"
    t.dump(path, {"digest": new.digest, "accepted": "x"})
    back, meta = Table.load(path, SETTINGS)
    assert meta["accepted"] == "x" and back.restored and back.digest == new.digest
    ref = Table.build(new, SETTINGS)
    for p in probes([rs, new]):
        assert answer(back, p) == answer(ref, p), p
    assert back.to_ruleset().digest == new.digest
    # a restored table is patched like any other
    newer = mutate(rnd, new, names, orders)
    again = back.patched(newer, touched(new, newer))
    ref = Table.build(newer, SETTINGS)
    for p in probes([rs, new, newer]):
        assert answer(again, p) == answer(ref, p), p
    # merged (verdicts appended past the base's specs), then patched again: dumped and loaded equal
    merged = again.merged()
    newest = mutate(rnd, newer, names, orders)
    final = merged.patched(newest, touched(newer, newest))
    for t2, rs2 in ((merged, newer), (final, newest)):
        t2.dump(path, {"digest": rs2.digest})
        back2, _ = Table.load(path, SETTINGS)
        ref = Table.build(rs2, SETTINGS)
        for p in probes([rs, new, newer, newest]):
            assert answer(back2, p) == answer(ref, p) == answer(t2, p), p


@pytest.mark.parametrize("damage, reason", [
    (lambda b: b[:-7], "checksum"),
    (lambda b: b[:40] + bytes([b[40] ^ 1]) + b[41:], "checksum"),
    (lambda b: b"NOT-A-TABLE" + b[11:], "not a blockd table file"),
    (lambda b: b"", "not a blockd table file"),
])
def test_damaged_table_file_is_refused(tmp_path: Path, damage, reason: str) -> None:  # noqa: ANN001
    path = tmp_path / "t.bin"
    Table.build(RuleSet.build([DomainRule("a.example", False, frozenset("o"))]), SETTINGS).dump(path, {})
    path.write_bytes(damage(path.read_bytes()))
    with pytest.raises(TableFileError, match=reason) as e:
        Table.load(path, SETTINGS)
    assert e.value.reason == "corrupt"
    with pytest.raises(TableFileError) as e:
        Table.load(tmp_path / "nope.bin", SETTINGS)
    assert e.value.reason == "missing"


def run(coro):  # noqa: ANN001, ANN201
    return asyncio.run(coro)


def test_enforcer_patches_by_change_and_reads_back_what_it_touched(tmp_path: Path) -> None:
    rnd = random.Random(11)
    names, orders = random_world(rnd)
    rs = RuleSet.build(unique(random_rules(rnd, names, orders, 50)), orders=orders)

    async def go() -> None:
        enf = SinkholeEnforcer(SinkholeServer(SinkholeSettings(listen=())), store=TableStore(tmp_path))
        first = await enf.apply(rs, None)
        assert enf.last_path == "full" and first.readback_scope == "full" and first.in_sync
        cur = rs
        for _ in range(5):
            new = mutate(rnd, cur, names, orders)
            removed, added = rule_delta(cur, new)
            a = await enf.apply(new, Change(cur.digest, diff(cur, new), removed, added))
            assert enf.last_path == "patch" and a.readback_scope == "touched" and a.in_sync
            assert a.digest == new.share_digest(names=True, v4=False, v6=False)
            assert a.full_readback_at == first.full_readback_at
            ref = Table.build(new, enf.server.answer_settings)
            for p in probes([cur, new]):
                assert answer(enf.server.table, p) == answer(ref, p), p
            held = await enf.readback()
            assert held.digest == a.digest
            cur = new
        # a change from a base it does not hold: rebuilt
        other = mutate(rnd, cur, names, orders)
        removed, added = rule_delta(rs, other)
        a = await enf.apply(other, Change(rs.digest, diff(rs, other), removed, added))
        assert enf.last_path == "full" and a.in_sync
        await enf.aclose()  # writes the table now, not a few seconds later
        assert (tmp_path / "dns-table.bin").exists()

        # restore: served before any apply, equal to the table written
        enf2 = SinkholeEnforcer(SinkholeServer(SinkholeSettings(listen=())), store=TableStore(tmp_path))
        assert await enf2.restore()
        ref = Table.build(other, enf2.server.answer_settings)
        for p in probes([other]):
            assert answer(enf2.server.table, p) == answer(ref, p), p
        a = await enf2.apply(other, None)  # the first pass: same names, same accepted state -> kept
        assert a.in_sync and enf2.server.table.restored
        await enf2.aclose()

    run(go())


def test_enforcer_ignores_a_stale_table(tmp_path: Path) -> None:
    events: list[str] = []
    Table.build(RuleSet.build([DomainRule("a.example", False, frozenset("o"))]), SETTINGS).dump(
        tmp_path / "dns-table.bin", {"digest": "d", "accepted": "written-for-other-policies"})

    async def go() -> bool:
        enf = SinkholeEnforcer(SinkholeServer(SinkholeSettings(listen=())), store=TableStore(tmp_path),
                               on_table_file=events.append)
        return await enf.restore()

    assert run(go()) is False
    assert events == ["stale"]


def test_a_table_that_cannot_be_saved_is_counted_and_tried_again(tmp_path: Path) -> None:
    (tmp_path / "dns-table.bin" / "in-the-way").mkdir(parents=True)  # the rename onto it fails
    events: list[str] = []
    rs = RuleSet.build([DomainRule("a.example", False, frozenset("o"))], orders={"o": info("o", None)})
    rs2 = RuleSet.build([DomainRule("b.example", False, frozenset("o"))], orders={"o": info("o", None)})

    async def go(rules: RuleSet) -> None:
        enf = SinkholeEnforcer(SinkholeServer(SinkholeSettings(listen=())), store=TableStore(tmp_path),
                               on_table_file=events.append)
        assert (await enf.apply(rules)).in_sync  # enforcement does not depend on the save
        await enf.aclose()

    run(go(rs))
    assert events == ["save_failed"] and not list(tmp_path.glob(".dns-table.bin.tmp"))
    shutil.rmtree(tmp_path / "dns-table.bin")
    run(go(rs2))
    assert events == ["save_failed", "saved"]
    t, meta = Table.load(tmp_path / "dns-table.bin", SETTINGS)
    assert answer(t, "b.example") is not None and answer(t, "a.example") is None


def test_serves_exactly_reads_every_name_and_its_orders() -> None:
    rnd = random.Random(8)
    names, orders = random_world(rnd)
    rs = RuleSet.build(unique(random_rules(rnd, names, orders, 50)), orders=orders)
    new = mutate(rnd, rs, names, orders)
    t = Table.build(rs, SETTINGS)
    assert t.serves_exactly(rs) and not t.serves_exactly(new)
    p = t.patched(new, touched(rs, new))
    assert p.serves_exactly(new) and not p.serves_exactly(rs) and p.merged().serves_exactly(new)
    r = rs.domains[0]
    other = RuleSet.build([r._replace(orders=frozenset({"zz"})), *rs.domains[1:]], orders=orders)
    assert not t.serves_exactly(other)  # same names, other orders
    fewer = RuleSet.build(rs.domains[1:], orders=orders)
    assert not t.serves_exactly(fewer)  # the table holds one name more
