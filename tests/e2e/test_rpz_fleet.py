"""An RPZ fleet: `blockd run` (rpz enforcer only) as primary of two Unbound and one BIND.

A policy file dropped into the watched directory reaches every resolver by NOTIFY + IXFR; the
time from the file landing to the last resolver answering NXDOMAIN is the fleet's
time-to-enforce. /metrics shows, per secondary, the serial it holds and whether it is in sync;
a stopped secondary shows as lagging and catches up by IXFR when it comes back.

Topology: the primary tells secondaries apart by source address, and on one host every
resolver's transfer comes from 127.0.0.1 (Unbound cannot bind the source of its transfers).
So the fleet runs in a network namespace the test creates, where each resolver has its own
loopback address (127.0.0.2-4/32) and reaches the primary (listening on 0.0.0.0) at that same
address: the kernel then uses it as the source, as a resolver on its own host would. The test
talks to the namespace from threads that joined it (setns), so no `ip netns exec` per query.
"""

from __future__ import annotations

import ctypes
import http.client
import json
import os
import shutil
import socket
import statistics
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable, Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import TypeVar

import dns.message
import dns.query
import dns.rcode
import dns.rdatatype
import dns.zone
import pytest
from prometheus_client.parser import text_string_to_metric_families

from blockd.dns import resolvers
from blockd.dns.rpz import RpzSettings
from blockd.dns.rpzserver import MAX_SECONDARIES, RpzServer
from blockd.dns.testing import LoopThread, Upstream
from blockd.enforcers.rpz import RpzEnforcer
from blockd.metrics import rpz_metrics
from blockd.model import DomainRule, RuleSet
from tests.conftest import drop_policy, repo_config

CLONE_NEWNET = 0x40000000
T = TypeVar("T")
pytestmark = pytest.mark.e2e
needs_root = pytest.mark.skipif(os.geteuid() != 0 or shutil.which("ip") is None,
                                reason="needs root and iproute2 for a network namespace")


def wait_for(check: Callable[[], T], what: str, timeout: float = 30) -> T:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        time.sleep(0.01)  # a poll interval under a deadline
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


# ---- the primary's bookkeeping, in process (no root, no resolvers) ---------------------------
def test_secondary_serials_from_ixfr_queries_and_finished_transfers(tmp_path: Path) -> None:
    lt = LoopThread()
    srv = RpzServer(RpzSettings(listen=(("127.0.0.1", 0),), notify=(("192.0.2.7", 53), ("::ffff:192.0.2.8", 53))))
    try:
        lt.run(srv.start())
        port = srv.addresses[0][1]
        enf = RpzEnforcer(srv)
        o = frozenset({"o1"})
        assert srv.secondaries().keys() == {"192.0.2.7", "192.0.2.8"}  # notify targets, serial unknown
        assert all(s.serial is None and s.last_seen is None for s in srv.secondaries().values())
        lt.run(enf.apply(RuleSet.build([DomainRule("a.example", False, o)])))
        s1 = srv.serial
        soa = dns.message.make_query("rpz.blockd.", dns.rdatatype.SOA)
        dns.query.udp(soa, "127.0.0.1", 2, port=port)
        assert "127.0.0.1" not in srv.secondaries()  # a SOA probe alone creates no entry
        dns.zone.from_xfr(dns.query.xfr("127.0.0.1", "rpz.blockd.", port=port))  # AXFR
        st = wait_for(lambda: srv.secondaries().get("127.0.0.1"), "the AXFR recorded", 5)
        assert st.serial == s1 and st.last_transfer is not None and st.last_seen is not None
        lt.run(enf.apply(RuleSet.build([DomainRule("b.example", False, o)])))
        assert srv.secondaries()["127.0.0.1"].serial == s1  # lagging until it transfers
        msgs = list(dns.query.xfr("127.0.0.1", "rpz.blockd.", rdtype=dns.rdatatype.IXFR, serial=s1, port=port))
        assert msgs[0].answer[0][0].serial == srv.serial and srv.stats["ixfr"] == 1
        wait_for(lambda: srv.secondaries()["127.0.0.1"].serial == srv.serial, "the IXFR recorded", 5)
        families = {f.name: f for f in rpz_metrics(srv.serial, {a: s.serial for a, s in srv.secondaries().items()},
                                                   srv.stats)}
        in_sync = {s.labels["secondary"]: s.value for s in families["blockd_rpz_secondary_in_sync"].samples}
        assert in_sync == {"127.0.0.1": 1, "192.0.2.7": 0, "192.0.2.8": 0}
        assert families["blockd_rpz_serial"].samples[0].value == srv.serial
        assert MAX_SECONDARIES >= 3
    finally:
        lt.run(srv.aclose())
        lt.close()



# ---- the fleet ------------------------------------------------------------------------------
PRIMARY_PORT, METRICS_PORT = 5354, 9153
RESOLVERS = {"unbound-a": "127.0.0.2", "unbound-b": "127.0.0.3", "bind": "127.0.0.4"}


def policy_text(serial: int, domains: list[str]) -> str:
    return textwrap.dedent(f"""\
        issuer: demo-regulator
        serial: {serial}
        issued_at: 2026-01-01T00:00:00Z
        not_before: 2026-01-01T00:00:00Z
        not_after: 2030-01-01T00:00:00Z
        orders:
          - id: fleet
            legal_basis: {{authority: Test Court, reference: F-{serial}}}
            action: block
            targets: {{domains: {json.dumps(domains)}}}
        """)


class NetNs:
    def __init__(self, name: str, addrs: list[str]) -> None:
        self.name = name
        subprocess.run(["ip", "netns", "add", name], check=True)
        subprocess.run(["ip", "-n", name, "link", "set", "lo", "up"], check=True)
        for a in addrs:
            subprocess.run(["ip", "-n", name, "addr", "add", f"{a}/32", "dev", "lo"], check=True)

    def enter(self) -> None:
        """Move the calling thread (only it) into the namespace."""
        libc = ctypes.CDLL(None, use_errno=True)
        fd = os.open(f"/run/netns/{self.name}", os.O_RDONLY)
        try:
            if libc.setns(fd, CLONE_NEWNET) != 0:
                raise OSError(ctypes.get_errno(), "setns")
        finally:
            os.close(fd)

    def popen(self, cmd: list[str], log: Path, env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
        with open(log, "ab") as out:
            return subprocess.Popen(["ip", "netns", "exec", self.name, *cmd], stdout=out, stderr=subprocess.STDOUT,
                                    env=env)

    def delete(self) -> None:
        subprocess.run(["ip", "netns", "del", self.name], check=False)


class Fleet:
    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.ns = NetNs(f"bkf-{os.getpid()}-{time.monotonic_ns() % 100000}", list(RESOLVERS.values()))
        self.pool = ThreadPoolExecutor(1, initializer=self.ns.enter)  # the test's hands inside the namespace
        self.lt = LoopThread()
        self.lt.run(self._enter())
        self.up = Upstream("example.net")
        self.lt.run(self.up.start())
        self.procs: dict[str, subprocess.Popen[bytes]] = {}
        self.blockd: subprocess.Popen[bytes] | None = None
        self.notify: socket.socket | None = None
        self.policies = tmp / "policies"
        self.policies.mkdir()
        self.config = tmp / "blockd.yaml"
        notify = ", ".join(f'"{a}:53"' for a in RESOLVERS.values())
        self.config.write_text(repo_config(self.policies, tmp / "state") + textwrap.dedent(f"""\
            enforcers:
              rpz:
                zone: rpz.blockd.
                listen: ["0.0.0.0:{PRIMARY_PORT}"]
                notify: [{notify}]
                zone_file: {tmp / "rpz.blockd.zone"}
                state_file: {tmp / "rpz.state"}
                renotify_s: 1
            daemon:
              metrics_listen: "127.0.0.1:{METRICS_PORT}"
            """))

    async def _enter(self) -> None:
        self.ns.enter()  # the loop thread: the upstream's sockets are created in the namespace

    def in_ns(self, fn: Callable[..., T], *args: object) -> T:
        return self.pool.submit(fn, *args).result(60)

    # -- blockd -------------------------------------------------------------------------------
    def write_policy(self, text: str, name: str = "p.yaml") -> None:
        drop_policy(self.policies, name, text)

    def start_blockd(self) -> None:
        path = self.tmp / "notify.sock"
        self.notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.notify.bind(str(path))
        self.notify.settimeout(0.1)
        self.blockd = self.ns.popen([sys.executable, "-m", "blockd", "run", "--config", str(self.config)],
                                    self.tmp / "blockd.log", dict(os.environ, NOTIFY_SOCKET=str(path)))

        def ready() -> bool:
            assert self.notify is not None and self.blockd is not None
            if self.blockd.poll() is not None:
                raise AssertionError(f"blockd exited {self.blockd.returncode}:\n{self.logs()}")
            try:
                return "READY=1" in self.notify.recv(4096).decode().split("\n")
            except TimeoutError:
                return False

        wait_for(ready, "READY=1 from blockd", 30)

    def metrics_text(self) -> str:
        def get() -> str:
            c = http.client.HTTPConnection("127.0.0.1", METRICS_PORT, timeout=5)
            try:
                c.request("GET", "/metrics")
                return c.getresponse().read().decode()
            finally:
                c.close()

        return self.in_ns(get)

    def metrics(self) -> dict[tuple[str, tuple[str, ...]], float]:
        """{(sample name, label values): value} from blockd's /metrics."""
        out = {}
        for fam in text_string_to_metric_families(self.metrics_text()):
            for s in fam.samples:
                out[(s.name, tuple(v for _, v in sorted(s.labels.items())))] = s.value
        return out

    # -- resolvers ------------------------------------------------------------------------------
    def start_resolver(self, name: str) -> None:
        """Listening on its own address, port 53, and reaching the primary at that address."""
        addr, d = RESOLVERS[name], self.tmp / name
        primary = (addr, PRIMARY_PORT)
        if name == "bind":
            kind, conf = "named", resolvers.named_conf(d, (addr, 53), self.up.port, primary=primary,
                                                       clients="127.0.0.0/8")
        else:
            kind, conf = "unbound", resolvers.unbound_conf(d, (addr, 53), self.up.port, primary=primary)
        self.procs[name] = resolvers.start(kind, d, conf, prefix=["ip", "netns", "exec", self.ns.name])

    def stop_resolver(self, name: str) -> None:
        resolvers.stop(self.procs.pop(name))

    def rcode(self, name: str, qname: str) -> int | None:
        return resolvers.rcode(53, qname, RESOLVERS[name])

    def until_blocked(self, qname: str, names: list[str], t0: float, timeout: float = 30) -> dict[str, float]:
        """Poll each resolver until it answers NXDOMAIN for `qname`: {resolver: seconds since t0}."""
        took: dict[str, float] = {}
        deadline = t0 + timeout
        while len(took) < len(names) and time.monotonic() < deadline:
            for n in names:
                if n not in took and self.rcode(n, qname) == dns.rcode.NXDOMAIN:
                    took[n] = time.monotonic() - t0
            time.sleep(0.005)  # poll interval under the deadline
        missing = [n for n in names if n not in took]
        if missing:
            raise AssertionError(f"{missing} did not block {qname} within {timeout}s\n{self.logs()}")
        return took

    def close(self) -> None:
        for name in list(self.procs):
            self.stop_resolver(name)
        if self.blockd is not None:
            resolvers.stop(self.blockd, timeout=20)
        if self.notify is not None:
            self.notify.close()
        self.lt.run(self.up.aclose())
        self.lt.close()
        self.pool.shutdown()
        self.ns.delete()

    def logs(self) -> str:
        out = []
        for p in [self.tmp / "blockd.log", *(self.tmp / n / "log" for n in RESOLVERS)]:
            if p.exists():
                out.append(f"--- {p.parent.name}/{p.name}\n" + p.read_text(errors="replace")[-3000:])
        return "\n".join(out)


@pytest.fixture
def fleet(tmp_path: Path) -> Iterator[Fleet]:
    if not os.path.exists(resolvers.UNBOUND) or not os.path.exists(resolvers.NAMED):
        pytest.fail("unbound and named are required (scripts/deps.sh installs them)")
    f = Fleet(tmp_path)
    try:
        yield f
    finally:
        f.close()


def secondary_view(m: dict[tuple[str, tuple[str, ...]], float]) -> dict[str, tuple[float | None, float | None]]:
    """{resolver: (serial held, in_sync)} from a scrape."""
    return {n: (m.get(("blockd_rpz_secondary_serial", (a,))), m.get(("blockd_rpz_secondary_in_sync", (a,))))
            for n, a in RESOLVERS.items()}


@needs_root
@pytest.mark.slow
def test_fleet_time_to_enforce_and_per_secondary_sync(fleet: Fleet) -> None:
    names = list(RESOLVERS)
    fleet.write_policy(policy_text(1, ["base.example.net", "n1.example.net"]))
    fleet.start_blockd()
    for n in names:
        fleet.start_resolver(n)
    fleet.in_ns(fleet.until_blocked, "n1.example.net", names, time.monotonic(), 60)  # first load: AXFR

    def converged() -> dict[tuple[str, tuple[str, ...]], float] | None:
        m = fleet.metrics()
        serial = m.get(("blockd_rpz_serial", ()))
        ok = all(v == (serial, 1.0) for v in secondary_view(m).values())
        return m if ok else None

    m0 = wait_for(converged, "every secondary in sync after the first load")
    xfr0 = {k: m0[("blockd_rpz_transfers_total", (k,))] for k in ("axfr", "ixfr", "ixfr_as_axfr")}

    fleet_s: list[float] = []
    per: dict[str, list[float]] = {n: [] for n in names}
    changes = 5
    for serial in range(2, 2 + changes):
        qname = f"n{serial}.example.net"
        t0 = time.monotonic()
        fleet.write_policy(policy_text(serial, ["base.example.net", qname]))
        took = fleet.in_ns(fleet.until_blocked, qname, names, t0)
        fleet_s.append(max(took.values()))
        for n, t in took.items():
            per[n].append(t)
        m = wait_for(converged, f"every secondary in sync at policy serial {serial}")
        assert fleet.in_ns(fleet.rcode, "bind", f"n{serial - 1}.example.net") == dns.rcode.NOERROR  # unblocked
    if shutil.which("promtool"):
        check = subprocess.run(["promtool", "check", "metrics"], input=fleet.metrics_text(), capture_output=True,
                               text=True, timeout=30)
        assert check.returncode == 0, check.stdout + check.stderr
    xfr = {k: m[("blockd_rpz_transfers_total", (k,))] - xfr0[k] for k in xfr0}
    assert xfr["axfr"] == 0 and xfr["ixfr_as_axfr"] == 0, f"changes must travel as IXFR, not AXFR: {xfr}"
    assert xfr["ixfr"] >= changes * len(names), xfr
    print(f"\nfleet time-to-enforce (policy file -> last of {len(names)} resolvers NXDOMAIN), {changes} changes: "
          f"p50 {statistics.median(fleet_s) * 1000:.0f} ms, max {max(fleet_s) * 1000:.0f} ms; per resolver p50: "
          + ", ".join(f"{n} {statistics.median(v) * 1000:.0f} ms" for n, v in per.items()))
    assert max(fleet_s) < 20, "hang guard: a 1-name change must reach the fleet in seconds"

    # One secondary down: the change reaches the others; /metrics shows the lagging one.
    fleet.stop_resolver("unbound-b")
    held = secondary_view(fleet.metrics())["unbound-b"][0]
    up = [n for n in names if n != "unbound-b"]
    serial = 2 + changes
    fleet.write_policy(policy_text(serial, ["base.example.net", f"n{serial}.example.net"]))
    fleet.in_ns(fleet.until_blocked, f"n{serial}.example.net", up, time.monotonic())

    def lagging() -> dict[str, tuple[float | None, float | None]] | None:
        m = fleet.metrics()
        view = secondary_view(m)
        ok = all(view[n] == (m[("blockd_rpz_serial", ())], 1.0) for n in up) and view["unbound-b"][1] == 0.0
        return view if ok else None

    view = wait_for(lagging, "two secondaries in sync and unbound-b lagging")
    assert view["unbound-b"][0] == held  # still the serial it held when it stopped
    wait_for(lambda: fleet.metrics().get(("blockd_rpz_notifies_total", ("failed",)), 0) >= 1,
             "the NOTIFY to the stopped secondary counted as failed")

    # It comes back with its zone file and catches up by IXFR.
    fleet.start_resolver("unbound-b")
    wait_for(converged, "unbound-b back in sync", 40)
    fleet.in_ns(fleet.until_blocked, f"n{serial}.example.net", ["unbound-b"], time.monotonic())
    m = fleet.metrics()
    assert m[("blockd_rpz_transfers_total", ("axfr",))] == xfr0["axfr"]
    assert m[("blockd_rpz_transfers_total", ("ixfr_as_axfr",))] == xfr0["ixfr_as_axfr"]
