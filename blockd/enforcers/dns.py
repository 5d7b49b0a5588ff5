"""Sinkhole enforcer: RuleSet -> a new lookup Table, built off to the side, swapped in one step.

`readback` rebuilds a RuleSet from the table the server is answering from right now, so the
attested digest is that of what is served, not of what was asked for.
"""

from __future__ import annotations

import asyncio
import time
from datetime import datetime, timezone

import structlog

from blockd.dns.server import SinkholeServer
from blockd.dns.table import Table
from blockd.errors import EnforcerError
from blockd.model import Applied, Change, RuleSet

log = structlog.get_logger("blockd.enforcers.dns")


class SinkholeEnforcer:
    def __init__(self, server: SinkholeServer, name: str = "dns") -> None:
        self.name = name
        self.server = server
        self.last_load_s = 0.0

    @staticmethod
    def enforced(desired: RuleSet) -> RuleSet:
        """The sinkhole holds names only; the addresses are the kernel enforcers' job."""
        return desired if not (desired.v4 or desired.v6) else RuleSet.build(desired.domains, (), (), desired.orders)

    async def apply(self, desired: RuleSet, change: Change | None = None) -> Applied:
        """`change` is not used yet: the table is rebuilt from `desired` (a patch is issue 14's
        next step), and `_changes` counts what differs from the table served."""
        t0 = time.perf_counter()
        want = self.enforced(desired)
        old = self.server.table
        added = removed = 0
        if old.digest != want.digest:
            try:
                # Built in a worker thread: the event loop keeps answering from the old table.
                table = await asyncio.to_thread(Table.build, want, self.server.answer_settings)
            except (ValueError, KeyError, UnicodeError) as e:
                raise EnforcerError(self.name, f"cannot build the lookup table: {e}") from e
            self.server.swap(table)
            self.last_load_s = time.perf_counter() - t0
            added, removed = await asyncio.to_thread(_changes, old, table)
        # No RuleSet is kept here: at 1M names it would double the daemon's memory.
        served = await self.readback()
        at = datetime.now(timezone.utc)
        log.debug("dns_table_swapped", enforcer=self.name, names=len(self.server.table),
                  load_s=round(self.last_load_s, 3))
        return Applied(
            enforcer=self.name,
            digest=served.digest,
            desired_digest=want.digest,
            added=added,
            removed=removed,
            duration_s=time.perf_counter() - t0,
            counts=served.counts(),
            readback_at=at,
            full_readback_at=at,
        )

    async def readback(self) -> RuleSet:
        return await asyncio.to_thread(self.server.table.to_ruleset)

    async def aclose(self) -> None:
        await self.server.aclose()


def _changes(old: Table, new: Table) -> tuple[int, int]:
    """(added, removed) rules between two tables, from their keys."""
    added = len(new.exact.keys() - old.exact.keys()) + len(new.subtree.keys() - old.subtree.keys())
    removed = len(old.exact.keys() - new.exact.keys()) + len(old.subtree.keys() - new.subtree.keys())
    return added, removed
