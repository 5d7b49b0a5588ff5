"""`blockd run`: the asyncio daemon around `Reconciler`.

    start     build enforcers -> first pass (state copies + policy dir) -> THEN open the DNS
              listeners (fail closed: no query is answered from an empty table) -> metrics
              server -> READY=1
    tasks     policy watcher (inotify / poll) -> pass; timer at the next not_before/not_after
              -> pass; SIGHUP -> pass (RELOADING=1); drift check every `drift_check_s`;
              kernel/DNS counter snapshots for scrapes; WATCHDOG=1 pings
    stop      SIGTERM/SIGINT -> STOPPING=1 -> close listeners; kernel rules stay in place
              unless `keep_rules_on_stop: false`, so a restart leaves no gap
"""

from __future__ import annotations

import asyncio
import signal
import time
from collections.abc import Callable
from datetime import datetime, timezone

import structlog

from blockd import metrics as m
from blockd.accountability import Accountability
from blockd.enforcers.base import Enforcer
from blockd.enforcers.drift import check_and_repair
from blockd.errors import EnforcerError
from blockd.model import RuleSet
from blockd.reconcile import PassResult, Reconciler
from blockd.sdnotify import Notifier
from blockd.settings import Settings
from blockd.watch import watch

log = structlog.get_logger("blockd.daemon")


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
        from blockd.enforcers.dns import SinkholeEnforcer

        out.append(SinkholeEnforcer(SinkholeServer(e.dns)))
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
        self.reconciler = Reconciler(settings, self.enforcers)
        for e in self.enforcers:  # counters exist at 0 from the start, so increase() sees the first event
            self.metrics.apply_failures.labels(e.name)
            self.metrics.drift_repairs.labels(e.name)
        self.accountability = Accountability.from_settings(settings)
        self._wake = asyncio.Event()
        #: passes and drift repairs never interleave: a repair must not re-apply a superseded set
        self._apply_lock = asyncio.Lock()
        self._stop = asyncio.Event()
        self._boundary: datetime | None = None
        self._reloading = False
        self.last: PassResult | None = None

    # -- lifecycle ------------------------------------------------------------------------
    async def run(self) -> int:
        loop = asyncio.get_running_loop()
        loop.add_signal_handler(signal.SIGTERM, self._stop.set)
        loop.add_signal_handler(signal.SIGINT, self._stop.set)
        loop.add_signal_handler(signal.SIGHUP, self._reload)
        await self._pass("start")
        if self.last is None:
            # Fail closed: with no rule set there is nothing safe to serve. Kernel rules from
            # before stay in place; systemd restarts us (Restart=on-failure).
            log.error("start_failed", reason="the first reconcile pass failed; see reconcile_failed")
            await self._shutdown(remove_rules=False)
            return 1
        await self._start_listeners()
        if self.settings.daemon.metrics_listen is not None:
            host, port = self.settings.daemon.metrics_listen
            await m.serve(self.metrics.registry, host, port)
            log.info("metrics_listening", address=f"{host}:{port}")
        self.notifier.ready(self._status())
        log.info("daemon_ready", enforcers=[e.name for e in self.enforcers])
        try:
            async with asyncio.TaskGroup() as tg:
                tasks = [
                    tg.create_task(self._pass_loop()),
                    tg.create_task(watch(self.settings.policy_dir, self._wake.set, poll_s=self.settings.daemon.poll_s)),
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

    def _reload(self) -> None:
        self._reloading = True
        self.notifier.reloading()
        log.info("reload_requested", signal="SIGHUP")
        self._wake.set()

    async def _start_listeners(self) -> None:
        for e in self.enforcers:
            server = getattr(e, "server", None)
            if server is not None:
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

    async def _shutdown(self, *, remove_rules: bool) -> None:
        if remove_rules:
            for e in self.enforcers:
                try:
                    await e.apply(RuleSet.empty())
                except EnforcerError as exc:
                    log.error("remove_on_stop_failed", enforcer=e.name, error=str(exc))
        for e in self.enforcers:
            await e.aclose()
        log.info("daemon_stopped", kept_rules=not remove_rules)

    # -- passes -----------------------------------------------------------------------------
    async def _pass_loop(self) -> None:
        while True:
            timeout = None
            if self._boundary is not None:
                timeout = max(0.0, (self._boundary - datetime.now(timezone.utc)).total_seconds()) + 0.001
            try:
                await asyncio.wait_for(self._wake.wait(), timeout)
                reason = "change"
            except TimeoutError:
                reason = "time"  # a not_before or not_after was reached
            self._wake.clear()
            reloading, self._reloading = self._reloading, False
            await self._pass("reload" if reloading else reason)
            if reloading:
                self.notifier.ready(self._status())  # ends systemd's "reloading" state
            else:
                self.notifier.status(self._status())

    async def _pass(self, reason: str) -> None:
        t0 = time.perf_counter()
        try:
            async with self._apply_lock:
                result = await self.reconciler.run_pass(reason=reason)
        except Exception as e:  # noqa: BLE001 - the daemon must survive any pass; last good state stays
            self.metrics.reconcile.labels("error").inc()
            log.exception("reconcile_failed", reason=reason, error=str(e))
            return
        self.last = result
        self._boundary = result.next_boundary
        self._observe(result, time.perf_counter() - t0)
        if self.accountability is not None:
            self.accountability.after_pass(result)

    def _observe(self, r: PassResult, duration_s: float) -> None:
        mt = self.metrics
        mt.reconcile.labels("ok" if not r.failed else "partial").inc()
        mt.last_reconcile.set(time.time())
        for rej in r.rejected:
            mt.rejections.labels(rej.reason).inc()
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
        enforced = {}
        deadlines = {}
        for key, res in r.compilation.orders.items():
            ok = res.status in ("enforced", "partially_refused") and live
            enforced[(key,)] = 1 if ok else 0
            info = rs.orders.get(key)
            if info is not None and info.deadline is not None:
                deadlines[(key,)] = info.deadline.timestamp()
        m.replace_labels(mt.order_enforced, enforced)
        m.replace_labels(mt.order_deadline, deadlines)
        if r.changed:
            for p in r.policies:
                start = max(p.issued_at, self.reconciler.received.get(p.digest, p.issued_at))
                for name in r.applied:
                    mt.time_to_enforce.labels(name).observe(max(0.0, (now - start).total_seconds()))

    def _status(self) -> str:
        if self.last is None:
            return "starting"
        serials = ", ".join(f"{p.issuer}#{p.serial}" for p in self.last.policies) or "no policy"
        c = self.last.compilation.ruleset.counts()
        bad = f"; FAILING: {', '.join(sorted(self.last.failed))}" if self.last.failed else ""
        return (f"{serials}; {c['domain_exact'] + c['domain_subtree']} names, "
                f"{c['ipv4_ranges']} IPv4 + {c['ipv6_ranges']} IPv6 ranges{bad}")

    # -- periodic work ----------------------------------------------------------------------
    async def _drift_loop(self) -> None:
        """Read every enforcer back; re-apply where it no longer holds what it was given."""
        interval = self.settings.daemon.drift_check_s
        while True:
            await asyncio.sleep(interval)
            async with self._apply_lock:
                try:
                    if await self._check_drift():
                        self.metrics.last_reconcile.set(time.time())  # a full read-back that agrees
                except Exception as e:  # noqa: BLE001 - a periodic check must never stop the daemon
                    log.exception("drift_check_crashed", error=str(e))

    async def _check_drift(self) -> bool:
        """True when every enforcer was read back and holds (or again holds) what it should."""
        desired = self.reconciler.desired
        if desired is None or self.last is None:
            return False
        clean = True
        for e in self.enforcers:
            try:
                repaired = await check_and_repair(e, desired)
            except EnforcerError as exc:
                self.metrics.in_sync.labels(e.name).set(0)
                log.error("drift_check_failed", enforcer=e.name, errno=exc.errno, error=str(exc))
                clean = False
                continue
            self.metrics.in_sync.labels(e.name).set(1)
            if repaired is None:
                continue
            self.last.applied[e.name] = repaired
            self.metrics.drift_repairs.labels(e.name).inc()
            if self.accountability is not None:
                self.accountability.event("drift_repaired", enforcer=e.name, restored=repaired.digest,
                                          added=repaired.added, removed=repaired.removed)
        return clean

    async def _stats_loop(self, interval: float = 5.0) -> None:
        while True:
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
        assert self.accountability is not None
        while True:
            await asyncio.sleep(self.settings.daemon.attest_period_s)
            if self.last is None:
                continue
            async with self._apply_lock:
                try:
                    await self._refresh_readback()
                    self.accountability.attest(self.last, reason="periodic")
                except Exception as e:  # noqa: BLE001 - as above: log, keep running, retry next period
                    log.exception("attestation_failed", error=str(e))

    async def _refresh_readback(self) -> None:
        """Re-read every enforcer so a periodic attestation states what is held now."""
        assert self.last is not None
        for e in self.enforcers:
            try:
                held = await e.readback()
            except EnforcerError:
                continue
            prev = self.last.applied.get(e.name)
            if prev is not None:
                from dataclasses import replace

                self.last.applied[e.name] = replace(prev, digest=held.digest, counts=held.counts())


def run(settings: Settings) -> int:
    return asyncio.run(Daemon(settings).run())
