"""Scale-out benchmark, RPZ part: a 1M-name zone from blockd's RPZ primary to Unbound and BIND,
beside each resolver loading the same zone from a file (the native way), in the same run.

    .venv/bin/python bench/rpz_fleet.py            # 1,000,000 names (2,000,000 triggers)
    .venv/bin/python bench/rpz_fleet.py --quick    # 100,000 names
    .venv/bin/python bench/rpz_fleet.py --count N --no-bind

Every name blocks its subtree, so the zone holds `name CNAME .` and `*.name CNAME .` (2 RRs per
name, as in the field notes). blockd's primary (RpzServer + RpzEnforcer) runs in this process on
a loop thread and writes the zone file the native rows load, so both paths carry the same zone.
Each row starts one resolver process (on 127.0.0.1, forwarding everything else to a local
upstream that answers every .com name, the probes' TLD, so an NXDOMAIN can only come from the RPZ) and the clock runs
from process start until a name from the zone answers NXDOMAIN; RSS is read right after.

    unbound  axfr     `rpz: primary:` blockd, no zone file yet: AXFR, cold
    unbound  file     `rpz: zonefile:` the zone file only, no primary (native)
    unbound  restart  primary + the zone file it saved in the axfr row (serial unchanged)
    unbound  ixfr     on the restarted Unbound: apply +10 names (with the Change, as the daemon
                      does: the delta path), NOTIFY -> IXFR, until a new name answers NXDOMAIN
                      (clock from `apply`; blockd's apply is shown in the row)
    bind     axfr / file / ixfr   the same with named 9.18 (`type secondary` vs `type primary`)

Resolvers run one at a time (the box has 2 cores). blockd's own cost is shown apart: `apply`
(owner set, zone file, state) and the first AXFR render (done lazily on the first transfer).
"""

from __future__ import annotations

import argparse
import random
import shutil
import string
import sys
import tempfile
import time
from pathlib import Path

# bench/dns.py would shadow dnspython: drop this directory from sys.path, add the repository.
_HERE = Path(__file__).resolve().parent
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != _HERE]
sys.path.insert(0, str(_HERE.parent))
from blockd import logs  # noqa: E402
from blockd.dns import resolvers  # noqa: E402
from blockd.dns.rpz import RpzSettings  # noqa: E402
from blockd.dns.rpzserver import RpzServer  # noqa: E402
from blockd.dns.testing import LoopThread, Upstream  # noqa: E402
from blockd.enforcers.rpz import RpzEnforcer  # noqa: E402
from blockd.model import DomainRule, RuleSet  # noqa: E402
from blockd.reconcile import full_change  # noqa: E402

TLDS = ("com", "net", "org", "ru", "site", "info", "xyz", "club")


def names(n: int, seed: int = 42) -> list[str]:
    rnd = random.Random(seed)
    alphabet = string.ascii_lowercase + string.digits
    out: set[str] = set()
    while len(out) < n:
        out.add("".join(rnd.choices(alphabet, k=rnd.randint(6, 14))) + "." + rnd.choice(TLDS))
    return sorted(out)


def ruleset(lst: list[str]) -> RuleSet:
    none: frozenset[str] = frozenset()
    return RuleSet.build([DomainRule(x, True, none) for x in lst])


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


class Resolver:
    """One Unbound or named process with its own directory and port; its RPZ comes from the primary on
    127.0.0.1:`primary` (a secondary) or from `zone_file`."""

    def __init__(self, kind: str, d: Path, upstream: int, *, primary: int | None = None,
                 zone_file: Path | None = None, port: int | None = None) -> None:
        self.kind, self.dir, self.port = kind, d, port or resolvers.free_port()
        listen = ("127.0.0.1", self.port)
        src = ("127.0.0.1", primary) if primary else None
        if kind == "unbound":
            conf = resolvers.unbound_conf(d, listen, upstream, primary=src, zone_file=zone_file)
        else:
            conf = resolvers.named_conf(d, listen, upstream, primary=src, zone_file=zone_file)
        self.log = d / "log"
        self.t0 = time.monotonic()
        self.proc = resolvers.start("unbound" if kind == "unbound" else "named", d, conf)

    def until_blocked(self, qname: str, t0: float | None = None) -> float:
        return resolvers.wait_nxdomain(self.proc, self.port, qname, t0=self.t0 if t0 is None else t0,
                                       log=self.log, query_timeout=0.05)

    def rss(self) -> float:
        return rss_mib(self.proc.pid)

    def stop(self) -> None:
        resolvers.stop(self.proc, timeout=60)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="100k names")
    ap.add_argument("--count", type=int, help="names (default 1,000,000; --quick 100,000)")
    ap.add_argument("--no-bind", action="store_true", help="Unbound rows only")
    args = ap.parse_args()
    logs.configure(json=False, level="warning")
    n = args.count or (100_000 if args.quick else 1_000_000)
    tmp = Path(tempfile.mkdtemp(prefix="bench-rpz-fleet-"))
    t0 = time.monotonic()
    base = names(n)
    extra = [f"added-{i}.com" for i in range(10)]  # 'added-' cannot be generated: no '-' in the alphabet
    rs, rs2 = ruleset(base), ruleset(base + extra)
    probe = "www." + next(x for x in base[len(base) // 2:] if x.endswith(".com"))
    probe2 = extra[0]
    print(f"# {n:,} names ({2 * n:,} triggers), generated in {time.monotonic() - t0:.1f} s; tmp {tmp}", flush=True)

    lt = LoopThread()
    up = Upstream("com")  # answers every .com name (the probes): an NXDOMAIN can only come from the RPZ
    lt.run(up.start())
    zone_file = tmp / "rpz.blockd.zone"
    notify: list[tuple[str, int]] = []
    settings = RpzSettings(listen=(("127.0.0.1", 0),), zone_file=str(zone_file), state_file=str(tmp / "rpz.state"),
                           renotify_s=0)
    rows: list[tuple[str, str, float, float]] = []  # (resolver, row, seconds, RSS MiB)
    procs: list[Resolver] = []
    srv: RpzServer | None = None
    try:
        # The primary; notify targets are set once the resolvers' ports are known (settings are frozen).
        ub_dir, bind_dir = tmp / "unbound", tmp / "bind"
        ports = {"unbound": resolvers.free_port(), "bind": resolvers.free_port()}
        notify = [("127.0.0.1", p) for p in ports.values()]
        from dataclasses import replace

        srv = RpzServer(replace(settings, notify=tuple(notify)))
        lt.run(srv.start())
        enf = RpzEnforcer(srv)
        primary = srv.addresses[0][1]
        t = time.monotonic()
        lt.run(enf.apply(rs), timeout=3600)
        apply_s = time.monotonic() - t
        t = time.monotonic()
        assert srv.version is not None
        srv.version.axfr_bodies()
        render_s = time.monotonic() - t
        print(f"# blockd apply {apply_s:.2f} s (zone file {zone_file.stat().st_size / 1e6:.0f} MB), "
              f"AXFR render {render_s:.2f} s", flush=True)

        def run(kind: str, row: str, d: Path, *, primary: int | None = None, zone_file: Path | None = None,
                port: int | None = None, keep: bool = False) -> Resolver:
            r = Resolver(kind, d, up.port, primary=primary, zone_file=zone_file, port=port)
            procs.append(r)
            took = r.until_blocked(probe)
            rss = r.rss()
            rows.append((kind, row, took, rss))
            print(f"# {kind} {row}: {took:.2f} s, RSS {rss:.0f} MiB", flush=True)
            if not keep:
                r.stop()
                procs.remove(r)
            return r

        change = full_change(rs, rs2)  # what the daemon's merge hands the enforcers (computed before the clock)

        def ixfr(r: Resolver) -> None:
            before = srv.stats["ixfr"] if srv else 0
            t = time.monotonic()
            a = lt.run(enf.apply(rs2, change), timeout=3600)
            took = r.until_blocked(probe2, t)
            kind = "ixfr" if srv and srv.stats["ixfr"] > before else "full"
            rows.append((r.kind, f"{kind} (+10 names; blockd apply {a.duration_s:.2f} s of it)", took, r.rss()))
            print(f"# {r.kind} {kind} +10 names: {took:.2f} s (apply {a.duration_s:.2f} s)", flush=True)
            lt.run(enf.apply(rs, full_change(rs2, rs)), timeout=3600)  # back to the base zone for the next rows

        run("unbound", "axfr", ub_dir, primary=primary, port=ports["unbound"])
        run("unbound", "file", tmp / "unbound-file", zone_file=zone_file)
        r = run("unbound", "restart", ub_dir, primary=primary, port=ports["unbound"], keep=True)
        ixfr(r)
        r.stop()
        procs.remove(r)
        if not args.no_bind:
            r = run("bind", "axfr", bind_dir, primary=primary, port=ports["bind"], keep=True)
            ixfr(r)
            r.stop()
            procs.remove(r)
            run("bind", "file", tmp / "bind-file", zone_file=zone_file)
    finally:
        for p in procs:
            p.stop()
        if srv is not None:
            lt.run(srv.aclose())
        lt.run(up.aclose())
        lt.close()
    report(rows, n, apply_s, render_s, dict(srv.stats) if srv else {})
    shutil.rmtree(tmp, ignore_errors=True)


def report(rows: list[tuple[str, str, float, float]], n: int, apply_s: float, render_s: float,
           stats: dict[str, int]) -> None:
    by = {(k, r): (s, m) for k, r, s, m in rows}
    print(f"\n| resolver | {n:,} names ({2 * n:,} triggers) | until NXDOMAIN | RSS MiB | vs native file load |")
    print("|---|---|---|---|---|")
    for kind, row, s, m in rows:
        native = by.get((kind, "file"))
        ratio = f"{s / native[0]:.2f}x time, {m / native[1]:.2f}x RSS" if native and row != "file" else ""
        print(f"| {kind} | {row} | {s:.2f} s | {m:.0f} | {ratio} |")
    print(f"\nblockd primary: apply {apply_s:.2f} s, first AXFR render {render_s:.2f} s; transfers served: "
          f"axfr {stats.get('axfr', 0)}, ixfr {stats.get('ixfr', 0)}, ixfr_as_axfr {stats.get('ixfr_as_axfr', 0)}")


if __name__ == "__main__":
    main()
