"""RPZ enforcer: RuleSet -> one zone, or one zone per authority or per order (`RpzSettings.layout`);
per zone the next version (serial + 1), journal delta, zone file, NOTIFY.

Every zone's serial is persisted in `state_file` before the new versions are served, so a restart
never serves different content under an old serial. A zone once served stays served (empty
when its authority has no rules left): a resolver configured for it keeps a valid, empty zone,
and the restriction it carried is withdrawn by a transfer like any other change.
`readback` parses the owner names being served in every zone.
"""

from __future__ import annotations

import asyncio
import time
from datetime import datetime, timezone
from typing import Any

import structlog

from blockd.dns import rpz
from blockd.dns.rpzserver import RpzServer
from blockd.errors import EnforcerError
from blockd.model import Applied, RuleSet

log = structlog.get_logger("blockd.enforcers.rpz")


class RpzEnforcer:
    def __init__(self, server: RpzServer, name: str = "rpz") -> None:
        self.name = name
        self.server = server
        state = rpz.load_state(server.settings.state_file)
        zones = state.get("zones")
        self._zones: dict[str, tuple[int, object]] = {}  # origin -> (serial, digest) as persisted
        if isinstance(zones, dict):
            for origin, z in zones.items():
                if isinstance(z, dict) and isinstance(z.get("serial"), int):
                    self._zones[origin] = (z["serial"], z.get("digest"))
        serial = state.get("serial", 0)
        if server.settings.origin not in self._zones:
            self._zones[server.settings.origin] = (serial if isinstance(serial, int) else 0, state.get("digest"))
        #: origins whose persisted serial/digest may restore content without a new serial
        self._restorable = set(self._zones)
        #: the read-back of the zone versions being served, computed once per set of versions
        #: (versions are immutable; at 1M names a read-back costs seconds)
        self._served: tuple[tuple[object, ...], RuleSet, datetime] | None = None

    @property
    def serial(self) -> int:
        """The default zone's serial."""
        return self._zones[self.server.settings.origin][0]

    def serials(self) -> dict[str, int]:
        return {origin: serial for origin, (serial, _) in self._zones.items()}

    def enforced(self, rs: RuleSet) -> RuleSet:
        """The part of `rs` these zones carry (names; addresses only with ip_triggers)."""
        if self.server.settings.ip_triggers:
            return rs
        return RuleSet.build(rs.domains, (), (), rs.orders)

    async def apply(self, desired: RuleSet, *args: Any, **kwargs: Any) -> Applied:
        """Serve `desired` (the whole state; extra arguments, such as a delta, are not needed)."""
        t0 = time.perf_counter()
        s = self.server.settings
        want = self.enforced(desired)
        parts = await asyncio.to_thread(rpz.partition, s, want)
        for origin in self._zones:  # zones served before stay served, empty if nothing is left
            parts.setdefault(origin, (None, RuleSet.empty()))
        parts.setdefault(s.origin, (None, RuleSet.empty()))
        changes: list[tuple[rpz.RpzSettings, rpz.ZoneVersion, rpz.ZoneVersion | None, bool]] = []
        zones = dict(self._zones)
        for origin, (key, part) in sorted(parts.items()):
            zs = rpz.for_zone(s, origin, key) if s.layout != "one" else s
            z = self.server.zone(origin)
            cur = z.version if z is not None else None
            new_owners = await asyncio.to_thread(rpz.owners, part, s.ip_triggers)
            serial, saved = zones.get(origin, (0, None))
            if cur is None and serial and saved == part.digest and origin in self._restorable:
                changes.append((zs, rpz.ZoneVersion(zs, serial, new_owners, part), None, False))
            elif cur is None or new_owners != cur.owners:
                serial = rpz.next_serial(serial)
                zones[origin] = (serial, part.digest)
                changes.append((zs, rpz.ZoneVersion(zs, serial, new_owners, part), cur, True))
        added = removed = 0
        if changes:
            try:
                if any(new for *_, new in changes):
                    await asyncio.to_thread(self._save, zones)
                for zs, version, _, new in changes:
                    if new and zs.zone_file:
                        await asyncio.to_thread(rpz.atomic_write, zs.zone_file, rpz.zone_text(zs, version))
                    if zs.zone_file and zs.zone_file_shards > 1:  # also when restored: a missing shard is written
                        await asyncio.to_thread(rpz.write_shards, zs, version)
            except OSError as e:
                raise EnforcerError(self.name, f"cannot write {e.filename!r}: {e.strerror}", errno=e.errno) from e
            self._zones = zones
            for zs, version, cur, new in changes:
                z = self.server.add_zone(zs)
                if cur is not None:
                    d = z.journal.record(cur, version)
                    added, removed = added + len(d.added), removed + len(d.deleted)
                elif new:
                    added += len(version.owners)
                z.version = version  # the swap: the next SOA/AXFR/IXFR of this zone sees the new serial
                self.server.notify_all(z)
                log.debug("rpz_zone_updated" if new else "rpz_zone_restored", enforcer=self.name,
                          zone=zs.origin, serial=version.serial, owners=len(version.owners))
        self._restorable.clear()
        served = await self.readback()
        at = self._served[2] if self._served is not None else datetime.now(timezone.utc)
        return Applied(enforcer=self.name, digest=served.digest, desired_digest=want.digest, added=added,
                       removed=removed, duration_s=time.perf_counter() - t0, counts=served.counts(),
                       readback_at=at, full_readback_at=at)

    def _save(self, zones: dict[str, tuple[int, object]]) -> None:
        s = self.server.settings
        if not s.state_file:
            return
        import json

        serial, digest = zones[s.origin]
        doc = {"serial": serial, "digest": digest,
               "zones": {o: {"serial": n, "digest": d} for o, (n, d) in sorted(zones.items())}}
        rpz.atomic_write(s.state_file, [json.dumps(doc) + "\n"])

    async def readback(self) -> RuleSet:
        versions = tuple(z.version for z in self.server.zones.values() if z.version is not None)
        if not versions:
            return RuleSet.empty()
        if self._served is None or self._served[0] != tuple(id(v) for v in versions):
            if len(versions) == 1:
                owners = versions[0].owners
            else:
                owners = frozenset().union(*(v.owners for v in versions))
            rs = await asyncio.to_thread(rpz.ruleset_from_owners, owners)
            self._served = (tuple(id(v) for v in versions), rs, datetime.now(timezone.utc))
        return self._served[1]

    async def aclose(self) -> None:
        await self.server.aclose()
