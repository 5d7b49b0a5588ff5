"""Seeded synthetic blocklists: (count, seed) -> sorted prefixes shaped like the real lists.

The real IPv4 lists in /work/shared/data/lists/ are mostly /32 (refilter ipsum: 80 %) and
/24 (antifilter: 90 %), with a tail of /16-/30. The mix here: 60 % /32, 20 % /24, 20 % /16-/30
(weighted toward longer prefixes). Prefixes are disjoint and never adjacent, so every tool
loads exactly `count` elements and no merge changes the count. IPv6: /48s in 2000::/3.
"""

from __future__ import annotations

import random
from collections.abc import Iterable, Iterator
from pathlib import Path

from blockd.model import NetRule, RuleSet
from blockd.ranges import format_cidr

_OTHER = [p for p in range(16, 31) if p != 24]
_WEIGHTS = [1 + (p - 16) for p in _OTHER]  # /30 is 15x as likely as /16


def v4_prefixes(count: int, seed: int = 1) -> list[tuple[int, int]]:
    """`count` disjoint, non-adjacent (network, prefixlen), sorted by network."""
    rng = random.Random(seed)
    raw = []
    for _ in range(int(count * 1.3) + 100):
        r = rng.random()
        plen = 32 if r < 0.6 else 24 if r < 0.8 else rng.choices(_OTHER, _WEIGHTS)[0]
        # 1.0.0.0 - 223.255.255.255: unicast space, like the real lists.
        addr = rng.randrange(0x01000000, 0xE0000000)
        raw.append((addr & ~((1 << (32 - plen)) - 1) & 0xFFFFFFFF, plen))
    return _pick(raw, count, 32, rng)


def v6_prefixes(count: int, seed: int = 1) -> list[tuple[int, int]]:
    rng = random.Random(seed)
    raw = [((0x2000 << 112) | (rng.getrandbits(45) << 80), 48) for _ in range(int(count * 1.05) + 100)]
    return _pick(raw, count, 128, rng)


def _pick(raw: list[tuple[int, int]], count: int, bits: int, rng: random.Random) -> list[tuple[int, int]]:
    kept: list[tuple[int, int]] = []
    prev_last = -2
    for net, plen in sorted(set(raw)):
        if net > prev_last + 1:  # drop overlaps and adjacency
            kept.append((net, plen))
            prev_last = net + (1 << (bits - plen)) - 1
    if len(kept) < count:
        raise ValueError(f"generated only {len(kept)} disjoint prefixes, {count} asked")
    return sorted(rng.sample(kept, count))


def intervals(prefixes: Iterable[tuple[int, int]], bits: int) -> list[tuple[int, int]]:
    return [(net, net + (1 << (bits - plen)) - 1) for net, plen in prefixes]


def ruleset(v4: Iterable[tuple[int, int]] = (), v6: Iterable[tuple[int, int]] = ()) -> RuleSet:
    """Prefixes -> RuleSet (provenance-free: bench and test data carry no orders)."""
    none: frozenset[str] = frozenset()
    return RuleSet.build(
        v4=[NetRule(a, b, none) for a, b in intervals(v4, 32)],
        v6=[NetRule(a, b, none) for a, b in intervals(v6, 128)],
    )


def cidr_text(version: int, prefixes: Iterable[tuple[int, int]]) -> Iterator[str]:
    for net, plen in prefixes:
        yield format_cidr(version, net, plen)


def memory_mib(pid: int | str = "self") -> dict[str, float]:
    """A process's memory lines of /proc/<pid>/status (VmRSS, VmHWM, ...) in MiB."""
    out = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        name, _, value = line.partition(":")
        if value.strip().endswith(" kB"):
            out[name] = int(value.split()[0]) / 1024
    return out
