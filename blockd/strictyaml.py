"""Bytes -> plain data (dicts, lists, strings), refusing everything a hostile file could abuse.

Policies come from outside, so the loader trusts nothing:
- a size limit before anything is read, strict UTF-8 (the bad byte's offset and line are named);
- no anchors, aliases or tags (no billion laughs, no object construction);
- a nesting limit and a node limit, enforced while streaming libyaml's events, so a deeply
  nested or huge document is refused before it is built;
- duplicate keys are errors (PyYAML silently keeps the last one);
- every scalar stays a string: the schema, not YAML 1.1's implicit typing, decides what
  `no`, `0777` or `2026-01-01` mean.

The result keeps line numbers (`YMap.lines`, `YSeq.lines`) so that schema errors can say
`file:line: path: message`.
"""

from __future__ import annotations

import yaml

from blockd.errors import InputError

try:  # libyaml's C parser: an order of magnitude faster on large lists
    _Loader: type = yaml.CSafeLoader
except AttributeError:  # pragma: no cover - PyYAML built without libyaml
    _Loader = yaml.SafeLoader

MAX_BYTES = 64 << 20
MAX_DEPTH = 32
MAX_NODES = 8_000_000


class YMap(dict[str, object]):
    """A mapping; `lines[key]` is the 1-based line of the key."""

    lines: dict[str, int]
    line: int


class YSeq(list[object]):
    """A sequence; `lines[i]` is the 1-based line of item i."""

    lines: list[int]
    line: int


def _line_of(data: bytes, offset: int) -> int:
    return data.count(b"\n", 0, offset) + 1


def decode(data: bytes, source: str, max_bytes: int = MAX_BYTES) -> str:
    if len(data) > max_bytes:
        raise InputError(
            f"file is {len(data)} bytes; the limit is {max_bytes} bytes", where=source
        )
    if data.startswith(b"\xef\xbb\xbf"):
        data = data[3:]
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as e:
        bad = data[e.start : e.start + 4]
        raise InputError(
            f"not UTF-8: byte {bad[:1]!r} at offset {e.start} ({e.reason}); "
            "save the file as UTF-8",
            where=f"{source}:{_line_of(data, e.start)}",
        ) from None


def load(
    data: bytes,
    source: str,
    *,
    max_bytes: int = MAX_BYTES,
    max_depth: int = MAX_DEPTH,
    max_nodes: int = MAX_NODES,
) -> object:
    """Parse one YAML document from `data` into YMap / YSeq / str (or None if empty)."""
    text = decode(data, source, max_bytes)
    stack: list[YMap | YSeq] = []
    pending_key: list[str | None] = []  # per open mapping: the key awaiting its value
    root: object = None
    documents = 0
    nodes = 0

    def where(event: yaml.Event) -> str:
        return f"{source}:{event.start_mark.line + 1}"

    def attach(value: object, event: yaml.Event) -> None:
        nonlocal root
        line = event.start_mark.line + 1
        if not stack:
            root = value
            return
        top = stack[-1]
        if isinstance(top, YSeq):
            top.append(value)
            top.lines.append(line)
            return
        key = pending_key[-1]
        if key is None:
            if not isinstance(value, str):
                raise InputError("mapping keys must be plain strings", where=where(event))
            if value in top:
                raise InputError(
                    f"duplicate key {value!r} (first at line {top.lines[value]}); "
                    "each key may appear once",
                    where=where(event),
                )
            pending_key[-1] = value
            top.lines[value] = line
        else:
            top[key] = value
            pending_key[-1] = None

    try:
        for event in yaml.parse(text, Loader=_Loader):
            kind = type(event)
            if kind is yaml.ScalarEvent:
                if event.anchor is not None:
                    raise InputError(f"anchor &{event.anchor} is not allowed", where=where(event))
                if event.tag is not None:
                    raise InputError(f"tag {event.tag!r} is not allowed", where=where(event))
                nodes += 1
                attach(event.value, event)
            elif kind is yaml.MappingStartEvent or kind is yaml.SequenceStartEvent:
                if event.anchor is not None:
                    raise InputError(f"anchor &{event.anchor} is not allowed", where=where(event))
                if event.tag is not None:
                    raise InputError(f"tag {event.tag!r} is not allowed", where=where(event))
                if len(stack) >= max_depth:
                    raise InputError(
                        f"nesting deeper than {max_depth} levels", where=where(event)
                    )
                node: YMap | YSeq
                if kind is yaml.MappingStartEvent:
                    node = YMap()
                    node.lines = {}
                else:
                    node = YSeq()
                    node.lines = []
                node.line = event.start_mark.line + 1
                nodes += 1
                attach(node, event)
                stack.append(node)
                pending_key.append(None)
            elif kind is yaml.MappingEndEvent or kind is yaml.SequenceEndEvent:
                stack.pop()
                pending_key.pop()
            elif kind is yaml.AliasEvent:
                raise InputError(
                    f"alias *{event.anchor} is not allowed (anchors and aliases are refused)",
                    where=where(event),
                )
            elif kind is yaml.DocumentStartEvent:
                documents += 1
                if documents > 1:
                    raise InputError("more than one YAML document; expected exactly one", where=where(event))
            if nodes > max_nodes:
                raise InputError(f"more than {max_nodes} YAML nodes", where=where(event))
    except yaml.MarkedYAMLError as e:
        mark = e.problem_mark or e.context_mark
        line = f":{mark.line + 1}" if mark is not None else ""
        raise InputError(f"invalid YAML: {e.problem or e.context}", where=f"{source}{line}") from None
    except yaml.YAMLError as e:
        raise InputError(f"invalid YAML: {e}", where=source) from None
    return root
