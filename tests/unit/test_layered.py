"""blockd.layered: derived mappings equal the dict they stand for, and never change."""

from __future__ import annotations

import random

from blockd.layered import Layered


def test_derive_matches_a_dict_and_leaves_the_original_alone() -> None:
    rng = random.Random(7)
    ref = {f"k{i}": i for i in range(300)}
    cur = Layered(ref)
    history = [(cur, dict(ref))]
    for step in range(400):
        updates = {f"k{rng.randrange(400)}": -step for _ in range(rng.randint(0, 5))}
        deletions = [f"k{rng.randrange(400)}" for _ in range(rng.randint(0, 5))]
        deletions = [d for d in deletions if d not in updates]
        cur = cur.derive(updates, deletions)
        for d in deletions:
            ref.pop(d, None)
        ref.update(updates)
        history.append((cur, dict(ref)))
    for m, want in history:  # every version, old ones included, is what it was
        assert dict(m) == want and len(m) == len(want)
        assert all(k in m and m[k] == v for k, v in want.items())
        assert "absent" not in m and m.get("absent") is None
