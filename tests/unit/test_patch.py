"""Issue 14: a RuleSet changes in proportion to the change (`RuleSet.patched`, blockd.digests).

Every case is checked against the reference: the same rules built from scratch and `diff`.
"""

from __future__ import annotations

import random

import pytest

from blockd.digests import ADDR4, NAMES_EXACT, PartDigest
from blockd.model import DomainRule, NetRule, RuleDelta, RuleSet, diff, rule_delta

A, B = frozenset({"x/a"}), frozenset({"x/b"})


def rs(names=(), v4=(), v6=()) -> RuleSet:
    return RuleSet.build([DomainRule(n, s, o) for n, s, o in names], [NetRule(*r) for r in v4],
                         [NetRule(*r) for r in v6])


CASES = {
    "add a name": (rs([("a.example", False, A)]), rs([("a.example", False, A), ("b.example", False, A)])),
    "exact becomes subtree": (rs([("a.example", False, A)]), rs([("a.example", True, A)])),
    "provenance only": (rs([("a.example", False, A)]), rs([("a.example", False, B)])),
    "split an interval": (rs(v4=[(0, 255, A)]), rs(v4=[(0, 99, A), (100, 199, A | B), (200, 255, A)])),
    "join adjacent": (rs(v4=[(0, 9, A), (20, 29, A)]), rs(v4=[(0, 9, A), (10, 19, B), (20, 29, A)])),
    "remove the middle of a run": (rs(v4=[(0, 9, A), (10, 19, B), (20, 29, A)]), rs(v4=[(0, 9, A), (20, 29, A)])),
    "v6 and everything gone": (rs([("a.example", True, A)], v6=[(1 << 64, (1 << 65) - 1, A)]), rs()),
    "from empty": (rs(), rs([("z.example", False, A)], [(5, 5, B)], [(7, 9, A)])),
}


@pytest.mark.parametrize("name", CASES)
def test_patched_equals_build_and_diff(name: str) -> None:
    old, new = CASES[name]
    removed, added = rule_delta(old, new)
    got, plan = old.patched(removed, added)
    assert got == new and got.digest == new.digest
    assert plan == diff(old, new)


def test_random_patches_against_the_reference() -> None:
    rng = random.Random(14)
    keys = [frozenset({f"i/{k}"}) for k in range(4)] + [frozenset({"i/0", "i/1"})]
    for _ in range(300):
        def rules(n: int) -> list[tuple[int, int, frozenset[str]]]:
            points = sorted(rng.sample(range(0, 400), 2 * n))
            out, i = [], 0
            while i + 1 < len(points):
                out.append((points[i], points[i + 1], rng.choice(keys)))
                i += rng.choice((1, 2))  # sometimes adjacent (last + 1 == next first)
                if i < len(points) and out[-1][1] >= points[i]:
                    i += 1
            return [r for j, r in enumerate(out) if j == 0 or r[0] > out[j - 1][1]]

        def names() -> list[tuple[str, bool, frozenset[str]]]:
            return [(f"n{k}.example", rng.random() < 0.3, rng.choice(keys)) for k in rng.sample(range(60), 20)]

        old = rs(names(), rules(rng.randint(0, 30)), rules(rng.randint(0, 5)))
        new = rs(names(), rules(rng.randint(0, 30)), rules(rng.randint(0, 5)))
        removed, added = rule_delta(old, new)
        got, plan = old.patched(removed, added)
        assert got == new and got.digest == new.digest and plan == diff(old, new)


BAD = {
    "remove a rule not held": (RuleDelta(domains=(DomainRule("b.example", False, A),)), RuleDelta()),
    "remove with other provenance": (RuleDelta(domains=(DomainRule("a.example", False, B),)), RuleDelta()),
    "add a rule held": (RuleDelta(), RuleDelta(domains=(DomainRule("a.example", False, A),))),
    "add an overlapping interval": (RuleDelta(), RuleDelta(v4=(NetRule(5, 20, B),))),
}


@pytest.mark.parametrize("name", BAD)
def test_a_delta_that_does_not_fit_is_refused(name: str) -> None:
    old = rs([("a.example", False, A)], [(0, 9, A)])
    removed, added = BAD[name]
    with pytest.raises(ValueError):
        old.patched(removed, added)


def test_the_digest_depends_on_the_sets_only() -> None:
    # the same addresses held as two adjacent rules (two orders) or one: one digest
    assert rs(v4=[(0, 9, A), (10, 19, B)]).digest == rs(v4=[(0, 19, A)]).digest
    assert rs(v4=[(0, 9, A), (11, 19, B)]).digest != rs(v4=[(0, 19, A)]).digest
    assert rs([("a.example", False, A)]).digest != rs([("a.example", True, A)]).digest
    both = rs([("a.example", False, A)], [(0, 9, A)])
    assert both.share(addresses=False).digest == rs([("a.example", False, A)]).digest == both.share_digest(v4=False, v6=False)
    assert both.share(names=False).digest == rs(v4=[(0, 9, A)]).digest


def test_part_digest_patch_touches_only_its_buckets() -> None:
    names = [f"n{i}.example" for i in range(20_000)]
    part = PartDigest.of(NAMES_EXACT, names)
    patched = part.patched(["n1.example"], ["new.example"])
    assert patched.value == PartDigest.of(NAMES_EXACT, [*names[:1], *names[2:], "new.example"]).value
    changed = {b for b in patched.buckets if patched.buckets[b] is not part.buckets.get(b)}
    assert 1 <= len(changed) <= 2  # the buckets of the two names, nothing else re-hashed
    assert len(part) == len(patched) == 20_000 and len(part.patched([], ["x.example", "y.example"])) == 20_002
    small = PartDigest.of(NAMES_EXACT, ["a.example"])  # its one bucket goes, another comes (re-joined)
    assert len(small.patched(["a.example"], [])) == 0 and len(small.patched(["a.example"], ["b.example", "c.example"])) == 2
    with pytest.raises(ValueError):
        part.patched(["absent.example"], [])
    four = PartDigest.of(ADDR4, [(i << 40) | (i << 8) for i in range(1000)])  # /24-aligned: spread out
    assert len(four.buckets) > 500


def _reference_part(kind: bytes, elements: list) -> bytes:  # type: ignore[type-arg]
    """The part digest as blockd-ruleset-v2 defines it (digests.py's docstring), written from
    the definition: bucket by CRC-32 of a name or the multiplicative hash of a packed
    interval's first address, SHA-256 over each bucket's sorted elements, SHA-256 over the
    (bucket, digest) pairs."""
    import hashlib
    from zlib import crc32

    width = {b"4": 32, b"6": 128}.get(kind)
    buckets: dict[int, list] = {}  # type: ignore[type-arg]
    for e in elements:
        b = crc32(e.encode()) & 16383 if width is None else ((e >> width) * 0x9E3779B97F4A7C15 >> 40) & 16383
        buckets.setdefault(b, []).append(e)
    joined = b""
    for b in sorted(buckets):
        els = sorted(buckets[b])
        body = "\n".join(els).encode() if width is None else b"".join(e.to_bytes(2 * width // 8, "big") for e in els)
        joined += b.to_bytes(2, "big") + hashlib.sha256(kind + body).digest()
    return hashlib.sha256(kind + joined).digest()


@pytest.mark.parametrize("kind", [b"D", b"S", b"4", b"6"])
def test_the_digest_format_is_the_documented_one_from_scratch_and_patched(kind: bytes) -> None:
    import random

    from blockd.digests import PartDigest, pack

    rng = random.Random(kind[0])
    if kind in (b"D", b"S"):
        pool = [f"n{rng.getrandbits(40):x}.example" for _ in range(3000)]
    else:
        bits = 32 if kind == b"4" else 128
        firsts = [rng.getrandbits(bits - 8) << 8 for _ in range(3000)]
        pool = [pack(kind, f, f | 255) for f in firsts]
    pool = sorted(set(pool))
    base, gone, came = pool[:2000], pool[:300], pool[2000:2600]
    part = PartDigest.of(kind, base)
    assert part.value == _reference_part(kind, base)
    patched = part.patched(gone, came)
    want = sorted(set(base) - set(gone) | set(came))
    assert patched.value == _reference_part(kind, want) == PartDigest.of(kind, want).value
    with pytest.raises(ValueError, match="not held"):
        patched.patched([pool[0]], [])
    with pytest.raises(ValueError, match="already held"):
        patched.patched([], [pool[2000]])
