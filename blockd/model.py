"""Values that flow through the pipeline: Policy -> (catalog) -> RuleSet -> Applied.

Every value is immutable. The two high-volume rule types (`DomainRule`, `NetRule`, up to
millions per RuleSet) are NamedTuples: immutable, hashable and about three times cheaper to
create than a frozen dataclass, which keeps a 1M-rule compile inside its time budget.

Addresses are plain integers: a `NetRule` is an inclusive interval `[first, last]` of one
address family. Intervals are what nftables interval sets hold natively; `ranges.to_cidrs`
turns them into prefixes for ipset and RPZ.
"""

from __future__ import annotations

import gc
from bisect import bisect_left
from collections.abc import Iterable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import datetime
from types import MappingProxyType
from typing import Literal, NamedTuple

from blockd.chunked import Chunked
from blockd.layered import ByIssuer, Layered
from blockd.digests import ADDR4, ADDR6, EMPTY, NAMES_EXACT, NAMES_SUBTREE, PartDigest, combine, pack

Action = Literal["block", "unblock"]
#: How the DNS sinkhole answers a blocked name (per order, or the global default).
DnsAnswer = Literal["nxdomain", "nodata", "refused", "sinkhole", "drop", "log"]
DNS_ANSWERS: tuple[str, ...] = ("nxdomain", "nodata", "refused", "sinkhole", "drop", "log")
#: The guards against over-blocking, by the name an `allow_collateral` entry uses.
Guard = Literal["public_suffix", "min_prefix", "shared_infra", "growth"]
GUARDS: tuple[str, ...] = ("public_suffix", "min_prefix", "shared_infra", "growth")


class Cidr(NamedTuple):
    """One IPv4 or IPv6 prefix as written in a policy or catalog (host bits are zero)."""

    version: int  # 4 or 6
    network: int
    prefixlen: int

    @property
    def first(self) -> int:
        return self.network

    @property
    def last(self) -> int:
        bits = 32 if self.version == 4 else 128
        return self.network | ((1 << (bits - self.prefixlen)) - 1)

    def __str__(self) -> str:
        from blockd.ranges import format_cidr

        return format_cidr(self.version, self.network, self.prefixlen)


class One(tuple):  # type: ignore[type-arg]
    """The orders of a rule that one order names: a set of one key, equal to (and hashing as)
    `frozenset({key})`. A registry's million rules each carry one; a frozenset of one is 216
    bytes, this 48. Made with `One((key,))` (tuple's own constructor: C speed). Set operations
    with it give frozensets; `Provenance.intern` (blockd.compile) turns a result of one key back
    into a One."""

    __slots__ = ()

    def __eq__(self, other: object) -> bool:
        if type(other) is One:
            return tuple.__eq__(self, other)
        if isinstance(other, (set, frozenset)):
            return len(other) == 1 and self[0] in other
        return NotImplemented

    def __ne__(self, other: object) -> bool:
        eq = self.__eq__(other)
        return eq if eq is NotImplemented else not eq

    def __hash__(self) -> int:
        return hash(frozenset(self))

    def __repr__(self) -> str:
        return f"One({self[0]!r})"

    def __or__(self, other: Iterable[str]) -> frozenset[str]:  # type: ignore[override]
        return frozenset(self).union(other)

    __ror__ = __or__

    def __and__(self, other: Iterable[str]) -> frozenset[str]:
        return frozenset(self).intersection(other)

    __rand__ = __and__

    def __sub__(self, other: Iterable[str]) -> frozenset[str]:
        return frozenset(self).difference(other)

    def __rsub__(self, other: Iterable[str]) -> frozenset[str]:
        return frozenset(other).difference(self)

    def __xor__(self, other: Iterable[str]) -> frozenset[str]:
        return frozenset(self).symmetric_difference(other)

    __rxor__ = __xor__

    def __le__(self, other: object) -> bool:  # type: ignore[override]
        return isinstance(other, (set, frozenset, One)) and self[0] in other

    def __lt__(self, other: object) -> bool:  # type: ignore[override]
        return self <= other and len(other) > 1  # type: ignore[arg-type]

    def __ge__(self, other: object) -> bool:  # type: ignore[override]
        return isinstance(other, (set, frozenset, One)) and all(k == self[0] for k in other)  # type: ignore[attr-defined]

    def __gt__(self, other: object) -> bool:  # type: ignore[override]
        return self >= other and len(other) == 0  # type: ignore[arg-type]

    def isdisjoint(self, other: Iterable[str]) -> bool:
        return self[0] not in (other if isinstance(other, (set, frozenset, dict, One)) else set(other))

    def issubset(self, other: Iterable[str]) -> bool:
        return self[0] in (other if isinstance(other, (set, frozenset, dict, One)) else set(other))

    def issuperset(self, other: Iterable[str]) -> bool:
        return all(k == self[0] for k in other)

    def union(self, *others: Iterable[str]) -> frozenset[str]:
        return frozenset(self).union(*others)

    def intersection(self, *others: Iterable[str]) -> frozenset[str]:
        return frozenset(self).intersection(*others)

    def difference(self, *others: Iterable[str]) -> frozenset[str]:
        return frozenset(self).difference(*others)

    def copy(self) -> One:
        return self


class DomainRule(NamedTuple):
    """Block `name` (an A-label, lowercase, no trailing dot); with `subtree`, every name below too."""

    name: str
    subtree: bool
    orders: frozenset[str]


class NetRule(NamedTuple):
    """Block every address in `[first, last]` (one family; which one is implied by the tuple it is in)."""

    first: int
    last: int
    orders: frozenset[str]


@dataclass(frozen=True, slots=True)
class LegalBasis:
    authority: str
    reference: str
    url: str | None = None


@dataclass(frozen=True, slots=True)
class AllowCollateral:
    """A signed exception: let `rule` through the named `guard` (rule `*` = any rule of the order)."""

    rule: str
    guard: str
    reason: str


@dataclass(frozen=True, slots=True)
class Targets:
    services: tuple[str, ...] = ()
    #: Normalised names; a leading `*.` marks a subtree.
    domains: tuple[str, ...] = ()
    cidrs: tuple[Cidr, ...] = ()
    asns: tuple[int, ...] = ()


@dataclass(frozen=True, slots=True)
class Order:
    id: str
    legal_basis: LegalBasis
    action: Action
    targets: Targets
    deadline: datetime | None = None
    allow_collateral: tuple[AllowCollateral, ...] = ()
    dns_answer: str | None = None  # one of DNS_ANSWERS, or None for the configured default


@dataclass(frozen=True, slots=True)
class Policy:
    issuer: str
    serial: int
    issued_at: datetime
    not_before: datetime
    not_after: datetime
    orders: tuple[Order, ...]
    #: SHA-256 of the exact signed bytes.
    digest: str
    source: str = ""
    #: Key ids (hex) whose signatures were verified.
    signers: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class Service:
    name: str
    description: str
    domains: tuple[str, ...]
    cidrs: tuple[Cidr, ...]
    asns: tuple[int, ...]
    sources: tuple[str, ...] = ()


@dataclass(frozen=True, slots=True)
class Catalog:
    services: Mapping[str, Service]
    #: ASN -> prefixes originated by it (from the prefix-to-origin table).
    asn_prefixes: Mapping[int, tuple[Cidr, ...]] = field(default_factory=lambda: MappingProxyType({}))


@dataclass(frozen=True, slots=True)
class OrderInfo:
    """Provenance of rules: what a rule's order id stands for."""

    id: str
    issuer: str
    serial: int
    authority: str
    reference: str
    url: str | None
    action: Action
    dns_answer: str | None
    deadline: datetime | None
    issued_at: datetime


@dataclass(frozen=True, slots=True)
class Finding:
    """A rule a guard stopped (`allowed=False`) or let through under `allow_collateral` (`allowed=True`)."""

    order_id: str
    rule: str
    guard: str
    reason: str
    allowed: bool = False

    def __str__(self) -> str:
        verdict = "allowed by allow_collateral" if self.allowed else "refused"
        return f"order {self.order_id}: {self.rule}: {verdict} ({self.guard}): {self.reason}"


@dataclass(frozen=True, slots=True)
class RuleSet:
    """What should be (or, from `readback`, what is) enforced. Build it with `RuleSet.build`,
    change it with `patched` (in proportion to the change), share it out with `share`.

    `domains` is sorted by name then kind; `v4` and `v6` are sorted, disjoint intervals.
    `digest` covers only what is enforced (names and the union of the address intervals),
    not provenance, so an enforcer's read-back, which has no order ids, digests equal to
    the compiled set exactly when the same names and addresses are held (blockd.digests).
    """

    domains: Sequence[DomainRule]  # a Chunked (blockd.chunked) from `build` and `patched`
    v4: Sequence[NetRule]
    v6: Sequence[NetRule]
    orders: Mapping[str, OrderInfo]
    digest: str
    #: the digests of exact names, subtree names, v4 and v6 (blockd.digests), kept for patching
    parts: tuple[PartDigest, PartDigest, PartDigest, PartDigest] = field(compare=False, repr=False,
                                                                         default=None)  # type: ignore[assignment]

    @classmethod
    def build(
        cls,
        domains: Iterable[DomainRule] = (),
        v4: Iterable[NetRule] = (),
        v6: Iterable[NetRule] = (),
        orders: Mapping[str, OrderInfo] | None = None,
    ) -> RuleSet:
        d = Chunked(sorted(domains))
        a = Chunked(sorted(v4))
        b = Chunked(sorted(v6))
        parts = _parts(d, a, b)
        # an immutable union of per-policy infos (compile.infos_of) is kept as it is; anything
        # else is copied, so that no caller's later change shows through
        held = orders if isinstance(orders, ByIssuer) else MappingProxyType(dict(orders or {}))
        return cls(d, a, b, held, combine(*parts), parts)

    @classmethod
    def empty(cls) -> RuleSet:
        return cls.build()

    def __len__(self) -> int:
        return len(self.domains) + len(self.v4) + len(self.v6)

    def counts(self) -> dict[str, int]:
        exact = len(self.parts[0])
        return {
            "domain_exact": exact,
            "domain_subtree": len(self.domains) - exact,
            "ipv4_ranges": len(self.v4),
            "ipv6_ranges": len(self.v6),
        }

    def share_digest(self, names: bool = True, v4: bool = True, v6: bool = True) -> str:
        """The digest of `share(...)`, in constant time."""
        e, s, a, b = self.parts
        return combine(e if names else EMPTY[NAMES_EXACT], s if names else EMPTY[NAMES_SUBTREE],
                       a if v4 else EMPTY[ADDR4], b if v6 else EMPTY[ADDR6])

    def share(self, names: bool = True, addresses: bool = True) -> RuleSet:
        """The part of this rule set one enforcer holds (names, addresses), in constant time."""
        if (names or not self.domains) and (addresses or not (self.v4 or self.v6)):
            return self
        e, s, a, b = self.parts
        parts = (e, s, a, b) if names else (EMPTY[NAMES_EXACT], EMPTY[NAMES_SUBTREE], a, b)
        if not addresses:
            parts = (parts[0], parts[1], EMPTY[ADDR4], EMPTY[ADDR6])
        return RuleSet(self.domains if names else _NONE, self.v4 if addresses else _NONE,
                       self.v6 if addresses else _NONE,
                       self.orders if names else MappingProxyType({}), combine(*parts), parts)

    def patched(self, removed: RuleDelta, added: RuleDelta,
                orders: Mapping[str, OrderInfo] | None = None) -> tuple[RuleSet, Plan]:
        """This rule set minus `removed` plus `added` (see `Change`), and the Plan between the
        two, in O(k log N) Python work plus a C-level copy of each changed tuple.

        Raises ValueError when the delta does not fit (a removed rule not held, an added one
        overlapping what stays): the caller then builds from scratch."""
        d = _splice(self.domains, removed.domains, added.domains, _name_key, nets=False)
        a = _splice(self.v4, removed.v4, added.v4, _first, nets=True)
        b = _splice(self.v6, removed.v6, added.v6, _first, nets=True)
        rem = {(r.name, r.subtree) for r in removed.domains}
        add = {(r.name, r.subtree) for r in added.domains}
        add_d, del_d = tuple(sorted(add - rem)), tuple(sorted(rem - add))
        del4, add4 = _union_change(self.v4, a, removed.v4, added.v4)
        del6, add6 = _union_change(self.v6, b, removed.v6, added.v6)
        plan = Plan(add_d, del_d, add4, del4, add6, del6)
        e, s, p4, p6 = self.parts
        if add_d or del_d:
            e = e.patched([n for n, sub in del_d if not sub], [n for n, sub in add_d if not sub])
            s = s.patched([n for n, sub in del_d if sub], [n for n, sub in add_d if sub])
        if add4 or del4:
            p4 = p4.patched([pack(ADDR4, x, y) for x, y in del4], [pack(ADDR4, x, y) for x, y in add4])
        if add6 or del6:
            p6 = p6.patched([pack(ADDR6, x, y) for x, y in del6], [pack(ADDR6, x, y) for x, y in add6])
        parts = (e, s, p4, p6)
        info = self.orders if orders is None else orders
        if not isinstance(info, (MappingProxyType, Layered, ByIssuer)):
            info = MappingProxyType(dict(info))
        return RuleSet(d, a, b, info, combine(*parts), parts), plan


def _parts(d: Sequence[DomainRule], a: Sequence[NetRule],
           b: Sequence[NetRule]) -> tuple[PartDigest, PartDigest, PartDigest, PartDigest]:
    return (PartDigest.of(NAMES_EXACT, [n for n, sub, _ in d if not sub]),
            PartDigest.of(NAMES_SUBTREE, [n for n, sub, _ in d if sub]),
            PartDigest.of(ADDR4, [(x << 32) | y for x, y in union_intervals(a)]),
            PartDigest.of(ADDR6, [(x << 128) | y for x, y in union_intervals(b)]))


def _name_key(r: DomainRule) -> tuple[str, bool]:
    return (r.name, r.subtree)


def _first(r: NetRule) -> int:
    return r.first


def _splice(old: Sequence, removed: Sequence, added: Sequence, key, *, nets: bool) -> Sequence:  # type: ignore[type-arg]
    """`old` minus `removed` plus `added`, sorted: k bisections, and only the chunks touched copied."""
    if not removed and not added:
        return old
    seq = old if isinstance(old, Chunked) else Chunked(old)
    drop: set[int] = set()
    for r in removed:
        i = seq.bisect(key(r), key)
        if i == len(seq) or seq[i] != r:
            raise ValueError(f"patch removes {r!r}, which is not held")
        drop.add(i)
    inserts: dict[int, list] = {}  # type: ignore[type-arg]
    for r in added:
        inserts.setdefault(seq.bisect(key(r), key), []).append(r)
    for items in inserts.values():
        items.sort(key=key)
    new = seq.splice(drop, inserts)
    # Check the order (and for intervals, disjointness) where the patch touched it.
    for r in added:
        i = new.bisect(key(r), key)
        if i == len(new) or new[i] != r:
            raise ValueError(f"patch adds {r!r} twice or out of order")
        for x, y in ((i - 1, i), (i, i + 1)):
            if 0 <= x and y < len(new):
                bad = new[x].last >= new[y].first if nets else key(new[x]) >= key(new[y])
                if bad:
                    raise ValueError(f"patch leaves {new[x]!r} and {new[y]!r} overlapping or out of order")
    return new


def _union_change(old: Sequence[NetRule], new: Sequence[NetRule], removed: Sequence[NetRule],
                  added: Sequence[NetRule]) -> tuple[tuple[tuple[int, int], ...], tuple[tuple[int, int], ...]]:
    """The union intervals that left and entered, from the neighbourhoods of the touched rules."""
    if not removed and not added:
        return (), ()
    spans = union_intervals(sorted((*removed, *added), key=_first))
    before: set[tuple[int, int]] = set()
    after: set[tuple[int, int]] = set()
    for lo, hi in spans:
        before.update(_unions_near(old, lo, hi))
        after.update(_unions_near(new, lo, hi))
    return tuple(sorted(before - after)), tuple(sorted(after - before))


def _unions_near(rules: Sequence[NetRule], lo: int, hi: int) -> list[tuple[int, int]]:
    """The union intervals of sorted disjoint `rules` that meet or touch [lo, hi]."""
    i = seq_bisect(rules, lo - 1, _last)  # the first rule ending at or after lo - 1
    j = i
    n = len(rules)
    while j < n and rules[j].first <= hi + 1:
        j += 1
    while i > 0 and i < n and rules[i - 1].last + 1 == rules[i].first:
        i -= 1
    while 0 < j < n and rules[j - 1].last + 1 == rules[j].first:
        j += 1
    return union_intervals(rules[i:j])


def _last(r: NetRule) -> int:
    return r.last


def seq_bisect(seq: Sequence, value: object, key=None) -> int:  # type: ignore[type-arg]
    """`bisect_left(seq, value, key=key)`, fast on a Chunked (see `Chunked.bisect`)."""
    return seq.bisect(value, key) if isinstance(seq, Chunked) else bisect_left(seq, value, key=key)


_NONE: Chunked = Chunked()


@contextmanager
def gc_paused() -> Iterator[None]:
    """Pause the cyclic garbage collector while millions of acyclic tuples are built.

    Each burst of allocations otherwise triggers collections that walk every live object:
    a third to a half of the time of a 1M-rule compile or read-back. Rules make no cycles.
    """
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()


def union_intervals(rules: Iterable[NetRule]) -> list[tuple[int, int]]:
    """Sorted rules -> the union as disjoint, non-adjacent intervals (provenance dropped)."""
    out: list[tuple[int, int]] = []
    for first, last, _ in rules:
        if out and first <= out[-1][1] + 1:
            if last > out[-1][1]:
                out[-1] = (out[-1][0], last)
        else:
            out.append((first, last))
    return out


def content_digest(
    domains: tuple[DomainRule, ...], v4: tuple[NetRule, ...], v6: tuple[NetRule, ...]
) -> str:
    """The digest of the rule set holding these sorted rules (blockd.digests), from scratch.

    A RuleSet carries its digest and its shares' (`RuleSet.share_digest`) already."""
    return combine(*_parts(domains, v4, v6))


@dataclass(frozen=True, slots=True)
class Plan:
    """The difference between two RuleSets, in enforced terms (union intervals, names)."""

    add_domains: tuple[tuple[str, bool], ...]
    del_domains: tuple[tuple[str, bool], ...]
    add_v4: tuple[tuple[int, int], ...]
    del_v4: tuple[tuple[int, int], ...]
    add_v6: tuple[tuple[int, int], ...]
    del_v6: tuple[tuple[int, int], ...]

    @property
    def empty(self) -> bool:
        return not (
            self.add_domains or self.del_domains or self.add_v4 or self.del_v4 or self.add_v6 or self.del_v6
        )

    @property
    def added(self) -> int:
        return len(self.add_domains) + len(self.add_v4) + len(self.add_v6)

    @property
    def removed(self) -> int:
        return len(self.del_domains) + len(self.del_v4) + len(self.del_v6)


def diff(current: RuleSet, desired: RuleSet) -> Plan:
    """Pure: what to delete from and add to `current` to hold exactly `desired`.

    Address families are compared as union intervals, so an interval whose bounds change is
    one delete plus one add (nftables interval sets cannot resize an element in place).
    A part (names, v4, v6) whose rules are equal is skipped without building sets: a tuple
    comparison runs in C and stops at the first difference.
    """
    add_d: tuple[tuple[str, bool], ...] = ()
    del_d: tuple[tuple[str, bool], ...] = ()
    if current.domains != desired.domains:
        cur_d = {(r.name, r.subtree) for r in current.domains}
        des_d = {(r.name, r.subtree) for r in desired.domains}
        add_d, del_d = tuple(sorted(des_d - cur_d)), tuple(sorted(cur_d - des_d))
    out: dict[str, tuple[tuple[int, int], ...]] = {}
    for fam in ("v4", "v6"):
        a, b = getattr(current, fam), getattr(desired, fam)
        if a == b:
            out["add_" + fam] = out["del_" + fam] = ()
            continue
        cur = set(union_intervals(a))
        des = set(union_intervals(b))
        out["add_" + fam] = tuple(sorted(des - cur))
        out["del_" + fam] = tuple(sorted(cur - des))
    return Plan(add_domains=add_d, del_domains=del_d, **out)


@dataclass(frozen=True, slots=True)
class RuleDelta:
    """Rules (with their provenance) leaving or entering a RuleSet; see `Change`."""

    domains: tuple[DomainRule, ...] = ()
    v4: tuple[NetRule, ...] = ()
    v6: tuple[NetRule, ...] = ()

    def __len__(self) -> int:
        return len(self.domains) + len(self.v4) + len(self.v6)


@dataclass(frozen=True, slots=True)
class Change:
    """How a new RuleSet differs from the one whose digest is `base`: `apply(desired, change)`.

    An enforcer that holds exactly `base` (it applied it, and read it back) commits only
    `plan`; any other enforcer ignores the change and diffs `desired` against what it holds.

    `plan` is in enforced terms (names, union intervals): what the kernel needs. Enforcers
    whose answer depends on provenance (the sinkhole's EDE text, RPZ zones per authority or
    order) patch by rules instead: the base rule set's rules minus `removed` plus `added` are
    exactly `desired`'s rules (`DomainRule`/`NetRule` tuples compared with their orders). A
    rule whose orders change, or whose orders' `OrderInfo` changes in anything but the serial
    and issue time (authority, reference, url, action, dns_answer, deadline), is in both.
    `removed`/`added` are None when not known: such an enforcer then diffs itself.
    """

    base: str
    plan: Plan
    removed: RuleDelta | None = None
    added: RuleDelta | None = None


def answer_view(info: OrderInfo) -> tuple[object, ...]:
    """What of an order's provenance an answer or a zone can show (not the serial it came in)."""
    return (info.id, info.issuer, info.authority, info.reference, info.url, info.action, info.dns_answer,
            info.deadline)


def rule_delta(current: RuleSet, desired: RuleSet) -> tuple[RuleDelta, RuleDelta]:
    """Pure, O(N): the (removed, added) rules from `current` to `desired` (see `Change`).

    The incremental merge produces this without looking at the whole rule set; this is the
    reference it is tested against, and the fallback."""
    changed = {k for k, info in desired.orders.items()
               if k in current.orders and answer_view(current.orders[k]) != answer_view(info)}

    def part(a: tuple, b: tuple) -> tuple[tuple, tuple]:
        if a == b and not changed:
            return (), ()
        old, new = set(a), set(b)
        if changed:
            stale = {r for r in old & new if not changed.isdisjoint(r.orders)}
            return tuple(sorted((old - new) | stale)), tuple(sorted((new - old) | stale))
        return tuple(sorted(old - new)), tuple(sorted(new - old))

    (rd, ad), (r4, a4), (r6, a6) = (part(current.domains, desired.domains), part(current.v4, desired.v4),
                                    part(current.v6, desired.v6))
    return RuleDelta(rd, r4, r6), RuleDelta(ad, a4, a6)


@dataclass(frozen=True, slots=True)
class Applied:
    """What one enforcer did in one `apply` call, and what it holds afterwards.

    `desired_digest` is the digest of the enforcer's own share of the rule set (names for the
    sinkhole, addresses for the kernel): what it committed and the backend acknowledged.
    `digest` is never that intention: it is computed over what was read back from the backend
    (kernel sets, the served table or zone, the BGP RIB-out). `readback_scope` says how much:

        full     everything the backend holds was read at `readback_at`
        touched  the parts the commit touched were read at `readback_at`; the rest as read
                 at `full_readback_at` (the last full read-back), unchanged since
    """

    enforcer: str
    digest: str  # digest of the read-back state
    desired_digest: str  # digest of the share committed (and acknowledged)
    added: int
    removed: int
    duration_s: float
    counts: Mapping[str, int] = field(default_factory=lambda: MappingProxyType({}))
    readback_scope: Literal["full", "touched"] = "full"
    readback_at: datetime | None = None
    full_readback_at: datetime | None = None

    @property
    def in_sync(self) -> bool:
        return self.digest == self.desired_digest
