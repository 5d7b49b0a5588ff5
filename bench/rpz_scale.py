"""RPZ primary at registry scale (issue 14): policy file landing -> an Unbound secondary answering
NXDOMAIN, by IXFR, at N = 10k, 100k, 1M names + as many prefixes (IP triggers), beside a reference.

    .venv/bin/python bench/rpz_scale.py [--sizes 10000,100000,1000000] [--changes 10] [--ks 1,10,1000]

Per N, on 127.0.0.1 (no namespace: nothing but DNS on loopback ports is used):

    blockd      `blockd run`, the rpz enforcer only (layout one, ip_triggers on), NOTIFY to:
    unbound     Unbound 1.17 (Debian), `rpz: primary:` blockd, forwarding all else to a local
                upstream that answers every .com name (so NXDOMAIN can only come from the RPZ)
    registry    N decisions of a name and a prefix (80 % /32, 20 % /24, none adjacent, so
                each is one IP trigger), 100 decisions an order (a file of one order per
                decision would pass the policy reader's 64 MB at 1M): 2N triggers in the zone
    change (k)  a new serial of the tickets issuer's file, whose one order replaces k names and k
                /32s with k new ones (2k rules removed, 2k added: 4k owners change); clock from the
                file's rename until Unbound answers NXDOMAIN for the first and the last new name

Reference, same run, same machine: the same zone (the same 2N + ticket owners, written as a zone
file) loaded by BIND 9.18 as a plain primary (`named`, dynamic zone), a second Unbound its
secondary; each change is the same delta sent to BIND as DNS UPDATEs (RFC 2136, messages of at
most 64 KB), and BIND NOTIFYs Unbound, which takes it by IXFR. The clock runs from the first
UPDATE until that Unbound answers NXDOMAIN for the first and last new name. So the reference is
"a mature primary serving the same delta by IXFR to the same secondary", without any policy
verification, parsing or compilation, which blockd's figure includes.

Printed: cold start (READY) and the daemon's RSS, per k the p50/p99 of both, blockd's own apply
and pass (from its log), the transfers blockd served (IXFR vs AXFR, from /metrics), and the
ratios of the largest N to the smallest (goal: <= 1.5).
"""

from __future__ import annotations

import argparse
import http.client
import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from pathlib import Path

# bench/dns.py would shadow dnspython: drop this directory from sys.path, add the repository.
_HERE = Path(__file__).resolve().parent
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != _HERE]
sys.path.insert(0, str(_HERE.parent))
import dns.exception  # noqa: E402
import dns.message  # noqa: E402
import dns.query  # noqa: E402
import dns.rcode  # noqa: E402
import dns.rdatatype  # noqa: E402
import dns.update  # noqa: E402

from blockd import minisign  # noqa: E402
from blockd.dns import resolvers  # noqa: E402
from blockd.dns.rpz import ip_trigger  # noqa: E402
from blockd.dns.testing import LoopThread, Upstream  # noqa: E402
from blockd.ranges import format_cidr  # noqa: E402

ROOT = _HERE.parent
KEYS = {issuer: minisign.generate() for issuer in ("registry", "tickets")}
TLDS = ["com", "ru", "net", "org", "info", "xyz", "online", "site", "top", "biz"]
TICKET_BASE = 0x64400000  # 100.64.0.0: no registry prefix lives there
DEADLINE_S = 900.0  # a generous bound on any one wait: a loaded machine is slow, not wrong
ZONE = "rpz.blockd."
#: decisions per registry order: one per decision makes 170 bytes each, and a 1M-decision file
#: would pass the YAML reader's 64 MB limit; 100 per order keeps it at ~42 MB
PER_ORDER = 100


def wait_until(ready: Callable[[], bool], what: str, deadline_s: float = DEADLINE_S) -> float:
    t0 = time.monotonic()
    while not ready():
        if time.monotonic() - t0 > deadline_s:
            raise TimeoutError(f"{what}: not reached after {deadline_s} s")
        time.sleep(0.002)  # the polling interval of a deadline poll
    return time.monotonic() - t0


def sign_and_drop(directory: Path, name: str, text: str, issuer: str) -> float:
    """Signature first, then the policy, each by rename; returns when the policy landed."""
    sig = minisign.sign(text.encode(), KEYS[issuer], trusted_comment=f"file:{name}")
    (directory / f".{name}.minisig.tmp").write_text(sig)
    os.replace(directory / f".{name}.minisig.tmp", directory / f"{name}.minisig")
    (directory / f".{name}.tmp").write_text(text)
    landed = time.monotonic()
    os.replace(directory / f".{name}.tmp", directory / name)
    return landed


def policy_text(issuer: str, serial: int, orders: list[tuple[str, list[str], list[str]]]) -> str:
    lines = [f"issuer: {issuer}", f"serial: {serial}", "issued_at: 2026-01-01T00:00:00Z",
             "not_before: 2026-01-01T00:00:00Z", "not_after: 2030-01-01T00:00:00Z", "orders:"]
    for oid, names, cidrs in orders:
        lines.append(f"  - id: {oid}")
        lines.append(f"    legal_basis: {{authority: Bench {issuer.title()}, reference: {oid}}}")
        lines.append("    action: block")
        lines.append(f"    targets: {{domains: {json.dumps(names)}, cidrs: {json.dumps(cidrs)}}}")
    return "\n".join(lines) + "\n"


def registry(n: int, seed: int = 1) -> tuple[str, list[str], list[str]]:
    """(policy text, names, IP-trigger owners): N orders of a name and a prefix each."""
    rng = random.Random(seed)
    names: set[str] = set()
    while len(names) < n:
        names.add(f"{rng.getrandbits(40):010x}.{TLDS[len(names) % len(TLDS)]}")
    ordered = sorted(names)
    rng.shuffle(ordered)
    orders: list[tuple[str, list[str], list[str]]] = []
    owners = []
    for i, name in enumerate(ordered):
        net, plen = 0x10000000 + i * 512, 24 if i % 5 == 0 else 32  # none overlaps or touches another
        if i % PER_ORDER == 0:
            orders.append((f"d{i // PER_ORDER}", [], []))
        orders[-1][1].append(name)
        orders[-1][2].append(format_cidr(4, net, plen))
        owners.append(ip_trigger(4, net, plen))
    return policy_text("registry", 1, orders), ordered, owners


def ticket(serial: int, k: int) -> tuple[str, list[str], list[str]]:
    """(policy text, names, IP-trigger owners) of tickets serial `serial`: k names and k /32s."""
    names = [f"t{serial}-{i}.tickets-bench.com" for i in range(k)]
    addrs = [TICKET_BASE + serial * 2048 + i for i in range(k)]
    text = policy_text("tickets", serial, [(f"ticket-{serial}", names, [format_cidr(4, a, 32) for a in addrs])])
    return text, names, [ip_trigger(4, a, 32) for a in addrs]


def config(work: Path, port: int, notify: int, metrics: int) -> None:
    trust = work / "trust"
    shutil.copytree(ROOT / "policies/trust", trust)
    for issuer in KEYS:
        (trust / issuer).mkdir()
        (trust / issuer / f"{issuer}.pub").write_text(KEYS[issuer].public.to_text())
        (trust / issuer / "issuer.yaml").write_text("threshold: 1\nroles: [policy]\n")
    p = ROOT / "policies"
    (work / "policies").mkdir()
    (work / "blockd.yaml").write_text(
        f"trust_store: {trust}\npolicy_dir: {work / 'policies'}\ncatalog_dir: {p / 'catalog'}\n"
        f"prefix_table: {p / 'asn/prefix2as.txt'}\nstate_dir: {work / 'state'}\nmax_policy_bytes: {1 << 30}\n"
        "enforcers:\n  rpz:\n"
        f"    zone: {ZONE}\n    listen: [\"127.0.0.1:{port}\"]\n    notify: [\"127.0.0.1:{notify}\"]\n"
        f"    ip_triggers: true\n    state_file: {work / 'rpz.state'}\n    renotify_s: 5\n"
        f"daemon:\n  drift_check_s: 86400\n  attest_period_s: 86400\n  metrics_listen: \"127.0.0.1:{metrics}\"\n")


class Daemon:
    def __init__(self, work: Path) -> None:
        self.work = work
        self.log = work / "blockd.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self._ready = threading.Semaphore(0)
        self.notify: socket.socket | None = None

    def launch(self) -> float:
        path = self.work / "notify.sock"
        self.notify = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.notify.bind(str(path))
        self.notify.settimeout(0.5)
        threading.Thread(target=self._drain, daemon=True).start()
        t0 = time.monotonic()
        with open(self.log, "ab") as out:
            self.proc = subprocess.Popen([sys.executable, "-m", "blockd", "run", "--config",
                                          str(self.work / "blockd.yaml")], stdout=out, stderr=subprocess.STDOUT,
                                         env=dict(os.environ, NOTIFY_SOCKET=str(path)), cwd=ROOT)
        while not self._ready.acquire(timeout=0.5):
            if self.proc.poll() is not None:
                raise RuntimeError(f"blockd exited {self.proc.returncode}:\n{self.log.read_text()[-3000:]}")
            if time.monotonic() - t0 > DEADLINE_S:
                raise TimeoutError("no READY=1")
        return time.monotonic() - t0

    def _drain(self) -> None:
        assert self.notify is not None
        while True:
            try:
                msg = self.notify.recv(4096).decode()
            except TimeoutError:
                continue
            except OSError:
                return
            if "READY=1" in msg.split("\n"):
                self._ready.release()

    def rss_mib(self) -> tuple[float, float]:
        assert self.proc is not None
        f = dict(line.split(":", 1) for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines())
        return int(f["VmRSS"].split()[0]) / 1024, int(f["VmHWM"].split()[0]) / 1024

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            self.proc.wait(DEADLINE_S)
        self.proc = None
        if self.notify is not None:
            self.notify.close()
            self.notify = None


def scrape(port: int) -> dict[str, float]:
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


def consumers(work: Path) -> Path:
    """Where the consumer Unbounds keep their copies of the zone: on tmpfs when there is one. In
    a fleet the resolvers run on other machines; here, a secondary writing its 1M-record copy
    after each transfer to blockd's disk made blockd's own fsyncs (its state commit) wait
    behind that write."""
    shm = Path("/dev/shm")
    d = shm / work.name if shm.is_dir() and os.access(shm, os.W_OK) else work / "consumers"
    d.mkdir(exist_ok=True)
    return d


def soa_serial(port: int) -> int | None:
    """The zone's serial as the primary answers it (an SOA query over UDP), None without an answer."""
    try:
        r = dns.query.udp(dns.message.make_query(ZONE, "SOA"), "127.0.0.1", 0.3, port=port)
    except (dns.exception.Timeout, OSError):
        return None
    return next((int(rd.serial) for rr in r.answer for rd in rr if rr.rdtype == dns.rdatatype.SOA), None)


def blocked(port: int, names: list[str]) -> bool:
    return all(resolvers.rcode(port, n, timeout=0.3) == dns.rcode.NXDOMAIN for n in names)


def bind_conf(d: Path, port: int, zone_file: Path, notify: int) -> str:
    """named as a plain primary of the reference zone: dynamic (UPDATEs from loopback), NOTIFY to
    the reference Unbound, transfers to loopback."""
    return "\n".join([
        "options {", f'    directory "{d}";', f'    pid-file "{d}/named.pid";', f'    session-keyfile "{d}/s.key";',
        f'    managed-keys-directory "{d}";', f"    listen-on port {port} {{ 127.0.0.1; }};",
        "    listen-on-v6 { none; };", "    recursion no;", "    notify explicit;", "    notify-delay 0;", "};",
        "controls { };",
        f'zone "{ZONE.rstrip(".")}" {{', "    type primary;", f'    file "{zone_file}";',
        "    allow-update { 127.0.0.1; };", "    allow-transfer { 127.0.0.1; };",
        f"    also-notify {{ 127.0.0.1 port {notify}; }};", "};"]) + "\n"


def ref_zone(path: Path, owners: list[str]) -> None:
    with open(path, "w") as f:
        f.write(f"$ORIGIN {ZONE}\n$TTL 60\n@ SOA localhost. hostmaster.blockd.invalid. 1 3600 60 1209600 60\n"
                "@ NS localhost.\n")
        for i in range(0, len(owners), 10000):
            f.write("".join(f"{o} CNAME .\n" for o in owners[i:i + 10000]))


def ref_update(port: int, gone: list[str], came: list[str]) -> None:
    """The delta as RFC 2136 UPDATEs of at most ~64 KB (about 1,500 changes) each, sent in order."""
    ops = [("del", o) for o in gone] + [("add", o) for o in came]
    for i in range(0, len(ops), 1500):
        u = dns.update.Update(ZONE)
        for kind, o in ops[i:i + 1500]:
            if kind == "del":
                u.delete(o, "CNAME")
            else:
                u.add(o, 60, "CNAME", ".")
        r = dns.query.tcp(u, "127.0.0.1", timeout=60, port=port)
        if r.rcode() != dns.rcode.NOERROR:
            raise RuntimeError(f"BIND refused the UPDATE: {dns.rcode.to_text(r.rcode())}")


def pct(xs: list[float], q: float) -> float:
    xs = sorted(xs)
    return xs[min(len(xs) - 1, int(round(q * (len(xs) - 1))))] if xs else float("nan")


def inside(log: Path) -> list[dict[str, float]]:
    """Per change pass in the daemon's log: the pass and the rpz apply (delta path), seconds."""
    passes: list[dict[str, float]] = []
    cur: dict[str, float] = {}
    for line in log.read_text().splitlines():
        if not line.startswith("{"):
            continue
        e = json.loads(line)
        if e.get("event") == "ruleset_applied" and e.get("enforcer") == "rpz" and "path" in e:
            cur = {"apply": float(e["duration_s"]), "delta": float(e["path"] == "delta")}
        elif e.get("event") == "reconcile_pass" and e.get("reason") == "change":
            passes.append({**cur, "pass": float(e["duration_s"])})
            cur = {}
    return passes


def measure(n: int, ks: list[int], changes: int, with_ref: bool) -> dict[str, object]:
    work = Path(tempfile.mkdtemp(prefix=f"blockd-rpz-scale-{n}-"))
    cons = consumers(work)
    ports = {k: resolvers.free_port() for k in ("rpz", "unbound", "metrics", "bind", "ref_unbound")}
    res: dict[str, object] = {"n": n}
    lt = LoopThread()
    up = Upstream("com")
    lt.run(up.start())
    d = Daemon(work)
    procs: list[subprocess.Popen[bytes]] = []
    try:
        config(work, ports["rpz"], ports["unbound"], ports["metrics"])
        t = time.monotonic()
        text, names, ip_owners = registry(n)
        sign_and_drop(work / "policies", "registry.yaml", text, "registry")
        t_text, t_names, t_ip = ticket(1, ks[0])
        sign_and_drop(work / "policies", "tickets.yaml", t_text, "tickets")
        res["generate_s"] = time.monotonic() - t
        del text
        res["cold_start_s"] = d.launch()
        if '"policy_rejected"' in d.log.read_text():
            raise RuntimeError(f"N={n}: blockd refused a bench policy:\n{d.log.read_text()[-2000:]}")
        res["rss_mib"], res["hwm_mib"] = d.rss_mib()
        probe = next(x for x in names if x.endswith(".com"))
        ub = work / "unbound"
        conf = resolvers.unbound_conf(ub, ("127.0.0.1", ports["unbound"]), up.port, primary=("127.0.0.1", ports["rpz"]),
                                      zone_file=cons / f"unbound.{ZONE}zone")
        procs.append(resolvers.start("unbound", ub, conf))
        res["unbound_axfr_s"] = wait_until(lambda: blocked(ports["unbound"], [probe, t_names[0]]), "Unbound AXFR")
        ref_port = ports["ref_unbound"]
        if with_ref:
            bd = work / "bind"
            bd.mkdir()
            ref_zone(bd / "rpz.zone", names + ip_owners + t_names + t_ip)
            procs.append(resolvers.start("named", bd, bind_conf(bd, ports["bind"], bd / "rpz.zone", ref_port)))
            rd = work / "ref-unbound"
            conf = resolvers.unbound_conf(rd, ("127.0.0.1", ref_port), up.port, primary=("127.0.0.1", ports["bind"]),
                                          zone_file=cons / f"ref-unbound.{ZONE}zone")
            procs.append(resolvers.start("unbound", rd, conf))
            res["ref_axfr_s"] = wait_until(lambda: blocked(ref_port, [probe, t_names[0]]), "reference Unbound AXFR")
        prev = (t_names, t_ip)
        serial = 2
        # One change first, not counted: the first change after a start also sets up the daemon's
        # incremental merge (an O(N) step of the pipeline, not of the RPZ path); shown apart.
        text, new_names, new_ip = ticket(serial, ks[0])
        sign_and_drop(work / "policies", "tickets.yaml", text, "tickets")
        res["first_change_s"] = wait_until(lambda: blocked(ports["unbound"], new_names[:1]), "first change")
        if with_ref:
            ref_update(ports["bind"], prev[0] + prev[1], new_names + new_ip)
            wait_until(lambda: blocked(ref_port, new_names[:1]), "first reference change")
        prev, serial = (new_names, new_ip), serial + 1
        xfr0 = scrape(ports["metrics"])
        got: dict[int, dict[str, list[float]]] = {}
        for k in ks:
            got[k] = {"blockd": [], "ref": [], "served": []}
            for _ in range(changes):
                text, new_names, new_ip = ticket(serial, k)
                probes = [new_names[0], new_names[-1]]
                before = soa_serial(ports["rpz"])
                landed = sign_and_drop(work / "policies", "tickets.yaml", text, "tickets")
                # served: the primary answers the new serial, from which the delta is served by IXFR
                # (to Unbound, NOTIFYed at the same moment); then Unbound has loaded it and answers
                wait_until(lambda: (s := soa_serial(ports["rpz"])) is not None and s != before, f"N={n} k={k} served")
                got[k]["served"].append(time.monotonic() - landed)
                wait_until(lambda: blocked(ports["unbound"], probes), f"N={n} k={k} blockd")
                got[k]["blockd"].append(time.monotonic() - landed)
                if with_ref:
                    t0 = time.monotonic()
                    ref_update(ports["bind"], prev[0] + prev[1], new_names + new_ip)
                    wait_until(lambda: blocked(ref_port, probes), f"N={n} k={k} reference")
                    got[k]["ref"].append(time.monotonic() - t0)
                prev = (new_names, new_ip)
                serial += 1
            print(f"  N={n:,} k={k}: served p50 {pct(got[k]['served'], 0.5):.3f} s; Unbound {[round(x, 3) for x in got[k]['blockd']]} "
                  f"p50 {pct(got[k]['blockd'], 0.5):.3f} s, reference p50 {pct(got[k]['ref'], 0.5):.3f} s", flush=True)
        xfr = scrape(ports["metrics"])
        res["transfers"] = {key: xfr.get(key, 0) - xfr0.get(key, 0) for key in ("axfr", "ixfr", "ixfr_as_axfr")}
        res["changes"] = got
        res["after_rss_mib"], res["after_hwm_mib"] = d.rss_mib()
        passes = inside(d.log)[-len(ks) * changes:]
        res["inside"] = {k: passes[i * changes:(i + 1) * changes] for i, k in enumerate(ks)}
        res["first_pass_s"] = inside(d.log)[-len(ks) * changes - 1]["pass"]
    finally:
        d.stop()
        for p in procs:
            resolvers.stop(p, timeout=60)
        lt.run(up.aclose())
        lt.close()
        shutil.rmtree(cons, ignore_errors=True)
        if os.environ.get("KEEP"):
            print(f"  kept {work}")
        else:
            shutil.rmtree(work, ignore_errors=True)
    return res


def measure_inprocess(n: int, ks: list[int], changes: int, with_ref: bool) -> dict[str, object]:
    """The RPZ enforcer and primary alone, in this process: the clock runs from `apply(desired,
    change)` (the Change made as the daemon's merge makes it, `RuleSet.patched`, before the clock)
    until Unbound answers NXDOMAIN; the reference is the same as with the daemon."""
    from blockd.dns.rpz import RpzSettings
    from blockd.dns.rpzserver import RpzServer
    from blockd.enforcers.rpz import RpzEnforcer
    from blockd.model import Change, DomainRule, NetRule, RuleDelta, RuleSet

    work = Path(tempfile.mkdtemp(prefix=f"blockd-rpz-inproc-{n}-"))
    cons = consumers(work)
    ports = {k: resolvers.free_port() for k in ("unbound", "bind", "ref_unbound")}
    res: dict[str, object] = {"n": n}
    lt = LoopThread()
    up = Upstream("com")
    lt.run(up.start())
    procs: list[subprocess.Popen[bytes]] = []
    srv = RpzServer(RpzSettings(listen=(("127.0.0.1", 0),), notify=(("127.0.0.1", ports["unbound"]),),
                                ip_triggers=True, renotify_s=0))

    def ticket_rules(serial: int, k: int) -> tuple[RuleDelta, list[str], list[str]]:
        _, nm, ip = ticket(serial, k)
        o = frozenset({f"ticket-{serial}"})
        addrs = [TICKET_BASE + serial * 2048 + i for i in range(k)]
        nets = [NetRule(a, a, o) for a in addrs]  # adjacent /32s: patched merges them as compile does
        return RuleDelta(tuple(sorted(DomainRule(x, False, o) for x in nm)), tuple(nets)), nm, ip

    try:
        lt.run(srv.start())
        enf = RpzEnforcer(srv)
        _, names, ip_owners = registry(n)
        tk, t_names, t_ip = ticket_rules(1, ks[0])
        doms = [DomainRule(x, False, frozenset({f"d{i}"})) for i, x in enumerate(names)]
        nets = [NetRule(0x10000000 + i * 512, 0x10000000 + i * 512 + (255 if i % 5 == 0 else 0), frozenset({f"d{i}"}))
                for i in range(n)]
        cur = RuleSet.build([*doms, *tk.domains], [*nets, *tk.v4])
        del doms, nets
        t = time.monotonic()
        lt.run(enf.apply(cur), timeout=DEADLINE_S)
        res["cold_start_s"] = time.monotonic() - t
        res["rss_mib"] = res["hwm_mib"] = float(Path("/proc/self/status").read_text().split("VmRSS:")[1].split()[0]) / 1024
        probe = next(x for x in names if x.endswith(".com"))
        ub = work / "unbound"
        conf = resolvers.unbound_conf(ub, ("127.0.0.1", ports["unbound"]), up.port, primary=srv.addresses[0],
                                      zone_file=cons / f"unbound.{ZONE}zone")
        procs.append(resolvers.start("unbound", ub, conf))
        res["unbound_axfr_s"] = wait_until(lambda: blocked(ports["unbound"], [probe, t_names[0]]), "Unbound AXFR")
        ref_port = ports["ref_unbound"]
        if with_ref:
            bd = work / "bind"
            bd.mkdir()
            ref_zone(bd / "rpz.zone", names + ip_owners + t_names + t_ip)
            procs.append(resolvers.start("named", bd, bind_conf(bd, ports["bind"], bd / "rpz.zone", ref_port)))
            rd = work / "ref-unbound"
            conf = resolvers.unbound_conf(rd, ("127.0.0.1", ref_port), up.port, primary=("127.0.0.1", ports["bind"]),
                                          zone_file=cons / f"ref-unbound.{ZONE}zone")
            procs.append(resolvers.start("unbound", rd, conf))
            res["ref_axfr_s"] = wait_until(lambda: blocked(ref_port, [probe, t_names[0]]), "reference Unbound AXFR")
        del names, ip_owners
        prev, prev_names, prev_ip = tk, t_names, t_ip
        serial, x0 = 2, dict(srv.stats)
        got: dict[int, dict[str, list[float]]] = {}
        ins: dict[int, list[dict[str, float]]] = {}
        for k in ks:
            got[k], ins[k] = {"blockd": [], "ref": []}, []
            for _ in range(changes):
                new_rules, new_names, new_ip = ticket_rules(serial, k)
                desired, plan = cur.patched(prev, new_rules)  # what the daemon's merge hands over
                change = Change(cur.digest, plan, prev, new_rules)
                probes = [new_names[0], new_names[-1]]
                t0, wall0 = time.monotonic(), time.time()
                a = lt.run(enf.apply(desired, change), timeout=DEADLINE_S)
                got[k]["blockd"].append(time.monotonic() - t0 + wait_until(lambda: blocked(ports["unbound"], probes),
                                                                            f"N={n} k={k} blockd"))
                # served: the IXFR to this secondary handed to the kernel (blockd's side of the clock)
                held = srv.secondaries().get("127.0.0.1")
                served = held.last_transfer - wall0 if held is not None and held.last_transfer and \
                    held.serial == srv.serial else float("nan")
                ins[k].append({"apply": a.duration_s, "delta": float(enf.last_path == "delta"), "pass": served})
                if with_ref:
                    t0 = time.monotonic()
                    ref_update(ports["bind"], prev_names + prev_ip, new_names + new_ip)
                    wait_until(lambda: blocked(ref_port, probes), f"N={n} k={k} reference")
                    got[k]["ref"].append(time.monotonic() - t0)
                cur, prev, prev_names, prev_ip, serial = desired, new_rules, new_names, new_ip, serial + 1
            print(f"  N={n:,} k={k}: blockd {[round(x, 3) for x in got[k]['blockd']]} p50 "
                  f"{pct(got[k]['blockd'], 0.5):.3f} s, reference p50 {pct(got[k]['ref'], 0.5):.3f} s", flush=True)
        res["transfers"] = {key: srv.stats[key] - x0[key] for key in ("axfr", "ixfr", "ixfr_as_axfr")}
        res["changes"], res["inside"] = got, ins
        res["after_rss_mib"] = float(Path("/proc/self/status").read_text().split("VmRSS:")[1].split()[0]) / 1024
        res["first_change_s"] = res["first_pass_s"] = float("nan")
    finally:
        for p in procs:
            resolvers.stop(p, timeout=60)
        lt.run(srv.aclose())
        lt.run(up.aclose())
        lt.close()
        shutil.rmtree(cons, ignore_errors=True)
        shutil.rmtree(work, ignore_errors=True)
    return res


def report(results: list[dict[str, object]], ks: list[int], changes: int, with_ref: bool, inprocess: bool = False) -> None:
    who = "in-process enforcer + primary" if inprocess else "the daemon"
    print(f"\n## RPZ primary at registry scale, {who} ({os.cpu_count()} cores; {changes} changes per k; seconds)\n")
    start = "first full apply" if inprocess else "cold start (READY)"
    print(f"| N names + N prefixes | {start} | {'process' if inprocess else 'daemon'} RSS after start (peak) MiB | "
          "RSS after the changes MiB | first AXFR to Unbound | reference: BIND -> Unbound AXFR |")
    print("|---|---|---|---|---|---|")
    for r in results:
        print(f"| {r['n']:,} | {r['cold_start_s']:.1f} | {r['rss_mib']:.0f} ({r['hwm_mib']:.0f}) | "
              f"{r['after_rss_mib']:.0f} | {r['unbound_axfr_s']:.1f} | "
              + (f"{r['ref_axfr_s']:.1f}" if with_ref else "-") + " |")
    print()
    for r in results:
        if inprocess:
            break
        print(f"- N={r['n']:,}: the first change after the start (not counted below): {r['first_change_s']:.2f} s "
              f"to Unbound, pass {r['first_pass_s']:.2f} s")
    clock = "apply -> Unbound NXDOMAIN" if inprocess else "file -> Unbound NXDOMAIN"
    served = "IXFR served (apply -> last byte sent) p50" if inprocess else "blockd pass p50"
    print(f"\n| N | k | blockd: file -> new serial on the primary (IXFR served) p50 / p99 | blockd: {clock} p50 / p99 "
          f"| reference: UPDATE -> Unbound NXDOMAIN p50 / p99 | blockd / reference (p50) | {served} | rpz apply p50 / max "
          "| delta path |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in results:
        ch, ins = r["changes"], r["inside"]
        assert isinstance(ch, dict) and isinstance(ins, dict)
        for k in ks:
            b, f = ch[k]["blockd"], ch[k]["ref"]
            applies = [p["apply"] for p in ins[k] if "apply" in p]
            deltas = sum(int(p.get("delta", 0)) for p in ins[k])
            ref = f"{pct(f, 0.5):.3f} / {pct(f, 0.99):.3f}" if f else "-"
            ratio = f"{pct(b, 0.5) / pct(f, 0.5):.2f}x" if f else "-"
            sv = ch[k].get("served") or []
            on_primary = f"{pct(sv, 0.5):.3f} / {pct(sv, 0.99):.3f}" if sv else "-"
            print(f"| {r['n']:,} | {k} | {on_primary} | {pct(b, 0.5):.3f} / {pct(b, 0.99):.3f} | {ref} | {ratio} | "
                  f"{pct([p['pass'] for p in ins[k]], 0.5):.3f} | "
                  f"{pct(applies, 0.5):.4f} / {max(applies, default=float('nan')):.4f} | {deltas}/{len(ins[k])} |")
    print()
    for r in results:
        print(f"- N={r['n']:,}: transfers blockd served during the changes: {r['transfers']}")
    if len(results) > 1:
        lo, hi = results[0], results[-1]
        print(f"\nRatios N={hi['n']:,} / N={lo['n']:,} (p50; the goal is <= 1.5):\n")
        for k in ks:
            parts = []
            for who, label in (("served", "served by the primary"), ("blockd", "to Unbound"), ("ref", "reference")):
                a, b = lo["changes"][k].get(who), hi["changes"][k].get(who)  # type: ignore[index]
                if a and b:
                    parts.append(f"{label} {pct(b, 0.5) / pct(a, 0.5):.2f}x")
            print(f"- k={k}: " + ", ".join(parts))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--sizes", default="10000,100000,1000000")
    ap.add_argument("--changes", type=int, default=10)
    ap.add_argument("--ks", default="1,10,1000")
    ap.add_argument("--no-ref", action="store_true", help="without the BIND -> Unbound reference")
    ap.add_argument("--json", type=Path, help="also write the raw figures here")
    ap.add_argument("--inprocess", action="store_true",
                    help="the RPZ enforcer + primary in this process (clock from apply), no daemon")
    args = ap.parse_args()
    for tool in (resolvers.UNBOUND, resolvers.NAMED):
        if not os.path.exists(tool):
            sys.exit(f"{tool} is needed (scripts/deps.sh installs it)")
    ks = [int(x) for x in args.ks.split(",")]
    if args.inprocess:
        from blockd import logs

        logs.configure(json=False, level="warning")
    results = []
    for n in (int(x) for x in args.sizes.split(",")):
        print(f"N = {n:,} ...", flush=True)
        results.append((measure_inprocess if args.inprocess else measure)(n, ks, args.changes, not args.no_ref))
        if args.json:  # after each N: a long run that dies later keeps what it measured
            args.json.write_text(json.dumps(results, indent=1, default=str))
    report(results, ks, args.changes, not args.no_ref, args.inprocess)
    if args.json:
        args.json.write_text(json.dumps(results, indent=1, default=str))


if __name__ == "__main__":
    main()
