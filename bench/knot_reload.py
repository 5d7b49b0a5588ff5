"""Knot Resolver's stall while it re-reads blockd's RPZ zone file, against Unbound taking the same
change by IXFR from blockd's primary, measured in the same run (Debian knot-resolver 5.6, unbound 1.17).

    .venv/bin/python bench/knot_reload.py                 # 100,000 names, 5 changes
    .venv/bin/python bench/knot_reload.py --count N --changes K

kresd has no transfer client: `policy.rpz(..., watch=true)` re-parses the whole zone file each
time blockd replaces it, in its one worker, so every query waits meanwhile. A prober thread asks
each resolver for a name it has cached (an allowed .com name), one query after the other, the
whole time; the stall of a change is the longest answer while the resolver takes it. The base
names belong to 1000 orders; each change is a new order of 5 names (10 triggers: name and
*.name each), as court orders arrive. The resolver's clock starts when blockd's `apply` is done
(its files are moved into the watched directory then, `publish`); "enforced" is from there until
the new order's last name answers NXDOMAIN; blockd's apply time is shown apart. A last change
gives every order one more name (every file of every layout changes: the worst case for shards).

Rows:
    knot one-file      the zone as one file (layout one, or the zone of one big authority)
    knot shards-K      the same zone, also written as K shard files (zone_file_shards: K), the
                       names of an order in one shard; kresd loads the shards
    knot split-K       the names over K authorities, layout authority: K zone files
    unbound ixfr       the one zone from blockd's primary by NOTIFY + IXFR (the reference)
"""

from __future__ import annotations

import argparse
import os
import random
import shutil
import statistics
import string
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import replace
from datetime import datetime, timezone
from pathlib import Path

# bench/dns.py would shadow dnspython: drop this directory from sys.path, add the repository.
_HERE = Path(__file__).resolve().parent
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != _HERE]
sys.path.insert(0, str(_HERE.parent))
import dns.exception  # noqa: E402
import dns.message  # noqa: E402
import dns.query  # noqa: E402
import dns.rcode  # noqa: E402

from blockd import logs  # noqa: E402
from blockd.dns import resolvers, rpzconfig  # noqa: E402
from blockd.dns.rpz import RpzSettings  # noqa: E402
from blockd.dns.rpzserver import RpzServer  # noqa: E402
from blockd.dns.testing import LoopThread, Upstream  # noqa: E402
from blockd.enforcers.rpz import RpzEnforcer  # noqa: E402
from blockd.model import DomainRule, OrderInfo, RuleSet  # noqa: E402

T0 = datetime(2026, 1, 1, tzinfo=timezone.utc)
ORDERS = 1000  # orders the base names are spread over
NEW = 5  # names of each new order
CACHED = "www.allowed-name.com"  # answered by the upstream, cached by the resolver; never blocked


def names(n: int, seed: int = 42) -> list[str]:
    rnd = random.Random(seed)
    alphabet = string.ascii_lowercase + string.digits
    out: set[str] = set()
    while len(out) < n:
        out.add("".join(rnd.choices(alphabet, k=rnd.randint(6, 14))) + ".com")
    return sorted(out)


def ruleset(base: list[str], groups: int, changes: int, wide: bool = False) -> RuleSet:
    """`base` spread over ORDERS orders (round robin) of `groups` authorities; then `changes` new
    orders of authority 0 with NEW names each (a court order arriving, as they do one by one)."""
    orders = {f"o{i}": OrderInfo(f"o{i}", "regulator", 1, f"Authority {i % groups}", f"R-{i}", None, "block",
                                 None, None, T0) for i in range(ORDERS)}
    rules = [DomainRule(x, True, frozenset({f"o{i % ORDERS}"})) for i, x in enumerate(base)]
    for c in range(changes):
        orders[f"new{c}"] = OrderInfo(f"new{c}", "regulator", 1, "Authority 0", f"N-{c}", None, "block", None,
                                      None, T0)
        rules += [DomainRule(f"added-{c}-{j}.com", True, frozenset({f"new{c}"})) for j in range(NEW)]
    if wide:  # every base order gains a name: every file of every layout changes
        rules += [DomainRule(f"wide-{i}.com", True, frozenset({f"o{i}"})) for i in range(ORDERS)]
    return RuleSet.build(rules, orders=orders)


PROBE = """
import sys, time, dns.message, dns.query, dns.exception
q = dns.message.make_query(sys.argv[1], "A")
out = sys.stdout
while True:
    t = time.monotonic()
    try:
        dns.query.udp(q, "127.0.0.1", timeout=3, port=int(sys.argv[2]))
    except dns.exception.Timeout:
        pass
    out.write(f"{t:.6f} {time.monotonic() - t:.6f}\\n")
    out.flush()
"""


class Prober:
    """Another process (blockd's apply holds this one's GIL) querying `CACHED` at 127.0.0.1:`port`,
    one query after the other; `samples` are (sent at, seconds), on the shared monotonic clock."""

    def __init__(self, port: int) -> None:
        self.proc = subprocess.Popen([sys.executable, "-c", PROBE, CACHED, str(port)], stdout=subprocess.PIPE,
                                     text=True)
        self.samples: list[tuple[float, float]] = []
        self.reader = threading.Thread(target=self._read, daemon=True)
        self.reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            t, s = line.split()
            self.samples.append((float(t), float(s)))

    def window(self, a: float, b: float) -> list[float]:
        return [s for t, s in list(self.samples) if a <= t <= b]

    def stop(self) -> None:
        self.proc.terminate()
        self.proc.wait(10)
        self.reader.join(10)


def publish(stage: Path, watch: Path, watched: frozenset[str] = frozenset()) -> int:
    """Move what blockd wrote into `stage` to the directory kresd watches: each file that differs
    from its copy there is hard-linked to a temporary name and renamed over it (one rename per
    file, as blockd's own atomic write ends), so the resolver's clock starts after blockd's apply.
    Returns how many of the `watched` (by kresd) were replaced."""
    n = 0
    for f in sorted(stage.iterdir()):
        if f.name.startswith(".") or not f.name.startswith("rpz") and "zone" not in f.name:
            continue
        dst = watch / f.name
        if dst.exists() and dst.read_bytes() == f.read_bytes():
            continue
        tmp = watch / f".tmp-{f.name}"
        os.link(f, tmp)
        os.replace(tmp, dst)
        n += f.name in watched
    return n


def run_row(label: str, kind: str, tmp: Path, up: Upstream, lt: LoopThread, base: list[str], groups: int,
            shards: int, changes: int) -> dict[str, object]:
    d = tmp / label
    stage, watch = d / "stage", d / "watch"
    stage.mkdir(parents=True)
    watch.mkdir()
    layout = "one" if groups == 1 else "authority"
    port = resolvers.free_port()
    settings = RpzSettings(listen=(("127.0.0.1", 0),), layout=layout, zone="rpz.blockd.",
                           zone_file=str(stage / ("{zone}zone" if layout != "one" else "rpz.blockd.zone")),
                           zone_file_shards=shards, state_file=str(d / "rpz.state"), renotify_s=0,
                           notify=(("127.0.0.1", port),) if kind == "unbound" else ())
    srv = RpzServer(settings)
    lt.run(srv.start())
    enf = RpzEnforcer(srv)
    lt.run(enf.apply(ruleset(base, groups, 0)), timeout=3600)
    publish(stage, watch)
    if kind == "knot":
        zones = rpzconfig.zones_for(replace(settings, zone_file=settings.zone_file.replace(str(stage), str(watch))),
                                    ruleset(base, groups, 0))
        policies = "log_level('info')\n" + rpzconfig.render("knot", settings, zones, ("127.0.0.1", 53))
        watched = frozenset(p.name for p in watch.iterdir() if f'"{p}", true))' in policies)
        proc = resolvers.start("kresd", d, resolvers.kresd_conf(("127.0.0.1", port), up.port, policies))
    else:
        conf = resolvers.unbound_conf(d, ("127.0.0.1", port), up.port, primary=("127.0.0.1", srv.addresses[0][1]))
        proc = resolvers.start("unbound", d, conf)
        watched = frozenset()
    out: dict[str, object] = {"label": label}
    try:
        t = time.monotonic()
        resolvers.wait_nxdomain(proc, port, "www." + base[len(base) // 2], timeout=600, log=d / "log",
                                query_timeout=1)
        out["load_s"] = time.monotonic() - t
        dns.query.udp(dns.message.make_query(CACHED, "A"), "127.0.0.1", timeout=5, port=port)  # now cached
        prober = Prober(port)
        while len(prober.samples) < 2000:  # a baseline: 2000 answers with nothing changing
            time.sleep(0.05)  # poll interval for the sample count
        base_lat = [s for _, s in prober.samples]
        stalls, enforced, applies, files = [], [], [], []
        for i in range(changes):
            applied = lt.run(enf.apply(ruleset(base, groups, i + 1)), timeout=3600)
            applies.append(applied.duration_s)
            t = time.monotonic()  # blockd's part is done: the NOTIFY is out, the files are renamed now
            files.append(publish(stage, watch, watched) if kind == "knot" else 0)
            enforced.append(resolvers.wait_nxdomain(proc, port, f"added-{i}-{NEW - 1}.com", t0=t, timeout=120, log=d / "log",
                                                    query_timeout=5))
            n = len(prober.samples)
            while len(prober.samples) < n + 500:  # the prober answered 500 more since: the reload is behind it
                time.sleep(0.05)  # poll interval for the sample count
            stalls.append(max(prober.window(t - 0.01, time.monotonic())))
        # the wide change: every order gains a name
        applied = lt.run(enf.apply(ruleset(base, groups, changes, wide=True)), timeout=3600)
        t = time.monotonic()
        wide_files = publish(stage, watch, watched) if kind == "knot" else 0
        wide_enf = resolvers.wait_nxdomain(proc, port, f"wide-{ORDERS - 1}.com", t0=t, timeout=120, log=d / "log",
                                           query_timeout=5)
        n = len(prober.samples)
        while len(prober.samples) < n + 500:
            time.sleep(0.05)  # poll interval for the sample count
        wide_stall = max(prober.window(t - 0.01, time.monotonic()))
        prober.stop()
        out.update(wide=(wide_stall, wide_enf, wide_files),base_p50=statistics.median(base_lat), base_p99=sorted(base_lat)[int(len(base_lat) * 0.99)],
                   base_max=max(base_lat), stalls=stalls, enforced=enforced, applies=applies, files=files,
                   reloads=(d / "log").read_text(errors="replace").count("RPZ reloading"))
    finally:
        resolvers.stop(proc, timeout=30)
        lt.run(srv.aclose())
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--count", type=int, default=100_000, help="names in the zone(s) (default 100,000)")
    ap.add_argument("--changes", type=int, default=5)
    ap.add_argument("--split", type=int, default=10, help="authorities (zones) of the split row (default 10)")
    ap.add_argument("--shards", type=int, default=16, help="zone_file_shards of the shard row (default 16)")
    args = ap.parse_args()
    logs.configure(json=False, level="warning")
    base = names(args.count)
    tmp = Path(tempfile.mkdtemp(prefix="bench-knot-"))
    lt = LoopThread()
    up = Upstream("com")
    lt.run(up.start())
    rows = []
    try:
        for label, kind, groups, shards in (("knot one-file", "knot", 1, 1),
                                            (f"knot zone_file_shards={args.shards}", "knot", 1, args.shards),
                                            (f"knot split-{args.split} (layout authority)", "knot", args.split, 1),
                                            ("unbound ixfr", "unbound", 1, 1)):
            r = run_row(label.split()[1].replace("=", "-"), kind, tmp, up, lt, base, groups, shards, args.changes)
            r["label"] = label
            rows.append(r)
            print(f"# {label}: {r}", flush=True)
    finally:
        lt.run(up.aclose())
        lt.close()
    ref = rows[-1]
    print(f"\n{args.count:,} names ({2 * args.count:,} triggers), {ORDERS} orders; {args.changes} changes, each a new order "
          f"of {NEW} names (cumulative); "
          "latency of a cached name, one query after the other")
    print("| row | idle p50 / p99 ms | stall per new order: median / max ms | max vs unbound | enforced p50 s | "
          "files replaced per change | blockd apply p50 s | every order +1 name: stall ms, enforced s, files |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        st = r["stalls"]
        print(f"| {r['label']} | {r['base_p50'] * 1000:.1f} / {r['base_p99'] * 1000:.1f} | "  # type: ignore[operator]
              f"{statistics.median(st) * 1000:.0f} / {max(st) * 1000:.0f} | "  # type: ignore[arg-type]
              f"{max(st) / max(ref['stalls']):.1f}x | {statistics.median(r['enforced']):.2f} | "  # type: ignore[arg-type]
              f"{statistics.median(r['files']) if r['label'].startswith('knot') else 'IXFR'} "  # type: ignore[union-attr,arg-type]
              f"({r['reloads']} kresd reloads in all) | {statistics.median(r['applies']):.2f} | "  # type: ignore[arg-type]
              "{:.0f}, {:.2f}, {} |".format(r["wide"][0] * 1000, r["wide"][1], r["wide"][2]))  # type: ignore[index]
    shutil.rmtree(tmp, ignore_errors=True)


if __name__ == "__main__":
    main()
