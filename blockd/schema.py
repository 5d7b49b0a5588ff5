"""Typed, path-aware reading of strictyaml data, collecting every problem of a document.

Each reader takes `(value, path, line)` and returns the typed value, or None after recording a
Problem that names the file and line, the path (`orders[2].targets.cidrs[5]`), the bad value
and what is valid. Callers finish with `reader.raise_if_any(ErrorKind)`.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Iterator
from datetime import datetime, timezone
from typing import TypeVar

from blockd.errors import InputError, Problem, raise_problems
from blockd.strictyaml import YMap, YSeq

T = TypeVar("T")
_INT = re.compile(r"[+-]?[0-9]+")
_NULLS = {"", "~", "null", "Null", "NULL"}


def _show(value: object) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."


class Reader:
    def __init__(self, source: str) -> None:
        self.source = source
        self.problems: list[Problem] = []

    def error(self, path: str, line: int | None, message: str) -> None:
        where = f"{self.source}:{line}" if line else self.source
        self.problems.append(Problem(f"{where}: {path}" if path else where, message))

    def raise_if_any(self, kind: type[InputError]) -> None:
        raise_problems(self.problems, kind)

    # -- containers ---------------------------------------------------------------------
    def mapping(
        self,
        value: object,
        path: str,
        line: int | None,
        *,
        required: tuple[str, ...] = (),
        optional: tuple[str, ...] = (),
    ) -> YMap | None:
        if not isinstance(value, YMap):
            self.error(path, line, f"expected a mapping with keys {', '.join(required + optional)}; got {_show(value)}")
            return None
        allowed = set(required) | set(optional)
        for key in value:
            if key not in allowed:
                self.error(
                    join(path, key), value.lines[key],
                    f"unknown key {key!r}; valid keys: {', '.join(sorted(allowed))}",
                )
        for key in required:
            if key not in value:
                self.error(path, value.line, f"missing required key {key!r}")
        return value

    def items(self, value: object, path: str, line: int | None) -> Iterator[tuple[object, str, int]]:
        """Iterate a sequence as (item, item_path, item_line); `None`/absent is an empty list."""
        if value is None or (isinstance(value, str) and value in _NULLS):
            return
        if not isinstance(value, YSeq):
            self.error(path, line, f"expected a list; got {_show(value)}")
            return
        for i, item in enumerate(value):
            yield item, f"{path}[{i}]", value.lines[i]

    # -- scalars ------------------------------------------------------------------------
    def string(self, value: object, path: str, line: int | None, *, pattern: str | None = None,
               hint: str = "") -> str | None:
        if not isinstance(value, str) or value == "":
            self.error(path, line, f"expected a non-empty string; got {_show(value)}")
            return None
        if pattern and not re.fullmatch(pattern, value):
            self.error(path, line, f"bad value {_show(value)}; expected {hint or 'to match ' + pattern}")
            return None
        return value

    def optional_string(self, value: object, path: str, line: int | None) -> str | None:
        if value is None or (isinstance(value, str) and value in _NULLS):
            return None
        return self.string(value, path, line)

    def integer(self, value: object, path: str, line: int | None, *, minimum: int | None = None) -> int | None:
        if not isinstance(value, str) or not _INT.fullmatch(value):
            self.error(path, line, f"expected an integer; got {_show(value)}")
            return None
        number = int(value)
        if minimum is not None and number < minimum:
            self.error(path, line, f"{number} is below the minimum {minimum}")
            return None
        return number

    def timestamp(self, value: object, path: str, line: int | None) -> datetime | None:
        """ISO 8601 with a time zone: `2026-11-29T12:00:00Z` or `…+03:00`."""
        expected = "an ISO 8601 time with a zone, e.g. 2026-11-29T12:00:00Z"
        if not isinstance(value, str):
            self.error(path, line, f"expected {expected}; got {_show(value)}")
            return None
        try:
            when = datetime.fromisoformat(value)
        except ValueError:
            self.error(path, line, f"bad time {_show(value)}; expected {expected}")
            return None
        if when.tzinfo is None:
            self.error(path, line, f"time {_show(value)} has no time zone; expected {expected}")
            return None
        return when.astimezone(timezone.utc)

    def choice(self, value: object, path: str, line: int | None, choices: tuple[str, ...]) -> str | None:
        if value not in choices:
            self.error(path, line, f"bad value {_show(value)}; expected one of {', '.join(choices)}")
            return None
        return str(value)

    def each(self, value: object, path: str, line: int | None,
             parse: Callable[[str], T], what: str) -> list[T]:
        """Parse every string item of a list with `parse`, which raises ValueError with a reason."""
        out: list[T] = []
        for item, ipath, iline in self.items(value, path, line):
            if not isinstance(item, str):
                self.error(ipath, iline, f"expected {what}; got {_show(item)}")
                continue
            try:
                out.append(parse(item))
            except ValueError as e:
                self.error(ipath, iline, f"{_show(item)}: {e}")
        return out


def join(path: str, key: str) -> str:
    return f"{path}.{key}" if path else key
