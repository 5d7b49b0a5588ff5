"""`blockd run`: the asyncio daemon around `Reconciler`.

    start     build enforcers -> first pass (state copies + policy dir) -> metrics server ->
              until every enforcer not in `optional_enforcers` has applied, retry with backoff
              (STATUS= says what fails; EXTEND_TIMEOUT_USEC= keeps systemd waiting) -> THEN
              open the DNS listeners (fail closed: no query is answered from an empty table
              or while an enforcer cannot hold the rules) -> READY=1
    tasks     policy watcher (inotify / poll) -> pass; timer at the next not_before/not_after
              -> pass; SIGHUP -> pass (RELOADING=1); a failed apply or accountability write
              -> retry with backoff; drift check (a full read-back, then repair) every
              `drift_check_s`; periodic statement (full read-back, no repair) every
              `attest_period_s`, SIGUSR1 -> one now (`manual`); kernel/DNS counter snapshots
              for scrapes; WATCHDOG=1 pings
    stop      SIGTERM/SIGINT -> STOPPING=1 -> close listeners; kernel rules stay in place
              unless `keep_rules_on_stop: false`, so a restart leaves no gap
"""

from __future__ import annotations

import asyncio
import ctypes
import gc
import signal
import socket
import struct
import sys
import time
from collections.abc import Callable, Iterator, Mapping
from datetime import datetime, timezone
from typing import Any

import structlog

from blockd import metrics as m
from blockd.accountability import Accountability
from blockd.audit import iso
from blockd.blockpage import BlockPageServer
from blockd.attest import EnforcerPass
from blockd.compile import OrderResult
from blockd.enforcers.base import Enforcer
from blockd.enforcers.drift import check_and_repair
from blockd.errors import BlockdError, EnforcerError
from blockd.model import Applied, RuleSet
from blockd.reconcile import PassResult, Reconciler
from blockd.sdnotify import Notifier
from blockd.selection import STATUSES, status_counts
from blockd.settings import Settings
from blockd.state import StateLock, StateStore
from blockd.watch import identity, snapshot, watch

#: how long a stop waits for the accountant's statements in progress
STOP_ACCOUNT_S = 30.0

log = structlog.get_logger("blockd.daemon")
_READBACK_FAILED = "read-back failed: "

#: the longest a boundary timer waits before it looks at the wall clock again
BOUNDARY_TICK_S = 5.0


def _block_page(settings: Settings) -> BlockPageServer | None:
    """The HTTP 451 page, answering for the orders the sinkhole answers with its address."""
    bp = settings.block_page
    if bp is None:
        return None
    from dataclasses import replace

    if settings.enforcers.dns is not None:
        bp = replace(bp, default_answer=settings.enforcers.dns.default_answer)
    return BlockPageServer(bp)


def build_enforcers(settings: Settings) -> list[Enforcer]:
    """The configured enforcers, kernel first: addresses go live before names are answered."""
    e = settings.enforcers
    out: list[Enforcer] = []
    if e.nft is not None:
        from blockd.enforcers.nft import NftEnforcer

        out.append(NftEnforcer(e.nft))
    if e.ipset is not None:
        from blockd.enforcers.ipset import IpsetEnforcer

        out.append(IpsetEnforcer(e.ipset))
    if e.dns is not None:
        from blockd.dns.server import SinkholeServer
        from blockd.enforcers.dns import SinkholeEnforcer, TableStore

        # the compiled table is kept beside the state, so a restart answers before its first pass
        out.append(SinkholeEnforcer(SinkholeServer(e.dns), store=TableStore(settings.state_dir)))
    if e.rpz is not None:
        from blockd.dns.rpzserver import RpzServer
        from blockd.enforcers.rpz import RpzEnforcer

        out.append(RpzEnforcer(RpzServer(e.rpz)))
    if e.bgp is not None:
        from blockd.enforcers.bgp import BgpEnforcer

        out.append(BgpEnforcer(e.bgp))
    return out


class Daemon:
    def __init__(self, settings: Settings, notifier: Notifier | None = None) -> None:
        self.settings = settings
        self.notifier = notifier or Notifier()
        self.metrics = m.create()
        self.live = m.Live()
        self.metrics.registry.register(m.LiveCollector(self.live))
        self.enforcers = build_enforcers(settings)
        self.block_page = _block_page(settings)
        self._page_retry: asyncio.Task[None] | None = None
        self.reconciler = Reconciler(settings, self.enforcers)
        for e in self.enforcers:  # counters exist at 0 from the start, so increase() sees the first event
            self.metrics.apply_failures.labels(e.name)
            self.metrics.drift_repairs.labels(e.name)
        for kind in ("attestation", "audit", "state"):
            self.metrics.write_failures.labels(kind)
        for e in self.enforcers:
            if hasattr(e, "on_table_file"):  # the sinkhole's persisted table: loads and saves, counted
                from blockd.enforcers.dns import TABLE_FILE_RESULTS

                for result in TABLE_FILE_RESULTS:
                    self.metrics.dns_table_file.labels(result)
                e.on_table_file = lambda result: self.metrics.dns_table_file.labels(result).inc()  # type: ignore[attr-defined]
                e.busy = self.reconciler.passing.is_set  # type: ignore[attr-defined]
        self.accountability = Accountability.from_settings(
            settings, on_failure=lambda kind: self.metrics.write_failures.labels(kind).inc())
        #: per enforcer: the last Applied (an apply, a repair or a full read-back) and when
        self.held: dict[str, tuple[Applied, datetime]] = {}
        #: per enforcer: the error of its last apply, while it keeps failing
        self.errors: dict[str, str] = {}
        self.required = [e.name for e in self.enforcers if e.name not in settings.daemon.optional_enforcers]
        self._retry_s = 1.0
        self._retry_at: float | None = None
        self._pass_failed = False
        #: enforcer -> (rule set digest, digest of its share), for enforcers that failed
        self._shares: dict[str, tuple[str, str]] = {}
        self._manual = asyncio.Event()
        self._wake = asyncio.Event()
        #: a retry was scheduled outside the pass loop: it recomputes its timeout
        self._poke = asyncio.Event()
        #: passes and drift repairs never interleave: a repair must not re-apply a superseded set
        self._apply_lock = asyncio.Lock()
        self._metrics_server: asyncio.Server | None = None
        #: the accountant's work (statements, the time-to-enforce record): see `_account`
        self._account_lock = asyncio.Lock()
        self._account_jobs: list[tuple[str, Any, Any]] = []
        self._account_task: asyncio.Task[None] | None = None
        self._stop = asyncio.Event()
        self._boundary: datetime | None = None
        self._reloading = False
        self.ready = False
        self.last: PassResult | None = None
        self._lock: StateLock | None = None
        self._claims: list[socket.socket] = []
        self._seen: tuple[object, ...] | None = None

    # -- lifecycle ------------------------------------------------------------------------
    async def run(self) -> int:
        loop = asyncio.get_running_loop()
        loop.add_signal_handler(signal.SIGTERM, self._stop.set)
        loop.add_signal_handler(signal.SIGINT, self._stop.set)
        loop.add_signal_handler(signal.SIGHUP, self._reload)
        loop.add_signal_handler(signal.SIGUSR1, self._manual.set)
        try:
            self._lock = StateStore(self.settings.state_dir).lock()
            self._claims = claim_kernel_objects(self.settings)
        except (BlockdError, OSError) as e:
            log.error("start_failed", reason="held_by_another_daemon", error=str(e))
            for enforcer in self.enforcers:
                await enforcer.aclose()
            return 1
        if not self.settings.policy_dir.is_dir():
            log.warning("policy_dir_missing", directory=str(self.settings.policy_dir),
                        note="serving the state's accepted policies; the directory is watched for")
        await self._restore_dns()
        await self._pass("start")
        if self.last is None:
            # Fail closed: with no rule set there is nothing safe to serve. Kernel rules from
            # before stay in place; systemd restarts us (Restart=on-failure).
            log.error("start_failed", reason="the first reconcile pass failed; see reconcile_failed")
            await self._shutdown(remove_rules=False)
            return 1
        if self.settings.daemon.metrics_listen is not None:
            host, port = self.settings.daemon.metrics_listen
            self._metrics_server = await m.serve(self.metrics.registry, host, port, self._order_rows)
            log.info("metrics_listening", address=f"{host}:{port}")
        if not await self._until_ready():
            self.notifier.stopping()
            await self._shutdown(remove_rules=not self.settings.daemon.keep_rules_on_stop)
            return 0
        await self._start_listeners()
        self.ready = True
        self.metrics.ready.set(1)
        self.notifier.ready(self._status())
        log.info("daemon_ready", enforcers=[e.name for e in self.enforcers],
                 failing=sorted(self.errors) or None)
        try:
            async with asyncio.TaskGroup() as tg:
                tasks = [
                    tg.create_task(self._pass_loop()),
                    tg.create_task(watch(self.settings.policy_dir, self._wake.set, poll_s=self.settings.daemon.poll_s,
                                         on_replaced=lambda how: self.metrics.policy_dir_events.labels(how).inc())),
                    tg.create_task(self._drift_loop()),
                    tg.create_task(self._stats_loop()),
                ]
                if self.notifier.watchdog_interval:
                    tasks.append(tg.create_task(self._watchdog(self.notifier.watchdog_interval)))
                if self.accountability is not None:
                    tasks.append(tg.create_task(self._attest_loop()))
                await self._stop.wait()
                self.notifier.stopping()
                log.info("daemon_stopping")
                for t in tasks:
                    t.cancel()
        finally:
            await self._shutdown(remove_rules=not self.settings.daemon.keep_rules_on_stop)
        return 0

    async def _until_ready(self) -> bool:
        """Retry passes with backoff until every required enforcer has applied; False if
        asked to stop first. No DNS listener is open meanwhile; /metrics is."""
        attempt = 0
        while not self._stop.is_set():
            failing = [n for n in self.required if n in self.errors or n not in self.held]
            if not failing:
                return True
            # `_pass` scheduled the retry (1 s doubling to retry_max_s)
            wait = max(0.0, self._retry_at - time.monotonic()) if self._retry_at is not None else self._retry_s
            # systemd's start timeout would kill us while we wait for the kernel: extend it.
            self.notifier.send(f"EXTEND_TIMEOUT_USEC={int((wait + 60) * 1e6)}",
                               f"STATUS=not ready, retrying in {wait:.0f} s; {self._status()}")
            # once at warning (and apply_failed per attempt): the metric and STATUS say the rest
            (log.warning if attempt == 0 else log.debug)("not_ready", failing=failing, retry_in_s=wait)
            attempt += 1
            try:
                await asyncio.wait_for(self._stop.wait(), wait)
                return False
            except TimeoutError:
                pass
            await self._pass("retry")
        return False

    async def _restore_dns(self) -> None:
        """Before the first pass: serve the sinkhole's persisted table if it checks out (its
        checksum, the state's accepted policies; enforcers/dns.py), so a restart answers within
        seconds, not after a full pass. Anything else waits for the first pass, as before."""
        dns = next((e for e in self.enforcers if e.name == "dns"), None)
        restore = getattr(dns, "restore", None)
        if restore is None or not await restore():
            return
        try:
            await dns.server.start()  # type: ignore[union-attr]
        except OSError as e:  # the normal start after the first pass tries again, and says so
            log.warning("dns_early_listen_failed", error=e.strerror or str(e))

    def _reload(self) -> None:
        self._reloading = True
        self.notifier.reloading()
        log.info("reload_requested", signal="SIGHUP")
        self._wake.set()

    async def _start_listeners(self) -> None:
        page = self.block_page
        if page is not None:
            try:
                await page.start()
            except OSError as e:  # the DNS answers stand without the page; said once, blockd_block_page_up 0
                log.error("block_page_failed", listen=[f"{h}:{p}" for h, p in page.settings.listen],
                          error=e.strerror or str(e), hint="block_page.listen must be a local address (the "
                          "sinkhole address) and port 80 free; retrying")
                self._page_retry = asyncio.get_running_loop().create_task(
                    page.keep_trying(self.settings.daemon.retry_max_s))
            self.live.block_page = lambda: (page.listening, dict(page.stats))
        for e in self.enforcers:
            server = getattr(e, "server", None)
            if server is not None and not getattr(server, "listening", False):
                await server.start()
        dns = next((e for e in self.enforcers if e.name == "dns"), None)
        if dns is not None:
            stats = dns.server.stats  # type: ignore[attr-defined]
            self.live.dns = lambda: (dict(stats.results), stats.by_order())
            srv = dns.server  # type: ignore[attr-defined]
            self.live.dns_defence = lambda: (dict(srv.tcp_closed), dict(srv.forwarder.rejected))
        rpz = next((e for e in self.enforcers if e.name == "rpz"), None)
        if rpz is not None:
            primary = rpz.server  # type: ignore[attr-defined]
            self.live.rpz = lambda: (primary.serial, {a: s.serial for a, s in primary.secondaries().items()},
                                     dict(primary.stats))
            self.live.rpz_zones = lambda: {z: (n, {a: s.serial for a, s in held.items()})
                                           for z, (n, held) in primary.zone_states().items()}

    async def _shutdown(self, *, remove_rules: bool) -> None:
        try:  # the statements queued are written (each is atomic: an unfinished one is owed, not torn)
            await asyncio.wait_for(self.account_idle(), STOP_ACCOUNT_S)
        except TimeoutError:
            log.warning("statement_owed_at_stop", note="a statement was still being written; the next start states "
                        "what is held")
        if remove_rules:
            for e in self.enforcers:
                try:
                    await e.apply(RuleSet.empty())
                except EnforcerError as exc:
                    log.error("remove_on_stop_failed", enforcer=e.name, error=str(exc))
        for e in self.enforcers:
            await e.aclose()
        if self._metrics_server is not None:
            self._metrics_server.close()
            await self._metrics_server.wait_closed()
        if self._page_retry is not None:
            self._page_retry.cancel()
        if self.block_page is not None:
            await self.block_page.aclose()
        if self._lock is not None:
            self._lock.close()
        for sock in self._claims:
            sock.close()
        log.info("daemon_stopped", kept_rules=not remove_rules)

    # -- passes -----------------------------------------------------------------------------
    async def _pass_loop(self) -> None:
        while True:
            timeout = None
            if self._boundary is not None:
                # Re-checked at least every BOUNDARY_TICK_S against the wall clock (as blockd.clock
                # judges it): a clock step while waiting moves the boundary, the timer follows.
                left = (self._boundary - self.reconciler.now()).total_seconds()
                timeout = min(max(0.0, left) + 0.001, BOUNDARY_TICK_S)
            if self._retry_at is not None:
                due = max(0.0, self._retry_at - time.monotonic())
                timeout = due if timeout is None else min(timeout, due)
            woken = asyncio.ensure_future(self._wake.wait())
            poked = asyncio.ensure_future(self._poke.wait())
            try:
                await asyncio.wait({woken, poked}, timeout=timeout, return_when=asyncio.FIRST_COMPLETED)
            finally:
                woken.cancel()
                poked.cancel()
            if self._poke.is_set() and not self._wake.is_set():
                self._poke.clear()  # a retry was scheduled elsewhere: wait again with it
                continue
            self._poke.clear()
            if self._wake.is_set():
                reason = "change"
            elif self._retry_at is not None and time.monotonic() >= self._retry_at:
                reason = "retry"  # a failed apply, state write or statement is retried
            elif self._boundary is not None and self.reconciler.now() >= self._boundary:
                reason = "time"  # a not_before or not_after was reached
            else:
                continue  # a capped wait: not there yet
            self._wake.clear()
            reloading, self._reloading = self._reloading, False
            if reason == "retry" and not reloading and not self._needs_pass():
                await self._retry_writes()  # only a write is owed: no need to recompile and re-apply
                continue
            if reason == "change" and not reloading and self._inputs_unchanged():
                log.debug("pass_skipped", reason="the policy directory is as the last pass read it")
                continue
            await self._pass("reload" if reloading else reason)
            if reloading:
                self.notifier.ready(self._status())  # ends systemd's "reloading" state
            else:
                self.notifier.status(self._status())

    def _inputs_unchanged(self) -> bool:
        """True when a wake-up finds the files exactly as the last pass read them (the watcher's
        first call, events of a burst that one pass already covered): no second full pass."""
        return self.last is not None and self._input_snapshot() == self._seen

    def _input_snapshot(self) -> tuple[object, ...]:
        # The state directory is not in it: only this daemon writes there (it holds the lock).
        return snapshot(self.settings.policy_dir), identity(self.settings.policy_dir)

    async def _pass(self, reason: str) -> None:
        """One pass, with the cyclic garbage collector off, and what it built frozen out of the
        collector's reach after (gc.freeze): at 1M rules a pass makes millions of acyclic objects,
        and each automatic collection over them held the GIL, and every DNS answer, for 0.2-1 s.
        Objects dropped later are still freed by reference counting."""
        was_enabled = gc.isenabled()
        gc.disable()
        t0 = time.monotonic()
        try:
            await self._run_pass(reason)
        finally:
            gc.freeze()
            if was_enabled:
                gc.enable()
            if time.monotonic() - t0 >= TRIM_AFTER_S:
                return_free_memory()

    async def _run_pass(self, reason: str) -> None:
        self._seen = self._input_snapshot()  # before reading: a change during the pass is not lost
        t0 = time.perf_counter()
        try:
            async with self._apply_lock:
                result = await self.reconciler.run_pass(reason=reason)
        except Exception as e:  # noqa: BLE001 - the daemon must survive any pass; last good state stays
            self.metrics.reconcile.labels("error").inc()
            log.exception("reconcile_failed", reason=reason, error=str(e))
            self._pass_failed = True
            self._schedule_retry(True)
            return
        self._pass_failed = False
        self.last = result
        if self.block_page is not None:
            self.block_page.update(result.compilation.ruleset)
        self._boundary = result.next_boundary
        now = datetime.now(timezone.utc)
        for name, a in result.applied.items():
            self.held[name] = (a, now)
            self.errors.pop(name, None)
        self.errors.update(result.failed)
        self._observe(result, time.perf_counter() - t0)
        # Digests over the whole rule set take seconds at 1M: off the event loop, once each.
        await asyncio.to_thread(self._warm_shares, result.compilation.ruleset)
        if self.accountability is not None:
            acc = self.accountability
            for f in result.new_input_failures:
                self._account(("run", "event", lambda f=f: acc.event("input_refused", input=f.input, where=f.where,
                                                                     error=f.message)))
            # A statement lists every order (a minute for a registry of a million): written by
            # the accountant beside the passes, never under the apply lock (see _account).
            self._account(("pass", result, self.enforcer_passes()))
        self._schedule_retry(bool(result.failed) or result.state_error is not None
                             or (self.accountability is not None and self.accountability.behind))

    def _account(self, job: tuple[str, Any, Any]) -> None:
        """Queue accountability work for the accountant task: ("pass", result, enforcer
        passes) after each pass, or ("run", what, fn) for an audit event or a statement made
        from snapshots. Everything that writes the audit log or a statement goes through it:
        one writer, in order, and the event loop never waits for it.

        The accountant runs the jobs in order, in a worker thread, one at a time (statements
        never interleave), beside the passes: a change never waits for a statement. Passes
        queued meanwhile are each recorded (receipts, time-to-enforce, the audit events), and
        one statement is made for the newest of them: it states what is held then, which is
        what the ones it stands for would have led to."""
        self._account_jobs.append(job)
        if self._account_task is None or self._account_task.done():
            self._account_task = asyncio.get_running_loop().create_task(self._account_loop())

    async def _account_loop(self) -> None:
        acc = self.accountability
        assert acc is not None
        while self._account_jobs:
            jobs, self._account_jobs = self._account_jobs, []

            def run(jobs: list[tuple[str, Any, Any]] = jobs) -> None:
                last_pass = max((i for i, j in enumerate(jobs) if j[0] == "pass"), default=-1)
                for i, (kind, a, b) in enumerate(jobs):
                    if kind == "pass":
                        later_pass = any(j[0] == "pass" for j in jobs[i + 1:])
                        acc.after_pass(a, b, statement=not later_pass)
                        if i == last_pass and acc.behind:
                            acc.retry(a, b)
                    else:
                        b()

            try:
                async with self._account_lock:
                    await asyncio.to_thread(run)
            except Exception as e:  # noqa: BLE001 - accountability must never stop enforcement
                log.exception("accountability_failed", error=str(e))
            if acc.behind:
                self._schedule_retry(True)
                self._poke.set()

    async def account_idle(self) -> None:
        """Wait until the accountant has written what was queued (shutdown, tests)."""
        while self._account_task is not None and not self._account_task.done():
            await asyncio.shield(self._account_task)

    def _needs_pass(self) -> bool:
        """A failed pass or apply is retried with a pass; an owed write alone is not."""
        state = self.last is not None and self.last.state_error is not None  # new policies wait for it
        return self._pass_failed or state or any(not err.startswith(_READBACK_FAILED) for err in self.errors.values())

    async def _retry_writes(self) -> None:
        acc = self.accountability
        if acc is None:
            return
        last, passes = self.last, self.enforcer_passes()
        if last is not None:  # by the accountant: the pass loop does not wait for the write
            self._account(("run", "retry", lambda: acc.retry(last, passes)))
        self._schedule_retry(acc.behind)

    def _schedule_retry(self, failing: bool) -> None:
        """Back off (1 s doubling to `retry_max_s`) while an apply or a write fails."""
        if not failing:
            self._retry_s, self._retry_at = 1.0, None
            return
        self._retry_at = time.monotonic() + self._retry_s
        self._retry_s = min(self._retry_s * 2, self.settings.daemon.retry_max_s)

    def _warm_shares(self, desired: RuleSet) -> None:
        """Worker thread: the statement's share digests, and each failing enforcer's share."""
        if self.accountability is not None:
            self.accountability.shares_for(desired)
        for e in self.enforcers:
            if e.name in self.errors or e.name not in self.held:
                self._share_digest(e, desired)

    def _share_digest(self, e: Enforcer, desired: RuleSet) -> str:
        cached = self._shares.get(e.name)
        if cached is None or cached[0] != desired.digest:
            cached = (desired.digest, e.enforced(desired).digest)
            self._shares[e.name] = cached
        return cached[1]

    def enforcer_passes(self) -> dict[str, EnforcerPass]:
        """Every configured enforcer as a statement shows it: what it last held (read back),
        the error while it fails, and the digest of its share of the rule set in force."""
        desired = self.reconciler.desired
        out = {}
        for e in self.enforcers:
            held = self.held.get(e.name)
            error = self.errors.get(e.name)
            share = None
            if desired is not None and (held is None or error is not None):
                share = self._share_digest(e, desired)
            if held is None:
                out[e.name] = EnforcerPass(None, datetime.now(timezone.utc), error, share)
            else:
                out[e.name] = EnforcerPass(held[0], held[1], error, share)
        return out

    def _observe(self, r: PassResult, duration_s: float) -> None:
        mt = self.metrics
        mt.reconcile.labels("ok" if not r.failed else "partial").inc()
        mt.last_reconcile.set(time.time())
        for rej in r.rejected:
            mt.rejections.labels(rej.reason).inc()
        counts = status_counts(r.verdicts)
        issuers = {i for i, _ in counts} | {p.issuer for p in r.policies}
        m.replace_labels(mt.policy_status, {(i, st): counts.get((i, st), 0) for i in issuers for st in STATUSES})
        refused = {f.input for f in r.input_failures}
        for name in ("trust_store", "catalog", "state"):
            mt.input_refused.labels(name).set(1 if name in refused else 0)
        for f in r.new_input_failures:
            mt.input_failures.labels(f.input).inc()
        if r.state_error is not None:
            mt.state_write_failures.inc()
        if self.reconciler.clock is not None:
            mt.clock_behind.set(self.reconciler.clock.step_back_s)
            mt.clock_ahead.set(self.reconciler.clock.step_ahead_s)
        m.replace_labels(mt.policy_serial, {(p.issuer,): p.serial for p in r.policies})
        m.replace_labels(mt.policy_issued, {(p.issuer,): p.issued_at.timestamp() for p in r.policies})
        m.replace_labels(mt.policy_expiry, {(p.issuer,): p.not_after.timestamp() for p in r.policies})
        m.replace_labels(mt.policy_info, {(p.issuer, p.digest): 1 for p in r.policies})
        rs = r.compilation.ruleset
        m.replace_labels(mt.ruleset_info, {(rs.digest,): 1})
        rules = {("compiled", k): v for k, v in rs.counts().items()}
        for name, a in r.applied.items():
            rules.update({(name, k): v for k, v in a.counts.items()})
            mt.apply_duration.labels(name).observe(a.duration_s)
            mt.in_sync.labels(name).set(1 if a.in_sync else 0)
        for name in r.failed:
            mt.apply_failures.labels(name).inc()
            mt.in_sync.labels(name).set(0)
        m.replace_labels(mt.rules, rules)
        findings: dict[tuple[str, str], float] = {}
        for f in r.compilation.findings:
            key = (f.guard, "true" if f.allowed else "false")
            findings[key] = findings.get(key, 0) + 1
        m.replace_labels(mt.findings, findings)
        live = set(r.applied) == {e.name for e in self.enforcers}
        now = datetime.now(timezone.utc)
        comp = r.compilation
        series = m.order_series(_Statuses(comp.orders), comp.deadlines, live, tally=comp.tally)
        m.replace_labels(mt.order_enforced, series.enforced)
        m.replace_labels(mt.order_deadline, series.deadlines)
        m.replace_labels(mt.orders, series.counts)
        mt.order_series_omitted.set(series.omitted)
        if r.changed:
            for p in r.policies:
                start = max(p.issued_at, self.reconciler.received.get(p.digest, p.issued_at))
                for name in r.applied:
                    mt.time_to_enforce.labels(name).observe(max(0.0, (now - start).total_seconds()))

    def _order_rows(self) -> Iterator[dict[str, object]]:
        """GET /orders (in a worker thread): every order of the last pass with its status,
        deadline and blocked DNS answers, by order key."""
        last = self.last
        if last is None:
            return
        rs = last.compilation.ruleset
        live = set(last.applied) == {e.name for e in self.enforcers}
        hits = self.live.dns()[1] if self.live.dns is not None else {}
        for key, res in sorted(last.compilation.orders.items()):
            info = rs.orders.get(key)
            yield {"order": key, "issuer": key.split("/", 1)[0], "status": res.status,
                   "live": res.status in ("enforced", "partially_refused") and live, "rules": res.rules,
                   "refused": res.refused, "deadline": iso(info.deadline) if info and info.deadline else None,
                   "dns_blocked_queries": hits.get(key, 0)}

    def _status(self) -> str:
        if self.last is None:
            return "starting"
        serials = ", ".join(f"{p.issuer}#{p.serial}" for p in self.last.policies) or "no policy"
        c = self.last.compilation.ruleset.counts()
        bad = ""
        if self.errors:
            bad = "; FAILING: " + "; ".join(f"{n}: {err[:200]}" for n, err in sorted(self.errors.items()))
        refused = sum(1 for v in self.last.verdicts if v.status == "rejected" and not v.from_state)
        bad += f"; {refused} policy file(s) REFUSED (blockd check)" if refused else ""
        bad += "".join(f"; {f.input} REFUSED, last good in use" for f in self.last.input_failures if f.input != "state")
        if self.last.state_error:
            bad += f"; STATE DIRECTORY NOT WRITABLE ({self.last.state_error}): new policies wait, retrying"
        return (f"{serials}; {c['domain_exact'] + c['domain_subtree']} names, "
                f"{c['ipv4_ranges']} IPv4 + {c['ipv6_ranges']} IPv6 ranges{bad}")

    # -- periodic work ----------------------------------------------------------------------
    async def _drift_loop(self) -> None:
        """Read every enforcer back; re-apply where it no longer holds what it was given.

        The read-back (seconds at 1M rules) runs without the apply lock: a change arriving
        meanwhile is compiled and applied beside it, not queued behind a full dump (each
        enforcer serialises its own backend). Only the repair takes the lock, and a read-back
        that a pass overtook is dropped: the pass read back what it changed, and the next
        round checks the rest.
        """
        interval = self.settings.daemon.drift_check_s
        while True:
            await asyncio.sleep(interval)
            try:
                desired = self.reconciler.desired
                if desired is None or self.last is None:
                    continue
                reads = await self._read_all(desired)
                async with self._apply_lock:
                    if self.reconciler.desired is not desired:
                        log.debug("drift_check_overtaken", note="a pass applied a newer rule set meanwhile")
                        continue
                    if await self._check_drift(desired, reads):
                        self.metrics.last_reconcile.set(time.time())  # a full read-back that agrees
            except Exception as e:  # noqa: BLE001 - a periodic check must never stop the daemon
                log.exception("drift_check_crashed", error=str(e))

    async def _read_all(self, desired: RuleSet, *, full: bool = False
                        ) -> dict[str, tuple[RuleSet, float, datetime] | EnforcerError]:
        """Every enforcer's read-back (or its error), not yet recorded as what it holds. With
        `full`, a dump even where the backend could prove nothing changed (statements)."""
        out: dict[str, tuple[RuleSet, float, datetime] | EnforcerError] = {}
        for e in self.enforcers:
            if e.name in self.errors and not self.errors[e.name].startswith(_READBACK_FAILED):
                continue  # its apply fails: the pass loop retries it with backoff
            t0 = time.perf_counter()
            try:
                held = await _read(e, full)
            except EnforcerError as exc:
                out[e.name] = exc
                continue
            out[e.name] = (held, time.perf_counter() - t0, datetime.now(timezone.utc))
        return out

    async def _check_drift(self, desired: RuleSet,
                           reads: dict[str, tuple[RuleSet, float, datetime] | EnforcerError]) -> bool:
        """True when every enforcer was read back and holds (or again holds) what it should."""
        if self.last is None:
            return False
        clean = True
        repairs: list[dict[str, object]] = []
        for e in self.enforcers:
            read = reads.get(e.name)
            if read is None:
                # its apply fails: the pass loop retries it with backoff, and says so once
                self.metrics.in_sync.labels(e.name).set(0)
                clean = False
                continue
            try:
                if isinstance(read, EnforcerError):
                    raise read
                found, held = await self._record_readback(e, desired, *read)
                repaired = await check_and_repair(e, desired, held)
            except EnforcerError as exc:
                self.metrics.in_sync.labels(e.name).set(0)
                log.error("drift_check_failed", enforcer=e.name, errno=exc.errno, error=str(exc))
                clean = False
                continue
            if repaired is not None:
                self.held[e.name] = (repaired, datetime.now(timezone.utc))
                self.errors.pop(e.name, None)
                self.metrics.drift_repairs.labels(e.name).inc()
                if self.accountability is not None:
                    acc = self.accountability
                    self._account(("run", "event", lambda acc=acc, name=e.name, r=repaired: acc.event(
                        "drift_repaired", enforcer=name, restored=r.digest, added=r.added, removed=r.removed)))
                repairs.append({"enforcer": e.name, "found_at": iso(found.readback_at or datetime.now(timezone.utc)),
                                "found_digest": found.digest, "missing": repaired.added, "extra": repaired.removed,
                                "repaired_at": iso(datetime.now(timezone.utc)), "readback_digest": repaired.digest,
                                "share_digest": repaired.desired_digest, "in_sync": repaired.in_sync})
            in_sync = e.name not in self.errors and self.held[e.name][0].in_sync
            self.metrics.in_sync.labels(e.name).set(1 if in_sync else 0)
            clean = clean and in_sync
        if repairs and self.accountability is not None:
            # The regulator hears of it now, not at the next periodic statement (written by the
            # accountant, from what is held now, beside the passes).
            passes = self.enforcer_passes()
            acc, last = self.accountability, self.last
            self._account(("run", "drift_repair", lambda: (acc.record(last, passes), acc.attest(
                last, passes, reason="drift_repair", drift_repairs=repairs))))
        return clean

    async def _read_back(self, e: Enforcer, desired: RuleSet) -> tuple[Applied, RuleSet]:
        """A full read-back of `e`, recorded as what it holds now (EnforcerError if it fails)."""
        t0 = time.perf_counter()
        held = await _read(e, True)
        return await self._record_readback(e, desired, held, time.perf_counter() - t0, datetime.now(timezone.utc))

    async def _record_readback(self, e: Enforcer, desired: RuleSet, held: RuleSet, took_s: float,
                               now: datetime) -> tuple[Applied, RuleSet]:
        prev = self.held.get(e.name)
        if prev is not None and e.name not in self.errors:
            share = prev[0].desired_digest
        else:
            share = await asyncio.to_thread(self._share_digest, e, desired)
        # A read-back the backend could answer without a dump (nft: the ruleset generation has
        # not moved since it was exact) says so: scope "touched", the rest as of the last dump.
        scope, read_at, full_at = getattr(e, "last_readback", ("full", now, now))
        a = Applied(e.name, held.digest, share, 0, 0, took_s, held.counts(), scope, read_at or now, full_at or now)
        self.held[e.name] = (a, prev[1] if prev is not None else now)
        if self.errors.get(e.name, "").startswith(_READBACK_FAILED):
            del self.errors[e.name]
        return a, held

    async def _stats_loop(self, interval: float = 5.0) -> None:
        while True:
            self.reconciler.now()  # measures a wall clock step, also while no pass runs
            if self.reconciler.clock is not None:
                self.metrics.clock_behind.set(self.reconciler.clock.step_back_s)
                self.metrics.clock_ahead.set(self.reconciler.clock.step_ahead_s)
            for e in self.enforcers:
                stats: Callable[[], object] | None = getattr(e, "stats", None)
                if stats is not None:
                    try:
                        self.live.kernel[e.name] = await stats()  # type: ignore[misc]
                    except Exception as exc:  # noqa: BLE001 - counters are best effort
                        log.warning("stats_failed", enforcer=e.name, error=str(exc))
            await asyncio.sleep(interval)

    async def _watchdog(self, interval: float) -> None:
        while True:
            self.notifier.watchdog()
            await asyncio.sleep(interval)

    async def _attest_loop(self) -> None:
        """A statement every `attest_period_s` (or on SIGUSR1), from a full read-back of every
        enforcer taken just before it; nothing is repaired first, so drift shows."""
        assert self.accountability is not None
        while True:
            try:
                await asyncio.wait_for(self._manual.wait(), self.settings.daemon.attest_period_s)
                reason = "manual"
            except TimeoutError:
                reason = "periodic"
            self._manual.clear()
            if self.last is None:
                continue
            desired = self.reconciler.desired
            # The read-back runs beside changes (see _drift_loop); it is redone under the lock
            # in the rare case a pass applied a newer rule set meanwhile.
            reads = await self._read_all(desired, full=True) if desired is not None else {}
            async with self._apply_lock:
                try:
                    if desired is not None and self.reconciler.desired is desired:
                        await self._record_all(desired, reads)
                    else:
                        await self._refresh_readback()
                    self._observe_sync()
                    passes = self.enforcer_passes()
                    acc, last = self.accountability, self.last
                except Exception as e:  # noqa: BLE001 - as above: log, keep running, retry next period
                    log.exception("attestation_failed", error=str(e))
                    continue
            # what is held now, stated by the accountant (a minute at 1M: not under the apply lock)
            self._account(("run", reason, lambda acc=acc, last=last, passes=passes, reason=reason: (
                acc.record(last, passes), acc.attest(last, passes, reason=reason))))

    async def _refresh_readback(self) -> None:
        """Re-read every enforcer so a periodic attestation states what is held now."""
        desired = self.reconciler.desired
        if desired is None:
            return
        for e in self.enforcers:
            try:
                await self._read_back(e, desired)
            except EnforcerError as exc:
                log.error("readback_failed", enforcer=e.name, errno=exc.errno, error=str(exc))
                self.errors.setdefault(e.name, f"{_READBACK_FAILED}{exc}")

    async def _record_all(self, desired: RuleSet,
                          reads: dict[str, tuple[RuleSet, float, datetime] | EnforcerError]) -> None:
        for e in self.enforcers:
            read = reads.get(e.name)
            if isinstance(read, EnforcerError):
                log.error("readback_failed", enforcer=e.name, errno=read.errno, error=str(read))
                self.errors.setdefault(e.name, f"{_READBACK_FAILED}{read}")
            elif read is not None:
                await self._record_readback(e, desired, *read)

    def _observe_sync(self) -> None:
        for name, e in self.enforcer_passes().items():
            self.metrics.in_sync.labels(name).set(1 if e.in_sync else 0)


async def _read(e: Enforcer, full: bool) -> RuleSet:
    """`e.readback()`; with `full`, the backend's full dump where it has a cheaper proof."""
    readback_full = getattr(e, "readback_full", None)
    return await (readback_full() if full and readback_full is not None else e.readback())


class _Statuses(Mapping[str, str]):
    """Order key -> status, read through from the results (no copy of a million entries)."""

    def __init__(self, results: Mapping[str, OrderResult]) -> None:
        self._results = results

    def __getitem__(self, key: str) -> str:
        return self._results[key].status

    def __iter__(self) -> Iterator[str]:
        return iter(self._results)

    def __len__(self) -> int:
        return len(self._results)


def claim_kernel_objects(settings: Settings) -> list[socket.socket]:
    """Hold the kernel objects this daemon drives (its nft table, its ipset sets) alone in this
    network namespace, as the state lock does for the state directory: an abstract unix socket
    lives in the network namespace, needs no file, and goes away with the process.

    A second daemon with another state directory would otherwise flip the same table between two
    rule sets, each repairing the other's "drift" and attesting it.
    """
    names = []
    e = settings.enforcers
    if e.nft is not None:
        names.append(f"nft table inet {e.nft.table}")
    if e.ipset is not None:
        names.append(f"ipset sets {e.ipset.prefix}4/{e.ipset.prefix}6")
    held: list[socket.socket] = []
    for name in names:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM | socket.SOCK_CLOEXEC)
        address = "\0blockd: " + name
        try:
            sock.bind(address)
            sock.listen(8)
        except OSError:
            sock.close()
            for other in held:
                other.close()
            raise BlockdError(f"the {name} in this network namespace is driven by another blockd "
                              f"({_holder(address)}); only one daemon may drive it") from None
        held.append(sock)
    return held


def _holder(address: str) -> str:
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as probe:
            probe.settimeout(1)
            probe.connect(address)
            pid, _, _ = struct.unpack("3i", probe.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED,
                                                              struct.calcsize("3i")))
            return f"pid {pid}"
    except OSError:
        return "pid unknown"


#: how often a thread holding the GIL hands it over (CPython's default is 5 ms): passes run in a
#: worker thread, and a query waiting for the GIL behind them would wait that long each time
GIL_SWITCH_S = 0.001


#: a pass at least this long (a cold start, a registry's first load) made and dropped enough to
#: leave the C heap with free pages worth handing back (60 MiB at 1M rules, for 4 ms)
TRIM_AFTER_S = 1.0


def return_free_memory() -> bool:
    """Give the free pages of the C heap back to the kernel (glibc's malloc_trim: Python's
    large objects, freed in the middle of the heap, otherwise stay in the RSS). False where
    the C library has no malloc_trim (musl)."""
    try:
        trim = ctypes.CDLL(None).malloc_trim
    except (OSError, AttributeError):
        return False
    trim(0)
    return True


def run(settings: Settings) -> int:
    sys.setswitchinterval(GIL_SWITCH_S)
    return asyncio.run(Daemon(settings).run())
