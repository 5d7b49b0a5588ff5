"""The persisted table saved by delta: a base (`dns-table.bin`) and a journal beside it.

Base + journal loads back equal, rule for rule and verdict for verdict, to the table in force
when the last record was written (and to a full dump of that table), over random patch
sequences saved in debounced groups; a torn, damaged or foreign tail is dropped and the table is
then exactly the last one saved whole; the enforcer appends after a patch, compacts on a build
and past the bound, gives a failed save's names to the next, and a change landing while a save
is under way goes into the next record.
"""

from __future__ import annotations

import asyncio
import errno
import random
import threading
from pathlib import Path

import pytest

from blockd.dns import wire
from blockd.dns.server import SinkholeServer, SinkholeSettings
from blockd.dns.table import (JOURNAL_HEADER, JournalPos, Table, TableFileError, append_journal, load_table,
                              read_journal)
from blockd.enforcers import dns as dns_enforcer
from blockd.enforcers.dns import SinkholeEnforcer, TableStore
from blockd.model import Change, RuleSet, diff, rule_delta
from tests.unit.test_dns_table_patch import (SETTINGS, answer, mutate, probes, random_rules, random_world,
                                             touched, unique)


def save(t: Table, base: Path, journal: Path, pos: JournalPos, names: set[str], digest: str) -> JournalPos:
    meta = {"digest": digest, "accepted": f"acc-{pos.seq + 1}", "names": len(t)}
    return append_journal(journal, pos, t.journal_entries(wire.name_to_wire(n) for n in names), meta)


def same(a: Table, b: Table, rs_list: list[RuleSet]) -> None:
    for p in probes(rs_list):
        assert answer(a, p) == answer(b, p), p
    assert len(a) == len(b)


def history(seed: int, steps: int = 8) -> tuple[list[RuleSet], list[set[str]]]:
    rnd = random.Random(seed)
    names, orders = random_world(rnd)
    rs = RuleSet.build(unique(random_rules(rnd, names, orders, 50)), orders=orders)
    out, changes = [rs], []
    for _ in range(steps):
        new = mutate(rnd, out[-1], names, orders)
        changes.append(touched(out[-1], new))
        out.append(new)
    return out, changes


@pytest.mark.parametrize("seed", range(12))
@pytest.mark.parametrize("group", [1, 3])  # a save per change, or one per three (debounced: the union)
def test_base_and_journal_load_equal_to_the_table_in_force(tmp_path: Path, seed: int, group: int) -> None:
    rss, changes = history(seed)
    base, journal = tmp_path / "t.bin", tmp_path / "t.journal"
    t = Table.build(rss[0], SETTINGS)
    _, checksum = t.dump_base(base, {"digest": rss[0].digest, "names": len(t)})
    pos = JournalPos(checksum)
    pending: set[str] = set()
    for step, (rs, names) in enumerate(zip(rss[1:], changes), 1):
        t = t.patched(rs, names)
        if step % 4 == 2:
            t = t.merged()  # an overlay folded in between saves: what a save reads is the same
        pending |= names
        if step % group and step != len(changes):
            continue
        pos = save(t, base, journal, pos, pending, rs.digest)
        pending = set()
        got = load_table(base, SETTINGS, journal)
        assert got.dropped is None and got.records == pos.seq and got.journal == pos
        assert got.meta["digest"] == rs.digest and got.meta["accepted"] == f"acc-{pos.seq}"
        ref = Table.build(rs, SETTINGS)
        same(got.table, ref, rss[:step + 1])
        same(got.table, t, rss[:step + 1])
        assert got.table.to_ruleset().digest == rs.digest  # rule for rule, with each name's orders
        full = tmp_path / "full.bin"
        t.dump(full, {"digest": rs.digest})
        same(got.table, Table.load(full, SETTINGS)[0], rss[:step + 1])
        # what was loaded is patched and saved again like any table
        if step == 4:
            rs_next = rss[step + 1]
            again = got.table.patched(rs_next, changes[step])
            assert again.serves_exactly(rs_next)


def three_records(tmp_path: Path) -> tuple[Path, Path, list[Table], list[RuleSet], list[int]]:
    """A base and three journal records; the tables in force after each, and each record's end."""
    rss, changes = history(7, 3)
    base, journal = tmp_path / "t.bin", tmp_path / "t.journal"
    t = Table.build(rss[0], SETTINGS)
    _, checksum = t.dump_base(base, {"digest": rss[0].digest, "accepted": "acc-0", "names": len(t)})
    pos, tables, ends = JournalPos(checksum), [t], [JOURNAL_HEADER]
    for rs, names in zip(rss[1:], changes):
        t = t.patched(rs, names)
        pos = save(t, base, journal, pos, names, rs.digest)
        tables.append(t)
        ends.append(pos.length)
    return base, journal, tables, rss, ends


def flip(at: int):  # noqa: ANN201
    return lambda b, ends: b[:at(ends)] + bytes([b[at(ends)] ^ 0x40]) + b[at(ends) + 1:]


# (damage to the journal, the record the table is then from, the reason's words)
DAMAGE = [
    ("cut inside the last record's header", lambda b, e: b[:e[2] + 5], 2, "torn"),
    ("cut inside the last record's body", lambda b, e: b[:e[3] - 1], 2, "torn"),
    ("cut inside the second record", lambda b, e: b[:e[1] + 60], 1, "torn"),
    ("byte flipped in the last record", flip(lambda e: e[3] - 3), 2, "checksum"),
    ("byte flipped in the first record", flip(lambda e: e[0] + 50), 0, "checksum"),
    ("a length rewritten past the end", lambda b, e: b[:e[1]] + b"\xff" * 8 + b[e[1] + 8:], 1, "torn"),
    ("garbage appended", lambda b, e: b + b"\x00" * 11, 3, "torn"),
    ("the second record repeated (sequence)", lambda b, e: b[:e[2]] + b[e[1]:e[2]], 2, "sequence"),
    ("the last record dropped (a clean end)", lambda b, e: b[:e[2]], 2, None),
    ("not a journal", lambda b, e: b"hello" + b[5:], 0, "not a blockd journal"),
    ("another format", lambda b, e: b[:19] + b"\x09" + b[20:], 0, "format 9"),
    ("empty", lambda b, e: b"", 0, None),
]


@pytest.mark.parametrize("what, damage, record, reason", DAMAGE, ids=[d[0] for d in DAMAGE])
def test_a_damaged_journal_tail_is_dropped_and_the_table_is_the_last_saved_whole(
        tmp_path: Path, what: str, damage, record: int, reason: str | None) -> None:  # noqa: ANN001
    base, journal, tables, rss, ends = three_records(tmp_path)
    journal.write_bytes(damage(journal.read_bytes(), ends))
    got = load_table(base, SETTINGS, journal)
    assert got.records == record, what
    if reason is None:
        assert got.dropped is None
    else:
        assert got.dropped is not None and got.dropped.reason == "journal_dropped" and reason in got.dropped.detail
    assert got.meta.get("accepted") == f"acc-{record}"  # the meta of that record: the stale check sees it
    same(got.table, tables[record], rss)
    assert got.table.to_ruleset().digest == rss[record].digest
    # the next append goes after the last good record (the damaged tail is cut off), and loads
    assert got.journal is not None
    nxt = mutate(random.Random(1), rss[record], *random_world(random.Random(7)))
    t = tables[record].patched(nxt, touched(rss[record], nxt))
    pos = save(t, base, journal, got.journal, touched(rss[record], nxt), nxt.digest)
    again = load_table(base, SETTINGS, journal)
    assert again.dropped is None and again.records == pos.seq
    same(again.table, Table.build(nxt, SETTINGS), [*rss, nxt])


def test_a_journal_of_another_base_is_ignored(tmp_path: Path) -> None:
    base, journal, tables, rss, _ = three_records(tmp_path)
    tables[3].dump(base, {"digest": rss[3].digest, "accepted": "new-base", "names": len(tables[3])})  # compacted
    got = load_table(base, SETTINGS, journal)  # ... and the journal was not reset yet (a crash)
    assert got.records == 0 and got.dropped is not None and "another base" in got.dropped.detail
    assert got.dropped.reason == "journal_other_base"  # not damage: not counted as such
    assert got.meta["accepted"] == "new-base"
    same(got.table, tables[3], rss)
    # a base that is put back (an old copy) with a journal of the new one: ignored the same way
    tables[0].dump(base, {"digest": rss[0].digest, "accepted": "old", "names": len(tables[0])})
    got = load_table(base, SETTINGS, journal)
    assert got.records == 0 and got.meta["accepted"] == "old"


@pytest.mark.parametrize("damage", [lambda b: b[:len(b) // 2], lambda b: b[:-1], lambda b: b""])
def test_a_truncated_base_is_refused_whatever_the_journal(tmp_path: Path, damage) -> None:  # noqa: ANN001
    base, journal, *_ = three_records(tmp_path)
    base.write_bytes(damage(base.read_bytes()))
    with pytest.raises(TableFileError) as e:
        load_table(base, SETTINGS, journal)
    assert e.value.reason == "corrupt"


def test_a_record_that_does_not_hold_its_names_is_refused(tmp_path: Path) -> None:
    """A record whose entries do not leave the table its meta describes is never served."""
    base, journal, tables, rss, ends = three_records(tmp_path)
    got = load_table(base, SETTINGS, journal)
    pos = append_journal(journal, got.journal, [], {"digest": "x", "names": len(tables[3]) + 1})  # type: ignore[arg-type]
    assert pos.seq == 4
    with pytest.raises(TableFileError, match="record 4 leaves") as e:
        load_table(base, SETTINGS, journal)
    assert e.value.reason == "corrupt"


def test_a_failed_append_leaves_the_journal_where_it_was(tmp_path: Path) -> None:
    base, journal, tables, rss, ends = three_records(tmp_path)
    pos = read_journal(journal, load_table(base, SETTINGS).journal.base)[1]  # type: ignore[union-attr]
    assert pos is not None and pos.seq == 3

    class Boom(Exception):
        pass

    huge = [(b"\x01a\x00", b"x" * 10, None)] * 10
    real = __import__("os").fdatasync

    def failing(fd: int) -> None:
        raise Boom

    import os
    os.fdatasync = failing  # type: ignore[assignment]
    try:
        with pytest.raises(Boom):
            append_journal(journal, pos, huge, {"names": 1})
    finally:
        os.fdatasync = real
    assert journal.stat().st_size == pos.length  # cut back
    got = load_table(base, SETTINGS, journal)
    assert got.dropped is None and got.records == 3


# ---- the enforcer ---------------------------------------------------------------------------

def run(coro):  # noqa: ANN001, ANN201
    return asyncio.run(coro)


def enforcer(tmp_path: Path, events: list[str]) -> SinkholeEnforcer:
    return SinkholeEnforcer(SinkholeServer(SinkholeSettings(listen=())), store=TableStore(tmp_path),
                            on_table_file=events.append)


def change(cur: RuleSet, new: RuleSet) -> Change:
    removed, added = rule_delta(cur, new)
    return Change(cur.digest, diff(cur, new), removed, added)


def restored(tmp_path: Path, events: list[str]) -> Table:
    async def go() -> Table:
        enf = enforcer(tmp_path, events)
        assert await enf.restore()
        return enf.server.table

    return run(go())


@pytest.fixture
def accepted(monkeypatch: pytest.MonkeyPatch) -> list[str]:
    """The state's accepted digest, as the test sets it (the state file itself is tested elsewhere)."""
    box = ["acc-1"]
    monkeypatch.setattr(TableStore, "accepted_digest", lambda self: box[0])
    return box


def test_the_enforcer_appends_after_patches_and_compacts_on_a_build(tmp_path: Path, accepted: list[str]) -> None:
    rss, _ = history(21, 6)
    events: list[str] = []

    async def go() -> None:
        enf = enforcer(tmp_path, events)
        await enf.apply(rss[0])
        await enf.aclose()  # a build: a new base
        assert events == ["saved"] and not (tmp_path / "dns-table.journal").exists()
        enf = enforcer(tmp_path, events)
        assert await enf.restore()
        await enf.apply(rss[0])  # adopted
        for cur, new in zip(rss[:3], rss[1:4]):  # three changes before the save is due: one record
            assert (await enf.apply(new, change(cur, new))).in_sync and enf.last_path == "patch"
        await enf.aclose()

    run(go())
    assert events == ["saved", "loaded", "appended"]
    got = load_table(tmp_path / "dns-table.bin", SETTINGS, tmp_path / "dns-table.journal")
    assert got.records == 1 and got.meta["digest"] == rss[3].digest
    same(restored(tmp_path, events), Table.build(rss[3], SETTINGS), rss)

    async def build() -> None:
        enf = enforcer(tmp_path, events)
        assert await enf.restore()
        await enf.apply(rss[3])
        for cur, new in zip(rss[3:5], rss[4:6]):
            await enf.apply(new, change(cur, new))
        await enf.aclose()
        assert events[-1] == "appended"  # appended to the journal loaded at start
        enf2 = enforcer(tmp_path, events)
        await enf2.apply(rss[6])  # no restore: a build, so the next save is a new base
        await enf2.aclose()

    run(build())
    assert events[-1] == "saved" and not (tmp_path / "dns-table.journal").exists()
    same(restored(tmp_path, events), Table.build(rss[6], SETTINGS), rss)


def test_the_journal_is_compacted_past_its_bound(tmp_path: Path, accepted: list[str],
                                                 monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(dns_enforcer, "JOURNAL_MAX_ENTRIES", 40)
    rss, _ = history(4, 8)
    events: list[str] = []
    held: list[Table] = []

    async def go() -> None:
        enf = enforcer(tmp_path, events)
        await enf.apply(rss[0])
        await enf.aclose()
        for cur, new in zip(rss, rss[1:]):
            enf = enforcer(tmp_path, events)
            assert await enf.restore()
            await enf.apply(cur)
            await enf.apply(new, change(cur, new))
            await enf.aclose()
            held.append(load_table(tmp_path / "dns-table.bin", SETTINGS, tmp_path / "dns-table.journal").table)

    run(go())
    for t, rs in zip(held, rss[1:]):
        same(t, Table.build(rs, SETTINGS), rss)
    saves = [e for e in events if e in ("saved", "appended")]
    assert saves.count("appended") >= 2 and saves.count("saved") >= 2, saves  # records, then a new base
    got = load_table(tmp_path / "dns-table.bin", SETTINGS, tmp_path / "dns-table.journal")
    assert got.journal is not None and got.journal.entries <= 40


def test_a_full_disk_on_append_is_counted_and_the_next_save_carries_its_names(
        tmp_path: Path, accepted: list[str], monkeypatch: pytest.MonkeyPatch) -> None:
    rss, _ = history(9, 4)
    events: list[str] = []
    real = dns_enforcer.append_journal
    full = [True]

    def append(path, pos, entries, meta):  # noqa: ANN001, ANN202
        if full[0]:
            raise OSError(errno.ENOSPC, "No space left on device")
        return real(path, pos, entries, meta)

    monkeypatch.setattr(dns_enforcer, "append_journal", append)

    async def go() -> None:
        enf = enforcer(tmp_path, events)
        await enf.apply(rss[0])
        await enf._persist(*enf._persist_due)  # type: ignore[misc]  # the base, now
        enf._persist_due = None
        await enf.apply(rss[1], change(rss[0], rss[1]))
        due = enf._persist_due
        enf._persist_due = None
        await enf._persist(*due)  # type: ignore[misc]  # ENOSPC: no base attempted (it cannot fit)
        assert events == ["saved", "save_failed"] and enf.server.table.serves_exactly(rss[1])
        full[0] = False
        await enf.apply(rss[2], change(rss[1], rss[2]))
        await enf.aclose()  # one record: the names of both changes

    run(go())
    assert events == ["saved", "save_failed", "appended"]
    same(restored(tmp_path, []), Table.build(rss[2], SETTINGS), rss)


def test_a_change_landing_while_a_save_is_under_way_goes_into_the_next(
        tmp_path: Path, accepted: list[str], monkeypatch: pytest.MonkeyPatch) -> None:
    rss, _ = history(13, 3)
    events: list[str] = []
    real = dns_enforcer.append_journal
    entered, release = threading.Event(), threading.Event()

    def slow(path, pos, entries, meta):  # noqa: ANN001, ANN202
        entered.set()
        assert release.wait(60)
        return real(path, pos, entries, meta)

    async def go() -> None:
        enf = enforcer(tmp_path, events)
        await enf.apply(rss[0])
        await enf._persist(*enf._persist_due)  # type: ignore[misc]
        enf._persist_due = None
        monkeypatch.setattr(dns_enforcer, "append_journal", slow)
        await enf.apply(rss[1], change(rss[0], rss[1]))
        due = enf._persist_due
        enf._persist_due = None
        enf._writing = True
        writing = asyncio.get_running_loop().create_task(enf._persist(*due))  # type: ignore[misc]
        assert await asyncio.to_thread(entered.wait, 60)
        await enf.apply(rss[2], change(rss[1], rss[2]))  # lands while the record of rss[1] is written
        await enf.apply(rss[3], change(rss[2], rss[3]))
        release.set()
        await writing
        enf._writing = False
        await enf.aclose()

    run(go())
    assert events == ["saved", "appended", "appended"]
    got = load_table(tmp_path / "dns-table.bin", SETTINGS, tmp_path / "dns-table.journal")
    assert got.records == 2 and got.meta["digest"] == rss[3].digest
    same(got.table, Table.build(rss[3], SETTINGS), rss)


def test_a_restore_with_a_dropped_tail_is_counted_and_served_only_if_its_meta_checks_out(
        tmp_path: Path, accepted: list[str]) -> None:
    rss, _ = history(17, 2)
    events: list[str] = []

    async def go() -> None:
        enf = enforcer(tmp_path, events)
        await enf.apply(rss[0])
        await enf.aclose()
        for i, (cur, new) in enumerate(zip(rss, rss[1:]), 2):
            enf = enforcer(tmp_path, events)
            assert await enf.restore()
            await enf.apply(cur)
            accepted[0] = f"acc-{i}"  # the state accepts the new serial, then the table is patched
            await enf.apply(new, change(cur, new))
            await enf.aclose()

    run(go())
    j = tmp_path / "dns-table.journal"
    j.write_bytes(j.read_bytes()[:-4])  # the last append torn (a crash or full disk mid-write)
    events.clear()

    async def start() -> bool:
        return await enforcer(tmp_path, events).restore()

    assert run(start()) is False  # the last whole record is of acc-2, the state says acc-3: stale
    assert events == ["journal_dropped", "stale"]
    accepted[0] = "acc-2"  # had the state not moved on, that record's table is the one in force then
    events.clear()
    t = restored(tmp_path, events)
    assert events == ["journal_dropped", "loaded"]
    same(t, Table.build(rss[1], SETTINGS), rss)


def test_a_build_after_patches_writes_a_new_base_not_a_record(tmp_path: Path, accepted: list[str]) -> None:
    """A table rebuilt (here: a change from a base the enforcer does not hold) cannot be told by
    the names of the patches before it: the save that follows writes a new base."""
    rss, _ = history(23, 3)
    rnd = random.Random(5)
    other = mutate(rnd, rss[0], *random_world(random.Random(23)))
    events: list[str] = []

    async def go() -> None:
        enf = enforcer(tmp_path, events)
        await enf.apply(rss[0])
        await enf.aclose()
        enf = enforcer(tmp_path, events)
        assert await enf.restore()
        await enf.apply(rss[0])
        await enf.apply(rss[1], change(rss[0], rss[1]))
        assert enf.last_path == "patch"
        await enf.apply(other, change(rss[2], other))  # from a base it does not hold: rebuilt
        assert enf.last_path == "full"
        await enf.aclose()

    run(go())
    assert events == ["saved", "loaded", "saved"]
    same(restored(tmp_path, []), Table.build(other, SETTINGS), [*rss, other])


@pytest.mark.parametrize("fmt, loads", [(1, True), (2, True), (3, False), (0, False)])
def test_the_base_format_is_checked(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, fmt: int, loads: bool) -> None:
    """Format 1 (before the journal) still loads, as a base with no journal; an unknown format
    is refused with the formats this blockd reads, never misread."""
    from blockd.dns import table as table_mod

    rss, _ = history(2, 0)
    t = Table.build(rss[0], SETTINGS)
    monkeypatch.setattr(table_mod, "TABLE_FORMAT", fmt)
    t.dump(tmp_path / "t.bin", {"digest": rss[0].digest, "names": len(t)})
    monkeypatch.undo()
    if loads:
        got = load_table(tmp_path / "t.bin", SETTINGS, tmp_path / "t.journal")
        same(got.table, t, rss)
    else:
        with pytest.raises(TableFileError, match=f"format {fmt}, this blockd reads 1, 2") as e:
            load_table(tmp_path / "t.bin", SETTINGS)
        assert e.value.reason == "corrupt"


def test_a_base_dump_waits_between_slices_while_a_pass_runs(tmp_path: Path) -> None:
    """The first base after a build is a million-name dump: it holds back, slice by slice,
    while `busy()` says a pass runs, and writes the same file as a dump that never waits."""
    from blockd.dns.table import _SLICE
    from blockd.model import DomainRule

    orders = {"o1": random_world(random.Random(5))[1]["o1"]}
    rs = RuleSet.build([DomainRule(f"n{i}.example", False, frozenset({"o1"})) for i in range(2 * _SLICE + 5)],
                       orders=orders)
    calls: list[int] = []
    t = Table.build(rs, SETTINGS)
    t.dump_base(tmp_path / "paused.bin", {"digest": rs.digest}, lambda: calls.append(1))
    assert len(calls) >= 3  # the spec slices and the key slices
    Table.build(rs, SETTINGS).dump_base(tmp_path / "plain.bin", {"digest": rs.digest})
    assert (tmp_path / "paused.bin").read_bytes() == (tmp_path / "plain.bin").read_bytes()

    enforcer = SinkholeEnforcer(SinkholeServer(SinkholeSettings(listen=())))
    passing = threading.Event()
    enforcer.busy = passing.is_set
    passing.set()
    done = threading.Event()
    waiter = threading.Thread(target=lambda: (enforcer._pause(), done.set()))
    waiter.start()
    assert not done.wait(0.3), "the dump went on while the pass ran"
    passing.clear()
    assert done.wait(10), "the dump did not go on once the pass ended"
    waiter.join()
