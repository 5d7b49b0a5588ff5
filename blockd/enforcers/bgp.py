"""BGP enforcer: desired RuleSet -> RTBH routes (RFC 7999) announced to routers through ExaBGP.

    RuleSet intervals --to_cidrs--> prefixes --batched API lines--> ExaBGP --BGP--> routers
    readback: `show adj-rib out extensive` (ExaBGP's own RIB, per peer) --> merged intervals

Every blocked prefix is announced with next-hop `next_hop4`/`next_hop6` (a discard address
such as 192.0.2.1 or 100::1 that routers route to null), the communities in `communities`
(BLACKHOLE 65535:666 and NO_EXPORT 65535:65281 by default) and `local_pref`. Unblocked
prefixes are withdrawn. With `flowspec`, each prefix is also sent as a FlowSpec (RFC 8955)
`destination <prefix> -> discard` rule.

blockd owns the ExaBGP process: it writes the config to a private directory, listens on a
Unix socket there, and starts ExaBGP, whose `process` helper (`exabgp_helper.py`) relays the
API pipes to that socket. Commands go out many prefixes per line (`announce attributes ...
nlri p1 p2 ...`), pipelined; ExaBGP acknowledges every line with `done` or `error`
(`exabgp.api.ack`). Peer state changes arrive as JSON events.

BGP has no transaction: a failed batch can leave part of a change announced. On any error
the enforcer forgets what it believes is announced and re-reads ExaBGP's adj-rib-out before
the next diff, so the next `apply` repairs the difference. When a session drops and comes
back, ExaBGP re-sends its whole adj-rib-out; nothing is needed from blockd. Stopping ExaBGP
(`aclose`) ends the sessions, so routers drop every route (after `graceful_restart` seconds
if that capability is configured).
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import json
import os
import shutil
import signal
import sys
import tempfile
import time
from collections import deque
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path

import structlog

from blockd.errors import ConfigError, EnforcerError
from blockd.model import Applied, Change, NetRule, RuleSet, union_intervals
from blockd.ranges import format_cidr, merge, parse_cidr, to_cidrs

log = structlog.get_logger("blockd.enforcers.bgp")

BLACKHOLE = "65535:666"  # RFC 7999
NO_EXPORT = "65535:65281"  # RFC 1997
HELPER = Path(__file__).with_name("exabgp_helper.py")
#: ExaBGP refuses an API line above 1 MiB; a batch line stays far below that.
MAX_BATCH = 20000


@dataclass(frozen=True, slots=True)
class BgpSettings:
    """One ExaBGP speaker with sessions to `peers` (the routers), all told the same routes."""

    local_address: str
    peers: tuple[str, ...]
    local_as: int
    peer_as: int
    router_id: str
    next_hop4: str = "192.0.2.1"
    next_hop6: str = "100::1"
    communities: tuple[str, ...] = (BLACKHOLE, NO_EXPORT)
    local_pref: int | None = 200
    batch_size: int = 2000  # prefixes per API line
    flowspec: bool = False
    ipv6: bool = True
    hold_time: int = 90
    graceful_restart: int = 0  # seconds; 0 = capability off
    exabgp: str = "exabgp"  # the executable
    start_timeout_s: float = 30.0
    command_timeout_s: float = 300.0

    def __post_init__(self) -> None:
        problems: list[str] = []

        def addr(field: str, value: str, version: int | None = None) -> None:
            try:
                ip = ipaddress.ip_address(value)
            except ValueError:
                problems.append(f"bgp.{field}: {value!r} is not an IP address")
                return
            if version and ip.version != version:
                problems.append(f"bgp.{field}: {value!r} is not an IPv{version} address")

        addr("local_address", self.local_address)
        addr("router_id", self.router_id, 4)
        addr("next_hop4", self.next_hop4, 4)
        addr("next_hop6", self.next_hop6, 6)
        if not self.peers:
            problems.append("bgp.peers: empty; give at least one router address")
        for i, p in enumerate(self.peers):
            addr(f"peers[{i}]", p)
        for field in ("local_as", "peer_as"):
            if not 1 <= getattr(self, field) <= 0xFFFFFFFF:
                problems.append(f"bgp.{field}: {getattr(self, field)!r} is not an ASN in 1..4294967295")
        for i, c in enumerate(self.communities):
            a, sep, b = c.partition(":")
            if not (sep and a.isdigit() and b.isdigit() and int(a) < 65536 and int(b) < 65536):
                problems.append(f"bgp.communities[{i}]: {c!r} is not a community 'ASN16:VALUE16' (e.g. {BLACKHOLE!r})")
        if self.local_pref is not None and not 0 <= self.local_pref <= 0xFFFFFFFF:
            problems.append(f"bgp.local_pref: {self.local_pref!r} is not in 0..4294967295")
        if not 1 <= self.batch_size <= MAX_BATCH:
            problems.append(f"bgp.batch_size: {self.batch_size!r} is not in 1..{MAX_BATCH}")
        if not (self.hold_time == 0 or 3 <= self.hold_time <= 65535):
            problems.append(f"bgp.hold_time: {self.hold_time!r} must be 0 or 3..65535")
        if not 0 <= self.graceful_restart <= 4095:
            problems.append(f"bgp.graceful_restart: {self.graceful_restart!r} is not in 0..4095")
        if problems:
            raise ConfigError("; ".join(problems))


# --- pure parts: config text, API lines, adj-rib-out parsing ------------------------------------

def exabgp_config(s: BgpSettings, socket_path: str, python: str = sys.executable) -> str:
    """ExaBGP 5 configuration: one `process` (the relay helper), one `neighbor` per router."""
    families = ["ipv4 unicast;"] + (["ipv6 unicast;"] if s.ipv6 else [])
    if s.flowspec:
        families += ["ipv4 flow;"] + (["ipv6 flow;"] if s.ipv6 else [])
    gr = f"        graceful-restart {s.graceful_restart};\n" if s.graceful_restart else ""
    out = [
        "process blockd {",
        f"    run {python} {HELPER} {socket_path};",
        "    encoder json;",
        "}",
        "",
    ]
    for peer in s.peers:
        out += [
            f"neighbor {peer} {{",
            f"    router-id {s.router_id};",
            f"    local-address {s.local_address};",
            f"    local-as {s.local_as};",
            f"    peer-as {s.peer_as};",
            f"    hold-time {s.hold_time};",
            "    group-updates true;",
            "    capability {",
            "        route-refresh enable;",
            gr + "    }",
            "    family {",
            *[f"        {f}" for f in families],
            "    }",
            "    api {",
            "        processes [ blockd ];",
            "        neighbor-changes;",
            "    }",
            "}",
            "",
        ]
    return "\n".join(out)


def exabgp_environ(base: dict[str, str] | None = None) -> dict[str, str]:
    """Environment for ExaBGP: keep our user (the helper must reach our socket), ACK every
    API line, no CLI pipes, no listening socket (we connect out), fast `show` output."""
    import pwd

    env = dict(os.environ if base is None else base)
    env.update({
        "exabgp_daemon_user": pwd.getpwuid(os.getuid()).pw_name,
        "exabgp_daemon_drop": "false",
        "exabgp_daemon_daemonize": "false",
        "exabgp_api_ack": "true",
        "exabgp_api_cli": "false",
        "exabgp_api_chunk": "2000",
        "exabgp_api_respawn": "true",
        "exabgp_tcp_bind": "",
        "exabgp_log_destination": "stderr",
        "exabgp_log_level": "INFO",
        "exabgp_log_short": "true",
    })
    return env


Prefixes = dict[int, set[tuple[int, int]]]  # version -> {(network, prefixlen)}


def prefixes_of(desired: RuleSet, ipv6: bool = True) -> Prefixes:
    """RuleSet -> the fewest prefixes covering exactly its address intervals (IPv4 only
    unless `ipv6`: without the IPv6 family negotiated there is nothing to announce them on)."""
    return {v: set(to_cidrs(v, union_intervals(getattr(desired, f"v{v}")))) if v == 4 or ipv6 else set()
            for v in (4, 6)}


def ruleset_of(held: Prefixes) -> RuleSet:
    """Announced prefixes -> a RuleSet of merged intervals (no provenance), for the digest."""
    none: frozenset[str] = frozenset()
    fams = {}
    for v in (4, 6):
        host = (1 << (32 if v == 4 else 128)) - 1
        ivs = merge((n, n | (host >> p)) for n, p in held[v])
        fams[v] = [NetRule(a, b, none) for a, b in ivs]
    return RuleSet.build(v4=fams[4], v6=fams[6])


def _batches(items: Iterable[tuple[int, int]], size: int) -> Iterator[list[tuple[int, int]]]:
    batch: list[tuple[int, int]] = []
    for item in sorted(items):
        batch.append(item)
        if len(batch) == size:
            yield batch
            batch = []
    if batch:
        yield batch


def api_lines(s: BgpSettings, action: str, version: int, items: Iterable[tuple[int, int]]) -> list[str]:
    """`announce`/`withdraw` lines, `batch_size` prefixes each, plus FlowSpec lines if on."""
    nh = s.next_hop4 if version == 4 else s.next_hop6
    attrs = f"next-hop {nh}"
    if action == "announce":
        attrs += " origin igp"
        if s.communities:
            attrs += f" community [ {' '.join(s.communities)} ]"
        if s.local_pref is not None:
            attrs += f" local-preference {s.local_pref}"
    items = list(items)
    out = []
    for batch in _batches(items, s.batch_size):
        nlri = " ".join(format_cidr(version, n, p) for n, p in batch)
        out.append(f"{action} attributes {attrs} nlri {nlri}")
    if s.flowspec:  # FlowSpec has no multi-NLRI API line: one rule per line
        out += [f"{action} flow route destination {format_cidr(version, n, p)} discard" for n, p in sorted(items)]
    return out


@dataclass(frozen=True, slots=True)
class RibOut:
    """ExaBGP's adj-rib-out per peer: blackhole unicast prefixes and FlowSpec discard prefixes."""

    unicast: dict[str, Prefixes]
    flow: dict[str, Prefixes]


def parse_rib_out(lines: Iterable[str], communities: tuple[str, ...]) -> RibOut:
    """`show adj-rib out extensive` text -> RibOut. A unicast route counts only if it carries
    every configured community (a route without BLACKHOLE does not blackhole anything)."""
    unicast: dict[str, Prefixes] = {}
    flow: dict[str, Prefixes] = {}
    for line in lines:
        words = line.split()
        if len(words) < 4 or words[0] != "neighbor":
            continue
        peer = words[1]
        try:
            i = next(k for k in range(2, len(words) - 1) if words[k] in ("ipv4", "ipv6"))
        except StopIteration:
            continue
        safi = words[i + 1]
        if safi == "unicast":
            if not all(c in _communities(words) for c in communities):
                continue
            c = parse_cidr(words[i + 2])
            unicast.setdefault(peer, {4: set(), 6: set()})[c.version].add((c.network, c.prefixlen))
        elif safi == "flow" and "rate-limit:0" in words:  # traffic-rate 0 = discard (RFC 8955 7.3)
            dst = next((words[k + 1] for k in range(i, len(words) - 1)
                        if words[k] in ("destination-ipv4", "destination-ipv6")), None)
            if dst is None:
                continue
            c = parse_cidr("/".join(dst.split("/")[:2]))  # IPv6 prints prefix/len/offset
            flow.setdefault(peer, {4: set(), 6: set()})[c.version].add((c.network, c.prefixlen))
    return RibOut(unicast, flow)


#: ExaBGP prints well-known communities (RFC 1997, RFC 7999) by name.
WELL_KNOWN = {"blackhole": BLACKHOLE, "no-export": NO_EXPORT, "no-advertise": "65535:65282",
              "no-export-subconfed": "65535:65283", "no-peer": "65535:65284"}


def _communities(words: list[str]) -> set[str]:
    if "community" not in words:
        return set()
    k = words.index("community")
    found = [words[k + 1]] if words[k + 1] != "[" else words[k + 2:words.index("]", k)]
    return {WELL_KNOWN.get(c, c) for c in found}


# --- the enforcer ------------------------------------------------------------------------------

class BgpEnforcer:
    """Announces `desired`'s address intervals as blackhole routes; see the module docstring."""

    def __init__(self, settings: BgpSettings, *, netns: str | None = None, name: str = "bgp",
                 workdir: str | None = None) -> None:
        self.name = name
        self.settings = settings
        self.netns = netns
        self._workdir = workdir
        self._own_dir: str | None = None
        self._proc: asyncio.subprocess.Process | None = None
        self._server: asyncio.base_events.Server | None = None
        self._writer: asyncio.StreamWriter | None = None
        self._connected = asyncio.Event()
        self._answers: asyncio.Queue[str] = asyncio.Queue()
        self._tasks: list[asyncio.Task[None]] = []
        self._lock = asyncio.Lock()
        self._stderr: deque[str] = deque(maxlen=40)
        #: peer address -> last state ExaBGP reported ("up", "down", "connected", ...)
        self.peer_state: dict[str, str] = {}
        self._state_changed = asyncio.Event()
        # What ExaBGP's adj-rib-out holds after our last acknowledged commands; None = unknown.
        self._held: Prefixes | None = None

    # -- Enforcer interface -----------------------------------------------------------------

    async def apply(self, desired: RuleSet, change: Change | None = None) -> Applied:
        """`change` is not used yet: the prefix sets held (small for RTBH) are diffed here."""
        t0 = time.perf_counter()
        async with self._lock:
            await self._start()
            if self._held is None:
                self._held = self._agreed(await self._rib_out())
            held, want = self._held, prefixes_of(desired, self.settings.ipv6)
            want_rs = ruleset_of(want)  # digest of exactly what is announced (no domains)
            lines: list[str] = []
            # Withdraw first: an interval that changed shape is a withdraw plus an announce.
            for v in (4, 6):
                lines += api_lines(self.settings, "withdraw", v, held[v] - want[v])
            for v in (4, 6):
                lines += api_lines(self.settings, "announce", v, want[v] - held[v])
            added = sum(len(want[v] - held[v]) for v in (4, 6))
            removed = sum(len(held[v] - want[v]) for v in (4, 6))
            t_send = time.perf_counter()
            try:
                await self._commands(lines)
            except BaseException:
                self._held = None  # part of the batch may be live: re-read before the next diff
                raise
            t_sent = time.perf_counter()
            rib = await self._rib_out()  # ExaBGP's confirmation, not our bookkeeping
            self._held = self._agreed(rib)
            got = self._readback_of(rib)
            at = datetime.now(timezone.utc)
        applied = Applied(
            enforcer=self.name,
            digest=got.digest,
            desired_digest=want_rs.digest,
            added=added,
            removed=removed,
            duration_s=time.perf_counter() - t0,
            counts={"ipv4_prefixes": len(want[4]), "ipv6_prefixes": len(want[6]), "api_lines": len(lines),
                    "peers_up": sum(1 for st in self.peer_state.values() if st == "up")},
            readback_at=at, full_readback_at=at,
        )
        log.info("ruleset_applied", enforcer=self.name, added=added, removed=removed, lines=len(lines),
                 send_s=round(t_sent - t_send, 3), in_sync=applied.in_sync, duration_s=round(applied.duration_s, 3))
        return applied

    async def readback(self) -> RuleSet:
        """What every configured peer's adj-rib-out holds (prefixes missing on any peer, or
        without the FlowSpec rule when FlowSpec is on, are left out, so the digest differs)."""
        async with self._lock:
            await self._start()
            return self._readback_of(await self._rib_out())

    async def aclose(self) -> None:
        for t in self._tasks:
            t.cancel()
        for t in self._tasks:
            with contextlib.suppress(asyncio.CancelledError):
                await t
        self._tasks.clear()
        if self._writer is not None:
            self._writer.close()
            with contextlib.suppress(OSError):
                await self._writer.wait_closed()
            self._writer = None
        if self._proc is not None and self._proc.returncode is None:
            self._proc.send_signal(signal.SIGTERM)
            try:
                await asyncio.wait_for(self._proc.wait(), 10)
            except TimeoutError:
                self._proc.kill()
                await self._proc.wait()
        self._proc = None
        if self._server is not None:
            self._server.close()
            await self._server.wait_closed()
            self._server = None
        if self._own_dir is not None:
            shutil.rmtree(self._own_dir, ignore_errors=True)
            self._own_dir = None

    def enforced(self, desired: RuleSet) -> RuleSet:
        """The part of `desired` this enforcer holds (addresses; IPv6 only if enabled)."""
        return ruleset_of(prefixes_of(desired, self.settings.ipv6))

    # -- session state --------------------------------------------------------------------------

    async def wait_established(self, timeout_s: float = 60.0, peers: Iterable[str] | None = None) -> None:
        """Wait until ExaBGP reports every peer (or `peers`) `up`; raise EnforcerError at the deadline."""
        await self._start()
        want = set(peers if peers is not None else self.settings.peers)
        try:
            async with asyncio.timeout(timeout_s):
                while not all(self.peer_state.get(p) == "up" for p in want):
                    self._state_changed.clear()
                    await self._state_changed.wait()
        except TimeoutError:
            raise EnforcerError(self.name, f"BGP sessions not up after {timeout_s} s: {self.peer_state!r}; "
                                           f"exabgp said: {self._tail()}") from None

    # -- process and pipe -----------------------------------------------------------------------

    async def _start(self) -> None:
        if self._proc is not None:
            if self._proc.returncode is None:
                return
            code = self._proc.returncode
            await self.aclose()
            raise EnforcerError(self.name, f"exabgp exited with status {code}: {self._tail()}")
        # A new ExaBGP starts with an empty adj-rib-out and no sessions.
        self._held = None
        self.peer_state.clear()
        base = self._workdir or tempfile.mkdtemp(prefix="blockd-bgp-")
        self._own_dir = None if self._workdir else base
        sock_path = os.path.join(base, "api.sock")
        conf = os.path.join(base, "exabgp.conf")
        with contextlib.suppress(FileNotFoundError):
            os.unlink(sock_path)
        Path(conf).write_text(exabgp_config(self.settings, sock_path))
        self._connected.clear()
        self._server = await asyncio.start_unix_server(self._accept, path=sock_path, limit=1 << 24)
        cmd = [self.settings.exabgp, conf]
        if self.netns:
            cmd = ["ip", "netns", "exec", self.netns, *cmd]
        try:
            self._proc = await asyncio.create_subprocess_exec(
                *cmd, stdin=asyncio.subprocess.DEVNULL, stdout=asyncio.subprocess.PIPE,
                stderr=asyncio.subprocess.STDOUT, env=exabgp_environ(), cwd=base, start_new_session=True)
        except OSError as exc:
            await self.aclose()
            raise EnforcerError(self.name, f"cannot start {self.settings.exabgp!r}: {exc.strerror}; "
                                           "install it with `pip install exabgp==5.0.15`", errno=exc.errno) from exc
        self._tasks.append(asyncio.create_task(self._drain_output(self._proc)))
        try:
            async with asyncio.timeout(self.settings.start_timeout_s):
                waiter = asyncio.ensure_future(self._connected.wait())
                died = asyncio.ensure_future(self._proc.wait())
                done, _ = await asyncio.wait({waiter, died}, return_when=asyncio.FIRST_COMPLETED)
                waiter.cancel()
                died.cancel()
                if died in done:
                    raise EnforcerError(self.name, f"exabgp exited at start: {self._tail()}")
        except TimeoutError:
            raise EnforcerError(self.name, f"exabgp's API helper did not connect within "
                                           f"{self.settings.start_timeout_s} s: {self._tail()}") from None
        log.debug("exabgp_started", enforcer=self.name, pid=self._proc.pid, peers=len(self.settings.peers))

    async def _drain_output(self, proc: asyncio.subprocess.Process) -> None:
        assert proc.stdout is not None
        async for raw in proc.stdout:
            line = raw.decode(errors="replace").rstrip()
            self._stderr.append(line)
            log.debug("exabgp_log", enforcer=self.name, line=line)

    def _tail(self) -> str:
        return " | ".join(list(self._stderr)[-8:]) or "(no output)"

    async def _accept(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        """A helper connected (at start, or after ExaBGP respawned it): it becomes the pipe."""
        if self._writer is not None:
            self._writer.close()
        self._writer = writer
        self._connected.set()
        try:
            while line := await reader.readline():
                text = line.decode("ascii", errors="replace").rstrip("\n")
                if text.startswith("{"):
                    self._event(text)
                else:
                    self._answers.put_nowait(text)
        finally:
            writer.close()
            if self._writer is writer:
                self._writer = None
                self._answers.put_nowait("")  # wake a waiting command: the pipe is gone

    def _event(self, text: str) -> None:
        try:
            msg = json.loads(text)
        except json.JSONDecodeError:
            log.debug("exabgp_bad_json", enforcer=self.name, line=text[:200])
            return
        if msg.get("type") == "state":
            n = msg.get("neighbor", {})
            peer = n.get("address", {}).get("peer")
            state = n.get("state")
            if peer and state:
                if self.peer_state.get(peer) != state:
                    log.info("bgp_peer_state", enforcer=self.name, peer=peer, state=state)
                self.peer_state[peer] = state
                self._state_changed.set()
        elif msg.get("answer") in ("done", "error"):
            self._answers.put_nowait(msg["answer"])

    async def _commands(self, lines: list[str], *, collect: bool = False) -> list[str]:
        """Send API lines pipelined; wait for one `done` per line. Output lines before each
        answer are returned when `collect` is set. Any `error` answer raises EnforcerError."""
        out: list[str] = []
        if not lines:
            return out
        writer = self._writer
        if writer is None:
            raise EnforcerError(self.name, f"no API connection to exabgp: {self._tail()}")
        while not self._answers.empty():  # stale answers from a previous, failed call
            self._answers.get_nowait()
        errors: list[str] = []
        try:
            async with asyncio.timeout(self.settings.command_timeout_s):
                sent = 0
                window = 64  # lines in flight: keeps ExaBGP's reader and ours both busy
                answered = 0
                while answered < len(lines):
                    while sent < len(lines) and sent - answered < window:
                        writer.write(lines[sent].encode("ascii") + b"\n")
                        sent += 1
                    await writer.drain()
                    text = await self._answers.get()
                    if text == "done":
                        answered += 1
                    elif text == "error":
                        errors.append(lines[answered][:120])
                        answered += 1
                    elif text == "":
                        raise EnforcerError(self.name, f"exabgp API pipe closed: {self._tail()}")
                    elif collect:
                        out.append(text)
        except TimeoutError:
            raise EnforcerError(self.name, f"exabgp did not answer {len(lines)} API lines within "
                                           f"{self.settings.command_timeout_s} s") from None
        except (ConnectionError, UnicodeEncodeError) as exc:
            raise EnforcerError(self.name, f"exabgp API: {exc}") from exc
        if errors:
            raise EnforcerError(self.name, f"exabgp refused {len(errors)} of {len(lines)} API lines, "
                                           f"first: {errors[0]!r}; exabgp said: {self._tail()}")
        return out

    async def _rib_out(self) -> RibOut:
        lines = await self._commands(["show adj-rib out extensive"], collect=True)
        return await asyncio.to_thread(parse_rib_out, lines, self.settings.communities)

    def _agreed(self, rib: RibOut) -> Prefixes:
        """Prefixes in every peer's adj-rib-out (commands go to all peers alike)."""
        views = [rib.unicast.get(p, {4: set(), 6: set()}) for p in self.settings.peers]
        return {v: set.intersection(*(x[v] for x in views)) for v in (4, 6)}

    def _readback_of(self, rib: RibOut) -> RuleSet:
        up = {p for p, st in self.peer_state.items() if st == "up"}
        return delivered(rib, self.settings.peers, up, self.settings.flowspec)


def delivered(rib: RibOut, peers: Iterable[str], up: Iterable[str], flowspec: bool) -> RuleSet:
    """What every configured router is told: the prefixes in each peer's adj-rib-out (with the
    FlowSpec rule too when `flowspec`), counting a peer whose session is not `up` as holding
    nothing. A RIB-out with no session to carry it blackholes nothing, so it is not in sync."""
    live = set(up)
    empty: Prefixes = {4: set(), 6: set()}
    views = [rib.unicast.get(p, empty) if p in live else empty for p in peers]
    held = {v: set.intersection(*(x[v] for x in views)) if views else set() for v in (4, 6)}
    if flowspec:
        flows = [rib.flow.get(p, empty) if p in live else empty for p in peers]
        held = {v: held[v].intersection(*(f[v] for f in flows)) for v in (4, 6)}
    return ruleset_of(held)
