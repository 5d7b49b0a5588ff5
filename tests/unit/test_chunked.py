"""blockd.chunked: a spliced sequence equals the list it stands for; the original is untouched."""

from __future__ import annotations

import random

import pytest

from blockd import chunked
from blockd.chunked import Chunked


@pytest.mark.parametrize("size", [0, 1, 5, 3000])
def test_splice_bisect_and_slices_match_a_list(size: int, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(chunked, "CHUNK", 16)
    rng = random.Random(size)
    ref = sorted(rng.sample(range(10 * size + 10), size))
    seq = Chunked(ref)
    versions = [(seq, list(ref))]
    for _ in range(60):
        drop = set(rng.sample(range(len(ref)), min(len(ref), rng.randint(0, 4)))) if ref else set()
        kept = [x for i, x in enumerate(ref) if i not in drop]
        fresh = sorted(set(rng.sample(range(10 * size + 10), 5)) - set(ref))
        inserts: dict[int, list[int]] = {}
        for x in fresh:
            inserts.setdefault(seq.bisect(x, lambda v: v), []).append(x)
        seq = seq.splice(drop, inserts)
        ref = sorted(kept + fresh)
        versions.append((seq, list(ref)))
    for s, want in versions:
        assert list(s) == want and len(s) == len(want) and s == tuple(want) and tuple(want) == s
        for probe in (0, 7, 10 * size + 11, *(want[:3])):
            assert s.bisect(probe, lambda v: v) == sum(1 for x in want if x < probe)
        if want:
            assert s[0] == want[0] and s[-1] == want[-1] and s[len(want) // 2] == want[len(want) // 2]
            assert s[1:len(want) - 1] == tuple(want[1:len(want) - 1]) and s[3:3] == ()
    assert Chunked([1, 2]) != Chunked([1, 3]) and Chunked([1, 2]) != (1,)


@pytest.mark.parametrize("probe", [("a", False), ("b", False), ("b", True), ("bb", False), ("", False), ("z", True)])
def test_bisect_without_a_key_compares_the_elements(probe: tuple[str, bool], monkeypatch: pytest.MonkeyPatch) -> None:
    """key=None bisects the elements themselves: a (name, subtree) pair finds the first rule at or
    after it (a 2-tuple sorts just before the 3-tuple it begins), as bisect_left does, chunk by
    chunk; the per-chunk first elements are cached apart from any key function's."""
    monkeypatch.setattr(chunked, "CHUNK", 2)
    rules = sorted((n, sub, frozenset({n})) for n in ("a", "b", "ba", "bb", "c", "d") for sub in (False, True))
    seq = Chunked(rules)
    want = sum(1 for r in rules if r < probe)
    assert seq.bisect(probe) == want == seq.bisect(probe, None)
    assert seq.bisect(probe[0], lambda r: r[0]) == sum(1 for r in rules if r[0] < probe[0])
    assert seq.bisect(probe) == want  # the keyed cache did not replace the element one


def _key(v: int) -> int:  # module-level: Chunked caches first keys by the key's identity
    return v // 3


@pytest.mark.parametrize("size", [1, 40, 3000])
def test_first_keys_carried_through_splices_stay_true(size: int, monkeypatch: pytest.MonkeyPatch) -> None:
    """A splice carries the cached first keys of the chunks it did not touch and takes those of
    the chunks it made (emptied chunks dropped): every later bisection by a cached key, or by
    the elements, equals a bisection of the plain list."""
    monkeypatch.setattr(chunked, "CHUNK", 8)
    rng = random.Random(size)
    ref = sorted(rng.sample(range(20 * size + 20), size))
    seq = Chunked(ref)
    for _ in range(80):
        for probe in (0, *rng.sample(range(20 * size + 25), 5)):  # fills both caches before the splice
            assert seq.bisect(probe) == sum(1 for x in ref if x < probe)
            assert seq.bisect(probe // 3, _key) == sum(1 for x in ref if x // 3 < probe // 3)
        # sometimes empties a whole chunk, sometimes grows one past CHUNK
        drop = set(rng.sample(range(len(ref)), min(len(ref), rng.choice([0, 1, 9, 12])))) if ref else set()
        kept = [x for i, x in enumerate(ref) if i not in drop]
        fresh = sorted(set(rng.sample(range(20 * size + 20), rng.choice([0, 3, 20]))) - set(ref))
        inserts: dict[int, list[int]] = {}
        for x in fresh:
            inserts.setdefault(seq.bisect(x), []).append(x)
        seq = seq.splice(drop, inserts)
        ref = sorted(kept + fresh)
        assert list(seq) == ref
        for key, firsts in seq._firsts.items():
            assert firsts == [c[0] if key is None else key(c[0]) for c in seq._chunks]
