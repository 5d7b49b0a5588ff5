"""The sinkhole's latency while the daemon runs a pass (issue: "answering in under 10 ms p99
while a pass runs"), against Unbound holding the same names, under the same dnsperf load.

    .venv/bin/python bench/pass_latency.py            # 1M names
    .venv/bin/python bench/pass_latency.py --quick    # 100k names

The real daemon (`blockd run`, DNS enforcer only, on loopback) starts with one signed policy of
N blocked names. dnsperf (-c 8 -q 200, blocked names) then runs twice against it: idle, and over
a window in which a new serial (10 more names) lands and the daemon verifies, parses, expands,
merges and swaps the table. The pass's own duration comes from the daemon's log. Unbound
(local-zone always_nxdomain, 1 thread) under the same load is the reference. No fixed waits:
every step polls for its condition with a generous deadline.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import string
import subprocess
import sys
import tempfile
import time
from pathlib import Path

_HERE = Path(__file__).resolve().parent
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != _HERE]
sys.path.insert(0, str(_HERE.parent))
from blockd import minisign  # noqa: E402
from blockd.dns import resolvers  # noqa: E402

ROOT = _HERE.parent
KEY = minisign.parse_secret_key((ROOT / "policies/keys/demo-regulator.key").read_text())


def policy(serial: int, names: list[str], added: list[str] = ()) -> str:  # type: ignore[assignment]
    """One order holding `names` (the same id and reference in every serial, so a new serial
    changes only what it adds), plus an order for `added`, if any: a small change."""
    def order(oid: str, ref: str, ns: list[str]) -> str:
        body = "\n".join(f"        - {n}" for n in ns)
        return (f"  - id: {oid}\n    legal_basis: {{authority: Bench Court, reference: {ref}}}\n"
                f"    action: block\n    targets:\n      domains:\n{body}\n")
    return (f"issuer: demo-regulator\nserial: {serial}\nissued_at: 2026-01-01T00:00:00Z\n"
            f"not_before: 2026-01-01T00:00:00Z\nnot_after: 2030-01-01T00:00:00Z\norders:\n"
            + order("bench", "B-1", names) + (order(f"bench-{serial}", f"B-{serial}", added) if added else ""))


def drop(directory: Path, name: str, text: str) -> None:
    data = text.encode()
    (directory / f".{name}.minisig").write_text(minisign.sign(data, KEY, trusted_comment=f"file:{name}"))
    os.replace(directory / f".{name}.minisig", directory / f"{name}.minisig")
    (directory / f".{name}").write_bytes(data)
    os.replace(directory / f".{name}", directory / name)


def wait(check, timeout: float, what: str, every: float = 0.2) -> None:  # noqa: ANN001
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return
        time.sleep(every)
    raise SystemExit(f"timed out after {timeout:.0f} s waiting for {what}")


def nxdomain(port: int, name: str) -> bool:
    out = subprocess.run(["dig", f"@127.0.0.1", "-p", str(port), name, "A", "+tries=1", "+time=1"],
                         capture_output=True, text=True).stdout
    return "status: NXDOMAIN" in out


def dnsperf(port: int, qfile: Path, seconds: float) -> dict[str, float]:
    cmd = ["dnsperf", "-s", "127.0.0.1", "-p", str(port), "-d", str(qfile), "-l", str(seconds), "-c", "8",
           "-q", "200", "-e", "-v"]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=seconds + 120).stdout
    lat = sorted(float(line.rsplit(" ", 1)[1]) for line in out.splitlines()
                 if line.startswith("> ") and line.rsplit(" ", 1)[1][:1].isdigit())
    lost = sum(1 for line in out.splitlines() if line.startswith("> T"))
    if not lat:
        return {"n": 0, "lost": lost}
    pick = lambda p: lat[min(len(lat) - 1, int(len(lat) * p / 100))] * 1000  # noqa: E731
    return {"n": len(lat), "lost": lost, "p50": pick(50), "p99": pick(99), "p99.9": pick(99.9), "max": lat[-1] * 1000}


def events(log: Path, name: str) -> list[dict[str, object]]:
    out = []
    for line in log.read_text(errors="replace").splitlines():
        if line.startswith("{"):
            try:
                e = json.loads(line)
            except ValueError:
                continue  # a line being written
            if e.get("event") == name:
                out.append(e)
    return out


def passes(log: Path) -> list[dict[str, object]]:
    return events(log, "reconcile_pass")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true", help="100k names instead of 1M")
    ap.add_argument("--names", type=int, help="blocked names (default 1,000,000)")
    ap.add_argument("--profile", metavar="FILE", help="py-spy record (--gil, raw) of the daemon over the window")
    args = ap.parse_args()
    n = args.names or (100_000 if args.quick else 1_000_000)
    rnd = random.Random(7)
    alphabet = string.ascii_lowercase + string.digits
    names: set[str] = set()
    while len(names) < n + 10:
        names.add("".join(rnd.choices(alphabet, k=rnd.randint(6, 14))) + "." + rnd.choice(("com", "net", "org", "ru")))
    base, extra = sorted(names)[:n], sorted(names)[n:]
    with tempfile.TemporaryDirectory(prefix="blockd-pass-latency-") as tmp_s:
        tmp = Path(tmp_s)
        pol = tmp / "policies"
        pol.mkdir()
        qfile = tmp / "q.txt"
        qfile.write_text("".join(f"{rnd.choice(base)} A\n" for _ in range(50_000)))
        port = resolvers.free_port()
        p = ROOT / "policies"
        (tmp / "blockd.yaml").write_text(
            f"trust_store: {p / 'trust'}\npolicy_dir: {pol}\ncatalog_dir: {p / 'catalog'}\n"
            f"prefix_table: {p / 'asn/prefix2as.txt'}\nshared_infra_dir: {p / 'shared-infra'}\nstate_dir: {tmp / 'state'}\n"
            f"guards: {{growth_floor: {10 * n}}}\nenforcers:\n  dns: {{listen: [\"127.0.0.1:{port}\"]}}\n"
            f"daemon: {{metrics_listen: null, drift_check_s: 3600}}\n")
        drop(pol, "p.yaml", policy(1, base))
        log = tmp / "blockd.log"
        t0 = time.monotonic()
        with open(log, "wb") as out:
            daemon = subprocess.Popen([sys.executable, "-m", "blockd", "run", "--config", str(tmp / "blockd.yaml")],
                                      stdout=out, stderr=subprocess.STDOUT, cwd=ROOT)
        try:
            wait(lambda: nxdomain(port, base[0]), 1800, "the daemon to answer")
            start_s = time.monotonic() - t0
            idle = dnsperf(port, qfile, 8)
            # The window: dnsperf runs while a new serial lands and is enforced.
            window = max(20.0, 3 * float(passes(log)[0]["duration_s"]))  # type: ignore[arg-type]
            perf = subprocess.Popen([sys.executable, "-c", f"import json,sys; sys.path.insert(0,{str(_HERE)!r});"
                                     f"from pass_latency import dnsperf; print(json.dumps(dnsperf({port},"
                                     f"__import__('pathlib').Path({str(qfile)!r}),{window})))"],
                                    stdout=subprocess.PIPE, text=True, cwd=ROOT)
            spy = None
            if args.profile:  # what runs (and holds the GIL) in the daemon during the window
                spy = subprocess.Popen(["py-spy", "record", "--nonblocking", "--threads", "--gil", "-f", "raw",
                                        "-r", "250", "-d", str(int(window)), "-o", args.profile, "-p",
                                        str(daemon.pid)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            time.sleep(1.0)  # the load is under way before the change lands (not a wait for a condition)
            n_before = len(passes(log))
            t_drop = time.monotonic()
            drop(pol, "p.yaml", policy(2, base, extra))
            wait(lambda: nxdomain(port, extra[0]), 1800, "the new serial to be answered")
            live_s = time.monotonic() - t_drop
            during = json.loads(perf.communicate(timeout=window + 300)[0])
            if spy is not None:
                spy.wait(window + 60)
            changed = [e for e in passes(log)[n_before:] if e.get("changed")]
            pass_s = float((changed or passes(log)[-1:])[0]["duration_s"])  # type: ignore[arg-type]
            patched = [e for e in events(log, "dns_table_patched") if e.get("names_touched")]
            n_before = len(passes(log))
            # A restart: SIGTERM, launch again; the sinkhole answers from its persisted table
            # (state_dir/dns-table.bin) before the first pass is done.
            daemon.terminate()
            daemon.wait(120)
            t1 = time.monotonic()
            with open(log, "ab") as out:
                daemon = subprocess.Popen([sys.executable, "-m", "blockd", "run", "--config",
                                           str(tmp / "blockd.yaml")], stdout=out, stderr=subprocess.STDOUT, cwd=ROOT)
            wait(lambda: nxdomain(port, extra[0]), 1800, "the restarted daemon to answer", every=0.02)
            restart_s = time.monotonic() - t1
            restored = events(log, "dns_table_restored")
            wait(lambda: len(passes(log)) > n_before, 1800, "the restarted daemon's first pass")
            first_pass_s = time.monotonic() - t1
        finally:
            daemon.terminate()
            daemon.wait(120)
        # Unbound, same names, same load (idle): the reference.
        lz = tmp / "lz.conf"
        lz.write_text("".join(f'local-zone: "{x}." always_nxdomain\n' for x in base))
        uport = resolvers.free_port()
        conf = resolvers.unbound_conf(tmp, ("127.0.0.1", uport), resolvers.free_port(), None, modules="iterator",
                                      pidfile="unbound.pid",
                                      server=("num-queries-per-thread: 4096", "verbosity: 0", f'include: "{lz}"'))
        unbound = resolvers.start("unbound", tmp / "unbound", conf)
        try:
            wait(lambda: nxdomain(uport, base[0]), 1800, "unbound to answer")
            ref = dnsperf(uport, qfile, 8)
        finally:
            resolvers.stop(unbound)
    print(f"\nblockd sinkhole latency during a pass, {n:,} names (machine: {os.cpu_count()} cores, {os.uname().release})")
    print(f"  daemon start to first answer {start_s:.1f} s (empty state); new serial (+10 names) live after "
          f"{live_s:.2f} s (pass {pass_s:.2f} s)")
    if patched:
        p = patched[-1]
        print(f"  sinkhole patch: {p['names_touched']} names touched in {float(p['patch_s']) * 1000:.1f} ms "  # type: ignore[arg-type]
              f"(apply {float(p['duration_s']) * 1000:.1f} ms with the read-back of those names)")  # type: ignore[arg-type]
    load = f", table loaded in {float(restored[-1]['load_s']):.2f} s" if restored else " (no table restored)"  # type: ignore[arg-type]
    print(f"  restart (SIGTERM, launch) to first answer {restart_s:.2f} s{load}; its first pass done after "
          f"{first_pass_s:.1f} s")
    print(f"  {'':18} {'p50 ms':>8} {'p99 ms':>8} {'p99.9 ms':>9} {'max ms':>8} {'lost':>6}")
    for label, r in (("blockd idle", idle), ("blockd during pass", during), ("unbound idle", ref)):
        print(f"  {label:18} {r.get('p50', float('nan')):8.2f} {r.get('p99', float('nan')):8.2f} "
              f"{r.get('p99.9', float('nan')):9.2f} {r.get('max', float('nan')):8.2f} {r['lost']:6.0f}")
    print(f"  ratio p99 during pass / unbound idle: {during.get('p99', float('nan')) / ref.get('p99', float('nan')):.1f}x"
          f"   (target: p99 under 10 ms during the pass)")


if __name__ == "__main__":
    main()
