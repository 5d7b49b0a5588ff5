"""nftables enforcer: desired RuleSet -> one nfnetlink transaction on blockd's own table.

Layout (table `inet blockd` by default; nothing outside it is ever touched):

    set  v4_00..v4_ff, v6_00..v6_ff   interval sets, sharded by address bits (see `shard`)
    map  daddr4/daddr6 [saddr4/6]     shard index -> jump to that shard's chain (a vmap)
    chain d4_XX / d6_XX [s4_/s6_]     `ip daddr @v4_XX counter name "daddr4" <verdict>`
    chain reject                      TCP -> tcp reset, anything else -> icmpx admin-prohibited
    chain hook_<hook> (base chains)     `meta nfproto ipv4 ip daddr-shard vmap @daddr4` ...
    counter daddr4/daddr6 [saddr4/6]  packets and bytes per match rule (named objects)

Why shards: the kernel dumps an rbtree interval set in O(n^2/1600) (75 s for 1M prefixes);
256 small sets dump in linear time, so `readback` reads the real kernel state in seconds.
The packet path pays one vmap lookup plus one rbtree lookup in a 256x smaller tree.

The first apply (or any apply that finds the layout incomplete) sends [add table, delete
table, create everything, all elements] as one batch; later applies send only the element
diff. Either way the batch is all-or-nothing (NFNL_MSG_BATCH_BEGIN ... END).

With a `Change` from what is held, the plan's union intervals are cut into pieces and sent
as they are: the cost is the change's, not the rule set's (no diff of 1M keys). After any
incremental commit, each element it touched is read back with one GETSETELEM of a point
(the kernel answers with the interval element holding it; `_elements_hold`), so the read-back
also costs the change's. The full read-back (every shard dumped) is the drift check's.
"""

from __future__ import annotations

import os
import socket
import time
from bisect import bisect_right
from collections import defaultdict
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from types import MappingProxyType
from typing import Literal

import structlog

from blockd.enforcers import netlink as nl
from blockd.enforcers.netlink import attr, attr_be32, attr_str, nest
from blockd.errors import ConfigError, EnforcerError
from blockd.model import Applied, NetRule, Plan, RuleSet

log = structlog.get_logger("blockd.enforcers.nft")

HOOKS = {"prerouting": 0, "input": 1, "forward": 2, "output": 3, "postrouting": 4}
VERDICTS = ("drop", "reject", "log")
NFPROTO_INET, NFPROTO_IPV4, NFPROTO_IPV6 = 1, 2, 10
# nf_tables.h message types and attributes used below.
NEWTABLE, DELTABLE, NEWCHAIN, NEWRULE, GETRULE, NEWSET = 0, 2, 3, 6, 7, 9
NEWSETELEM, GETSETELEM, DELSETELEM, GETGEN, NEWOBJ, GETOBJ = 12, 13, 14, 16, 18, 19
NLM_F_APPEND = 0x800
NFT_SET_INTERVAL, NFT_SET_MAP, NFT_SET_TIMEOUT = 0x4, 0x8, 0x10
#: The kernel walks a whole interval set at commit for expired elements, at most every
#: NFTA_SET_GC_INTERVAL (default 1 s): 0.2 s per incremental commit at 1M. blockd's elements
#: never expire, and a GC interval is only accepted on a set with the timeout flag.
GC_INTERVAL_MS = 24 * 3600 * 1000
NFT_DATA_VERDICT = 0xFFFFFF00
NF_DROP, NF_ACCEPT, NFT_JUMP = 0, 1, -3
TYPE_INTEGER, TYPE_IPADDR, TYPE_IP6ADDR = 4, 7, 8
NFT_OBJECT_COUNTER = 1
NFT_META_NFPROTO, NFT_META_L4PROTO = 15, 16
NFT_REJECT_TCP_RST, NFT_REJECT_ICMPX_UNREACH, NFT_REJECT_ICMPX_ADMIN_PROHIBITED = 1, 2, 3
ENOENT = 2
#: a commit's pieces are read back one by one while that costs less than a dump of the whole
#: table: while fewer than 1 in TOUCHED_READ_COST of the pieces held (`_dump_is_cheaper`)
TOUCHED_READ_COST = 10

#: Per family: address bits, network-header offset of (saddr, daddr), shard shift, elements
#: per NEWSETELEM message (the element list is one attribute with a u16 length: <= 64 KiB).
FAMILY = {
    4: (32, {"saddr": 12, "daddr": 16}, 24, 1600),
    6: (128, {"saddr": 8, "daddr": 24}, 116, 1000),
}


def shard(version: int, addr: int) -> int:
    """v4: the first octet. v6: bits 4-11, which spread 2000::/3 (2a0x, 240x, 260x, ...)."""
    return (addr >> FAMILY[version][2]) & 0xFF


def piece_keys(version: int, rules: Iterable[tuple[int, int, object]]) -> set[int]:
    """Sorted rules -> their union, cut at shard boundaries, as keys `first << bits | last`.

    One pass instead of union + cut + set of tuples, and int keys instead of tuples (tuples
    rehash on every set operation): the diff of a 1M-rule RuleSet is half as slow.
    """
    bits, _, shift, _ = FAMILY[version]
    out: set[int] = set()
    add = out.add
    it = iter(rules)
    for start, end, _ in it:  # the first rule opens the current interval
        break
    else:
        return out
    for first, last, _ in it:
        if first <= end + 1:  # overlapping or adjacent: extend the current interval
            if last > end:
                end = last
            continue
        if start >> shift == end >> shift:  # the common case: no shard boundary inside
            add(start << bits | end)
        else:
            _cut(start, end, bits, shift, add)
        start, end = first, last
    _cut(start, end, bits, shift, add)
    return out


def _cut(first: int, last: int, bits: int, shift: int, add: Callable[[int], None]) -> None:
    while first >> shift != last >> shift:
        edge = (((first >> shift) + 1) << shift) - 1
        add(first << bits | edge)
        first = edge + 1
    add(first << bits | last)


def plan_keys(version: int, intervals: Iterable[tuple[int, int]]) -> set[int]:
    """A plan's union intervals (disjoint, non-adjacent) -> their pieces, as `piece_keys` cuts them."""
    bits, _, shift, _ = FAMILY[version]
    out: set[int] = set()
    for first, last in intervals:
        _cut(first, last, bits, shift, out.add)
    return out


def piece_held(version: int, rules: Sequence[NetRule], key: int) -> bool:
    """Whether `key` is one of `piece_keys(version, rules)`, in O(log N): the piece of the union
    interval holding its first address, cut at that address's shard."""
    first, last = split_key(version, key)
    union = nl.union_at(rules, first)
    if union is None:
        return False
    shift = FAMILY[version][2]
    shard = first >> shift
    return (max(union[0], shard << shift), min(union[1], ((shard + 1) << shift) - 1)) == (first, last)


def split_key(version: int, key: int) -> tuple[int, int]:
    bits = FAMILY[version][0]
    return key >> bits, key & ((1 << bits) - 1)


@dataclass(frozen=True, slots=True)
class NftSettings:
    table: str = "blockd"
    hooks: tuple[str, ...] = ("forward", "output")
    priority: int = 0
    match_saddr: bool = False
    verdict: str = "drop"  # drop | reject | log (shadow mode: count and log, let through)
    log_prefix: str = "blockd: "

    def __post_init__(self) -> None:
        bad = [h for h in self.hooks if h not in HOOKS]
        if bad or not self.hooks:
            raise ConfigError(f"nft.hooks: {bad or '()'!r} invalid; known: {', '.join(HOOKS)}")
        if self.verdict not in VERDICTS:
            raise ConfigError(f"nft.verdict: {self.verdict!r} invalid; known: {', '.join(VERDICTS)}")
        if not 0 < len(self.table) < 64:
            raise ConfigError(f"nft.table: {self.table!r} must be 1-63 characters")

    @property
    def directions(self) -> tuple[str, ...]:
        return ("daddr", "saddr") if self.match_saddr else ("daddr",)


# --- message packing -----------------------------------------------------------------------

def _expr(name: str, *data: bytes) -> bytes:
    return nest(1, attr_str(1, name), nest(2, *data))


def _value(kind: int, raw: bytes) -> bytes:
    return nest(kind, attr(1, raw))


def _verdict(code: int, chain: str | None = None) -> bytes:
    inner = attr_be32(1, code) + (attr_str(2, chain) if chain else b"")
    return nest(2, nest(2, inner))  # NFTA_IMMEDIATE_DATA / NFTA_SET_ELEM_DATA -> DATA_VERDICT


class NftEnforcer(nl.KernelEnforcer):
    """Holds `nl.addresses(desired)` in nftables; see the module docstring for the layout."""

    def __init__(self, settings: NftSettings | None = None, *, netns: str | None = None, name: str = "nft") -> None:
        super().__init__(name, netns)
        self.settings = settings or NftSettings()
        # What the kernel holds, {4: piece keys, 6: piece keys}: the last full read-back, changed
        # by each commit since (ACKed, and its elements read back one by one right after it);
        # kept as the rules (nl.ProvenKeys) once a read-back proved the kernel holds a share.
        # None = unknown (read it before diffing); `_layout_ok` False = rebuild.
        self._held: dict[int, set[int] | nl.ProvenKeys] | None = None
        self._layout_ok = False
        self._full_at: datetime | None = None
        self._read_at: datetime | None = None
        self._scope: Literal["full", "touched"] = "full"
        # The ruleset generation (NFT_MSG_GETGEN) at which `_held` is known to be exactly what
        # the kernel holds: read at a full dump that no transaction overlapped, and carried
        # through each of blockd's own commits that was the only transaction in between. A
        # read-back at that same generation needs no dump: every change to nftables in this
        # network namespace, by anyone, is a transaction that moves it. None = unknown.
        self._clean_gen: int | None = None
        #: what `readback` returns while the generation stands: the share last applied in sync
        self._clean_share: tuple[int, RuleSet] | None = None
        #: how many read-backs the generation spared a dump (a metric-ready counter)
        self.readbacks_spared = 0

    # -- work, run in a thread (the async interface is nl.KernelEnforcer's) -------------------

    def _apply(self, desired: RuleSet) -> Applied:
        t0 = time.perf_counter()
        want = {4: piece_keys(4, desired.v4), 6: piece_keys(6, desired.v6)}
        if self._held is None:
            self._read_kernel()
        held = nl.as_sets(self._held) if self._layout_ok and self._held is not None else None
        if held is None:  # the rebuild deletes the table, and with it whatever it still held
            msgs = self._layout_msgs()
            stale = self._held or {4: set(), 6: set()}
            adds, dels = want, {4: set(), 6: set()}
        else:
            msgs = []
            adds = {v: want[v] - held[v] for v in want}
            dels = {v: held[v] - want[v] for v in want}
        add_by = {v: _by_shard(v, adds[v]) for v in (4, 6)}
        del_by = {v: _by_shard(v, dels[v]) for v in (4, 6)}
        # Deletes first: an add that overlaps a piece deleted in the same batch is legal then.
        for v in (4, 6):
            msgs += self._elem_msgs(DELSETELEM, v, del_by[v])
        for v in (4, 6):
            msgs += self._elem_msgs(NEWSETELEM, v, add_by[v])
        added = len(adds[4]) + len(adds[6])
        removed = len(dels[4]) + len(dels[6]) if held is not None else len(stale[4]) + len(stale[6])
        if msgs:
            self._commit(msgs, added + removed)
        t_read = time.perf_counter()
        if held is None:
            self._read_kernel()  # a new table: read all of it back
        elif msgs:
            self._held = want
            if self._dump_is_cheaper(added + removed):
                self._read_kernel()
            elif not self._elements_hold(adds, dels):
                log.warning("nft_readback_differs", enforcer=self.name, added=added, removed=removed)
                self._read_kernel()  # something else changed the table: read all of it
        self.last_readback_s = time.perf_counter() - t_read
        assert self._held is not None
        equal = self._held is want or self._held == want
        digest = desired.digest if equal else self._held_ruleset().digest
        if equal:
            self._held = self._proven(desired, {v: len(want[v]) for v in (4, 6)})
            if self._clean_gen is not None:
                self._clean_share = (self._clean_gen, desired)
        applied = Applied(
            enforcer=self.name,
            digest=digest,
            desired_digest=desired.digest,
            added=added,
            removed=removed,
            duration_s=time.perf_counter() - t0,
            counts={"ipv4_elements": len(self._held[4]), "ipv6_elements": len(self._held[6])},
            readback_scope=self._scope,
            readback_at=self._read_at,
            full_readback_at=self._full_at,
        )
        log.info("ruleset_applied", enforcer=self.name, added=added, removed=removed,
                 rebuilt=held is None, readback=self._scope, in_sync=equal,
                 duration_s=round(applied.duration_s, 4))
        return applied

    def _apply_plan(self, desired: RuleSet, plan: Plan) -> Applied | None:
        """Commit only `plan`, which starts from exactly what `_held` holds; read back what it
        touched. None (nothing sent) when the plan does not fit `_held`."""
        t0 = time.perf_counter()
        held = self._held
        if held is None or not self._layout_ok:
            return None
        adds = {4: plan_keys(4, plan.add_v4), 6: plan_keys(6, plan.add_v6)}
        dels = {4: plan_keys(4, plan.del_v4), 6: plan_keys(6, plan.del_v6)}
        for v in (4, 6):
            same = adds[v] & dels[v]  # a piece both deleted and added (a shard cut): leave it
            adds[v] -= same
            dels[v] -= same
            if not dels[v] <= held[v] or any(k in held[v] for k in adds[v]):
                log.debug("nft_plan_does_not_fit", enforcer=self.name, family=v)
                return None
        add_by = {v: _by_shard(v, adds[v]) for v in (4, 6)}
        del_by = {v: _by_shard(v, dels[v]) for v in (4, 6)}
        msgs = [m for v in (4, 6) for m in self._elem_msgs(DELSETELEM, v, del_by[v])]
        msgs += [m for v in (4, 6) for m in self._elem_msgs(NEWSETELEM, v, add_by[v])]
        added, removed = len(adds[4]) + len(adds[6]), len(dels[4]) + len(dels[6])
        if msgs:
            self._commit(msgs, added + removed)
            # what it holds now: the desired share (the plan is the diff to it from what it held)
            self._held = held = self._proven(nl.addresses(desired),
                                             {v: len(held[v]) - len(dels[v]) + len(adds[v]) for v in (4, 6)})
        t_read = time.perf_counter()
        if msgs and self._dump_is_cheaper(added + removed):
            self._read_kernel()
            equal = self._held == held
            if equal:
                self._held = held
        else:
            equal = not msgs or self._elements_hold(adds, dels)
        if not equal:
            log.warning("nft_readback_differs", enforcer=self.name, added=added, removed=removed)
            self._read_kernel()  # something else changed the table: read all of it
        elif self._clean_gen is not None:
            self._clean_share = (self._clean_gen, nl.addresses(desired))
        self.last_readback_s = time.perf_counter() - t_read
        share = nl.share_digest(desired)
        assert self._held is not None
        applied = Applied(
            enforcer=self.name, digest=share if equal else self._held_ruleset().digest, desired_digest=share,
            added=added, removed=removed, duration_s=time.perf_counter() - t0,
            counts={"ipv4_elements": len(self._held[4]), "ipv6_elements": len(self._held[6])},
            readback_scope=self._scope, readback_at=self._read_at, full_readback_at=self._full_at,
        )
        log.info("ruleset_applied", enforcer=self.name, added=added, removed=removed, path="plan",
                 readback=self._scope, in_sync=applied.in_sync, duration_s=round(applied.duration_s, 4))
        return applied

    def _elements_hold(self, adds: dict[int, set[int]], dels: dict[int, set[int]]) -> bool:
        """Read back each element a commit touched, one GETSETELEM of a point each (QUERY_CHUNK to a datagram).

        The kernel answers a point with the element holding it: a start query gives the start
        of the interval containing the point (the last element at or below it is a start), an
        end query the end element of that interval. So an added piece [f, l] is held exactly
        when a start query of l answers f and an end query of l + 1 answers l + 1; a deleted
        piece is gone when a start query of f and of l answers nothing, or the start of a piece
        added in the same commit that covers the point. Elements nobody committed (added
        behind blockd's back elsewhere) are the drift check's full read-back to find.
        """
        at = datetime.now(timezone.utc)
        reqs: list[bytes] = []
        #: per request: (family, the key the answer must carry, None = no answer), in order
        expect: list[tuple[int, int | None]] = []
        for v in (4, 6):
            top = (1 << FAMILY[v][0]) - 1
            added = sorted(split_key(v, k) for k in adds[v])
            starts = [f for f, _ in added]
            for f, l in added:
                reqs.append(self._get_elem(v, f, l, end=False))
                expect.append((v, f))
                if l != top:
                    reqs.append(self._get_elem(v, f, l + 1, end=True))
                    expect.append((v, l + 1))
            for k in dels[v]:
                f, l = split_key(v, k)
                for point in (f, l):
                    j = bisect_right(starts, point) - 1
                    reqs.append(self._get_elem(v, f, point, end=False))
                    expect.append((v, added[j][0] if j >= 0 and added[j][1] >= point else None))
        try:
            answers = self._sock.query(reqs)
        except OSError as exc:
            self._held = None
            raise _error(self.name, exc.errno, f"read back the elements just committed: {exc.strerror}") from exc
        for (v, want_key), (code, replies) in zip(expect, answers):
            if code not in (0, ENOENT):
                self._held = None
                raise _error(self.name, code, f"read back an element just committed: {os.strerror(code)}")
            got = [key for p in replies for key, _end in nl.element_keys(FAMILY[v][0], p)]
            if (got[0] if code == 0 and got else None) != want_key:
                return False
        self._read_at, self._scope = at, "touched"
        return True

    def _proven(self, share: RuleSet, counts: dict[int, int]) -> dict[int, set[int] | nl.ProvenKeys]:
        return {v: nl.ProvenKeys(share, v, counts[v], piece_keys, piece_held) for v in (4, 6)}

    def _dump_is_cheaper(self, touched: int) -> bool:
        """Whether reading the whole table back costs less than asking for each of `touched`
        pieces: a point read is two GETSETELEM round trips in the kernel's interval set (about
        50 us a piece), a dump about 2.5 us per element, two elements per piece (measured at
        1M: 1M points 51 s, the whole table 5 s)."""
        assert self._held is not None
        return touched * TOUCHED_READ_COST > len(self._held[4]) + len(self._held[6])

    def _get_elem(self, version: int, first: int, point: int, *, end: bool) -> bytes:
        """GETSETELEM of `point` in the shard set of the piece starting at `first` (a piece's end
        element, last + 1, may lie in the next shard's range but is in its piece's set)."""
        klen = FAMILY[version][0] // 8
        elem = nest(1, nest(1, attr(1, point.to_bytes(klen, "big"))) + (attr_be32(3, 1) if end else b""))
        return self._msg(GETSETELEM, 0, attr_str(1, self.settings.table)
                         + attr_str(2, f"v{version}_{shard(version, first):02x}") + nest(3, elem))

    def _commit(self, msgs: list[bytes], elements: int) -> None:
        t0 = time.perf_counter()
        before = self._generation()
        clean, self._clean_gen, self._clean_share = self._clean_gen, None, None
        try:
            failures = self._sock.transact(msgs, nl.NFNL_SUBSYS_NFTABLES)
        except OSError as exc:
            self._held = None  # e.g. ENOBUFS while reading ACKs: the outcome is unknown
            raise _error(self.name, exc.errno, f"nftables transaction: {exc.strerror}") from exc
        after = self._generation()
        if not failures and clean is not None and before == clean and after == (clean + 1) & 0xFFFFFFFF:
            self._clean_gen = after  # this commit was the only transaction since `_held` was exact
        if failures:
            self._held = None  # the batch was aborted; re-read the kernel before the next diff
            first = failures[0]
            raise _error(self.name, first.errno,
                         f"nftables transaction of {len(msgs)} messages aborted, kernel state unchanged; "
                         f"{first.describe()}")
        size = sum(map(len, msgs))
        self.last_commit = nl.Commit(len(msgs), elements, size, time.perf_counter() - t0)
        log.debug("nft_commit", enforcer=self.name, messages=len(msgs), elements=elements, bytes=size,
                  duration_s=round(self.last_commit.duration_s, 4))

    def _readback(self, full: bool = False) -> RuleSet:
        gen = self._generation()
        if not full and gen is not None and gen == self._clean_gen and self._clean_share is not None \
                and self._clean_share[0] == gen:
            # Nothing in nftables changed since `_held` was exact: no 1M-element dump. The
            # statement says so: scope "touched" (nothing was), the rest as of the last dump.
            self._read_at, self._scope = datetime.now(timezone.utc), "touched"
            self.readbacks_spared += 1
            log.debug("nft_readback_spared", enforcer=self.name, generation=gen)
            return self._clean_share[1]
        self._read_kernel()
        held = self._held_ruleset()
        if self._share is not None and held.digest == self._share.digest and self._held is not None and self._layout_ok:
            held = self._share  # as applied: kept as its rules again, not as a million keys
            self._held = self._proven(held, {v: len(self._held[v]) for v in (4, 6)})
        if self._clean_gen is not None:
            self._clean_share = (self._clean_gen, held)
        return held

    @property
    def last_readback(self) -> tuple[Literal["full", "touched"], datetime | None, datetime | None]:
        """(scope, read at, last full dump at) of the last read-back, for the statement."""
        return self._scope, self._read_at, self._full_at

    def _generation(self) -> int | None:
        """The nftables ruleset generation of this network namespace (None if unreadable)."""
        try:
            (code, payloads), = self._sock.query([self._msg(GETGEN, 0, b"")])
        except (OSError, ValueError):
            return None
        if code != 0 or not payloads:
            return None
        gen = nl.attrs(payloads[0]).get(1)
        return nl.be(gen) if gen is not None else None

    def _held_ruleset(self) -> RuleSet:
        held = self._held if self._layout_ok and self._held is not None else {4: set(), 6: set()}
        if isinstance(held[4], nl.ProvenKeys) and isinstance(held[6], nl.ProvenKeys) and held[4].share is held[6].share:
            return held[4].share
        spans = {}
        for v in (4, 6):
            bits = FAMILY[v][0]
            mask = (1 << bits) - 1
            spans[v] = {k >> bits: k & mask for k in held[v]}
        return nl.held_ruleset(spans[4], spans[6])

    def _read_kernel(self) -> None:
        """Dump blockd's table: layout check (rules per chain), then every shard set."""
        at = datetime.now(timezone.utc)
        gen = self._generation()
        self._clean_gen = self._clean_share = None
        expected = self._expected_rules()
        counts: dict[str, int] = defaultdict(int)
        try:
            for payload in self._sock.dump(self._msg(GETRULE, nl.NLM_F_DUMP, attr_str(1, self.settings.table))):
                chain = nl.attrs(payload).get(2)
                if chain is not None:
                    counts[nl.text(chain)] += 1
            held: dict[int, set[int]] = {4: set(), 6: set()}
            for v in (4, 6):
                bits = FAMILY[v][0]
                for i in range(256):
                    held[v].update(first << bits | last for first, last in self._dump_shard(v, i))
        except OSError as exc:
            if exc.errno != 2:  # ENOENT: no table or no such set -> the layout is gone
                raise _error(self.name, exc.errno, f"read back table {self.settings.table!r}: {exc.strerror}") from exc
            self._held, self._layout_ok = {4: set(), 6: set()}, False
            self._full_at = self._read_at = at
            self._scope = "full"
            return
        self._layout_ok = all(counts.get(c, 0) == n for c, n in expected.items())
        self._held = held
        self._full_at = self._read_at = at
        self._scope = "full"
        if gen is not None and self._layout_ok and self._generation() == gen:
            self._clean_gen = gen  # no transaction overlapped the dump: `_held` is exact
        if not self._layout_ok:
            log.debug("nft_layout_incomplete", enforcer=self.name, table=self.settings.table)

    def _dump_shard(self, version: int, i: int) -> Iterator[tuple[int, int]]:
        req = self._msg(GETSETELEM, nl.NLM_F_DUMP,
                        attr_str(1, self.settings.table) + attr_str(2, f"v{version}_{i:02x}"))
        return nl.parse_intervals(FAMILY[version][0], self._sock.dump(req))

    def _stats(self) -> nl.KernelStats:
        counters: dict[str, tuple[int, int]] = {}
        req = self._msg(GETOBJ, nl.NLM_F_DUMP, attr_str(1, self.settings.table) + attr_be32(3, NFT_OBJECT_COUNTER))
        try:
            for payload in self._sock.dump(req):
                a = nl.attrs(payload)
                data = nl.attrs(a[4])
                counters[nl.text(a[2])] = (nl.be(data[2]), nl.be(data[1]))
        except OSError as exc:
            if exc.errno != 2:
                raise _error(self.name, exc.errno, f"read counters: {exc.strerror}") from exc
        held = self._held or {4: set(), 6: set()}
        # nftables exports no element count; these are the ACKed (or last read back) contents.
        elements = {"ipv4": len(held[4]), "ipv6": len(held[6])}
        return nl.KernelStats(self.name, MappingProxyType(elements), MappingProxyType(counters))

    # -- layout -----------------------------------------------------------------------------

    def _msg(self, kind: int, flags: int, payload: bytes) -> bytes:
        return nl.msg((nl.NFNL_SUBSYS_NFTABLES << 8) | kind, flags, NFPROTO_INET, payload)

    def _expected_rules(self) -> dict[str, int]:
        s = self.settings
        out = {f"{d[0]}{v}_{i:02x}": 1 for d in s.directions for v in (4, 6) for i in range(256)}
        out.update({f"hook_{hook}": 2 * len(s.directions) for hook in s.hooks})
        if s.verdict == "reject":
            out["reject"] = 2
        return out

    def _layout_msgs(self) -> list[bytes]:
        s, t = self.settings, attr_str(1, self.settings.table)
        create = nl.NLM_F_CREATE
        # NFTA_SET_ID (mandatory) is the message index: unique within the batch.
        # "add table" first so that "delete table" cannot fail: together they empty it.
        out = [self._msg(NEWTABLE, create, t), self._msg(DELTABLE, 0, t), self._msg(NEWTABLE, create, t)]

        def chain(name: str, extra: bytes = b"") -> None:
            out.append(self._msg(NEWCHAIN, create, t + attr_str(3, name) + extra))

        def rule(chain_name: str, *exprs: bytes) -> None:
            out.append(self._msg(NEWRULE, create | NLM_F_APPEND, t + attr_str(2, chain_name) + nest(4, *exprs)))

        if s.verdict == "reject":
            chain("reject")
            rule("reject", _expr("meta", attr_be32(2, NFT_META_L4PROTO), attr_be32(1, 1)),
                 _expr("cmp", attr_be32(1, 1), attr_be32(2, 0), _value(3, bytes([socket.IPPROTO_TCP]))),
                 _expr("reject", attr_be32(1, NFT_REJECT_TCP_RST)))
            rule("reject", _expr("reject", attr_be32(1, NFT_REJECT_ICMPX_UNREACH),
                                 attr(2, bytes([NFT_REJECT_ICMPX_ADMIN_PROHIBITED]))))
        if s.verdict == "drop":
            action = [_expr("immediate", attr_be32(1, 0), _verdict(NF_DROP))]
        elif s.verdict == "reject":
            action = [_expr("immediate", attr_be32(1, 0), _verdict(NFT_JUMP, "reject"))]
        else:
            action = [_expr("log", attr_str(2, s.log_prefix))]
        for d in s.directions:
            for v in (4, 6):
                bits, offsets, _, _ = FAMILY[v]
                counter = f"{d}{v}"
                out.append(self._msg(NEWOBJ, create, t + attr_str(2, counter) + attr_be32(3, NFT_OBJECT_COUNTER)
                                     + nest(4, attr(1, bytes(8)), attr(2, bytes(8)))))
                if d == "daddr":  # the shard sets serve both directions
                    for i in range(256):
                        out.append(self._msg(NEWSET, create, t + attr_str(2, f"v{v}_{i:02x}")
                                             + attr_be32(3, NFT_SET_INTERVAL | NFT_SET_TIMEOUT)
                                             + attr_be32(12, GC_INTERVAL_MS)
                                             + attr_be32(4, TYPE_IPADDR if v == 4 else TYPE_IP6ADDR)
                                             + attr_be32(5, bits // 8) + attr_be32(10, len(out))))
                for i in range(256):
                    name = f"{d[0]}{v}_{i:02x}"
                    chain(name)
                    rule(name, _expr("payload", attr_be32(1, 1), attr_be32(2, 1), attr_be32(3, offsets[d]),
                                     attr_be32(4, bits // 8)),
                         _expr("lookup", attr_str(1, f"v{v}_{i:02x}"), attr_be32(2, 1)),
                         _expr("objref", attr_be32(1, NFT_OBJECT_COUNTER), attr_str(2, counter)),
                         *action)
                # The dispatch map: shard index -> jump to the shard chain.
                klen = 1 if v == 4 else 2
                out.append(self._msg(NEWSET, create, t + attr_str(2, counter) + attr_be32(3, NFT_SET_MAP)
                                     + attr_be32(4, TYPE_INTEGER) + attr_be32(5, klen)
                                     + attr_be32(6, NFT_DATA_VERDICT) + attr_be32(10, len(out))))
                elems = b"".join(
                    nest(1, _value(1, (i if v == 4 else i << 4).to_bytes(klen, "big")),
                         _verdict(NFT_JUMP, f"{d[0]}{v}_{i:02x}"))
                    for i in range(256))
                out.append(self._msg(NEWSETELEM, create, t + attr_str(2, counter) + nest(3, elems)))
        for hook in s.hooks:
            chain(f"hook_{hook}", nest(4, attr_be32(1, HOOKS[hook]), attr_be32(2, s.priority))
                  + attr_be32(5, NF_ACCEPT) + attr_str(7, "filter"))
            for d in s.directions:
                for v in (4, 6):
                    rule(f"hook_{hook}", *self._dispatch(v, d))
        return out

    @staticmethod
    def _dispatch(version: int, direction: str) -> list[bytes]:
        """`meta nfproto ipvX` + load the shard bits of the address + vmap lookup."""
        bits, offsets, _, _ = FAMILY[version]
        proto = NFPROTO_IPV4 if version == 4 else NFPROTO_IPV6
        exprs = [
            _expr("meta", attr_be32(2, NFT_META_NFPROTO), attr_be32(1, 1)),
            _expr("cmp", attr_be32(1, 1), attr_be32(2, 0), _value(3, bytes([proto]))),
            _expr("payload", attr_be32(1, 1), attr_be32(2, 1), attr_be32(3, offsets[direction]),
                  attr_be32(4, 1 if version == 4 else 2)),
        ]
        if version == 6:  # keep bits 4-11 of the first 16 (see `shard`)
            exprs.append(_expr("bitwise", attr_be32(1, 1), attr_be32(2, 1), attr_be32(3, 2),
                               _value(4, b"\x0f\xf0"), _value(5, b"\x00\x00")))
        exprs.append(_expr("lookup", attr_str(1, f"{direction}{version}"), attr_be32(2, 1), attr_be32(3, 0)))
        return exprs

    def _elem_msgs(self, kind: int, version: int, by_shard: dict[int, list[tuple[int, int]]]) -> list[bytes]:
        chunk = FAMILY[version][3]
        flags = nl.NLM_F_CREATE if kind == NEWSETELEM else 0
        t = attr_str(1, self.settings.table)
        out = []
        for i, shard_items in sorted(by_shard.items()):
            shard_items.sort()
            head = t + attr_str(2, f"v{version}_{i:02x}")
            for k in range(0, len(shard_items), chunk):
                out.append(self._msg(kind, flags, head + nest(3, nl.pack_intervals(FAMILY[version][0], shard_items[k:k + chunk]))))
        return out


def _by_shard(version: int, keys: set[int]) -> dict[int, list[tuple[int, int]]]:
    """Piece keys -> shard index -> [(first, last)]."""
    out: dict[int, list[tuple[int, int]]] = defaultdict(list)
    for key in keys:
        first, last = split_key(version, key)
        out[shard(version, first)].append((first, last))
    return out


def _error(enforcer: str, code: int | None, message: str) -> EnforcerError:
    """The one place kernel/socket errors become EnforcerError (by errno, never by text)."""
    return EnforcerError(enforcer, message, errno=code)
