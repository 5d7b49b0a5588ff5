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
from blockd.dns.table import AnswerSettings, Table  # noqa: E402
from blockd.model import DomainRule, OrderInfo, RuleDelta, RuleSet  # noqa: E402

T0 = datetime(2026, 1, 1, tzinfo=timezone.utc)


def info(oid: str, ref: str) -> OrderInfo:
    return OrderInfo(oid, oid.split("/")[0], 1, "Bench Registry", ref, None, "block", None, None, T0)


def timed(fn):  # noqa: ANN001, ANN201
    t = time.perf_counter()
    out = fn()
    return out, time.perf_counter() - t


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
    rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    print(f"\nblockd sinkhole table, {n:,} names, one order each (machine: 2 cores, busy; peak RSS {rss:.0f} MiB)")
    print(f"  build {build_s:.2f} s; full read-back of the names (digest) {parts_s:.2f} s")
    print(f"  {'change':>12} {'patch p50':>11} {'patch max':>11} {'rebuild (ref)':>14} {'rebuild / patch':>16}")
    for k, p50, mx in rows:
        print(f"  {f'{k}+{k} names':>12} {p50 * 1000:9.2f}ms {mx * 1000:9.2f}ms {rebuild_s:12.2f} s {rebuild_s / p50:15.0f}x")
    print(f"  merge of an overlay of {overlay:,} entries (background, in slices) {merge_s:.2f} s")
    print(f"  save {size / 1e6:.0f} MB: first {dump1_s:.2f} s, again after a change {dump2_s:.2f} s; "
          f"load {load_s:.2f} s (build instead: {build_s:.2f} s, {build_s / load_s:.1f}x)")


if __name__ == "__main__":
    main()
