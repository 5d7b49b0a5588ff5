"""`blockd run` with `layout: authority` feeding PowerDNS Recursor, Knot Resolver, Unbound and BIND, each
configured by the output of `blockd rpz config --for ...` (the real command).

From a signed policy file landing in the policy directory to the last resolver answering NXDOMAIN
for a name it had answered (and cached) before; EDE 16 from PowerDNS names the authority; blockd's
/metrics shows every resolver in sync on every zone. In a network namespace: each transferring
resolver has its own 127.0.0.x, so the primary tells them apart.
"""

from __future__ import annotations

import os
import socket
import statistics
import subprocess
import sys
import textwrap
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import dns.edns
import dns.message
import dns.query
import dns.rcode
import pytest

from blockd.dns import resolvers
from blockd.dns.testing import LoopThread, Upstream
from tests.conftest import ROOT, drop_policy, repo_config
from tests.e2e.test_rpz_fleet import NetNs, wait_for

pytestmark = [pytest.mark.e2e, pytest.mark.slow]
PORT, METRICS = 5354, 9153
ADDR = {"unbound": "127.0.0.2", "bind": "127.0.0.4", "pdns": "127.0.0.5", "kresd": "127.0.0.6"}
VN = "Bộ Thông tin và Truyền thông"
COURT_ZONE, MIC_ZONE = "example-court.rpz.blockd.", "bo-thong-tin-va-truyen-thong.rpz.blockd."


def policy(serial: int, court: list[str]) -> str:
    return textwrap.dedent(f"""\
        issuer: demo-regulator
        serial: {serial}
        issued_at: 2026-01-01T00:00:00Z
        not_before: 2026-01-01T00:00:00Z
        not_after: 2030-01-01T00:00:00Z
        orders:
          - id: court-{serial}
            legal_basis: {{authority: Example Court, reference: C-{serial}, url: "https://court.example/c"}}
            action: block
            targets: {{domains: {court!r}}}
          - id: mic-1
            legal_basis: {{authority: "{VN}", reference: QD-1, url: "https://mic.example/1"}}
            action: block
            targets: {{domains: [mic.example.net]}}
        """)


class AuthorityFleet:
    def __init__(self, tmp: Path) -> None:
        self.tmp = tmp
        self.ns = NetNs(f"bka-{os.getpid()}-{time.monotonic_ns() % 100000}", list(ADDR.values()))
        self.lt = LoopThread()
        self.lt.run(self._enter())
        self.pool = ThreadPoolExecutor(1, initializer=self.ns.enter)  # the test's queries, from inside
        self.up = Upstream("example.net")
        self.lt.run(self.up.start())
        self.procs: dict[str, subprocess.Popen[bytes]] = {}
        self.blockd: subprocess.Popen[bytes] | None = None
        self.policies = tmp / "policies"
        self.policies.mkdir()
        (tmp / "zones").mkdir()
        self.config = tmp / "blockd.yaml"
        self.config.write_text(repo_config(self.policies, tmp / "state") + textwrap.dedent(f"""\
            enforcers:
              rpz:
                listen: ["0.0.0.0:{PORT}"]
                layout: authority
                notify: ["{ADDR['unbound']}:53", "{ADDR['bind']}:53", "{ADDR['pdns']}:53"]
                wipe_cache: ["{ADDR['pdns']}:53"]
                zone_file: {tmp / "zones"}/{{zone}}zone
                state_file: {tmp / "rpz.state"}
                renotify_s: 1
            daemon:
              metrics_listen: "127.0.0.1:{METRICS}"
            """))

    async def _enter(self) -> None:
        self.ns.enter()

    def generated(self, kind: str, addr: str, d: Path) -> str:
        r = subprocess.run([sys.executable, "-m", "blockd", "rpz", "config", "-c", str(self.config), "--for", kind,
                            "--primary", f"{addr}:{PORT}", "--resolver-dir", str(d)],
                           capture_output=True, text=True, timeout=60, cwd=ROOT)
        assert r.returncode == 0, r.stdout + r.stderr
        return r.stdout

    def start_blockd(self) -> None:
        sock_path = self.tmp / "notify.sock"
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        sock.bind(str(sock_path))
        sock.settimeout(0.1)
        self.blockd = self.ns.popen([sys.executable, "-m", "blockd", "run", "--config", str(self.config)],
                                    self.tmp / "blockd.log", dict(os.environ, NOTIFY_SOCKET=str(sock_path)))

        def ready() -> bool:
            assert self.blockd is not None
            if self.blockd.poll() is not None:
                raise AssertionError(f"blockd exited:\n{self.logs()}")
            try:
                return "READY=1" in sock.recv(4096).decode().split("\n")
            except TimeoutError:
                return False

        try:
            wait_for(ready, "READY=1", 60)
        finally:
            sock.close()

    def start_resolvers(self) -> None:
        prefix = ["ip", "netns", "exec", self.ns.name]
        d = self.tmp / "unbound"
        d.mkdir()
        conf = resolvers.unbound_conf(d, (ADDR["unbound"], 53), self.up.port, zone=None)
        self.procs["unbound"] = resolvers.start("unbound", d, conf + self.generated("unbound", ADDR["unbound"], d),
                                                prefix)
        d = self.tmp / "bind"
        d.mkdir()
        head, _, rest = self.generated("bind", ADDR["bind"], d).partition("// inside options { }:\n")
        policy_stmt, _, zones = rest.partition("\n")
        # as for PowerDNS: blockd's NOTIFYs come from 127.0.0.1 here, queries from the test's 127.0.0.1
        zones = zones.replace(f"allow-notify {{ {ADDR['bind']}; }};", "allow-notify { 127.0.0.0/8; };")
        conf = head + textwrap.dedent(f"""\
            options {{
                directory "{d}";
                pid-file "{d}/named.pid";
                session-keyfile "{d}/session.key";
                managed-keys-directory "{d}";
                listen-on port 53 {{ {ADDR['bind']}; }};
                listen-on-v6 {{ none; }};
                recursion yes;
                allow-recursion {{ 127.0.0.0/8; }};
                dnssec-validation no;
                forwarders {{ 127.0.0.1 port {self.up.port}; }};
                forward only;
                notify no;
                {policy_stmt}
            }};
            controls {{ }};
            """) + zones
        self.procs["bind"] = resolvers.start("named", d, conf, prefix)
        d = self.tmp / "pdns"
        d.mkdir()
        lua = self.generated("powerdns", ADDR["pdns"], d)
        from blockd.dns.rpzconfig import recursor_conf_lines

        # NOTIFYs leave blockd from 127.0.0.1 here (the kernel's source for a local address), not
        # from the address PowerDNS reaches the primary at: widen allow-notify-from to loopback.
        extra = [x for x in recursor_conf_lines(lua) if not x.startswith("allow-notify-from=")]
        conf = resolvers.pdns_conf(d, (ADDR["pdns"], 53), self.up.port, lua,
                                   extra=[f"query-local-address={ADDR['pdns']}", "allow-notify-from=127.0.0.0/8",
                                          *extra])
        self.procs["pdns"] = resolvers.start("pdns", d, conf, prefix, lua=lua)
        d = self.tmp / "kresd"
        d.mkdir()
        conf = resolvers.kresd_conf((ADDR["kresd"], 53), self.up.port, self.generated("knot", ADDR["kresd"], d))
        self.procs["kresd"] = resolvers.start("kresd", d, conf, prefix)

    def ask(self, who: str, name: str) -> dns.message.Message | None:
        def q() -> dns.message.Message | None:
            try:
                return dns.query.udp(dns.message.make_query(name, "A", use_edns=0), ADDR[who], 0.5, port=53)
            except (dns.exception.Timeout, OSError):
                return None

        return self.pool.submit(q).result(30)

    def rcode(self, who: str, name: str) -> int | None:
        r = self.ask(who, name)
        return r.rcode() if r is not None else None

    def metrics(self) -> dict[tuple[str, tuple[str, ...]], float]:
        from prometheus_client.parser import text_string_to_metric_families

        code = f"import urllib.request;print(urllib.request.urlopen('http://127.0.0.1:{METRICS}/metrics').read().decode())"
        r = subprocess.run(["ip", "netns", "exec", self.ns.name, sys.executable, "-c", code], capture_output=True,
                           text=True, timeout=30)
        out = {}
        for fam in text_string_to_metric_families(r.stdout):
            for s in fam.samples:
                out[(s.name, tuple(v for _, v in sorted(s.labels.items())))] = s.value
        return out

    def logs(self) -> str:
        paths = [self.tmp / "blockd.log", *(self.tmp / n / "log" for n in ADDR)]
        return "\n".join(f"--- {p}\n" + p.read_text(errors="replace")[-2500:] for p in paths if p.exists())

    def close(self) -> None:
        resolvers.stop(*self.procs.values())
        if self.blockd is not None:
            resolvers.stop(self.blockd, timeout=20)
        self.lt.run(self.up.aclose())
        self.lt.close()
        self.pool.shutdown()
        self.ns.delete()


@pytest.fixture
def fleet(tmp_path: Path) -> Iterator[AuthorityFleet]:
    for exe in (resolvers.PDNS, resolvers.KRESD, resolvers.UNBOUND):
        if not os.path.exists(exe):
            pytest.fail(f"{exe} required (scripts/deps.sh installs pdns-recursor, knot-resolver, unbound)")
    f = AuthorityFleet(tmp_path)
    try:
        yield f
    finally:
        f.close()


def test_file_landing_to_last_resolver(fleet: AuthorityFleet) -> None:
    drop_policy(fleet.policies, "p.yaml", policy(1, ["court.example.net"]))
    fleet.start_blockd()
    fleet.start_resolvers()
    who = list(ADDR)
    try:
        for w in who:
            wait_for(lambda: fleet.rcode(w, "mic.example.net") == dns.rcode.NXDOMAIN, f"{w} to block", 60)
        r = fleet.ask("pdns", "mic.example.net")
        assert r is not None
        assert [(int(o.code), o.text) for o in r.options if isinstance(o, dns.edns.EDEOption)] == [
            (16, f"Blocked by order of {VN}, see https://mic.example/1")]
        last: list[float] = []
        per: dict[str, list[float]] = {w: [] for w in who}
        names = ["court.example.net"]
        for serial in range(2, 7):
            name = f"new{serial}.example.net"
            for w in who:
                assert fleet.rcode(w, name) == dns.rcode.NOERROR  # answered, and cached, before the order
            names.append(name)
            t0 = time.monotonic()
            drop_policy(fleet.policies, "p.yaml", policy(serial, names))
            pending = set(who)
            while pending and time.monotonic() - t0 < 30:
                for w in list(pending):
                    if fleet.rcode(w, name) == dns.rcode.NXDOMAIN:
                        per[w].append(time.monotonic() - t0)
                        pending.discard(w)
                time.sleep(0.005)  # poll interval under the deadline
            assert not pending, f"{sorted(pending)} did not block {name} within 30 s"
            last.append(max(per[w][-1] for w in who))
        m = {}

        def synced() -> bool:
            nonlocal m
            m = fleet.metrics()
            return all(m.get(("blockd_rpz_zone_secondary_in_sync", (ADDR[w], z))) == 1.0
                       for w in ("unbound", "bind", "pdns") for z in (COURT_ZONE, MIC_ZONE))

        wait_for(synced, "every transferring resolver in sync on both zones", 30)
        assert m[("blockd_rpz_secondary_in_sync", (ADDR["pdns"],))] == 1.0
    except AssertionError as e:
        raise AssertionError(f"{e}\n{fleet.logs()}") from None
    print(f"\nfile landing -> last resolver NXDOMAIN: p50 {statistics.median(last):.2f} s, max {max(last):.2f} s; "
          + ", ".join(f"{w} p50 {statistics.median(v):.2f} s" for w, v in per.items()))
