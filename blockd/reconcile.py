"""One reconcile pass: load -> verify -> compile -> apply every enforcer -> read back -> record.

    context   trust store, signed catalog, guards data        (a bad catalog keeps the last good one)
    intake    the policy directory and the state's accepted copies, verified and replay-checked;
              per issuer the newest policy valid now is in force
    compile   pure; a policy that names unknown services is rejected and the rest recompiled
    record    newly accepted policies go to the state directory before anything is applied, so a
              crash after this point restores them (fail closed)
    apply     each enforcer diffs and commits atomically; one failing keeps its old state and
              does not stop the others
    readback  each Applied carries the read-back digest; in sync when it equals the desired one

A bad new policy never disturbs what is enforced: the last good rule set stays live.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import structlog

from blockd import trust
from blockd.compile import Compilation, compile_policies
from blockd.enforcers.base import Enforcer
from blockd.errors import BlockdError, EnforcerError, InputError, PolicyError
from blockd.intake import Context, Rejected, load_context, policy_files, read_policies
from blockd.model import Applied, Policy, RuleSet
from blockd.policy import check_window, load_policy
from blockd.settings import Settings

log = structlog.get_logger("blockd.reconcile")


@dataclass(frozen=True, slots=True)
class PassResult:
    compilation: Compilation
    policies: tuple[Policy, ...]  # in force
    pending: tuple[Policy, ...]  # verified, waiting for not_before
    rejected: tuple[Rejected, ...]  # new rejections in this pass
    applied: dict[str, Applied]
    failed: dict[str, str]
    changed: bool
    #: when the set of policies in force changes by the clock alone (a not_before or not_after)
    next_boundary: datetime | None
    #: policy digest -> when its file was first seen
    received: dict[str, datetime]


@dataclass
class Reconciler:
    settings: Settings
    enforcers: Sequence[Enforcer]
    ctx: Context | None = None
    desired: RuleSet | None = None
    received: dict[str, datetime] = field(default_factory=dict)  # policy digest -> first seen
    _rejected_seen: set[tuple[str, str]] = field(default_factory=set)

    def refresh_context(self) -> None:
        """Reload trust store and catalog; on error keep the last good ones (if any)."""
        try:
            self.ctx = load_context(self.settings)
        except BlockdError as e:
            if self.ctx is None:
                raise
            log.error("context_reload_failed", error=str(e))

    async def run_pass(self, now: datetime | None = None, reason: str = "change") -> PassResult:
        now = now or datetime.now(timezone.utc)
        t0 = time.perf_counter()
        # Verification and compilation are CPU work: off the event loop, which keeps answering
        # DNS and pinging the watchdog meanwhile.
        _, comp, in_force, pending, rejected = await asyncio.to_thread(self._prepare, now)
        desired = comp.ruleset
        changed = self.desired is None or desired.digest != self.desired.digest
        applied, failed = await self.apply_all(desired)
        self.desired = desired
        # Report each (file, reason) once, not on every pass while the file lies there.
        new = tuple(r for r in rejected if (r.path, r.reason) not in self._rejected_seen)
        self._rejected_seen = {(r.path, r.reason) for r in rejected}
        for r in new:
            log.warning("policy_rejected", path=r.path, reason=r.reason, error=str(r.error))
        log.info("reconcile_pass", reason=reason, digest=desired.digest[:16], changed=changed,
                 policies=len(in_force), pending=len(pending), rejected=len(new), failed=sorted(failed),
                 duration_s=round(time.perf_counter() - t0, 4), **desired.counts())
        return PassResult(comp, tuple(in_force), tuple(pending), new, applied, failed, changed,
                          _next_boundary(in_force, pending, now),
                          {p.digest: self.received[p.digest] for p in in_force})

    def _prepare(self, now: datetime) -> tuple[Context, Compilation, list[Policy], list[Policy], list[Rejected]]:
        self.refresh_context()
        assert self.ctx is not None
        ctx = self.ctx
        in_force, pending, rejected = self._intake(ctx, now)
        comp, in_force, more = self._compile(ctx, in_force, now)
        for p in in_force:
            self._record_if_new(ctx, p, now)
        return ctx, comp, in_force, pending, rejected + more

    def _intake(self, ctx: Context, now: datetime) -> tuple[list[Policy], list[Policy], list[Rejected]]:
        directory = policy_files(self.settings.policy_dir) if self.settings.policy_dir.is_dir() else []
        intake = read_policies(directory, ctx, now)
        rejected = list(intake.rejected)
        newest: dict[str, Policy] = {}
        for p in intake.accepted:
            if p.issuer not in newest or p.serial > newest[p.issuer].serial:
                newest[p.issuer] = p
        # The state's copies: what was accepted before, still in force unless replaced.
        for path in ctx.state.accepted_paths():
            try:
                p = load_policy(path, ctx.store)
                check_window(p, now)
            except BlockdError as e:
                rejected.append(Rejected(str(path), e))
                continue
            if p.issuer not in newest or p.serial > newest[p.issuer].serial:
                newest[p.issuer] = p
        for p in newest.values():
            self.received.setdefault(p.digest, now)
        for p in intake.pending:
            self.received.setdefault(p.digest, now)
        return sorted(newest.values(), key=lambda p: p.issuer), list(intake.pending), rejected

    def _compile(self, ctx: Context, policies: list[Policy], now: datetime
                 ) -> tuple[Compilation, list[Policy], list[Rejected]]:
        """Compile; a policy that cannot expand (unknown service, ASN) is rejected alone."""
        rejected: list[Rejected] = []
        while True:
            try:
                return compile_policies(policies, ctx.catalog, ctx.compile, now, previous=self.desired), policies, rejected
            except PolicyError as e:
                culprit = next((p for p in policies if _names(e, p.source)), None)
                if culprit is None:
                    raise
                rejected.append(Rejected(culprit.source, e))
                policies = [p for p in policies if p is not culprit]

    def _record_if_new(self, ctx: Context, policy: Policy, now: datetime) -> None:
        acc = ctx.state.accepted().get(policy.issuer)
        if acc is not None and acc.serial == policy.serial:
            return
        path = Path(policy.source)
        sigs = [(str(s), s.read_bytes()) for s in trust.signature_paths(path)]
        ctx.state.record(policy, path.read_bytes(), sigs, now)
        log.info("policy_accepted", issuer=policy.issuer, serial=policy.serial, digest=policy.digest[:16],
                 orders=len(policy.orders))

    async def apply_all(self, desired: RuleSet) -> tuple[dict[str, Applied], dict[str, str]]:
        applied: dict[str, Applied] = {}
        failed: dict[str, str] = {}
        for enforcer in self.enforcers:
            try:
                result = await enforcer.apply(desired)
            except EnforcerError as e:
                failed[enforcer.name] = str(e)
                log.error("apply_failed", enforcer=enforcer.name, errno=e.errno, error=str(e))
                continue
            applied[enforcer.name] = result
            log.info("ruleset_applied", enforcer=enforcer.name, added=result.added, removed=result.removed,
                     in_sync=result.in_sync, duration_s=round(result.duration_s, 4))
        return applied, failed


def _names(error: InputError, source: str) -> bool:
    wheres = [error.where] + [p.where for p in error.problems]
    return any(w.startswith(source) for w in wheres if w)


def _next_boundary(in_force: Sequence[Policy], pending: Sequence[Policy], now: datetime) -> datetime | None:
    times = [p.not_after for p in in_force if p.not_after > now] + [p.not_before for p in pending if p.not_before > now]
    return min(times, default=None)
