"""Typed, path-aware reading of strictyaml data, collecting every problem of a document.

Each reader takes `(value, path, line)` and returns the typed value, or None after recording a
Problem that names the file and line, the path (`orders[2].targets.cidrs[5]`), the bad value
and what is valid. Callers finish with `reader.raise_if_any(ErrorKind)`.
"""

from __future__ import annotations

import dataclasses
import re
import types
import typing
from collections.abc import Callable, Iterator
from datetime import datetime, timezone
from pathlib import Path
from typing import TypeVar

from blockd.errors import InputError, Problem, raise_problems
from blockd.strictyaml import YMap, YSeq

T = TypeVar("T")
#: serials and thresholds are far below 10**18; a 4,300-digit integer is an attack on int()
MAX_INT_DIGITS = 18
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
        if len(value.lstrip("+-")) > MAX_INT_DIGITS:
            self.error(path, line, f"an integer of {len(value)} digits; at most {MAX_INT_DIGITS} digits")
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


def endpoint(text: str, default_port: int | None = None) -> tuple[str, int]:
    """`'127.0.0.1:53'`, `'[::1]:5353'` or (with a default port) a bare address -> (host, port)."""
    host, port = text, ""
    if text.startswith("["):
        host, _, rest = text[1:].partition("]")
        port = rest.removeprefix(":")
    elif text.count(":") == 1:
        host, _, port = text.partition(":")
    if not port:
        if default_port is None:
            raise ValueError("expected host:port, e.g. 127.0.0.1:53 or [::1]:53")
        return host, default_port
    if not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"port {port!r} is not in 1..65535")
    return host, int(port)


def typed(r: Reader, hint: object, value: object, path: str, line: int | None) -> object:
    """Convert strictyaml data to the type `hint` names (the types settings dataclasses use)."""
    origin, args = typing.get_origin(hint), typing.get_args(hint)
    if origin in (typing.Union, types.UnionType) and type(None) in args:
        if value is None or (isinstance(value, str) and value in _NULLS):
            return None
        (inner,) = [a for a in args if a is not type(None)]
        return typed(r, inner, value, path, line)
    if origin is tuple:
        if len(args) == 2 and args[1] is Ellipsis:
            return tuple(typed(r, args[0], item, p, ln) for item, p, ln in r.items(value, path, line))
        if args == (str, int):
            text = r.string(value, path, line)
            try:
                return endpoint(text) if text else None
            except ValueError as e:
                r.error(path, line, f"{text!r}: {e}")
                return None
    if dataclasses.is_dataclass(hint):
        return dataclass_from(r, hint, value, path, line)  # type: ignore[arg-type]
    if hint is bool:
        if value in ("true", "yes", "on", "false", "no", "off"):
            return value in ("true", "yes", "on")
        r.error(path, line, f"bad value {_show(value)}; expected true or false")
        return None
    if hint is int:
        return r.integer(value, path, line)
    if hint is float:
        try:
            return float(str(value))
        except ValueError:
            r.error(path, line, f"bad value {_show(value)}; expected a number")
            return None
    if hint is str:
        return r.string(value, path, line)
    if hint is Path:
        text = r.string(value, path, line)
        return Path(text) if text else None
    raise TypeError(f"settings type {hint!r} is not supported")  # a programming error, not input


def dataclass_from(r: Reader, cls: type[T], value: object, path: str, line: int | None) -> T | None:
    """Build the settings dataclass `cls` from a mapping whose keys are its field names."""
    hints = typing.get_type_hints(cls)
    fields = dataclasses.fields(cls)  # type: ignore[arg-type]
    required = tuple(f.name for f in fields if f.default is dataclasses.MISSING
                     and f.default_factory is dataclasses.MISSING)  # type: ignore[misc]
    optional = tuple(f.name for f in fields if f.name not in required)
    if value is None or value == "":
        value = _empty_map()
    m = r.mapping(value, path, line, required=required, optional=optional)
    if m is None:
        return None
    before = len(r.problems)
    kwargs = {key: typed(r, hints[key], m[key], join(path, key), m.lines[key]) for key in m if key in hints}
    if len(r.problems) > before:
        return None
    try:
        return cls(**kwargs)
    except (InputError, ValueError, TypeError) as e:
        r.error(path, line, getattr(e, "message", str(e)))
        return None


def _empty_map() -> YMap:
    m = YMap()
    m.lines = {}
    m.line = 0
    return m
