"""Drift repair for any Enforcer: (enforcer, desired RuleSet) -> read back, re-apply if they differ.

Someone may flush a set or delete the table behind blockd's back. `check_and_repair` reads
what the backend really holds, and if its digest differs from what it should hold, applies
the desired state again and logs `drift_repaired` with how much was missing and extra.
`readback` also refreshes the enforcer's view of the kernel, so the re-apply diffs against
the real state, not against what blockd last wrote.

An enforcer holds only its part of a RuleSet (kernel sets hold addresses, the sinkhole holds
names): `enforcer.enforced(desired)`; the comparison uses that part.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

import structlog

from blockd.enforcers.base import Enforcer
from blockd.errors import EnforcerError
from blockd.model import Applied, RuleSet, diff

log = structlog.get_logger("blockd.enforcers.drift")


async def check_and_repair(enforcer: Enforcer, desired: RuleSet, held: RuleSet | None = None) -> Applied | None:
    """The repair's Applied if the backend had drifted, None if it held its part of `desired`;
    EnforcerError if it could not be repaired. `held`: a read-back just taken (else one is)."""
    t0 = time.perf_counter()
    want = enforcer.enforced(desired)
    if held is None:
        held = await enforcer.readback()
    if held.digest == want.digest:
        log.debug("drift_checked", enforcer=enforcer.name, in_sync=True)
        return None
    plan = diff(held, want)
    applied = await enforcer.apply(desired)
    if not applied.in_sync:
        raise EnforcerError(enforcer.name, f"drift repair left digest {applied.digest} != {applied.desired_digest}")
    log.warning("drift_repaired", enforcer=enforcer.name, missing=plan.added, extra=plan.removed,
                duration_s=round(time.perf_counter() - t0, 4))
    return applied


async def drift_loop(enforcer: Enforcer, desired: Callable[[], RuleSet | None], interval_s: float) -> None:
    """Every `interval_s`, check and repair against `desired()` (None: nothing applied yet).

    Runs until cancelled. A failed check is logged and retried at the next tick: the
    previous state is still in force, and the next tick may succeed.
    """
    while True:
        current = desired()
        if current is not None:
            try:
                await check_and_repair(enforcer, current)
            except EnforcerError as exc:
                log.error("drift_check_failed", enforcer=enforcer.name, errno=exc.errno, error=str(exc))
        await asyncio.sleep(interval_s)
