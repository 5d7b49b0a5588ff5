"""Real-world blocklists -> policy YAML text (the regulator policy format `policy.py` reads).

Two inputs:

* `zi_to_policy`: a zapret-info/z-i registry dump (`Updated: ...` line, then
  `ip;domain;url;org;number;date` rows in cp1251). Rows are grouped into one order per
  decision, keyed by (org, number): the authority and its decision reference.
* `list_to_policy`: a plain one-entry-per-line list (domains or CIDRs, `#` comments), such as
  the Re:filter or antifilter lists, as a single order.

Pure: bytes/lines in, text out; no clock, files or logging. A value that cannot be used as it
stands (a malformed address, host bits set, an invalid name) is skipped and reported, never
repaired: widening `1.2.3.4/24` to `1.2.3.0/24` or narrowing it to `1.2.3.4/32` could block the
wrong addresses. URLs are not imported (blockd blocks names and addresses, not URLs), and the
public-suffix and shared-infrastructure guards are left to the policy compiler, which reports
them per rule.
"""

from __future__ import annotations

import csv
import hashlib
import re
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

import yaml

from blockd.names import display, normalise
from blockd.ranges import CidrSyntaxError, parse_cidr

__all__ = ["Imported", "list_to_policy", "normalise_domain", "zi_to_policy"]

_ZI_FIELDS = ("ip", "domain", "url", "org", "number", "date")
_ID_MAX = 64


@dataclass(frozen=True, slots=True)
class Imported:
    """The policy text plus what went into it.

    `domains` and `cidrs` count targets summed over orders (an entry named by two orders counts
    twice); `skipped` holds one human-readable line per unusable value or row.
    """

    policy_yaml: str
    orders: int
    domains: int
    cidrs: int
    skipped: tuple[str, ...]


# libyaml's emitter when present (a 50k-target policy takes seconds in the pure-Python one);
# the representer, and so the output, is the same SafeRepresenter either way.
_SafeDumper: type[yaml.SafeDumper] = getattr(yaml, "CSafeDumper", yaml.SafeDumper)


class _Dumper(_SafeDumper):  # type: ignore[valid-type,misc]
    """SafeDumper that writes datetimes as ISO 8601 (`2026-11-29T12:00:00Z`) and never aliases."""

    def ignore_aliases(self, data: Any) -> bool:
        return True


def _represent_datetime(dumper: yaml.SafeDumper, value: datetime) -> yaml.ScalarNode:
    if value.utcoffset() == timedelta(0):
        text = value.replace(tzinfo=None).isoformat() + "Z"
    else:
        text = value.isoformat()
    return dumper.represent_scalar("tag:yaml.org,2002:timestamp", text)


_Dumper.add_representer(datetime, _represent_datetime)


def normalise_domain(raw: str) -> str:
    """`'*.Пример.РФ.'` -> `'*.xn--e1afmkfd.xn--p1ai'`; raises ValueError saying what is wrong.

    The same rules as policy files (`blockd.names.normalise`), so an imported list loads back.
    """
    return display(*normalise(raw))


def _timestamps(issued_at: datetime, not_before: datetime, not_after: datetime) -> None:
    for key, value in (("issued_at", issued_at), ("not_before", not_before), ("not_after", not_after)):
        if value.utcoffset() is None:
            raise ValueError(f"{key}: {value!r} has no timezone; pass an aware datetime")
    if not not_before < not_after:
        raise ValueError(f"not_before {not_before} is not before not_after {not_after}")


class _Order:
    __slots__ = ("authority", "domains", "cidrs", "id", "reference", "url")

    def __init__(self, order_id: str, authority: str, reference: str, url: str | None) -> None:
        self.id, self.authority, self.reference, self.url = order_id, authority, reference, url
        self.domains: dict[str, None] = {}  # insertion-ordered set
        self.cidrs: dict[str, None] = {}

    def as_dict(self, action: str) -> dict[str, Any]:
        targets: dict[str, Any] = {}
        if self.domains:
            targets["domains"] = list(self.domains)
        if self.cidrs:
            targets["cidrs"] = list(self.cidrs)
        return {
            "id": self.id,
            "legal_basis": {"authority": self.authority, "reference": self.reference, "url": self.url},
            "action": action,
            "targets": targets,
        }


def _render(
    orders: list[_Order],
    skipped: list[str],
    *,
    issuer: str,
    serial: int,
    issued_at: datetime,
    not_before: datetime,
    not_after: datetime,
    action: str = "block",
) -> Imported:
    doc = {
        "issuer": issuer,
        "serial": serial,
        "issued_at": issued_at,
        "not_before": not_before,
        "not_after": not_after,
        "orders": [o.as_dict(action) for o in orders],
    }
    text = yaml.dump(
        doc, Dumper=_Dumper, sort_keys=False, allow_unicode=True, default_flow_style=False, width=4096
    )
    return Imported(
        policy_yaml=text,
        orders=len(orders),
        domains=sum(len(o.domains) for o in orders),
        cidrs=sum(len(o.cidrs) for o in orders),
        skipped=tuple(skipped),
    )


def _order_id(number: str) -> str:
    """`'27-31-2018/Ид1433-18'` -> `'zi-27-31-2018-1433-18'` (ASCII letters, digits and `-`)."""
    slug = re.sub(r"[^a-z0-9]+", "-", number.lower()).strip("-")[:_ID_MAX].strip("-")
    return "zi-" + (slug or hashlib.sha256(number.encode()).hexdigest()[:12])


def zi_to_policy(
    csv_bytes: bytes,
    *,
    issuer: str,
    serial: int,
    issued_at: datetime,
    not_before: datetime,
    not_after: datetime,
) -> Imported:
    """A z-i dump -> a policy with one `block` order per (org, number).

    `ip` may hold several addresses or prefixes separated by `|` (IPv4 and IPv6; a bare address
    is a /32 or /128); `domain` may be empty, a `*.` wildcard, or a Unicode IDN. Order ids are
    `zi-<number>` reduced to ASCII letters, digits and `-`; when two decisions reduce to the same
    id, the later one gets a short hash of (org, number) appended. Order of orders and of their
    targets is first appearance in the dump, duplicates removed.
    """
    _timestamps(issued_at, not_before, not_after)
    text = csv_bytes.decode("cp1251")
    lines = text.splitlines()
    start = 1 if lines and lines[0].startswith("Updated:") else 0
    orders: dict[tuple[str, str], _Order] = {}
    ids: set[str] = set()
    skipped: list[str] = []
    for lineno, row in enumerate(csv.reader(lines[start:], delimiter=";", quotechar='"'), start + 1):
        if not row:
            continue
        where = f"line {lineno}"
        if len(row) != len(_ZI_FIELDS):
            skipped.append(f"{where}: {len(row)} fields; expected 6 ({';'.join(_ZI_FIELDS)})")
            continue
        ip_field, domain_field, _url, org, number, _date = (f.strip() for f in row)
        if not org or not number:
            skipped.append(f"{where}: no authority (org) or decision number; cannot form an order")
            continue
        cidrs: list[str] = []
        for part in ip_field.split("|"):
            part = part.strip()
            if not part:
                continue
            try:
                cidrs.append(str(parse_cidr(part)))
            except CidrSyntaxError as e:
                skipped.append(f"{where}: ip {part!r}: {e}")
        domain = None
        if domain_field:
            try:
                domain = normalise_domain(domain_field)
            except ValueError as e:
                skipped.append(f"{where}: domain {domain_field!r}: {e}")
        if not cidrs and domain is None:
            if not ip_field and not domain_field:
                skipped.append(f"{where}: no ip and no domain")
            continue
        key = (org, number)
        order = orders.get(key)
        if order is None:
            order_id = _order_id(number)
            if order_id in ids:
                order_id += "-" + hashlib.sha256(f"{org}\0{number}".encode()).hexdigest()[:8]
            ids.add(order_id)
            order = orders[key] = _Order(order_id, org, number, None)
        if domain is not None:
            order.domains[domain] = None
        for c in cidrs:
            order.cidrs[c] = None
    return _render(
        list(orders.values()),
        skipped,
        issuer=issuer,
        serial=serial,
        issued_at=issued_at,
        not_before=not_before,
        not_after=not_after,
    )


def list_to_policy(
    lines: Iterable[str],
    *,
    issuer: str,
    serial: int,
    issued_at: datetime,
    not_before: datetime,
    not_after: datetime,
    order_id: str,
    authority: str,
    reference: str,
    url: str | None = None,
    action: str = "block",
    subtree: bool = False,
) -> Imported:
    """A one-entry-per-line list -> a policy with one order holding every entry.

    An entry is a CIDR or bare address if it parses as one, else a domain (`*.name` for a
    subtree). `#` starts a comment; blank lines are ignored. With `subtree=True` a plain name
    also covers everything below it, which is how suffix-matching lists (Re:filter's
    `domains_all.lst`, used as sing-box `domain_suffix`) are meant; the default is the exact name.
    """
    _timestamps(issued_at, not_before, not_after)
    if action not in ("block", "unblock"):
        raise ValueError(f"action {action!r}; valid: block, unblock")
    order = _Order(order_id, authority, reference, url)
    skipped: list[str] = []
    for lineno, raw in enumerate(lines, 1):
        entry = raw.split("#", 1)[0].strip()
        if not entry:
            continue
        if ":" in entry or entry[0].isdigit():
            try:
                order.cidrs[str(parse_cidr(entry))] = None
                continue
            except CidrSyntaxError as e:
                if ":" in entry or "/" in entry:
                    skipped.append(f"line {lineno}: {entry!r}: {e}")
                    continue
        try:
            name = normalise_domain(entry)
        except ValueError as e:
            skipped.append(f"line {lineno}: {entry!r}: {e}")
            continue
        if subtree and not name.startswith("*."):
            name = "*." + name
        order.domains[name] = None
    orders = [order] if order.domains or order.cidrs else []
    return _render(
        orders,
        skipped,
        issuer=issuer,
        serial=serial,
        issued_at=issued_at,
        not_before=not_before,
        not_after=not_after,
        action=action,
    )
