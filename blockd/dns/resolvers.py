"""Real resolvers for tests and benches: listen address, upstream port and an RPZ source -> an Unbound
config or a named.conf; a config -> a running process, polled until it blocks a name, then stopped.

Both resolvers forward every name to `upstream` on 127.0.0.1 (a `testing.Upstream`) and apply one
response-policy zone, taken either from a primary by AXFR/IXFR (`primary=(host, port)`: a
secondary, which keeps its copy in a file of its own directory) or from a zone file
(`zone_file=...`, no primary: the native way). Processes run in the foreground, their output
appended to <dir>/log.
"""

from __future__ import annotations

import random
import shutil
import socket
import subprocess
import time
from collections.abc import Sequence
from pathlib import Path

import dns.exception
import dns.message
import dns.query
import dns.rcode

UNBOUND = shutil.which("unbound") or "/usr/sbin/unbound"
NAMED = shutil.which("named") or "/usr/sbin/named"
PDNS = shutil.which("pdns_recursor") or "/usr/sbin/pdns_recursor"
KRESD = shutil.which("kresd") or "/usr/sbin/kresd"


def _ephemeral_low() -> int:
    try:
        return int(Path("/proc/sys/net/ipv4/ip_local_port_range").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768


_handed_out: set[int] = set()


def free_port(*hosts: str) -> int:
    """A port free for both UDP and TCP on each of `hosts` (127.0.0.1 by default) right now, taken
    below the kernel's ephemeral range: a port from that range, released to be bound later by a
    resolver, can meanwhile be taken by any client socket's implicit bind (a NOTIFY, a query, an
    outgoing resolver query), and the resolver then fails with "Address already in use". Never the
    same port twice in one process."""
    hosts = hosts or ("127.0.0.1",)
    low = max(1025, _ephemeral_low() - 12000)
    high = max(low + 1000, _ephemeral_low())
    for _ in range(200):
        port = random.randrange(low, high)
        if port in _handed_out:
            continue
        try:
            for host in hosts:
                for kind in (socket.SOCK_DGRAM, socket.SOCK_STREAM):
                    with socket.socket(socket.AF_INET, kind) as s:
                        s.bind((host, port))
        except OSError:
            continue
        _handed_out.add(port)
        return port
    raise RuntimeError("no free port")


def rcode(port: int, qname: str, host: str = "127.0.0.1", timeout: float = 0.5) -> int | None:
    """The rcode of an A query over UDP, or None when nothing answered."""
    try:
        return dns.query.udp(dns.message.make_query(qname, "A"), host, timeout, port=port).rcode()
    except (dns.exception.Timeout, OSError):
        return None


def unbound_conf(d: Path, listen: tuple[str, int], upstream: int, zone: str | None = "rpz.blockd.", *,
                 primary: tuple[str, int] | None = None, zone_file: str | Path | None = None,
                 rpz_log: str | None = None, modules: str = "respip iterator", pidfile: str = "unbound.pid",
                 server: Sequence[str] = ()) -> str:
    """An Unbound config in directory `d`. `server`: extra lines for the server section; `zone=None`:
    no rpz clause. A secondary keeps its copy in `zone_file`, by default <d>/<zone>zone."""
    lines = [
        "server:",
        f"    interface: {listen[0]}@{listen[1]}",
        "    do-ip6: no",
        "    do-daemonize: no",
        "    use-syslog: no",
        '    logfile: ""',
        '    username: ""',
        '    chroot: ""',
        f'    directory: "{d}"',
        f'    pidfile: "{d}/{pidfile}"',
        "    num-threads: 1",
        "    access-control: 127.0.0.0/8 allow",
        f'    module-config: "{modules}"',
        "    do-not-query-localhost: no",
        *(f"    {x}" for x in server),
        "forward-zone:",
        '    name: "."',
        f"    forward-addr: 127.0.0.1@{upstream}",
    ]
    if zone is not None:
        zone = zone.rstrip(".") + "."
        if zone_file is None:
            if primary is None:
                raise ValueError("an RPZ needs a primary or a zone file")
            zone_file = d / f"{zone}zone"
        lines += ["rpz:", f'    name: "{zone}"']
        if primary is not None:
            lines.append(f"    primary: {primary[0]}@{primary[1]}")
        lines.append(f'    zonefile: "{zone_file}"')
        if rpz_log is not None:
            lines += ["    rpz-log: yes", f'    rpz-log-name: "{rpz_log}"']
    return "\n".join(lines) + "\n"


def named_conf(d: Path, listen: tuple[str, int], upstream: int, zone: str = "rpz.blockd", *,
               primary: tuple[str, int] | None = None, zone_file: str | Path | None = None,
               clients: str = "127.0.0.1") -> str:
    """A named.conf in directory `d`: recursion, queries and (for a secondary) NOTIFY allowed from
    `clients`. A secondary keeps its copy in <d>/<zone>.db; without a primary, `zone_file` is loaded."""
    zone = zone.rstrip(".")
    if primary is not None:
        source = ["type secondary;", f"primaries {{ {primary[0]} port {primary[1]}; }};", f'file "{zone}.db";',
                  f"allow-query {{ {clients}; }};", f"allow-notify {{ {clients}; }};"]
    elif zone_file is not None:
        source = ["type primary;", f'file "{zone_file}";', f"allow-query {{ {clients}; }};"]
    else:
        raise ValueError("an RPZ needs a primary or a zone file")
    lines = [
        "options {",
        f'    directory "{d}";',
        f'    pid-file "{d}/named.pid";',
        f'    session-keyfile "{d}/session.key";',
        f'    managed-keys-directory "{d}";',
        f"    listen-on port {listen[1]} {{ {listen[0]}; }};",
        "    listen-on-v6 { none; };",
        "    recursion yes;",
        f"    allow-recursion {{ {clients}; }};",
        "    dnssec-validation no;",
        f"    forwarders {{ 127.0.0.1 port {upstream}; }};",
        "    forward only;",
        "    notify no;",
        f'    response-policy {{ zone "{zone}" min-update-interval 0; }} qname-wait-recurse no break-dnssec yes;',
        "};",
        "controls { };",
        f'zone "{zone}" {{',
        *(f"    {x}" for x in source),
        "};",
    ]
    return "\n".join(lines) + "\n"


def pdns_conf(d: Path, listen: tuple[str, int], upstream: int, lua: str, *, extra: Sequence[str] = ()) -> str:
    """A PowerDNS Recursor recursor.conf in directory `d` that forwards to `upstream` and runs the
    Lua config `lua` (written to <d>/rpz.lua by `start`). `extra`: more recursor.conf lines."""
    return "\n".join([
        f"local-address={listen[0]}", f"local-port={listen[1]}", "daemon=no", "threads=1",
        f"socket-dir={d}", "allow-from=127.0.0.0/8", "dont-query=", "dnssec=off", "disable-syslog=yes",
        f"forward-zones-recurse=.=127.0.0.1:{upstream}", "extended-resolution-errors=yes",
        f"lua-config-file={d}/rpz.lua", "loglevel=6", "quiet=no", *extra]) + "\n"


def kresd_conf(listen: tuple[str, int], upstream: int, policies: str) -> str:
    """A Knot Resolver config: `policies` (e.g. from `rpzconfig`) first, then forward everything."""
    return "\n".join([
        f"net.listen('{listen[0]}', {listen[1]}, {{ kind = 'dns' }})",
        "trust_anchors.remove('.')",  # the test upstream is unsigned
        "cache.size = 10 * MB",
        policies,
        f"policy.add(policy.all(policy.FORWARD('127.0.0.1@{upstream}')))"]) + "\n"


def start(kind: str, d: Path, conf: str, prefix: Sequence[str] = (), lua: str | None = None) -> subprocess.Popen[bytes]:
    """Write `conf` to <d>/<kind>.conf and run `kind` ("unbound", "named", "pdns" or "kresd") on it in
    the foreground, behind `prefix` (e.g. ip netns exec NAME), output appended to <d>/log. For
    "pdns", `lua` is its lua-config-file."""
    d.mkdir(exist_ok=True)
    path = d / ("recursor.conf" if kind == "pdns" else f"{kind}.conf")
    path.write_text(conf)
    if lua is not None:
        (d / "rpz.lua").write_text(lua)
    if kind == "unbound":
        cmd = [UNBOUND, "-d", "-c", str(path)]
    elif kind == "named":
        cmd = [NAMED, "-g", "-c", str(path)]
    elif kind == "pdns":
        cmd = [PDNS, f"--config-dir={d}"]
    elif kind == "kresd":
        cmd = [KRESD, "-n", "-c", str(path), str(d)]
    else:
        raise ValueError(f"resolver {kind!r} unknown")
    with open(d / "log", "ab") as out:
        return subprocess.Popen([*prefix, *cmd], stdout=out, stderr=subprocess.STDOUT)


def wait_nxdomain(proc: subprocess.Popen[bytes], port: int, qname: str, *, t0: float | None = None,
                  timeout: float = 600, log: Path | None = None, query_timeout: float = 0.2) -> float:
    """Poll 127.0.0.1:`port` until `qname` answers NXDOMAIN: seconds since `t0` (default: now).
    RuntimeError, with the tail of `log` if there is one, if `proc` exits or `timeout` passes first."""
    t0 = time.monotonic() if t0 is None else t0

    def tail() -> str:
        return ":\n" + log.read_text(errors="replace")[-3000:] if log is not None and log.exists() else ""

    while time.monotonic() - t0 < timeout:
        if proc.poll() is not None:
            raise RuntimeError(f"exited {proc.returncode}{tail()}")
        if rcode(port, qname, timeout=query_timeout) == dns.rcode.NXDOMAIN:
            return time.monotonic() - t0
        time.sleep(0.02)  # poll interval under the timeout
    raise RuntimeError(f"no NXDOMAIN for {qname} within {timeout} s{tail()}")


def stop(*procs: subprocess.Popen[bytes], timeout: float = 10) -> None:
    """SIGTERM every process, then wait up to `timeout` s for each; SIGKILL the ones still running."""
    for p in procs:
        p.terminate()
    for p in procs:
        try:
            p.wait(timeout)
        except subprocess.TimeoutExpired:
            p.kill()
            p.wait()
