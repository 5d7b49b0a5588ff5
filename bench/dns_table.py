"""The sinkhole's lookup table at registry scale (issue 14): build, patch, merge, save, load, read back.

    .venv/bin/python bench/dns_table.py                 # 1M names
    .venv/bin/python bench/dns_table.py --names 100000

Registry-shaped: one order per name (so one verdict per name, the worst case for the table),
a tenth of them subtree rules. A change is k names leaving and k entering under a new order.
The reference, measured in the same run, is what a change cost before the table was patched:
`Table.build` of the whole new rule set (and, for start-up, building it instead of loading it).
"""

from __future__ import annotations

import argparse
import random
import resource
import statistics
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

_HERE = Path(__file__).resolve().parent
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != _HERE]
sys.path.insert(0, str(_HERE.parent))
from blockd.dns import wire  # noqa: E402
from blockd.dns.table import AnswerSettings, JournalPos, Table, append_journal, load_table  # noqa: E402
from blockd.model import DomainRule, OrderInfo, RuleDelta, RuleSet  # noqa: E402

T0 = datetime(2026, 1, 1, tzinfo=timezone.utc)


def info(oid: str, ref: str) -> OrderInfo:
    return OrderInfo(oid, oid.split("/")[0], 1, "Bench Registry", ref, None, "block", None, None, T0)


def timed(fn):  # noqa: ANN001, ANN201
    t = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t


def cpu_timed(fn):  # noqa: ANN001, ANN201
    """(result, wall s, this thread's CPU s): the CPU is what holds the GIL from the DNS thread."""
    t, c = time.perf_counter(), time.thread_time()
    out = fn()
    return out, time.perf_counter() - t, time.thread_time() - c


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--names", type=int, default=1_000_000)
    ap.add_argument("--changes", type=int, default=10, help="changes per k (p50 and max reported)")
    args = ap.parse_args()
    n = args.names
    rng = random.Random(1)
    doms, orders = [], {}
    for i in range(n):
        oid = f"registry/d{i}"
        doms.append(DomainRule(f"{rng.getrandbits(40):010x}.ru", i % 10 == 0, frozenset((oid,))))
        orders[oid] = info(oid, f"d{i}")
    rs = RuleSet.build(doms, orders=orders)
    s = AnswerSettings()
    table, build_s = timed(lambda: Table.build(rs, s))
    _, parts_s = timed(table.name_parts)
    rows = []
    serial = 0
    for k in (1, 10, 1000):
        times = []
        for _ in range(args.changes):
            serial += 1
            gone = tuple(sorted(rng.sample(rs.domains, k)))
            oid = f"tickets/t{serial}"
            new = tuple(sorted(DomainRule(f"t{serial}-{j}.example", False, frozenset((oid,))) for j in range(k)))
            o2 = dict(rs.orders)
            o2[oid] = info(oid, f"t{serial}")
            rs, _ = rs.patched(RuleDelta(domains=gone), RuleDelta(domains=new), o2)
            names = {r.name for r in gone} | {r.name for r in new}
            table, dt = timed(lambda: table.patched(rs, names))  # noqa: B023
            times.append(dt)
        rows.append((k, statistics.median(times), max(times)))
    overlay = table.overlay
    merged, merge_s = timed(table.merged)
    _, rebuild_s = timed(lambda: Table.build(rs, s))
    with tempfile.TemporaryDirectory() as d:
        path = Path(d) / "dns-table.bin"
        size, dump1_s = timed(lambda: merged.dump(path, {"digest": rs.digest}))
        _, dump2_s = timed(lambda: merged.patched(rs, set()).dump(path, {"digest": rs.digest}))
        (loaded, _), load_s = timed(lambda: Table.load(path, s))
    assert len(loaded) == len(merged)
    jrows, jload = journal_section(merged, rs, rng, args.changes, s)
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"\nblockd sinkhole table, {n:,} names, one order each (machine: 2 cores, busy; peak RSS {rss:.0f} MiB)")
    print(f"  build {build_s:.2f} s; full read-back of the names (digest) {parts_s:.2f} s")
    print(f"  {'change':>12} {'patch p50':>11} {'patch max':>11} {'rebuild (ref)':>14} {'rebuild / patch':>16}")
    for k, p50, mx in rows:
        print(f"  {f'{k}+{k} names':>12} {p50 * 1000:9.2f}ms {mx * 1000:9.2f}ms {rebuild_s:12.2f} s {rebuild_s / p50:15.0f}x")
    print(f"  merge of an overlay of {overlay:,} entries (background, in slices) {merge_s:.2f} s")
    print(f"  save {size / 1e6:.0f} MB: first {dump1_s:.2f} s, again after a change {dump2_s:.2f} s; "
          f"load {load_s:.2f} s (build instead: {build_s:.2f} s, {build_s / load_s:.1f}x)")
    print(f"  save after a change: a journal record (entries of the names touched, write, fdatasync) "
          f"against a full dump of the same table (reference)")
    print(f"  {'change':>12} {'append p50':>11} {'append max':>11} {'CPU p50':>9} {'record':>9} "
          f"{'full dump (ref)':>16} {'its CPU':>8} {'dump / append':>14} {'CPU ratio':>10}")
    for k, p50, mx, rec, full, cpu, full_cpu in jrows:
        print(f"  {f'{k}+{k} names':>12} {p50 * 1000:9.2f}ms {mx * 1000:9.2f}ms {cpu * 1000:7.2f}ms "
              f"{rec / 1e3:7.1f}kB {full:14.2f} s {full_cpu:6.2f} s {full / p50:13.0f}x {full_cpu / max(cpu, 1e-6):9.0f}x")
    for records, entries, jbytes, base_s, with_s in jload:
        print(f"  load with a journal of {records:,} records ({entries:,} names, {jbytes / 1e6:.1f} MB): {with_s:.2f} s "
              f"(the base alone {base_s:.2f} s, {(with_s - base_s) * 1000:+.0f} ms; median of 3, interleaved)")


def journal_section(table: Table, rs: RuleSet, rng: random.Random, changes: int, s: AnswerSettings
                    ) -> tuple[list[tuple[int, float, float, int, float, float, float]], list[tuple[int, int, int, float, float]]]:
    """Saves by delta: per k, `changes` changes each saved as one journal record (timed: the
    entries, the write, the fdatasync), the full dump of the last table (the reference, same run);
    then loads with the journal so made, and with one grown to 1,000 records."""
    rows, loads = [], []
    with tempfile.TemporaryDirectory(dir=Path(__file__).resolve().parent) as d:  # the disk, not a tmpfs
        base, jpath = Path(d) / "dns-table.bin", Path(d) / "dns-table.journal"
        _, checksum = table.dump_base(base, {"digest": rs.digest, "names": len(table)})
        pos = JournalPos(checksum)
        serial = 10_000_000
        for k in (1, 10, 1000):
            times, cpus, rec = [], [], 0
            for _ in range(changes):
                serial += 1
                rs, names = change(rs, rng, k, serial)
                table = table.patched(rs, names)
                before = pos.length
                meta = {"digest": rs.digest, "names": len(table), "accepted": "bench"}
                pos, dt, cpu = cpu_timed(lambda: append_journal(  # noqa: B023
                    jpath, pos, table.journal_entries(wire.name_to_wire(n) for n in names), meta))  # noqa: B023
                times.append(dt)
                cpus.append(cpu)
                rec = pos.length - before
            _, full, full_cpu = cpu_timed(lambda: table.dump(Path(d) / "full.bin", {"digest": rs.digest}))  # noqa: B023
            rows.append((k, statistics.median(times), max(times), rec, full, statistics.median(cpus), full_cpu))
        # a journal grown to 1,000 records of a 10-name ticket each: the tickets' names enter a
        # rule set once (one RuleSet patch, not 1,000), then the table takes them 10 at a time
        grow = 1000 - pos.seq
        oid = "tickets/grown"
        new = tuple(sorted(DomainRule(f"g{j}.example", False, frozenset((oid,))) for j in range(10 * grow)))
        o2 = dict(rs.orders)
        o2[oid] = info(oid, "grown")
        rs_grown, _ = rs.patched(RuleDelta(), RuleDelta(domains=new), o2)
        names_of = [{f"g{j}.example" for j in range(10 * i, 10 * i + 10)} for i in range(grow)]
        for target in (pos.seq, 1000):
            while pos.seq < target:
                names = names_of[pos.seq - (1000 - grow)]
                table = table.patched(rs_grown, names)
                pos = append_journal(jpath, pos, table.journal_entries(wire.name_to_wire(n) for n in names),
                                     {"digest": rs_grown.digest, "names": len(table)})
            if pos.seq == 1000:
                rs = rs_grown
            base_t, with_t = [], []
            for _ in range(3):  # interleaved, the median of each: the machine is shared
                base_t.append(timed(lambda: load_table(base, s))[1])
                got, dt = timed(lambda: load_table(base, s, jpath))
                with_t.append(dt)
            base_s, with_s = statistics.median(base_t), statistics.median(with_t)
            assert got.records == pos.seq and got.dropped is None and len(got.table) == len(table)
            loads.append((pos.seq, pos.entries, pos.length, base_s, with_s))
        assert got.table.serves_exactly(rs)  # the journal's table is the one in force, name for name
    return rows, loads


def change(rs: RuleSet, rng: random.Random, k: int, serial: int) -> tuple[RuleSet, set[str]]:
    """k names leave, k enter under a new order (a ticket)."""
    gone = tuple(sorted(rng.sample(rs.domains, k)))
    oid = f"tickets/t{serial}"
    new = tuple(sorted(DomainRule(f"t{serial}-{j}.example", False, frozenset((oid,))) for j in range(k)))
    o2 = dict(rs.orders)
    o2[oid] = info(oid, f"t{serial}")
    rs2, _ = rs.patched(RuleDelta(domains=gone), RuleDelta(domains=new), o2)
    return rs2, {r.name for r in gone} | {r.name for r in new}


if __name__ == "__main__":
    main()
