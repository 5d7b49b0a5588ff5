"""What the reconciler holds at registry scale (issue 14: "daemon RSS under 1.5 GiB, say what
dominates"), by type.

    python bench/memory.py [--n 100000] [--top 20]

The registry of bench/scale.py (`registry_orders(N)`: one order per decision), signed and
dropped into a policy directory; one in-process pass of the reconciler (verify, parse, prepare,
merge, record; no enforcers: their share is the daemon's RSS minus this). Then every object
reachable from the Reconciler is visited once (gc.get_referents from it, so strings, ints and
tuples of atoms, which the collector does not track, are counted too) and summed by type
(sys.getsizeof, the object itself; a dict's or list's table is in its own size), and by holder
(`HOLDERS`: the parses, the prepared policies, the order cache, the rule set, the merger; an
object two hold is counted with the first). Printed: the process RSS before and after the
pass, the reachable total, per holder and per type with count, MiB and bytes per order.
"""

from __future__ import annotations

import argparse
import gc
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

if sys.path[0] == str(Path(__file__).resolve().parent):
    sys.path.pop(0)  # bench/dns.py must not shadow dnspython
sys.path.append(str(Path(__file__).resolve().parent))
import scale  # noqa: E402
from common import memory_mib  # noqa: E402

from blockd.reconcile import Reconciler  # noqa: E402
from blockd.settings import load_settings  # noqa: E402


def reachable(root: object, seen: set[int]) -> tuple[Counter[str], Counter[str]]:
    """(type -> count, type -> bytes) over every object reachable from `root` not in `seen`,
    each once (added to `seen`). Classes, modules and functions are not followed: they are
    the program, not the data."""
    count: Counter[str] = Counter()
    size: Counter[str] = Counter()
    stack = [root]
    skip = (type, type(sys), type(memory_mib))
    while stack:
        obj = stack.pop()
        if id(obj) in seen:
            continue
        seen.add(id(obj))
        if isinstance(obj, skip):
            continue
        name = type(obj).__name__
        count[name] += 1
        size[name] += sys.getsizeof(obj)
        stack.extend(gc.get_referents(obj))
    return count, size


#: the Reconciler's holdings, in the order they are attributed (an object shared by two is
#: counted with the first): the parses (the Policy objects, one Order per decision, and the
#: verified bytes), the prepared policies (expansions, findings), the per-order cache for the
#: next serial, the rule set (rules, order sets, digests), and what the merge by delta keeps
HOLDERS = [("parsed files: Policy, its Orders, the verified bytes", "_parsed"),
           ("prepared policies: expansions, findings", "_prepared"),
           ("the order cache for the next serial", "_order_entries"),
           ("the rule set: rules, order sets, digests", "desired"),
           ("the merge by delta's state", "_merger")]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--n", type=int, default=100_000)
    ap.add_argument("--top", type=int, default=20)
    args = ap.parse_args()
    n = args.n
    work = Path(tempfile.mkdtemp(prefix=f"blockd-memory-{n}-"))
    scale.config(work)
    text, _, _ = scale.registry_orders(n)
    scale.sign_and_drop(work / "policies", "registry.yaml", text, "registry")
    file_mb = len(text) / 1e6
    del text
    reconciler = Reconciler(load_settings(work / "blockd.yaml"), [])
    gc.collect()
    before = memory_mib()["VmRSS"]
    t0 = time.perf_counter()
    gc.disable()  # as the daemon runs a pass (blockd.daemon: the collector is off, then frozen)
    sel, comp, failures = reconciler._prepare(reconciler.now())
    reconciler.desired = comp.ruleset
    gc.freeze()
    gc.enable()
    took = time.perf_counter() - t0
    if failures:
        raise SystemExit(f"the pass refused inputs: {failures}")
    after = memory_mib()["VmRSS"]
    del sel, comp
    seen: set[int] = set()
    parts = [(label, *reachable(getattr(reconciler, attr), seen)) for label, attr in HOLDERS]
    parts.append(("everything else it holds", *reachable(reconciler, seen)))
    count: Counter[str] = Counter()
    size: Counter[str] = Counter()
    for _, c, b in parts:
        count.update(c)
        size.update(b)
    total = sum(size.values())
    print(f"\n## What the reconciler holds after its first pass, N = {n:,} orders ({file_mb:.1f} MB policy)\n")
    print(f"- pass: {took:.1f} s; process RSS {before:,.0f} MiB before, {after:,.0f} MiB after "
          f"(+{after - before:,.0f} MiB)")
    print(f"- reachable from the Reconciler: {total / 2**20:,.0f} MiB in {sum(count.values()):,} objects, "
          f"{total / n:,.0f} bytes and {sum(count.values()) / n:.1f} objects per order\n")
    print("| held by | MiB | bytes per order | largest types (MiB) |")
    print("|---|---|---|---|")
    for label, c, b in parts:
        big = ", ".join(f"{t} {v / 2**20:,.0f}" for t, v in b.most_common(4))
        print(f"| {label} | {sum(b.values()) / 2**20:,.1f} | {sum(b.values()) / n:,.0f} | {big} |")
    print("\n| type | objects | MiB | bytes per order |")
    print("|---|---|---|---|")
    for name, b in size.most_common(args.top):
        print(f"| {name} | {count[name]:,} | {b / 2**20:,.1f} | {b / n:,.0f} |")

if __name__ == "__main__":
    main()
