"""DNS benchmark: blockd's sinkhole vs Unbound (1 thread) holding the same blocked names.

    .venv/bin/python bench/dns.py            # 1M names, 3 runs x 10 s per server and query file
    .venv/bin/python bench/dns.py --quick    # 100k names, 1 run x 4 s

Servers, each loaded with the same N names (every name blocks its whole subtree):
  blockd          python -m blockd.dns (uvloop), EDE attached to every blocked answer
  unbound-rpz     RPZ zone file (name CNAME . and *.name CNAME .), module-config "respip iterator"
  unbound-lz      1M `local-zone: "name." always_nxdomain`
Query files (identical for every server, EDNS on, dnsperf -c 8 -q 200):
  blocked   names drawn from the list, half of them with a `www.` label in front
  cached    100 names under example.net, forwarded once to a local upstream, then cache hits
Reported: wall qps (median of runs), latency percentiles (dnsperf -v), queries per server-CPU
second (utime+stime of the server process), RSS after the runs, load time (process start to the
first blocked answer; for blockd also the table build alone). Ratios are against Unbound
measured in the same run.
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
import time
from pathlib import Path

# This file is named dns.py: drop its directory from sys.path so `import dns` (in blockd.dns.resolvers)
# finds dnspython, and add the repository.
_HERE = Path(__file__).resolve().parent
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != _HERE]
sys.path.insert(0, str(_HERE.parent))
from blockd.dns import resolvers  # noqa: E402
from blockd.dns.testing import LoopThread, Upstream  # noqa: E402

TLDS = ("com", "net", "org", "ru", "site", "info", "xyz", "club")
CLK = os.sysconf("SC_CLK_TCK")


def gen(tmp: Path, n: int, nq: int) -> tuple[list[str], dict[str, Path]]:
    rnd = random.Random(42)
    alphabet = string.ascii_lowercase + string.digits
    names: set[str] = set()
    while len(names) < n:
        names.add("".join(rnd.choices(alphabet, k=rnd.randint(6, 14))) + "." + rnd.choice(TLDS))
    lst = sorted(names)
    files = {"names": tmp / "names.txt", "rpz": tmp / "rpz.zone", "lz": tmp / "localzones.conf",
             "blocked": tmp / "q_blocked.txt", "cached": tmp / "q_cached.txt"}
    files["names"].write_text("".join(f"*.{x}\n" for x in lst))
    with open(files["rpz"], "w") as f:
        f.write("$ORIGIN rpz.local.\n$TTL 60\n@ SOA localhost. h.invalid. 1 3600 600 86400 60\n@ NS localhost.\n")
        f.writelines(f"{x} CNAME .\n*.{x} CNAME .\n" for x in lst)
    files["lz"].write_text("".join(f'local-zone: "{x}." always_nxdomain\n' for x in lst))
    files["blocked"].write_text("".join(f"{'www.' if rnd.random() < 0.5 else ''}{rnd.choice(lst)} A\n"
                                        for _ in range(nq)))
    files["cached"].write_text("".join(f"allowed{i % 100}.example.net A\n" for i in range(nq)))
    return lst, files


# Unbound's server section beyond resolvers.unbound_conf's defaults: the throughput settings.
UNBOUND_SERVER = ("so-reuseport: yes", "num-queries-per-thread: 4096", "outgoing-range: 8192", "ede: yes",
                  "verbosity: 0")


def start(kind: str, tmp: Path, files: dict[str, Path], upstream: int) -> tuple[subprocess.Popen[bytes], int]:
    port = resolvers.free_port()
    if kind == "blockd":
        cmd = [sys.executable, "-m", "blockd.dns", "--listen", f"127.0.0.1:{port}", "--names", str(files["names"]),
               "--upstream", f"127.0.0.1:{upstream}", "--uvloop"]
        return subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL), port
    listen, pidfile = ("127.0.0.1", port), f"unbound-{kind}.pid"
    if kind == "unbound-rpz":
        conf = resolvers.unbound_conf(tmp, listen, upstream, "rpz.local.", zone_file=files["rpz"], pidfile=pidfile,
                                      server=UNBOUND_SERVER)
    else:
        conf = resolvers.unbound_conf(tmp, listen, upstream, None, modules="iterator", pidfile=pidfile,
                                      server=(*UNBOUND_SERVER, f'include: "{files["lz"]}"'))
    return resolvers.start("unbound", tmp / kind, conf), port


def cpu_s(pid: int) -> float:
    f = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(f[11]) + int(f[12])) / CLK


def rss_mib(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def dnsperf(port: int, qfile: Path, seconds: float, out: Path) -> dict[str, float]:
    cmd = ["dnsperf", "-s", "127.0.0.1", "-p", str(port), "-d", str(qfile), "-l", str(seconds), "-c", "8",
           "-q", "200", "-e", "-v"]
    with open(out, "w") as f:
        subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, check=True, timeout=seconds + 60)
    lat: list[float] = []
    res: dict[str, float] = {}
    with open(out) as f:
        for line in f:
            if line.startswith("> "):
                last = line.rsplit(" ", 1)[1]
                if last[:1].isdigit():  # timeouts print "> T name type" without a latency
                    lat.append(float(last))
            elif "Queries per second:" in line:
                res["qps"] = float(line.split(":")[1])
            elif "Queries completed:" in line:
                res["completed"] = float(line.split(":")[1].split()[0])
            elif "Queries lost:" in line:
                res["lost"] = float(line.split(":")[1].split()[0])
    lat.sort()
    for p in (50, 90, 99, 99.9):
        res[f"p{p}"] = lat[min(len(lat) - 1, int(len(lat) * p / 100))] * 1000 if lat else float("nan")
    out.unlink()
    return res


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--quick", action="store_true")
    ap.add_argument("--n", type=int)
    ap.add_argument("--runs", type=int)
    ap.add_argument("--seconds", type=float)
    ap.add_argument("--servers", default="blockd,unbound-rpz,unbound-lz")
    a = ap.parse_args()
    n = a.n or (100_000 if a.quick else 1_000_000)
    runs = a.runs or (1 if a.quick else 3)
    secs = a.seconds or (4 if a.quick else 10)
    for tool in ("dnsperf", "unbound"):
        if not shutil.which(tool):
            sys.exit(f"bench/dns.py: {tool} not found; run scripts/deps.sh")
    tmp = Path(tempfile.mkdtemp(prefix="blockd-dnsbench-"))
    lt = LoopThread()
    up = Upstream("example.net")
    lt.run(up.start())
    t0 = time.monotonic()
    names, files = gen(tmp, n, 200_000 if not a.quick else 50_000)
    print(f"# {n} names, generated in {time.monotonic() - t0:.1f} s; {runs} run(s) x {secs:.0f} s; tmp {tmp}",
          flush=True)
    results: dict[str, dict[str, object]] = {}
    try:
        for kind in a.servers.split(","):
            proc, port = start(kind, tmp, files, up.port)
            try:
                load = resolvers.wait_nxdomain(proc, port, "www." + names[len(names) // 2], timeout=180,
                                               log=tmp / kind / "log")
                row: dict[str, object] = {"load_s": load}
                if kind == "blockd" and proc.stdout is not None:
                    ready = proc.stdout.readline().decode().split()  # ready <port> <table s> <apply s>
                    while ready and ready[0] != "ready":
                        ready = proc.stdout.readline().decode().split()
                    row["table_s"] = float(ready[2])
                dnsperf(port, files["cached"], 1, tmp / "warm.txt")  # fill the caches
                for qname in ("blocked", "cached"):
                    per = []
                    for _ in range(runs):
                        c0 = cpu_s(proc.pid)
                        r = dnsperf(port, files[qname], secs, tmp / "out.txt")
                        r["qpcpu"] = r["completed"] / max(cpu_s(proc.pid) - c0, 1e-9)
                        per.append(r)
                    row[qname] = {k: statistics.median(x[k] for x in per) for k in per[0]}
                row["rss"] = rss_mib(proc.pid)
                results[kind] = row
                print(f"# {kind}: done (load {load:.2f} s, RSS {row['rss']:.0f} MiB)", flush=True)
            finally:
                resolvers.stop(proc, timeout=30)
    finally:
        lt.run(up.aclose())
        lt.close()
        shutil.rmtree(tmp, ignore_errors=True)
    report(results, n)


def report(results: dict[str, dict[str, object]], n: int) -> None:
    print(f"\n| server ({n:,} names) | query file | qps (wall) | p50 / p90 / p99 / p99.9 ms | "
          "queries per server-CPU-s | RSS MiB | load s |")
    print("|---|---|---|---|---|---|---|")
    for kind, row in results.items():
        for qname in ("blocked", "cached"):
            r = row[qname]  # type: ignore[index]
            load = f"{row['load_s']:.2f}" + (f" (table {row['table_s']:.2f})" if "table_s" in row else "")
            print(f"| {kind} | {qname} | {r['qps']:,.0f} | {r['p50']:.2f} / {r['p90']:.2f} / {r['p99']:.2f} / "
                  f"{r['p99.9']:.2f} | {r['qpcpu']:,.0f} | {row['rss']:.0f} | {load} |")
    b, rpz, lz = results.get("blockd"), results.get("unbound-rpz"), results.get("unbound-lz")
    if b and rpz:
        print("\nratios (blockd / Unbound, same run)           value   target")
        ratio = b["blocked"]["qpcpu"] / rpz["blocked"]["qpcpu"]  # type: ignore[index]
        print(f"  blocked q per CPU-s vs unbound-rpz         {ratio:5.2f}x   >= 1.0x")
        ratio = b["cached"]["qpcpu"] / rpz["cached"]["qpcpu"]  # type: ignore[index]
        print(f"  cached q per CPU-s vs unbound-rpz          {ratio:5.2f}x   >= 0.4x")
        print(f"  RSS vs unbound-rpz                         {b['rss'] / rpz['rss']:5.2f}x   <= 0.25x")  # type: ignore[operator]
        print(f"  blocked wall qps vs unbound-rpz            {b['blocked']['qps'] / rpz['blocked']['qps']:5.2f}x")  # type: ignore[index]
        print(f"  table load (swap) s                        {b.get('table_s', float('nan')):5.2f}    <= 2 s")
    if b and lz:
        print(f"  blocked q per CPU-s vs unbound-local-zone  {b['blocked']['qpcpu'] / lz['blocked']['qpcpu']:5.2f}x")  # type: ignore[index]
        print(f"  RSS vs unbound-local-zone                  {b['rss'] / lz['rss']:5.2f}x")  # type: ignore[operator]


if __name__ == "__main__":
    main()
