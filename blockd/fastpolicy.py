"""Policy bytes -> Policy without the general parser, when nothing is in doubt; and per order.

The fast path of `policy.parse_policy`, in two steps:

    fastyaml.load (the common line shapes) -> build (the schema's checks, without a Reader)

`build` makes exactly the Policy the general path makes, and refuses nothing itself: any
value the schema would refuse, any shape it does not know, raises `Unsupported`, and the
general path runs and reports every problem with its line (errors are rare; exact messages
matter more than their speed).

A new serial of a large registry is mostly the same text: `Items` keeps each order by the
exact bytes of its item (the `  - id: ...` block of the top-level `orders` list), so
`incremental` re-reads only the items whose bytes changed and reuses the Order objects of the
rest (the same objects: the per-order expansion cache keys on them). It applies only when the
file is a header, the `orders:` line and the items, nothing after them; an item boundary is a
line `<indent>- ` at the list's indent, which the fast reader guarantees (it takes no
construct that spans lines, so a changed item can never swallow or split a neighbour);
anything else, including a duplicate id across items, goes to the full parse.
"""

from __future__ import annotations

import dataclasses
import re
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import cast

from blockd import fastyaml, ranges, trust
from blockd.fastyaml import Unsupported
from blockd.model import DNS_ANSWERS, GUARDS, AllowCollateral, LegalBasis, Order, Policy, Targets
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


@dataclass
class Items:
    """Orders by the exact bytes of their item, per list indent. Bounded by the caller
    (`keep`): only the items of files still present stay."""

    by_indent: dict[int, dict[bytes, tuple[Order, int, bytes]]] = field(default_factory=dict)

    def keep(self, files: list[tuple[int, list[bytes]]]) -> None:
        """Keep only the items of these files ((indent, item keys) each)."""
        kept: dict[int, dict[bytes, tuple[Order, int, bytes]]] = {}
        for indent, keys in files:
            old = self.by_indent.get(indent, {})
            new = kept.setdefault(indent, {})
            for k in keys:
                if k in old:
                    new[k] = old[k]
        self.by_indent = kept

    def __len__(self) -> int:
        return sum(len(d) for d in self.by_indent.values())


@dataclass(frozen=True, slots=True)
class Parsed:
    policy: Policy
    #: (indent, item keys) when the items are in the cache, for `Items.keep`
    items: tuple[int, list[bytes]] | None = None


def parse(data: bytes, text: str | None, source: str, *, signers: tuple[str, ...], digest: str,
          max_depth: int, max_nodes: int, items: Items | None) -> Parsed:
    """The Policy, or Unsupported. `text` is the decoded file (None: decode only what is read)."""
    if items is not None:
        try:
            return incremental(data, source, signers=signers, digest=digest, max_depth=max_depth,
                               max_nodes=max_nodes, items=items)
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
    cached = _remember(data, orders, items) if items is not None and next(reversed(doc)) == "orders" else None
    return Parsed(policy, cached)


def _split(data: bytes) -> tuple[bytes, int, list[bytes]]:
    """(header up to and with the `orders:` line, the items' indent, each item without its
    `<indent>- ` prefix), or Unsupported when the file does not have that shape."""
    if data.startswith(b"orders:"):
        at = 0
    else:
        at = data.find(b"\norders:") + 1
        if at == 0:
            raise Unsupported
    end = data.find(b"\n", at)
    if end < 0 or data[at:end] != b"orders:":
        raise Unsupported
    body = data[end + 1:]
    indent = len(body) - len(body.lstrip(b" "))
    prefix = b" " * indent + b"- "
    if not body.startswith(prefix):
        raise Unsupported
    chunks = body.split(b"\n" + prefix)
    chunks[0] = chunks[0][len(prefix):]
    if chunks[-1].endswith(b"\n"):
        chunks[-1] = chunks[-1][:-1]  # the last item, like the others, without the newline before the next
    return data[:end + 1], indent, chunks


def _remember(data: bytes, orders: list[Order], items: Items) -> tuple[int, list[bytes]] | None:
    """After a full parse: file the orders under their items' bytes, when the split finds
    exactly one item per order (then item i is order i: the reader took every line)."""
    try:
        _, indent, chunks = _split(data)
    except Unsupported:
        return None
    if len(chunks) != len(orders):
        return None
    cache = items.by_indent.setdefault(indent, {})
    for chunk, o in zip(chunks, orders):
        cache[chunk] = (o, _nodes(o), chunk)
    return indent, chunks


def incremental(data: bytes, source: str, *, signers: tuple[str, ...], digest: str, max_depth: int,
                max_nodes: int, items: Items) -> Parsed:
    """Parse only the items whose bytes are not in `items`; the rest are the cached Orders."""
    head, indent, chunks = _split(data)
    if not items.by_indent.get(indent) or data.startswith(b"\xef\xbb\xbf"):
        raise Unsupported  # nothing to reuse: the full parse is faster
    try:
        head_text = head.decode("utf-8")
    except UnicodeDecodeError:
        raise Unsupported from None
    reader_doc, keys, head_nodes = fastyaml.load(head_text, max_depth=max_depth, max_nodes=max_nodes)
    seen = [0]
    header = _header(reader_doc, seen)
    if reader_doc["orders"] != "" or next(reversed(reader_doc)) != "orders" or seen[0] != keys:
        raise Unsupported
    cache = items.by_indent[indent]
    hits = list(map(cache.get, chunks))
    if None in hits:
        prefix = " " * indent + "- "
        times: dict[str, datetime] = {}
        for i, hit in enumerate(hits):
            if hit is None:
                chunk = chunks[i]
                try:
                    text = prefix + chunk.decode("utf-8")
                except UnicodeDecodeError:
                    raise Unsupported from None
                item, nodes, item_keys = fastyaml.load_item(text, max_depth=max_depth)
                counted = [0]
                o = order(item, counted, times)
                if counted[0] != item_keys:
                    raise Unsupported
                hits[i] = cache[chunk] = (o, nodes, chunk)
    found = cast(list[tuple[Order, int, bytes]], hits)  # every miss was filled in above
    orders = [h[0] for h in found]
    if sum(h[1] for h in found) + head_nodes + 1 > max_nodes:
        raise Unsupported
    if len({o.id for o in orders}) != len(orders):
        raise Unsupported
    return Parsed(_policy(header, orders, digest, source, signers), (indent, [h[2] for h in found]))


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
    basis = _make_basis(_text(lb["authority"]), _text(lb["reference"]), url)
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
