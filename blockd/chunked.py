"""A sorted, immutable sequence that a small edit copies in proportion to the edit.

A RuleSet holds up to millions of sorted rules. As tuples, every one-rule change would copy
all of them (a million references, tens of milliseconds, per part). `Chunked` keeps them in
chunks of about `CHUNK` elements: an edit replaces the chunks it touches and shares the rest,
so a k-rule change costs O(k * CHUNK + N / CHUNK).

It behaves as a read-only sequence: len, iteration, indexing, slicing (to a tuple), equality
with any sequence (a tuple of the same elements compares equal), and `bisect`/`splice` by a
key the elements are sorted on.
"""

from __future__ import annotations

from bisect import bisect_left, bisect_right
from collections.abc import Callable, Iterable, Iterator, Sequence
from itertools import accumulate, chain
from typing import Any, overload

CHUNK = 512


class Chunked(Sequence[Any]):
    __slots__ = ("_chunks", "_starts", "_len", "_firsts")

    def __init__(self, items: Iterable[Any] = ()) -> None:
        data = items if isinstance(items, tuple) else tuple(items)
        chunks = tuple(data[i:i + CHUNK] for i in range(0, len(data), CHUNK))
        self._set(chunks)

    def _set(self, chunks: tuple[tuple[Any, ...], ...]) -> None:
        self._chunks = chunks
        self._starts = [0, *accumulate(len(c) for c in chunks)]  # start offset of each chunk, then len
        self._len = self._starts[-1]
        self._firsts: dict[Callable[[Any], Any] | None, list[Any]] = {}  # key -> each chunk's first key

    @classmethod
    def _of(cls, chunks: list[tuple[Any, ...]]) -> Chunked:
        out = cls.__new__(cls)
        out._set(tuple(c for c in chunks if c))
        return out

    def __len__(self) -> int:
        return self._len

    def __iter__(self) -> Iterator[Any]:
        return chain.from_iterable(self._chunks)

    @overload
    def __getitem__(self, i: int) -> Any: ...
    @overload
    def __getitem__(self, i: slice) -> tuple[Any, ...]: ...

    def __getitem__(self, i: int | slice) -> Any:
        if isinstance(i, slice):
            start, stop, step = i.indices(self._len)
            if step != 1:
                return tuple(self)[i]
            if start >= stop:
                return ()
            c0 = bisect_right(self._starts, start) - 1
            c1 = bisect_right(self._starts, stop - 1) - 1
            if c0 == c1:
                base = self._starts[c0]
                return self._chunks[c0][start - base:stop - base]
            parts = [self._chunks[c0][start - self._starts[c0]:]]
            parts.extend(self._chunks[c0 + 1:c1])
            parts.append(self._chunks[c1][:stop - self._starts[c1]])
            return tuple(chain.from_iterable(parts))
        if i < 0:
            i += self._len
        if not 0 <= i < self._len:
            raise IndexError("Chunked index out of range")
        c = bisect_right(self._starts, i) - 1
        return self._chunks[c][i - self._starts[c]]

    def __eq__(self, other: object) -> bool:
        if isinstance(other, Chunked):
            if self._len != other._len:
                return False
            if self._chunks == other._chunks:
                return True
            return all(a == b for a, b in zip(self, other))
        if isinstance(other, (tuple, list)):
            return self._len == len(other) and all(a == b for a, b in zip(self, other))
        return NotImplemented

    def __ne__(self, other: object) -> bool:
        eq = self.__eq__(other)
        return eq if eq is NotImplemented else not eq

    __hash__ = None  # type: ignore[assignment]

    def __repr__(self) -> str:
        return f"Chunked({self._len} items in {len(self._chunks)} chunks)"

    def bisect(self, value: Any, key: Callable[[Any], Any] | None = None) -> int:
        """The first index whose element's key is >= value (as `bisect_left(self, value, key=key)`;
        `key=None`: the elements themselves). Each chunk's first key is taken once per key
        function (a module-level one: the cache is by identity), so a bisection is two C-level
        ones, where `bisect_left` on the sequence itself would index it from Python."""
        firsts = self._firsts.get(key)
        if firsts is None:
            firsts = self._firsts[key] = [c[0] if key is None else key(c[0]) for c in self._chunks]
        c = bisect_left(firsts, value) - 1  # the last chunk whose first key is < value
        if c < 0:
            return 0
        return self._starts[c] + bisect_left(self._chunks[c], value, key=key)

    def splice(self, drop: Iterable[int], inserts: dict[int, list[Any]]) -> Chunked:
        """A new sequence: the elements at the indexes `drop` removed, and each list in
        `inserts[i]` put before the element at index i (i == len: at the end). Only the chunks
        touched are copied."""
        by_chunk: dict[int, tuple[set[int], dict[int, list[Any]]]] = {}
        nchunks = len(self._chunks)
        for i in drop:
            c = bisect_right(self._starts, i) - 1
            by_chunk.setdefault(c, (set(), {}))[0].add(i - self._starts[c])
        for i, items in inserts.items():
            c = min(bisect_right(self._starts, i) - 1, nchunks - 1) if nchunks else 0
            base = self._starts[c] if nchunks else 0
            by_chunk.setdefault(c, (set(), {}))[1][i - base] = items
        chunks = list(self._chunks) if nchunks else [()]
        # each cached first key carried over, edited as the chunks are: a bisection of the result
        # does not take the first key of every chunk again (N / CHUNK Python calls per key)
        firsts = {key: list(f) for key, f in self._firsts.items()} if nchunks else {}
        for c in sorted(by_chunk, reverse=True):  # from the end: a split shifts only later chunks
            dropped, ins = by_chunk[c]
            old = chunks[c]
            new: list[Any] = []
            for j in range(len(old) + 1):
                if j in ins:
                    new.extend(ins[j])
                if j < len(old) and j not in dropped:
                    new.append(old[j])
            pieces = [tuple(new[k:k + CHUNK]) for k in range(0, len(new), CHUNK)]
            chunks[c:c + 1] = pieces or [()]  # an emptied chunk: dropped by _of, as its first key here
            for key, f in firsts.items():
                f[c:c + 1] = [p[0] if key is None else key(p[0]) for p in pieces]
        out = Chunked._of(chunks)
        out._firsts = {key: f for key, f in firsts.items() if len(f) == len(out._chunks)}
        return out
