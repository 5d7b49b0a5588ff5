"""RPZ enforcer: RuleSet -> next zone version (serial + 1), journal delta, zone file, NOTIFY.

The serial is persisted in `state_file` before the new version is served, so a restart never
serves different content under an old serial. `readback` parses the owner names being served.
"""

from __future__ import annotations

import asyncio
import time
from datetime import datetime, timezone

import structlog

from blockd.dns import rpz
from blockd.dns.rpzserver import RpzServer
from blockd.errors import EnforcerError
from blockd.model import Applied, Change, RuleSet

log = structlog.get_logger("blockd.enforcers.rpz")


class RpzEnforcer:
    def __init__(self, server: RpzServer, name: str = "rpz") -> None:
        self.name = name
        self.server = server
        state = rpz.load_state(server.settings.state_file)
        serial = state.get("serial", 0)
        self._serial = serial if isinstance(serial, int) else 0
        #: digest of what `_serial` carried before a restart: the same content keeps its serial,
        #: so secondaries that hold it need no transfer at all
        self._saved_digest = state.get("digest")
        #: the read-back of the zone version being served, computed once per version (versions
        #: are immutable; at 1M names a read-back costs seconds)
        self._served: tuple[object, RuleSet, datetime] | None = None

    @property
    def serial(self) -> int:
        return self._serial

    def enforced(self, rs: RuleSet) -> RuleSet:
        """The part of `rs` this zone carries (names; addresses only with ip_triggers)."""
        if self.server.settings.ip_triggers:
            return rs
        return RuleSet.build(rs.domains, (), (), rs.orders)

    async def apply(self, desired: RuleSet, change: Change | None = None) -> Applied:
        """`change` is not used: the zone is compared with the version served."""
        t0 = time.perf_counter()
        s = self.server.settings
        want = self.enforced(desired)
        cur = self.server.version
        new_owners = await asyncio.to_thread(rpz.owners, want, s.ip_triggers)
        added = removed = 0
        if cur is None and self._serial and self._saved_digest == want.digest:
            self.server.version = rpz.ZoneVersion(s, self._serial, new_owners, want)
            self.server.notify_all()
            log.debug("rpz_zone_restored", enforcer=self.name, serial=self._serial, owners=len(new_owners))
        elif cur is None or new_owners != cur.owners:
            serial = rpz.next_serial(self._serial)
            version = rpz.ZoneVersion(s, serial, new_owners, want)
            try:
                await asyncio.to_thread(rpz.save_state, s.state_file, serial, want.digest)
                if s.zone_file:
                    await asyncio.to_thread(rpz.atomic_write, s.zone_file, rpz.zone_text(s, version))
            except OSError as e:
                raise EnforcerError(self.name, f"cannot write {e.filename!r}: {e.strerror}", errno=e.errno) from e
            if cur is not None:
                d = self.server.journal.record(cur, version)
                added, removed = len(d.added), len(d.deleted)
            else:
                added = len(new_owners)
            self._serial = serial
            self.server.version = version  # the swap: the next SOA/AXFR/IXFR sees the new serial
            self.server.notify_all()
            log.debug("rpz_zone_updated", enforcer=self.name, serial=serial, owners=len(new_owners))
        served = await self.readback()
        at = self._served[2] if self._served is not None else datetime.now(timezone.utc)
        return Applied(enforcer=self.name, digest=served.digest, desired_digest=want.digest, added=added,
                       removed=removed, duration_s=time.perf_counter() - t0, counts=served.counts(),
                       readback_at=at, full_readback_at=at)

    async def readback(self) -> RuleSet:
        v = self.server.version
        if v is None:
            return RuleSet.empty()
        if self._served is None or self._served[0] is not v:
            self._served = (v, await asyncio.to_thread(rpz.ruleset_from_owners, v.owners), datetime.now(timezone.utc))
        return self._served[1]

    async def aclose(self) -> None:
        await self.server.aclose()
