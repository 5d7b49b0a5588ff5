"""The merge, carried forward by delta: a pass costs what changed, not what is enforced.

`compile.merge` is the reference: prepared policies -> one RuleSet with exact provenance,
from scratch. `Merger.update` gives the same Compilation (tested against it, rule for rule)
from the last one and the difference in its inputs:

    inputs     the prepared policies in force; a Prepared that is the same object as last
               time contributes nothing new; of a changed one (a new serial), only orders
               whose expansion or answer-relevant provenance changed are looked at again.
               A new serial prepared beside the one it replaces (`Prepared.prior`) names
               those orders itself (`Prepared.changed`): the rest of it is not walked, so a
               registry re-issued with one decision changed costs that decision here
    coverage   names -> the orders naming them, and the address intervals cut at every
               order boundary, both before the unblock orders and the operator allowlist
               are taken out; an order's contribution leaving or entering changes only the
               names it names and the pieces its intervals meet (re-segmented locally)
    final      coverage minus the removals (unblocks, allowlist), recomputed only where the
               coverage or the removals changed
    out        the rules that left and entered (`model.RuleDelta`), applied to the last
               RuleSet by `RuleSet.patched`, which also gives the kernel's Plan and the digest

Anything unusual (new compile settings, a growth refusal in force, a delta that does not fit)
falls back to the reference merge, whose result becomes the new starting point.

Mutable state, owned by one reconciler and used from one thread at a time.
"""

from __future__ import annotations

from bisect import bisect_left
from collections.abc import Iterator, Mapping, Sequence
from itertools import chain
from types import MappingProxyType

from blockd import ranges
from blockd.compile import (
    Baseline, Compilation, CompileSettings, Merged, OrderResult, Prepared, Provenance, Status, _remove_names,
    infos_of, merge_with_parts,
    segment, subtract_rules,
)
from blockd.chunked import Chunked
from blockd.expand import Expanded
from blockd.layered import Layered, Overlay
from blockd.model import (
    DomainRule, NetRule, OrderInfo, Plan, RuleDelta, RuleSet, _first, _last, _name_key, answer_view, gc_paused,
    seq_bisect,
)
from blockd.names import parents
from blockd.ranges import HOST4, HOST6

Contribution = tuple[str, Expanded]  # (order key, what it blocks or unblocks)


class Merger:
    def __init__(self) -> None:
        self._settings: CompileSettings | None = None
        self._prepared: tuple[Prepared, ...] = ()
        self.comp: Compilation | None = None
        # coverage, before removals
        self._exact: dict[str, str | set[str]] = {}
        self._subtree: dict[str, str | set[str]] = {}
        self._cov: dict[int, Chunked] = {4: Chunked(), 6: Chunked()}
        self._blocks: dict[str, Expanded] = {}
        self._unblocks: dict[str, Expanded] = {}
        self._infos: Layered[str, OrderInfo] = Layered()
        self._active: Overlay[str, OrderResult] = Overlay({})  # results of the orders of policies in force
        self._waiting: dict[str, OrderResult] = {}  # of orders of policies not in force
        self._statuses: dict[str, Status] = {}
        self._refused: dict[str, int] = {}
        #: id(Prepared) -> (it, its refusals by order): for the policies in force
        self._refusals: dict[int, tuple[Prepared, dict[str, int]]] = {}
        self._provenance = Provenance()
        self._size = 0  # rules over all block contributions (the growth guard's measure)
        #: the last update's path: "reference" (a full merge) or "delta"
        self.path = "reference"

    def update(self, prepared: Sequence[Prepared], settings: CompileSettings, previous: RuleSet | Baseline | None,
               statuses: Mapping[str, Status], policy_statuses: Mapping[str, str]) -> tuple[Compilation, Plan | None,
                                                                                           RuleDelta, RuleDelta]:
        """The Compilation `merge` would give, and (plan, removed, added) from the last one.

        The plan is None after a reference merge (the caller diffs)."""
        with gc_paused():
            if self.comp is not None and settings == self._settings:
                try:
                    got = self._delta(tuple(prepared), settings, None if previous is None else len(previous) if
                                      isinstance(previous, RuleSet) else previous.size, statuses, policy_statuses)
                except _Unfit:
                    got = None
                if got is not None:
                    self.path = "delta"
                    return got
            self.path = "reference"
            merged = merge_with_parts(prepared, settings, previous, statuses, policy_statuses)
            self._reset(tuple(prepared), settings, merged, statuses)
            return merged.compilation, None, RuleDelta(), RuleDelta()

    @property
    def prepared(self) -> tuple[Prepared, ...]:
        """The policies the last update merged (empty before the first, or after a failure)."""
        return self._prepared if self.comp is not None else ()

    # -- the reference path: rebuild the state from a full merge --------------------------------

    def _reset(self, prepared: tuple[Prepared, ...], settings: CompileSettings, merged: Merged,
               statuses: Mapping[str, Status]) -> None:
        """Take the reference merge's result and the parts it was made from (its coverage,
        interned provenance and per-order results: not computed a second time)."""
        comp = merged.compilation
        self._settings, self._prepared, self.comp = settings, prepared, comp
        self._provenance = merged.provenance
        self._blocks, self._unblocks = {}, {}
        for prep in prepared:
            self._blocks.update(prep.blocks)
            self._unblocks.update(prep.unblocks)
        self._infos = infos_of(prepared)
        if any(f.guard == "growth" and not f.allowed for f in comp.findings):
            self.comp = None  # an order refused for growth: the next pass merges in full again
            return
        self._size = sum(_size(e) for e in self._blocks.values())
        if merged.names is not None:  # the merge's own (no unblock or allowlist took a name away)
            self._exact, self._subtree = merged.names
        else:
            self._exact, self._subtree = {}, {}
            for key, exp in self._blocks.items():
                _add_names_to(self._exact, self._subtree, key, exp, None)
        self._cov = {v: Chunked(merged.coverage[v]) for v in (4, 6)}
        self._statuses = dict(statuses)
        self._waiting = {k: OrderResult(k, v) for k, v in statuses.items()}
        # the orders of the policies in force: every result but those only waiting (over the
        # merge's dict, not a copy: comp.orders is a view of it, which this one departs from)
        self._active = Overlay(merged.results, (k for k in statuses if k not in self._blocks and k not in self._unblocks))
        self._refused = _refused(list(comp.findings))

    # -- the delta path --------------------------------------------------------------------------

    def _delta(self, prepared: tuple[Prepared, ...], settings: CompileSettings, baseline: int | None,
               statuses: Mapping[str, Status], policy_statuses: Mapping[str, str]
               ) -> tuple[Compilation, Plan, RuleDelta, RuleDelta] | None:
        """The delta path. It mutates this merger's own state in place (never what an earlier
        Compilation holds); if anything fails half way, the state is dropped and the caller
        merges from scratch."""
        try:
            return self._delta_in_place(prepared, settings, baseline, statuses, policy_statuses)
        except BaseException:
            self.comp = None
            raise

    def _delta_in_place(self, prepared: tuple[Prepared, ...], settings: CompileSettings, baseline: int | None,
                        statuses: Mapping[str, Status], policy_statuses: Mapping[str, str]
                        ) -> tuple[Compilation, Plan, RuleDelta, RuleDelta] | None:
        assert self.comp is not None
        old_comp = self.comp
        old_ids = {id(p) for p in self._prepared}
        new_ids = {id(p) for p in prepared}
        gone = [p for p in self._prepared if id(p) not in new_ids]
        came = [p for p in prepared if id(p) not in old_ids]
        old_rs = old_comp.ruleset

        # A new serial prepared beside the one it replaces (`Prepared.prior`) says which of its
        # orders differ; every other order contributes exactly what it did, so only those are
        # looked at (a registry re-issued with one decision changed costs that decision). Any
        # other policy that came or went is looked at whole.
        by_digest = {p.policy.digest: p for p in gone}
        replaced: dict[int, Prepared] = {}  # id(came) -> the Prepared it replaces
        for q in came:
            g = by_digest.get(q.prior) if q.prior is not None else None
            if g is not None and g.policy.issuer == q.policy.issuer and all(x is not g for x in replaced.values()):
                replaced[id(q)] = g
        whole_gone = [p for p in gone if all(g is not p for g in replaced.values())]
        whole_came = [p for p in came if id(p) not in replaced]
        scope = {k for q in came if id(q) in replaced for k in q.changed}

        # Which contributions changed: by expansion object (the per-order cache hands out the
        # same one for an unchanged order) and by answer-relevant provenance.
        old_b = {k: e for p in whole_gone for k, e in p.blocks}
        new_b = {k: e for p in whole_came for k, e in p.blocks}
        old_u = {k: e for p in whole_gone for k, e in p.unblocks}
        new_u = {k: e for p in whole_came for k, e in p.unblocks}
        old_info = {k: self._infos[k] for p in whole_gone for k in p.infos}
        new_info = {k: i for p in whole_came for k, i in p.infos.items()}
        if scope:
            old_b.update((k, self._blocks[k]) for k in scope if k in self._blocks)
            old_u.update((k, self._unblocks[k]) for k in scope if k in self._unblocks)
            old_info.update((k, self._infos[k]) for k in scope if k in self._infos)
            for q in came:
                if id(q) in replaced and q.changed:
                    ch = q.changed
                    if q.hits is not None:  # what prepare saw them contribute
                        for k, hit in q.hits.items():  # in the policy's order, as the walk below
                            if k in ch:
                                (new_u if hit[0] == "unblock" else new_b)[k] = hit[1]
                    else:
                        new_b.update((k, e) for k, e in q.blocks if k in ch)
                        new_u.update((k, e) for k, e in q.unblocks if k in ch)
                    new_info.update((k, q.infos[k]) for k in ch if k in q.infos)
        retag = {k for k, i in new_info.items() if k in old_info and answer_view(old_info[k]) != answer_view(i)}
        leave = {k: e for k, e in old_b.items() if new_b.get(k) is not e or k in retag}
        enter = {k: e for k, e in new_b.items() if old_b.get(k) is not e or k in retag}
        unblocks_changed = any(new_u.get(k) is not e for k, e in old_u.items()) or \
            any(old_u.get(k) is not e for k, e in new_u.items())

        out_n, in_n = sum(_size(e) for e in leave.values()), sum(_size(e) for e in enter.values())
        if out_n + in_n > max(DELTA_FLOOR, self._size // 4):
            return None  # most of the set changes: the reference merge costs no more (nothing mutated yet)
        size = self._size - out_n + in_n
        if baseline is not None and baseline >= settings.growth_floor and size > int(baseline * settings.growth_factor):
            return None  # the growth guard decides: the reference merge does it (nothing mutated yet)

        infos = infos_of(prepared)
        blocks = self._blocks
        for k in leave:
            del blocks[k]
        blocks.update(enter)
        old_names, old_cut = _removals(self._unblocks, settings)
        old_remove = _net_removals(self._unblocks, settings)
        unblocks = self._unblocks
        if unblocks_changed:
            for k in old_u:
                del unblocks[k]
            unblocks.update(new_u)

        # Names: coverage first, then what the removals leave of each touched name.
        exact, subtree = self._exact, self._subtree
        touched: set[tuple[str, bool]] = set()
        for k, e in leave.items():
            _remove_names_of(exact, subtree, k, e, touched)
        for k, e in enter.items():
            _add_names_to(exact, subtree, k, e, touched)
        new_names, new_cut = _removals(unblocks, settings) if unblocks_changed else (old_names, old_cut)
        if unblocks_changed:
            for n in old_names ^ new_names:
                touched.add((n, False))
            for cut in old_cut ^ new_cut:  # a subtree unblock came or went: every name below it
                for table, sub in ((exact, False), (subtree, True)):
                    touched.update((n, sub) for n in table if cut in parents(n))
        prov = self._provenance
        rem_d: list[DomainRule] = []
        add_d: list[DomainRule] = []
        for name, sub in touched:
            before = _find_name(old_rs.domains, name, sub)
            held = (subtree if sub else exact).get(name)
            after = None
            if held is not None and not (not sub and name in new_names) and \
                    not any(p in new_cut for p in parents(name)):
                after = DomainRule(name, sub, prov.of(held))
            if before == after and (before is None or retag.isdisjoint(before.orders)):
                continue
            if before is not None:
                rem_d.append(before)
            if after is not None:
                add_d.append(after)

        # Addresses: re-segment the coverage where a contribution's intervals lie, then cut
        # the removals out of the pieces that changed, and of the pieces under a changed removal.
        new_remove = _net_removals(unblocks, settings) if unblocks_changed else old_remove
        changed_keys = leave.keys() | enter.keys()
        rem_n: dict[int, list[NetRule]] = {4: [], 6: []}
        add_n: dict[int, list[NetRule]] = {4: [], 6: []}
        for v in (4, 6):
            spans = [(a, b) for k, e in (*leave.items(), *enter.items()) for a, b, ver in _intervals(e) if ver == v]
            removal_spans = _symmetric(old_remove[v], new_remove[v])
            if not spans and not removal_spans:
                continue
            self._cov[v], windows = _resegment(self._cov[v], ranges.merge(spans + removal_spans), changed_keys,
                                               {k: [(a, b) for a, b, ver in _intervals(e) if ver == v]
                                                for k, e in enter.items()}, prov)
            old_final = getattr(old_rs, f"v{v}")
            for lo, hi, pieces in windows:
                before_set = set(_rules_within(old_final, lo, hi))
                after_set = set(subtract_rules(pieces, new_remove[v]))
                for r in before_set - after_set:
                    rem_n[v].append(r)
                for r in after_set - before_set:
                    add_n[v].append(r)
                if retag:
                    for r in before_set & after_set:
                        if not retag.isdisjoint(r.orders):
                            rem_n[v].append(r)
                            add_n[v].append(r)

        removed = RuleDelta(tuple(sorted(rem_d)), tuple(sorted(rem_n[4])), tuple(sorted(rem_n[6])))
        added = RuleDelta(tuple(sorted(add_d)), tuple(sorted(add_n[4])), tuple(sorted(add_n[6])))
        try:
            ruleset, plan = old_rs.patched(removed, added, infos)
        except ValueError as e:
            raise _Unfit(str(e)) from None

        # Per-order results: only the orders whose rules or refusals changed are recounted,
        # from the rule count their result holds (no second million-entry table beside it).
        active = self._active
        counts: dict[str, int] = {}
        for delta, sign in ((removed, -1), (added, 1)):
            for orders in _orders_of(delta):
                for k in orders:
                    n = counts.get(k)
                    if n is None:
                        n = r.rules if (r := active.get(k)) is not None else 0
                    counts[k] = n + sign
        for k, n in counts.items():
            if n < 0:
                raise _Unfit(f"order {k}: {n} rules after the delta")  # the results were not the rules'
        findings = list(chain.from_iterable(p.findings for p in prepared))  # C level: a registry has many
        warnings = _name_warnings(exact, subtree, unblocks, settings)
        # Refusals come from each order's own policy: only the policies that came or went change them.
        refused = self._refused
        changed_refusals: set[str] = set()
        if gone or came:
            refused = dict(refused)
            for p in whole_gone:
                for k in self._refused_of(p):
                    refused.pop(k, None)
                    changed_refusals.add(k)
            for p in whole_came:
                mine = self._refused_of(p)
                refused.update(mine)
                changed_refusals.update(mine)
            for q in came:  # a replaced policy's refusals differ only in its changed orders
                g = replaced.get(id(q))
                if g is not None and q.changed:
                    was, now = self._refused_of(g), self._refused_beside(q, g)
                    for k in q.changed:
                        if k in was or k in now:
                            refused.pop(k, None)
                            if k in now:
                                refused[k] = now[k]
                            changed_refusals.add(k)
        # the order keys of what came and went (of a replaced policy: its changed orders only)
        gone_keys = {k for p in whole_gone for k in p.infos} | scope
        came_keys = {k for p in whole_came for k in p.infos} | {k for k in scope if k in new_info}
        was_active = {k for k in gone_keys if k in active}
        for k in gone_keys - came_keys:
            active.pop(k, None)
        touch = set(leave) | set(enter) | changed_refusals | scope
        for delta in (removed, added):
            for orders in _orders_of(delta):
                touch.update(orders)
        for k in new_u:
            active[k] = OrderResult(k, "unblock")
        touch.update(k for k in new_b if k not in was_active)
        for k in touch:
            if k in blocks:
                rules_n = counts[k] if k in counts else r.rules if (r := active.get(k)) is not None else 0
                bad = refused.get(k, 0)
                status: Status = "enforced" if not bad else ("partially_refused" if rules_n else "refused")
                active[k] = OrderResult(k, status, rules_n, bad)
        waiting = self._waiting
        if statuses != self._statuses:
            waiting = {k: OrderResult(k, v) for k, v in statuses.items()}
        # The orders whose result may have changed: the results and the tally by (issuer,
        # status) are updated for these only.
        maybe = touch | gone_keys | came_keys | old_u.keys() | new_u.keys()
        if waiting is not self._waiting:
            maybe |= waiting.keys() | self._waiting.keys()
        old_results = old_comp.orders
        updates: dict[str, OrderResult] = {}
        deletions: list[str] = []
        tally = dict(old_comp.tally)
        for k in maybe:
            before_r = old_results.get(k)
            after_r = active.get(k) or waiting.get(k)
            if before_r == after_r:
                continue
            if after_r is None:
                deletions.append(k)
            else:
                updates[k] = after_r
            issuer = k.split("/", 1)[0]
            for res, sign in ((before_r, -1), (after_r, 1)):
                if res is not None:
                    c = (issuer, res.status)
                    total = tally.get(c, 0) + sign
                    if total:
                        tally[c] = total
                    else:
                        del tally[c]
        results = _layered(old_results).derive(updates, deletions)
        deadlines = _layered(old_comp.deadlines).derive(
            {k: i.deadline for k, i in new_info.items() if i.deadline is not None},
            [k for k in old_info if k not in new_info or new_info[k].deadline is None])
        policy_status = dict(policy_statuses)
        for prep in prepared:
            policy_status[prep.policy.source] = "active"
        comp = Compilation(ruleset, tuple(findings), results, tuple(warnings), MappingProxyType(policy_status),
                           MappingProxyType(tally), deadlines, tuple(sorted(unblocks)))

        self._prepared, self.comp, self._infos = prepared, comp, infos
        self._waiting, self._statuses, self._refused, self._size = waiting, dict(statuses), refused, size
        self._refusals = {i: v for i, v in self._refusals.items() if i in new_ids}  # only policies in force
        return comp, plan, removed, added

    def _refused_of(self, prep: Prepared) -> dict[str, int]:
        """`_refused(prep.findings)`, once per Prepared (kept with it, so its id stays its own)."""
        hit = self._refusals.get(id(prep))
        if hit is None or hit[0] is not prep:
            hit = self._refusals[id(prep)] = (prep, _refused(list(prep.findings)))
        return hit[1]

    def _refused_beside(self, q: Prepared, g: Prepared) -> dict[str, int]:
        """`_refused_of(q)` for a serial prepared beside `g`: an order's findings are its own, so
        the two differ only in q's changed orders (a copy of g's, not a walk of every finding)."""
        if q.hits is None:
            return self._refused_of(q)
        now = dict(self._refused_of(g))
        for k in q.changed:
            now.pop(k, None)
        now.update(_refused([f for k in q.changed if (hit := q.hits.get(k)) is not None for f in hit[2]]))
        self._refusals[id(q)] = (q, now)
        return now


def _layered(m: Mapping[str, object]) -> Layered:  # type: ignore[type-arg]
    return m if isinstance(m, Layered) else Layered(m)


def _orders_of(delta: RuleDelta) -> Iterator[frozenset[str]]:
    for r in delta.domains:
        yield r.orders
    for n in (*delta.v4, *delta.v6):
        yield n.orders


#: a change of more rules than this and a quarter of the set is merged by the reference
DELTA_FLOOR = 4096


class _Unfit(Exception):
    pass


def _size(exp: Expanded) -> int:
    return len(exp.domains) + len(exp.cidrs)


def _intervals(exp: Expanded) -> list[tuple[int, int, int]]:
    return [(first, first | (HOST4[plen] if version == 4 else HOST6[plen]), version)
            for version, first, plen in exp.cidrs]


def _add_names_to(exact: dict[str, str | set[str]], subtree: dict[str, str | set[str]], key: str, exp: Expanded,
                  touched: set[tuple[str, bool]] | None) -> None:
    for d in exp.domains:
        table, name, sub = (subtree, d[2:], True) if d[0] == "*" else (exact, d, False)
        if touched is not None:
            touched.add((name, sub))
        held = table.get(name)
        if held is None:
            table[name] = key
        elif isinstance(held, set):
            table[name] = held | {key}
        elif held != key:
            table[name] = {held, key}


def _remove_names_of(exact: dict[str, str | set[str]], subtree: dict[str, str | set[str]], key: str,
                     exp: Expanded, touched: set[tuple[str, bool]]) -> None:
    for d in exp.domains:
        table, name, sub = (subtree, d[2:], True) if d[0] == "*" else (exact, d, False)
        touched.add((name, sub))
        held = table.get(name)
        if held is None:
            continue
        if isinstance(held, set):
            rest = held - {key}
            table[name] = next(iter(rest)) if len(rest) == 1 else rest
        elif held == key:
            del table[name]


def _removals(unblocks: Mapping[str, Expanded], settings: CompileSettings) -> tuple[set[str], set[str]]:
    """(exact names removed, subtrees cut) by unblock orders and the operator allowlist."""
    names = [d for e in unblocks.values() for d in e.domains] + list(settings.allow_domains)
    return {d for d in names if d[0] != "*"}, {d[2:] for d in names if d[0] == "*"}


def _net_removals(unblocks: Mapping[str, Expanded], settings: CompileSettings) -> dict[int, list[tuple[int, int]]]:
    out = {}
    for v in (4, 6):
        rem = [(c.first, c.last) for e in unblocks.values() for c in e.cidrs if c.version == v]
        out[v] = ranges.merge(rem + [(c.first, c.last) for c in settings.allow_cidrs if c.version == v])
    return out


def _symmetric(a: list[tuple[int, int]], b: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """Spans where two sorted disjoint interval lists differ (a superset is fine)."""
    if a == b:
        return []
    return [x for x in set(a) ^ set(b)]


def _name_warnings(exact: Mapping[str, str | set[str]], subtree: Mapping[str, str | set[str]],
                   unblocks: Mapping[str, Expanded], settings: CompileSettings) -> list[str]:
    removals = [(d, f"unblock order {k}") for k, e in unblocks.items() for d in e.domains]
    removals += [(d, "operator allowlist") for d in settings.allow_domains]
    if not removals:
        return []
    # `_remove_names` mutates: give it only the names the warnings can be about.
    probe_exact = {d: exact[d] for d, _ in removals if d[0] != "*" and d in exact}
    cut = {d[2:] for d, _ in removals if d[0] == "*"}
    probe_sub = {p: subtree[p] for d, _ in removals if d[0] != "*" for p in parents(d)
                 if p in subtree and not any(q in cut for q in parents(p))}
    return _remove_names(probe_exact, probe_sub, removals)


def _find_name(domains: Sequence[DomainRule], name: str, sub: bool) -> DomainRule | None:
    i = seq_bisect(domains, (name, sub), _name_key)
    if i < len(domains) and domains[i].name == name and domains[i].subtree == sub:
        return domains[i]
    return None


def _rules_within(rules: Sequence[NetRule], lo: int, hi: int) -> list[NetRule]:
    i = seq_bisect(rules, lo, _first)
    out = []
    while i < len(rules) and rules[i].first <= hi:
        out.append(rules[i])
        i += 1
    return out


def _resegment(cov: Chunked, spans: list[tuple[int, int]], changed: set[str] | frozenset[str],
               entering: Mapping[str, list[tuple[int, int]]], prov: Provenance
               ) -> tuple[Chunked, list[tuple[int, int, list[NetRule]]]]:
    """The coverage with the changed orders' pieces recomputed inside windows around `spans`.

    Returns the new coverage and, per window, (lo, hi, its new pieces). Outside the windows
    nothing changes; inside, the unchanged orders' coverage is read off the old pieces."""
    n = len(cov)
    windows: list[list[int]] = []  # [lo, hi, i, j]: old pieces cov[i:j] lie in [lo, hi]
    for a, b in spans:
        i = cov.bisect(a - 1, _last)  # first piece ending at or after a - 1
        j = i
        while j < n and cov[j].first <= b + 1:
            j += 1
        lo = min(a, cov[i].first) if i < j else a
        hi = max(b, cov[j - 1].last) if i < j else b
        if windows and (windows[-1][3] > i or windows[-1][1] + 1 >= lo):
            w = windows[-1]
            w[1], w[3] = max(w[1], hi), max(w[3], j)
        else:
            windows.append([lo, hi, i, j])
    # each entering interval, cut to the windows it meets (sorted and disjoint: found by
    # bisection, so 20,000 intervals entering in 20,000 windows cost 20,000 steps, not 400M)
    his = [w[1] for w in windows]
    meets: list[list[tuple[int, int, str]]] = [[] for _ in windows]
    for k, ivs in entering.items():
        for a, b in ivs:
            w = bisect_left(his, a)  # the first window ending at or after a
            while w < len(windows) and windows[w][0] <= b:
                meets[w].append((max(a, windows[w][0]), min(b, windows[w][1]), k))
                w += 1
    out: list[tuple[int, int, list[NetRule]]] = []
    drop: set[int] = set()
    inserts: dict[int, list[NetRule]] = {}
    for (lo, hi, i, j), entered in zip(windows, meets):
        events: list[tuple[int, int, str]] = []
        for p in cov[i:j]:
            for k in p.orders:
                if k not in changed:
                    events.append((p.first, p.last, k))
        events += entered
        new = segment(events, prov)
        out.append((lo, hi, new))
        drop.update(range(i, j))
        if new:
            inserts.setdefault(i, []).extend(new)  # windows in a gap share their insertion point
    result = cov.splice(drop, inserts)
    # A window's edge piece may now equal its unchanged neighbour outside: join them.
    return _join_adjacent(result, out), out


def _join_adjacent(cov: Chunked, windows: list[tuple[int, int, list[NetRule]]]) -> Chunked:
    bad = False
    for lo, hi, _ in windows:
        for edge in (lo, hi + 1):
            i = cov.bisect(edge, _first)
            if 0 < i < len(cov) and cov[i - 1].last + 1 == cov[i].first and cov[i - 1].orders == cov[i].orders:
                bad = True
    if not bad:
        return cov
    raise _Unfit("a window edge joins its neighbour")


def _refused(findings: list) -> dict[str, int]:  # type: ignore[type-arg]
    out: dict[str, int] = {}
    for order_id, _ in {(f.order_id, f.rule) for f in findings if not f.allowed}:
        out[order_id] = out.get(order_id, 0) + 1
    return out
