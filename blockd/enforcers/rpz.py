"""RPZ enforcer: RuleSet -> one zone, or one zone per authority or per order (`RpzSettings.layout`);
per zone the next version (serial + 1), journal delta, zone file, NOTIFY.

Two paths. With a `Change` from the rule set this enforcer holds (its digest is `change.base`
and the last apply read back in sync), the delta path splits the removed and added rules into
the zones they belong to (by the old orders' authority for removed rules, the new orders' for
added ones: a re-tagged rule moves between zones), patches each touched zone's rules
(`RuleSet.patched`), derives the owners deleted and added (`rpz.owner_delta`) and makes the
next version from the served one (`ZoneVersion.next`, which shares the 2M-owner base) with a
journal entry of exactly those owners. Nothing proportional to the zone is rendered or read.
Anything else (first apply, a change from another base, a delta that does not fit, a new
authority that renames zones or passes `max_zones`) takes the full path: partition, owner
sets, compare with what is served.

Read-back: after a delta, the touched owners are read from the versions the server now
serves and checked against the zone's rules (`rpz.touched_hold`); when they agree, what is
served equals the share (it did before, and only they changed), so the read-back digest is
the share's, patched in O(k) (`readback_scope` "touched"). The full read-back (every owner of
every served version) is `readback()`, on the drift schedule, and the full path's.

A zone cannot tell an exact rule from a subtree rule of the same name (both serve the apex),
so the share this enforcer holds is the names with such exact rules left out (`enforced`).

Every zone's serial is persisted in `state_file` before the new versions are served, so a restart
never serves different content under an old serial. Zone files (`zone_file`) are written after
the new versions are served (an IXFR does not wait for a 60 MB file); one that cannot be written
is retried by the next apply. A zone once served stays served (empty when its authority has no
rules left): a resolver configured for it keeps a valid, empty zone, and the restriction it
carried is withdrawn by a transfer like any other change.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime, timezone
from types import MappingProxyType
from typing import Any

import structlog

from blockd.digests import ADDR4, ADDR6, EMPTY, PartDigest, combine
from blockd.dns import rpz
from blockd.dns.rpzserver import RpzServer
from blockd.errors import EnforcerError
from blockd.model import Applied, Change, OrderInfo, Plan, RuleDelta, RuleSet

log = structlog.get_logger("blockd.enforcers.rpz")

#: a version whose overlay passes this many owners (or 1/8 of its base) is compacted in the background
COMPACT_MIN = 4096


@dataclass(frozen=True, slots=True)
class _ZoneStep:
    """One zone's part of a delta: its rules before and after, and the owners that change."""

    origin: str
    key: str | None
    old: RuleSet
    new: RuleSet
    plan: Plan
    deleted: frozenset[str]
    added: frozenset[str]


@dataclass(frozen=True, slots=True)
class _View:
    """The share of one desired rule set a zone can hold: exact names under a same-name subtree
    rule left out of the exact part (`twins` of them)."""

    digest: str  # the desired RuleSet's
    want: RuleSet  # desired.share(...) as given
    exact: PartDigest
    twins: int
    share_digest: str


def _view(s: rpz.RpzSettings, desired: RuleSet, exact: PartDigest | None = None, twins: int = 0) -> _View:
    want = desired.share(names=True, addresses=s.ip_triggers)
    if exact is None:  # from scratch, O(N): exact rules are sorted just before their subtree twin
        d = want.domains
        names = [d[i].name for i in range(len(d) - 1) if d[i].name == d[i + 1].name]
        exact, twins = (want.parts[0].patched(names, ()) if names else want.parts[0]), len(names)
    e, sub, a, b = want.parts
    digest = combine(exact, sub, a if s.ip_triggers else EMPTY[ADDR4], b if s.ip_triggers else EMPTY[ADDR6])
    return _View(desired.digest, want, exact, twins, digest)


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
        #: the full read-back of the zone versions being served, computed once per set of versions
        #: (versions are immutable; at 1M names a full read-back costs seconds)
        self._served: tuple[tuple[object, ...], RuleSet, datetime] | None = None
        # -- the delta path: what the last in-sync apply left (None/empty: take the full path) --
        self._base: str | None = None  # digest of the desired RuleSet the zones hold
        self._view: _View | None = None  # its share
        self._orders: Mapping[str, OrderInfo] = MappingProxyType({})
        self._parts: dict[str, RuleSet] = {}  # origin -> the rules it carries (layout one: the share)
        self._keys: dict[str, str] | None = None  # authority/order -> origin; None: cannot patch
        self._ip_counts = {4: 0, 6: 0}  # IP-trigger owners in the union of the zones
        self._files: dict[str, tuple[rpz.RpzSettings, rpz.ZoneVersion]] = {}  # zone files not yet written
        self._tasks: set[asyncio.Task[Any]] = set()
        self._full_at: datetime | None = None
        #: how the last apply went: "delta" (only the change), "full" (partitioned and compared)
        self.last_path = "full"

    @property
    def serial(self) -> int:
        """The default zone's serial."""
        return self._zones[self.server.settings.origin][0]

    def serials(self) -> dict[str, int]:
        return {origin: serial for origin, (serial, _) in self._zones.items()}

    def enforced(self, rs: RuleSet) -> RuleSet:
        """The part of `rs` these zones hold (names; addresses only with ip_triggers; an exact
        rule with a same-name subtree rule is left out: a zone serves both alike)."""
        v = self._view if self._view is not None and self._view.digest == rs.digest else \
            _view(self.server.settings, rs)
        w = v.want
        domains = w.domains if not v.twins else tuple(
            r for i, r in enumerate(w.domains)
            if r.subtree or i + 1 == len(w.domains) or w.domains[i + 1].name != r.name)
        return RuleSet(domains, w.v4, w.v6, w.orders, v.share_digest, (v.exact, *w.parts[1:]))  # type: ignore[arg-type]

    async def apply(self, desired: RuleSet, change: Change | None = None, *args: Any, **kwargs: Any) -> Applied:
        """Serve `desired`: by the delta path when `change` starts from what is held, else in full."""
        t0 = time.perf_counter()
        base, self._base = self._base, None  # unknown until this apply reads back in sync
        applied = None
        if change is not None and change.removed is not None and change.added is not None \
                and base is not None and change.base == base:
            try:
                steps = await asyncio.to_thread(self._steps, desired, change)
            except ValueError as e:  # the delta does not fit what is held: nothing was changed
                log.debug("rpz_delta_does_not_fit", enforcer=self.name, error=str(e))
                steps = None
            if steps is not None:
                applied = await self._commit_delta(desired, change, *steps, t0)
        self.last_path = "delta" if applied is not None else "full"
        if applied is None:
            applied = await self._apply_full(desired, t0)
        if applied.in_sync:
            self._base = desired.digest
        await self._write_files()
        return applied

    # ---- the delta path ---------------------------------------------------------------------
    def _steps(self, desired: RuleSet, change: Change) -> tuple[list[_ZoneStep], dict[str, str] | None, _View]:
        """Pure (reads only): each touched zone's step, the new key -> origin map, the new share.
        ValueError when the delta cannot be applied to what is held."""
        s = self.server.settings
        view = self._view
        assert view is not None and change.removed is not None and change.added is not None
        rem, add = change.removed, change.added
        plan = change.plan
        if not s.ip_triggers:
            rem, add = RuleDelta(rem.domains), RuleDelta(add.domains)
            plan = Plan(plan.add_domains, plan.del_domains, (), (), (), ())
        new_view = self._patch_view(view, desired, plan)
        steps: list[_ZoneStep] = []
        keys = self._keys
        if s.layout == "one":
            old = self._parts[s.origin]
            d, a = rpz.owner_delta(old, new_view.want, plan, s.ip_triggers)
            steps.append(_ZoneStep(s.origin, None, old, new_view.want, plan, frozenset(d), frozenset(a)))
        else:
            if keys is None:
                raise ValueError("more authorities than max_zones: the zones are cut in full")
            steps, keys = self._split(desired, rem, add, keys)
        for st in steps:
            z = self.server.zone(st.origin)
            cur = z.version if z is not None else None
            held = (lambda o: cur.has(o)) if cur is not None else (lambda o: False)
            if not all(held(o) for o in st.deleted) or any(held(o) for o in st.added):
                raise ValueError(f"zone {st.origin} does not serve what the change starts from")
        return steps, keys, new_view

    def _patch_view(self, view: _View, desired: RuleSet, plan: Plan) -> _View:
        old, want = view.want, desired.share(names=True, addresses=self.server.settings.ip_triggers)
        gone, came, twins = [], [], view.twins
        for name in {n for n, _ in (*plan.add_domains, *plan.del_domains)}:
            e0, s0 = rpz.holds(old, name, False), rpz.holds(old, name, True)
            e1, s1 = rpz.holds(want, name, False), rpz.holds(want, name, True)
            before, after = e0 and not s0, e1 and not s1  # counted as an exact name by the zone
            if before and not after:
                gone.append(name)
            elif after and not before:
                came.append(name)
            twins += (e1 and s1) - (e0 and s0)
        return _view(self.server.settings, desired, view.exact.patched(gone, came), twins)

    def _split(self, desired: RuleSet, rem: RuleDelta, add: RuleDelta,
               keys: dict[str, str]) -> tuple[list[_ZoneStep], dict[str, str]]:
        """Layouts authority/order: the rules removed (by their old orders) and added (by the new
        ones) per zone, each zone's rules patched. A new authority gets its zone when that renames
        no zone served and stays within max_zones; else ValueError (the full path cuts again)."""
        s = self.server.settings

        def key_of(o: str, orders: Mapping[str, OrderInfo]) -> str | None:  # as rpz.zone_key
            if s.layout == "order":
                return o
            info = orders.get(o)
            return info.authority if info is not None else None

        new_keys = {k for r in (*add.domains, *add.v4, *add.v6) for o in r.orders
                    if (k := key_of(o, desired.orders)) is not None and k not in keys}
        origin_of = dict(keys)
        if new_keys:
            origin_of.update({k: o for k, o in rpz.zone_names(s, {*keys, *new_keys}).items() if k in new_keys})
        buckets: dict[str, tuple[list[list[Any]], list[list[Any]]]] = {}

        def put(r: Any, kind: int, orders: Mapping[str, OrderInfo], side: int) -> None:
            by_zone: dict[str, set[str]] = {}
            for o in r.orders:
                k = key_of(o, orders)
                origin = origin_of.get(k, s.origin) if k is not None else s.origin
                if k is not None and k not in origin_of:
                    raise ValueError(f"order {o!r} of a removed rule names {k!r}, which has no zone")
                by_zone.setdefault(origin, set()).add(o)
            for origin, sub in by_zone.items():
                b = buckets.setdefault(origin, ([[], [], []], [[], [], []]))
                b[side][kind].append(r if len(by_zone) == 1 else r._replace(orders=frozenset(sub)))

        for side, delta, orders in ((0, rem, self._orders), (1, add, desired.orders)):
            for kind, rules in enumerate((delta.domains, delta.v4, delta.v6)):
                for r in rules:
                    put(r, kind, orders, side)
        steps = []
        for origin, (r, a) in sorted(buckets.items()):
            old = self._parts.get(origin, RuleSet.empty())
            new, plan = old.patched(RuleDelta(*map(tuple, r)), RuleDelta(*map(tuple, a)), desired.orders)
            d, ad = rpz.owner_delta(old, new, plan, s.ip_triggers)
            key = next((k for k, o in origin_of.items() if o == origin), None)
            steps.append(_ZoneStep(origin, key, old, new, plan, frozenset(d), frozenset(ad)))
        # The full path names zones after the authorities (orders) that have rules: that set may
        # not change in a way that renames a zone served, nor pass max_zones.
        sizes = {origin: len(p) for origin, p in self._parts.items()} | {st.origin: len(st.new) for st in steps}
        present = {k for k, o in origin_of.items() if sizes.get(o, 0)}
        if present != set(keys):
            if len(present) > s.max_zones - 1:
                raise ValueError(f"{len(present)} authorities/orders pass max_zones {s.max_zones}")
            names = rpz.zone_names(s, present)
            moved = sorted(k for k in present if names[k] != origin_of[k])
            if moved:
                raise ValueError(f"the zone of {moved[0]!r} would be renamed")
        return steps, {k: origin_of[k] for k in present}

    async def _commit_delta(self, desired: RuleSet, change: Change, steps: list[_ZoneStep],
                            keys: dict[str, str] | None, view: _View, t0: float) -> Applied:
        s = self.server.settings
        zones = dict(self._zones)
        changed = [st for st in steps if st.deleted or st.added]
        for st in changed:
            zones[st.origin] = (rpz.next_serial(zones.get(st.origin, (0, None))[0]), st.new.digest)
        if changed:
            try:
                await asyncio.to_thread(self._save, zones)
            except OSError as e:  # nothing served has changed: the old versions stay, the base too
                self._base = change.base
                raise EnforcerError(self.name, f"cannot write {e.filename!r}: {e.strerror}", errno=e.errno) from e
        touched_ip = {o for st in changed for o in (*st.deleted, *st.added) if o.endswith(".rpz-ip")}
        ip_before = self._ip_held(touched_ip)
        self._zones = zones
        added = removed = 0
        for st in changed:
            zs = rpz.for_zone(s, st.origin, st.key) if s.layout != "one" else s
            z = self.server.add_zone(zs)
            cur, serial = z.version, zones[st.origin][0]
            if cur is not None:
                version = rpz.ZoneVersion.next(cur, zs, serial, st.deleted, st.added, st.new)
                z.journal.append(cur.serial, serial, st.deleted, st.added)
            else:
                version = rpz.ZoneVersion(zs, serial, st.added, st.new)
            z.version = version  # the swap: the next SOA/AXFR/IXFR of this zone sees the new serial
            self.server.notify_all(z)
            added, removed = added + len(st.added), removed + len(st.deleted)
            if zs.zone_file:
                self._files[st.origin] = (zs, version)
            if version.overlay > max(COMPACT_MIN, len(version) // 8):
                self._spawn(asyncio.to_thread(lambda v=version: v.owners))
            log.debug("rpz_zone_updated", enforcer=self.name, zone=zs.origin, serial=serial,
                      owners=len(version), deleted=len(st.deleted), added=len(st.added))
        for st in steps:
            self._parts[st.origin] = st.new
        self._keys, self._view, self._orders = keys, view, desired.orders
        # The touched read-back: from the versions the server serves now, not from `steps`.
        at = datetime.now(timezone.utc)
        agree = True
        for st in changed:
            z = self.server.zone(st.origin)
            v = z.version if z is not None else None
            if v is None or not rpz.touched_hold(v, st.new, st.plan, set(st.deleted), set(st.added)):
                agree = False
                log.warning("rpz_readback_differs", enforcer=self.name, zone=st.origin)
        ip_after = self._ip_held(touched_ip)
        for family in (4, 6):
            self._ip_counts[family] += ip_after[family] - ip_before[family]
        if agree:
            digest, scope = view.share_digest, "touched"
            counts = {"domain_exact": len(view.exact), "domain_subtree": len(view.want.parts[1]),
                      "ipv4_ranges": self._ip_counts[4], "ipv6_ranges": self._ip_counts[6]}
        else:
            served = await self.readback()
            digest, scope, counts, at = served.digest, "full", served.counts(), self._full_at or at
        log.info("ruleset_applied", enforcer=self.name, added=added, removed=removed, path="delta",
                 zones=len(changed), readback=scope, in_sync=digest == view.share_digest,
                 duration_s=round(time.perf_counter() - t0, 4))
        return Applied(enforcer=self.name, digest=digest, desired_digest=view.share_digest, added=added,
                       removed=removed, duration_s=time.perf_counter() - t0, counts=counts,
                       readback_scope=scope, readback_at=at, full_readback_at=self._full_at)

    def _ip_held(self, touched: set[str]) -> dict[int, int]:
        """Of the IP triggers `touched`, how many of each family some zone serves now."""
        out = {4: 0, 6: 0}
        if not touched:
            return out
        versions = [z.version for z in self.server.zones.values() if z.version is not None]
        for o in touched:
            if any(v.has(o) for v in versions):
                out[rpz.parse_ip_trigger(o)[0]] += 1
        return out

    def _spawn(self, aw: Any) -> None:
        task = asyncio.ensure_future(aw)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    # ---- the full path ----------------------------------------------------------------------
    async def _apply_full(self, desired: RuleSet, t0: float) -> Applied:
        s = self.server.settings
        view = await asyncio.to_thread(_view, s, desired)
        want = view.want
        parts, total = await asyncio.to_thread(rpz.partition_keys, s, want)
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
            elif cur is None or new_owners != await asyncio.to_thread(lambda c=cur: c.owners):
                serial = rpz.next_serial(serial)
                zones[origin] = (serial, part.digest)
                changes.append((zs, rpz.ZoneVersion(zs, serial, new_owners, part), cur, True))
        added = removed = 0
        if changes:
            try:
                if any(new for *_, new in changes):
                    await asyncio.to_thread(self._save, zones)
            except OSError as e:
                raise EnforcerError(self.name, f"cannot write {e.filename!r}: {e.strerror}", errno=e.errno) from e
            self._zones = zones
            for zs, version, cur, new in changes:
                z = self.server.add_zone(zs)
                if cur is not None:
                    d = await asyncio.to_thread(z.journal.record, cur, version)
                    added, removed = added + len(d.added), removed + len(d.deleted)
                elif new:
                    added += len(version)
                z.version = version  # the swap: the next SOA/AXFR/IXFR of this zone sees the new serial
                self.server.notify_all(z)
                if zs.zone_file and (new or zs.zone_file_shards > 1):  # restored: a missing shard is written
                    self._files[zs.origin] = (zs, version)
                log.debug("rpz_zone_updated" if new else "rpz_zone_restored", enforcer=self.name,
                          zone=zs.origin, serial=version.serial, owners=len(version))
        self._restorable.clear()
        self._parts = {origin: part for origin, (_, part) in parts.items()}
        self._keys = None if s.layout == "one" or total > s.max_zones - 1 else \
            {key: origin for origin, (key, _) in parts.items() if key is not None}
        self._view, self._orders = view, desired.orders
        served = await self.readback()
        self._ip_counts = {4: served.counts()["ipv4_ranges"], 6: served.counts()["ipv6_ranges"]}
        at = self._full_at or datetime.now(timezone.utc)
        log.info("ruleset_applied", enforcer=self.name, added=added, removed=removed, path="full",
                 zones=sum(1 for *_, new in changes if new), readback="full",
                 in_sync=served.digest == view.share_digest, duration_s=round(time.perf_counter() - t0, 4))
        return Applied(enforcer=self.name, digest=served.digest, desired_digest=view.share_digest, added=added,
                       removed=removed, duration_s=time.perf_counter() - t0, counts=served.counts(),
                       readback_at=at, full_readback_at=at)

    async def _write_files(self) -> None:
        """Write the zone files of versions served but not yet on disk (newest version each)."""
        for origin, (zs, version) in sorted(self._files.items()):
            assert zs.zone_file is not None
            try:
                await asyncio.to_thread(rpz.atomic_write, zs.zone_file, rpz.zone_text(zs, version))
                if zs.zone_file_shards > 1:  # Knot Resolver reads these: only changed shards are replaced
                    await asyncio.to_thread(rpz.write_shards, zs, version)
            except OSError as e:  # the zone is served; the file is retried by the next apply
                raise EnforcerError(self.name, f"cannot write zone file {e.filename or zs.zone_file!r}: "
                                    f"{e.strerror}; zone {origin} serial {version.serial} is served by "
                                    f"transfer, the file is retried", errno=e.errno) from e
            if self._files.get(origin, (None, None))[1] is version:
                del self._files[origin]

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
        """The full read-back: every owner of every zone version served, as the rules it enforces."""
        versions = tuple(z.version for z in self.server.zones.values() if z.version is not None)
        if not versions:
            return RuleSet.empty()
        if self._served is None or self._served[0] != tuple(v.uid for v in versions):
            view = self._view

            def read() -> RuleSet:
                if len(versions) == 1:
                    owners = versions[0].owners
                else:
                    owners = frozenset().union(*(v.owners for v in versions))
                return rpz.ruleset_from_owners(owners)

            rs = await asyncio.to_thread(read)
            self._full_at = datetime.now(timezone.utc)
            self._served = (tuple(v.uid for v in versions), rs, self._full_at)
            if view is not None and view is self._view and rs.digest != view.share_digest:
                self._base = None  # the zones do not hold what the delta path would start from
        return self._served[1]

    async def aclose(self) -> None:
        for t in list(self._tasks):
            t.cancel()
        await self.server.aclose()

