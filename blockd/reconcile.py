"""One reconcile pass: load -> verify -> select -> merge -> record -> apply every enforcer -> read back.

    context   trust store, signed catalog, guards data     a bad file is refused alone; the last
                                                           good catalog (or the state's copy) stays
    intake    the policy directory and the state's accepted copies, read and verified
    select    pure: per issuer the newest serial valid now that expands cleanly is in force; every
              file gets one status (active, pending, superseded, expired, rejected) and a reason;
              a policy that cannot expand is rejected alone and its issuer keeps the last good one
    merge     pure: the prepared policies in force -> one RuleSet with exact provenance, carried
              forward by delta (blockd.incremental): the change is known without a diff
    record    newly accepted policies (exactly the bytes verified) go to the state directory in one
              atomic commit before anything is applied, so a crash after this restores them
    apply     each enforcer diffs and commits atomically; one failing keeps its old state and
              does not stop the others
    readback  each Applied carries the read-back digest; in sync when it equals the desired one

A bad new input never disturbs what is enforced: the last good rule set stays live.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from datetime import datetime

import structlog

from blockd.clock import MonotonicWallClock
from blockd.compile import Baseline, Compilation, Hit, OrderCache, Prepared, prepare
from blockd.enforcers.base import Enforcer
from blockd.errors import BlockdError, EnforcerError
from blockd.incremental import Merger
from blockd.intake import (
    Context, InputFailure, ParseCache, Rejected, catalog_refusal, context_from_copy, load_context, policy_files,
    read_candidates, state_candidates, unexpandable_accepted,
)
from blockd.model import Applied, Change, Order, Plan, Policy, RuleDelta, RuleSet, diff, rule_delta
from blockd.selection import Selection, Verdict, newly_accepted, select
from blockd.settings import Settings
from blockd.state import StateStore

log = structlog.get_logger("blockd.reconcile")
BASELINE_EVERY_S = 60.0


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
    #: every file's status and reason (the selection's verdicts)
    verdicts: tuple[Verdict, ...] = ()
    #: context inputs refused in this pass (the last good ones are in use)
    input_failures: tuple[InputFailure, ...] = ()
    #: of those, the ones not seen in the pass before (logged, counted, audited once)
    new_input_failures: tuple[InputFailure, ...] = ()
    #: the state directory could not record newly accepted policies (they wait; retried)
    state_error: str | None = None


@dataclass
class Reconciler:
    settings: Settings
    enforcers: Sequence[Enforcer]
    ctx: Context | None = None
    desired: RuleSet | None = None
    received: dict[str, datetime] = field(default_factory=dict)  # policy digest -> first seen
    _rejected_seen: set[tuple[str, str]] = field(default_factory=set)
    _failures_seen: set[str] = field(default_factory=set)
    #: (policy digest, context key) -> Prepared: a policy whose bytes and context did not change
    #: is not expanded again
    _prepared: dict[tuple[str, str], Prepared] = field(default_factory=dict)
    #: set while a pass runs (background work of the enforcers waits for it: `DnsEnforcer.busy`)
    passing: threading.Event = field(default_factory=threading.Event)
    #: each order's expansion by its content (for one context), per policy digest: a new serial
    #: that changes one order expands only that one
    _order_entries: dict[str, tuple[str, Mapping[str, tuple[Order, Hit]]]] = field(default_factory=dict)
    _orders_key: str = ""
    #: parsed policies by (sha256, file, signers): an unchanged file is verified, not re-parsed
    _parsed: ParseCache = field(default_factory=ParseCache)
    #: the last merge and its inputs: a pass whose inputs did not change reuses the rule set
    _merged: tuple[object, Compilation] | None = None
    #: the merge, carried forward by delta (blockd.incremental)
    _merger: Merger = field(default_factory=Merger)
    #: seconds per phase of the pass in progress (`_Phases`), logged with it
    _phases: dict[str, float] = field(default_factory=dict)
    _phase: _Phases = field(default_factory=lambda: _Phases({}))
    #: the bytes of the directory's verified files in this pass, by digest (staged copies kept)
    _found_data: dict[str, bytes] = field(default_factory=dict)
    #: (the rule set it starts from, the change) when the last merge produced it
    _change: tuple[RuleSet, Change] | None = None
    _baseline_saved: float = float("-inf")
    #: why the last pass could not record newly accepted policies (None: it could)
    state_error: str | None = None
    clock: MonotonicWallClock | None = None
    #: enforcer -> the error its last apply failed with (logged once per outage)
    _apply_errors: dict[str, str] = field(default_factory=dict)
    #: the last context that expanded every accepted policy
    _good_ctx: Context | None = None

    def __post_init__(self) -> None:
        if self.clock is None:
            self.clock = MonotonicWallClock(self.settings.state_dir / "clock.json", latest_acceptance(self.settings))

    def now(self) -> datetime:
        """The time windows are judged at: the wall clock, never stepping back (blockd.clock)."""
        assert self.clock is not None
        return self.clock.now()

    def refresh_context(self) -> list[InputFailure]:
        """Reload trust store and catalog; a bad file is refused and the last good ones stay.

        The state's copy of the catalog is written only once a pass has shown that the
        catalog still expands every accepted policy (see `_guard_accepted`)."""
        self.ctx, failures = load_context(self.settings, self.ctx, save=False)
        return failures

    def _guard_accepted(self, ctx: Context, sel: Selection, now: datetime,
                        failures: list[InputFailure]) -> tuple[Context, Selection]:
        """A catalog that loads cleanly but cannot expand an accepted policy (a service dropped
        or renamed by a signed update, a file removed) is refused like a bad one: the last
        good catalog stays, so what is enforced is not unblocked by a catalog change."""
        broken = unexpandable_accepted(sel, ctx.state.accepted_serials())
        if broken is None:
            if ctx.origin == "live" and ctx.files is not None:
                try:
                    ctx.state.save_context_copy(ctx.files)
                    if not ctx.store.refused:
                        ctx.state.save_trust_copy(self.settings.trust_store, ctx.store.digest)
                except OSError as e:
                    failures.append(InputFailure("state", str(ctx.state.directory),
                                                 f"cannot save the catalog's copy: {e.strerror}"))
            self._good_ctx = ctx
            return ctx, sel
        good = self._good_ctx if self._good_ctx is not None and self._good_ctx.key != ctx.key else None
        good = good or context_from_copy(self.settings, ctx.store, ctx.state)
        if good is None or good.key == ctx.key:
            return ctx, sel  # nothing better to fall back to: the refusals stand, and are reported
        failures.append(catalog_refusal(broken, good.origin))
        return good, self.select(good, now)

    async def run_pass(self, now: datetime | None = None, reason: str = "change") -> PassResult:
        self.passing.set()
        try:
            return await self._run_pass(now, reason)
        finally:
            self.passing.clear()

    async def _run_pass(self, now: datetime | None, reason: str) -> PassResult:
        now = now or self.now()
        t0 = time.perf_counter()
        # Verification and compilation are CPU work: off the event loop, which keeps answering
        # DNS and pinging the watchdog meanwhile.
        self._phases = {}
        sel, comp, failures = await asyncio.to_thread(self._prepare, now)
        desired = comp.ruleset
        changed = self.desired is None or desired.digest != self.desired.digest
        t_apply = time.perf_counter()
        applied, failed = await self.apply_all(desired)
        self._phases["apply"] = time.perf_counter() - t_apply
        self.desired = desired
        if not failed and changed:
            await self._save_baseline(desired)
        rejected = [Rejected(v.source, v.error, v.kind, v.digest) for v in sel.with_status("rejected")
                    if v.error is not None]
        # Report each (file, reason) once, not on every pass while the file lies there.
        new = tuple(r for r in rejected if (r.path, str(r.error)) not in self._rejected_seen)
        self._rejected_seen = {(r.path, str(r.error)) for r in rejected}
        for r in new:
            log.warning("policy_rejected", path=r.path, reason=r.reason, error=str(r.error))
        new_failures = tuple(f for f in failures if str(f) not in self._failures_seen)
        self._failures_seen = {str(f) for f in failures}
        for f in new_failures:
            log.error("input_refused", input=f.input, where=f.where, error=f.message)
        in_force = sel.in_force
        pending = tuple(v.policy for v in sel.with_status("pending") if v.policy is not None)
        if self.clock is not None:
            self.clock.save()
        log.info("reconcile_pass", reason=reason, digest=desired.digest[:16], changed=changed,
                 policies=len(in_force), pending=len(pending), rejected=len(new), failed=sorted(failed),
                 duration_s=round(time.perf_counter() - t0, 4),
                 phases_s={k: round(v, 4) for k, v in self._phases.items()}, **desired.counts())
        return PassResult(comp, in_force, pending, new, applied, failed, changed,
                          sel.next_boundary(now), {p.digest: self.received.get(p.digest, now) for p in in_force},
                          sel.verdicts, tuple(failures), new_failures, self.state_error)

    def _prepare(self, now: datetime) -> tuple[Selection, Compilation, list[InputFailure]]:
        phase = self._phase = _Phases(self._phases)
        failures = self.refresh_context()
        assert self.ctx is not None
        ctx = self.ctx
        phase("context")
        sel = self.select(ctx, now)
        ctx, sel = self._guard_accepted(ctx, sel, now, failures)
        # merged before it is recorded, beside the state copy's write (`StateStore.stage`): nothing is
        # applied before the record succeeds, and a failed record merges what is held back
        comp = self._merge(ctx, sel)
        try:
            self._record(ctx, sel, now)
            phase("record")
            self.state_error = None
        except OSError as e:
            # Nothing new is applied before it is recorded (a crash would otherwise forget it):
            # the issuers keep their accepted policies, the new ones wait, the daemon retries.
            self.state_error = f"{e.strerror or e}: {e.filename or ctx.state.directory}"
            accepted = ctx.state.accepted_serials()
            held: dict[str, Verdict] = {}
            while new := [v for v in newly_accepted(sel, accepted) if v.digest not in held]:
                # hold back every unrecorded candidate, not only the newest: an older file that
                # is not recorded either must not come into force in its place
                held.update({v.digest: v for v in new if v.digest is not None})
                sel = self.select(ctx, now, hold_back=held, why=self.state_error)
            failures = [*failures, InputFailure("state", str(ctx.state.directory),
                                                f"cannot record newly accepted policies ({self.state_error}); they "
                                                f"are not enforced until it succeeds")]
            comp = self._merge(ctx, sel)
        # a staged copy stays only for a serial that may still come into force (committed ones
        # are gone from it already; a file is read, and so staged, when it is new or changed)
        ctx.state.discard_staged(keep=[self._found_data[v.digest] for v in sel.with_status("pending")
                                       if v.digest in self._found_data])
        for v in sel.with_status("active", "pending"):  # first seen: time-to-enforce counts from here
            if v.digest is not None:
                self.received.setdefault(v.digest, now)
        return sel, comp, failures

    def _merge(self, ctx: Context, sel: Selection) -> Compilation:
        """The rule set of a selection: by delta from the last merge (the same inputs: the same
        one); the change is kept for the enforcers when it starts from what they hold."""
        statuses, policy_statuses = sel.order_statuses(), sel.policy_statuses()
        key = (ctx.key, tuple((p.policy.digest, p.policy.source) for p in sel.prepared),
               tuple(sorted(statuses.items())), tuple(sorted(policy_statuses.items())))
        if self._merged is not None and self._merged[0] == key:
            return self._merged[1]  # the same inputs: the same rule set, not merged again
        baseline = ctx.state.baseline() if self.desired is None else self.desired
        before = self._merger.comp.ruleset if self._merger.comp is not None else None
        self._phase("statuses")
        comp, plan, removed, added = self._merger.update(sel.prepared, ctx.compile, baseline, statuses,
                                                         policy_statuses)
        self._phase("merge")
        # The merge by delta knows the change already: no O(N) diff of the rule sets.
        self._change = (before, Change(before.digest, plan, removed, added)) \
            if before is not None and plan is not None else None
        self._merged = (key, comp)
        return comp

    def select(self, ctx: Context, now: datetime, *, hold_back: dict[str, Verdict] | None = None,
               why: str = "") -> Selection:
        """The selection over the policy directory and the state; `hold_back` (by digest) are
        verified files that cannot be recorded yet: they are pending, with `why`."""
        directory = policy_files(self.settings.policy_dir) if self.settings.policy_dir.is_dir() else []
        accepted = ctx.state.accepted_serials()
        # a large file read (new or changed) is written aside at once; not on the first pass,
        # which reads every file (most of them the accepted ones: written for nothing)
        self._parsed.on_read = ctx.state.stage if self.desired is not None else None
        try:
            found, bad = read_candidates(directory, ctx, self._parsed)
        finally:
            self._parsed.on_read = None
        self._found_data = {c.policy.digest: c.signed.data for c in found}
        if hold_back:
            found = [c for c in found if c.policy.digest not in hold_back]
        kept, kept_bad = state_candidates(ctx, self._parsed)
        self._phase("read")
        cache = {k: v for k, v in self._prepared.items() if k[1] == ctx.key}

        if self._orders_key != ctx.key:  # a new catalog or guards: every order is expanded again
            self._order_entries, self._orders_key = {}, ctx.key
        used: set[str] = set()

        def prepared(p: Policy) -> Prepared:
            key = (p.digest, ctx.key)
            hit = cache.get(key)
            if hit is not None and hit.policy.source != p.source:
                # The same bytes under another name (the state's copy while the directory's file
                # is refused or gone, or back): the same orders, the same contribution, in O(1);
                # it replaces the one of that digest with no order changed.
                hit = cache[key] = replace(hit, policy=p, prior=hit.policy.digest, changed=frozenset())
            if hit is None:
                # The orders expanded for this issuer's policies kept so far (an order key names
                # its issuer: another issuer's orders can never match); the policy in force last,
                # so that its entries win, and it is the prior the new one says its changes from.
                in_force = next((x for x in self._merger.prepared if x.policy.issuer == p.issuer), None)
                mine = [(d, entries) for d, (issuer, entries) in self._order_entries.items() if issuer == p.issuer]
                mine.sort(key=lambda e: in_force is not None and e[0] == in_force.policy.digest)
                reuse: Mapping[str, tuple[Order, Hit]] = mine[0][1] if len(mine) == 1 else {}
                if len(mine) > 1:
                    reuse = {k: v for _, entries in mine for k, v in entries.items()}
                prior = None
                if in_force is not None and in_force.policy.digest != p.digest and mine and \
                        mine[-1][0] == in_force.policy.digest:
                    prior = (in_force, mine[-1][1])
                own: OrderCache = {}
                hit = cache[key] = prepare(p, ctx.catalog, ctx.compile.guards, reuse, into=own, prior=prior)
                self._order_entries[p.digest] = (p.issuer, hit.entries if hit.entries is not None else own)
            used.add(p.digest)
            return hit

        sel = select([*found, *kept], [*bad, *kept_bad], accepted, now, prepared)
        self._phase("prepare")
        if hold_back:
            waiting = tuple(replace(v, status="pending", kind="state", reason=f"verified, not in force until the state "
                                    f"directory records it ({why}); retrying") for v in hold_back.values())
            sel = Selection(sel.prepared, tuple(sorted(sel.verdicts + waiting,
                                                       key=lambda v: (v.issuer or "", v.serial or 0, v.source))))
        # only the orders of policies looked at in this pass stay cached
        self._order_entries = {d: e for d, e in self._order_entries.items() if d in used}
        live = {p.policy.digest for p in sel.prepared} | {v.digest for v in sel.verdicts if v.status == "pending"}
        self._prepared = {k: v for k, v in cache.items() if k[0] in live}
        # Keep the parses of the files that are still there (whatever their status: an old
        # serial left in the directory is read on every pass).
        present = {(v.digest, v.source) for v in sel.verdicts}
        present |= {(c.policy.digest, c.policy.source) for c in (*found, *kept)}
        self._parsed.retain(present)
        return sel

    def _record(self, ctx: Context, sel: Selection, now: datetime) -> None:
        """One atomic commit of the policies newly in force, with exactly the bytes verified."""
        entries = [(v.policy, v.signed) for v in newly_accepted(sel, ctx.state.accepted_serials())]
        if entries:
            done = ctx.state.commit(entries, now)
            for rec, (p, signed) in zip(done, entries):  # the next pass knows them, no verify
                self._parsed.own_copy(ctx.state.directory / rec.file, ctx.store, ctx.settings.max_policy_bytes, p, signed)
            for p, _ in entries:
                log.info("policy_accepted", issuer=p.issuer, serial=p.serial, digest=p.digest[:16],
                         orders=len(p.orders))

    async def _save_baseline(self, desired: RuleSet) -> None:
        """Persist the growth guard's baseline, at most once a minute (it lists every order:
        O(N) to write, so not on every small change; a restart guards against one a minute old)."""
        if self.ctx is None or time.monotonic() - self._baseline_saved < BASELINE_EVERY_S:
            return
        state = self.ctx.state
        try:
            await asyncio.to_thread(lambda: state.save_baseline(Baseline.of(desired)))
            self._baseline_saved = time.monotonic()
        except OSError as e:
            log.error("baseline_write_failed", path=str(state.directory), error=e.strerror)

    async def apply_all(self, desired: RuleSet) -> tuple[dict[str, Applied], dict[str, str]]:
        """Apply `desired` everywhere, with the change from the last rule set (diffed once, here,
        for every enforcer): an enforcer that holds that rule set commits only the change."""
        applied: dict[str, Applied] = {}
        failed: dict[str, str] = {}
        change = None
        if self.desired is not None:
            if self.desired.digest == desired.digest:
                change = Change(desired.digest, Plan((), (), (), (), (), ()), RuleDelta(), RuleDelta())
            elif self._change is not None and self._change[0] is self.desired:
                change = self._change[1]
            else:
                change = await asyncio.to_thread(full_change, self.desired, desired)
        async def one(enforcer: Enforcer) -> Applied | EnforcerError:
            try:
                return await enforcer.apply(desired, change)
            except EnforcerError as e:
                return e

        # The enforcers are independent backends: applied side by side (one's kernel time or
        # disk wait overlaps another's work), reported in their configured order.
        results = await asyncio.gather(*(one(e) for e in self.enforcers))
        for enforcer, result in zip(self.enforcers, results):
            if isinstance(result, EnforcerError):
                e = result
                failed[enforcer.name] = str(e)
                # Once per outage (the daemon retries with backoff; the metric counts every try).
                if self._apply_errors.get(enforcer.name) != str(e):
                    log.error("apply_failed", enforcer=enforcer.name, errno=e.errno, error=str(e))
                else:
                    log.debug("apply_failed_again", enforcer=enforcer.name, errno=e.errno)
                self._apply_errors[enforcer.name] = str(e)
                continue
            if self._apply_errors.pop(enforcer.name, None) is not None:
                log.info("apply_recovered", enforcer=enforcer.name)
            applied[enforcer.name] = result
            log.info("ruleset_applied", enforcer=enforcer.name, added=result.added, removed=result.removed,
                     in_sync=result.in_sync, duration_s=round(result.duration_s, 4))
        return applied, failed



def full_change(current: RuleSet, desired: RuleSet) -> Change:
    removed, added = rule_delta(current, desired)
    return Change(current.digest, diff(current, desired), removed, added)


def latest_acceptance(settings: Settings) -> datetime | None:
    """The latest `accepted_at` in the state: that time has passed, whatever the clock says."""
    try:
        times = [datetime.fromisoformat(a.accepted_at.replace("Z", "+00:00"))
                 for a in StateStore(settings.state_dir).accepted().values()]
    except (BlockdError, ValueError, OSError):
        return None
    return max(times, default=None)


class _Phases:
    """Where a pass spent its time (seconds per phase, in the pass's log line): `phase(name)`
    records the time since the last call."""

    def __init__(self, into: dict[str, float]) -> None:
        self.into = into
        self.t = time.perf_counter()

    def __call__(self, name: str) -> None:
        t = time.perf_counter()
        self.into[name] = self.into.get(name, 0.0) + t - self.t
        self.t = t
