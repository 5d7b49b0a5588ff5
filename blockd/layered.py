"""An immutable mapping that a small change derives from in proportion to the change.

`RuleSet.orders` and `Compilation.orders` hold an entry per order: a million for a registry.
Each pass hands out new immutable ones; copying a million-entry dict per one-order change
would cost what the whole set costs. `Layered` shares a frozen base dict and keeps the
change on top; when the top grows past a fraction of the base, `derive` flattens into a new
base, so a sequence of k-entry changes costs O(k) amortised.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator, Mapping
from typing import Generic, TypeVar

K = TypeVar("K")
V = TypeVar("V")
_MISSING = object()


class Layered(Mapping[K, V], Generic[K, V]):
    __slots__ = ("_base", "_top", "_gone", "_len")

    def __init__(self, base: Mapping[K, V] | None = None) -> None:
        self._base: dict[K, V] = dict(base or {})
        self._top: dict[K, V] = {}
        self._gone: frozenset[K] = frozenset()
        self._len = len(self._base)

    @classmethod
    def adopt(cls, base: dict[K, V]) -> Layered[K, V]:
        """A mapping over `base` itself, not a copy: the caller gives it up (must not change it)."""
        out: Layered[K, V] = cls.__new__(cls)
        out._base, out._top, out._gone, out._len = base, {}, frozenset(), len(base)
        return out

    def derive(self, updates: Mapping[K, V], deletions: Iterable[K] = ()) -> Layered[K, V]:
        """A new mapping: this one with `updates` set and `deletions` removed (never mutates)."""
        top = dict(self._top)
        gone = set(self._gone)
        n = self._len
        for k in set(deletions):
            if k in self:
                n -= 1
                top.pop(k, None)
                if k in self._base:
                    gone.add(k)
        for k, v in updates.items():
            if k not in top and (k in gone or k not in self._base):
                n += 1
            top[k] = v
            gone.discard(k)
        out: Layered[K, V] = Layered.__new__(Layered)
        if len(top) + len(gone) > max(64, len(self._base) // 8):  # flatten: O(N), every N/8 changes
            base = {k: v for k, v in self._base.items() if k not in gone}
            base.update(top)
            out._base, out._top, out._gone = base, {}, frozenset()
        else:
            out._base, out._top, out._gone = self._base, top, frozenset(gone)
        out._len = n
        return out

    def __getitem__(self, key: K) -> V:
        v = self._top.get(key, _MISSING)
        if v is not _MISSING:
            return v  # type: ignore[return-value]
        if key in self._gone:
            raise KeyError(key)
        return self._base[key]

    def __contains__(self, key: object) -> bool:
        return key in self._top or (key not in self._gone and key in self._base)

    def get(self, key: K, default: V | None = None) -> V | None:  # type: ignore[override]
        v = self._top.get(key, _MISSING)
        if v is not _MISSING:
            return v  # type: ignore[return-value]
        if key in self._gone:
            return default
        return self._base.get(key, default)

    def __iter__(self) -> Iterator[K]:
        if not self._top and not self._gone:
            yield from self._base
            return
        for k in self._base:
            if k not in self._gone and k not in self._top:
                yield k
        yield from self._top

    def __len__(self) -> int:
        return self._len

    def __repr__(self) -> str:
        return f"Layered({len(self)} entries)"


class Overlay(Generic[K, V]):
    """A dict over a base that must not change (another holder shares it, e.g. a Compilation's
    results): writes and deletions go on top, and the top is folded into a base of its own once
    it has grown past a quarter of it. Only lookups and writes (no iteration): what the merge by
    delta's results need, without a copy of a million entries."""

    __slots__ = ("_base", "_top", "_gone")

    def __init__(self, base: Mapping[K, V], gone: Iterable[K] = ()) -> None:
        self._base: Mapping[K, V] = base
        self._top: dict[K, V] = {}
        self._gone: set[K] = {k for k in gone if k in base}

    def get(self, key: K, default: V | None = None) -> V | None:
        v = self._top.get(key, _MISSING)
        if v is not _MISSING:
            return v  # type: ignore[return-value]
        if key in self._gone:
            return default
        return self._base.get(key, default)

    def __contains__(self, key: object) -> bool:
        return key in self._top or (key not in self._gone and key in self._base)

    def __setitem__(self, key: K, value: V) -> None:
        self._top[key] = value
        self._gone.discard(key)
        self._fold()

    def pop(self, key: K, default: V | None = None) -> V | None:
        if key not in self:
            return default
        v = self._top.pop(key, _MISSING)
        if key in self._base:
            if v is _MISSING:
                v = self._base[key]
            self._gone.add(key)
        self._fold()
        return v  # type: ignore[return-value]

    def __len__(self) -> int:
        return len(self._base) - len(self._gone) + sum(1 for k in self._top if k not in self._base)

    def _fold(self) -> None:
        if len(self._top) + len(self._gone) > max(1024, len(self._base) // 4):
            base = {k: v for k, v in self._base.items() if k not in self._gone}
            base.update(self._top)
            self._base, self._top, self._gone = base, {}, set()


def as_layered(m: Mapping[K, V]) -> Layered[K, V]:
    """`m` itself if it is a Layered, else a Layered over it without a copy (`adopt`): for a
    dict its maker has given up (never changed again)."""
    return m if isinstance(m, Layered) else Layered.adopt(dict(m) if not isinstance(m, dict) else m)


class ByIssuer(Mapping[str, V], Generic[V]):
    """The union of per-issuer mappings whose keys are `issuer/...` (order keys): built in
    O(issuers), so a new serial of a registry hands its own order infos over as they are,
    without a million-entry copy. Read-only; `parts` is not copied."""

    __slots__ = ("_parts", "_len")

    def __init__(self, parts: Mapping[str, Mapping[str, V]]) -> None:
        self._parts = parts
        self._len = sum(len(p) for p in parts.values())

    def __getitem__(self, key: str) -> V:
        part = self._parts.get(key.split("/", 1)[0])
        if part is None:
            raise KeyError(key)
        return part[key]

    def peek(self, key: str) -> V | None:
        """`get`, through a part's own `peek` when it has one (it makes the value without
        keeping it: see `compile.OrderInfos.peek`)."""
        part = self._parts.get(key.split("/", 1)[0])
        if part is None:
            return None
        peek = getattr(part, "peek", None)
        return peek(key) if peek is not None else part.get(key)

    def __contains__(self, key: object) -> bool:
        if not isinstance(key, str):
            return False
        part = self._parts.get(key.split("/", 1)[0])
        return part is not None and key in part

    def __iter__(self) -> Iterator[str]:
        for part in self._parts.values():
            yield from part

    def __len__(self) -> int:
        return self._len

    def __repr__(self) -> str:
        return f"ByIssuer({len(self._parts)} issuers, {self._len} entries)"
