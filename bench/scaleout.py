"""Scale-out benchmark, BGP part: blockd's BGP enforcer vs ExaBGP's own static config, one run.

    python bench/scaleout.py [--quick] [--count N] [--markdown]

Two network namespaces (`bkg-<pid>-a`, `bkg-<pid>-r`, deleted at the end) joined by a veth:
the speaker side holds two addresses, the router side runs BIRD 2 with two BGP sessions,
`blockd` (from 10.79.0.1) and `native` (from 10.79.0.5), both importing only routes that
carry BLACKHOLE (65535,666) and resolving next-hops to a blackhole static route. Prefixes
are seeded (bench/common.py: 90 % IPv4 shaped like the real lists, 10 % IPv6 /48).

    blockd   start ExaBGP with an empty config, session up, then `apply(N prefixes)`;
             the clock runs from `apply` until BIRD holds all N routes from that session
             (`birdc show route protocol blockd count`, polled). `apply` alone is also shown.
    cold     same, but the clock starts before ExaBGP starts (apply queues routes before
             the session is up), comparable with `native`
    native   ExaBGP started with the same N routes as `route ...` lines in its config file;
             the clock runs from process start until BIRD holds all N
    withdraw blockd `apply(empty)` until BIRD holds none from the session

`BirdLab` (namespaces + BIRD) is also what tests/kernel/test_bgp.py uses.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import random
import re
import signal
import shutil
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import cidr_text, ruleset, v4_prefixes, v6_prefixes  # noqa: E402

from blockd.enforcers.bgp import BgpEnforcer, BgpSettings, exabgp_environ  # noqa: E402

EXABGP = str(Path(sys.executable).with_name("exabgp"))
SPEAKER, NATIVE, ROUTER = "10.79.0.1", "10.79.0.5", "10.79.0.2"
SPEAKER_AS, ROUTER_AS = 64513, 64512
#: the bound on any start-up or shutdown wait: a busy machine is slow, not broken
BUSY_S = 300.0


def wait_until(ready: Callable[[], bool], deadline_s: float, what: str, every_s: float = 0.05) -> float:
    """Poll `ready` until true; return the elapsed time; TimeoutError at the deadline."""
    t0 = time.monotonic()
    while not ready():
        if time.monotonic() - t0 > deadline_s:
            raise TimeoutError(f"{what}: not reached after {deadline_s} s")
        time.sleep(every_s)  # polling interval of a deadline poll
    return time.monotonic() - t0


BIRD_CONF = """\
router id {router};
log "{log}" all;
protocol device {{ }}
protocol static discard4 {{ ipv4; route 192.0.2.1/32 blackhole; }}
protocol static discard6 {{ ipv6; route 100::1/128 blackhole; }}
flow4 table flow4tab;
flow6 table flow6tab;

# Generic RTBH import policy: only routes tagged BLACKHOLE, host routes allowed.
filter rtbh_in {{
  if !((65535,666) ~ bgp_community) then reject;
  if net.type = NET_IP4 && net.len < 8 then reject;
  if net.type = NET_IP6 && net.len < 19 then reject;
  accept;
}}
{sessions}
"""

SESSION = """\
protocol bgp {name} {{
  local {router} as {router_as};
  neighbor {peer} as {peer_as};
  hold time 30;
  connect retry time 1;
  error wait time 1, 5;
  ipv4 {{ import filter rtbh_in; export none; gateway recursive; import limit off; }};
  ipv6 {{ import filter rtbh_in; export none; gateway recursive; }};
  flow4 {{ table flow4tab; import all; export none; }};
  flow6 {{ table flow6tab; import all; export none; }};
}}
"""


class BirdLab:
    """Two fresh namespaces (speaker `a`, router `r`) on one veth, and BIRD 2 in `r`.

    Use as a context manager; everything it created is removed on exit, even on errors.
    """

    def __init__(self, base: str, peers: dict[str, str] | None = None) -> None:
        self.a, self.r = base + "a", base + "r"
        self.peers = peers or {"blockd": SPEAKER}
        self.dir = tempfile.mkdtemp(prefix="blockd-bird-")
        self.sock = os.path.join(self.dir, "bird.sock")
        self.conf = os.path.join(self.dir, "bird.conf")
        self.proc: subprocess.Popen[bytes] | None = None

    def __enter__(self) -> BirdLab:
        try:
            for ns in (self.a, self.r):
                _run("ip", "netns", "add", ns)
                _run("ip", "-n", ns, "link", "set", "lo", "up")
            # Created inside `a`, the peer end moved into `r`: the host namespace is never touched.
            _run("ip", "-n", self.a, "link", "add", "a0", "type", "veth", "peer", "name", "r0", "netns", self.r)
            for addr in self.peers.values():
                _run("ip", "-n", self.a, "addr", "add", f"{addr}/29", "dev", "a0")
            _run("ip", "-n", self.a, "link", "set", "a0", "up")
            _run("ip", "-n", self.r, "addr", "add", f"{ROUTER}/29", "dev", "r0")
            _run("ip", "-n", self.r, "link", "set", "r0", "up")
            sessions = "".join(SESSION.format(name=n, router=ROUTER, router_as=ROUTER_AS, peer=p, peer_as=SPEAKER_AS)
                               for n, p in self.peers.items())
            Path(self.conf).write_text(BIRD_CONF.format(router=ROUTER, log=os.path.join(self.dir, "bird.log"),
                                                        sessions=sessions))
            self.start_bird()
        except BaseException:
            self.__exit__()
            raise
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop_bird()
        for ns in (self.a, self.r):
            subprocess.run(["ip", "netns", "del", ns], capture_output=True, check=False)
        shutil.rmtree(self.dir, ignore_errors=True)

    def start_bird(self) -> None:
        self.proc = subprocess.Popen(["ip", "netns", "exec", self.r, "bird", "-f", "-c", self.conf, "-s", self.sock,
                                      "-P", os.path.join(self.dir, "bird.pid")],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        wait_until(lambda: self._bird_up(), BUSY_S, "BIRD control socket")

    def stop_bird(self) -> None:
        if self.proc is not None:
            self.proc.kill()  # a crash, as routers see it: no NOTIFICATION, TCP reset later
            self.proc.wait()
            if self.proc.stderr is not None:
                self.proc.stderr.close()
            self.proc = None

    def _bird_up(self) -> bool:
        if self.proc is not None and self.proc.poll() is not None:
            err = self.proc.stderr.read().decode() if self.proc.stderr else ""
            raise RuntimeError(f"bird exited with {self.proc.returncode}: {err}")
        return os.path.exists(self.sock) and subprocess.run(
            ["birdc", "-s", self.sock, "show", "status"], capture_output=True, check=False).returncode == 0

    def birdc(self, *args: str) -> str:
        done = subprocess.run(["birdc", "-s", self.sock, *args], capture_output=True, text=True, check=True, timeout=120)
        return done.stdout

    def count(self, protocol: str = "blockd") -> int:
        """Routes BIRD accepted from one session (both families)."""
        out = self.birdc("show", "route", "protocol", protocol, "count")
        return sum(int(m) for m in re.findall(r"^(\d+) of \d+ routes", out, re.M))

    def established(self, protocol: str = "blockd") -> bool:
        return "Established" in self.birdc("show", "protocols", protocol)

    def settings(self, **kw: object) -> BgpSettings:
        base: dict[str, object] = dict(local_address=SPEAKER, peers=(ROUTER,), local_as=SPEAKER_AS,
                                       peer_as=ROUTER_AS, router_id=SPEAKER, exabgp=EXABGP, hold_time=30)
        base.update(kw)
        return BgpSettings(**base)  # type: ignore[arg-type]


def _run(*cmd: str) -> None:
    subprocess.run(cmd, check=True, capture_output=True)


def native_config(v4: list[tuple[int, int]], v6: list[tuple[int, int]]) -> str:
    """ExaBGP's own way to hold routes: `static` routes in the neighbor block, same attributes."""
    attrs = "origin igp community [ 65535:666 65535:65281 ] local-preference 200"
    routes = [f"    route {c} next-hop 192.0.2.1 {attrs};" for c in cidr_text(4, v4)]
    routes += [f"    route {c} next-hop 100::1 {attrs};" for c in cidr_text(6, v6)]
    return "\n".join([
        f"neighbor {ROUTER} {{", f"  router-id {NATIVE};", f"  local-address {NATIVE};",
        f"  local-as {SPEAKER_AS};", f"  peer-as {ROUTER_AS};", "  hold-time 30;", "  group-updates true;",
        "  family { ipv4 unicast; ipv6 unicast; }", "  static {", *routes, "  }", "}", ""])


async def run_blockd(lab: BirdLab, rs: object, n: int, cold: bool) -> dict[str, float]:
    # A loaded machine starts ExaBGP and the session slowly: generous bounds, not failures.
    enf = BgpEnforcer(lab.settings(start_timeout_s=BUSY_S), netns=lab.a)
    try:
        t0 = time.perf_counter()
        if not cold:
            await enf.wait_established(BUSY_S)
            t0 = time.perf_counter()
        applied = await enf.apply(rs)  # type: ignore[arg-type]
        t_apply = time.perf_counter() - t0
        await asyncio.to_thread(wait_until, lambda: lab.count("blockd") >= n, 600, f"{n} routes in BIRD", 0.2)
        t_all = time.perf_counter() - t0
        assert applied.in_sync, applied
        out = {"apply_s": t_apply, "in_bird_s": t_all}
        if not cold:
            t1 = time.perf_counter()
            await enf.apply(ruleset())
            await asyncio.to_thread(wait_until, lambda: lab.count("blockd") == 0, 600, "withdraw in BIRD", 0.2)
            out["withdraw_s"] = time.perf_counter() - t1
        return out
    finally:
        await enf.aclose()
        await asyncio.to_thread(wait_until, lambda: lab.count("blockd") == 0, 120, "session down", 0.2)


def run_native(lab: BirdLab, v4: list[tuple[int, int]], v6: list[tuple[int, int]]) -> float:
    conf = os.path.join(lab.dir, "native.conf")
    Path(conf).write_text(native_config(v4, v6))
    env = exabgp_environ()
    t0 = time.perf_counter()
    proc = subprocess.Popen(["ip", "netns", "exec", lab.a, EXABGP, conf], env=env, cwd=lab.dir,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_until(lambda: lab.count("native") >= len(v4) + len(v6), 600, "native routes in BIRD", 0.2)
        return time.perf_counter() - t0
    finally:
        proc.terminate()
        try:
            proc.wait(BUSY_S)
        except subprocess.TimeoutExpired:  # it did its work; do not lose the figures over its exit
            proc.kill()
            proc.wait()


def routable_v4(count: int) -> list[tuple[int, int]]:
    """Seeded IPv4 prefixes without 127/8 (BIRD drops loopback routes as bogus)."""
    pool = [p for p in v4_prefixes(count + count // 50 + 100, seed=7) if p[0] >> 24 != 127]
    return sorted(random.Random(7).sample(pool, count))


def main() -> None:
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(143))  # run the cleanups on `timeout`
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--quick", action="store_true", help="10k prefixes instead of 100k")
    ap.add_argument("--count", type=int, default=None)
    ap.add_argument("--markdown", action="store_true", help="print the result table as Markdown")
    args = ap.parse_args()
    if os.geteuid() != 0:
        sys.exit("scaleout.py: needs root to create network namespaces")
    for tool in ("bird", "birdc", "ip"):
        if shutil.which(tool) is None:
            sys.exit(f"scaleout.py: {tool!r} missing; run scripts/deps.sh")
    n = args.count or (10_000 if args.quick else 100_000)
    n6 = n // 10
    v4, v6 = routable_v4(n - n6), v6_prefixes(n6, seed=7)
    rs = ruleset(v4, v6)
    with BirdLab(f"bkg-{os.getpid()}-", {"blockd": SPEAKER, "native": NATIVE}) as lab:
        warm = asyncio.run(run_blockd(lab, rs, n, cold=False))
        cold = asyncio.run(run_blockd(lab, rs, n, cold=True))
        native = run_native(lab, v4, v6)
    lab_batch = BgpSettings.__dataclass_fields__["batch_size"].default
    rows = [
        ("blockd apply() returns (session up)", warm["apply_s"], None),
        ("blockd apply() -> all in BIRD (session up)", warm["in_bird_s"], None),
        ("blockd cold: ExaBGP start + apply() -> all in BIRD", cold["in_bird_s"], native),
        ("ExaBGP static config: start -> all in BIRD (native)", native, None),
        ("blockd apply(empty) -> all withdrawn in BIRD", warm["withdraw_s"], None),
    ]
    print(f"{n} prefixes ({n - n6} IPv4, {n6} IPv6), batch {lab_batch} prefixes/API line, BIRD 2")
    if args.markdown:
        print("| measurement | seconds | routes/s | vs native |\n|---|---:|---:|---:|")
        for name, s, ref in rows:
            ratio = f"{s / ref:.2f}x" if ref else ""
            print(f"| {name} | {s:.2f} | {n / s:,.0f} | {ratio} |")
    else:
        for name, s, ref in rows:
            ratio = f"  ratio blockd/native {s / ref:.2f}" if ref else ""
            print(f"{name:55s} {s:8.2f} s {n / s:>10,.0f} routes/s{ratio}")


if __name__ == "__main__":
    main()
