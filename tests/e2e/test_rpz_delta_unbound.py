"""`blockd run` (rpz enforcer, IP triggers) as primary of a real Unbound on loopback: each policy
change takes the delta path (the zone is extended from the change, read back where it touched)
and reaches Unbound by IXFR, never AXFR (blockd's /metrics), and the zone Unbound could AXFR
afterwards is exactly the one a full render gives."""

from __future__ import annotations

import http.client
import json
import os
import socket
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TypeVar

import dns.query
import dns.rcode
import dns.rdatatype
import dns.zone
import pytest

from blockd.dns import resolvers
from blockd.dns.testing import LoopThread, Upstream
from tests.conftest import drop_policy, repo_config

pytestmark = pytest.mark.e2e
T = TypeVar("T")


def wait_for(check: Callable[[], T], what: str, timeout: float = 60) -> T:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        time.sleep(0.01)  # a poll interval under a deadline
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


def policy_text(serial: int, domains: list[str], cidrs: list[str]) -> str:
    return textwrap.dedent(f"""\
        issuer: demo-regulator
        serial: {serial}
        issued_at: 2026-01-01T00:00:00Z
        not_before: 2026-01-01T00:00:00Z
        not_after: 2030-01-01T00:00:00Z
        orders:
          - id: base
            legal_basis: {{authority: Test Court, reference: B-1}}
            action: block
            targets: {{domains: ["base.example.net", "*.wide.example.net"], cidrs: ["198.51.100.0/24"]}}
          - id: t{serial}
            legal_basis: {{authority: Test Court, reference: T-{serial}}}
            action: block
            targets: {{domains: {json.dumps(domains)}, cidrs: {json.dumps(cidrs)}}}
        """)


def transfers(port: int) -> dict[str, float]:
    c = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        c.request("GET", "/metrics")
        text = c.getresponse().read().decode()
    finally:
        c.close()
    out = {}
    for line in text.splitlines():
        if line.startswith("blockd_rpz_transfers_total{"):
            key, value = line.rsplit(" ", 1)
            out[key.split('"')[1]] = float(value)
    return out


@pytest.fixture
def upstream() -> Iterator[int]:
    lt = LoopThread()
    up = Upstream("example.net")  # answers every name below it: NXDOMAIN can only come from the RPZ
    lt.run(up.start())
    yield up.port
    lt.run(up.aclose())
    lt.close()


def test_changes_reach_unbound_by_ixfr_from_the_delta_path(tmp_path: Path, upstream: int) -> None:
    if not os.path.exists(resolvers.UNBOUND):
        pytest.fail("unbound is required (scripts/deps.sh installs it)")
    rpz_port, ub_port, metrics_port = resolvers.free_port(), resolvers.free_port(), resolvers.free_port()
    policies = tmp_path / "policies"
    policies.mkdir()
    config = tmp_path / "blockd.yaml"
    config.write_text(repo_config(policies, tmp_path / "state") + textwrap.dedent(f"""\
        enforcers:
          rpz:
            listen: ["127.0.0.1:{rpz_port}"]
            notify: ["127.0.0.1:{ub_port}"]
            ip_triggers: true
            state_file: {tmp_path / "rpz.state"}
            renotify_s: 1
        daemon:
          metrics_listen: "127.0.0.1:{metrics_port}"
        """))
    drop_policy(policies, "p.yaml", policy_text(1, ["n1.example.net"], ["203.0.113.1/32"]))
    sock_path = tmp_path / "notify.sock"
    notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    notify.bind(str(sock_path))
    notify.settimeout(0.1)
    log = tmp_path / "blockd.log"
    with open(log, "ab") as out:
        blockd = subprocess.Popen([sys.executable, "-m", "blockd", "run", "--config", str(config)], stdout=out,
                                  stderr=subprocess.STDOUT, env=dict(os.environ, NOTIFY_SOCKET=str(sock_path)))
    unbound = None
    try:
        def ready() -> bool:
            if blockd.poll() is not None:
                raise AssertionError(f"blockd exited {blockd.returncode}:\n{log.read_text()[-3000:]}")
            try:
                return "READY=1" in notify.recv(4096).decode().split("\n")
            except TimeoutError:
                return False

        wait_for(ready, "READY=1 from blockd")
        d = tmp_path / "unbound"
        unbound = resolvers.start("unbound", d, resolvers.unbound_conf(d, ("127.0.0.1", ub_port), upstream,
                                                                      primary=("127.0.0.1", rpz_port)))

        def rcode(name: str) -> int | None:
            return resolvers.rcode(ub_port, name, timeout=0.3)

        wait_for(lambda: rcode("n1.example.net") == dns.rcode.NXDOMAIN, "the first zone in Unbound (AXFR)")
        xfr0 = transfers(metrics_port)
        for serial in (2, 3, 4):
            name = f"n{serial}.example.net"
            drop_policy(policies, "p.yaml", policy_text(serial, [name, f"*.s{serial}.example.net"],
                                                        [f"203.0.113.{serial}/32"]))
            wait_for(lambda: rcode(name) == dns.rcode.NXDOMAIN and rcode(f"x.s{serial}.example.net")
                     == dns.rcode.NXDOMAIN, f"{name} blocked by Unbound")
            wait_for(lambda: rcode(f"n{serial - 1}.example.net") == dns.rcode.NOERROR, "the old name unblocked")
        assert rcode("a.wide.example.net") == dns.rcode.NXDOMAIN  # untouched rules stay enforced
        xfr = wait_for(lambda: (x := transfers(metrics_port)) and x["ixfr"] - xfr0["ixfr"] >= 3 and x, "3 IXFRs")
        assert xfr["axfr"] == xfr0["axfr"] and xfr["ixfr_as_axfr"] == xfr0["ixfr_as_axfr"], (xfr0, xfr)
        applied = [e for e in map(json.loads, (x for x in log.read_text().splitlines() if x.startswith("{")))
                   if e.get("event") == "ruleset_applied" and e.get("enforcer") == "rpz" and "path" in e]
        assert [(e["path"], e["readback"], e["in_sync"]) for e in applied[-3:]] == [("delta", "touched", True)] * 3
        # what blockd serves now, by AXFR, is the full render of the last policy
        z = dns.zone.from_xfr(dns.query.xfr("127.0.0.1", "rpz.blockd.", port=rpz_port, timeout=10))
        owners = {n.to_text() for n, node in z.nodes.items() if node.get_rdataset(1, dns.rdatatype.CNAME)}
        assert owners == {"base.example.net", "wide.example.net", "*.wide.example.net", "24.0.100.51.198.rpz-ip",
                          "n4.example.net", "s4.example.net", "*.s4.example.net", "32.4.113.0.203.rpz-ip"}
    finally:
        if unbound is not None:
            resolvers.stop(unbound, timeout=30)
        blockd.terminate()
        blockd.wait(60)
        notify.close()
