"""Issue 14: the merge carried forward by delta (blockd.incremental) gives exactly what the
reference merge gives from scratch: rules, provenance, per-order results, findings, warnings,
and the (removed, added) delta and plan between the two rule sets.

Each case is a sequence of passes; every pass is checked against `compile.merge`.
"""

from __future__ import annotations

import hashlib
import random

import pytest

from blockd import ranges
from blockd.compile import CompileSettings, OrderCache, merge, order_key, prepare
from blockd.guards import Guards
from blockd.incremental import Merger
from blockd.model import diff, rule_delta
from tests.unit.test_compile import CATALOG, INFRA, PSL, order, policy

SETTINGS = CompileSettings(Guards(PSL, INFRA), allow_domains=("allowed.example",),
                           allow_cidrs=(ranges.parse_cidr("10.9.9.0/24"),))


def run(passes: list[list], settings: CompileSettings = SETTINGS) -> Merger:
    """Each pass: the policies in force. Checks every pass against the reference."""
    merger = Merger()
    cache: OrderCache = {}
    entries: dict[str, OrderCache] = {}  # per digest: its orders' entries (the reconciler's `own`)
    prepared_by_digest: dict = {}
    previous = None
    for i, policies in enumerate(passes):
        prepared = []
        for p in policies:  # an unchanged policy is the same Prepared object, as in the reconciler
            if p.digest not in prepared_by_digest:
                # beside the same issuer's policy in force, as the reconciler does: the merge
                # then looks only at the orders the new serial changed
                in_force = next((x for x in merger.prepared if x.policy.issuer == p.issuer), None)
                prior = (in_force, entries[in_force.policy.digest]) if in_force is not None else None
                own: OrderCache = {}
                prepared_by_digest[p.digest] = got = prepare(p, CATALOG, settings.guards, cache, into=own, prior=prior)
                plain = prepare(p, CATALOG, settings.guards)  # from nothing: the same contribution
                assert (got.blocks, got.unblocks, got.findings) == (plain.blocks, plain.unblocks, plain.findings)
                assert got.entries is not None and (got.entries is own or set(own) <= set(got.entries))
                assert dict(got.infos) == dict(plain.infos) and set(got.entries) == set(plain.infos)
                order_of = {order_key(p, o): o for o in p.orders}
                assert all(o is order_of[k] for k, (o, _) in got.entries.items())
                cache.update(got.entries)
                entries[p.digest] = got.entries
            prepared.append(prepared_by_digest[p.digest])
        want = merge(prepared, settings, previous)
        got, plan, removed, added = merger.update(prepared, settings, previous, {}, {})
        assert got.ruleset == want.ruleset and got.ruleset.digest == want.ruleset.digest, f"pass {i}"
        assert dict(got.ruleset.orders) == dict(want.ruleset.orders), f"pass {i}"
        assert dict(got.orders) == dict(want.orders), f"pass {i}"
        assert got.findings == want.findings and got.warnings == want.warnings, f"pass {i}"
        assert dict(got.policies) == dict(want.policies), f"pass {i}"
        assert dict(got.tally) == dict(want.tally) and dict(got.deadlines) == dict(want.deadlines), f"pass {i}"
        assert got.unblocks == want.unblocks, f"pass {i}"
        if previous is not None and plan is not None:
            assert plan == diff(previous, want.ruleset), f"pass {i}"
            ref_removed, ref_added = rule_delta(previous, want.ruleset)
            assert set(removed.domains) == set(ref_removed.domains) and set(added.domains) == set(ref_added.domains)
            assert (removed.v4, added.v4, removed.v6, added.v6) == (ref_removed.v4, ref_added.v4, ref_removed.v6,
                                                                    ref_added.v6), f"pass {i}"
        previous = got.ruleset
    return merger


REG1 = policy(order("a", "{domains: [a.example, b.example], cidrs: [10.0.0.0/24]}"),
              order("b", "{domains: ['*.sub.example'], cidrs: [10.0.0.128/25, 10.0.1.0/24]}"))
REG2 = policy(order("a", "{domains: [a.example, b.example], cidrs: [10.0.0.0/24]}"),
              order("b", "{domains: ['*.sub.example'], cidrs: [10.0.0.128/25, 10.0.1.0/24]}"),
              order("c", "{domains: [c.example, a.example], cidrs: [10.0.0.64/26, '2001:db8::/48']}"), serial=2)
REG3 = policy(order("a", "{domains: [a.example], cidrs: [10.0.0.0/24]}"),  # a changed, b gone
              order("c", "{domains: [c.example, a.example], cidrs: [10.0.0.64/26, '2001:db8::/48']}"), serial=3)
RETAG = policy(order("a", "{domains: [a.example], cidrs: [10.0.0.0/24]}",
                     extra="    dns_answer: refused\n"),
               order("c", "{domains: [c.example, a.example], cidrs: [10.0.0.64/26, '2001:db8::/48']}"), serial=4)
TICKET = [policy(order(f"t{s}", f"{{domains: [t{s}.tickets.example, x.sub.example], cidrs: [100.64.{s}.0/24]}}"),
                 issuer="tickets", serial=s) for s in range(1, 4)]
UNBLOCK = policy(order("u", "{domains: ['*.sub.example', b.example], cidrs: [10.0.1.0/25]}", action="unblock"),
                 issuer="court")
UNBLOCK2 = policy(order("u", "{domains: [c.example], cidrs: [10.0.0.64/28]}", action="unblock"),
                  issuer="court", serial=2)
ALLOWED = policy(order("w", "{domains: [allowed.example, w.example], cidrs: [10.9.0.0/16]}"), issuer="web")

SEQUENCES = {
    "orders added, changed, removed across serials": [[REG1], [REG2], [REG3], [REG1], []],
    "tickets replace each other beside a registry": [[REG2, TICKET[0]], [REG2, TICKET[1]], [REG2, TICKET[2]], [REG2]],
    "an unblock comes, changes and goes": [[REG2], [REG2, UNBLOCK], [REG2, UNBLOCK2], [REG2]],
    "provenance changes only (dns_answer)": [[REG3], [RETAG], [REG3]],
    "the operator allowlist cuts an order": [[ALLOWED], [ALLOWED, REG2], [REG2]],
    "from nothing and back": [[], [REG2, TICKET[0], UNBLOCK], []],
}


@pytest.mark.parametrize("name", SEQUENCES)
def test_the_delta_merge_equals_the_reference(name: str) -> None:
    merger = run(SEQUENCES[name])
    assert merger.path == "delta" or name == "from nothing and back"


def test_random_sequences_equal_the_reference() -> None:
    rng = random.Random(1414)
    # "com", 52.1.2.3 (shared infra in the test guards), 127.0.0.0/18 (special-purpose) and /12
    # (min_prefix) are refused: per-order refusals must follow the changes too
    names = [f"n{i}.example" for i in range(30)] + ["*.sub.example", "x.sub.example", "*.example.org", "com"]
    nets = [f"10.0.{i}.0/24" for i in range(8)] + ["10.0.0.0/22", "10.0.2.128/25", "10.0.3.7/32",
                                                     "2001:db8::/48", "2001:db8:0:1::/64", "52.1.2.3/32",
                                                     "127.0.0.0/18", "10.16.0.0/12"]

    def targets() -> str:
        return (f"{{domains: [{', '.join(repr(n) for n in rng.sample(names, rng.randint(1, 4)))}], "
                f"cidrs: [{', '.join(repr(c) for c in rng.sample(nets, rng.randint(1, 3)))}]}}")

    for seq in range(60):
        passes, serials = [], {"reg": 0, "tix": 0, "court": 0}
        current: dict[str, object] = {}
        for _ in range(6):
            issuer = rng.choice(list(serials))
            serials[issuer] += 1
            if rng.random() < 0.15:
                current.pop(issuer, None)
            else:
                action = "unblock" if issuer == "court" else "block"
                orders = [order(f"o{k}", targets(), action=action,
                                extra=rng.choice(["", "", "    dns_answer: refused\n",
                                                  "    deadline: 2026-12-0{}T00:00:00Z\n".format(rng.randint(1, 9))]))
                          for k in rng.sample(range(6), rng.randint(1, 4))]
                current[issuer] = policy(*orders, issuer=issuer, serial=serials[issuer])
            passes.append(list(current.values()))
        run(passes)


def test_registries_re_issued_in_place_equal_the_reference() -> None:
    """A registry re-issued as the parser hands it over: the unchanged places are the same
    Order objects, a few places hold new ones (a decision replaced, re-tagged, refused, given
    another id, turned into an unblock, amended with a target the guards refuse: the same
    rules, which its result must still count); each serial is prepared beside the one in force."""
    from dataclasses import replace as dc_replace

    rng = random.Random(2718)
    names = [f"r{i}.example" for i in range(40)] + ["com", "*.sub.example"]
    nets = [f"10.1.{i}.0/24" for i in range(12)] + ["52.1.2.3/32", "10.1.0.0/22", "2001:db8:1::/48"]

    def fresh(oid: str) -> object:
        t = (f"{{domains: [{', '.join(repr(n) for n in rng.sample(names, rng.randint(1, 3)))}], "
             f"cidrs: [{', '.join(repr(c) for c in rng.sample(nets, rng.randint(1, 2)))}]}}")
        action = "unblock" if rng.random() < 0.05 else "block"
        extra = rng.choice(["", "", "    dns_answer: refused\n", "    deadline: 2026-12-05T00:00:00Z\n"])
        return policy(order(oid, t, action=action, extra=extra)).orders[0]

    for seq in range(25):
        reg = policy(*(order(f"d{k}", f"{{domains: [d{k}.example], cidrs: [10.2.{k}.0/24]}}") for k in range(12)))
        ticket = TICKET[seq % 3]
        passes = [[reg, ticket]]
        for serial in range(2, 8):
            orders = list(reg.orders)
            for i in rng.sample(range(len(orders)), rng.randint(0, 3)):
                if rng.random() < 0.25 and "com" not in orders[i].targets.domains:
                    t = orders[i].targets  # amended: a public suffix more, refused; the rules stay
                    text = (f"{{domains: [{', '.join(repr(n) for n in (*t.domains, 'com'))}], "
                            f"cidrs: [{', '.join(repr(str(c)) for c in t.cidrs)}]}}")
                    orders[i] = policy(order(orders[i].id, text, action=orders[i].action)).orders[0]
                    continue
                oid = orders[i].id if rng.random() < 0.7 else f"n{serial}-{i}"
                orders[i] = fresh(oid)
            reg = dc_replace(reg, serial=serial, orders=tuple(orders),
                             digest=hashlib.sha256(f"{seq}/{serial}".encode()).hexdigest())
            passes.append([reg, ticket])
        run(passes)


def test_growth_refusals_fall_back_to_the_reference() -> None:
    settings = CompileSettings(Guards(PSL, INFRA), growth_factor=1.5, growth_floor=2)
    big = policy(order("z", "{domains: [z1.example, z2.example, z3.example, z4.example, z5.example]}"),
                 issuer="tickets", serial=9)
    merger = run([[REG1], [REG1, big], [REG1]], settings)
    assert merger.path in ("delta", "reference")


def test_cost_follows_the_change_not_the_set() -> None:
    """A one-order change next to a large registry touches a handful of rules (not timed:
    counted by the delta's size and by the coverage objects left as they were)."""
    reg = policy(*[order(f"d{i}", f"{{domains: [r{i}.example], cidrs: [10.{i // 256}.{i % 256}.0/24]}}")
                   for i in range(3000)])
    merger = run([[reg, TICKET[0]]])
    before = merger._cov[4]
    cache: OrderCache = {}
    prep_reg = merger._prepared[0]
    comp, plan, removed, added = merger.update([prep_reg, prepare(TICKET[1], CATALOG, SETTINGS.guards, cache)],
                                               SETTINGS, merger.comp.ruleset, {}, {})
    assert merger.path == "delta" and plan is not None
    assert len(removed) == len(added) == 3  # one name leaves, one enters, one shared name re-tagged... per kind
    assert sum(a is b for a, b in zip(before, merger._cov[4])) >= len(before) - 2


REG2_AGAIN = policy(order("a", "{domains: [a.example, b.example], cidrs: [10.0.0.0/24]}"),
                    order("b", "{domains: ['*.sub.example'], cidrs: [10.0.0.128/25, 10.0.1.0/24]}"),
                    order("c", "{domains: [c.example, a.example], cidrs: [10.0.0.64/26, '2001:db8::/48']}"), serial=7)
PRIOR_CASES = [
    # (in force, new serial, the orders the new serial says changed)
    ("an order added", REG1, REG2, {"reg/c"}),
    ("an order changed, another dropped", REG2, REG3, {"reg/a", "reg/b"}),
    ("provenance only (dns_answer)", REG3, RETAG, {"reg/a"}),
    ("the same orders under a new serial", REG2, REG2_AGAIN, set()),
]


@pytest.mark.parametrize("name, before, after, changed", PRIOR_CASES, ids=[c[0] for c in PRIOR_CASES])
def test_a_new_serial_prepared_beside_its_prior_names_exactly_its_changed_orders(name, before, after, changed) -> None:
    cache: OrderCache = {}
    own: OrderCache = {}
    first = prepare(before, CATALOG, SETTINGS.guards, cache, into=own)
    cache.update(own)
    again: OrderCache = {}
    got = prepare(after, CATALOG, SETTINGS.guards, cache, into=again, prior=(first, own))
    assert got.prior == before.digest and set(got.changed) == changed
    plain = prepare(after, CATALOG, SETTINGS.guards, {})  # the same contribution either way
    assert got.blocks == plain.blocks and got.unblocks == plain.unblocks and dict(got.infos) == dict(plain.infos)
    # another issuer's policy is never a prior
    assert prepare(TICKET[0], CATALOG, SETTINGS.guards, cache, prior=(first, own)).prior is None


@pytest.mark.parametrize("name, before, after, changed", PRIOR_CASES, ids=[c[0] for c in PRIOR_CASES])
def test_the_serial_a_policy_replaced_gives_its_dropped_orders_the_same_results(name, before, after, changed) -> None:
    """Its orders are listed by what the new serial dropped (the rest take the new serial's
    result): the merged results equal those of every order listed."""
    from blockd.selection import Selection, Verdict

    cache: OrderCache = {}
    own: OrderCache = {}
    first = prepare(before, CATALOG, SETTINGS.guards, cache, into=own)
    cache.update(own)
    new = prepare(after, CATALOG, SETTINGS.guards, cache, prior=(first, own))
    verdicts = (Verdict("old.yaml", "superseded", "", before.issuer, before.serial, before.digest, "", before),
                Verdict("new.yaml", "active", "", after.issuer, after.serial, after.digest, "", after))
    sel = Selection((new,), verdicts)
    every = {f"{before.issuer}/{o.id}": "superseded" for o in before.orders}
    listed = sel.order_statuses()
    dropped = {f"{before.issuer}/{o.id}" for o in before.orders} - {f"{after.issuer}/{o.id}" for o in after.orders}
    assert set(listed) == dropped
    got, want = merge([new], SETTINGS, None, listed), merge([new], SETTINGS, None, every)
    assert dict(got.orders) == dict(want.orders) and dict(got.tally) == dict(want.tally)


@pytest.mark.parametrize("first, then, beside, path", [
    (1, 20000, 0, "reference"),  # one prefix, then 20,000 of them: the whole set changes
    (20000, 1, 0, "reference"),
    (1, 10, 6000, "delta"),  # an order of 10 beside one of 6,000: a small change of a large set
])
def test_a_change_of_most_of_the_set_is_merged_by_the_reference(first: int, then: int, beside: int, path: str) -> None:
    """The delta path costs what changed; when that is most of the set (a policy that grows
    from one prefix to 20,000, as kill -9 tests do) the reference merge is no dearer, and the
    delta path's windows would be thousands: it merges by the reference, with the same result."""
    def nets(n: int, at: int = 10) -> str:
        return "{domains: [x.example], cidrs: [" + ", ".join(f"{at}.{i >> 8 & 255}.{i & 255}.0/24"
                                                            for i in range(0, 2 * n, 2)) + "]}"
    cache: OrderCache = {}

    def serial(s: int, n: int, prior=None):  # type: ignore[no-untyped-def]
        orders = [order("a", nets(n))] + ([order("b", nets(beside, at=11))] if beside else [])
        return prepare(policy(*orders, serial=s), CATALOG, SETTINGS.guards, cache, prior=prior)
    merger = Merger()
    a = serial(1, first)
    merger.update((a,), SETTINGS, None, {}, {})
    b = serial(2, then, prior=(a, a.entries))  # as the reconciler does: beside the one in force
    got = merger.update((b,), SETTINGS, merger.comp.ruleset, {}, {})[0]  # type: ignore[union-attr]
    assert merger.path == path
    assert got.ruleset == merge([b], SETTINGS, None).ruleset and len(got.ruleset.v4) == then + beside
