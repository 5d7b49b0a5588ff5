"""Sinkhole enforcer: RuleSet -> a new lookup Table, built off to the side, swapped in one step.

`readback` rebuilds a RuleSet from the table the server is answering from right now, so the
attested digest is that of what is served, not of what was asked for.
"""

from __future__ import annotations

import asyncio
import time

import structlog

from blockd.dns.server import SinkholeServer
from blockd.dns.table import Table
from blockd.errors import EnforcerError
from blockd.model import Applied, RuleSet, diff

log = structlog.get_logger("blockd.enforcers.dns")


class SinkholeEnforcer:
    def __init__(self, server: SinkholeServer, name: str = "dns") -> None:
        self.name = name
        self.server = server
        self._held = server.table.to_ruleset()
        self.last_load_s = 0.0

    async def apply(self, desired: RuleSet) -> Applied:
        t0 = time.perf_counter()
        want = RuleSet.build(desired.domains, (), (), desired.orders)  # the sinkhole holds names only
        plan = diff(self._held, want)
        if plan.empty and self.server.table.digest == want.digest:
            table = self.server.table
        else:
            try:
                # Built in a worker thread: the event loop keeps answering from the old table.
                table = await asyncio.to_thread(Table.build, want, self.server.answer_settings)
            except (ValueError, KeyError, UnicodeError) as e:
                raise EnforcerError(self.name, f"cannot build the lookup table: {e}") from e
            self.server.swap(table)
        self.last_load_s = time.perf_counter() - t0
        served = await asyncio.to_thread(table.to_ruleset)
        self._held = served
        applied = Applied(
            enforcer=self.name,
            digest=served.digest,
            desired_digest=want.digest,  # names only: addresses are the kernel's
            added=plan.added,
            removed=plan.removed,
            duration_s=time.perf_counter() - t0,
            counts=served.counts(),
        )
        log.debug("dns_table_swapped", enforcer=self.name, names=len(table), load_s=round(self.last_load_s, 3))
        return applied

    async def readback(self) -> RuleSet:
        return await asyncio.to_thread(self.server.table.to_ruleset)

    async def aclose(self) -> None:
        await self.server.aclose()
