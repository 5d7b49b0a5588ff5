"""`blockd run` as a subprocess in a network namespace the test creates: real nftables, real DNS
queries (dig), real signals, kill -9, the policy directory watched, metrics scraped and checked
by promtool and by a real Prometheus server.
"""

from __future__ import annotations

import json
import os
import re
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import textwrap
import time
from collections.abc import Callable, Iterator
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest

from tests.conftest import ROOT, drop_policy, repo_config
pytestmark = [
    pytest.mark.e2e,
    pytest.mark.skipif(os.geteuid() != 0, reason="needs root for network namespaces and nftables"),
    pytest.mark.skipif(shutil.which("nft") is None or shutil.which("dig") is None, reason="nft/dig missing (make deps)"),
]


def wait_for(check: Callable[[], object], timeout: float = 15, what: str = "condition") -> object:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = check()
        if value:
            return value
        time.sleep(0.02)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


def policy_text(serial: int, domains: list[str], cidrs: list[str], *, not_before: datetime | None = None,
                not_after: datetime | None = None, order: str = "o1") -> str:
    nb = (not_before or datetime(2026, 1, 1, tzinfo=timezone.utc)).strftime("%Y-%m-%dT%H:%M:%SZ")
    na = (not_after or datetime(2030, 1, 1, tzinfo=timezone.utc)).strftime("%Y-%m-%dT%H:%M:%SZ")
    return textwrap.dedent(f"""\
        issuer: demo-regulator
        serial: {serial}
        issued_at: 2026-01-01T00:00:00Z
        not_before: {nb}
        not_after: {na}
        orders:
          - id: {order}
            legal_basis: {{authority: Test Court, reference: T-{serial}}}
            action: block
            targets: {{domains: {json.dumps(domains)}, cidrs: {json.dumps(cidrs)}}}
        """)


class Box:
    """One namespace with blockd running in it."""

    def __init__(self, tmp: Path, name: str, drift_check_s: float = 1, attest_period_s: float = 86400,
                 nft: str = "{hooks: [output], verdict: drop}", daemon_extra: str = "") -> None:
        self.tmp, self.ns = tmp, name
        self.policies = tmp / "policies"
        self.policies.mkdir()
        self.config = tmp / "blockd.yaml"
        self.config.write_text(repo_config(self.policies, tmp / "state") + textwrap.dedent(f"""\
            enforcers:
              nft: {nft}
              dns: {{listen: ["127.0.0.1:53"]}}
            daemon:
              metrics_listen: "127.0.0.1:9153"
              drift_check_s: {drift_check_s}
              attest_period_s: {attest_period_s}
              operator_key: {ROOT / "policies/keys/demo-operator.key"}
              attest_dir: {tmp / "attestations"}
              audit_log: {tmp / "audit.jsonl"}
            """) + textwrap.indent(daemon_extra, "  "))
        self.proc: subprocess.Popen[bytes] | None = None
        self.notify: socket.socket | None = None
        self.log = tmp / "blockd.log"

    def write_policy(self, name: str, text: str, *, sign: bool = True) -> Path:
        return drop_policy(self.policies, name, text, sign=sign)

    def start(self) -> str:
        self.launch()
        return self.wait_notify("READY=1", 30)

    def launch(self) -> None:
        """Start blockd without waiting for READY=1 (see `notifications`)."""
        if self.notify is not None:
            self.notify.close()
        sock_path = self.tmp / f"notify-{time.monotonic_ns()}.sock"
        self.notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.notify.bind(str(sock_path))
        self.notify.settimeout(0.1)
        env = dict(os.environ, NOTIFY_SOCKET=str(sock_path))
        with open(self.log, "ab") as out:
            self.proc = subprocess.Popen(
                ["ip", "netns", "exec", self.ns, sys.executable, "-m", "blockd", "run", "--config", str(self.config)],
                stdout=out, stderr=subprocess.STDOUT, env=env)

    def notifications(self, until: Callable[[str], bool], timeout: float) -> list[str]:
        """Every sd_notify datagram up to and including the first for which `until` holds."""
        assert self.notify is not None and self.proc is not None
        seen: list[str] = []
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"blockd exited {self.proc.returncode}:\n{self.log.read_text()[-4000:]}")
            try:
                msg = self.notify.recv(4096).decode()
            except TimeoutError:
                continue
            seen.append(msg)
            if until(msg):
                return seen
        raise AssertionError(f"no such notification within {timeout}s; got {seen!r}")

    def wait_notify(self, field: str, timeout: float) -> str:
        assert self.notify is not None and self.proc is not None
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"blockd exited {self.proc.returncode}:\n{self.log.read_text()[-4000:]}")
            try:
                msg = self.notify.recv(4096).decode()
            except TimeoutError:
                continue
            if field in msg.split("\n"):
                return msg
        raise AssertionError(f"no {field} from blockd within {timeout}s:\n{self.log.read_text()[-4000:]}")

    def signal(self, sig: int) -> None:
        assert self.proc is not None
        self.proc.send_signal(sig)

    def stop(self) -> int:
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(20)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        if self.notify is not None:
            self.notify.close()
            self.notify = None
        return self.proc.returncode

    def kill9(self) -> None:
        assert self.proc is not None
        self.proc.kill()
        self.proc.wait()
        if self.notify is not None:
            self.notify.close()
            self.notify = None

    def run(self, *cmd: str, check: bool = False) -> subprocess.CompletedProcess[str]:
        return subprocess.run(["ip", "netns", "exec", self.ns, *cmd], capture_output=True, text=True, check=check,
                              timeout=30)

    def dig(self, name: str, timeout: float = 20) -> str:
        """The sinkhole's answer for `name`. A query that gets no answer in time (a loaded machine, a
        daemon busy writing its statement) is asked again: no answer is neither blocked nor open."""
        deadline = time.monotonic() + timeout
        while True:
            out = self.run("dig", "@127.0.0.1", name, "A", "+tries=1", "+time=1").stdout
            if "status: " in out or time.monotonic() > deadline:
                return out

    def blocked(self, name: str) -> bool:
        return "status: NXDOMAIN" in self.dig(name)

    def nft_elements(self) -> set[str]:
        out = self.run("nft", "-j", "list", "table", "inet", "blockd")
        if out.returncode != 0:
            return set()
        elems = set()
        for item in json.loads(out.stdout)["nftables"]:
            for e in item.get("set", {}).get("elem", []):
                if isinstance(e, dict) and "prefix" in e:
                    elems.add(f"{e['prefix']['addr']}/{e['prefix']['len']}")
                elif isinstance(e, dict) and "range" in e:
                    elems.add("-".join(e["range"]))
                else:
                    elems.add(str(e))
        return elems

    def metrics(self) -> str:
        code = "import urllib.request;print(urllib.request.urlopen('http://127.0.0.1:9153/metrics',timeout=5).read().decode())"
        return self.run(sys.executable, "-c", code, check=True).stdout

    def events(self, name: str) -> list[dict[str, object]]:
        out = []
        for line in self.log.read_text().splitlines():
            if line.startswith("{"):
                entry = json.loads(line)
                if entry.get("event") == name:
                    out.append(entry)
        return out


@pytest.fixture
def box(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[Box]:
    name = f"bke-{os.getpid()}-{time.monotonic_ns() % 100000}"
    subprocess.run(["ip", "netns", "add", name], check=True)
    subprocess.run(["ip", "-n", name, "link", "set", "lo", "up"], check=True)
    # a default route into a veth pair: packets reach the output hook (and go nowhere)
    for cmd in (["link", "add", "d0", "type", "veth", "peer", "name", "d1"], ["link", "set", "d0", "up"],
                ["link", "set", "d1", "up"],
                ["addr", "add", "10.99.0.1/24", "dev", "d0"], ["route", "add", "default", "dev", "d0"]):
        subprocess.run(["ip", "-n", name, *cmd], check=True)
    b = Box(tmp_path, name, **getattr(request, "param", {}))
    try:
        yield b
    finally:
        if b.proc is not None:
            b.stop()
        subprocess.run(["ip", "netns", "del", name], check=False)


def test_start_enforce_and_stop_keeps_rules(box: Box) -> None:
    box.write_policy("p.yaml", policy_text(1, ["blocked.example", "*.sub.example"], ["192.0.2.0/24"]))
    status = box.start()
    assert "demo-regulator#1" in status
    assert box.blocked("blocked.example") and box.blocked("a.b.sub.example")
    assert "EDE: 16 (Censored): (Blocked by order demo-regulator/o1 of Test Court (T-1))" in box.dig("blocked.example")
    assert "192.0.2.0/24" in box.nft_elements()
    # packets to a blocked address are dropped by the output hook, others are not
    ping = box.run("ping", "-c", "1", "-W", "1", "192.0.2.1")
    assert ping.returncode != 0
    wait_for(lambda: 'blockd_kernel_packets_total{enforcer="nft",rule="daddr4"} 1.0' in box.metrics(),
             what="the drop counter in /metrics")
    assert box.stop() == 0
    assert "192.0.2.0/24" in box.nft_elements(), "kernel rules must stay in place after SIGTERM"


def test_policy_change_time_to_enforce(box: Box) -> None:
    """A policy dropped into the watched directory -> live in nftables and in the sinkhole."""
    box.write_policy("p.yaml", policy_text(1, ["a0.example"], ["198.51.100.0/32"]))
    box.start()
    samples = []
    for serial in range(2, 12):
        name, net = f"a{serial}.example", f"198.51.100.{serial}/32"
        t0 = time.monotonic()
        box.write_policy("p.yaml", policy_text(serial, [name], [net.removesuffix("/32")]))
        wait_for(lambda: box.blocked(name) and f"198.51.100.{serial}" in box.nft_elements(), what=name)
        samples.append(time.monotonic() - t0)
        assert not box.blocked(f"a{serial - 1}.example"), "unblocking is as fast as blocking"
    samples.sort()
    p99 = samples[-1]
    print(f"\ntime-to-enforce over {len(samples)} policy changes: p50 {statistics.median(samples) * 1000:.0f} ms, "
          f"max {p99 * 1000:.0f} ms")
    assert p99 < 10, "a small policy change must not take seconds"


def test_bad_policy_keeps_last_good_rule_set(box: Box) -> None:
    box.write_policy("p.yaml", policy_text(1, ["kept.example"], ["192.0.2.0/24"]))
    box.start()
    before = box.nft_elements()
    box.write_policy("bad.yaml", policy_text(5, ["evil.example"], []).replace("kept", "x") + "junk: [\n")
    box.write_policy("unsigned.yaml", policy_text(6, ["u.example"], []), sign=False)
    tampered = box.write_policy("tampered.yaml", policy_text(7, ["t.example"], []))
    tampered.write_text(tampered.read_text().replace("t.example", "t2.example"))
    wait_for(lambda: len({e["path"] for e in box.events("policy_rejected")}) >= 3, what="three rejections")
    assert box.blocked("kept.example") and not box.blocked("evil.example") and not box.blocked("u.example")
    assert box.nft_elements() == before
    metrics = box.metrics()
    assert 'blockd_policy_rejections_total{reason="policy"}' in metrics
    assert 'blockd_policy_rejections_total{reason="signature"} 2.0' in metrics


def test_sighup_reload_and_notify(box: Box) -> None:
    box.write_policy("p.yaml", policy_text(1, ["one.example"], []))
    box.start()
    box.signal(signal.SIGHUP)
    box.wait_notify("RELOADING=1", 10)
    box.wait_notify("READY=1", 10)  # systemd leaves "reloading" only on READY=1
    assert any(e["reason"] == "reload" for e in box.events("reconcile_pass"))


def test_kill9_mid_apply_then_restart_converges(box: Box) -> None:
    box.write_policy("p.yaml", policy_text(1, ["old.example"], ["192.0.2.0/24"]))
    box.start()
    # A big change, killed while it is being applied: the kernel keeps the old or the new set.
    big = [f"10.{i >> 8}.{i & 255}.0/24" for i in range(0, 40000, 2)]
    box.write_policy("p.yaml", policy_text(2, ["new.example"], big))
    # Kill as soon as the new policy is recorded: the apply that follows is under way or next.
    wait_for(lambda: any(e.get("serial") == 2 for e in box.events("policy_accepted")), what="serial 2 recorded")
    box.kill9()
    held = box.nft_elements()
    assert "192.0.2.0/24" in held or "10.0.0.0/24" in held, "a kill -9 must never leave an empty set"
    box.start()
    wait_for(lambda: box.blocked("new.example") and "10.0.0.0/24" in box.nft_elements(), what="convergence")
    assert "192.0.2.0/24" not in box.nft_elements()
    assert json.loads((box.tmp / "state/accepted.json").read_text())["demo-regulator"]["serial"] == 2


def test_restart_restores_state_before_serving(box: Box) -> None:
    """Fail closed: after a restart with an empty policy directory the accepted policy still rules."""
    path = box.write_policy("p.yaml", policy_text(1, ["stays.example"], []))
    box.start()
    assert box.blocked("stays.example")
    box.stop()
    path.unlink()
    path.with_name("p.yaml.minisig").unlink()
    box.start()
    assert box.blocked("stays.example")


def test_not_before_and_not_after_take_effect_on_time(box: Box) -> None:
    box.write_policy("p.yaml", policy_text(1, ["now.example"], []))
    box.start()
    start = datetime.now(timezone.utc).replace(microsecond=0)
    later = policy_text(2, ["later.example"], [], not_before=start + timedelta(seconds=3),
                        not_after=start + timedelta(seconds=6))
    box.write_policy("p2.yaml", later)
    wait_for(lambda: box.events("reconcile_pass") and box.events("reconcile_pass")[-1].get("pending") == 1,
             what="pending policy")
    assert box.blocked("now.example") and not box.blocked("later.example")
    # its receipt is stated at once, as pending, though no rule changed
    latest = box.tmp / "attestations" / "latest.json"
    pending = wait_for(lambda: next((p for p in json.loads(latest.read_text())["predicate"]["policies"]
                                     if p["serial"] == 2), None), what="the pending policy in a statement")
    assert pending["status"] == "pending" and pending["orders"][0]["status"] == "pending"
    wait_for(lambda: box.blocked("later.example"), timeout=10, what="not_before")
    assert not box.blocked("now.example")  # serial 2 replaced serial 1
    wait_for(lambda: not box.blocked("later.example"), timeout=10, what="not_after")


def test_drift_is_repaired_and_attested(box: Box) -> None:
    box.write_policy("p.yaml", policy_text(1, ["d.example"], ["192.0.2.0/24"]))
    box.start()
    wait_for(lambda: box.events("policy_watch"), what="the policy watcher")
    sets = json.loads(box.run("nft", "-j", "list", "sets", "inet", check=True).stdout)["nftables"]
    script = "".join(f"flush set inet blockd {i['set']['name']}\n" for i in sets
                     if "set" in i and i["set"]["table"] == "blockd")
    flushed = subprocess.run(["ip", "netns", "exec", box.ns, "nft", "-f", "-"], input=script, text=True,
                             capture_output=True)
    assert flushed.returncode == 0, flushed.stderr
    wait_for(lambda: box.events("drift_repaired"), what="drift_repaired")
    assert "192.0.2.0/24" in box.nft_elements()
    # the watcher's first wake-up finds the files as the start pass read them: no second pass
    assert [e["reason"] for e in box.events("reconcile_pass")] == ["start"]
    att = box.tmp / "attestations" / "latest.json"
    # the repair is in a statement right away (not at the next periodic one, a day later)
    statement = wait_for(lambda: (lambda st: st if st["predicate"]["attestation"]["reason"] == "drift_repair"
                                  else None)(json.loads(att.read_text())), what="a drift_repair statement")
    (repair,) = [d for d in statement["predicate"]["drift_repairs"] if d["enforcer"] == "nft"]  # type: ignore[index]
    assert repair["missing"] >= 1 and repair["in_sync"] and repair["found_digest"] != repair["readback_digest"]
    verify = subprocess.run(["minisign", "-V", "-p", str(ROOT / "policies/keys/demo-operator.pub"), "-m", str(att)],
                            capture_output=True, text=True)
    assert verify.returncode == 0, verify.stderr
    assert box.stop() == 0  # no append in flight: every entry is under the signed head
    audit = subprocess.run([sys.executable, "-m", "blockd", "audit", "verify", "--key",
                            str(ROOT / "policies/keys/demo-operator.pub"), str(box.tmp / "audit.jsonl")],
                           capture_output=True, text=True)
    assert audit.returncode == 0, audit.stderr
    assert "drift_repaired" in (box.tmp / "audit.jsonl").read_text()


@pytest.mark.skipif(shutil.which("promtool") is None, reason="promtool missing (Debian package prometheus)")
def test_metrics_pass_promtool(box: Box) -> None:
    box.write_policy("p.yaml", policy_text(1, ["m.example"], ["192.0.2.0/24"]))
    box.start()
    box.dig("m.example")
    text = box.metrics()
    check = subprocess.run(["promtool", "check", "metrics"], input=text, capture_output=True, text=True)
    assert check.returncode == 0, check.stdout + check.stderr
    for name in ("blockd_policy_serial", "blockd_rules", "blockd_apply_duration_seconds_bucket",
                 "blockd_enforcer_in_sync", "blockd_dns_queries_total", "blockd_time_to_enforce_seconds_count",
                 "blockd_kernel_set_elements", "blockd_policy_expiry_timestamp_seconds"):
        assert name in text, name


@pytest.mark.skipif(shutil.which("prometheus") is None, reason="prometheus missing (Debian package prometheus)")
def test_real_prometheus_scrapes_blockd(box: Box) -> None:
    box.write_policy("p.yaml", policy_text(3, ["p.example"], []))
    box.start()
    conf = box.tmp / "prometheus.yml"
    conf.write_text(textwrap.dedent("""\
        global: {scrape_interval: 1s}
        scrape_configs:
          - job_name: blockd
            static_configs: [{targets: ["127.0.0.1:9153"]}]
        """))
    prom = subprocess.Popen(
        ["ip", "netns", "exec", box.ns, "prometheus", f"--config.file={conf}", f"--storage.tsdb.path={box.tmp / 'tsdb'}",
         "--web.listen-address=127.0.0.1:9090"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        code = ("import json,urllib.request;print(json.dumps(json.load(urllib.request.urlopen("
                "'http://127.0.0.1:9090/api/v1/query?query=blockd_policy_serial',timeout=2))))")

        def serial() -> str | None:
            r = box.run(sys.executable, "-c", code)
            if r.returncode != 0:
                return None
            result = json.loads(r.stdout)["data"]["result"]
            return result[0]["value"][1] if result else None

        assert wait_for(serial, timeout=40, what="prometheus query") == "3"
    finally:
        prom.terminate()
        prom.wait(10)


def test_demo_runs_end_to_end() -> None:
    """The README's first command, as a user runs it (minus the installs)."""
    out = subprocess.run([sys.executable, "-m", "blockd", "demo"], capture_output=True, text=True, timeout=240,
                         cwd=ROOT)
    assert out.returncode == 0, out.stdout + out.stderr
    text = out.stdout
    assert "status: NXDOMAIN" in text and "EDE: 16 (Censored)" in text and "Demo District Court" in text
    assert "dig example.org -> 93.184.215.14" in text
    assert "connect 149.154.167.99:443  -> no answer (timed out: dropped)" in text
    assert "connect 93.184.215.14:443   -> hello from 93.184.215.14" in text
    assert "Signature and comment signature verified" in text
    # The regulator's side: the demo's own statements checked by `blockd compliance`, one verdict line.
    assert "demo-isp: demo-regulator/demo-2026-001: late, first enforced" in text
    assert "verdict: DO NOT COMPLY: 0 of 1 operators comply with 1 orders; not: demo-isp (exit 1)" in text
    assert subprocess.run(["ip", "netns", "list"], capture_output=True, text=True).stdout.count("bd-") == 0


def attest_verify(box: Box, *files: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "blockd", "attest", "verify", "--key",
                           str(ROOT / "policies/keys/demo-operator.pub"), *map(str, files)],
                          capture_output=True, text=True, timeout=60)


def statements(box: Box) -> list[dict]:
    return [json.loads(p.read_text()) for p in sorted((box.tmp / "attestations").glob("attestation-*.json"))]


def flush_blockd_sets(box: Box) -> None:
    sets = json.loads(box.run("nft", "-j", "list", "sets", "inet", check=True).stdout)["nftables"]
    script = "".join(f"flush set inet blockd {i['set']['name']}\n" for i in sets
                     if "set" in i and i["set"]["table"] == "blockd")
    done = subprocess.run(["ip", "netns", "exec", box.ns, "nft", "-f", "-"], input=script, text=True,
                          capture_output=True)
    assert done.returncode == 0, done.stderr


@pytest.mark.parametrize("box", [{"drift_check_s": 3600, "attest_period_s": 1}], indirect=True)
def test_flush_behind_blockds_back_shows_in_the_next_periodic_statement(box: Box) -> None:
    """`nft flush` with no repair yet: the next periodic statement (a full read-back) says nft is
    not in sync and `attest verify` fails; after the repair (a SIGHUP pass) it is in sync again."""
    box.write_policy("p.yaml", policy_text(1, ["a.example"], ["192.0.2.0/24"]))
    box.start()
    latest = box.tmp / "attestations" / "latest.json"

    def periodic_after(t: datetime) -> dict | None:
        for st in reversed(statements(box)):
            a = st["predicate"]["attestation"]
            if a["reason"] == "periodic" and datetime.fromisoformat(a["issued_at"].replace("Z", "+00:00")) > t:
                return st
        return None

    good = wait_for(lambda: periodic_after(datetime.now(timezone.utc) - timedelta(hours=1)), what="a periodic statement")
    nft = good["predicate"]["enforcers"]["nft"]
    assert nft["in_sync"] and nft["readback_scope"] == "full" and nft["share"] == "addresses"
    assert nft["readback_digest"] == good["predicate"]["ruleset"]["shares"]["addresses"]
    assert attest_verify(box, latest).returncode == 0
    flushed_at = datetime.now(timezone.utc)
    flush_blockd_sets(box)
    bad = wait_for(lambda: periodic_after(flushed_at), what="a periodic statement after the flush")
    nft = bad["predicate"]["enforcers"]["nft"]
    assert not nft["in_sync"] and nft["status"] == "out_of_sync" and not bad["predicate"]["in_sync"]
    assert nft["readback_digest"] != nft["share_digest"] == good["predicate"]["enforcers"]["nft"]["share_digest"]
    assert nft["counts"]["ipv4_ranges"] == 0 and bad["predicate"]["enforcers"]["dns"]["in_sync"]
    order = bad["predicate"]["policies"][0]["orders"][0]
    assert order["not_enforced_on"] == ["nft"]
    name = box.tmp / "attestations" / f"attestation-{bad['predicate']['attestation']['id']}.json"
    out = attest_verify(box, name)
    assert out.returncode == 1 and "enforcer nft: read back" in out.stdout, out.stdout + out.stderr
    repaired_at = datetime.now(timezone.utc)
    box.signal(signal.SIGHUP)
    box.wait_notify("READY=1", 20)
    wait_for(lambda: "192.0.2.0/24" in box.nft_elements(), what="the repair")
    again = wait_for(lambda: (st := periodic_after(repaired_at)) and st["predicate"]["in_sync"] and st,
                     what="an in-sync periodic statement after the repair")
    assert again["predicate"]["enforcers"]["nft"]["readback_digest"] == good["predicate"]["enforcers"]["nft"]["readback_digest"]
    box.signal(signal.SIGUSR1)  # the documented "manual" statement
    wait_for(lambda: any(st["predicate"]["attestation"]["reason"] == "manual" for st in statements(box)),
             what="a manual statement")
    assert box.stop() == 0
    every = sorted((box.tmp / "attestations").glob("attestation-*.json"))
    out = attest_verify(box, *every)
    assert "chain:" not in out.stdout, out.stdout  # some are out of sync, but none is missing


@pytest.mark.parametrize("box", [{"nft": "{hooks: [postrouting], verdict: reject}"}], indirect=True)
def test_failed_nft_is_attested_as_failed_and_holds_back_readiness(box: Box) -> None:
    """The kernel refuses the nft rules (reject is not valid in postrouting): no READY=1, no DNS
    listener, retries with backoff, metrics and STATUS say so; the statement says nft failed."""
    deadline = (datetime.now(timezone.utc) + timedelta(days=1)).strftime("%Y-%m-%dT%H:%M:%SZ")
    box.write_policy("p.yaml", policy_text(1, ["f.example"], ["192.0.2.0/24"]).replace(
        "    action: block\n", f"    action: block\n    deadline: {deadline}\n"))
    box.launch()
    seen = box.notifications(lambda m: "not ready" in m and "FAILING: nft" in m, 30)
    assert not any("READY=1" in m.split("\n") for m in seen)
    latest = box.tmp / "attestations" / "latest.json"
    st = wait_for(lambda: latest.exists() and json.loads(latest.read_text()), what="the statement")
    pred = st["predicate"]
    nft = pred["enforcers"]["nft"]
    assert (nft["status"], nft["in_sync"], nft["readback_digest"]) == ("failed", False, None)
    assert "EOPNOTSUPP" in nft["error"] or "ENOTSUP" in nft["error"], nft["error"]
    assert pred["in_sync"] is False and pred["enforcers"]["dns"]["in_sync"]
    order = pred["policies"][0]["orders"][0]
    assert "nft" not in order["enforced_at"] and order["enforced_everywhere_at"] is None
    assert order["deadline_status"] == "at_risk" and order["not_enforced_on"] == ["nft"]
    out = attest_verify(box, latest)
    assert out.returncode == 1 and "enforcer nft: failed" in out.stdout, out.stdout
    # no DNS answers while a required enforcer cannot hold the rules
    assert "status: NXDOMAIN" not in box.dig("f.example")
    # it retries (the failure counter grows) and says so in the metrics
    def failures(m: str) -> float:
        found = re.search(r'^blockd_apply_failures_total\{enforcer="nft"\} (\S+)$', m, re.M)
        return float(found.group(1)) if found else 0.0

    wait_for(lambda: (m := box.metrics()) and 'blockd_enforcer_in_sync{enforcer="nft"} 0.0' in m
             and "blockd_ready 0.0" in m and failures(m) >= 2, timeout=30, what="a second attempt in the metrics")
    assert box.stop() == 0
    # marked optional, it no longer holds back readiness; it is still attested as failed
    box.config.write_text(box.config.read_text() + "  optional_enforcers: [nft]\n")
    status = box.start()
    assert "FAILING: nft" in status
    assert box.blocked("f.example")
    st = json.loads(latest.read_text())
    assert st["predicate"]["enforcers"]["nft"]["status"] == "failed" and not st["predicate"]["in_sync"]


@pytest.mark.skipif(shutil.which("chattr") is None, reason="chattr missing (e2fsprogs)")
@pytest.mark.parametrize("box", [{"daemon_extra": "retry_max_s: 2\n"}], indirect=True)
def test_immutable_attestation_dir_does_not_stop_enforcement(box: Box) -> None:
    """chattr +i on the export directory while a new policy lands: the rules are enforced, DNS
    answers, the failure is counted; once writable the owed statement is written, no gap."""
    box.write_policy("p.yaml", policy_text(1, ["one.example"], ["192.0.2.0/24"]))
    box.start()
    export = box.tmp / "attestations"
    wait_for(lambda: statements(box), what="the first statement")
    subprocess.run(["chattr", "+i", str(export)], check=True)
    try:
        box.write_policy("p.yaml", policy_text(2, ["two.example"], ["198.51.100.0/24"]))
        wait_for(lambda: box.blocked("two.example") and "198.51.100.0/24" in box.nft_elements(), what="policy 2")
        assert not box.blocked("one.example")
        def failures() -> float:
            found = re.search(r'^blockd_attestation_write_failures_total\{kind="attestation"\} (\S+)$',
                              box.metrics(), re.M)
            return float(found.group(1)) if found else 0.0

        wait_for(lambda: failures() >= 2, what="the failure counted, and retried")
        assert box.proc is not None and box.proc.poll() is None
        assert all(st["predicate"]["policies"][0]["serial"] == 1 for st in statements(box))
        assert len(box.events("accountability_write_failed")) == 1  # logged once per outage
    finally:
        subprocess.run(["chattr", "-i", str(export)], check=True)
    st = wait_for(lambda: any(s["predicate"]["policies"][0]["serial"] == 2 for s in statements(box))
                  and statements(box)[-1], what="the owed statement")
    assert st["predicate"]["attestation"]["reason"] == "retry" and st["predicate"]["in_sync"]
    assert not [e for e in box.events("reconcile_pass") if e["reason"] == "retry"]  # a write retry recompiles nothing
    assert box.blocked("two.example")
    assert box.stop() == 0
    out = attest_verify(box, *sorted(export.glob("attestation-*.json")))
    assert out.returncode == 0, out.stdout + out.stderr
    audit = subprocess.run([sys.executable, "-m", "blockd", "audit", "verify", "--key",
                            str(ROOT / "policies/keys/demo-operator.pub"), str(box.tmp / "audit.jsonl")],
                           capture_output=True, text=True)
    assert audit.returncode == 0, audit.stdout + audit.stderr
    assert '"event":"write_recovered"' in (box.tmp / "audit.jsonl").read_text()


def test_start_fails_closed_without_a_rule_set(box: Box) -> None:
    """A broken trust store at start: no DNS answers from an empty table; exit for systemd to retry."""
    box.write_policy("p.yaml", policy_text(1, ["x.example"], []))
    box.config.write_text(box.config.read_text().replace(str(ROOT / "policies/trust"), str(box.tmp / "no-trust")))
    with pytest.raises(AssertionError, match="blockd exited 1"):
        box.start()
    assert box.events("start_failed")
    assert "connection refused" in box.dig("x.example").lower() or "no servers could be reached" in box.dig("x.example")
