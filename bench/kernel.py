"""Kernel enforcement benchmark: blockd's nft/ipset enforcers vs `nft -f` / `ipset restore`, one run.

    python bench/kernel.py [--quick] [--markdown]

Runs in its own network namespace (`bkb-<pid>`, deleted at the end). For each size it
generates seeded prefixes (bench/common.py), then runs every measurement in a fresh worker
process inside the namespace, so peak RSS is per measurement:

    load        empty set -> N prefixes, one atomic step (blockd: apply(); native: nft -f /
                ipset restore of create + adds). Table, chains and (for nft) sets exist before
                the clock starts, for both; native time is the tool only, not file writing.
    incremental 1,000 adds + 1,000 deletes on the loaded set (blockd: apply(); ipset restore);
                blockd's apply includes reading back what the commit touched (nft: the shard
                sets it changed; ipset: a TEST of each entry), shown separately
    readback    the whole set back from the kernel (blockd: readback(); native: ipset save)

Ratios are blockd / native, measured in the same run.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import pickle
import random
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import cidr_text, ruleset, v4_prefixes, v6_prefixes  # noqa: E402

PY = sys.executable
HERE = Path(__file__).resolve()


def sh(ns: str, *args: str, check: bool = True) -> None:
    subprocess.run(["ip", "netns", "exec", ns, *args], check=check, capture_output=True)


def timed_child(cmd: list[str]) -> tuple[float, float]:
    """Run `cmd`; (seconds, peak RSS MB of the child's own memory, polled every 2 ms)."""
    t0 = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    peak = 0.0
    while proc.poll() is None:
        peak = max(peak, hwm_mb(proc.pid))
        time.sleep(0.002)
    elapsed = time.perf_counter() - t0
    if proc.returncode:
        raise RuntimeError(f"{cmd[0]} failed: {proc.stderr.read().decode() if proc.stderr else ''}")
    return elapsed, peak


def hwm_mb(pid: int | str = "self") -> float:
    """VmHWM: the peak RSS of this process image. getrusage's ru_maxrss is not used because
    Linux carries it across vfork+exec, so a child would report its parent's peak."""
    try:
        with open(f"/proc/{pid}/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) / 1024
    except (FileNotFoundError, ProcessLookupError):
        pass
    return 0.0


def rss_mb() -> float:
    return hwm_mb()


# --- workers (run inside the namespace) --------------------------------------------------------

def worker(kind: str, data_path: str) -> dict[str, float]:
    with open(data_path, "rb") as f:
        version, base, fresh = pickle.load(f)
    subprocess.run(["nft", "flush", "ruleset"], check=True)  # our own namespace: start empty
    subprocess.run(["ipset", "destroy"], check=False, capture_output=True)
    changed = base[1000:] + fresh if len(base) >= 100_000 else None
    as_rs = (lambda p: ruleset(p, [])) if version == 4 else (lambda p: ruleset([], p))
    if kind.startswith("blockd"):
        return asyncio.run(_blockd(kind, as_rs(base), as_rs(sorted(changed)) if changed else None))
    return _native(kind, version, base, changed)


async def _blockd(kind: str, desired, changed) -> dict[str, float]:  # type: ignore[no-untyped-def]
    from blockd.enforcers.ipset import IpsetEnforcer
    from blockd.enforcers.nft import NftEnforcer
    from blockd.model import RuleSet

    before = rss_mb()
    enf = NftEnforcer() if kind == "blockd-nft" else IpsetEnforcer()
    out: dict[str, float] = {}
    # Like the native runs (table, chain and set made before the clock starts), the layout
    # is created first: for nft 1,550 messages (~0.1 s), once per daemon lifetime.
    t0 = time.perf_counter()
    await enf.apply(RuleSet.empty())
    out["layout_s"] = time.perf_counter() - t0
    t0 = time.perf_counter()
    await enf.apply(desired)
    out["load_s"] = time.perf_counter() - t0
    out["rss_mb"] = rss_mb()
    out["rss_over_data_mb"] = rss_mb() - before
    t0 = time.perf_counter()
    back = await enf.readback()
    out["readback_s"] = time.perf_counter() - t0
    if back.digest != desired.digest:
        raise RuntimeError(f"{kind}: readback digest differs from what was loaded")
    if changed is not None:
        t0 = time.perf_counter()
        applied = await enf.apply(changed)
        out["incr_s"] = time.perf_counter() - t0
        out["incr_commit_s"] = enf.last_commit.duration_s if enf.last_commit else 0.0
        out["incr_readback_s"] = enf.last_readback_s
        assert (applied.added, applied.removed) == (1000, 1000), applied
    await enf.aclose()
    return out


def _native(kind: str, version: int, base: list[tuple[int, int]], changed: list[tuple[int, int]] | None) -> dict[str, float]:
    out: dict[str, float] = {}
    family = "ipv4_addr" if version == 4 else "ipv6_addr"
    with tempfile.TemporaryDirectory() as tmp:
        path = Path(tmp) / "load"
        if kind == "native-nft":
            proto = "ip" if version == 4 else "ip6"
            subprocess.run(["nft", "-f", "-"], check=True, text=True, input=(
                f"table inet bench {{\n set s {{ type {family}; flags interval; }}\n"
                f" chain out {{ type filter hook output priority 0; {proto} daddr @s counter drop; }}\n}}\n"))
            path.write_text("add element inet bench s { " + ", ".join(cidr_text(version, base)) + " }\n")
            out["load_s"], out["rss_mb"] = timed_child(["nft", "-f", str(path)])
            return out
        fam = "inet" if version == 4 else "inet6"
        maxelem = 1 << (2 * len(base) - 1).bit_length()
        path.write_text(f"create bench hash:net family {fam} hashsize {max(1024, len(base) // 2)} maxelem {maxelem}\n"
                        + "".join(f"add bench {c}\n" for c in cidr_text(version, base)))
        out["load_s"], out["rss_mb"] = timed_child(["ipset", "restore", "-f", str(path)])
        t0 = time.perf_counter()
        subprocess.run(["ipset", "save", "bench"], check=True, capture_output=True)
        out["readback_s"] = time.perf_counter() - t0
        if changed is not None:
            old, new = set(base), set(changed)
            path.write_text("".join(f"add bench {c}\n" for c in cidr_text(version, sorted(new - old)))
                            + "".join(f"del bench {c}\n" for c in cidr_text(version, sorted(old - new))))
            out["incr_s"], _ = timed_child(["ipset", "restore", "-f", str(path)])
    return out


# --- driver ----------------------------------------------------------------------------------

def make_data(tmp: Path, version: int, n: int) -> str:
    pool = (v4_prefixes if version == 4 else v6_prefixes)(n + 1000, seed=n)
    rng = random.Random(n)
    fresh = set(rng.sample(pool, 1000))
    base = [p for p in pool if p not in fresh]
    path = tmp / f"v{version}-{n}.pickle"
    with open(path, "wb") as f:
        pickle.dump((version, base, sorted(fresh)), f)
    return str(path)


def run_case(ns: str, kind: str, data: str) -> dict[str, float]:
    done = subprocess.run(["ip", "netns", "exec", ns, PY, str(HERE), "--worker", kind, data],
                          capture_output=True, text=True, check=False)
    if done.returncode:
        raise RuntimeError(f"{kind} worker failed:\n{done.stderr[-2000:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])  # type: ignore[no-any-return]


def fmt(x: float | None, unit: str = "s") -> str:
    if x is None:
        return "—"
    return f"{x:.3f} {unit}" if unit == "s" and x < 1 else f"{x:.2f} {unit}" if unit == "s" else f"{x:.0f} {unit}"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="10k and 100k IPv4, 10k IPv6 only")
    ap.add_argument("--worker", nargs=2, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        print(json.dumps(worker(*args.worker)))
        return
    cases = [(4, 10_000), (4, 100_000), (6, 10_000)] if args.quick else [(4, 10_000), (4, 100_000), (4, 1_000_000), (6, 100_000)]
    ns = f"bkb-{os.getpid()}"
    subprocess.run(["ip", "netns", "add", ns], check=True)
    rows = []
    try:
        with tempfile.TemporaryDirectory() as tmp:
            for version, n in cases:
                data = make_data(Path(tmp), version, n)
                r = {k: run_case(ns, k, data) for k in ("blockd-nft", "native-nft", "blockd-ipset", "native-ipset")}
                rows.append((version, n, r))
                print(f"# done IPv{version} {n}: {json.dumps(r)}", file=sys.stderr, flush=True)
    finally:
        subprocess.run(["ip", "netns", "del", ns], check=False)
    print(report(rows))


def report(rows: list) -> str:  # type: ignore[type-arg]
    lines = [
        "| prefixes | blockd nft load | `nft -f` | ratio | RSS blockd / nft | blockd ipset load | `ipset restore` | ratio |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for v, n, r in rows:
        bn, nn, bi, ni = r["blockd-nft"], r["native-nft"], r["blockd-ipset"], r["native-ipset"]
        lines.append(f"| {n:,} IPv{v} | {fmt(bn['load_s'])} | {fmt(nn['load_s'])} | {bn['load_s'] / nn['load_s']:.2f}x "
                     f"| {bn['rss_mb']:.0f} / {nn['rss_mb']:.0f} MB | {fmt(bi['load_s'])} | {fmt(ni['load_s'])} "
                     f"| {bi['load_s'] / ni['load_s']:.2f}x |")
    lines += ["", "| prefixes | readback blockd nft | blockd ipset | `ipset save` | +1k/−1k blockd nft (apply / kernel commit "
              "/ touched read-back) | blockd ipset (apply / kernel / touched read-back) | `ipset restore` |",
              "|---|---|---|---|---|---|---|"]
    for v, n, r in rows:
        bn, bi, ni = r["blockd-nft"], r["blockd-ipset"], r["native-ipset"]
        inc = (f"{fmt(bn.get('incr_s'))} / {fmt(bn.get('incr_commit_s'))} / {fmt(bn.get('incr_readback_s'))} | "
               f"{fmt(bi.get('incr_s'))} / {fmt(bi.get('incr_commit_s'))} / {fmt(bi.get('incr_readback_s'))} | "
               f"{fmt(ni.get('incr_s'))}") if "incr_s" in bn else "— | — | —"
        lines.append(f"| {n:,} IPv{v} | {fmt(bn['readback_s'])} | {fmt(bi['readback_s'])} | {fmt(ni['readback_s'])} | {inc} |")
    layout = [r["blockd-nft"]["layout_s"] for _, _, r in rows]
    lines.append(f"\nblockd nft layout (table, 512 sets and shard chains, created once): {min(layout):.2f}-{max(layout):.2f} s.")
    lines.append("RSS: VmHWM of blockd's whole worker process (Python holding the input RuleSet) vs the nft process.")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
