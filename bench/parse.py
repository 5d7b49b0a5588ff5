"""Policy parsing at registry scale (issue 14): cold, a new serial, an unchanged file.

    python bench/parse.py [--sizes 10000,100000] [--million] [--repeat 3] [--general-at-1m]

Times are CPU seconds of the benchmark process (time.process_time), for ours and the references alike.

For each N, the registry-shaped policy of bench/scale.py (`registry(N)`: one order per
decision, a name and an address or two each; 171 bytes an order), all measured in this run:

    cold            parse_policy (the fast path) and, beside it, the general path it replaced
                    (libyaml events + schema Reader); MB/s of the file
    new serial      a new file with k = 1, 10, 1000 orders changed, parsed with the item cache
                    of the previous serial (p50 and max over --repeat changes)
    unchanged pass  load_signed_policy of the signed file again: the verify skip (stat of the
                    file and its signature) against a full read + SHA-256 + Ed25519 verify + parse
    memory          VmRSS growth over the cold parse (the Policy and the item cache of the
                    next serial, beside the file's bytes, which the caller holds anyway)
    references      PyYAML's C loader (yaml.load(..., Loader=yaml.CSafeLoader)) of the same
                    text and json.loads of the same data as JSON, with our cold parse / theirs
                    (with the garbage collector paused, as our parse runs; the general path
                    is measured as it ran before, collector on)

At 1M the general path and CSafeLoader take minutes; they run only with --general-at-1m (json.loads
runs at every N).
"""

from __future__ import annotations

import argparse
import gc
import importlib.util
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import yaml

from blockd import fastyaml, minisign, trust
from blockd.fastpolicy import Items
from blockd.model import gc_paused
from blockd.parsecache import ParseCache
from blockd.policy import load_signed_policy, parse_general, parse_signed, read_signed

ROOT = Path(__file__).resolve().parent.parent
MAX_BYTES = 1 << 30


def registry(n: int) -> str:
    spec = importlib.util.spec_from_file_location("bench_scale", ROOT / "bench" / "scale.py")
    assert spec is not None and spec.loader is not None
    scale = importlib.util.module_from_spec(spec)
    saved = list(sys.path)
    spec.loader.exec_module(scale)
    sys.path[:] = saved
    return scale.registry(n)[0]  # type: ignore[no-any-return]


def timed(fn: object) -> float:
    """CPU seconds of this process: the machine is shared (other engineers' suites), and wall time
    there measures their load more than this code; every figure, references included, is taken so."""
    t0 = time.process_time()
    fn()  # type: ignore[operator]
    return time.process_time() - t0


def rss_mib() -> float:
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith("VmRSS:")) / 1024


def change(text: str, k: int, round_: int, n: int) -> bytes:
    """A new serial: k orders (spread over the file) get a new reference."""
    lines = text.split("\n")
    lines[1] = f"serial: {round_ + 2}"
    step = max(1, n // k)
    for j in range(k):
        i = 6 + 4 * ((j * step + round_) % n) + 1  # the legal_basis line of order j*step
        lines[i] = lines[i].replace("}", f"-r{round_}}}")
    return "\n".join(lines).encode()


def run(n: int, repeat: int, general: bool) -> dict[str, float]:
    text = registry(n)
    data = text.encode()
    mb = len(data) / 1e6
    out: dict[str, float] = {"n": n, "mb": mb}
    items = Items()
    gc.collect()
    before = rss_mib()
    held: list[object] = []  # the Policy, as the daemon holds it
    out["cold_s"] = timed(lambda: held.append(parse_signed(data, "registry.yaml", max_bytes=MAX_BYTES, items=items)))
    gc.collect()
    out["rss_mib"] = rss_mib() - before
    held.clear()
    if general:  # as it ran before (the collector on)
        out["general_s"] = timed(lambda: parse_general(data, "registry.yaml", max_bytes=MAX_BYTES))
    # the references get what the fast path has: the collector paused (no cycles in their results)
    if general:
        with gc_paused():
            out["csafe_s"] = timed(lambda: yaml.load(text, Loader=yaml.CSafeLoader))  # noqa: S506 (the reference)
    as_json = json.dumps(fastyaml.load(text, max_depth=32, max_nodes=1 << 30)[0])  # the same data, as JSON
    with gc_paused():
        out["json_s"] = timed(lambda: json.loads(as_json))
    del as_json
    for k in (1, 10, 1000):
        times = []
        for r in range(repeat):
            new = change(text, k, r, n)
            times.append(timed(lambda: parse_signed(new, "registry.yaml", max_bytes=MAX_BYTES, items=items)))
        out[f"serial_k{k}_p50_s"] = statistics.median(times)
        out[f"serial_k{k}_max_s"] = max(times)
    with tempfile.TemporaryDirectory() as tmp:
        d = Path(tmp)
        key = minisign.generate()
        (d / "trust" / "registry").mkdir(parents=True)
        (d / "trust" / "registry" / "k.pub").write_text(key.public.to_text())
        (d / "trust" / "registry" / "issuer.yaml").write_text("roles: [policy]\n")
        store = trust.load_trust_store(d / "trust")
        path = d / "registry.yaml"
        path.write_bytes(data)
        (d / "registry.yaml.minisig").write_text(minisign.sign(data, key, trusted_comment="file:registry.yaml"))
        cache = ParseCache(racy_ns=0)  # the files were written just now; the daemon waits 2 s
        out["verify_parse_s"] = timed(lambda: load_signed_policy(path, store, max_bytes=MAX_BYTES, parsed=cache))
        out["reverify_s"] = timed(lambda: read_signed(path, store, role="policy", max_bytes=MAX_BYTES))
        out["skip_s"] = timed(lambda: load_signed_policy(path, store, max_bytes=MAX_BYTES, parsed=cache))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="10000,100000")
    ap.add_argument("--million", action="store_true", help="also N = 1,000,000 (171 MB)")
    ap.add_argument("--repeat", type=int, default=3)
    ap.add_argument("--general-at-1m", action="store_true", help="the general path and CSafeLoader at 1M too")
    args = ap.parse_args()
    sizes = [int(s) for s in args.sizes.split(",") if s] + ([1_000_000] if args.million else [])
    print("CPU seconds (process_time)")
    print(f"{'N':>9} {'MB':>6} {'cold s':>7} {'MB/s':>6} {'general':>8} {'x':>5} {'CSafe':>7} {'x':>5} "
          f"{'json':>6} {'/json':>6} | {'k=1':>6} {'k=10':>6} {'k=1000':>6} (p50 s) | "
          f"{'verify+parse':>12} {'reverify':>8} {'skip':>7} | {'RSS+ MiB':>8}")
    for n in sizes:
        r = run(n, args.repeat, n < 1_000_000 or args.general_at_1m)
        g = r.get("general_s")
        c = r.get("csafe_s")
        j = r.get("json_s")

        def cell(v: float | None, w: int, fmt: str = ".2f") -> str:
            return f"{v:{w}{fmt}}" if v is not None else f"{'-':>{w}}"

        print(f"{n:>9} {r['mb']:>6.1f} {r['cold_s']:>7.2f} {r['mb'] / r['cold_s']:>6.1f} {cell(g, 8)} "
              f"{cell(g / r['cold_s'] if g else None, 5, '.1f')} {cell(c, 7)} "
              f"{cell(c / r['cold_s'] if c else None, 5, '.1f')} {cell(j, 6)} "
              f"{cell(r['cold_s'] / j if j else None, 6, '.1f')} | {r['serial_k1_p50_s']:>6.3f} "
              f"{r['serial_k10_p50_s']:>6.3f} {r['serial_k1000_p50_s']:>6.3f}         | "
              f"{r['verify_parse_s']:>12.2f} {r['reverify_s']:>8.3f} {r['skip_s']:>7.4f} | {r['rss_mib']:>8.0f}",
              flush=True)
    print("x: the general path (or CSafeLoader) over the fast one; /json: the fast one over json.loads of the "
          "same data as JSON")


if __name__ == "__main__":
    main()
