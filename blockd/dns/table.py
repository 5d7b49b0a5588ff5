"""RuleSet -> immutable lookup table of blocked names, and the bytes of a blocked answer.

Keys are lowercase wire-format names (`b'\\x07example\\x03com\\x00'`), so a query is looked up
by slicing its own lowercased qname at label boundaries: O(labels) dict probes, no decoding.

Precedence (documented in docs/dns.md):
1. An enforcing rule beats a log-only (shadow) rule, wherever both match.
2. Otherwise the most specific matching rule wins: an exact rule or a subtree rule at the
   query name itself (their orders are combined), then subtree rules from the longest suffix up.
3. Among the orders of the winning rule, the answer mode ranks MODE_RANK (nxdomain, nodata,
   sinkhole, refused, drop, log); ties go to the smallest order id. That order's id, authority
   and reference are named in the EDE text (`ede_text`); the others are counted "+N more".

Persisted as a base (`Table.dump_base`: the whole table, atomically) and a journal beside it
(`append_journal`: per save after a patch, one checksummed record of the names touched, as the
table then holds them); `load_table` reads the base and every complete record in order (the
format is described above `JOURNAL_MAGIC`).
"""

from __future__ import annotations

import gc
import hashlib
import heapq
import io
import marshal
import os
import struct
from array import array
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass
from itertools import groupby, islice
from operator import itemgetter
from pathlib import Path
from types import MappingProxyType
from typing import NamedTuple

from blockd.digests import ADDR4, ADDR6, EMPTY, NAMES_EXACT, NAMES_SUBTREE, PartDigest, combine
from blockd.dns import sde, wire
from blockd.layered import ByIssuer
from blockd.model import DNS_ANSWERS, DomainRule, OrderInfo, RuleSet, seq_bisect

MODE_RANK = {m: i for i, m in enumerate(("nxdomain", "nodata", "sinkhole", "refused", "drop", "log"))}
assert set(MODE_RANK) == set(DNS_ANSWERS)
EDE_CODES = (15, 16, 17)  # Blocked, Censored, Filtered


@dataclass(frozen=True, slots=True)
class AnswerSettings:
    """How blocked names are answered (the part of SinkholeSettings the table needs)."""

    default_answer: str = "nxdomain"  # for orders whose dns_answer is None
    override_answer: str | None = None  # e.g. "log" to run the whole table in shadow mode
    ede_code: int = 16
    sinkhole_v4: str | None = None
    sinkhole_v6: str | None = None
    answer_ttl: int = 60  # TTL of sinkhole A/AAAA
    negative_ttl: int = 300  # SOA TTL and MINIMUM: how long a resolver in front caches the block
    soa_mname: str = "blockd.invalid"
    soa_rname: str = "hostmaster.blockd.invalid"
    #: structured DNS errors (blockd/dns/sde.py), for clients that ask for them
    sde_organization: str = ""
    sde_contact: tuple[str, ...] = ()
    sde_sub_error: int | None = None
    sde_option_code: int | None = None  # the SDE option's code (unassigned by IANA): unset, no client signals
    sde_language: str = "en"

    def __post_init__(self) -> None:
        for field, value in (("default_answer", self.default_answer), ("override_answer", self.override_answer)):
            if value is not None and value not in DNS_ANSWERS:
                raise ValueError(f"{field}: {value!r} is not an answer mode; valid: {', '.join(DNS_ANSWERS)}")
        if self.ede_code not in EDE_CODES:
            raise ValueError(f"ede_code: {self.ede_code!r}; valid: 15 (Blocked), 16 (Censored), 17 (Filtered)")


class Verdict:
    """What to answer for names held by one combination of orders (shared by many names)."""

    __slots__ = ("mode", "enforce", "rcode", "order", "orders", "own_orders", "text", "opt", "opt_sde",
                 "opt_sde_small", "opt_sde_bare")

    def __init__(self, mode: str, order: str | None, orders: frozenset[str], own: frozenset[str], text: str,
                 ede_code: int, sde_text: tuple[str, str | None] | None = None) -> None:
        self.mode = mode
        self.enforce = mode != "log"
        self.rcode = wire.REFUSED if mode == "refused" else wire.NXDOMAIN if mode == "nxdomain" else wire.NOERROR
        self.order = order
        self.orders = orders
        self.own_orders = own
        self.text = text
        ede = wire.ede_option(ede_code, text)
        self.opt = (wire.opt_rr(ede), wire.opt_rr(ede, do=True))  # by the query's DO bit
        # structured errors (sde.py): the full JSON, and for a UDP answer it would push past the
        # client's payload size the compact JSON (no j, o), then the EDE without EXTRA-TEXT
        self.opt_sde = self.opt_sde_small = self.opt_sde_bare = self.opt
        if sde_text is not None:
            full, small, bare = (wire.ede_option(ede_code, t) for t in (sde_text[0], sde_text[1] or "", ""))
            self.opt_sde = (wire.opt_rr(full), wire.opt_rr(full, do=True))
            self.opt_sde_small = (wire.opt_rr(small), wire.opt_rr(small, do=True))
            self.opt_sde_bare = (wire.opt_rr(bare), wire.opt_rr(bare, do=True))


def ede_text(order: str | None, info: OrderInfo | _Info | None, others: int) -> str:
    """The EXTRA-TEXT of a blocked answer (the one place it is built): the order id first, then
    its authority, reference and URL, within `wire.EDE_TEXT_MAX` bytes (cut with a visible mark),
    so a long authority name can never push the order id out."""
    if order is None:
        return "Blocked by policy"
    text = f"Blocked by order {order}"
    if info is not None:
        text += f" of {info.authority} ({info.reference})"
        if info.url:
            text += f", see {info.url}"
    if others:
        text += f"; +{others} more order(s)"
    return wire.cap_text(text)


class _Info(NamedTuple):
    """What of an order a verdict shows (the part of OrderInfo a table file keeps)."""

    authority: str
    reference: str
    url: str | None
    dns_answer: str | None


_MISS = object()


@contextmanager
def gc_paused() -> Iterator[None]:
    """No cyclic collection while millions of acyclic objects (keys, specs, rules) are made, and
    then none of them is ever scanned: they are frozen (gc.freeze) before the collector is back.
    Otherwise the next collection walks them all with the GIL held: 0.3-1 s at 1M names, a stall
    of every DNS answer. Frozen objects are still freed by reference counting when dropped."""
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        gc.freeze()
        if was_enabled:
            gc.enable()
_name = itemgetter(0)
#: slices of a dict copied at a time when the overlay is folded in (the GIL is released between)
_SLICE = 16384


class TableFileError(Exception):
    """A persisted table that is not served: why (missing, corrupt, stale, unreadable)."""

    def __init__(self, reason: str, detail: str) -> None:
        super().__init__(f"{reason}: {detail}")
        self.reason = reason
        self.detail = detail


#: a verdict index's orders: (own, combined), or the one set where they are the same (a name
#: only one rule names: nearly every name of a registry, 56 bytes each kept)
Spec = tuple[frozenset[str], frozenset[str]] | frozenset[str]


def _pair(spec: Spec) -> tuple[frozenset[str], frozenset[str]]:
    return spec if type(spec) is tuple else (spec, spec)  # type: ignore[return-value]


class _BuiltSpecs:
    """The orders (`Spec`) of each verdict index of a built table."""

    __slots__ = ("items", "_blob")

    def __init__(self, items: list[Spec]) -> None:
        self.items = items
        self._blob: tuple[bytes, array] | None = None  # type: ignore[type-arg]

    def blob(self, orders: Mapping[str, OrderInfo],
             pause: Callable[[], None] | None = None) -> tuple[bytes, array]:  # type: ignore[type-arg]
        """Every index's spec record, and their offsets: made on the first dump, then reused (an
        index's orders and what they show do not change while a base lives; a patch shadows
        the names it touches). `pause` is called between slices (see `Table.dump_base`)."""
        if self._blob is None:
            parts: list[bytes] = []
            items = self.items
            for i in range(0, len(items), _SLICE):
                if pause is not None:
                    pause()
                parts.extend(_spec_bytes(*_pair(spec), orders) for spec in items[i:i + _SLICE])
            off = array("Q", [0])
            total = 0
            for b in parts:
                total += len(b)
                off.append(total)
            self._blob = (b"".join(parts), off)
        return self._blob

    def __len__(self) -> int:
        return len(self.items)

    def get(self, i: int) -> tuple[frozenset[str], frozenset[str], Mapping[str, _Info] | None]:
        own, comb = _pair(self.items[i])
        return own, comb, None

    def own(self, i: int) -> frozenset[str]:
        return _pair(self.items[i])[0]

    def raw(self, i: int, orders: Mapping[str, OrderInfo]) -> bytes:
        if self._blob is not None:  # what a dump wrote for this index (the base's specs are frozen with it)
            blob, off = self._blob
            return blob[off[i]:off[i + 1]]
        return _spec_bytes(*_pair(self.items[i]), orders)


class _FileSpecs:
    """Verdict specs of a restored table: one marshal record per index in one blob, decoded
    when an index is first needed (a 1M-name table loads without building 1M verdicts)."""

    __slots__ = ("blob_bytes", "off")

    def __init__(self, blob: bytes, off: array) -> None:  # type: ignore[type-arg]
        self.blob_bytes = blob
        self.off = off

    def __len__(self) -> int:
        return len(self.off) - 1

    def blob(self, orders: Mapping[str, OrderInfo]) -> tuple[bytes, array]:  # type: ignore[type-arg]
        return self.blob_bytes, self.off

    def get(self, i: int) -> tuple[frozenset[str], frozenset[str], Mapping[str, _Info] | None]:
        own, comb, infos = marshal.loads(memoryview(self.blob_bytes)[self.off[i]:self.off[i + 1]])
        return frozenset(own), frozenset(comb), {oid: _Info(*rest) for oid, *rest in infos}

    def own(self, i: int) -> frozenset[str]:
        return frozenset(marshal.loads(memoryview(self.blob_bytes)[self.off[i]:self.off[i + 1]])[0])

    def raw(self, i: int, orders: Mapping[str, OrderInfo]) -> bytes:
        return self.blob_bytes[self.off[i]:self.off[i + 1]]


def _by_name(doms: Iterable[DomainRule]) -> Iterator[tuple[str, frozenset[str] | None, frozenset[str] | None]]:
    """Each name of a rule set's domains (sorted by name, then exact before subtree) with the
    orders of its exact rule and of its subtree rule (None: no such rule); duplicates (same
    name and kind) are merged. One pass of C-level iteration (groupby), no indexing."""
    for name, group in groupby(doms, itemgetter(0)):
        e_ords: frozenset[str] | None = None
        s_ords: frozenset[str] | None = None
        for _, sub, ords in group:
            if sub:
                s_ords = ords if s_ords is None else s_ords | ords
            else:
                e_ords = ords if e_ords is None else e_ords | ords
        yield name, e_ords, s_ords


def _spec_bytes(own: frozenset[str], comb: frozenset[str], orders: Mapping[str, OrderInfo | _Info]) -> bytes:
    get = orders.peek if isinstance(orders, ByIssuer) else orders.get  # a dump reads each once: not kept
    if len(comb) == 1 and own == comb:  # the common case (one order per name), without sorting
        (oid,) = comb
        i = get(oid)
        t = (oid,)
        return marshal.dumps((t, t, ((oid, i.authority, i.reference, i.url, i.dns_answer),) if i is not None else ()))
    infos = tuple((oid, i.authority, i.reference, i.url, i.dns_answer)
                  for oid in sorted(comb) if (i := get(oid)) is not None)
    return marshal.dumps((tuple(sorted(own)), tuple(sorted(comb)), infos))


class Table:
    """The names the sinkhole answers for, immutable once made; the server swaps one reference
    to change policy atomically (a query sees the old table or the new one, never a mix).

    `exact` and `subtree` map wire keys to verdict indices; the `Verdict` of an index is made
    when a query first needs it (`specs`), so building or loading 1M names does not render 1M
    answers. `patched` makes a new table that shares those (frozen) dicts and carries the names
    a change touched in two small overlay dicts (key -> Verdict, or None for a name removed);
    `merged` folds the overlay into new dicts, off the serving path, when it grows large.
    """

    __slots__ = ("exact", "subtree", "over_exact", "over_subtree", "verdicts", "specs", "orders", "settings",
                 "digest", "answers", "epoch", "size", "restored")

    def __init__(self, exact: dict[bytes, int], subtree: dict[bytes, int], verdicts: list[Verdict | None],
                 specs: _BuiltSpecs | _FileSpecs, orders: Mapping[str, OrderInfo], settings: AnswerSettings,
                 digest: str, answers: Answers | None = None, over_exact: dict[bytes, Verdict | None] | None = None,
                 over_subtree: dict[bytes, Verdict | None] | None = None, epoch: object | None = None,
                 size: int | None = None, restored: bool = False) -> None:
        self.exact = exact
        self.subtree = subtree
        self.over_exact = over_exact or {}
        self.over_subtree = over_subtree or {}
        self.verdicts = verdicts
        self.specs = specs
        self.orders = orders
        self.settings = settings
        self.digest = digest  # of the RuleSet (names) it was built from
        self.answers = answers or Answers(settings)
        #: tallies count hits per verdict per epoch (a new one on build, load and merge)
        self.epoch = epoch if epoch is not None else object()
        self.size = len(exact) + len(subtree) if size is None else size
        self.restored = restored

    @classmethod
    def empty(cls, settings: AnswerSettings | None = None) -> Table:
        return cls.build(RuleSet.empty(), settings or AnswerSettings())

    @classmethod
    def build(cls, rs: RuleSet, settings: AnswerSettings) -> Table:
        items: list[Spec] = []
        cache: dict[Spec, int] = {}

        def verdict(own: frozenset[str], combined: frozenset[str]) -> int:
            k = own if own is combined else (own, combined)
            v = cache.get(k)
            if v is None:
                v = cache[k] = len(items)
                items.append(k)
            return v

        with gc_paused():
            exact, subtree = cls._index(rs.domains, verdict)
        return cls(exact, subtree, [None] * len(items), _BuiltSpecs(items), rs.orders, settings, rs.digest)

    @staticmethod
    def _index(doms: Iterable[DomainRule], verdict: Callable[[frozenset[str], frozenset[str]], int]
               ) -> tuple[dict[bytes, int], dict[bytes, int]]:
        exact: dict[bytes, int] = {}
        subtree: dict[bytes, int] = {}
        to_wire = wire.name_to_wire
        for name, e_ords, s_ords in _by_name(doms):
            key = to_wire(name)
            if e_ords is None:
                assert s_ords is not None
                subtree[key] = verdict(s_ords, s_ords)
            elif s_ords is None:
                exact[key] = verdict(e_ords, e_ords)
            else:
                exact[key] = verdict(e_ords, e_ords | s_ords)
                subtree[key] = verdict(s_ords, s_ords)
        return exact, subtree

    # ---- the query path -------------------------------------------------------------------
    def _verdict(self, i: int) -> Verdict:
        """The verdict of index `i`, made on first use (idempotent: two threads may both make it)."""
        own, comb, infos = self.specs.get(i)
        v = _choose(own, comb, self.orders if infos is None else infos, self.settings)
        self.verdicts[i] = v
        return v

    def exact_verdict(self, key: bytes) -> Verdict | None:
        v = self.over_exact.get(key, _MISS)
        if v is _MISS:
            i = self.exact.get(key)
            return None if i is None else (self.verdicts[i] or self._verdict(i))
        return v  # type: ignore[return-value]

    def subtree_verdict(self, key: bytes) -> Verdict | None:
        v = self.over_subtree.get(key, _MISS)
        if v is _MISS:
            i = self.subtree.get(key)
            return None if i is None else (self.verdicts[i] or self._verdict(i))
        return v  # type: ignore[return-value]

    def holds(self, key: bytes, subtree: bool) -> bool:
        """Whether an entry for `key` is served (without making its verdict)."""
        over, base = (self.over_subtree, self.subtree) if subtree else (self.over_exact, self.exact)
        v = over.get(key, _MISS)
        return key in base if v is _MISS else v is not None

    def lookup(self, q: bytes, labels: list[int]) -> tuple[Verdict, int] | None:
        """`q` is the lowercased wire qname; returns the winning verdict and the label offset of
        the rule name inside q (0 for the name itself), or None if no rule matches."""
        if self.over_exact or self.over_subtree:
            return self._lookup_over(q, labels)
        st = self.subtree
        vs = self.verdicts
        i = self.exact.get(q)
        if i is None:
            i = st.get(q)
        shadow = None
        if i is not None:
            v = vs[i] or self._verdict(i)
            if v.enforce:
                return v, 0
            shadow = (v, 0)
        for k in labels[1:]:
            i = st.get(q[k:])
            if i is not None:
                v = vs[i] or self._verdict(i)
                if v.enforce:
                    return v, k
                if shadow is None:
                    shadow = (v, k)
        return shadow

    def _lookup_over(self, q: bytes, labels: list[int]) -> tuple[Verdict, int] | None:
        sub = self.subtree_verdict
        v = self.exact_verdict(q) or sub(q)
        if v is not None and v.enforce:
            return v, 0
        shadow = None if v is None else (v, 0)
        for k in labels[1:]:
            v = sub(q[k:])
            if v is not None:
                if v.enforce:
                    return v, k
                if shadow is None:
                    shadow = (v, k)
        return shadow

    def __len__(self) -> int:
        return self.size

    # ---- change -----------------------------------------------------------------------------
    def patched(self, rs: RuleSet, names: Iterable[str]) -> Table:
        """This table with the entries of `names` made again from `rs` (the rule set this table
        was built from, changed only in the rules of `names`): O(k log N), the base dicts shared."""
        doms = rs.domains
        n = len(doms)
        oe, os_ = dict(self.over_exact), dict(self.over_subtree)
        size = self.size
        cache: dict[tuple[frozenset[str], frozenset[str]], Verdict] = {}
        orders, settings = rs.orders, self.settings

        def verdict(own: frozenset[str], combined: frozenset[str]) -> Verdict:
            v = cache.get((own, combined))
            if v is None:
                v = cache[(own, combined)] = _choose(own, combined, orders, settings)
            return v

        for name in names:
            e_ords: frozenset[str] | None = None
            s_ords: frozenset[str] | None = None
            i = seq_bisect(doms, name, _name)
            while i < n and doms[i][0] == name:
                r = doms[i]
                if r[1]:
                    s_ords = r[2] if s_ords is None else s_ords | r[2]
                else:
                    e_ords = r[2] if e_ords is None else e_ords | r[2]
                i += 1
            key = wire.name_to_wire(name)
            ev = None if e_ords is None else verdict(e_ords, e_ords if s_ords is None else e_ords | s_ords)
            sv = None if s_ords is None else verdict(s_ords, s_ords)
            size += _put(oe, self.exact, key, ev, self.holds(key, False))
            size += _put(os_, self.subtree, key, sv, self.holds(key, True))
        return Table(self.exact, self.subtree, self.verdicts, self.specs, orders, settings, rs.digest, self.answers,
                     oe, os_, self.epoch, size, self.restored)

    @property
    def overlay(self) -> int:
        return len(self.over_exact) + len(self.over_subtree)

    def merged(self) -> Table:
        """The same table with the overlay folded into new base dicts. Meant for a worker thread:
        the dicts are copied a slice at a time, so the serving thread waits for the GIL at most
        one slice (well under a millisecond), never for a whole 1M-entry copy."""
        if not self.overlay:
            return self
        vs = list(self.verdicts)
        with gc_paused():
            exact, subtree = _copy(self.exact), _copy(self.subtree)
        for over, base in ((self.over_exact, exact), (self.over_subtree, subtree)):
            for key, v in over.items():
                old = base.pop(key, None)
                if old is not None and old >= len(self.specs):
                    vs[old] = None  # a verdict a merge appended for this key alone: free it
                if v is not None:
                    base[key] = len(vs)
                    vs.append(v)
        return Table(exact, subtree, vs, self.specs, self.orders, self.settings, self.digest, self.answers,
                     size=self.size, restored=self.restored)

    # ---- read-back --------------------------------------------------------------------------
    def _own(self, i: int) -> frozenset[str]:
        v = self.verdicts[i]
        return v.own_orders if v is not None else self.specs.own(i)

    def entries(self, subtree: bool) -> Iterator[tuple[bytes, frozenset[str]]]:
        """(wire key, own orders) of every entry served, exact or subtree."""
        base, over = (self.subtree, self.over_subtree) if subtree else (self.exact, self.over_exact)
        own = self._own
        for key, i in base.items():
            if key not in over:
                yield key, own(i)
        for key, v in over.items():
            if v is not None:
                yield key, v.own_orders

    def to_ruleset(self) -> RuleSet:
        """The RuleSet this table serves (names from the keys, order ids from the verdicts).

        Sorted in slices merged lazily, and digested from the sorted rules: no single C call
        over all N rules (a 1M-element sort holds the GIL, and the serving thread, for a second)."""
        name = wire.wire_to_name
        with gc_paused():
            doms = [DomainRule(name(k), False, o) for k, o in self.entries(False)]
            doms += [DomainRule(name(k), True, o) for k, o in self.entries(True)]
            runs = [sorted(doms[i:i + _SLICE]) for i in range(0, len(doms), _SLICE)]
            ordered = tuple(heapq.merge(*runs)) if len(runs) > 1 else tuple(runs[0] if runs else ())
            e = PartDigest.of(NAMES_EXACT, [r[0] for r in ordered if not r[1]])
            s = PartDigest.of(NAMES_SUBTREE, [r[0] for r in ordered if r[1]])
        parts = (e, s, EMPTY[ADDR4], EMPTY[ADDR6])
        return RuleSet(ordered, (), (), MappingProxyType({}), combine(*parts), parts)

    def serves_exactly(self, rs: RuleSet) -> bool:
        """Whether this table holds exactly the names of `rs` (each exact and subtree rule, with
        its own orders) and nothing else: a full read-back by lookups, cheaper than decoding
        every key (`name_parts`). True means the table's digest is `rs`'s names digest."""
        to_wire = wire.name_to_wire
        own = self._own
        seen = [0, 0]
        with gc_paused():
            for name, e_ords, s_ords in _by_name(rs.domains):
                key = to_wire(name)
                for sub, ords in ((0, e_ords), (1, s_ords)):
                    if ords is None:
                        continue
                    over, base = (self.over_subtree, self.subtree) if sub else (self.over_exact, self.exact)
                    v = over.get(key, _MISS)
                    if v is _MISS:
                        k = base.get(key)
                        if k is None or own(k) != ords:
                            return False
                    elif v is None or v.own_orders != ords:  # type: ignore[union-attr]
                        return False
                    seen[sub] += 1
        held_e = sum(1 for _ in self.entries(False)) if self.over_exact else len(self.exact)
        held_s = sum(1 for _ in self.entries(True)) if self.over_subtree else len(self.subtree)
        return seen == [held_e, held_s]

    def name_parts(self) -> tuple[PartDigest, PartDigest]:
        """The digests of the exact and subtree names served (a full read-back, without
        building a RuleSet: no sort of N rules)."""
        name = wire.wire_to_name
        with gc_paused():
            return (PartDigest.of(NAMES_EXACT, [name(k) for k, _ in self.entries(False)]),
                    PartDigest.of(NAMES_SUBTREE, [name(k) for k, _ in self.entries(True)]))

    # ---- persistence ------------------------------------------------------------------------
    def dump(self, path: Path, meta: Mapping[str, object]) -> int:
        """Write this table to `path` atomically (`dump_base`); returns the bytes written."""
        return self.dump_base(path, meta)[0]

    def dump_base(self, path: Path, meta: Mapping[str, object],
                  pause: Callable[[], None] | None = None) -> tuple[int, bytes]:
        """Write this table to `path` atomically (temp file, fsync, rename, fsync of the
        directory); returns the bytes written and the file's checksum (the base a journal
        names, `append_journal`). Format: MAGIC, SHA-256 of the rest, then marshal
        records: (format, meta, counts), the exact keys in slices, their spec indices (uint32),
        the same for subtree keys, the spec blob and its offsets (uint64).

        Spec indices are the base's own (its spec blob is made once per base and reused, a
        loaded table's is the file's), so a dump after a small change is mostly C-level copies;
        the overlay's verdicts and those a merge appended get specs after them.

        `pause` (a worker thread's call, between slices) lets the caller hold a long dump back
        while something more urgent runs (the daemon's pass: a change is not slowed down by
        the first save of a million-name table)."""
        out = io.BytesIO()
        with gc_paused():
            base_blob, base_off = (self.specs.blob(self.orders, pause) if isinstance(self.specs, _BuiltSpecs)
                                   else self.specs.blob(self.orders))
            extra: list[bytes] = []
            nspec = len(self.specs)
            appended: dict[int, int] = {}
            sections: list[tuple[list[bytes], array]] = []  # type: ignore[type-arg]
            for base, over in ((self.exact, self.over_exact), (self.subtree, self.over_subtree)):
                if over:
                    keys = [k for k in base if k not in over]
                    idx = array("I", [base[k] for k in keys])
                else:
                    keys, idx = list(base), array("I", base.values())
                if len(self.verdicts) > nspec:  # verdicts a merge appended: specs of their own
                    for j, i in enumerate(idx):
                        if i >= nspec:
                            if i not in appended:
                                v = self.verdicts[i]
                                assert v is not None
                                appended[i] = nspec + len(extra)
                                extra.append(_spec_bytes(v.own_orders, v.orders, self.orders))
                            idx[j] = appended[i]
                for k, v in over.items():
                    if v is not None:
                        keys.append(k)
                        idx.append(nspec + len(extra))
                        extra.append(_spec_bytes(v.own_orders, v.orders, self.orders))
                sections.append((keys, idx))
            off = array("Q", base_off)
            total = off[-1]
            for x in extra:
                total += len(x)
                off.append(total)
            _record(out, (TABLE_FORMAT, dict(meta), len(sections[0][0]), len(sections[1][0])))
            for keys, idx in sections:
                # in slices: one marshal call of 1M keys would hold the GIL for a long while
                for i in range(0, len(keys), _SLICE):
                    if pause is not None:
                        pause()
                    _record(out, keys[i:i + _SLICE])
                _record(out, idx.tobytes())
            _record(out, base_blob + b"".join(extra) if extra else base_blob)
            _record(out, off.tobytes())
        payload = out.getbuffer()
        checksum = hashlib.sha256(payload).digest()
        data = TABLE_MAGIC + checksum + payload
        tmp = path.with_name(f".{path.name}.tmp")
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        try:
            with os.fdopen(fd, "wb") as f:
                f.write(data)
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        except BaseException:
            tmp.unlink(missing_ok=True)
            raise
        dfd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)
        return len(data), checksum

    @classmethod
    def load(cls, path: Path, settings: AnswerSettings, journal: Path | None = None
             ) -> tuple[Table, dict[str, object]]:
        """The table written by `dump` (and extended by the records of `journal`), and its meta;
        TableFileError (with the reason) if the base is missing, unreadable, not a table file,
        or does not match its own checksum. A journal's damaged tail is dropped (`load_table`
        says so)."""
        got = load_table(path, settings, journal)
        return got.table, got.meta

    def journal_entries(self, keys: Iterable[bytes]) -> list[tuple[bytes, bytes | None, bytes | None]]:
        """(key, exact spec, subtree spec) as this table holds each of `keys` (None: no entry of
        that kind): a journal record's body. The spec bytes are those `dump` writes."""
        out = []
        for key in keys:
            out.append((key, self._spec_of(key, self.over_exact, self.exact),
                        self._spec_of(key, self.over_subtree, self.subtree)))
        return out

    def _spec_of(self, key: bytes, over: dict[bytes, Verdict | None], base: dict[bytes, int]) -> bytes | None:
        v = over.get(key, _MISS)
        if v is _MISS:
            i = base.get(key)
            if i is None:
                return None
            if i < len(self.specs):
                return self.specs.raw(i, self.orders)
            v = self.verdicts[i]  # appended by a merge: its verdict is held
            assert v is not None
        if v is None:
            return None
        return _spec_bytes(v.own_orders, v.orders, self.orders)  # type: ignore[union-attr]

    def order_hits(self) -> dict[str, int]:  # kept for callers of the old interface: no hits here
        return {}


TABLE_MAGIC = b"BLOCKD-DNS-TABLE\n"
#: 2: the base may have a journal beside it (the same sections as 1): a blockd that reads only
#: format 1 (no journal) refuses it rather than serve an older table than the journal's
TABLE_FORMAT = 2
#: formats this blockd loads (a format-1 base, from before the journal, is a base with none)
TABLE_FORMATS_READ = (1, 2)

# ---- the journal beside a base ------------------------------------------------------------------
#
# A save after a patch appends one record instead of writing the whole table again:
#
#   file    JOURNAL_MAGIC, uint32 JOURNAL_FORMAT, the base's checksum (32 bytes), then records
#   record  uint64 body length, SHA-256 of the body (32 bytes), body = marshal of
#           (JOURNAL_FORMAT, base checksum, sequence number from 1, meta, entries)
#   entry   (wire key, exact spec bytes or None, subtree spec bytes or None): the key's entries
#           as the table then held them (None: that kind is not held)
#
# Load = the base, then every record in order while each is complete, checks out against its
# own checksum, names this base and carries the next sequence number; the first that does not
# (a crash mid-append, a full disk, a flipped byte) ends the journal there, so what is loaded
# is always a table that was saved whole. A journal naming another base (a new base was
# written and the process stopped before the journal was reset) is ignored whole.

JOURNAL_MAGIC = b"BLOCKD-DNS-JOURNAL\n"
JOURNAL_FORMAT = 1
_JHEAD = struct.Struct("<I32s")
_JREC = struct.Struct("<Q32s")
JOURNAL_HEADER = len(JOURNAL_MAGIC) + _JHEAD.size


@dataclass(frozen=True, slots=True)
class JournalPos:
    """Where a journal stands: the base it applies to (its checksum), the sequence number of its
    last record, its length in bytes up to the end of that record (0: not started), and how
    many entries its records carry (what the compaction bound counts)."""

    base: bytes
    seq: int = 0
    length: int = 0
    entries: int = 0


@dataclass(frozen=True, slots=True)
class Loaded:
    """A table read back from its base and journal (`load_table`)."""

    table: Table
    meta: dict[str, object]
    #: where the journal stands, to append the next record after the last good one (None: the
    #: journal could not be read, the next save writes a new base)
    journal: JournalPos | None
    #: records applied on top of the base
    records: int
    #: why records were dropped from the journal's tail (reason "journal_dropped": torn, damaged,
    #: unreadable, another format) or the journal ignored whole ("journal_other_base": it names
    #: another base, after a crash between a new base and the journal's removal), None if neither
    dropped: TableFileError | None


def load_table(path: Path, settings: AnswerSettings, journal: Path | None = None) -> Loaded:
    """The base at `path` and the complete records of `journal` applied in order (see above).

    TableFileError if the base does not check out (missing, unreadable, corrupt), or if the
    journal's last applied record does not hold the number of names its meta says."""
    exact, subtree, blob, off, meta, checksum = _load_base(path)
    nspec = len(off) - 1
    pos: JournalPos | None = JournalPos(checksum)
    records = 0
    dropped: TableFileError | None = None
    if journal is not None:
        recs, pos, dropped = read_journal(journal, checksum)
        if recs:
            extra: list[bytes] = []
            known: dict[bytes, int] = {}
            with gc_paused():
                for rec_meta, entries in recs:
                    for key, e, s in entries:
                        for d, spec in ((exact, e), (subtree, s)):
                            if spec is None:
                                d.pop(key, None)
                                continue
                            i = known.get(spec)
                            if i is None:
                                i = known[spec] = nspec + len(extra)
                                extra.append(spec)
                            d[key] = i
                    if rec_meta.get("names") != len(exact) + len(subtree):
                        raise TableFileError("corrupt", f"{journal}: record {records + 1} leaves "
                                             f"{len(exact) + len(subtree)} names, its meta says {rec_meta.get('names')!r}")
                    records += 1
                    meta = rec_meta
            total = off[-1]
            for x in extra:
                total += len(x)
                off.append(total)
            blob = blob + b"".join(extra)
            nspec = len(off) - 1
    t = Table(exact, subtree, [None] * nspec, _FileSpecs(blob, off), {}, settings,
              str(meta.get("digest", "")), restored=True)
    return Loaded(t, meta, pos, records, dropped)


def _load_base(path: Path) -> tuple[dict[bytes, int], dict[bytes, int], bytes, array, dict[str, object], bytes]:  # type: ignore[type-arg]
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        raise TableFileError("missing", f"{path} does not exist") from None
    except OSError as e:
        raise TableFileError("unreadable", f"{path}: {e.strerror or e}") from None
    head = len(TABLE_MAGIC)
    if data[:head] != TABLE_MAGIC:
        raise TableFileError("corrupt", f"{path}: not a blockd table file (magic {data[:head]!r})")
    payload = memoryview(data)[head + 32:]
    checksum = data[head:head + 32]
    if hashlib.sha256(payload).digest() != checksum:
        raise TableFileError("corrupt", f"{path}: checksum mismatch ({len(data)} bytes)")
    try:
        src = _Records(payload)
        fmt, meta, n_e, n_s = src.next()
        if fmt not in TABLE_FORMATS_READ:
            raise TableFileError("corrupt", f"{path}: format {fmt!r}, this blockd reads "
                                 f"{', '.join(map(str, TABLE_FORMATS_READ))}")
        with gc_paused():
            ekeys, eidx = _read_keys(src, n_e)
            skeys, sidx = _read_keys(src, n_s)
        blob = src.next()
        e_i, s_i, off = array("I"), array("I"), array("Q")
        e_i.frombytes(eidx)
        s_i.frombytes(sidx)
        off.frombytes(src.next())
        nspec = len(off) - 1
        if (len(e_i) != len(ekeys) or len(s_i) != len(skeys) or nspec < 0 or not isinstance(blob, bytes)
                or max(e_i, default=0) >= max(nspec, 1) or max(s_i, default=0) >= max(nspec, 1)
                or off[-1] != len(blob) or not isinstance(meta, dict)):
            raise TableFileError("corrupt", f"{path}: inconsistent sections")
    except (ValueError, TypeError, EOFError, IndexError) as e:
        raise TableFileError("corrupt", f"{path}: {e}") from None
    with gc_paused():
        exact, subtree = dict(zip(ekeys, e_i)), dict(zip(skeys, s_i))
    return exact, subtree, blob, off, meta, checksum


def read_journal(path: Path, base: bytes
                 ) -> tuple[list[tuple[dict[str, object], list[tuple[bytes, bytes | None, bytes | None]]]],
                            JournalPos | None, TableFileError | None]:
    """The complete records of the journal at `path` that apply to `base` (see above): their
    (meta, entries), where the journal stands after the last of them, and why the rest was
    dropped (None: nothing was). A missing journal is an empty one."""
    fresh = JournalPos(base)
    try:
        data = path.read_bytes()
    except FileNotFoundError:
        return [], fresh, None
    except OSError as e:
        return [], None, TableFileError("journal_dropped", f"{path}: unreadable: {e.strerror or e}")
    if not data:
        return [], fresh, None
    head = len(JOURNAL_MAGIC)
    if len(data) < JOURNAL_HEADER or data[:head] != JOURNAL_MAGIC:
        return [], fresh, TableFileError("journal_dropped", f"{path}: not a blockd journal "
                                         f"(magic {data[:head]!r}, {len(data)} bytes); ignored")
    fmt, jbase = _JHEAD.unpack_from(data, head)
    if fmt != JOURNAL_FORMAT:
        return [], fresh, TableFileError("journal_dropped", f"{path}: format {fmt!r}, this blockd reads "
                                         f"{JOURNAL_FORMAT}; ignored")
    if jbase != base:
        return [], fresh, TableFileError("journal_other_base", f"{path}: written for another base "
                                         f"({jbase.hex()[:16]}, the base is {base.hex()[:16]}); ignored")
    out: list[tuple[dict[str, object], list[tuple[bytes, bytes | None, bytes | None]]]] = []
    p = JOURNAL_HEADER
    entries_total = 0
    why = None
    view = memoryview(data)
    while p < len(data):
        seq = len(out) + 1
        if p + _JREC.size > len(data):
            why = f"record {seq} is torn (its header is {len(data) - p} of {_JREC.size} bytes)"
            break
        n, digest = _JREC.unpack_from(data, p)
        end = p + _JREC.size + n
        if end > len(data):
            why = f"record {seq} is torn ({len(data) - p - _JREC.size} of {n} bytes)"
            break
        body = view[p + _JREC.size:end]
        if hashlib.sha256(body).digest() != digest:
            why = f"record {seq} does not match its checksum"
            break
        rec = _journal_body(body, base, seq)
        if isinstance(rec, str):
            why = f"record {seq}: {rec}"
            break
        out.append(rec)
        entries_total += len(rec[1])
        p = end
    pos = JournalPos(base, len(out), p if out else JOURNAL_HEADER, entries_total)
    dropped = None
    if why is not None:
        dropped = TableFileError("journal_dropped", f"{path}: {why}; it and the {len(data) - p} bytes after "
                                 f"it are dropped, the table is the one of record {len(out)} (0: the base)")
    return out, pos, dropped


def _journal_body(body: memoryview, base: bytes, seq: int
                  ) -> tuple[dict[str, object], list[tuple[bytes, bytes | None, bytes | None]]] | str:
    """A record's (meta, entries), or what is wrong with it."""
    try:
        fmt, rbase, rseq, meta, entries = marshal.loads(body)
    except (ValueError, TypeError, EOFError) as e:
        return f"not a record ({e})"
    if fmt != JOURNAL_FORMAT or rbase != base or rseq != seq or not isinstance(meta, dict):
        return f"format {fmt!r}, sequence number {rseq!r} (expected {JOURNAL_FORMAT}, {seq}, this base)"
    if not isinstance(entries, list) or not all(
            type(x) is tuple and len(x) == 3 and type(x[0]) is bytes
            and (x[1] is None or type(x[1]) is bytes) and (x[2] is None or type(x[2]) is bytes) for x in entries):
        return "its entries are not (key, spec, spec) tuples"
    return meta, entries


def append_journal(path: Path, pos: JournalPos, entries: list[tuple[bytes, bytes | None, bytes | None]],
                   meta: Mapping[str, object]) -> JournalPos:
    """Append one record (`entries`, `meta`) after `pos` (the last good record: anything past it,
    e.g. the torn tail of a failed append, is cut off first), then fdatasync. A journal at
    length 0 is started afresh with its header (and the directory fsynced). On an error the
    file is cut back to `pos` where possible and the error raised: `pos` is still where it stands."""
    seq = pos.seq + 1
    body = marshal.dumps((JOURNAL_FORMAT, pos.base, seq, dict(meta), entries))
    rec = _JREC.pack(len(body), hashlib.sha256(body).digest()) + body
    start = pos.length
    if start == 0:
        rec = JOURNAL_MAGIC + _JHEAD.pack(JOURNAL_FORMAT, pos.base) + rec
    fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        try:
            os.ftruncate(fd, start)
            view = memoryview(rec)
            done = 0
            while done < len(rec):
                done += os.pwrite(fd, view[done:], start + done)
            os.fdatasync(fd)
        except BaseException:
            try:
                os.ftruncate(fd, start)
            except OSError:
                pass  # the torn tail is dropped at load, and cut off by the next append
            raise
    finally:
        os.close(fd)
    if start == 0:
        dfd = os.open(path.parent, os.O_RDONLY)
        try:
            os.fsync(dfd)
        finally:
            os.close(dfd)
    return JournalPos(pos.base, seq, start + len(rec), pos.entries + len(entries))


def _put(over: dict[bytes, Verdict | None], base: dict[bytes, int], key: bytes, v: Verdict | None,
         before: bool) -> int:
    """Set `key` to `v` in the overlay `over`; returns the change in entries served."""
    if v is None and key not in base:
        over.pop(key, None)
    else:
        over[key] = v
    return (v is not None) - before


_LEN8 = struct.Struct("<Q")


def _record(out: io.BytesIO, obj: object) -> None:
    """One length-prefixed marshal record (marshal.load on a file reads in small pieces: slow)."""
    data = marshal.dumps(obj)
    out.write(_LEN8.pack(len(data)))
    out.write(data)


class _Records:
    """Reads `_record`s back from a buffer, one `marshal.loads` of a slice each."""

    def __init__(self, buf: memoryview) -> None:
        self.buf = buf
        self.pos = 0

    def next(self) -> object:
        p = self.pos
        if p + 8 > len(self.buf):
            raise EOFError("the file ends early")
        (n,) = _LEN8.unpack_from(self.buf, p)
        if p + 8 + n > len(self.buf):
            raise EOFError("a record runs past the end of the file")
        self.pos = p + 8 + n
        return marshal.loads(self.buf[p + 8:p + 8 + n])


def _read_keys(src: _Records, n: int) -> tuple[list[bytes], bytes]:
    keys: list[bytes] = []
    while len(keys) < n:
        chunk = src.next()
        if not isinstance(chunk, list) or not chunk:
            raise ValueError("a key section is short")
        keys += chunk
    return keys, src.next()  # type: ignore[return-value]


def _copy(d: dict[bytes, int]) -> dict[bytes, int]:
    out: dict[bytes, int] = {}
    it = iter(d.items())
    while chunk := list(islice(it, _SLICE)):
        out.update(chunk)
    return out


def _choose(own: frozenset[str], combined: frozenset[str], orders: Mapping[str, OrderInfo | _Info],
            s: AnswerSettings) -> Verdict:
    best: tuple[int, str] | None = None
    for oid in combined:
        info = orders.get(oid)
        mode = s.override_answer or (info.dns_answer if info and info.dns_answer else s.default_answer)
        cand = (MODE_RANK[mode], oid)
        if best is None or cand < best:
            best = cand
    if best is None:
        mode = s.override_answer or s.default_answer
        order = None
    else:
        mode, order = _MODES[best[0]], best[1]
    text = ede_text(order, orders.get(order) if order else None, max(len(combined) - 1, 0))
    structured = None if s.sde_option_code is None else (
        sde.extra_text(text, s.sde_organization, s.sde_contact, s.sde_sub_error, s.sde_language, s.ede_code),
        sde.compact_text(s.sde_contact, s.sde_sub_error, s.ede_code))
    return Verdict(mode, order, combined, own, text, s.ede_code, structured)


_MODES = tuple(MODE_RANK)


_SOA_COUNTS = struct.Struct("!HHHH")


class Answers:
    """Pre-rendered pieces of blocked answers; `render` only concatenates bytes."""

    __slots__ = ("soa_tail", "a_rr", "aaaa_rr", "sde_needle")

    def __init__(self, s: AnswerSettings) -> None:
        self.sde_needle = sde.option_needle(s.sde_option_code)
        rdata = wire.soa_rdata(s.soa_mname, s.soa_rname, 1, 3600, 600, 86400, s.negative_ttl)
        # owner (a pointer to the matched rule name inside the question) is prepended per query
        self.soa_tail = struct.pack("!HHIH", wire.T_SOA, 1, s.negative_ttl, len(rdata)) + rdata
        self.a_rr = self.aaaa_rr = None
        if s.sinkhole_v4:
            t, rd = wire.addr_rdata(s.sinkhole_v4)
            if t != wire.T_A:
                raise ValueError(f"sinkhole_v4: {s.sinkhole_v4!r} is not an IPv4 address")
            self.a_rr = wire.rr(b"\xc0\x0c", wire.T_A, s.answer_ttl, rd)
        if s.sinkhole_v6:
            t, rd = wire.addr_rdata(s.sinkhole_v6)
            if t != wire.T_AAAA:
                raise ValueError(f"sinkhole_v6: {s.sinkhole_v6!r} is not an IPv6 address")
            self.aaaa_rr = wire.rr(b"\xc0\x0c", wire.T_AAAA, s.answer_ttl, rd)

    def render(self, data: bytes, q: wire.Query, off: int, v: Verdict, tcp: bool = False) -> bytes:
        """The blocked answer to `data` (whose parse is `q`), rule name at label offset `off`."""
        mode = v.mode
        ans = b""
        if mode == "sinkhole":
            if q.qtype == wire.T_A and self.a_rr is not None and q.qclass == 1:
                ans = self.a_rr
            elif q.qtype == wire.T_AAAA and self.aaaa_rr is not None and q.qclass == 1:
                ans = self.aaaa_rr
        ns = b"" if ans or mode == "refused" else wire.POINTERS[off] + self.soa_tail
        if q.edns < 0:
            return (wire.header(data, v.rcode, 1, 1 if ans else 0, 1 if ns else 0, 0)
                    + data[12 : q.qend + 4] + ans + ns)
        out = wire.header(data, v.rcode, 1, 1 if ans else 0, 1 if ns else 0, 1) + data[12 : q.qend + 4] + ans + ns
        if not sde.wants(data, q, self.sde_needle):
            return out + v.opt[q.do]
        full = out + v.opt_sde[q.do]
        limit = q.edns if q.edns > 512 else 512
        if tcp or len(full) <= limit:
            return full
        small = out + v.opt_sde_small[q.do]  # draft §5.2: j and o go first, then the EXTRA-TEXT,
        return small if len(small) <= limit else out + v.opt_sde_bare[q.do]  # before TC=1
