"""Registry-scale benchmark (issue 14): the real daemon in a namespace, N names + N prefixes.

    python bench/scale.py [--sizes 10000,100000] [--million] [--changes 10] [--ks 1,10,1000]

For each N, one fresh network namespace `bks-<pid>-<n>` (deleted at the end) runs `blockd run`
with the nft, ipset and DNS sinkhole enforcers. Two issuers, as in production:

    registry   N decisions, one order each (the z-i dump's shape: a name and an address per
               decision); names under a mix of TLDs, prefixes shaped like the real lists
               (bench/common.py: 60 % /32, 20 % /24, 20 % /16-/30) plus N/10 IPv6 /48s
    tickets    Piracy-Shield-like: serial s holds k fresh names and k fresh /32s in 100.64/10;
               each new serial replaces the last, so one change is k adds + k deletes per kind

Measured, per N, all in this run:

    cold start      launch -> READY=1, empty state and kernel; the daemon's peak RSS (VmHWM)
    restart         SIGTERM, launch again with the state and the kernel sets in place
    no-change pass  SIGHUP -> READY=1 (the pass re-verifies every file; nothing to apply)
    change (k)      the tickets file landing (rename) -> each new address answered by the kernel
                    (nft GETSETELEM / ipset TEST over netlink), each new name NXDOMAIN from the
                    sinkhole; p50/p99 over --changes changes
    re-issue        the registry's whole file again under a new serial, one decision changed
                    (a new name and /32 in 198.18/15): landing -> live (--reissues times)
    references      the same deltas (k deletes + k adds) into a set of the same size, in another
                    namespace: `nft -f` (one interval set) and `ipset restore` (hash:net)

Then the ratios of the largest N to the smallest, per k. Waits are generous deadlines (a busy
machine slows things down, it does not fail the run); a reference that exceeds its deadline is
reported as such.
"""

from __future__ import annotations

import argparse
import json
import os
import random
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

if sys.path[0] == str(Path(__file__).resolve().parent):
    sys.path.pop(0)  # bench/dns.py must not shadow dnspython
sys.path.append(str(Path(__file__).resolve().parent))
from common import cidr_text, memory_mib, v4_prefixes, v6_prefixes  # noqa: E402

import dns.exception  # noqa: E402
import dns.message  # noqa: E402
import dns.query  # noqa: E402
import dns.rcode  # noqa: E402

from blockd import minisign  # noqa: E402
from blockd.enforcers import netlink as nl  # noqa: E402
from blockd.enforcers.ipset import A_SETNAME, CMD_TEST, IpsetEnforcer, pack_entries  # noqa: E402
from blockd.enforcers.nft import NftEnforcer  # noqa: E402
from blockd.ranges import format_cidr  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
#: one signing key per issuer (a key belongs to one issuer in the trust store)
KEYS = {issuer: minisign.generate() for issuer in ("registry", "tickets")}
TLDS = ["ru", "com", "net", "org", "info", "xyz", "online", "site", "top", "biz"]
TICKET_BASE = 0x64400000  # 100.64.0.0
DEADLINE_S = 900.0  # a generous bound on any one wait: a loaded machine is slow, not wrong
REF_DEADLINE_S = 60.0


def run(*cmd: str, stdin: str | None = None, timeout: float = DEADLINE_S) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, input=stdin, capture_output=True, text=True, check=True, timeout=timeout)


def wait_until(ready: Callable[[], bool], what: str, deadline_s: float = DEADLINE_S, every_s: float = 0.005) -> float:
    t0 = time.monotonic()
    while not ready():
        if time.monotonic() - t0 > deadline_s:
            raise TimeoutError(f"{what}: not reached after {deadline_s} s")
        time.sleep(every_s)  # the polling interval of a deadline poll
    return time.monotonic() - t0


def sign_and_drop(directory: Path, name: str, text: str, issuer: str) -> float:
    """As a deploy tool does: both files written aside, then the signature and the policy
    renamed into place back to back (one burst: the watcher's settle time coalesces it);
    returns when the policy landed."""
    sig = minisign.sign(text.encode(), KEYS[issuer], trusted_comment=f"file:{name}")
    (directory / f".{name}.minisig.tmp").write_text(sig)
    (directory / f".{name}.tmp").write_text(text)
    os.replace(directory / f".{name}.minisig.tmp", directory / f"{name}.minisig")
    landed = time.monotonic()
    os.replace(directory / f".{name}.tmp", directory / name)
    return landed


def policy_text(issuer: str, serial: int, orders: list[tuple[str, list[str], list[str]]]) -> str:
    lines = [f"issuer: {issuer}", f"serial: {serial}", "issued_at: 2026-01-01T00:00:00Z",
             "not_before: 2026-01-01T00:00:00Z", "not_after: 2030-01-01T00:00:00Z", "orders:"]
    for oid, names, cidrs in orders:
        lines.append(f"  - id: {oid}")
        lines.append(f"    legal_basis: {{authority: Bench Registry, reference: {oid}}}")
        lines.append("    action: block")
        lines.append(f"    targets: {{domains: {json.dumps(names)}, cidrs: {json.dumps(cidrs)}}}")
    return "\n".join(lines) + "\n"


def registry(n: int, seed: int = 1) -> tuple[str, list[tuple[int, int]]]:
    text, v4, _ = registry_orders(n, seed)
    return text, v4


REISSUE_BASE = 0xC6120000  # 198.18.0.0/15 (RFC 2544): the registry's re-issued orders live here


def registry_orders(n: int, seed: int = 1) -> tuple[str, list[tuple[int, int]], list[tuple[str, list[str], list[str]]]]:
    rng = random.Random(seed)
    # none in 100.64.0.0/10, where the tickets (and the references' deltas) live, nor in 198.18/15
    v4 = [p for p in v4_prefixes(n + n // 50 + 10, seed)
          if not 0x64400000 <= p[0] < 0x64800000 and not REISSUE_BASE <= p[0] < REISSUE_BASE + (1 << 17)][:n]
    v6 = v6_prefixes(max(1, n // 10), seed)
    cidrs = list(cidr_text(4, v4)) + list(cidr_text(6, v6))
    rng.shuffle(cidrs)
    orders = []
    for i in range(n):
        name = f"{rng.getrandbits(40):010x}.{TLDS[i % len(TLDS)]}"
        orders.append((f"d{i}", [name], [cidrs[i]] if i < len(cidrs) else []))
    for j in range(n, len(cidrs)):
        orders[j % n][2].append(cidrs[j])
    return policy_text("registry", 1, orders), v4, orders


def reissue(orders: list[tuple[str, list[str], list[str]]], serial: int) -> tuple[str, str, int]:
    """The registry's next serial: the whole file again, one decision changed (a new name and a
    new /32 for the order `d0`, which a court replaced)."""
    name = f"r{serial}.reissued.example"
    addr = REISSUE_BASE + serial
    orders[0] = (orders[0][0], [name], [format_cidr(4, addr, 32)])
    return policy_text("registry", serial, orders), name, addr


def ticket(serial: int, k: int) -> tuple[str, list[str], list[int]]:
    names = [f"t{serial}-{i}.tickets.example" for i in range(k)]
    addrs = [TICKET_BASE + serial * 2048 + i for i in range(k)]
    cidrs = [format_cidr(4, a, 32) for a in addrs]
    return policy_text("tickets", serial, [(f"ticket-{serial}", names, cidrs)]), names, addrs


def in_netns(ns: str, family: int, kind: int) -> socket.socket:
    from pyroute2 import netns as pr2netns

    out: list[socket.socket] = []

    def make() -> None:
        pr2netns.setns(ns, flags=0)
        out.append(socket.socket(family, kind))

    t = threading.Thread(target=make)
    t.start()
    t.join()
    return out[0]


class Probe:
    """Asks the kernel and the sinkhole in the namespace, the way a packet or a client would."""

    def __init__(self, ns: str) -> None:
        self.sock = nl.NetlinkSocket(ns)
        self.nft = NftEnforcer.__new__(NftEnforcer)  # only its message builders, no socket
        self.ipset = IpsetEnforcer.__new__(IpsetEnforcer)
        from blockd.enforcers.nft import NftSettings
        from blockd.enforcers.ipset import IpsetSettings
        self.nft.settings, self.ipset.settings = NftSettings(), IpsetSettings()
        self.udp = in_netns(ns, socket.AF_INET, socket.SOCK_DGRAM)
        self.udp.settimeout(2)

    def nft_holds(self, addrs: list[int]) -> bool:
        answers = self.sock.query([self.nft._get_elem(4, a, a, end=False) for a in addrs])
        return all(code == 0 for code, _ in answers)

    def ipset_holds(self, addrs: list[int]) -> bool:
        name = nl.attr_str(A_SETNAME, "blockd4")
        msgs = [self.ipset._msg(CMD_TEST, 0, 4, name + pack_entries(4, [(a, 32)])) for a in addrs]
        return all(code == 0 for code, _ in self.sock.query(msgs))

    def blocked(self, name: str) -> bool:
        q = dns.message.make_query(name, "A")
        self.udp.setblocking(False)
        try:
            while self.udp.recv(4096):  # late answers to earlier queries that timed out
                pass
        except BlockingIOError:
            pass
        self.udp.settimeout(2)
        try:
            r = dns.query.udp(q, "127.0.0.1", port=53, timeout=2, sock=self.udp, ignore_unexpected=True)
        except (TimeoutError, dns.exception.Timeout, OSError, dns.query.BadResponse, dns.query.UnexpectedSource):
            return False  # not answered in time (or the late answer to an earlier query): ask again
        return r.rcode() == dns.rcode.NXDOMAIN


class Daemon:
    def __init__(self, work: Path, ns: str) -> None:
        self.work, self.ns = work, ns
        self.policies = work / "policies"
        self.log = work / "blockd.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self.notify: socket.socket | None = None
        #: READY=1 datagrams seen; a thread drains the socket (systemd always reads it)
        self._ready = threading.Semaphore(0)

    def launch(self) -> float:
        """Start and wait for READY=1; seconds from launch."""
        path = self.work / f"notify-{time.monotonic_ns()}.sock"
        self.notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.notify.bind(str(path))
        self.notify.settimeout(0.5)
        self._ready = threading.Semaphore(0)
        threading.Thread(target=self._drain, args=(self.notify, self._ready), daemon=True).start()
        env = dict(os.environ, NOTIFY_SOCKET=str(path))
        t0 = time.monotonic()
        with open(self.log, "ab") as out:
            self.proc = subprocess.Popen(["ip", "netns", "exec", self.ns, sys.executable, "-m", "blockd", "run",
                                          "--config", str(self.work / "blockd.yaml")],
                                         stdout=out, stderr=subprocess.STDOUT, env=env)
        self.wait_ready()
        return time.monotonic() - t0

    @staticmethod
    def _drain(sock: socket.socket, ready: threading.Semaphore) -> None:
        while True:
            try:
                msg = sock.recv(4096).decode()
            except TimeoutError:
                continue
            except OSError:
                return  # closed
            if "READY=1" in msg.split("\n"):
                ready.release()

    def wait_ready(self) -> None:
        assert self.notify is not None and self.proc is not None
        t0 = time.monotonic()
        while time.monotonic() - t0 < DEADLINE_S:
            if self.proc.poll() is not None:
                raise RuntimeError(f"blockd exited {self.proc.returncode}:\n{self.log.read_text()[-3000:]}")
            if self._ready.acquire(timeout=0.5):
                return
        raise TimeoutError("no READY=1")

    def reload(self) -> float:
        assert self.proc is not None
        t0 = time.monotonic()
        self.proc.send_signal(signal.SIGHUP)
        self.wait_ready()
        return time.monotonic() - t0

    def rss_mib(self) -> tuple[float, float]:
        assert self.proc is not None
        mem = memory_mib(self.proc.pid)
        return mem["VmRSS"], mem["VmHWM"]

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            self.proc.wait(DEADLINE_S)
        self.proc = None
        if self.notify is not None:
            self.notify.close()
            self.notify = None


def config(work: Path) -> None:
    trust = work / "trust"
    shutil.copytree(ROOT / "policies/trust", trust)
    for issuer in ("registry", "tickets"):
        (trust / issuer).mkdir()
        (trust / issuer / f"{issuer}.pub").write_text(KEYS[issuer].public.to_text())
        (trust / issuer / "issuer.yaml").write_text("threshold: 1\nroles: [policy]\n")
    p = ROOT / "policies"
    (work / "policies").mkdir()
    (work / "blockd.yaml").write_text(
        f"trust_store: {trust}\npolicy_dir: {work / 'policies'}\ncatalog_dir: {p / 'catalog'}\n"
        f"prefix_table: {p / 'asn/prefix2as.txt'}\nshared_infra_dir: {p / 'shared-infra'}\n"
        f"state_dir: {work / 'state'}\nmax_policy_bytes: {1 << 30}\n"
        "enforcers:\n  nft: {hooks: [output], verdict: drop}\n  ipset: {}\n  dns: {listen: [\"127.0.0.1:53\"]}\n"
        "daemon:\n  drift_check_s: 86400\n  attest_period_s: 86400\n")


def change_passes(log: Path) -> list[dict[str, float]]:
    """From the daemon's log, every change pass that changed the rule set, in order: the whole
    pass, its phases (`phases_s`: read, prepare, merge, record, apply...) and each kernel
    enforcer's apply by plan (commit + read-back of what it touched), in seconds."""
    passes: list[dict[str, float]] = []
    current: dict[str, float] = {}
    for line in log.read_text().splitlines():
        if not line.startswith("{"):
            continue
        e = json.loads(line)
        if e.get("event") == "ruleset_applied" and e.get("path") == "plan":
            current[str(e["enforcer"])] = float(e["duration_s"])
        elif e.get("event") == "reconcile_pass":
            if e.get("reason") == "change" and e.get("changed"):
                passes.append({**current, **{f"phase:{k}": v for k, v in (e.get("phases_s") or {}).items()},
                               "pass": float(e["duration_s"])})
            current = {}
    return passes


def inside(log: Path, ks: list[int], changes: int) -> dict[int, dict[str, list[float]]]:
    """`change_passes` of the ticket changes, per k."""
    passes = change_passes(log)[-len(ks) * changes:]
    out: dict[int, dict[str, list[float]]] = {}
    for i, k in enumerate(ks):
        chunk = passes[i * changes:(i + 1) * changes]
        out[k] = {key: [p[key] for p in chunk if key in p] for key in ("pass", "nft", "ipset")}
    return out


def pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(q * (len(xs) - 1))))]


def references(ns: str, base4: list[tuple[int, int]], ks: list[int], changes: int) -> dict[str, dict[int, list[float]]]:
    """`nft -f` and `ipset restore` of the same deltas into a set of the same size."""
    out: dict[str, dict[int, list[float]]] = {"nft -f": {}, "ipset restore": {}}
    cidrs = list(cidr_text(4, base4))
    elements = f"elements = {{ {', '.join(cidrs)} }}\n" if cidrs else ""
    run("ip", "netns", "exec", ns, "nft", "-f", "-",
        stdin=f"table ip ref {{\n set s {{\n  type ipv4_addr\n  flags interval\n  {elements} }}\n}}\n")
    run("ip", "netns", "exec", ns, "ipset", "restore", stdin=f"create ref hash:net maxelem {2 * len(cidrs) + 65536}\n"
        + "".join(f"add ref {c}\n" for c in cidrs))
    for tool in out:
        for ki, k in enumerate(ks):
            prev: list[str] = []
            times: list[float] = []
            for s in range(1, min(changes, 3 if tool == "nft -f" else changes) + 1):
                new = [format_cidr(4, TICKET_BASE + (ki * 64 + s) * 2048 + i, 32) for i in range(k)]
                if tool == "nft -f":
                    text = (f"delete element ip ref s {{ {', '.join(prev)} }}\n" if prev else "") + \
                        f"add element ip ref s {{ {', '.join(new)} }}\n"
                    cmd = ["nft", "-f", "-"]
                else:
                    text = "".join(f"del ref {c}\n" for c in prev) + "".join(f"add ref {c}\n" for c in new)
                    cmd = ["ipset", "restore"]
                t0 = time.monotonic()
                try:
                    run("ip", "netns", "exec", ns, *cmd, stdin=text, timeout=REF_DEADLINE_S)
                except subprocess.TimeoutExpired:
                    times.append(float("inf"))
                    break
                times.append(time.monotonic() - t0)
                prev = new
            out[tool][k] = times
    return out


def measure(n: int, ks: list[int], changes: int, reissues: int = 3) -> dict[str, object]:
    ns = f"bks-{os.getpid()}-{n}"
    ref_ns = ns + "r"
    work = Path(tempfile.mkdtemp(prefix=f"blockd-scale-{n}-"))
    result: dict[str, object] = {"n": n}
    for x in (ns, ref_ns):
        run("ip", "netns", "add", x)
        run("ip", "-n", x, "link", "set", "lo", "up")
    d = Daemon(work, ns)
    try:
        config(work)
        t0 = time.monotonic()
        text, base4, reg_orders = registry_orders(n)
        result["policy_mb"] = len(text) / 1e6
        sign_and_drop(work / "policies", "registry.yaml", text, "registry")
        result["generate_s"] = time.monotonic() - t0
        del text
        sign_and_drop(work / "policies", "tickets.yaml", ticket(1, 1)[0], "tickets")
        result["cold_start_s"] = d.launch()
        if not Probe(ns).nft_holds([TICKET_BASE + 2048]):
            raise RuntimeError(f"N={n}: the first ticket is not enforced after start; see {d.log}")
        result["rss_mib"], result["hwm_mib"] = d.rss_mib()
        d.stop()
        result["restart_s"] = d.launch()
        result["restart_rss_mib"], result["restart_hwm_mib"] = d.rss_mib()
        result["no_change_s"] = [d.reload() for _ in range(5)]
        probe = Probe(ns)
        serial = 2
        per_k: dict[int, dict[str, list[float]]] = {}
        for k in ks:
            got: dict[str, list[float]] = {"nft": [], "ipset": [], "dns": []}
            for _ in range(changes):
                text, names, addrs = ticket(serial, k)
                landed = sign_and_drop(work / "policies", "tickets.yaml", text, "tickets")
                checks = {"nft": lambda a=addrs: probe.nft_holds(a), "ipset": lambda a=addrs: probe.ipset_holds(a),
                          "dns": lambda nm=names: probe.blocked(nm[0]) and probe.blocked(nm[-1])}
                done: dict[str, float] = {}

                def all_done() -> bool:
                    for key, check in checks.items():
                        if key not in done and check():
                            done[key] = time.monotonic() - landed
                    return len(done) == len(checks)

                wait_until(all_done, f"N={n} k={k} serial {serial} live")
                for key, v in done.items():
                    got[key].append(v)
                serial += 1
            per_k[k] = got
        result["changes"] = per_k
        result["inside"] = inside(d.log, ks, changes)
        # The registry re-issues its whole file with one decision changed.
        got = {"nft": [], "ipset": [], "dns": []}
        for serial in range(2, 2 + reissues):
            text, name, addr = reissue(reg_orders, serial)
            landed = sign_and_drop(work / "policies", "registry.yaml", text, "registry")
            del text
            checks = {"nft": lambda a=addr: probe.nft_holds([a]), "ipset": lambda a=addr: probe.ipset_holds([a]),
                      "dns": lambda nm=name: probe.blocked(nm)}
            done = {}

            def all_live() -> bool:
                for key, check in checks.items():
                    if key not in done and check():
                        done[key] = time.monotonic() - landed
                return len(done) == len(checks)

            wait_until(all_live, f"N={n} registry serial {serial} live")
            for key, v in done.items():
                got[key].append(v)
        result["reissue"] = got
        result["reissue_passes"] = change_passes(d.log)[-reissues:]
        d.stop()
        result["references"] = references(ref_ns, base4, ks, changes)
    finally:
        d.stop()
        for x in (ns, ref_ns):
            subprocess.run(["ip", "netns", "del", x], capture_output=True, check=False)
        shutil.rmtree(work, ignore_errors=True)
    return result


def report(results: list[dict[str, object]], ks: list[int], changes: int) -> None:
    print(f"\n## blockd at registry scale ({os.cpu_count()} cores, {changes} changes per k; seconds)\n")
    print("| N names + N prefixes | policy MB | cold start | RSS (peak) MiB | restart | no-change pass p50 / max |")
    print("|---|---|---|---|---|---|")
    for r in results:
        nc = r["no_change_s"]
        assert isinstance(nc, list)
        print(f"| {r['n']:,} | {r['policy_mb']:.1f} | {r['cold_start_s']:.1f} | {r['rss_mib']:.0f} ({r['hwm_mib']:.0f}) "
              f"| {r['restart_s']:.1f} | {statistics.median(nc):.2f} / {max(nc):.2f} |")
    print("\n| N | k | nft p50 / p99 | ipset p50 / p99 | sinkhole p50 / p99 | ref `nft -f` p50 | ref `ipset restore` p50 |")
    print("|---|---|---|---|---|---|---|")
    for r in results:
        ch, refs = r["changes"], r["references"]
        assert isinstance(ch, dict) and isinstance(refs, dict)
        for k in ks:
            cells = [f"{pct(ch[k][e], 0.5):.3f} / {pct(ch[k][e], 0.99):.3f}" for e in ("nft", "ipset", "dns")]
            ref = [f"{statistics.median(refs[t][k]):.3f}" if refs[t][k] else "-" for t in ("nft -f", "ipset restore")]
            print(f"| {r['n']:,} | {k} | " + " | ".join(cells + ref) + " |")
    print("\nThe registry re-issues its whole file with one decision changed (file landing -> live, p50 / max):\n")
    print("| N | nft | ipset | sinkhole |")
    print("|---|---|---|---|")
    for r in results:
        re_ = r.get("reissue") or {}
        cells = [f"{pct(re_[e], 0.5):.2f} / {max(re_[e]):.2f}" if re_.get(e) else "-" for e in ("nft", "ipset", "dns")]
        print(f"| {r['n']:,} | " + " | ".join(cells) + " |")
    print("\nWhere a re-issue's pass spends its time (the daemon's log, `phases_s`; p50 over the re-issues, seconds):\n")
    for r in results:
        rp = r.get("reissue_passes") or []
        assert isinstance(rp, list)
        names = sorted({k for p in rp for k in p if k.startswith("phase:")}, key=lambda k: -statistics.median(
            [p.get(k, 0.0) for p in rp]))
        cells = ", ".join(f"{k[6:]} {statistics.median([p.get(k, 0.0) for p in rp]):.3f}" for k in names)
        if rp:
            print(f"- N={r['n']:,}: pass {statistics.median([p['pass'] for p in rp]):.3f} = {cells}")
    print("\nInside the daemon (its log), per change pass, p50: the whole pass / nft apply by plan / ipset apply by plan\n")
    print("| N | k | pass | nft plan apply | ipset plan apply |")
    print("|---|---|---|---|---|")
    for r in results:
        ins = r["inside"]
        assert isinstance(ins, dict)
        for k in ks:
            cells = [f"{pct(ins[k][x], 0.5):.4f}" if ins[k][x] else "-" for x in ("pass", "nft", "ipset")]
            print(f"| {r['n']:,} | {k} | " + " | ".join(cells) + " |")
    if len(results) > 1:
        lo, hi = results[0], results[-1]
        print(f"\nRatios N={hi['n']:,} / N={lo['n']:,} (p50 of the change's time to live; the goal is <= 1.5):\n")
        for k in ks:
            parts = []
            for e in ("nft", "ipset", "dns"):
                a = pct(lo["changes"][k][e], 0.5)  # type: ignore[index]
                b = pct(hi["changes"][k][e], 0.5)  # type: ignore[index]
                parts.append(f"{e} {b / a:.2f}x")
            print(f"- k={k}: " + ", ".join(parts))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="10000,100000")
    ap.add_argument("--million", action="store_true", help="add N = 1,000,000 (minutes, ~2 GB)")
    ap.add_argument("--changes", type=int, default=10)
    ap.add_argument("--ks", default="1,10,1000")
    ap.add_argument("--reissues", type=int, default=3, help="registry re-issues (whole file, one order changed)")
    ap.add_argument("--json", type=Path, help="also write the raw figures here")
    args = ap.parse_args()
    if os.geteuid() != 0:
        sys.exit("bench/scale.py needs root (network namespaces, nftables, ipset)")
    sizes = [int(x) for x in args.sizes.split(",")] + ([1_000_000] if args.million else [])
    ks = [int(x) for x in args.ks.split(",")]
    results = []
    for n in sizes:
        print(f"N = {n:,} ...", flush=True)
        results.append(measure(n, ks, args.changes, args.reissues))
    report(results, ks, args.changes)
    if args.json:
        args.json.write_text(json.dumps(results, indent=1, default=str))


if __name__ == "__main__":
    main()
