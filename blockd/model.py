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
import hashlib
import sys
from array import array
from collections.abc import Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field
from itertools import chain
from datetime import datetime
from types import MappingProxyType
from typing import Literal, NamedTuple

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
    """What should be (or, from `readback`, what is) enforced. Build it with `RuleSet.build`.

    `domains` is sorted by name then kind; `v4` and `v6` are sorted, disjoint intervals.
    `digest` covers only what is enforced (names and the union of the address intervals),
    not provenance, so an enforcer's read-back, which has no order ids, digests equal to
    the compiled set exactly when the same names and addresses are held.
    """

    domains: tuple[DomainRule, ...]
    v4: tuple[NetRule, ...]
    v6: tuple[NetRule, ...]
    orders: Mapping[str, OrderInfo]
    digest: str

    @classmethod
    def build(
        cls,
        domains: Iterable[DomainRule] = (),
        v4: Iterable[NetRule] = (),
        v6: Iterable[NetRule] = (),
        orders: Mapping[str, OrderInfo] | None = None,
    ) -> RuleSet:
        d = tuple(sorted(domains))
        a = tuple(sorted(v4))
        b = tuple(sorted(v6))
        return cls(d, a, b, MappingProxyType(dict(orders or {})), content_digest(d, a, b))

    @classmethod
    def empty(cls) -> RuleSet:
        return cls.build()

    def __len__(self) -> int:
        return len(self.domains) + len(self.v4) + len(self.v6)

    def counts(self) -> dict[str, int]:
        exact = sum(1 for r in self.domains if not r.subtree)
        return {
            "domain_exact": exact,
            "domain_subtree": len(self.domains) - exact,
            "ipv4_ranges": len(self.v4),
            "ipv6_ranges": len(self.v6),
        }


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
    """SHA-256 over the canonical form of what is enforced; see `RuleSet`.

    Layout: a version tag; sorted exact names, then sorted subtree names, newline-separated;
    then the union intervals of each family as big-endian (first, last) pairs.
    """
    h = hashlib.sha256(b"blockd-ruleset-v1\n")
    h.update(b"D\n" + "\n".join([n for n, sub, _ in domains if not sub]).encode())
    h.update(b"\nS\n" + "\n".join([n for n, sub, _ in domains if sub]).encode())
    pairs = array("I", chain.from_iterable(union_intervals(v4)))
    if sys.byteorder == "little":
        pairs.byteswap()
    h.update(b"\n4\n" + pairs.tobytes())
    h.update(b"\n6\n" + b"".join(a.to_bytes(16, "big") + b.to_bytes(16, "big") for a, b in union_intervals(v6)))
    return h.hexdigest()


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
