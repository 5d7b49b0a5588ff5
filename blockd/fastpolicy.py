"""Policy bytes -> Policy without the general parser, when nothing is in doubt; and per order.

The fast path of `policy.parse_policy`, tried in this order (each raises `Unsupported` when it
cannot decide, and the next one runs; the general path, libyaml and the schema Reader, decides
every doubt and gives every error with its line):

    incremental   a new serial of a file parsed before: only the items whose bytes changed
    _registry     the header (read by fastyaml), then one compiled regex per canonical item
                  over the whole body (`re.findall`, C); the values checked and the Orders
                  built a column at a time by C loops (map over C callables); items of
                  another shape read one at a time by the line reader
    fastyaml      the common line shapes of the whole file -> `order` per item

Each makes exactly the Policy the general path makes, and refuses nothing itself: any value
the schema would refuse, any shape it does not know, raises `Unsupported` (errors are rare;
exact messages matter more than their speed). tests/unit/test_fastparse.py compares them with
the general path on every construct near the canonical shape and on random edits.

A new serial of a large registry is mostly the same text: `Items` keeps the last parse of
each file (`Snapshot`: its verified bytes, the very object the SignedFile holds, and one Order
per item), and `incremental` compares the new body with the old one from both ends (memcmp of
blocks), reuses the Orders of the items wholly inside the common front and back (the same
objects: the per-order expansion cache keys on them), matches the items in between by their
bytes, and reads only what has no match. It applies only when the file is a header, the
`orders:` line and the items, nothing after them; an item boundary is a line `<indent>- ` at
the list's indent, which the fast readers guarantee (they take no construct that spans lines,
so a changed item can never swallow or split a neighbour); anything else, including a
duplicate id across items, goes to the full parse.
"""

from __future__ import annotations

import dataclasses
import re
import socket
import struct
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timezone
from functools import partial
from itertools import accumulate, chain, compress, repeat
from operator import add, and_, attrgetter, ne, not_
from typing import cast

from blockd import fastyaml, ranges, trust
from blockd.fastyaml import Unsupported
from blockd.layered import Layered
from blockd.model import DNS_ANSWERS, GUARDS, AllowCollateral, Cidr, LegalBasis, Order, Policy, Targets
from blockd.names import MAX_NAME
from blockd.policy import ORDER_ID, SERVICE_NAME, canonical_rule, parse_asn, parse_domain
from blockd.schema import MAX_INT_DIGITS

_TOP_REQUIRED = frozenset(("issuer", "serial", "issued_at", "not_before", "not_after", "orders"))
_TOP_ALLOWED = _TOP_REQUIRED | {"description"}
_ORDER_REQUIRED = frozenset(("id", "legal_basis", "action", "targets"))
_ORDER_ALLOWED = _ORDER_REQUIRED | {"deadline", "allow_collateral", "dns_answer"}
_BASIS_REQUIRED = frozenset(("authority", "reference"))
_BASIS_ALLOWED = _BASIS_REQUIRED | {"url"}
_TARGETS_ALLOWED = frozenset(("services", "domains", "cidrs", "asns"))
_ALLOW_KEYS = frozenset(("rule", "guard", "reason"))
_NULLS = frozenset(("", "~", "null", "Null", "NULL"))
_ACTIONS = frozenset(("block", "unblock"))
_DNS_ANSWERS = frozenset(DNS_ANSWERS)
_GUARDS = frozenset(GUARDS)
_ORDER_ID = re.compile(ORDER_ID)
_SERVICE = re.compile(SERVICE_NAME)
_ISSUER = re.compile(trust.ISSUER_NAME)
_INT = re.compile(r"[+-]?[0-9]+")
#: a name already in the form `parse_domain` returns (lowercase A-labels, no trailing dot, no
#: punycode to check, a last label that is not all digits); anything else takes parse_domain
_LABEL = r"[a-z0-9_](?:[a-z0-9_-]{0,61}[a-z0-9_])?"
_CANONICAL_NAME = re.compile(rf"(?:\*\.)?(?!(?:.*\.)?xn--)(?:{_LABEL}\.)*(?![0-9]+\Z){_LABEL}")


# The three objects made per order, built by setting their slots directly: the same objects as
# the generated __init__ makes (no __post_init__, no defaults used), at half its cost (which
# goes through object.__setattr__ per field). The field lists are checked at import.
assert [f.name for f in dataclasses.fields(Order)] == ["id", "legal_basis", "action", "targets", "deadline",
                                                       "allow_collateral", "dns_answer"]
assert [f.name for f in dataclasses.fields(LegalBasis)] == ["authority", "reference", "url"]
assert [f.name for f in dataclasses.fields(Targets)] == ["services", "domains", "cidrs", "asns"]
assert not any(hasattr(c, "__post_init__") for c in (Order, LegalBasis, Targets))
_new = object.__new__
_o_id, _o_basis, _o_action, _o_targets, _o_deadline, _o_allow, _o_dns = (
    getattr(Order, f.name).__set__ for f in dataclasses.fields(Order))
_b_authority, _b_reference, _b_url = (getattr(LegalBasis, f.name).__set__ for f in dataclasses.fields(LegalBasis))
_t_services, _t_domains, _t_cidrs, _t_asns = (getattr(Targets, f.name).__set__ for f in dataclasses.fields(Targets))


def _make_order(oid: str, basis: LegalBasis, action: str, targets: Targets, deadline: datetime | None,
                allow: tuple[AllowCollateral, ...], dns_answer: str | None) -> Order:
    o = _new(Order)
    _o_id(o, oid)
    _o_basis(o, basis)
    _o_action(o, action)
    _o_targets(o, targets)
    _o_deadline(o, deadline)
    _o_allow(o, allow)
    _o_dns(o, dns_answer)
    return o


def _make_basis(authority: str, reference: str, url: str | None) -> LegalBasis:
    b = _new(LegalBasis)
    _b_authority(b, authority)
    _b_reference(b, reference)
    _b_url(b, url)
    return b


def _make_targets(services: tuple[str, ...], domains: tuple[str, ...], cidrs: tuple[object, ...],
                  asns: tuple[int, ...]) -> Targets:
    t = _new(Targets)
    _t_services(t, services)
    _t_domains(t, domains)
    _t_cidrs(t, cidrs)
    _t_asns(t, asns)
    return t


@dataclass(frozen=True, slots=True, eq=False)
class Snapshot:
    """One file's parse, kept for the next serial: the verified bytes themselves (the same
    object the SignedFile and the state hold, not a copy), where its items start, and per item
    the Order and the YAML node count (an upper bound). Item i is the i-th `<indent>- ` block
    of the top-level `orders` list."""

    data: bytes
    issuer: str
    body: int  # offset of the first item (just after the `orders:` line)
    indent: int
    orders: tuple[Order, ...]  # the Policy's own tuple
    nodes: tuple[int, ...]
    node_total: int  # sum(nodes)
    #: the orders' ids (made on the first new serial parsed beside this one, then derived)
    ids: Layered[str, None] | None = None


@dataclass
class Items:
    """The last parse of each file (by source name), for `incremental`. Bounded by the caller
    (`keep`): only the snapshots of files still present stay."""

    by_source: dict[str, Snapshot] = field(default_factory=dict)

    def keep(self, files: list[Snapshot]) -> None:
        """Keep only these snapshots."""
        live = {id(s) for s in files}
        self.by_source = {k: s for k, s in self.by_source.items() if id(s) in live}

    def add(self, source: str, snap: Snapshot) -> None:
        self.by_source.pop(source, None)
        self.by_source[source] = snap  # the newest last: the base for a file under a new name

    def base(self, source: str, issuer: str) -> Snapshot | None:
        """The last parse of this file, else the newest of this issuer's (a registry that
        names each serial's file anew); never another issuer's (a ticket is not compared
        with a registry a thousand times its size)."""
        snap = self.by_source.get(source)
        if snap is None or snap.issuer != issuer:
            snap = next((s for s in reversed(self.by_source.values()) if s.issuer == issuer), None)
        return snap

    def __len__(self) -> int:
        return sum(len(s.orders) for s in self.by_source.values())


@dataclass(frozen=True, slots=True)
class Parsed:
    policy: Policy
    #: the snapshot kept for the next serial (when the file has the shape `incremental` reuses)
    items: Snapshot | None = None


def parse(data: bytes, text: str | None, source: str, *, signers: tuple[str, ...], digest: str,
          max_depth: int, max_nodes: int, items: Items | None) -> Parsed:
    """The Policy, or Unsupported. `text` is the decoded file (None: decode only what is read)."""
    if items is not None:
        try:
            return incremental(data, source, signers=signers, digest=digest, max_depth=max_depth,
                               max_nodes=max_nodes, items=items)
        except Unsupported:
            pass
    try:
        return _registry(data, source, signers=signers, digest=digest, max_depth=max_depth, max_nodes=max_nodes,
                         items=items)
    except Unsupported:
        pass
    if text is None:
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError:
            raise Unsupported from None
    doc, keys, _ = fastyaml.load(text, max_depth=max_depth, max_nodes=max_nodes)
    seen = [0]
    header = _header(doc, seen)
    raw = doc["orders"]
    if type(raw) is not list or not raw:
        raise Unsupported
    times: dict[str, datetime] = {}
    orders = [order(m, seen, times) for m in raw]
    if seen[0] != keys or len({o.id for o in orders}) != len(orders):
        raise Unsupported  # a duplicate key in a flow, or a duplicate order id
    policy = _policy(header, orders, digest, source, signers)
    snap = None
    if items is not None and next(reversed(doc)) == "orders":
        snap = _remember(data, policy, tuple(map(_nodes, orders)), items)
    return Parsed(policy, snap)


# -- the file's frame: the header, the `orders:` line, the items -----------------------------------
def _frame(data: bytes) -> tuple[int, int]:
    """(offset of the first item, the items' indent) when the file is a header, an `orders:`
    line and the items (nothing after them at the top level), else Unsupported."""
    if data.startswith(b"orders:"):
        at = 0
    else:
        at = data.find(b"\norders:") + 1
        if at == 0:
            raise Unsupported
    end = data.find(b"\n", at)
    if end < 0 or data[at:end] != b"orders:":
        raise Unsupported
    body = end + 1
    indent = 0
    while data[body + indent:body + indent + 1] == b" ":
        indent += 1
    if data[body + indent:body + indent + 2] != b"- ":
        raise Unsupported
    return body, indent


def _head(data: bytes, body: int, max_depth: int, max_nodes: int) -> tuple[Header, int]:
    """The header (every line before the items, read alone: it holds nothing that spans lines
    into them) and its node count; `orders` must be its last key, with its value below."""
    try:
        text = data[:body].decode("utf-8")
    except UnicodeDecodeError:
        raise Unsupported from None
    doc, keys, nodes = fastyaml.load(text, max_depth=max_depth, max_nodes=max_nodes)
    seen = [0]
    header = _header(doc, seen)
    if doc["orders"] != "" or next(reversed(doc)) != "orders" or seen[0] != keys:
        raise Unsupported
    return header, nodes


def _remember(data: bytes, policy: Policy, nodes: tuple[int, ...], items: Items, *, counted: bool = False,
              ids: dict[str, None] | None = None) -> Snapshot | None:
    """After a parse: keep the snapshot, when the file's items are exactly the orders (one
    `<indent>- ` line at the list's indent per order: the reader took every line). `counted`:
    the recogniser read them so, one order per item line."""
    try:
        body, indent = _frame(data)
    except Unsupported:
        return None
    if not counted and data.count(b"\n" + b" " * indent + b"- ", body) + 1 != len(policy.orders):
        return None
    snap = Snapshot(data, policy.issuer, body, indent, policy.orders, nodes, sum(nodes),
                    Layered.adopt(ids) if ids is not None else None)
    items.add(policy.source, snap)
    return snap


# -- the registry recogniser: the canonical item shape, one regex over the whole body --------------
# The shape bench/scale.py and the registry importers write, one order per decision:
#
#     - id: d0
#       legal_basis: {authority: Bench Registry, reference: d0}
#       action: block
#       targets: {domains: ["0a1b2c3d4e.ru"], cidrs: ["192.0.2.0/24", "2001:db8::/48"]}
#
# Every character class below is a strict subset of what libyaml reads as that exact text: an
# id is a plain scalar without `:`, `#` or spaces; authority and reference are plain flow
# scalars of letters, digits, `_.()/+-` and non-ASCII printable characters (single spaces
# inside, none at the ends, no indicator first); names and prefixes are double-quoted
# without backslashes (no escapes: the text between the quotes is the value). The body must
# hold only printable characters (no TAB, CR, BOM, controls, as `fastyaml.check_text`). So what
# the regex takes is read by libyaml as these strings, and the values then pass the same
# checks as `order` (ids, names, prefixes, duplicates). An item not of this shape is read by
# the line reader (`fastyaml.load_item`) alone; anything that reader leaves is Unsupported.
_ASCII_OK = bytes([10, *range(32, 127)])
_WIDE = "\u00a1-\u2027\u202a-\ud7ff\ue000-\ufefe\uff00-\ufffd\U00010000-\U0010ffff"
_P_FIRST = rf"A-Za-z0-9_.(/+{_WIDE}"
_P_REST = rf"A-Za-z0-9_.()/+\-{_WIDE}"
_PLAIN = rf"[{_P_FIRST}][{_P_REST}]*(?: [{_P_REST}]+)*"
_QLIST = r'(?:"[^"\\\n]*"(?:, "[^"\\\n]*")*)?'
_ID = r"[A-Za-z0-9][A-Za-z0-9._/+-]{0,127}"
#: a name already in the form parse_domain gives (`_CANONICAL_NAME`, inside its quotes: at most
#: MAX_NAME characters, no label starting `xn--`, a last label not all digits); other names
#: make the item one for the line reader, and `order` gives them to parse_domain
_QNAME = (rf'"(?=[^"]{{1,{MAX_NAME}}}")(?:\*\.)?(?!(?:[^"]*\.)?xn--)(?:{_LABEL}\.)*(?![0-9]+"){_LABEL}"')
_QNAMES = rf"(?:{_QNAME}(?:, {_QNAME})*)?"
_QSEP = '", "'
_ITEM_NODES = 17  # the item, 4 keys and their values, legal_basis's 2 and targets' 2 keys and values
_ITEM_DEPTH = 5  # root > orders > item > targets > domains


def _item_pattern(indent: int) -> tuple[re.Pattern[str], int]:
    """The canonical item at this list indent, and the length of its fixed text."""
    p, k = " " * indent, " " * (indent + 2)
    fixed = [f"{p}- id: ", "\n", f"{k}legal_basis: {{authority: ", ", reference: ", "}\n", f"{k}action: ", "\n",
             f"{k}targets: {{domains: [", "], cidrs: [", "]}\n"]
    groups = [_ID, _PLAIN, _PLAIN, "block|unblock", _QNAMES, _QLIST]
    pattern = re.escape(fixed[0]) + f"({groups[0]})" + re.escape(fixed[1]) + re.escape(fixed[2]) + \
        f"({groups[1]})" + re.escape(fixed[3]) + f"({groups[2]})" + re.escape(fixed[4]) + re.escape(fixed[5]) + \
        f"({groups[3]})" + re.escape(fixed[6]) + re.escape(fixed[7]) + f"({groups[4]})" + re.escape(fixed[8]) + \
        f"({groups[5]})" + re.escape(fixed[9])
    return re.compile(pattern), sum(map(len, fixed))


_PATTERNS: dict[int, tuple[re.Pattern[str], int]] = {}


def _body_text(data: bytes) -> str:
    """The items' text, or Unsupported for characters the line reader leaves to libyaml."""
    raw = data
    if raw.isascii():
        if raw.translate(None, _ASCII_OK):
            raise Unsupported  # a control character, TAB, CR, DEL
        return raw.decode("ascii")
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError:
        raise Unsupported from None
    fastyaml.check_text(text)
    return text


def _registry(data: bytes, source: str, *, signers: tuple[str, ...], digest: str, max_depth: int, max_nodes: int,
              items: Items | None) -> Parsed:
    """A whole file of the frame `_frame` reads, its items recognised by `_recognise`."""
    body, indent = _frame(data)
    header, head_nodes = _head(data, body, max_depth, max_nodes)
    orders, nodes = _recognise(_body_text(data[body:]), indent, max_depth)
    if head_nodes + 1 + sum(nodes) > max_nodes:
        raise Unsupported
    ids = dict.fromkeys(map(_order_id, orders))  # kept for the next serial (`Snapshot.ids`)
    if len(ids) != len(orders):
        raise Unsupported  # a duplicate order id: the general path names both
    policy = _policy(header, orders, digest, source, signers)
    snap = _remember(data, policy, nodes, items, counted=True, ids=ids) if items is not None else None
    return Parsed(policy, snap)


_order_id = attrgetter("id")


def _recognise(text: str, indent: int, max_depth: int) -> tuple[list[Order], tuple[int, ...]]:
    """The orders of a run of items (text that starts at an item line and ends after an item),
    in order, one per item, and each item's node count; or Unsupported."""
    if max_depth < _ITEM_DEPTH:
        raise Unsupported
    compiled = _PATTERNS.get(indent)
    if compiled is None:
        compiled = _PATTERNS[indent] = _item_pattern(indent)
    pattern, fixed = compiled
    found = pattern.findall(text)
    # non-overlapping matches whose lengths add up to the text's tile it: no gaps, the fast case
    if len(found) * fixed + sum(map(len, chain.from_iterable(found))) == len(text):
        return _columns(found)
    orders: list[Order] = []
    nodes: list[int] = []
    run: list[tuple[str, ...]] = []
    starts: list[int] = []
    at = 0
    prefix = " " * indent + "- "

    def flush() -> None:
        nonlocal orders, nodes
        if run:
            o, n = _columns(run)
            orders += o
            nodes += n
            run.clear()
            starts.clear()

    for m in pattern.finditer(text):
        start = m.start()
        if start != at:
            gap = at
            if not text.startswith(prefix, at) and run:
                run.pop()  # comment or blank lines after an item: that item is read with them
                gap = starts.pop()
            flush()
            o, n = _gap(text[gap:start], prefix, max_depth, last=False)
            orders += o
            nodes += n
        run.append(m.groups())
        starts.append(start)
        at = m.end()
    if at != len(text):
        gap = at
        if not text.startswith(prefix, at) and run:
            run.pop()
            gap = starts.pop()
        flush()
        o, n = _gap(text[gap:], prefix, max_depth, last=True)
        orders += o
        nodes += n
    flush()
    return orders, tuple(nodes)


def _gap(text: str, prefix: str, max_depth: int, *, last: bool) -> tuple[list[Order], list[int]]:
    """Items between canonical ones, each read alone by the line reader. The gap starts at an
    item line and, unless it ends the text, ends at a newline (the next match starts a line)."""
    if not text.startswith(prefix) or (not last and text[-1] != "\n"):
        raise Unsupported
    parts = text.split("\n" + prefix)
    end = len(parts) - 1
    orders, nodes = [], []
    times: dict[str, datetime] = {}
    for i, part in enumerate(parts):
        item_text = (part if i == 0 else prefix + part) + ("\n" if i < end else "")
        item, n, item_keys = fastyaml.load_item(item_text, max_depth=max_depth)
        counted = [0]
        orders.append(order(item, counted, times))
        if counted[0] != item_keys:
            raise Unsupported  # a duplicate key in a flow
        nodes.append(n)
    return orders, nodes


def _columns(found: list[tuple[str, ...]]) -> tuple[list[Order], tuple[int, ...]]:
    """Orders from the regex's groups, a column at a time: the checks and the objects are
    built by C loops (map over C callables), not per item in Python."""
    n = len(found)
    ids, auths, refs, actions, doms, cids = zip(*found)
    memo: dict[str, str] = {}
    auths = tuple(map(memo.setdefault, auths, auths))  # one string per authority (they repeat)
    refs = tuple(map(_same_text, refs, ids))  # a reference that is its order's id: one string
    actions = tuple(map(_ACTION_STR.__getitem__, actions))
    names = _names(doms)
    cidrs = _cidrs(cids)
    nodes = tuple(map(add, repeat(_ITEM_NODES), map(add, map(len, names), map(len, cidrs))))
    if _ITEM_NODES in nodes:
        raise Unsupported  # an order without targets
    bases = list(map(_new, repeat(LegalBasis, n)))
    deque(map(_b_authority, bases, auths), 0)
    deque(map(_b_reference, bases, refs), 0)
    deque(map(_b_url, bases, repeat(None)), 0)
    targets = list(map(_new, repeat(Targets, n)))
    deque(map(_t_services, targets, repeat(())), 0)
    deque(map(_t_domains, targets, names), 0)
    deque(map(_t_cidrs, targets, cidrs), 0)
    deque(map(_t_asns, targets, repeat(())), 0)
    orders = list(map(_new, repeat(Order, n)))
    for setter, column in ((_o_id, ids), (_o_basis, bases), (_o_action, actions), (_o_targets, targets)):
        deque(map(setter, orders, column), 0)
    for setter, value in ((_o_deadline, None), (_o_allow, ()), (_o_dns, None)):
        deque(map(setter, orders, repeat(value)), 0)
    return orders, nodes


_ACTION_STR = {"block": "block", "unblock": "unblock"}


def _same_text(text: str, other: str) -> str:
    """`other` when the two are equal: a registry's reference is often its decision's id, and
    one string serves both (56 bytes an order at 1M)."""
    return other if text == other else text


def _flatten(column: tuple[str, ...]) -> tuple[list[str], list[int] | None]:
    """The insides of lists of double-quoted scalars (`"a", "b"`, or "" for an empty list) ->
    every value in order, and how many each list holds (None: one each)."""
    counts: list[int] | None = None
    if "" in column:
        counts = [c.count(_QSEP) + 1 if c else 0 for c in column]
        column = tuple(filter(None, column))
        if not column:
            return [], counts
    blob = "\n".join(column)  # the values hold no newline, no quote
    if _QSEP in blob:
        if counts is None:
            counts = list(map(add, map(str.count, column, repeat(_QSEP)), repeat(1)))
        return blob[1:-1].replace('"\n"', _QSEP).split(_QSEP), counts
    return blob[1:-1].split('"\n"'), counts


def _group(flat: list[object], counts: list[int] | None) -> list[tuple[object, ...]]:
    if counts is None:
        return list(zip(flat))
    ends = list(accumulate(counts))
    values = tuple(flat)
    return list(map(values.__getitem__, map(slice, chain((0,), ends), ends)))


def _names(column: tuple[str, ...]) -> list[tuple[str, ...]]:
    """Each order's names: the regex took only names in parse_domain's form (`_QNAME`)."""
    flat, counts = _flatten(column)
    return _group(flat, counts)  # type: ignore[arg-type,return-value]


_inet4 = partial(socket.inet_pton, socket.AF_INET)
_inet6 = partial(socket.inet_pton, socket.AF_INET6)
_cidr_of = partial(tuple.__new__, Cidr)


def _cidrs(column: tuple[str, ...]) -> list[tuple[Cidr, ...]]:
    """Each order's prefixes, as `ranges.parse_cidr` reads them, a batch per family by the
    same steps (split at `/`, `:` in the address means IPv6, inet_pton, a length of digits in
    0..bits, no host bits, IPv4-mapped IPv6 as IPv4); a bare address by parse_cidr itself."""
    flat, counts = _flatten(column)
    if not flat:
        return _group(flat, counts)  # type: ignore[return-value,arg-type]
    addrs, seps, lens = zip(*map(str.partition, flat, repeat("/")))
    if seps.count("/") != len(seps):
        try:
            parsed = [ranges.parse_cidr(c) for c in flat]
        except ValueError:
            raise Unsupported from None
    elif ":" not in "".join(addrs):
        parsed = _batch(4, addrs, lens)
    else:
        v6 = list(map(str.__contains__, addrs, repeat(":")))
        v4 = list(map(not_, v6))
        four = iter(_batch(4, tuple(compress(addrs, v4)), tuple(compress(lens, v4))))
        six = iter(_batch(6, tuple(compress(addrs, v6)), tuple(compress(lens, v6))))
        parsed = list(map(next, map((four, six).__getitem__, v6)))  # back in the file's order
    return _group(parsed, counts)  # type: ignore[arg-type,return-value]


def _batch(version: int, addrs: tuple[str, ...], lens: tuple[str, ...]) -> list[Cidr]:
    if not addrs:
        return []
    n = len(addrs)
    try:
        packed = b"".join(map(_inet4 if version == 4 else _inet6, addrs))
    except (OSError, ValueError):  # ValueError: what the text cannot pass to C (the body check refuses it)
        raise Unsupported from None
    if version == 4:
        nets: tuple[int, ...] | list[int] = struct.unpack(f">{n}I", packed)
    else:
        nets = list(map(int.from_bytes, map(packed.__getitem__, map(slice, range(0, 16 * n, 16),
                                                                          range(16, 16 * n + 16, 16))), repeat("big")))
    if not all(map(str.isdigit, lens)):
        raise Unsupported
    try:
        plens = list(map(int, lens))
    except ValueError:
        raise Unsupported from None
    if max(plens) > (32 if version == 4 else 128):
        raise Unsupported
    if any(map(and_, nets, map((ranges.HOST4 if version == 4 else ranges.HOST6).__getitem__, plens))):
        raise Unsupported  # host bits set: the general path says which network was meant
    if version == 6 and max(plens) >= 96 and any(net >> 32 == 0xFFFF for net in nets):
        return [ranges.parse_cidr(f"{a}/{p}") for a, p in zip(addrs, lens)]  # IPv4-mapped: parse_cidr maps them
    return list(map(_cidr_of, zip(repeat(version), nets, plens)))


# -- a new serial: the items that changed ---------------------------------------------------------
_BLOCK = 1 << 16


def _common_run(limit: int, same: Callable[[int, int], bool]) -> int:
    """The longest n <= limit for which `same(0, n)` holds, found by comparing blocks (`same(n, k)`:
    the k bytes after the first n agree), doubling while they agree, halving when they do not."""
    n = 0
    step = _BLOCK
    while n < limit:
        k = min(step, limit - n)
        if same(n, k):
            n += k
            if step < _BLOCK:
                step *= 2
        elif k == 1:
            return n
        else:
            step = max(1, k // 2)
    return n


def _common_prefix(a: bytes, ai: int, b: bytes, bi: int, limit: int) -> int:
    """The length of the longest common prefix of a[ai:] and b[bi:], at most `limit` (memcmp of blocks)."""
    return _common_run(limit, lambda n, k: a[ai + n:ai + n + k] == b[bi + n:bi + n + k])


def _common_suffix(a: bytes, b: bytes, limit: int) -> int:
    """The length of the longest common suffix of a and b, at most `limit`."""
    la, lb = len(a), len(b)
    return _common_run(limit, lambda n, k: a[la - n - k:la - n] == b[lb - n - k:lb - n])


_WALK = 4096  # items read in the walk before the rest is matched by bytes (a change in place costs a step)
_RESYNC = 64  # bytes after a changed item that must agree for it to be a change in place


def _rest(old_mid: bytes, new_mid: bytes, marker: bytes, old_orders: tuple[Order, ...], old_nodes: tuple[int, ...]
          ) -> tuple[list[Order | None], list[int], list[int], list[bytes]]:
    """The items of `new_mid` (whole items) matched with those of `old_mid` by their bytes: at
    the same place, else anywhere among the old ones left. (orders with None where a new item
    has no match, their nodes, the indices of those, and their exact bytes.)"""
    lead = len(marker) - 1
    prefix = marker[1:]
    old_parts = old_mid.split(marker) if old_mid else []
    if len(old_parts) != len(old_orders):
        raise Unsupported  # not the items this snapshot describes (cannot happen: it was checked)
    final = new_mid.endswith(b"\n")
    new_parts = (new_mid[:-1] if final else new_mid).split(marker)
    if old_parts and old_parts[-1].endswith(b"\n"):
        old_parts[-1] = old_parts[-1][:-1]  # every part without the newline before the next item (or the end)
    if old_parts:
        old_parts[0] = old_parts[0][lead:]  # and without the first one's `<indent>- `, like the others
    new_parts[0] = new_parts[0][lead:]
    between = len(old_parts)
    mid_orders: list[Order | None] = list(old_orders[:len(new_parts)])
    mid_nodes: list[int] = list(old_nodes[:len(new_parts)])
    misses = list(compress(range(len(mid_orders)), map(ne, old_parts, new_parts)))  # C loops
    misses += range(len(mid_orders), len(new_parts))
    mid_orders += [None] * (len(new_parts) - len(mid_orders))
    mid_nodes += [0] * (len(new_parts) - len(mid_nodes))
    if misses:
        # the old items not taken at their place: those whose place missed, and those past the new end
        rest = [j for j in misses if j < between] + list(range(len(new_parts), between))
        index = dict(zip(map(old_parts.__getitem__, rest), rest))
        found = [(i, index.get(new_parts[i])) for i in misses]
        taken_again = [j for _, j in found if j is not None]
        if len(set(taken_again)) != len(taken_again):
            raise Unsupported  # one old item twice (the same bytes twice: the same id twice)
        for i, j in found:
            if j is not None:
                mid_orders[i] = old_orders[j]
                mid_nodes[i] = old_nodes[j]
        misses = [i for i, j in found if j is None]
    last = len(new_parts) - 1
    texts = [prefix + new_parts[i] + (b"\n" if i < last or final else b"") for i in misses]  # as in the file
    return mid_orders, mid_nodes, misses, texts


def incremental(data: bytes, source: str, *, signers: tuple[str, ...], digest: str, max_depth: int,
                max_nodes: int, items: Items) -> Parsed:
    """Parse only the items whose bytes differ from the last parse of this file (`Items.base`);
    the rest are its Order objects.

    The bodies (everything after the `orders:` lines) are compared from the front and from the
    back (memcmp of blocks): the items whose every byte, and the next item line, lie in the
    common front are the old file's first F items, those wholly in the common back its last G
    (an item line is `<indent>- ` at the list's indent: the reader takes nothing that spans
    lines, so equal bytes are equal items, at any place). Between them, the old and new items
    are matched by their bytes (by position when both hold as many, else by a dict of the old
    ones) and what has no match is read now."""
    if data.startswith(b"\xef\xbb\xbf"):
        raise Unsupported
    body, indent = _frame(data)
    header, head_nodes = _head(data, body, max_depth, max_nodes)
    snap = items.base(source, header[0])
    if snap is None or indent != snap.indent:
        raise Unsupported  # nothing to reuse: the full parse is faster
    old, ob = snap.data, snap.body
    olen, nlen = len(old) - ob, len(data) - body
    p = _common_prefix(old, ob, data, body, min(olen, nlen))
    s = _common_suffix(old, data, min(olen, nlen) - p)
    marker = b"\n" + b" " * indent + b"- "
    # items in the common front and back: the old body holds one marker per item but the first
    # (`Snapshot`), so only the smaller side and the part between are counted (a change near
    # either end costs that end, not a count of the whole file)
    cut = len(old) - s
    others = old.count(marker, ob + p, cut) + _straddles(old, marker, ob + p, ob) + _straddles(old, marker, cut, ob)
    if p <= s:
        front = old.count(marker, ob, ob + p)
        back = len(snap.orders) - 1 - front - others
    else:
        back = old.count(marker, cut)
        front = len(snap.orders) - 1 - back - others
    start = old.rfind(marker, ob, ob + p) + 1 - ob if front else 0  # body offset of the first item between
    old_end = old.find(marker, len(old) - s) + 1 - ob if back else olen
    new_end = old_end - olen + nlen
    n_old = len(snap.orders)
    between = n_old - front - back
    if between < 1 or new_end < start:
        raise Unsupported  # not the file this snapshot describes (cannot happen: it was checked)
    old_orders = snap.orders[front:front + between]
    old_nodes = snap.nodes[front:front + between]
    # walk the items between from the front: a run of equal bytes (memcmp) gives back the old
    # items wholly inside it; the item where they differ is read now, and the walk goes on
    # after it on both sides (a change in place costs one step, wherever it is)
    mid_orders: list[Order | None] = []
    mid_nodes: list[int] = []
    misses: list[int] = []
    texts: list[bytes] = []
    a = b = start
    j = 0
    while a < old_end and b < new_end and len(misses) < _WALK:
        same = _common_prefix(old, ob + a, data, body + b, min(old_end - a, new_end - b))
        if same == old_end - a == new_end - b:  # the rest is equal
            mid_orders += old_orders[j:]
            mid_nodes += old_nodes[j:]
            j, a, b = between, old_end, new_end
            break
        k = old.count(marker, ob + a, ob + a + same)
        if k:
            at = old.rfind(marker, ob + a, ob + a + same) + 1 - ob
            mid_orders += old_orders[j:j + k]
            mid_nodes += old_nodes[j:j + k]
            j += k
            b += at - a
            a = at
        e = old.find(marker, ob + a, ob + old_end)
        a_next = e + 1 - ob if e >= 0 else old_end
        e = data.find(marker, body + b, body + new_end)
        b_next = e + 1 - body if e >= 0 else new_end
        r = min(_RESYNC, old_end - a_next, new_end - b_next)
        if not r or old[ob + a_next:ob + a_next + r] != data[body + b_next:body + b_next + r]:
            break  # not a change in place (an item added, removed or moved; the last item): matched by bytes
        misses.append(len(mid_orders))
        mid_orders.append(None)
        mid_nodes.append(0)
        texts.append(data[body + b:body + b_next])  # the item as it stands in the file
        a, b = a_next, b_next
        j += 1  # the old item there is replaced
    if b < new_end:
        rest = _rest(old[ob + a:ob + old_end] if a < old_end else b"", data[body + b:body + new_end], marker,
                     old_orders[j:], old_nodes[j:])
        misses += [len(mid_orders) + i for i in rest[2]]
        mid_orders += rest[0]
        mid_nodes += rest[1]
        texts += rest[3]
    fresh: list[Order] = []
    if misses:
        fresh, fresh_nodes = _recognise(_body_text(b"".join(texts)), indent, max_depth)
        if len(fresh) != len(misses):
            raise Unsupported
        for i, o, k in zip(misses, fresh, fresh_nodes):
            mid_orders[i] = o
            mid_nodes[i] = k
    orders = snap.orders[:front] + tuple(mid_orders) + snap.orders[n_old - back:]  # type: ignore[operator]
    nodes = snap.nodes[:front] + tuple(mid_nodes) + snap.nodes[n_old - back:]
    node_total = snap.node_total - sum(snap.nodes[front:n_old - back]) + sum(mid_nodes)
    if not orders or head_nodes + 1 + node_total > max_nodes:
        raise Unsupported
    # ids: the old file's were distinct and each old order is taken at most once (by place, or
    # from the index of the rest, whose keys are distinct bytes); so the new ids are distinct
    # when the fresh orders' are and none of them is the id of an old order kept (the old
    # file's ids are held per snapshot, derived from the last one's in proportion to the change)
    fresh_ids = set(map(_order_id, fresh))
    ids = snap.ids if snap.ids is not None else Layered.adopt(dict.fromkeys(map(_order_id, snap.orders)))
    kept = set(map(id, mid_orders))
    dropped = {o.id for o in old_orders if id(o) not in kept}
    if len(fresh_ids) != len(fresh) or any(f in ids and f not in dropped for f in fresh_ids):
        raise Unsupported  # a duplicate order id: the general path names both
    policy = Policy(issuer=header[0], serial=header[1], issued_at=header[2], not_before=header[3],
                    not_after=header[4], orders=orders, digest=digest, source=source, signers=signers)
    new_snap = Snapshot(data, header[0], body, indent, policy.orders, nodes, node_total,
                        ids.derive(dict.fromkeys(fresh_ids), dropped))
    items.add(source, new_snap)
    return Parsed(policy, new_snap)


def _straddles(data: bytes, marker: bytes, at: int, lo: int) -> int:
    """1 if an occurrence of `marker` (which cannot overlap itself) starts before `at` and ends
    after it (no count of either side holds it), else 0; `lo`: where the searched text begins."""
    m = len(marker)
    return 1 if data.find(marker, max(lo, at - m + 1), at + m - 1) >= 0 else 0


def _nodes(o: Order) -> int:
    """An upper bound of the YAML nodes an item of this order has (every optional key present)."""
    t = o.targets
    return 40 + len(t.services) + len(t.domains) + len(t.cidrs) + len(t.asns) + 7 * len(o.allow_collateral)


Header = tuple[str, int, datetime, datetime, datetime]


def _policy(h: Header, orders: list[Order], digest: str, source: str, signers: tuple[str, ...]) -> Policy:
    return Policy(issuer=h[0], serial=h[1], issued_at=h[2], not_before=h[3], not_after=h[4], orders=tuple(orders),
                  digest=digest, source=source, signers=signers)


def _header(doc: dict[str, object], seen: list[int]) -> Header:
    keys = doc.keys()
    if not (keys <= _TOP_ALLOWED and keys >= _TOP_REQUIRED):
        raise Unsupported
    seen[0] += len(doc) + fastyaml.count_keys(doc.get("description"))
    issuer = doc["issuer"]
    if type(issuer) is not str or not _ISSUER.fullmatch(issuer):
        raise Unsupported
    serial = doc["serial"]
    if type(serial) is not str or not _INT.fullmatch(serial) or len(serial.lstrip("+-")) > MAX_INT_DIGITS:
        raise Unsupported
    number = int(serial)
    if number < 1:
        raise Unsupported
    times: dict[str, datetime] = {}
    issued_at, not_before, not_after = (_time(doc[k], times) for k in ("issued_at", "not_before", "not_after"))
    if not not_before < not_after:
        raise Unsupported
    return issuer, number, issued_at, not_before, not_after


def _time(value: object, memo: dict[str, datetime]) -> datetime:
    if type(value) is not str:
        raise Unsupported
    when = memo.get(value)
    if when is None:
        try:
            parsed = datetime.fromisoformat(value)
        except ValueError:
            raise Unsupported from None
        if parsed.tzinfo is None:
            raise Unsupported
        when = memo[value] = parsed.astimezone(timezone.utc)
    return when


def _text(value: object) -> str:
    if type(value) is not str or not value:
        raise Unsupported
    return value


def _list(value: object) -> list[object]:
    """A list as `Reader.items` reads it: absent or a null-like scalar is empty."""
    if value is None or (type(value) is str and value in _NULLS):
        return []
    if type(value) is not list:
        raise Unsupported
    return value


def order(m: object, seen: list[int], times: dict[str, datetime]) -> Order:
    """One order, exactly as `policy._order` builds it, or Unsupported for anything it would refuse."""
    if type(m) is not dict:
        raise Unsupported
    keys = m.keys()
    if not (keys <= _ORDER_ALLOWED and keys >= _ORDER_REQUIRED):
        raise Unsupported
    oid = m["id"]
    if type(oid) is not str or not _ORDER_ID.fullmatch(oid):
        raise Unsupported
    lb = m["legal_basis"]
    if type(lb) is not dict:
        raise Unsupported
    lbk = lb.keys()
    if not (lbk <= _BASIS_ALLOWED and lbk >= _BASIS_REQUIRED):
        raise Unsupported
    url = lb.get("url")
    if url is not None:
        if type(url) is not str:
            raise Unsupported
        if url in _NULLS:
            url = None
    basis = _make_basis(_text(lb["authority"]), _same_text(_text(lb["reference"]), oid), url)
    action = m["action"]
    if type(action) is not str or action not in _ACTIONS:
        raise Unsupported
    deadline = _time(m["deadline"], times) if "deadline" in m else None
    dns_answer = m.get("dns_answer")
    if dns_answer is not None and (type(dns_answer) is not str or dns_answer not in _DNS_ANSWERS):
        raise Unsupported
    t = m["targets"]
    if type(t) is not dict or not t.keys() <= _TARGETS_ALLOWED:
        raise Unsupported
    n = len(m) + len(lb) + len(t)
    get = t.get
    v = get("services")
    services = [] if v is None else _list(v)
    for s in services:
        if type(s) is not str or not _SERVICE.fullmatch(s):
            raise Unsupported
    v = get("domains")
    domains = [] if v is None else _list(v)
    for d in domains:
        if type(d) is not str:
            raise Unsupported
    names = [d if len(d) <= MAX_NAME and _CANONICAL_NAME.fullmatch(d) else _domain(d) for d in cast(list[str], domains)]
    cidrs = []
    v = get("cidrs")
    for c in [] if v is None else _list(v):
        if type(c) is not str:
            raise Unsupported
        try:
            cidrs.append(ranges.parse_cidr(c))
        except ValueError:
            raise Unsupported from None
    asns = []
    v = get("asns")
    for a in [] if v is None else _list(v):
        if type(a) is not str:
            raise Unsupported
        try:
            asns.append(parse_asn(a))
        except ValueError:
            raise Unsupported from None
    if not (services or names or cidrs or asns):
        raise Unsupported
    allow: tuple[AllowCollateral, ...] = ()
    if "allow_collateral" in m:
        entries = []
        for e in _list(m["allow_collateral"]):
            if type(e) is not dict or e.keys() != _ALLOW_KEYS:
                raise Unsupported
            n += 3
            rule, guard, reason = _text(e["rule"]), e["guard"], _text(e["reason"])
            if type(guard) is not str or guard not in _GUARDS:
                raise Unsupported
            if rule != "*":
                try:
                    rule = canonical_rule(rule)
                except ValueError:
                    raise Unsupported from None
            entries.append(AllowCollateral(rule, guard, reason))
        allow = tuple(entries)
    seen[0] += n
    return _make_order(oid, basis, action, _make_targets(tuple(services), tuple(names), tuple(cidrs), tuple(asns)),  # type: ignore[arg-type]
                       deadline, allow, dns_answer)


def _domain(text: str) -> str:
    try:
        return parse_domain(text)
    except ValueError:
        raise Unsupported from None
