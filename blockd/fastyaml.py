"""Text -> plain data (dict, list, str) for the common line shapes of the strict subset, fast.

The general loader (`strictyaml.load`) streams libyaml's events through Python, about 4 µs a
node: 110 s for a registry of a million orders. This module reads the shapes that policy
files, importers and registries actually write, a line at a time, and builds only plain
dicts, lists and strings (no line numbers: errors never come from here).

    block mappings      key: value          (keys are ASCII identifiers)
    block sequences     - value, - key: value, also at the key's own indent (PyYAML's style)
    scalars             plain (one line), "double quoted" without backslashes,
                        'single quoted' on one line; all stay strings, as in strictyaml
    flow collections    [a, "b"] and {k: v, k2: [c]} on one line (read by json, C speed,
                        after quoting their plain scalars)
    comments            whole lines, and ` # ...` after a value

Anything else (anchors, tags, block scalars, multi-line scalars or flows, escapes, tabs, CR,
unusual characters, duplicate keys, deep nesting, a node count near the limit) raises
`Unsupported`, and the caller uses the general loader, which accepts or refuses it with the
exact message. So this path never decides that a document is bad, and it only accepts what
the general loader accepts, with the same result (tests/unit/test_fastparse.py compares
them on fixtures and fuzzed documents).
"""

from __future__ import annotations

import json
import re

#: Characters outside this set (C0/C1 controls, TAB, CR, NEL, LS, PS, BOM, surrogates) make
#: libyaml break lines or refuse in ways this reader does not repeat.
_UNUSUAL = re.compile("[^\n -~\u00a0-\u2027\u202a-\ud7ff\ue000-\ufefe\uff00-\ufffd\U00010000-\U0010ffff]")
#: What may start a plain scalar in block context here (YAML indicators and `-?:` are left out).
_PLAIN_FIRST_BAD = frozenset("-?:,[]{}#&*!|>'\"%@`")
_SINGLE = re.compile(r"'((?:[^']|'')*)'")

# Flow collections are read in one batch per document, at C speed (no Python work per scalar):
# the batch (one flow per line) is checked for what YAML reads differently from JSON, then
# the quotes are dropped, the spaces around the separators too, and every scalar is quoted
# again by literal replacements, which makes each flow JSON. A quoted scalar here holds no
# separator, no leading or trailing space and is not empty, so dropping its quotes loses
# nothing; a plain one starts with no indicator and holds no `#'"`; a `:` continues a scalar
# only before a character that continues it. Each check below names the case it refuses.
_QUOTED_BAD = (",", "[", "]", "{", "}", "\x00", "#", " \x01", "\x01 ", "\x01\x01")
_COLON_BAD = (":,", ":?", ":]", ":}", ":[", ":{", ":\n", ":\x01")  # libyaml ends a scalar there
#: a quoted scalar (marked \x01) sits between separators (spaces removed)
_BEFORE = ("[\x01", "{\x01", ",\x01", "\x00\x01")
_AFTER = ("\x01]", "\x01}", "\x01,", "\x01\x00")
#: a plain scalar that starts with an indicator (an anchor, alias, tag, `?` key, `-`, `:`)
_INDICATOR = re.compile(r"[\[{,\x00][&*!|>%@`?:\-]")
#: spaces that a plain replacement of ", " and ": " leaves (then the general replacements run)
_ODD_SPACES = re.compile(r" [,\]}\x00]|[\[{\x00,] ")
_SPACES = [(re.compile(r" *\x00 *"), "\x00"), (re.compile(r" *, *"), ","), (re.compile(r" *\[ *"), "["),
           (re.compile(r" *\] *"), "]"), (re.compile(r" *\{ *"), "{"), (re.compile(r" *\} *"), "}")]
#: what YAML reads differently from the JSON these would become (trailing commas, empty keys)
_AMBIGUOUS = re.compile(r",[\]},]|[\[{,]\x00|[\[{],")
_QUOTE = [("[", '["'), ("{", '{"'), (",", '","'), ("\x00", '":"'), ("]", '"]'), ("}", '"}'),
          ('"[', "["), ('"{', "{"), (']"', "]"), ('}"', "}"), ('[""]', "[]"), ('{""}', "{}")]
#: between two flows in the JSON array: a string no flow can spell (flows hold no escapes, no NUL)
_MARK = "\x00"
_SEP = ',"\\u0000",'


class Unsupported(Exception):
    """This reader cannot decide; the general loader will (it accepts or refuses with the message)."""


def _unsupported(*_: object) -> object:
    raise Unsupported


_JSON = json.JSONDecoder(parse_int=_unsupported, parse_float=_unsupported, parse_constant=_unsupported)


def flows(texts: list[str]) -> tuple[list[object], int]:
    """The values of single-line flow collections (each `[...]` or `{...}`) and the number of
    mapping keys they spell, or Unsupported.

    Duplicate keys are not refused here (json keeps the last): the caller compares the keys of
    the mappings it reads with the count (see `Reader.keys`).
    """
    if not texts:
        return [], 0
    batch = "\n".join(texts)
    if "\\" in batch or "'" in batch or '":' in batch or "\x00" in batch:
        raise Unsupported  # escapes, single quotes, JSON-style `"k":v` (and no NUL, used below)
    batch = batch.replace(": ", "\x00")  # the key separators (inside quotes too: refused below)
    parts = batch.split('"')
    if len(parts) % 2 == 0:
        raise Unsupported  # an unterminated quoted scalar
    if len(parts) > 1:
        inside = parts[1::2]
        if "" in inside:
            raise Unsupported  # an empty quoted scalar: dropping its quotes would drop it
        quoted = "\x01".join(inside)
        if quoted[0] == " " or quoted[-1] == " " or any(x in quoted for x in _QUOTED_BAD):
            raise Unsupported
        skeleton = "\x01".join(parts[0::2])
    else:
        skeleton = batch
    if "#" in skeleton or any(x in skeleton for x in _COLON_BAD):
        raise Unsupported
    tight = skeleton.replace(" ", "")
    marks = tight.count("\x01")
    if marks and (sum(map(tight.count, _BEFORE)) != marks or sum(map(tight.count, _AFTER)) != marks):
        raise Unsupported  # "a" "b", a"b", "a"b: not one quoted scalar between separators
    if _INDICATOR.search(tight):
        raise Unsupported
    b = batch.replace('"', "").replace(", ", ",")
    if _ODD_SPACES.search(b):
        for pattern, sep in _SPACES:
            b = pattern.sub(sep, b)
    if _AMBIGUOUS.search(b):
        raise Unsupported
    keys = b.count("\x00")
    for old, new in _QUOTE:
        b = b.replace(old, new)
    try:
        values = _JSON.decode("[" + b.replace("\n", _SEP) + "]")
    except (ValueError, RecursionError):
        raise Unsupported from None
    n = len(texts)
    # every flow is exactly one value: a flow that is not one collection moves or swallows a mark
    if len(values) != 2 * n - 1 or values[1::2].count(_MARK) != n - 1:
        raise Unsupported
    return values[0::2], keys


def check_text(text: str) -> None:
    """Raise Unsupported for characters this reader leaves to libyaml."""
    if _UNUSUAL.search(text):
        raise Unsupported


class Reader:
    """The content lines of one document (or of one sequence item, see `item`); `nodes` counts
    what was built (an upper bound of the general loader's count)."""

    __slots__ = ("lines", "i", "n", "nodes", "keys", "max_depth", "flows", "slots", "good")

    def __init__(self, text: str, max_depth: int) -> None:
        lines = text.split("\n")
        if lines[-1] == "":
            lines.pop()  # the final newline
        if "#" in text or "\n\n" in text or " \n" in text or (lines and not lines[-1].strip(" ")) or text[:1] == "\n":
            lines = [ln for ln in lines if (s := ln.lstrip(" ")) and s[0] != "#"]
        self.lines = lines
        self.i = 0
        self.n = len(lines)
        self.nodes = 0
        #: mapping keys in the text: a caller that finds fewer in the result has met a duplicate
        self.keys = 0
        self.max_depth = max_depth
        self.flows: list[str] = []
        self.good: set[str] = set()  # keys seen to be ASCII identifiers
        self.slots: list[tuple[dict[str, object] | list[object], object]] = []

    def finish(self) -> None:
        """Fill in the flow collections, read in one batch."""
        values, keys = flows(self.flows)
        for (container, key), value in zip(self.slots, values):
            container[key] = value  # type: ignore[index,call-overload]
        self.keys += keys
        if values:  # an upper bound: every collection, key and scalar (commas bound the items)
            b = "\n".join(self.flows)
            self.nodes += 2 * (b.count("[") + b.count("{")) + b.count(",") + 2 * keys

    def document(self) -> dict[str, object]:
        if not self.n:
            raise Unsupported
        first = self.lines[0]
        if first[0] == " " or first[:2] == "- ":
            raise Unsupported
        doc = self.mapping(0, None, 1)
        if self.i != self.n:
            raise Unsupported
        self.finish()
        return doc

    def item(self) -> object:
        """Exactly one sequence item spanning the whole text (an order of the `orders` list)."""
        if not self.n:
            raise Unsupported
        first = self.lines[0]
        s = first.lstrip(" ")
        if s[:2] != "- ":
            raise Unsupported
        seq = self.sequence(len(first) - len(s), 2)  # at the depth of `orders` in a policy
        if len(seq) != 1 or self.i != self.n:
            raise Unsupported
        self.finish()
        return seq[0]

    def mapping(self, indent: int, first: str | None, depth: int) -> dict[str, object]:
        """A block mapping at `indent`; `first` is the content of its first line when that line
        is a sequence entry (`- key: value`), already consumed."""
        if depth > self.max_depth:
            raise Unsupported
        out: dict[str, object] = {}
        lines, n, good = self.lines, self.n, self.good
        i = self.i
        nodes = 1
        while True:
            if first is not None:
                s, first = first, None
            else:
                if i >= n:
                    break
                line = lines[i]
                s = line.lstrip(" ")
                ind = len(line) - len(s)
                if ind != indent:
                    if ind < indent:
                        break
                    raise Unsupported  # a continuation line, or a misplaced one
                if s[0] == "-" and (s[:2] == "- " or s == "-"):
                    break  # the enclosing sequence's next entry (the caller checks)
                i += 1
            key, sep, rest = s.partition(":")
            if key not in good:
                if not sep or not key.isidentifier() or not key.isascii():
                    raise Unsupported
                good.add(key)
            if (rest and rest[0] != " ") or not sep or key in out:
                raise Unsupported
            nodes += 2
            self.keys += 1
            value = rest.strip(" ")
            if value and value[0] != "#":
                c = value[0]
                if c == "[" or c == "{":
                    out[key] = None
                    self.flows.append(_flow_text(value))
                    self.slots.append((out, key))
                    nodes -= 1  # counted with the batch
                else:
                    out[key] = _scalar(value)
                continue
            if i >= n:
                out[key] = ""
                continue
            line = lines[i]
            s = line.lstrip(" ")
            ind = len(line) - len(s)
            if s[0] == "-" and (s[:2] == "- " or s == "-") and ind >= indent:
                self.i = i
                out[key] = self.sequence(ind, depth + 1)
                i = self.i
                nodes -= 1
            elif ind > indent:
                self.i = i + 1
                out[key] = self.mapping(ind, s, depth + 1)
                i = self.i
                nodes -= 1
            else:
                out[key] = ""
        self.i = i
        self.nodes += nodes
        return out

    def sequence(self, indent: int, depth: int) -> list[object]:
        if depth > self.max_depth:
            raise Unsupported
        out: list[object] = []
        lines, n = self.lines, self.n
        i = self.i
        nodes = 1
        while i < n:
            line = lines[i]
            s = line.lstrip(" ")
            ind = len(line) - len(s)
            if ind != indent:
                if ind < indent:
                    break
                raise Unsupported
            if s[:2] != "- ":
                if s != "-":
                    break  # a key of the enclosing mapping (an indentless sequence ends)
                raise Unsupported  # an entry whose value is on the next lines
            i += 1
            rest = s[2:].lstrip(" ")
            column = ind + len(s) - len(rest)
            rest = rest.rstrip(" ")
            if not rest or rest[0] == "#" or rest[0] == "-" and (rest[:2] == "- " or rest == "-"):
                raise Unsupported
            c = rest[0]
            if c == "[" or c == "{":
                self.slots.append((out, len(out)))
                out.append(None)
                self.flows.append(_flow_text(rest))
                continue
            if c != '"' and c != "'":
                key, sep, after = rest.partition(":")
                if sep and (not after or after[0] == " "):
                    self.i = i
                    out.append(self.mapping(column, rest, depth + 1))
                    i = self.i
                    continue
            out.append(_scalar(rest))
            nodes += 1
        self.i = i
        self.nodes += nodes
        return out


def _flow_text(v: str) -> str:
    """A flow collection that ends on its line, without a trailing comment."""
    h = v.find(" #")
    if h >= 0:
        v = v[:h].rstrip(" ")  # a `#` inside a quoted scalar makes the batch refuse, never misread
    if v[-1] != ("]" if v[0] == "[" else "}"):
        raise Unsupported
    return v


def _scalar(v: str) -> str:
    """A scalar that ends on this line: `v` has no surrounding spaces and is not a comment."""
    c = v[0]
    if c == '"':
        end = v.find('"', 1)
        if end < 0:
            raise Unsupported
        text = v[1:end]
        if "\\" in text:
            raise Unsupported
        _tail(v, end + 1)
        return text
    if c == "'":
        m = _SINGLE.match(v)
        if m is None:
            raise Unsupported
        _tail(v, m.end())
        return m.group(1).replace("''", "'")
    if c in _PLAIN_FIRST_BAD:
        raise Unsupported
    h = v.find(" #")
    if h >= 0:
        v = v[:h].rstrip(" ")
    if ": " in v or v[-1] == ":" or "[" in v or "]" in v or "{" in v or "}" in v:
        raise Unsupported
    return v


def _tail(v: str, end: int) -> None:
    """After a quoted scalar: nothing, or spaces and a comment."""
    if end < len(v) and (v[end] != " " or v[end:].lstrip(" ")[:1] != "#"):
        raise Unsupported


def load(text: str, *, max_depth: int, max_nodes: int) -> tuple[dict[str, object], int, int]:
    """A document whose root is a block mapping: (doc, keys, nodes), or Unsupported.

    `keys` is the number of mapping keys the text spells: fewer in the result mean a duplicate
    key (`count_keys`); `nodes` is an upper bound of the general loader's node count."""
    check_text(text)
    r = Reader(text, max_depth)
    doc = r.document()
    if r.nodes > max_nodes:
        raise Unsupported
    return doc, r.keys, r.nodes


def load_item(text: str, *, max_depth: int) -> tuple[object, int, int]:
    """One sequence item (its lines, as they stand in the file): (item, nodes, keys), or Unsupported."""
    check_text(text)
    r = Reader(text, max_depth)
    return r.item(), r.nodes, r.keys


def count_keys(value: object) -> int:
    """The keys of every mapping in `value` (for callers that do not count them as they read)."""
    if isinstance(value, dict):
        return len(value) + sum(count_keys(v) for v in value.values())
    if isinstance(value, list):
        return sum(count_keys(v) for v in value)
    return 0
