"""`blockd demo`: blockd as an ISP box in a private lab of network namespaces.

    bd-client 10.66.1.2 ---veth--- 10.66.1.1 bd-isp 10.66.2.1 ---veth--- 10.66.2.2 bd-net
              fd66:1::2                       (blockd run: nft       fd66:2::2  upstream DNS,
                                               + DNS sinkhole)                  "Telegram" and
                                                                                another host

Nothing leaves the namespaces: bd-net has no route anywhere else. The demo starts
`blockd run` in bd-isp with the signed sample Telegram policy, waits for READY=1 (sd_notify),
then shows a blocked DNS query (NXDOMAIN + EDE 16 with the legal basis), a normal one, a TCP
connect to a Telegram address that is dropped while another host answers, the counters, and
the attestation, and last the regulator's side: `blockd compliance` over the statements the
operator sent, with a one-line verdict. It removes everything it made on exit, also on Ctrl-C.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import textwrap
import time
from collections.abc import Callable
from contextlib import ExitStack
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
NS = {"client": "bd-client", "isp": "bd-isp", "net": "bd-net"}
TELEGRAM_V4, TELEGRAM_V6 = "149.154.167.99", "2001:67c:4e8:f004::a"  # inside the policy's ranges
OTHER_V4 = "93.184.215.14"  # stands in for any unblocked site
SINKHOLE, UPSTREAM = "10.66.1.1", "10.66.2.2"


def sh(*cmd: str, check: bool = True, timeout: float = 30) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, check=check, capture_output=True, text=True, timeout=timeout)


def in_ns(ns: str, *cmd: str, **kw: object) -> subprocess.CompletedProcess[str]:
    return sh("ip", "netns", "exec", NS[ns], *cmd, **kw)  # type: ignore[arg-type]


def build_lab(stack: ExitStack) -> None:
    for ns in NS.values():
        sh("ip", "netns", "del", ns, check=False)
    for ns in NS.values():
        sh("ip", "netns", "add", ns)
        stack.callback(sh, "ip", "netns", "del", ns, check=False)
        sh("ip", "-n", ns, "link", "set", "lo", "up")
    # veth pairs are created inside the namespaces: nothing appears on the host
    sh("ip", "-n", NS["client"], "link", "add", "c0", "type", "veth", "peer", "name", "i0", "netns", NS["isp"])
    sh("ip", "-n", NS["isp"], "link", "add", "i1", "type", "veth", "peer", "name", "n0", "netns", NS["net"])
    addrs = [("client", "c0", "10.66.1.2/24", "fd66:1::2/64"), ("isp", "i0", "10.66.1.1/24", "fd66:1::1/64"),
             ("isp", "i1", "10.66.2.1/24", "fd66:2::1/64"), ("net", "n0", "10.66.2.2/24", "fd66:2::2/64")]
    for ns, dev, v4, v6 in addrs:
        sh("ip", "-n", NS[ns], "addr", "add", v4, "dev", dev)
        sh("ip", "-n", NS[ns], "addr", "add", v6, "dev", dev, "nodad")
        sh("ip", "-n", NS[ns], "link", "set", dev, "up")
    for addr in (f"{TELEGRAM_V4}/32", f"{OTHER_V4}/32"):
        sh("ip", "-n", NS["net"], "addr", "add", addr, "dev", "lo")
    sh("ip", "-n", NS["net"], "addr", "add", f"{TELEGRAM_V6}/128", "dev", "lo", "nodad")
    sh("ip", "-n", NS["client"], "route", "add", "default", "via", "10.66.1.1")
    sh("ip", "-n", NS["client"], "-6", "route", "add", "default", "via", "fd66:1::1")
    sh("ip", "-n", NS["net"], "route", "add", "10.66.1.0/24", "via", "10.66.2.1")
    sh("ip", "-n", NS["net"], "-6", "route", "add", "fd66:1::/64", "via", "fd66:2::1")
    sh("ip", "-n", NS["isp"], "route", "add", "default", "via", "10.66.2.2")
    sh("ip", "-n", NS["isp"], "-6", "route", "add", "default", "via", "fd66:2::2")
    in_ns("isp", "sysctl", "-qw", "net.ipv4.ip_forward=1", "net.ipv6.conf.all.forwarding=1")


UPSTREAM_SERVER = textwrap.dedent(f"""
    # A tiny authoritative server standing in for the internet's DNS (dnslib).
    import socketserver, sys
    from dnslib import A, AAAA, QTYPE, RR, DNSRecord
    ZONE = {{"t.me.": ("{TELEGRAM_V4}", "{TELEGRAM_V6}"), "example.org.": ("{OTHER_V4}", None)}}
    class H(socketserver.BaseRequestHandler):
        def handle(self):
            data, sock = self.request
            q = DNSRecord.parse(data)
            r = q.reply()
            name = str(q.q.qname).lower()
            v4, v6 = ZONE.get(name, (None, None))
            if v4 and q.q.qtype == QTYPE.A:
                r.add_answer(RR(q.q.qname, QTYPE.A, rdata=A(v4), ttl=300))
            elif v6 and q.q.qtype == QTYPE.AAAA:
                r.add_answer(RR(q.q.qname, QTYPE.AAAA, rdata=AAAA(v6), ttl=300))
            elif not v4:
                r.header.rcode = 3
            sock.sendto(r.pack(), self.client_address)
    socketserver.UDPServer(("{UPSTREAM}", 53), H).serve_forever()
""")

LISTENER = textwrap.dedent("""
    # Answers "hello from <address>" on port 443 of every address it is given.
    import socket, sys, threading
    def serve(addr):
        fam = socket.AF_INET6 if ":" in addr else socket.AF_INET
        s = socket.socket(fam); s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        s.bind((addr, 443)); s.listen()
        while True:
            c, _ = s.accept(); c.sendall(b"hello from " + addr.encode() + b"\\n"); c.close()
    for a in sys.argv[1:]:
        threading.Thread(target=serve, args=(a,), daemon=True).start()
    threading.Event().wait()
""")


def spawn(stack: ExitStack, ns: str, *cmd: str, env: dict[str, str] | None = None,
          log: Path | None = None) -> subprocess.Popen[bytes]:
    out = open(log, "wb") if log else subprocess.DEVNULL  # noqa: SIM115 - closed with the stack
    proc = subprocess.Popen(["ip", "netns", "exec", NS[ns], *cmd], stdout=out, stderr=subprocess.STDOUT,
                            env=env, start_new_session=True)

    def stop() -> None:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGTERM)
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait()
        if log:
            out.close()  # type: ignore[union-attr]

    stack.callback(stop)
    return proc


def write_config(work: Path) -> Path:
    policies = work / "policies"
    policies.mkdir()
    for f in (ROOT / "policies" / "examples").glob("telegram.yaml*"):
        shutil.copy(f, policies / f.name)
    config = work / "blockd.yaml"
    config.write_text(textwrap.dedent(f"""\
        trust_store: {ROOT / "policies" / "trust"}
        policy_dir: {policies}
        catalog_dir: {ROOT / "policies" / "catalog"}
        prefix_table: {ROOT / "policies" / "asn" / "prefix2as.txt"}
        shared_infra_dir: {ROOT / "policies" / "shared-infra"}
        state_dir: {work / "state"}
        enforcers:
          nft: {{hooks: [forward, output], verdict: drop}}
          dns:
            listen: ["{SINKHOLE}:53", "[fd66:1::1]:53"]
            upstreams: ["{UPSTREAM}:53"]
            allow: [10.66.1.0/24, "fd66:1::/64"]
        daemon:
          metrics_listen: "{SINKHOLE}:9153"
          drift_check_s: 5
          operator: Demo ISP
          operator_key: {ROOT / "policies" / "keys" / "demo-operator.key"}
          attest_dir: {work / "attestations"}
          audit_log: {work / "audit.jsonl"}
    """))
    return config


def wait_ready(sock: socket.socket, proc: subprocess.Popen[bytes], timeout: float) -> str:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise RuntimeError(f"blockd run exited with {proc.returncode}")
        sock.settimeout(0.2)
        try:
            msg = sock.recv(4096).decode()
        except TimeoutError:
            continue
        if "READY=1" in msg:
            return next((ln[7:] for ln in msg.splitlines() if ln.startswith("STATUS=")), "")
    raise RuntimeError("blockd did not report READY=1 in time")


def tcp(ns: str, addr: str) -> str:
    code = (f"import socket,sys\ns=socket.create_connection(('{addr}',443),timeout=2)\n"
            "print(s.recv(100).decode().strip())")
    r = in_ns(ns, sys.executable, "-c", code, check=False)
    return r.stdout.strip() if r.returncode == 0 else "no answer (timed out: dropped)"


def scrape(names: tuple[str, ...]) -> list[str]:
    code = f"import urllib.request;print(urllib.request.urlopen('http://{SINKHOLE}:9153/metrics',timeout=5).read().decode())"
    text = in_ns("isp", sys.executable, "-c", code).stdout
    return [ln for ln in text.splitlines() if ln.startswith(names)]


def step(title: str) -> Callable[[str], None]:
    print(f"\n== {title}")
    return lambda line: print(f"   {line}")


def regulator_verdict(work: Path, say: Callable[[str], None]) -> None:
    """The regulator holds its signed order, the operator's public key and the statements it was
    sent; `blockd compliance` checks them and gives a one-line verdict."""
    keys = work / "regulator" / "operator-keys"
    keys.mkdir(parents=True)
    shutil.copy(ROOT / "policies/keys/demo-operator.pub", keys / "demo-isp.pub")
    received = work / "regulator" / "received"
    if (work / "attestations").is_dir():
        # The numbered files, which never change: latest.json may be replaced while it is copied.
        shutil.copytree(work / "attestations", received, ignore=shutil.ignore_patterns("latest.json*"))
    else:
        received.mkdir()
    say(f"blockd compliance --policies policies/examples/telegram.yaml --operators {keys.name}/ "
        f"--statements {received.name}/ --html report.html")
    r = sh(sys.executable, "-m", "blockd", "compliance", "--policies", str(ROOT / "policies/examples/telegram.yaml"),
           "--operators", str(keys), "--statements", str(received), "--html", str(work / "regulator/report.html"),
           "--json", check=False, timeout=120)
    try:
        doc = json.loads(r.stdout)
    except ValueError:
        say(f"compliance check failed: {r.stderr.strip() or r.stdout.strip()}")
        return
    from blockd.compliance.report import verdict_line

    for c in doc.get("cells", []):
        tte = c["issued_to_enforced_s"]
        detail = f"first enforced {c['first_enforced_at']} ({tte / 86400:.1f} days after the order was issued)" \
            if tte is not None else "not enforced"
        say(f"{c['operator']}: {c['order']}: {c['verdict']}, {detail}, in {'+'.join(c['where']) or '-'}; "
            f"deadline {c['deadline'] or 'none'} {c['deadline_status']}; in sync now: {c['in_sync']}")
    if any(c["deadline_status"] == "missed" for c in doc.get("cells", [])):
        say("(the sample order's deadline passed before this demo ran: the verdict says so, as it would)")
    say(f"verdict: {verdict_line(doc)} (exit {r.returncode})")


def run_demo(args: argparse.Namespace) -> int:
    if os.geteuid() != 0:
        print("blockd demo: needs root (it creates network namespaces)", file=sys.stderr)
        return 2
    with ExitStack() as stack:
        signal.signal(signal.SIGTERM, lambda *_: sys.exit(130))
        work = Path(stack.enter_context(tempfile.TemporaryDirectory(prefix="blockd-demo-")))
        say = step("1. lab: client -> ISP box (blockd) -> internet, in three network namespaces")
        build_lab(stack)
        say(f"client 10.66.1.2, ISP box 10.66.1.1 (DNS sinkhole, nftables), upstream DNS {UPSTREAM}")
        say(f"'Telegram' at {TELEGRAM_V4} and {TELEGRAM_V6}, another site at {OTHER_V4}")
        spawn(stack, "net", sys.executable, "-c", UPSTREAM_SERVER, log=work / "upstream.log")
        spawn(stack, "net", sys.executable, "-c", LISTENER, TELEGRAM_V4, OTHER_V4, TELEGRAM_V6)
        config = write_config(work)

        say = step("2. blockd run with the signed sample policy (policies/examples/telegram.yaml)")
        notify = stack.enter_context(socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM))
        notify.bind(str(work / "notify.sock"))
        env = dict(os.environ, NOTIFY_SOCKET=str(work / "notify.sock"))
        t0 = time.monotonic()
        proc = spawn(stack, "isp", sys.executable, "-m", "blockd", "run", "--config", str(config), env=env,
                     log=work / "blockd.log")
        try:
            status = wait_ready(notify, proc, timeout=60)
        except RuntimeError as e:
            print((work / "blockd.log").read_text()[-3000:], file=sys.stderr)
            print(f"blockd demo: {e}", file=sys.stderr)
            return 1
        say(f"READY after {time.monotonic() - t0:.1f} s; STATUS={status}")

        say = step("3. DNS from the client")
        blocked = in_ns("client", "dig", f"@{SINKHOLE}", "t.me", "A", "+tries=1", "+time=3", check=False).stdout
        for line in blocked.splitlines():
            if "status:" in line or "EDE" in line:
                say(f"dig t.me        -> {line.strip(' ;')}")
        normal = in_ns("client", "dig", f"@{SINKHOLE}", "example.org", "A", "+short", "+tries=1", "+time=3",
                       check=False).stdout.strip()
        say(f"dig example.org -> {normal or 'no answer'}")

        say = step("4. TCP from the client, through the ISP box")
        say(f"connect {TELEGRAM_V4}:443  -> {tcp('client', TELEGRAM_V4)}")
        say(f"connect [{TELEGRAM_V6}]:443 -> {tcp('client', TELEGRAM_V6)}")
        say(f"connect {OTHER_V4}:443   -> {tcp('client', OTHER_V4)}")

        say = step("5. metrics (http://10.66.1.1:9153/metrics in the ISP box)")
        time.sleep(5.5)  # the counter snapshot refreshes every 5 s
        wanted = ("blockd_kernel_packets_total", 'blockd_dns_queries_total{result="nxdomain"',
                  'blockd_dns_queries_total{result="forwarded"', "blockd_dns_blocked_queries_total",
                  "blockd_enforcer_in_sync", "blockd_policy_serial")
        for line in scrape(wanted):
            say(line)

        say = step("6. the signed attestation for the regulator")
        latest = work / "attestations" / "latest.json"
        if latest.exists():
            say("attestations/latest.json (+ .minisig), signed with the operator key; the regulator runs")
            say("minisign -V -p policies/keys/demo-operator.pub -m latest.json")
            check = sh("minisign", "-V", "-p", str(ROOT / "policies/keys/demo-operator.pub"), "-m", str(latest),
                       check=False)
            say(check.stdout.strip().splitlines()[0] if check.returncode == 0 else f"FAILED: {check.stderr.strip()}")
        else:
            say("no attestation written (see the log)")
        regulator_verdict(work, step("7. the regulator's side: blockd compliance over what it received"))
        if getattr(args, "verbose", False):
            print("\n== blockd's log")
            print((work / "blockd.log").read_text())
        keep = ROOT / "var" / "demo"
        if (work / "attestations").is_dir():
            shutil.rmtree(keep, ignore_errors=True)
            shutil.copytree(work / "attestations", keep / "attestations")
            for f in work.glob("audit.*"):
                shutil.copy(f, keep / f.name)
            if (work / "regulator").is_dir():
                shutil.copytree(work / "regulator", keep / "regulator")
            say(f"kept: {keep / 'attestations' / 'latest.json'}, the audit log {keep / 'audit.jsonl'} and the "
                f"regulator's report {keep / 'regulator' / 'report.html'}")
        print("\n== done: the lab is removed on exit")
        return 0
    return 0
