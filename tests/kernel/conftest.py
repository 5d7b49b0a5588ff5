"""Kernel test fixtures: three network namespaces joined by veth pairs, deleted after each test.

    client (c) 10.77.1.2 --veth-- 10.77.1.1 middle (m) 10.77.2.1 --veth-- 10.77.2.2 server (s)
               fd77:1::2           fd77:1::1 enforcer   fd77:2::1           fd77:2::2
                                                                            lo: 10.77.100.1-4/32
                                                                                fd77:100::1-4/128

Every link is created from inside a namespace, so nothing appears in (or changes) the host's
namespace or its netfilter ruleset. Names are `bkt-<pid>-<n><role>`, unique per run.
"""

from __future__ import annotations

import asyncio
import contextlib
import itertools
import json
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, TypeVar

import pytest

from blockd.model import RuleSet
from blockd.ranges import merge, parse_cidr

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "bench"))
from common import ruleset, v4_prefixes  # noqa: E402  (bench/common.py: seeded prefixes)

T = TypeVar("T")
PORT = 18080
TARGETS4 = [f"10.77.100.{i}" for i in range(1, 5)]
TARGETS6 = [f"fd77:100::{i}" for i in range(1, 5)]
_serial = itertools.count()


def _missing() -> dict[str, str]:
    """Feature -> why it is unusable here ("base" covers everything: root, tools, netns)."""
    if os.geteuid() != 0:
        return {"base": "kernel tests need root (CAP_NET_ADMIN, CAP_SYS_ADMIN) to create network namespaces"}
    for tool in ("ip", "nft", "ipset", "iptables", "ip6tables", "ping"):
        if shutil.which(tool) is None:
            return {"base": f"{tool!r} is not installed (scripts/deps.sh installs it)"}
    probe = f"bkt-{os.getpid()}-probe"
    try:
        sh("ip", "netns", "add", probe)
    except subprocess.CalledProcessError as exc:
        return {"base": f"cannot create a network namespace: {exc.stderr.strip()}"}
    missing = {}
    try:
        for feature, cmd in (("nft", "nft add table inet probe"),
                             ("ipset", "ipset create probe hash:net"),
                             ("xt_set", "iptables -A OUTPUT -m set --match-set probe dst -j ACCEPT")):
            done = subprocess.run(["ip", "netns", "exec", probe, *cmd.split()], capture_output=True, text=True)
            if done.returncode:
                missing[feature] = f"kernel feature missing ({cmd!r}: {done.stderr.strip()})"
    finally:
        sh("ip", "netns", "del", probe)
    return missing


_OURS = {"test_nft.py", "test_ipset.py", "test_drift.py", "test_scale.py", "test_delta.py"}


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    """Skip, saying why, exactly the tests whose kernel feature is missing."""
    for item in items:
        if item.path.name not in _OURS or not item.get_closest_marker("kernel"):
            continue  # other kernel tests here (e.g. BGP) decide their own skips
        needs = ["base", "ipset" if "ipset" in item.nodeid else "nft"]
        if item.path.name == "test_ipset.py":
            needs.append("xt_set")
        reason = next((_MISSING[n] for n in needs if n in _MISSING), None)
        if reason:
            item.add_marker(pytest.mark.skip(reason=reason))


def sh(*args: str, ns: str | None = None, check: bool = True, stdin: str | None = None) -> str:
    cmd = ["ip", "netns", "exec", ns, *args] if ns else list(args)
    done = subprocess.run(cmd, capture_output=True, text=True, input=stdin, check=False, timeout=120)
    if check and done.returncode:
        raise subprocess.CalledProcessError(done.returncode, cmd, done.stdout, done.stderr)
    return done.stdout


_MISSING = _missing()


def in_netns(ns: str, family: int, kind: int = socket.SOCK_STREAM) -> socket.socket:
    """A socket that lives in `ns` (created by a thread that entered it), usable from here."""
    from pyroute2 import netns as pr2netns

    out: list[socket.socket] = []

    def make() -> None:
        pr2netns.setns(ns, flags=0)
        out.append(socket.socket(family, kind))

    t = threading.Thread(target=make)
    t.start()
    t.join()
    return out[0]


@dataclass
class Topo:
    c: str
    m: str
    s: str

    def connects(self, ns: str, addr: str, timeout: float = 0.6) -> bool:
        """TCP connect from namespace `ns`; False if refused, unreachable or timed out."""
        family = socket.AF_INET6 if ":" in addr else socket.AF_INET
        with contextlib.closing(in_netns(ns, family)) as sock:
            sock.settimeout(timeout)
            try:
                sock.connect((addr, PORT))
            except OSError:
                return False
            return True

    def pings(self, ns: str, addr: str) -> bool:
        done = subprocess.run(["ip", "netns", "exec", ns, "ping", "-n", "-q", "-c", "1", "-W", "0.6", addr],
                              capture_output=True, check=False)
        return done.returncode == 0


def _server(ns: str, stop: threading.Event) -> threading.Thread:
    listener = in_netns(ns, socket.AF_INET6)
    listener.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
    listener.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    listener.bind(("::", PORT))
    listener.listen(64)
    listener.settimeout(0.1)

    def serve() -> None:
        with listener:
            while not stop.is_set():
                try:
                    conn, _ = listener.accept()
                except TimeoutError:
                    continue
                conn.close()

    t = threading.Thread(target=serve, daemon=True)
    t.start()
    return t


@pytest.fixture
def topo() -> Iterator[Topo]:
    base = f"bkt-{os.getpid()}-{next(_serial)}"
    t = Topo(c=base + "c", m=base + "m", s=base + "s")
    stop = threading.Event()
    server = None
    try:
        for ns in (t.c, t.m, t.s):
            sh("ip", "netns", "add", ns)
            sh("ip", "-n", ns, "link", "set", "lo", "up")
            sh("sysctl", "-qw", "net.ipv6.conf.all.accept_dad=0", "net.ipv6.conf.default.accept_dad=0", ns=ns)
        sh("ip", "-n", t.c, "link", "add", "c0", "type", "veth", "peer", "name", "m0", "netns", t.m)
        sh("ip", "-n", t.m, "link", "add", "m1", "type", "veth", "peer", "name", "s0", "netns", t.s)
        batch = {
            t.c: ["addr add 10.77.1.2/24 dev c0", "addr add fd77:1::2/64 dev c0 nodad", "link set c0 up",
                  "route add default via 10.77.1.1", "route add default via fd77:1::1"],
            t.m: ["addr add 10.77.1.1/24 dev m0", "addr add fd77:1::1/64 dev m0 nodad", "link set m0 up",
                  "addr add 10.77.2.1/24 dev m1", "addr add fd77:2::1/64 dev m1 nodad", "link set m1 up",
                  "route add 10.77.100.0/24 via 10.77.2.2", "route add fd77:100::/64 via fd77:2::2"],
            t.s: ["addr add 10.77.2.2/24 dev s0", "addr add fd77:2::2/64 dev s0 nodad", "link set s0 up",
                  "route add default via 10.77.2.1", "route add default via fd77:2::1",
                  *[f"addr add {a}/32 dev lo" for a in TARGETS4], *[f"addr add {a}/128 dev lo" for a in TARGETS6]],
        }
        for ns, lines in batch.items():
            sh("ip", "-n", ns, "-batch", "-", stdin="\n".join(lines) + "\n")
        sh("sysctl", "-qw", "net.ipv4.ip_forward=1", "net.ipv6.conf.all.forwarding=1", ns=t.m)
        server = _server(t.s, stop)
        _wait_until(lambda: all(t.connects(t.c, a) for a in (TARGETS4[3], TARGETS6[3])), 10, "topology up")
        yield t
    finally:
        stop.set()
        if server is not None:
            server.join()
        for ns in (t.c, t.m, t.s):
            subprocess.run(["ip", "netns", "del", ns], capture_output=True, check=False)


@pytest.fixture
def closing() -> Iterator[Callable[[T], T]]:
    """Register an enforcer to be closed at teardown, even when the test fails."""
    opened: list[Any] = []

    def register(enforcer: T) -> T:
        opened.append(enforcer)
        return enforcer

    yield register
    for enforcer in opened:
        asyncio.run(enforcer.aclose())


def _wait_until(ready: Callable[[], bool], deadline_s: float, what: str) -> None:
    """Poll with a deadline (links come up and neighbours resolve asynchronously)."""
    end = time.monotonic() + deadline_s
    while not ready():
        if time.monotonic() > end:
            raise TimeoutError(f"{what}: not ready after {deadline_s} s")


# --- test data ---------------------------------------------------------------------------------

# .1, .2/.3 (one /31) and ::1, ::2/::3 blocked; .4 and ::4 stay reachable.
BLOCK4 = [(parse_cidr(c).network, parse_cidr(c).prefixlen) for c in ("10.77.100.1/32", "10.77.100.2/31")]
BLOCK6 = [(parse_cidr(c).network, parse_cidr(c).prefixlen) for c in ("fd77:100::1/128", "fd77:100::2/127")]


def background(n: int, seed: int) -> list[tuple[int, int]]:
    """Realistic filler that never touches 10/8 (the test addresses)."""
    return [p for p in v4_prefixes(n, seed) if p[0] >> 24 != 10]


def policy(extra4: list[tuple[int, int]] | None = None, extra6: list[tuple[int, int]] | None = None) -> RuleSet:
    return ruleset(sorted(BLOCK4 + (extra4 or [])), sorted(BLOCK6 + (extra6 or [])))


# --- independent readers (the tools, not blockd's netlink code) --------------------------------

def nft_intervals(ns: str, table: str = "blockd") -> dict[int, list[tuple[int, int]]]:
    """Every element of every set of `table`, via `nft -j list table`, merged into intervals."""
    doc = json.loads(sh("nft", "-j", "list", "table", "inet", table, ns=ns))
    out: dict[int, list[tuple[int, int]]] = {4: [], 6: []}
    for item in doc["nftables"]:
        s = item.get("set")
        if not s or s["type"] not in ("ipv4_addr", "ipv6_addr"):
            continue
        for e in s.get("elem", []):
            if isinstance(e, str):
                c = parse_cidr(e)
                out[c.version].append((c.first, c.last))
            elif "prefix" in e:
                c = parse_cidr(f"{e['prefix']['addr']}/{e['prefix']['len']}")
                out[c.version].append((c.first, c.last))
            else:
                a, b = (parse_cidr(x) for x in e["range"])
                out[a.version].append((a.first, b.last))
    return {v: merge(x) for v, x in out.items()}


def ipset_intervals(ns: str, prefix: str = "blockd") -> dict[int, list[tuple[int, int]]]:
    out: dict[int, list[tuple[int, int]]] = {4: [], 6: []}
    for line in sh("ipset", "save", ns=ns).splitlines():
        parts = line.split()
        if parts[0] == "add" and parts[1] in (prefix + "4", prefix + "6"):
            c = parse_cidr(parts[2])
            out[c.version].append((c.first, c.last))
    return {v: merge(x) for v, x in out.items()}


def intervals_of(rs: object) -> dict[int, list[tuple[int, int]]]:
    from blockd.model import union_intervals

    return {4: union_intervals(rs.v4), 6: union_intervals(rs.v6)}  # type: ignore[attr-defined]
