"""Real-world blocklists -> policy YAML text (the regulator policy format `policy.py` reads).

Three inputs:

* `zi_to_policy`: a zapret-info/z-i registry dump (`Updated: ...` line, then
  `ip;domain;url;org;number;date` rows in cp1251). Rows are grouped into one order per
  decision, keyed by (org, number): the authority and its decision reference.
* `list_to_policy`: a plain one-entry-per-line list (domains or CIDRs, `#` comments), such as
  the Re:filter or antifilter lists, as a single order.
* `piracy_shield_to_policy`: Piracy Shield's FQDN / IPv4 / IPv6 exports (JSON or text) of a
  ticket, as one order; `ps_check_checksum` checks them against the API's SHA-256 first.

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
import json
import re
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime, timedelta
from typing import Any

import yaml

from blockd.names import display, normalise
from blockd.ranges import CidrSyntaxError, parse_cidr

__all__ = ["ChecksumError", "Imported", "list_to_policy", "normalise_domain", "piracy_shield_to_policy",
           "ps_check_checksum", "ps_entries", "skipped_summary", "zi_to_policy"]

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
    syntax: str = "plain",
) -> Imported:
    """A one-entry-per-line list -> a policy with one order holding every entry.

    `plain`: an entry is a CIDR or bare address if it parses as one, else a domain (`*.name` for
    a subtree); `#` starts a comment; blank lines are ignored. With `subtree=True` a plain name
    also covers everything below it, which is how suffix-matching lists (Re:filter's
    `domains_all.lst`, used as sing-box `domain_suffix`) are meant; the default is the exact name.

    The same lists are also published wrapped for a tool, and `syntax` says which (it is never
    guessed): `clash` (`IP-CIDR,<prefix>[,no-resolve]`, `IP-CIDR6,…`, `DOMAIN,<name>` exact,
    `DOMAIN-SUFFIX,<name>` subtree; other rule types are reported) or `dnsmasq`
    (`server=/<name>/…/…`, `address=`, `ipset=`, `nftset=`, `local=`: each name with its subtree,
    as dnsmasq matches them).
    """
    _timestamps(issued_at, not_before, not_after)
    if action not in ("block", "unblock"):
        raise ValueError(f"action {action!r}; valid: block, unblock")
    if syntax not in LIST_SYNTAXES:
        raise ValueError(f"syntax {syntax!r}; valid: {', '.join(LIST_SYNTAXES)}")
    order = _Order(order_id, authority, reference, url)
    skipped: list[str] = []
    for lineno, raw in enumerate(lines, 1):
        entries, problem = _unwrap(raw, syntax)
        if problem:
            skipped.append(f"line {lineno}: {raw.strip()[:200]!r}: {problem}")
        for entry, kind in entries:
            where = f"line {lineno}: {entry!r}"
            if kind == "cidr" or (kind is None and (":" in entry or entry[0].isdigit())):
                try:
                    order.cidrs[str(parse_cidr(entry))] = None
                    continue
                except CidrSyntaxError as e:
                    if kind == "cidr" or ":" in entry or "/" in entry:
                        skipped.append(f"{where}: {e}")
                        continue
            try:
                name = normalise_domain(entry)
            except ValueError as e:
                skipped.append(f"{where}: {e}")
                continue
            if (kind == "subtree" or (kind is None and subtree)) and not name.startswith("*."):
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


LIST_SYNTAXES = ("plain", "clash", "dnsmasq")
_CLASH = {"IP-CIDR": "cidr", "IP-CIDR6": "cidr", "DOMAIN": "exact", "DOMAIN-SUFFIX": "subtree"}
_DNSMASQ = ("server", "address", "ipset", "nftset", "local")


def _unwrap(raw: str, syntax: str) -> tuple[list[tuple[str, str | None]], str | None]:
    """One line -> ([(entry, kind)], problem). kind: cidr, exact, subtree, or None (plain: by form)."""
    if syntax == "plain":
        entry = raw.split("#", 1)[0].strip()
        return ([(entry, None)] if entry else []), None
    line = raw.strip()
    if not line or line.startswith("#"):
        return [], None
    if syntax == "clash":
        parts = [p.strip() for p in line.split(",")]
        if parts[0] not in _CLASH:
            return [], f"Clash rule type {parts[0]!r} is not a name or prefix; usable: {', '.join(_CLASH)}"
        if len(parts) < 2 or not parts[1] or (len(parts) > 2 and parts[2:] != ["no-resolve"]):
            return [], "expected TYPE,VALUE or TYPE,VALUE,no-resolve"
        return [(parts[1], _CLASH[parts[0]])], None
    key, eq, rest = line.partition("=")
    if not eq or key.strip() not in _DNSMASQ or not rest.startswith("/"):
        return [], f"not a dnsmasq domain option ({', '.join(o + '=/name/…' for o in _DNSMASQ)})"
    names = rest.split("/")[1:-1]
    if not names or any(not n for n in names):
        return [], "expected /name/[name/…] before the target"
    return [(n, "subtree") for n in names], None


# -- Piracy Shield (AGCOM, Italy) ------------------------------------------------------------
#
# Its API hands providers three lists per ticket, or across all tickets: FQDNs, IPv4 and IPv6
# addresses. Each comes as JSON (`{"status": "success", "data": [...]}`) or as text (one entry a
# line, joined by "\n"), and a checksum endpoint gives the SHA-256 of the "\n"-joined list. The
# kind of each list is known from which export it is: an entry of the wrong kind (an address in
# the FQDN list) is reported, never moved to the other list.

PS_KINDS = ("fqdn", "ipv4", "ipv6")


class ChecksumError(ValueError):
    """The list does not match the checksum given for it: nothing is imported from it."""


def ps_entries(data: bytes, where: str) -> list[str]:
    """A Piracy Shield list export (JSON envelope, bare JSON list, or text) -> its entries, in order."""
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError as e:
        raise ValueError(f"{where}: not UTF-8 (byte {e.start}); Piracy Shield exports are UTF-8") from None
    head = text.lstrip()[:1]
    if head in ("{", "["):
        try:
            doc = json.loads(text)
        except ValueError as e:
            raise ValueError(f"{where}: looks like JSON but does not parse: {e}") from None
        if isinstance(doc, dict):
            if doc.get("status") != "success" or "data" not in doc:
                raise ValueError(f"{where}: JSON object without status 'success' and data "
                                 f"(status {doc.get('status')!r}, message {doc.get('message')!r})")
            doc = doc["data"]
        if not isinstance(doc, list) or not all(isinstance(x, str) for x in doc):
            raise ValueError(f"{where}: expected a list of strings in 'data'")
        return list(doc)
    return text.split("\n")


def ps_check_checksum(data: bytes, entries: list[str], checksum: bytes, where: str) -> str:
    """Raise ChecksumError unless `checksum` (hex, `sha256sum` line, or the API's JSON envelope)
    is the SHA-256 of the entries joined by "\\n" (what the API hashes) or of the file's bytes.
    Returns which of the two matched."""
    raw = checksum.decode("utf-8", errors="replace").strip()
    if raw.startswith("{"):
        try:
            raw = str(json.loads(raw).get("data", ""))
        except (ValueError, AttributeError):
            raise ChecksumError(f"{where}: checksum file is neither hex nor the API's JSON envelope") from None
    given = raw.split()[0].lower() if raw.split() else ""
    if not re.fullmatch(r"[0-9a-f]{64}", given):
        raise ChecksumError(f"{where}: checksum {given[:80]!r} is not a SHA-256 (64 hex digits)")
    # The API hashes the entries joined by "\n"; a text export saved with a final newline has an
    # empty last entry, which the API never had.
    joined = hashlib.sha256("\n".join(entries).rstrip("\n").encode()).hexdigest()
    if given == joined:
        return "entries"
    if given == hashlib.sha256(data).hexdigest():
        return "file"
    raise ChecksumError(f"{where}: SHA-256 mismatch: the checksum file says {given}, the list's entries hash to "
                        f"{joined} and the file's bytes to {hashlib.sha256(data).hexdigest()}; refusing the list")


def piracy_shield_to_policy(
    lists: Iterable[tuple[str, str, list[str]]],
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
) -> Imported:
    """`(kind, where, entries)` lists (kind in fqdn, ipv4, ipv6) -> one order holding them all
    (a ticket is one order). Blank lines are ignored; every other unusable entry is reported as
    `where:line N: ...`."""
    _timestamps(issued_at, not_before, not_after)
    order = _Order(order_id, authority, reference, url)
    skipped: list[str] = []
    for kind, where, entries in lists:
        if kind not in PS_KINDS:
            raise ValueError(f"{where}: list kind {kind!r}; valid: {', '.join(PS_KINDS)}")
        for lineno, raw in enumerate(entries, 1):
            entry = raw.strip()
            if not entry:
                continue
            at = f"{where}:line {lineno}: {entry!r}"
            if kind == "fqdn":
                try:
                    order.domains[normalise_domain(entry)] = None
                except ValueError as e:
                    skipped.append(f"{at}: {e}")
                continue
            try:
                net = parse_cidr(entry)
            except CidrSyntaxError as e:
                skipped.append(f"{at}: {e}")
                continue
            version = 6 if ":" in str(net) else 4
            if f"ipv{version}" != kind:
                skipped.append(f"{at}: an IPv{version} entry in the IPv{kind[-1]} list; not moved to the other list")
                continue
            order.cidrs[str(net)] = None
    return _render([order] if order.domains or order.cidrs else [], skipped, issuer=issuer, serial=serial,
                   issued_at=issued_at, not_before=not_before, not_after=not_after)


def skipped_summary(skipped: Iterable[str]) -> dict[str, int]:
    """Counts of skipped lines by reason, the reason being the message with the value removed
    (`line 3: '1.2.3.4/24': host bits set in ...` -> `host bits set`)."""
    out: dict[str, int] = {}
    for line in skipped:
        reason = re.sub(r"'[^']*'|\"[^\"]*\"", "…", line.rsplit(": ", 1)[-1])
        reason = re.sub(r"\d+", "N", reason)[:80]
        out[reason] = out.get(reason, 0) + 1
    return dict(sorted(out.items(), key=lambda kv: (-kv[1], kv[0])))
