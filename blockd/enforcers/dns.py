"""Sinkhole enforcer: RuleSet -> the lookup Table the server answers from, swapped in one step.

Two paths, as for the kernel enforcers (enforcers/netlink.py):

    change   `change.base` is the rule set this enforcer applied last and read back equal: the
             table is patched for the names the change touched (`Table.patched`, O(k)), swapped
             in, and those names are read back from the table now served (present or absent,
             subtree flag, the verdict's orders) against `desired`; the digest is the last
             served digest patched by what that read-back found (`readback_scope` "touched")
    full     anything else (the first apply, a failure, a drift repair): the table is built
             from `desired` in a worker thread (the old one keeps answering), swapped in, and
             read back whole (`readback_scope` "full")

`readback` (the drift schedule) reads the whole served table back to a RuleSet.

The compiled table is persisted beside the state (`TableStore`, a few seconds after a pass
that changed it), with the digest of the rule set it serves and of the state's accepted
policies: as a base (`dns-table.bin`, the whole table, written atomically) and a journal beside
it (`dns-table.journal`, one checksummed record per save after a patch: the names the patches
since the last save touched, as the table now holds them, and the meta), so a save costs what
the change touched, not the table. Which names a save carries: every swap of the served table
notes what it touched (`_unsaved`; a build notes "everything"), and a save takes those with the
table it writes, in one step of the event loop, so a change that lands while a save is under
way goes into the next one, and a save that fails gives its names back. A build, a journal past
its bound (`JOURNAL_MAX_ENTRIES`, `JOURNAL_MAX_BYTES`) or one that cannot be appended (other
than for a full disk) is compacted: a new base, then the journal reset (a journal naming
another base is ignored at load, so a crash between the two is safe). A base dump (seconds at
1M names) waits between its slices while the daemon's pass runs (`busy`), so the first save
after a build does not slow the next change down.

At start, before the first pass, `restore` loads the base and the journal's complete records
(a torn or damaged tail is dropped, logged and counted: the table is then the last one saved
whole), checks it (its own checksums, and that the state's accepted policies are still those it
came from) and serves it, so a restart answers within a couple of seconds instead of after a
full pass; anything that does not match is ignored, with the reason logged and counted.
"""

from __future__ import annotations

import asyncio
import errno
import hashlib
import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import datetime, timezone
from operator import itemgetter
from pathlib import Path

import structlog

from blockd.digests import ADDR4, ADDR6, EMPTY, PartDigest, combine
from blockd.dns import wire
from blockd.dns.server import SinkholeServer
from blockd.dns.table import JournalPos, Table, TableFileError, Verdict, append_journal, load_table
from blockd.errors import BlockdError, EnforcerError
from blockd.model import Applied, Change, RuleSet, seq_bisect

log = structlog.get_logger("blockd.enforcers.dns")

#: the overlay of a patched table is folded into its base dicts once it holds this many entries
MERGE_AT = 8192
#: a change touching more names than this (or a quarter of the table) is rebuilt, not patched
PATCH_MAX = 200_000
#: the table is written this long after the last change, so a burst of changes is one write
PERSIST_DELAY_S = 2.0
#: the longest a base dump waits for passes, between two of its slices
PAUSE_MAX_S = 30.0
TABLE_FILE = "dns-table.bin"
JOURNAL_FILE = "dns-table.journal"
#: the journal is compacted into a new base once its records carry more names than this (or a
#: quarter of the table, if more): at 1M names, 250k names, so a ticket of ten names every few
#: minutes compacts every few weeks, and a load applies at most that many entries
JOURNAL_MAX_ENTRIES = 65_536
#: ... or once it holds this many bytes
JOURNAL_MAX_BYTES = 64 << 20
#: outcomes of loading and saving the persisted table (blockd_dns_table_file_total{result}):
#: "saved" a new base written, "appended" a journal record, "journal_dropped" a journal's
#: tail (or the whole journal) not applied at load
TABLE_FILE_RESULTS = ("loaded", "missing", "corrupt", "stale", "unreadable", "empty", "saved", "appended",
                      "journal_dropped", "save_failed")
#: errors of an append that a new base cannot get around (it is larger, on the same file system)
_NO_ROOM = frozenset({errno.ENOSPC, errno.EDQUOT, errno.EROFS})

_name = itemgetter(0)


@dataclass(frozen=True, slots=True)
class TableStore:
    """Where the compiled table is kept (`state_dir/dns-table.bin`) and what it is checked against."""

    state_dir: Path

    @property
    def path(self) -> Path:
        return self.state_dir / TABLE_FILE

    @property
    def journal(self) -> Path:
        return self.state_dir / JOURNAL_FILE

    def accepted_digest(self) -> str | None:
        """SHA-256 over the state's accepted policies (issuer, serial, digest), or None if the
        state cannot be read."""
        from blockd.state import StateStore

        try:
            acc = StateStore(self.state_dir).accepted()
        except (BlockdError, OSError, ValueError):
            return None
        rows = sorted((a.issuer, a.serial, a.digest) for a in acc.values())
        return hashlib.sha256(json.dumps(rows).encode()).hexdigest()


class SinkholeEnforcer:
    def __init__(self, server: SinkholeServer, name: str = "dns", store: TableStore | None = None,
                 on_table_file: Callable[[str], None] | None = None) -> None:
        self.name = name
        self.server = server
        self.store = store
        self.on_table_file = on_table_file
        #: says whether the daemon's pass is running (a base dump waits for it between slices)
        self.busy: Callable[[], bool] | None = None
        self.last_load_s = 0.0
        #: how the last apply went: "patch" (only the names changed) or "full" (rebuilt)
        self.last_path = "full"
        self._lock = asyncio.Lock()
        #: the digest of the whole RuleSet last applied and read back equal (a change from it patches)
        self._base: str | None = None
        #: the digests of the exact and subtree names the served table holds (as last read back)
        self._parts: tuple[PartDigest, PartDigest] | None = None
        self._read_at: datetime | None = None
        self._full_at: datetime | None = None
        self._merge_task: asyncio.Task[None] | None = None
        self._persist_task: asyncio.Task[None] | None = None
        self._writing = False
        self._closing = False
        self._save_error: str | None = None
        #: (table, accepted digest, the names it differs in from the last table saved, None: all)
        #: waiting to be written
        self._persist_due: tuple[Table, str, set[str] | None] | None = None
        #: the names the served table differs in from the last one handed to a save (None: it
        #: cannot be told by names: a build)
        self._unsaved: set[str] | None = None
        #: where the journal on disk stands (None: no base known to be on disk, the next save
        #: writes one)
        self._journal: JournalPos | None = None
        #: the accepted digest a restored table was checked against (None: not restored)
        self._restored_accepted: str | None = None

    @staticmethod
    def enforced(desired: RuleSet) -> RuleSet:
        """The sinkhole holds names only; the addresses are the kernel enforcers' job (constant time)."""
        return desired.share(names=True, addresses=False)

    # ---- start ------------------------------------------------------------------------------
    async def restore(self) -> bool:
        """Serve the persisted table if it checks out (see the module doc); True if it does."""
        if self.store is None:
            return False
        t0 = time.perf_counter()
        store = self.store
        try:
            got = await asyncio.to_thread(load_table, store.path, self.server.answer_settings, store.journal)
            table, meta = got.table, got.meta
            if got.dropped is not None:  # the table is the last one saved whole; the checks below decide
                damaged = got.dropped.reason == "journal_dropped"  # not: a journal of an older base, left by a crash
                (log.warning if damaged else log.info)("dns_table_journal_dropped", enforcer=self.name,
                                                       reason=got.dropped.reason, error=got.dropped.detail,
                                                       records=got.records)
                if damaged:
                    self._count("journal_dropped")
            accepted = await asyncio.to_thread(store.accepted_digest)
            if accepted is None or meta.get("accepted") != accepted:
                raise TableFileError("stale", f"{store.path} was written for other accepted policies "
                                     f"(table {str(meta.get('accepted'))[:16]}, state {str(accepted)[:16]}); "
                                     "the first pass builds the table")
            if len(table) == 0:  # never answer from an empty table before the first pass (fail closed)
                raise TableFileError("empty", f"{store.path} holds no names; the first pass builds the table")
        except TableFileError as e:
            (log.info if e.reason == "missing" else log.warning)(
                "dns_table_not_restored", enforcer=self.name, reason=e.reason, error=e.detail)
            self._count(e.reason)
            return False
        self.server.swap(table)
        self._restored_accepted = accepted
        self._journal, self._unsaved = got.journal, set()  # the next save appends to what was loaded
        self.last_load_s = time.perf_counter() - t0
        log.info("dns_table_restored", enforcer=self.name, names=len(table), digest=table.digest[:16],
                 written_at=meta.get("written_at"), journal_records=got.records, load_s=round(self.last_load_s, 3))
        self._count("loaded")
        return True

    def _count(self, result: str) -> None:
        if self.on_table_file is not None:
            self.on_table_file(result)

    # ---- apply ------------------------------------------------------------------------------
    async def apply(self, desired: RuleSet, change: Change | None = None) -> Applied:
        async with self._lock:
            t0 = time.perf_counter()
            want = self.enforced(desired)
            old = self.server.table
            base, self._base = self._base, None  # unknown until this apply reads back equal
            applied = None
            if (change is not None and base is not None and change.base == base and change.removed is not None
                    and change.added is not None and self._parts is not None):
                applied = await self._apply_change(want, change, old, t0)
            self.last_path = "patch" if applied is not None else "full"
            if applied is None:
                applied = await self._apply_full(want, old, t0)
            if applied.in_sync:
                self._base = desired.digest
                if self.server.table is not old:
                    await self._persist_later(self.server.table)
            if self.server.table.overlay >= MERGE_AT and (self._merge_task is None or self._merge_task.done()):
                self._merge_task = asyncio.get_running_loop().create_task(self._merge())
            return applied

    async def _apply_change(self, want: RuleSet, change: Change, old: Table, t0: float) -> Applied | None:
        """Patch the table by the names `change` touched and read those back; None if it does not fit."""
        assert change.removed is not None and change.added is not None and self._parts is not None
        names = {r.name for r in change.removed.domains}
        names.update(r.name for r in change.added.domains)
        if len(names) > min(PATCH_MAX, max(1024, len(old) // 4)):
            return None  # a change of that size is cheaper to build from scratch
        t1 = time.perf_counter()
        try:
            table = await asyncio.to_thread(old.patched, want, names) if names else old
        except (ValueError, KeyError, UnicodeError, IndexError) as e:
            raise EnforcerError(self.name, f"cannot patch the lookup table: {e}") from e
        if table is not old:
            self.server.swap(table)
            self._note_unsaved(names)
        patch_s = time.perf_counter() - t1
        at = datetime.now(timezone.utc)
        bad, removed, added = await asyncio.to_thread(_read_touched, self.server.table, old, want, names)
        if bad:
            log.warning("dns_readback_differs", enforcer=self.name, names=len(bad), first=bad[:3],
                        note="the served table does not hold what was patched in; rebuilding it")
            return None
        e, s = self._parts
        try:
            e = e.patched(removed[0], added[0])
            s = s.patched(removed[1], added[1])
        except ValueError as exc:  # the last read-back does not know these names: read all again
            log.warning("dns_readback_differs", enforcer=self.name, error=str(exc))
            return None
        self._parts = (e, s)
        self._read_at = at
        digest = _digest(e, s)
        log.info("dns_table_patched", enforcer=self.name, names_touched=len(names), added=len(added[0]) + len(added[1]),
                 removed=len(removed[0]) + len(removed[1]), overlay=table.overlay, names=len(table),
                 patch_s=round(patch_s, 4), duration_s=round(time.perf_counter() - t0, 4))
        return Applied(
            enforcer=self.name, digest=digest, desired_digest=want.digest,
            added=len(added[0]) + len(added[1]), removed=len(removed[0]) + len(removed[1]),
            duration_s=time.perf_counter() - t0, counts=_counts(e, s), readback_scope="touched",
            readback_at=at, full_readback_at=self._full_at,
        )

    async def _apply_full(self, want: RuleSet, old: Table, t0: float) -> Applied:
        adopt = False
        if old.restored and old.digest == want.digest and self.store is not None:
            # The table loaded at start serves exactly these names; its answers came from the
            # same accepted policies if the state still holds those (the first pass may have
            # accepted more): then it is kept, not rebuilt.
            adopt = await asyncio.to_thread(self.store.accepted_digest) == self._restored_accepted
        if not adopt:
            try:
                # Built in a worker thread: the event loop keeps answering from the old table.
                table = await asyncio.to_thread(Table.build, want, self.server.answer_settings)
            except (ValueError, KeyError, UnicodeError, IndexError) as e:
                raise EnforcerError(self.name, f"cannot build the lookup table: {e}") from e
            self.server.swap(table)
            self._note_unsaved(None)
            self.last_load_s = time.perf_counter() - t0
        served = self.server.table
        at = datetime.now(timezone.utc)
        before = self._parts if self._parts is not None and not old.restored else None
        if await asyncio.to_thread(served.serves_exactly, want):  # read back by lookups: every name, its orders
            e, s = want.parts[0], want.parts[1]
        else:  # what it does hold, decoded from its keys
            e, s = await asyncio.to_thread(served.name_parts)
        self._parts = (e, s)
        self._read_at = self._full_at = at
        digest = _digest(e, s)
        added = removed = 0
        if served is not old:
            if before is not None:  # what changed, bucket by bucket (only the buckets that differ)
                added, removed = await asyncio.to_thread(_changes, before, (e, s))
            elif len(old) == 0:
                added = len(served)
            else:
                added, removed = await asyncio.to_thread(_key_changes, old, served)
        log.info("dns_table_swapped", enforcer=self.name, names=len(served), adopted=adopt or None,
                 load_s=round(self.last_load_s, 3), duration_s=round(time.perf_counter() - t0, 4))
        return Applied(
            enforcer=self.name, digest=digest, desired_digest=want.digest, added=added, removed=removed,
            duration_s=time.perf_counter() - t0, counts=_counts(e, s), readback_scope="full",
            readback_at=at, full_readback_at=at,
        )

    # ---- background work ----------------------------------------------------------------------
    async def _merge(self) -> None:
        """Fold the overlay into new base dicts off the serving path; a patch made meanwhile is
        carried over (its entries stay in the new overlay)."""
        t = self.server.table
        t0 = time.perf_counter()
        merged = await asyncio.to_thread(t.merged)
        async with self._lock:
            cur = self.server.table
            if cur is t:
                self.server.swap(merged)
            elif cur.exact is t.exact and cur.subtree is t.subtree:
                self.server.swap(await asyncio.to_thread(_rebase, cur, t, merged))
            else:
                return  # rebuilt meanwhile
        log.info("dns_table_merged", enforcer=self.name, folded=t.overlay, names=len(merged),
                 duration_s=round(time.perf_counter() - t0, 3))

    def _note_unsaved(self, names: set[str] | None) -> None:
        """The served table was swapped for one that differs in `names` (None: a build). Called
        in the same step as the swap, so what a save takes is never behind the table it takes."""
        self._unsaved = _union(self._unsaved, names)
        if self._unsaved is not None and len(self._unsaved) > max(JOURNAL_MAX_ENTRIES, len(self.server.table) // 4):
            self._unsaved = None  # more than a record is worth (saves have not run for long): a new base

    async def _persist_later(self, table: Table) -> None:
        """Save `table` (the one served: swaps happen under the apply lock, which the caller
        holds) a little later; the names it differs in from the last save go with it."""
        if self.store is None or len(table) == 0:
            return  # an empty table is never served at start: the file keeps the last one with names
        accepted = await asyncio.to_thread(self.store.accepted_digest)
        if accepted is None:
            return  # the state cannot be read: nothing to check a saved table against
        names, self._unsaved = self._unsaved, set()
        if self._persist_due is not None:  # not written yet: this save covers both changes
            names = _union(self._persist_due[2], names)
        self._persist_due = (table, accepted, names)
        if self._persist_task is None or self._persist_task.done():
            self._persist_task = asyncio.get_running_loop().create_task(self._persist_loop())

    async def _persist_loop(self, delay: float = PERSIST_DELAY_S) -> None:
        while self._persist_due is not None and not self._closing:
            await asyncio.sleep(delay)
            if self._closing:
                return  # aclose writes what is due
            due, self._persist_due = self._persist_due, None
            if due is not None:
                self._writing = True
                try:
                    await self._persist(*due)
                finally:
                    self._writing = False

    async def _persist(self, table: Table, accepted: str, names: set[str] | None) -> None:
        """Append a journal record for `names`, or write a new base (see the module doc)."""
        assert self.store is not None
        t0 = time.perf_counter()
        meta = {"digest": table.digest, "accepted": accepted, "names": len(table),
                "written_at": datetime.now(timezone.utc).isoformat(timespec="seconds")}
        pos = self._journal
        why = "not a patch" if names is None else "no base" if pos is None else None
        if why is None and pos is not None and names is not None:
            if pos.entries + len(names) > max(JOURNAL_MAX_ENTRIES, len(table) // 4) or pos.length > JOURNAL_MAX_BYTES:
                why = "journal bound"
            else:
                try:
                    self._journal = await asyncio.to_thread(_append, table, names, self.store.journal, pos, meta)
                except OSError as e:
                    if e.errno in _NO_ROOM:
                        self._save_failed(e, names)
                        return
                    why = f"append failed: {e.strerror or e}"
                    log.warning("dns_table_journal_failed", enforcer=self.name, path=str(self.store.journal),
                                error=e.strerror or str(e), note="writing a new base instead")
                else:
                    self._count("appended")
                    log.info("dns_table_appended", enforcer=self.name, path=str(self.store.journal),
                             names=len(table), names_touched=len(names), record=self._journal.seq,
                             journal_bytes=self._journal.length, duration_s=round(time.perf_counter() - t0, 4),
                             recovered=True if self._save_error else None)
                    self._save_error = None
                    return
        try:
            pause = None if self._closing else self._pause
            size, checksum = await asyncio.to_thread(table.dump_base, self.store.path, meta, pause)
        except OSError as e:
            self._journal = None  # the base on disk may be the old one or this one: the next save writes one
            self._save_failed(e, None)
            return
        self._journal = JournalPos(checksum)
        try:  # a journal naming the old base is ignored at load; removed so it is not read at all
            self.store.journal.unlink(missing_ok=True)
        except OSError as e:
            log.debug("dns_table_journal_not_removed", enforcer=self.name, error=e.strerror or str(e))
        self._count("saved")
        log.info("dns_table_saved", enforcer=self.name, path=str(self.store.path), names=len(table), bytes=size,
                 compacted=why, duration_s=round(time.perf_counter() - t0, 3),
                 recovered=True if self._save_error else None)
        self._save_error = None

    def _pause(self) -> None:
        """Worker thread, between slices of a base dump: wait while `busy()` says a pass runs
        (the pass and the dump would share one interpreter lock), at most PAUSE_MAX_S in all."""
        if self.busy is None:
            return
        deadline = time.monotonic() + PAUSE_MAX_S
        while self.busy() and time.monotonic() < deadline:
            time.sleep(0.01)

    def _save_failed(self, e: OSError, names: set[str] | None) -> None:
        """Log (once per outage) and count a failed save, and give its names back: the next
        save carries them (with those of a save already due, so no record skips them)."""
        assert self.store is not None
        error = e.strerror or str(e)
        # once per outage (the counter counts every failed save; the next change tries again)
        (log.error if self._save_error != error else log.debug)(
            "dns_table_save_failed", enforcer=self.name, path=str(self.store.state_dir), error=error,
            note="a restart serves the last table saved, or builds the table in its first pass")
        self._save_error = error
        self._count("save_failed")
        if self._persist_due is not None:
            t, a, n = self._persist_due
            self._persist_due = (t, a, _union(n, names))
        else:
            self._unsaved = _union(self._unsaved, names)

    # ---- read-back --------------------------------------------------------------------------
    async def readback(self) -> RuleSet:
        """The whole served table, as a RuleSet (the drift schedule's full read-back)."""
        table = self.server.table
        held = await asyncio.to_thread(table.to_ruleset)
        if self._parts is not None and held.digest != _digest(*self._parts):
            self._base = None  # not what the last read-back said: the next apply rebuilds
        return held

    async def aclose(self) -> None:
        if self._merge_task is not None:
            self._merge_task.cancel()
        self._closing = True  # the loop stops after what it does now
        task = self._persist_task
        if task is not None and not task.done():
            if self._writing:  # a write under way finishes (a second one must not race it)
                await asyncio.shield(task)
            else:
                task.cancel()
        due, self._persist_due = self._persist_due, None
        if due is not None:  # the last change is written now, not lost with the process
            await self._persist(*due)
        await self.server.aclose()


def _union(a: set[str] | None, b: set[str] | None) -> set[str] | None:
    return None if a is None or b is None else a | b


def _append(table: Table, names: set[str], path: Path, pos: JournalPos, meta: dict[str, object]) -> JournalPos:
    """One journal record: the entries of `names` as `table` holds them (a worker thread)."""
    return append_journal(path, pos, table.journal_entries(wire.name_to_wire(n) for n in names), meta)


def _digest(e: PartDigest, s: PartDigest) -> str:
    return combine(e, s, EMPTY[ADDR4], EMPTY[ADDR6])


def _counts(e: PartDigest, s: PartDigest) -> dict[str, int]:
    return {"domain_exact": len(e), "domain_subtree": len(s), "ipv4_ranges": 0, "ipv6_ranges": 0}


def _changes(old: tuple[PartDigest, PartDigest], new: tuple[PartDigest, PartDigest]) -> tuple[int, int]:
    """(added, removed) names between two read-backs, from the digest buckets that differ."""
    added = removed = 0
    for a, b in zip(old, new):
        for k in a.digests.keys() | b.digests.keys():
            if a.digests.get(k) != b.digests.get(k):
                x, y = set(a.buckets.get(k, ())), set(b.buckets.get(k, ()))
                added += len(y - x)
                removed += len(x - y)
    return added, removed


def _key_changes(old: Table, new: Table) -> tuple[int, int]:
    """(added, removed) entries between two tables, from their keys (a table restored at start)."""
    added = removed = 0
    for sub in (False, True):
        a = {k for k, _ in old.entries(sub)}
        b = {k for k, _ in new.entries(sub)}
        added += len(b - a)
        removed += len(a - b)
    return added, removed


def _read_touched(served: Table, before: Table, want: RuleSet, names: set[str]
                  ) -> tuple[list[str], tuple[list[str], list[str]], tuple[list[str], list[str]]]:
    """Read the touched names back from the table now served: (names that differ from `want`,
    (exact, subtree) names gone since `before`, (exact, subtree) names new since `before`)."""
    doms = want.domains
    n = len(doms)
    bad: list[str] = []
    removed: tuple[list[str], list[str]] = ([], [])
    added: tuple[list[str], list[str]] = ([], [])
    for name in names:
        own: list[frozenset[str] | None] = [None, None]
        i = seq_bisect(doms, name, _name)
        while i < n and doms[i][0] == name:
            k = 1 if doms[i][1] else 0
            own[k] = doms[i][2] if own[k] is None else own[k] | doms[i][2]  # type: ignore[operator]
            i += 1
        key = wire.name_to_wire(name)
        comb = own[0] if own[1] is None else (own[1] if own[0] is None else own[0] | own[1])
        for k, (now, then) in enumerate(((served.exact_verdict(key), before.holds(key, False)),
                                         (served.subtree_verdict(key), before.holds(key, True)))):
            if not _holds(now, own[k], comb if k == 0 else own[1]):
                bad.append(f"{'*.' if k else ''}{name}")
            if now is None and then:
                removed[k].append(name)
            elif now is not None and not then:
                added[k].append(name)
    return bad, removed, added


def _holds(v: Verdict | None, own: frozenset[str] | None, combined: frozenset[str] | None) -> bool:
    if own is None:
        return v is None
    return v is not None and v.own_orders == own and v.orders == combined


def _rebase(cur: Table, folded: Table, merged: Table) -> Table:
    """`cur` (patched from `folded` since the merge began) over `merged`'s base: the overlay
    entries `folded` already had are in the base now; the newer ones stay in the overlay."""
    miss = object()
    oe = {k: v for k, v in cur.over_exact.items() if folded.over_exact.get(k, miss) is not v}
    os_ = {k: v for k, v in cur.over_subtree.items() if folded.over_subtree.get(k, miss) is not v}
    return Table(merged.exact, merged.subtree, merged.verdicts, merged.specs, cur.orders, cur.settings, cur.digest,
                 cur.answers, oe, os_, merged.epoch, cur.size, cur.restored)

