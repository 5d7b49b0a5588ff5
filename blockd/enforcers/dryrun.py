"""An enforcer that holds the RuleSet in memory and changes nothing else.

Used by `blockd plan`, and as the fake that implements the real interface in tests.
"""

from __future__ import annotations

import time
from datetime import datetime, timezone

import structlog

from blockd.model import Applied, Change, RuleSet, diff

log = structlog.get_logger("blockd.enforcers.dryrun")


class DryRunEnforcer:
    def __init__(self, name: str = "dryrun") -> None:
        self.name = name
        self._held = RuleSet.empty()
        self.last_plan = diff(self._held, self._held)

    def enforced(self, desired: RuleSet) -> RuleSet:
        return desired

    async def apply(self, desired: RuleSet, change: Change | None = None) -> Applied:
        t0 = time.perf_counter()
        # The reconciler's plan is used only when it starts from exactly what is held.
        plan = change.plan if change is not None and change.base == self._held.digest else diff(self._held, desired)
        self.last_plan = plan
        self._held = RuleSet.build(desired.domains, desired.v4, desired.v6)
        log.debug("plan", enforcer=self.name, added=plan.added, removed=plan.removed)
        return Applied(
            enforcer=self.name,
            digest=self._held.digest,
            desired_digest=desired.digest,
            added=plan.added,
            removed=plan.removed,
            duration_s=time.perf_counter() - t0,
            counts=self._held.counts(),
            readback_at=(at := datetime.now(timezone.utc)),
            full_readback_at=at,
        )

    async def readback(self) -> RuleSet:
        return self._held

    async def aclose(self) -> None:
        return None
