"""(policies, catalog, settings, now) -> Compilation: the RuleSet to enforce, and why.

Pure: no clock, no files, no logging; the same input gives the same digest. Steps, in order:

1. window   policies outside [not_before, not_after] contribute nothing (pending / expired);
            of several policies of one issuer only the highest serial counts
2. expand   services and ASNs -> names and prefixes (unknown ones are errors)
3. guards   each block rule passes every guard, or is refused with a Finding, unless the
            order's signed `allow_collateral` names it (the Finding then says so)
4. growth   new orders that would grow the set past `growth_factor` x the last accepted size
            are refused whole (orders already enforced are never refused by this guard)
5. merge    names deduplicated (exact and subtree kept apart); prefixes cut into disjoint
            intervals, each carrying exactly the orders that cover it
6. subtract unblock orders, then the operator allowlist (splitting intervals as needed)
"""

from __future__ import annotations

import operator
from collections import Counter, deque
from collections.abc import Callable, Iterable, Iterator, KeysView, Mapping, Sequence
from dataclasses import dataclass, field, fields
from datetime import datetime
from itertools import chain, compress, repeat
from types import MappingProxyType
from typing import Literal

from blockd import ranges
from blockd.errors import PolicyError, Problem, raise_problems
from blockd.expand import Expanded, expand_order
from blockd.guards import Guards
from blockd.layered import ByIssuer, Layered, as_layered
from blockd.model import (
    Catalog, Cidr, DomainRule, Finding, NetRule, One, Order, OrderInfo, Policy, RuleSet, gc_paused,
)
from blockd.names import display, parents
from blockd.ranges import HOST4, HOST6

#: an order's status in a Compilation
Status = Literal["enforced", "partially_refused", "refused", "pending", "expired", "superseded", "unblock"]


@dataclass(frozen=True, slots=True)
class CompileSettings:
    guards: Guards
    growth_factor: float = 2.0
    #: The growth guard only applies once the accepted set has at least this many rules.
    growth_floor: int = 1000
    #: Operator allowlist, never blocked: names (`*.name` = subtree) and prefixes.
    allow_domains: tuple[str, ...] = ()
    allow_cidrs: tuple[Cidr, ...] = ()


@dataclass(frozen=True, slots=True)
class OrderResult:
    key: str  # "<issuer>/<order id>", the provenance key used in rules
    status: Status
    rules: int = 0  # rules this order contributes after guards
    refused: int = 0


@dataclass(frozen=True, slots=True)
class Compilation:
    ruleset: RuleSet
    findings: tuple[Finding, ...]
    orders: Mapping[str, OrderResult]
    warnings: tuple[str, ...] = ()
    policies: Mapping[str, str] = field(default_factory=lambda: MappingProxyType({}))  # source -> status
    #: (issuer, status) -> number of orders, and order key -> deadline (for the orders that have
    #: one): what bounded metrics need without a pass over every order
    tally: Mapping[tuple[str, str], int] = field(default_factory=lambda: MappingProxyType({}))
    deadlines: Mapping[str, datetime] = field(default_factory=lambda: MappingProxyType({}))
    #: the unblock orders in force (few, whatever the size of the registry)
    unblocks: tuple[str, ...] = ()

    @property
    def refused(self) -> tuple[Finding, ...]:
        return tuple(f for f in self.findings if not f.allowed)


def order_key(policy: Policy, order: Order) -> str:
    return f"{policy.issuer}/{order.id}"


@dataclass(frozen=True, slots=True)
class Baseline:
    """What the growth guard compares with: the size and orders of the last accepted rule set.

    Persisted in the state directory, so the first pass after a restart is guarded too.
    """

    size: int
    orders: frozenset[str]

    @classmethod
    def of(cls, ruleset: RuleSet) -> Baseline:
        return cls(len(ruleset), frozenset(ruleset.orders))


@dataclass(frozen=True, slots=True)
class Prepared:
    """One policy expanded and guarded on its own: what it adds to the merged rule set.

    A policy that cannot expand fails here alone (PolicyError), before any merge; the result
    depends only on the policy's bytes and the context (catalog, guards), so a later pass
    reuses it while neither changes.
    """

    policy: Policy
    infos: Mapping[str, OrderInfo]
    blocks: Sequence[tuple[str, Expanded]]  # a Pairs from prepare
    unblocks: tuple[tuple[str, Expanded], ...]
    findings: tuple[Finding, ...]
    #: the digest of the same issuer's Prepared this one was made beside (`prepare(prior=)`),
    #: and the order keys whose contribution or answer may differ from it (changed, added or
    #: removed): every other order contributes exactly what it did there. None: not known.
    prior: str | None = None
    changed: frozenset[str] = frozenset()
    #: of the `changed` orders still in the policy: what each contributes (key -> Hit), so a
    #: merge by delta finds them without a walk of every order (None when prior is None)
    hits: Mapping[str, Hit] | None = field(default=None, compare=False)
    #: every order's cache entry (`OrderCache`), for the next serial prepared beside this one
    entries: Mapping[str, tuple[Order, Hit]] | None = field(default=None, compare=False, repr=False)


class Pairs(Sequence[tuple[str, Expanded]]):
    """`Prepared.blocks`: (order key, expansion) per block order, held as two tuples (a
    million pairs: 16 bytes each, not 72); iterated as pairs at C speed (zip). Not a mapping:
    `dict(pairs)` takes it as the pairs it holds."""

    __slots__ = ("order_keys", "expansions")

    def __init__(self, keys: tuple[str, ...], values: tuple[Expanded, ...]) -> None:
        self.order_keys, self.expansions = keys, values

    @classmethod
    def of(cls, pairs: Iterable[tuple[str, Expanded]]) -> Pairs:
        items = list(pairs)
        return cls(tuple(k for k, _ in items), tuple(e for _, e in items))

    def __len__(self) -> int:
        return len(self.order_keys)

    def __iter__(self) -> Iterator[tuple[str, Expanded]]:
        return zip(self.order_keys, self.expansions)

    def __getitem__(self, i):  # type: ignore[no-untyped-def,override]
        if isinstance(i, slice):
            return Pairs(self.order_keys[i], self.expansions[i])
        return self.order_keys[i], self.expansions[i]

    def __eq__(self, other: object) -> bool:
        if isinstance(other, Pairs):
            return self.order_keys == other.order_keys and self.expansions == other.expansions
        if isinstance(other, (tuple, list)):
            return len(other) == len(self) and all(a == b for a, b in zip(self, other))
        return NotImplemented

    def __hash__(self) -> int:
        return hash((self.order_keys, self.expansions))

    def __repr__(self) -> str:
        return f"Pairs({len(self)} blocks)"


Hit = tuple[str, Expanded, tuple[Finding, ...]]
#: order key -> (the order, what it contributes: "block" or "unblock", expanded, findings);
#: an entry serves an order that is the same object or equal (the parser hands out the same
#: Order object for an item whose bytes did not change, so the common check is `is`)
OrderCache = dict[str, tuple[Order, Hit]]


def prepare(policy: Policy, catalog: Catalog, guards: Guards, orders: Mapping[str, tuple[Order, Hit]] | None = None,
            into: OrderCache | None = None, prior: tuple[Prepared, Mapping[str, tuple[Order, Hit]]] | None = None
            ) -> Prepared:
    """Expand and guard every order of `policy`; every expansion problem is reported at once.

    `orders` (valid for one catalog and guards) caches each order's expansion by its content:
    a new serial that changes one order of a registry-sized policy expands and guards only that
    order again. Every order's entry (found or computed) is stored in `into` (by default in
    `orders`). With `prior` (the same issuer's Prepared in force and its entries), the result
    says which orders differ from it (`Prepared.changed`), so that a merge by delta looks at
    those only; and when the new serial holds its orders in the same places (a registry
    re-issued with decisions changed in place), only the places whose Order is not the prior's
    own object are looked at (the parser hands out the same object for unchanged bytes).
    """
    # an `into` given empty becomes this policy's own entries, which its infos read as they
    # are (the reconciler gives each policy its own); else the infos get a dict of their own
    fresh = into if into is not None and not into else None
    if into is None and orders is not None:
        into = orders  # type: ignore[assignment]
    before, before_entries = prior if prior is not None and prior[0].policy.issuer == policy.issuer else (None, None)
    with gc_paused():
        if before is not None and before_entries is not None:
            fast = _prepare_in_place(policy, catalog, guards, orders, into, before, before_entries)
            if fast is not None:
                return fast
        step = _Step(policy, catalog, guards, orders, before_entries)
        by_key: OrderCache = fresh if fresh is not None else {}
        block_keys: list[str] = []
        block_exps: list[Expanded] = []
        unblocks: list[tuple[str, Expanded]] = []
        findings: list[Finding] = []
        hits: dict[str, Hit] = {}
        changed = step.changed
        for i, order in enumerate(policy.orders):
            got = step(i, order)
            if got is None:
                continue
            key, hit = got
            by_key[key] = (order, hit)
            if key in changed:
                hits[key] = hit
            if into is not None and into is not by_key:
                into[key] = (order, hit)
            kind, expanded, order_findings = hit
            if kind == "unblock":
                unblocks.append((key, expanded))
            else:
                findings.extend(order_findings)
                block_keys.append(key)
                block_exps.append(expanded)
        raise_problems(step.problems, PolicyError)
        infos = OrderInfos(policy, by_key)
        if before is not None:
            step.changed.update(before.infos.keys() - by_key.keys())  # orders the new serial dropped
            return Prepared(policy, infos, Pairs(tuple(block_keys), tuple(block_exps)), tuple(unblocks), tuple(findings),
                            before.policy.digest, frozenset(step.changed), hits, into)
        return Prepared(policy, infos, Pairs(tuple(block_keys), tuple(block_exps)), tuple(unblocks), tuple(findings),
                        entries=into)


class _Step:
    """One order of `prepare`: its key and what it contributes (from the cache, or expanded
    and guarded now), noting expansion problems and whether it differs from the prior's."""

    def __init__(self, policy: Policy, catalog: Catalog, guards: Guards,
                 orders: Mapping[str, tuple[Order, Hit]] | None,
                 before_entries: Mapping[str, tuple[Order, Hit]] | None) -> None:
        self.policy, self.catalog, self.guards = policy, catalog, guards
        self.orders, self.before_entries = orders, before_entries
        self.problems: list[Problem] = []
        self.changed: set[str] = set()

    def __call__(self, i: int, order: Order) -> tuple[str, Hit] | None:
        key = order_key(self.policy, order)
        entry = self.orders.get(key) if self.orders is not None else None
        hit = entry[1] if entry is not None and (entry[0] is order or entry[0] == order) else None
        if self.before_entries is not None:
            was = self.before_entries.get(key)
            if was is None or was[1] is not hit or not (was[0] is order or was[0] == order):
                self.changed.add(key)
        if hit is None:
            try:
                expanded = expand_order(self.policy, i, order, self.catalog)
            except PolicyError as e:
                self.problems.extend(e.problems or (Problem(e.where, e.message),))
                return None
            if order.action == "unblock":
                hit = ("unblock", expanded, ())
            else:
                kept, order_findings = _guard(key, order, expanded, self.guards)
                hit = ("block", kept, tuple(order_findings))
        return key, hit


def _prepare_in_place(policy: Policy, catalog: Catalog, guards: Guards,
                      orders: Mapping[str, tuple[Order, Hit]] | None, into: OrderCache | None,
                      before: Prepared, before_entries: Mapping[str, tuple[Order, Hit]]) -> Prepared | None:
    """`prepare` of a new serial whose orders sit where the prior's did, every one a block:
    the places holding the prior's own Order object keep its contribution as it is (C-level
    copies), the others go through the same step as in `prepare`. None when the shape differs
    (orders added or removed, unblocks, an id moved onto another place): `prepare` walks
    every order."""
    old, new = before.policy.orders, policy.orders
    if (len(new) != len(old) or before.unblocks or len(before.blocks) != len(old)
            or not isinstance(before.infos, OrderInfos) or len(before.infos) != len(old)):
        return None
    moved = list(compress(range(len(new)), map(operator.is_not, new, old)))  # C loops
    if len(moved) > max(64, len(new) // 8):
        return None  # most orders changed: the plain walk costs no more
    step = _Step(policy, catalog, guards, orders, before_entries)
    made: dict[int, tuple[str, Hit]] = {}
    for i in moved:
        got = step(i, new[i])
        if got is not None:
            made[i] = got
    raise_problems(step.problems, PolicyError)
    prior_blocks = before.blocks if isinstance(before.blocks, Pairs) else Pairs.of(before.blocks)
    old_keys = {prior_blocks.order_keys[i] for i in moved}
    new_keys = [key for key, _ in made.values()]
    prior_keys = before.infos
    if (len(made) != len(moved) or len(set(new_keys)) != len(new_keys)
            or any(hit[0] != "block" or (key in prior_keys and key not in old_keys) for key, hit in made.values())):
        return None  # an unblock now, or an id another place holds: the plain walk decides
    keys, exps = list(prior_blocks.order_keys), list(prior_blocks.expansions)
    leaving = old_keys.difference(new_keys)
    step.changed.update(leaving)
    refreshed = {key: (new[i], hit) for i, (key, hit) in made.items()}
    for i, (key, hit) in made.items():
        keys[i], exps[i] = key, hit[1]
    # the prior's entries with the changed places on top (Layered: O(change), not a copy)
    entries: Mapping[str, tuple[Order, Hit]] = as_layered(before_entries).derive(refreshed, leaving)
    if into is not None:
        into.update(refreshed)  # the cache the caller keeps beside `entries` (see `prepare`)
    findings = before.findings
    if any(e[1][2] for k in old_keys if (e := before_entries.get(k)) is not None) or \
            any(hit[2] for _, hit in made.values()):
        # a changed place has findings: all of them again, in the order of the orders
        findings = tuple(f for key in keys
                         for f in (refreshed[key][1][2] if key in refreshed else before_entries[key][1][2]))
    return Prepared(policy, OrderInfos(policy, entries), Pairs(tuple(keys), tuple(exps)), (), findings, before.policy.digest,
                    frozenset(step.changed), {key: hit for key, hit in made.values()}, entries)


def infos_of(prepared: Sequence[Prepared]) -> Mapping[str, OrderInfo]:
    """The order infos of the policies in force, a later policy's entry winning, in
    O(policies): each issuer's own mapping, not a copy (an order key names its issuer)."""
    parts: dict[str, Mapping[str, OrderInfo]] = {}
    for prep in prepared:
        issuer = prep.policy.issuer
        parts[issuer] = {**parts[issuer], **prep.infos} if issuer in parts else prep.infos
    return ByIssuer(parts)


def deadlines_of(prepared: Sequence[Prepared]) -> dict[str, datetime]:
    """Order key -> deadline, of the orders that have one, read from the orders themselves."""
    out: dict[str, datetime] = {}
    for prep in prepared:
        if isinstance(prep.infos, OrderInfos):
            out.update(prep.infos.deadlines())
        else:
            out.update((k, i.deadline) for k, i in prep.infos.items() if i.deadline is not None)
    return out


class OrderInfos(Mapping[str, OrderInfo]):
    """`Prepared.infos`: each order's OrderInfo by its key, made when first read. A new serial
    of a registry changes every order's serial, so making a million of them up front would
    cost what the whole policy costs; most are read only when a statement lists them. Read
    from the policy's order entries (key -> (order, what it contributes)), not a copy."""

    __slots__ = ("_policy", "_orders", "_made")

    def __init__(self, policy: Policy, entries: Mapping[str, tuple[Order, Hit]]) -> None:
        self._policy, self._orders = policy, entries
        self._made: dict[str, OrderInfo] = {}

    def __getitem__(self, key: str) -> OrderInfo:
        info = self._made.get(key)
        if info is None:
            info = self._made[key] = _info(self._policy, self._orders[key][0])
        return info

    def peek(self, key: str) -> OrderInfo | None:
        """The info of `key` (None: not an order of this policy), not kept: for a reader of
        every order once (a dump of the sinkhole's table), which would otherwise leave a
        million infos behind."""
        info = self._made.get(key)
        if info is None:
            entry = self._orders.get(key)
            return _info(self._policy, entry[0]) if entry is not None else None
        return info

    def __contains__(self, key: object) -> bool:
        return key in self._orders

    def __iter__(self) -> Iterator[str]:
        return iter(self._orders)

    def __len__(self) -> int:
        return len(self._orders)

    def keys(self) -> KeysView[str]:
        return self._orders.keys()

    def deadlines(self) -> dict[str, datetime]:
        return {k: e[0].deadline for k, e in self._orders.items() if e[0].deadline is not None}

    def __repr__(self) -> str:
        return f"OrderInfos({self._policy.issuer} serial {self._policy.serial}, {len(self._orders)} orders)"


def compile_policies(
    policies: Sequence[Policy],
    catalog: Catalog,
    settings: CompileSettings,
    now: datetime,
    *,
    previous: RuleSet | Baseline | None = None,
) -> Compilation:
    """Select (newest valid serial per issuer), prepare and merge: the whole pipeline in memory.

    The daemon and the CLI go through `selection.select` with verified files and the state;
    this is the same path for policies already in memory (tests, benchmarks). A policy that
    cannot expand raises here (there is no older policy to fall back to).
    """
    from blockd.selection import Candidate, select

    sel = select([Candidate(p) for p in policies], (), {}, now,
                 lambda p: prepare(p, catalog, settings.guards), strict=True)
    return merge(sel.prepared, settings, previous, sel.order_statuses(), sel.policy_statuses())


def merge(
    prepared: Sequence[Prepared],
    settings: CompileSettings,
    previous: RuleSet | Baseline | None = None,
    statuses: Mapping[str, Status] | None = None,
    policy_statuses: Mapping[str, str] | None = None,
) -> Compilation:
    """The policies in force, each already prepared -> one RuleSet with exact provenance.

    `statuses` gives the orders of policies not in force (pending, superseded, expired) their
    status in the result; `policy_statuses` is the same per file.
    """
    # Millions of short-lived tuples would trigger the cyclic collector over and over (half
    # the run time at 1M rules); compile makes no reference cycles, so pause it.
    return merge_with_parts(prepared, settings, previous, statuses, policy_statuses).compilation


@dataclass(frozen=True)
class Merged:
    """`merge`'s result with the parts it was made from, for a caller that carries them forward
    (incremental.Merger): the coverage before unblocks and the allowlist were cut out of it,
    the provenance sets interned, and the results per order."""

    compilation: Compilation
    coverage: Mapping[int, list[NetRule]]
    provenance: Provenance
    #: order key -> result (its rule count too), for every order in `compilation.orders`
    #: (handed over: the merge keeps no reference to it)
    results: dict[str, OrderResult]
    #: name -> order key(s), exact and subtree, of every block order, before unblocks and the
    #: allowlist removed any (None when some were removed: the caller derives them itself)
    names: tuple[dict[str, str | set[str]], dict[str, str | set[str]]] | None


def merge_with_parts(
    prepared: Sequence[Prepared],
    settings: CompileSettings,
    previous: RuleSet | Baseline | None = None,
    statuses: Mapping[str, Status] | None = None,
    policy_statuses: Mapping[str, str] | None = None,
) -> Merged:
    """`merge`, and the parts its result was made from."""
    baseline = Baseline.of(previous) if isinstance(previous, RuleSet) else previous
    with gc_paused():
        return _merge(prepared, settings, baseline, statuses or {}, policy_statuses or {})


def _merge(prepared: Sequence[Prepared], settings: CompileSettings, previous: Baseline | None,
           statuses: Mapping[str, Status], policy_statuses: Mapping[str, str]) -> Merged:
    results: dict[str, OrderResult] = {k: OrderResult(k, v) for k, v in statuses.items()}
    policy_status: dict[str, str] = dict(policy_statuses)
    findings: list[Finding] = []
    warnings: list[str] = []
    infos = infos_of(prepared)
    blocks: list[tuple[str, Expanded]] = []
    unblocks: list[tuple[str, Expanded]] = []
    for prep in prepared:
        policy_status[prep.policy.source] = "active"
        blocks.extend(prep.blocks)
        unblocks.extend(prep.unblocks)
        findings.extend(prep.findings)
        for key, _ in prep.unblocks:
            results[key] = OrderResult(key, "unblock")
    active = [prep.policy for prep in prepared]

    block_keys = [key for key, _ in blocks]
    blocks = _growth(blocks, lambda: order_lookup(active), previous, settings, findings)

    # name -> order key, or a set of keys once a second order names it (most names have one).
    exact: dict[str, str | set[str]] = {}
    subtree: dict[str, str | set[str]] = {}
    nets: dict[int, list[tuple[int, int, str]]] = {4: [], 6: []}
    for key, exp in blocks:
        for d in exp.domains:
            table, name = (subtree, d[2:]) if d[0] == "*" else (exact, d)
            held = table.setdefault(name, key)
            if held is not key and held != key:
                if isinstance(held, set):
                    held.add(key)
                else:
                    table[name] = {held, key}
        add4, add6 = nets[4].append, nets[6].append
        for version, first, plen in exp.cidrs:
            if version == 4:
                add4((first, first | HOST4[plen], key))
            else:
                add6((first, first | HOST6[plen], key))

    removed_names = [(d, f"unblock order {key}") for key, exp in unblocks for d in exp.domains]
    removed_names += [(d, "operator allowlist") for d in settings.allow_domains]
    tables = None if removed_names else (exact, subtree)  # handed over before any removal
    warnings += _remove_names(exact, subtree, removed_names)
    remove = {v: ranges.merge((c.first, c.last) for _, exp in unblocks for c in exp.cidrs if c.version == v)
              for v in (4, 6)}
    for v in (4, 6):
        allow = [(c.first, c.last) for c in settings.allow_cidrs if c.version == v]
        remove[v] = ranges.merge(remove[v] + allow)

    provenance = Provenance()
    # Rules per order, counted as the rules are made (a walk of 2M rules' order sets after is
    # seconds of cache misses): each distinct name of an order is one rule naming it, each
    # address piece is counted by `segment`. Recounted where unblocks or the allowlist cut.
    counts: dict[str, int] = {key: len(exp.domains) for key, exp in blocks if exp.domains}
    # in the rule set's order (name, then exact before subtree): its sort is then one pass
    of = provenance.of
    names = sorted(exact)
    domain_rules = list(map(DomainRule._make, zip(names, repeat(False), map(of, map(exact.__getitem__, names)))))
    if subtree:
        subs = sorted(subtree)
        domain_rules += map(DomainRule._make, zip(subs, repeat(True), map(of, map(subtree.__getitem__, subs))))
        domain_rules.sort()
    coverage = {4: segment(nets[4], provenance, counts), 6: segment(nets[6], provenance, counts)}
    v4 = subtract_rules(coverage[4], remove[4])
    v6 = subtract_rules(coverage[6], remove[6])
    ruleset = RuleSet.build(domain_rules, v4, v6, infos)
    if removed_names or remove[4] or remove[6]:
        counts = _rule_counts(ruleset)
    refused_by_order: dict[str, int] = {}
    for order_id, _ in {(f.order_id, f.rule) for f in findings if not f.allowed}:
        refused_by_order[order_id] = refused_by_order.get(order_id, 0) + 1
    rules_of = list(map(counts.get, block_keys, repeat(0)))
    if refused_by_order:
        bad_of: list[int] | repeat[int] = list(map(refused_by_order.get, block_keys, repeat(0)))
        status_of: list[Status] | repeat[Status] = [
            "enforced" if not bad else ("partially_refused" if n else "refused") for n, bad in zip(rules_of, bad_of)]
    else:
        bad_of, status_of = repeat(0), repeat("enforced")
    results.update(zip(block_keys, _order_results(block_keys, status_of, rules_of, bad_of)))
    # held as a Layered (not copied): the next merge by delta derives from it in O(change)
    comp = Compilation(ruleset, tuple(findings), Layered.adopt(results), tuple(warnings),
                       MappingProxyType(policy_status), MappingProxyType(tally_of(results)),
                       MappingProxyType(deadlines_of(prepared)),
                       tuple(sorted({key for key, _ in unblocks})))
    return Merged(comp, coverage, provenance, results, tables)


def _order_results(keys: list[str], statuses: Iterable[Status], rules: Iterable[int],
                   refused: Iterable[int]) -> list[OrderResult]:
    """OrderResults a column at a time (a registry's million: C loops through the slots'
    setters, as fastpolicy builds its Orders), equal to OrderResult(key, status, rules, refused)."""
    made = list(map(_new, repeat(OrderResult, len(keys))))
    for setter, column in zip(_RESULT_SETTERS, (keys, statuses, rules, refused)):
        deque(map(setter, made, column), 0)
    return made


_new = object.__new__
_RESULT_SETTERS = tuple(getattr(OrderResult, f.name).__set__ for f in fields(OrderResult))
assert [f.name for f in fields(OrderResult)] == ["key", "status", "rules", "refused"]


def tally_of(results: Mapping[str, OrderResult]) -> dict[tuple[str, str], int]:
    out: dict[tuple[str, str], int] = {}
    for key, r in results.items():
        c = (key.split("/", 1)[0], r.status)
        out[c] = out.get(c, 0) + 1
    return out


def _info(p: Policy, o: Order) -> OrderInfo:
    b = o.legal_basis
    return OrderInfo(o.id, p.issuer, p.serial, b.authority, b.reference, b.url, o.action, o.dns_answer,
                     o.deadline, p.issued_at)


def order_lookup(policies: Iterable[Policy]) -> dict[str, Order]:
    """Provenance key -> the order it names."""
    return {order_key(p, o): o for p in policies for o in p.orders}


def _guard(key: str, order: Order, exp: Expanded, guards: Guards) -> tuple[Expanded, list[Finding]]:
    """Drop the rules a guard refuses; return what is kept and every finding."""
    allow = {(a.rule, a.guard): a.reason for a in order.allow_collateral}
    findings: list[Finding] = []

    def verdict(rule: str, guard: str, reason: str) -> bool:
        why = allow.get((rule, guard)) or allow.get(("*", guard))
        src = exp.via.get(rule)
        text = f"{reason} (via {src})" if src else reason
        if why is not None:
            findings.append(Finding(key, rule, guard, f"{text}; allowed: {why}", allowed=True))
            return True
        findings.append(Finding(key, rule, guard, text))
        return False

    domains = []
    check_name = guards.check_name
    for d in exp.domains:
        reason = check_name(d[2:] if d[0] == "*" else d)
        if reason is None or verdict(d, "public_suffix", reason):
            domains.append(d)
    refused = set()
    for cidr, problems in guards.check_cidrs(exp.cidrs):
        text = str(cidr)
        if not all([verdict(text, g, r) for g, r in problems]):
            refused.add(cidr)
    if not refused and len(domains) == len(exp.domains):
        return exp, findings  # all kept: the same object (a million orders, a million fewer copies)
    cidrs = [c for c in exp.cidrs if c not in refused] if refused else exp.cidrs
    return Expanded(tuple(domains), tuple(cidrs), exp.via), findings


def _growth(blocks: list[tuple[str, Expanded]], lookup: Callable[[], Mapping[str, Order]], previous: Baseline | None,
            settings: CompileSettings, findings: list[Finding]) -> list[tuple[str, Expanded]]:
    """`lookup` gives key -> order; called only when the set would grow past the limit."""
    if previous is None or previous.size < settings.growth_floor:
        return blocks
    limit = int(previous.size * settings.growth_factor)
    size = lambda exp: len(exp.domains) + len(exp.cidrs)  # noqa: E731
    total = sum(size(exp) for _, exp in blocks)
    if total <= limit:
        return blocks
    orders = lookup()
    kept = []
    # Orders already enforced keep their place; new ones are admitted in id order while they fit.
    old = [(k, e) for k, e in blocks if k in previous.orders]
    new = sorted((k, e) for k, e in blocks if k not in previous.orders)
    running = sum(size(e) for _, e in old)
    for key, exp in new:
        allowed = next((a.reason for a in orders[key].allow_collateral if a.guard == "growth"), None)
        if running + size(exp) <= limit or allowed is not None:
            running += size(exp)
            kept.append((key, exp))
            if allowed is not None and running > limit:
                findings.append(Finding(key, "*", "growth", f"rule set grows past {limit}; allowed: {allowed}", True))
            continue
        findings.append(Finding(
            key, "*", "growth",
            f"adding {size(exp)} rules would grow the rule set from {previous.size} to {running + size(exp)}, "
            f"more than {settings.growth_factor}x; the whole order is refused",
        ))
    return old + kept


def _remove_names(exact: dict[str, str | set[str]], subtree: dict[str, str | set[str]],
                  removals: list[tuple[str, str]]) -> list[str]:
    """Apply name removals in place; warn where an exact removal sits under a blocked subtree."""
    if not removals:
        return []
    warnings = []
    cut = {d[2:] for d, _ in removals if d[0] == "*"}
    if cut:
        for table in (exact, subtree):
            for name in [n for n in table if any(p in cut for p in parents(n))]:
                del table[name]
    for d, why in removals:
        if d[0] == "*":
            continue
        exact.pop(d, None)
        covering = next((p for p in parents(d) if p in subtree), None)
        if covering is not None:
            held = subtree[covering]
            by = ", ".join(sorted(held)) if isinstance(held, set) else held
            warnings.append(f"{why}: {d} stays blocked: it lies under {display(covering, True)}, blocked by {by}")
    return warnings


class Provenance:
    """Hands out one shared order set per distinct set of order keys: a `One` for a single
    key (a registry's million rules each carry their own), a frozenset for several."""

    def __init__(self) -> None:
        self._single: dict[str, frozenset[str]] = {}
        self._sets: dict[frozenset[str], frozenset[str]] = {}
        self._steps: dict[tuple[frozenset[str], str, int], frozenset[str]] = {}
        self.empty: frozenset[str] = frozenset()

    def of(self, keys: str | set[str]) -> frozenset[str]:
        if isinstance(keys, str):
            found = self._single.get(keys)
            if found is None:
                found = self._single[keys] = One((keys,))  # type: ignore[assignment]
            return found
        return self.intern(frozenset(keys))

    def intern(self, value: frozenset[str]) -> frozenset[str]:
        if len(value) == 1:  # one table, keyed by the string
            (key,) = value
            found = self._single.get(key)
            if found is None:
                found = self._single[key] = value if type(value) is One else One((key,))  # type: ignore[assignment]
            return found
        return self._sets.setdefault(value, value)

    def step(self, current: frozenset[str], key: str, delta: int) -> frozenset[str]:
        """`current` plus (delta > 0) or minus `key`, memoised: sweeps repeat the same steps."""
        memo = (current, key, delta)
        found = self._steps.get(memo)
        if found is None:
            found = self._steps[memo] = self.intern(current | {key} if delta > 0 else current - {key})
        return found


def segment(entries: list[tuple[int, int, str]], provenance: Provenance,
            counts: dict[str, int] | None = None) -> list[NetRule]:
    """(first, last, order) triples -> disjoint NetRules with exactly the orders covering each;
    with `counts`, each order's number of pieces is added to it.

    Adjacent pieces with the same orders are joined. Most intervals of a registry touch no
    other (one order per decision): one sort, and each such run is a piece as it is; only a
    cluster of touching intervals of several orders goes through the sweep.
    """
    flat = sorted(entries, key=_FIRST)  # by first address only: int keys sort several times faster
    out: list[NetRule] = []
    single = provenance.of
    tally: dict[str, int] = {} if counts is None else counts
    get = tally.get
    i, n = 0, len(flat)
    while i < n:
        a, end, key = flat[i]
        j = i + 1
        mixed = False
        while j < n and flat[j][0] <= end + 1:  # overlapping or adjacent: one cluster
            _, last, other = flat[j]
            if last > end:
                end = last
            if other != key:
                mixed = True
            j += 1
        if mixed:
            pieces = _sweep(_merged_per_key(flat[i:j]), provenance)
            for piece in pieces:
                for k in piece.orders:
                    tally[k] = get(k, 0) + 1
            out.extend(pieces)
        else:
            out.append(NetRule(a, end, single(key)))
            tally[key] = get(key, 0) + 1
        i = j
    return out


def _merged_per_key(cluster: list[tuple[int, int, str]]) -> list[tuple[int, int, str]]:
    """Each key's intervals of a cluster merged (the sweep counts one start per key)."""
    by_key: dict[str, list[tuple[int, int]]] = {}
    for first, last, key in cluster:
        by_key.setdefault(key, []).append((first, last))
    return sorted((a, b, key) for key, ivs in by_key.items() for a, b in ranges.merge(ivs))


def _sweep(flat: list[tuple[int, int, str]], provenance: Provenance) -> list[NetRule]:
    """Overlapping (first, last, key) intervals (each key's already merged) -> exact pieces."""
    # Boundaries as single ints (position, start flag, key index) sort several times faster
    # than tuples; all events at one position are applied before a piece is emitted.
    keys = list(dict.fromkeys(key for _, _, key in flat))
    index_of = {key: i for i, key in enumerate(keys)}
    events: list[int] = []
    for a, b, key in flat:
        index = index_of[key]
        events.append((a << _SHIFT) | _START | index)
        events.append(((b + 1) << _SHIFT) | index)
    events.sort()
    out: list[NetRule] = []
    active = provenance.empty
    step = provenance.step
    i, n = 0, len(events)
    while i < n:
        pos = events[i] >> _SHIFT
        while i < n and events[i] >> _SHIFT == pos:
            ev = events[i]
            active = step(active, keys[ev & _INDEX], 1 if ev & _START else -1)
            i += 1
        if active and i < n:
            end = (events[i] >> _SHIFT) - 1
            if out and out[-1].last + 1 == pos and out[-1].orders is active:
                out[-1] = NetRule(out[-1].first, end, active)
            else:
                out.append(NetRule(pos, end, active))
    return out


_INDEX = (1 << 24) - 1  # up to 16M distinct orders per pass
_START = 1 << 24
_SHIFT = 25


def subtract_rules(rules: list[NetRule], remove: list[tuple[int, int]]) -> list[NetRule]:
    """Cut the sorted disjoint intervals `remove` out of `rules`, keeping provenance."""
    if not remove:
        return rules
    out: list[NetRule] = []
    for orders, pieces in _group_runs(rules):
        out.extend(NetRule(a, b, orders) for a, b in ranges.subtract(pieces, remove))
    out.sort()
    return out


def _group_runs(rules: list[NetRule]) -> Iterable[tuple[frozenset[str], list[tuple[int, int]]]]:
    groups: dict[frozenset[str], list[tuple[int, int]]] = {}
    for a, b, orders in rules:
        groups.setdefault(orders, []).append((a, b))
    return groups.items()


def _rule_counts(ruleset: RuleSet) -> dict[str, int]:
    """Order key -> how many rules name it (counted at C level: a rule's orders are its field 2)."""
    counts: Counter[str] = Counter()
    for rules in (ruleset.domains, ruleset.v4, ruleset.v6):
        counts.update(chain.from_iterable(map(_ORDERS, rules)))
    return counts


_ORDERS = operator.itemgetter(2)  # DomainRule.orders, NetRule.orders
_FIRST = operator.itemgetter(0)
