"""Unbound and BIND as RPZ secondaries of blockd's primary: AXFR first, IXFR after NOTIFY.

Both resolvers run as child processes on loopback ports with configs written to tmp dirs, and
forward everything else to a tiny upstream for example.net started by the test.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import dns.rcode
import pytest

from blockd.dns.resolvers import NAMED, UNBOUND, free_port, named_conf, rcode, start, stop, unbound_conf
from blockd.dns.rpz import RpzSettings
from blockd.dns.rpzserver import RpzServer
from blockd.dns.testing import LoopThread, Upstream
from blockd.enforcers.rpz import RpzEnforcer
from blockd.model import DomainRule, RuleSet

pytestmark = [pytest.mark.e2e, pytest.mark.slow]
O = frozenset({"court-1"})


def wait_for(check: Callable[[], bool], what: str, timeout: float = 40) -> float:
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        if check():
            return time.monotonic() - t0
        time.sleep(0.1)  # a poll interval under a deadline, not a wait for something to happen
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


def rules(*names: str) -> RuleSet:
    return RuleSet.build([DomainRule(n[2:], True, O) if n.startswith("*.") else DomainRule(n, False, O)
                          for n in names])


class Stack:
    def __init__(self, tmp: Path) -> None:
        self.procs: list[subprocess.Popen[bytes]] = []
        self.lt = LoopThread()
        self.up = Upstream("example.net")
        self.lt.run(self.up.start())
        self.ub_port, self.bind_port = free_port(), free_port()
        s = RpzSettings(listen=(("127.0.0.1", 0),), notify=(("127.0.0.1", self.ub_port), ("127.0.0.1", self.bind_port)),
                        zone_file=str(tmp / "rpz.blockd.zone"), state_file=str(tmp / "rpz.state"))
        self.primary = RpzServer(s)
        self.lt.run(self.primary.start())
        self.enf = RpzEnforcer(self.primary)
        self.tmp = tmp

    def start_resolvers(self) -> None:
        primary = ("127.0.0.1", self.primary.addresses[0][1])
        ub, named = self.tmp / "unbound", self.tmp / "named"
        ub_conf = unbound_conf(ub, ("127.0.0.1", self.ub_port), self.up.port, primary=primary, rpz_log="blockd",
                               server=["verbosity: 1"])
        bind_conf = named_conf(named, ("127.0.0.1", self.bind_port), self.up.port, primary=primary)
        self.procs += [start("unbound", ub, ub_conf), start("named", named, bind_conf)]

    def close(self) -> None:
        stop(*self.procs)
        self.lt.run(self.primary.aclose())
        self.lt.run(self.up.aclose())
        self.lt.close()

    def logs(self) -> str:
        return "\n".join(f"--- {n}\n" + (self.tmp / n / "log").read_text(errors="replace")[-3000:]
                         for n in ("unbound", "named") if (self.tmp / n / "log").exists())


@pytest.fixture(scope="module")
def stack(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Stack]:
    if not os.path.exists(UNBOUND) or not os.path.exists(NAMED):
        pytest.fail("unbound and named are required (scripts/deps.sh installs them)")
    st = Stack(tmp_path_factory.mktemp("rpz"))
    try:
        yield st
    finally:
        st.close()


def test_secondaries_pull_axfr_then_ixfr_after_notify(stack: Stack) -> None:
    first = rules("bad.example.net", "*.tree.example.net", "gone.example.net")
    a = stack.lt.run(stack.enf.apply(first))
    assert a.in_sync and stack.enf.serial >= 1
    stack.start_resolvers()
    ports = {"unbound": stack.ub_port, "bind": stack.bind_port}
    try:
        for who, port in ports.items():
            wait_for(lambda: rcode(port, "bad.example.net") == dns.rcode.NXDOMAIN, f"{who} to block (AXFR)")
            assert rcode(port, "x.y.tree.example.net") == dns.rcode.NXDOMAIN
            assert rcode(port, "tree.example.net") == dns.rcode.NXDOMAIN
            assert rcode(port, "www.example.net") == dns.rcode.NOERROR
            assert rcode(port, "www.bad.example.net") == dns.rcode.NOERROR  # exact rule only
        assert stack.primary.stats["axfr"] + stack.primary.stats["ixfr_as_axfr"] >= 2

        second = rules("bad.example.net", "*.tree.example.net", "new.example.net")
        b = stack.lt.run(stack.enf.apply(second))
        assert b.in_sync and b.added == 1 and b.removed == 1
        for who, port in ports.items():
            took = wait_for(lambda: rcode(port, "new.example.net") == dns.rcode.NXDOMAIN, f"{who} to block (IXFR)")
            assert took < 30
            wait_for(lambda: rcode(port, "gone.example.net") == dns.rcode.NOERROR, f"{who} to unblock")
        wait_for(lambda: stack.primary.stats["ixfr"] >= 2, "an incremental IXFR from both secondaries", 10)
        assert stack.primary.stats["notify_acked"] >= 2
    except AssertionError as e:
        raise AssertionError(f"{e}\n{stack.logs()}") from None


def test_zone_file_passes_named_checkzone(stack: Stack) -> None:
    checkzone = shutil.which("named-checkzone") or "/usr/bin/named-checkzone"
    r = subprocess.run([checkzone, "rpz.blockd", str(stack.tmp / "rpz.blockd.zone")], capture_output=True,
                       text=True, timeout=30)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "loaded serial" in r.stdout
