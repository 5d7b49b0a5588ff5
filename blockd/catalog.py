"""Signed service catalog and prefix-to-origin table -> Catalog.

    policies/catalog/<service>.yaml (+ .minisig)   service, description, sources, domains, cidrs, asns
    policies/asn/prefix2as.txt      (+ .minisig)   "<prefix> <asn>" per line, '#' comments

Both change what gets blocked, so both are verified (role `catalog`) before they are parsed.
"""

from __future__ import annotations

from pathlib import Path
from types import MappingProxyType

from blockd import ranges, strictyaml, trust
from blockd.errors import CatalogError, InputError, Problem, raise_problems
from blockd.model import Catalog, Cidr, Service
from blockd.policy import SERVICE_NAME, read_signed, targets_of
from blockd.schema import Reader

MAX_CATALOG_BYTES = 16 << 20


def load_catalog(directory: Path, prefix_table: Path | None, store: trust.TrustStore) -> Catalog:
    services: dict[str, Service] = {}
    for path in sorted(directory.glob("*.yaml")):
        try:
            data, _ = read_signed(path, store, role="catalog", max_bytes=MAX_CATALOG_BYTES)
        except InputError as e:
            raise CatalogError(e.message, where=e.where) from None
        svc = parse_service(data, str(path))
        if svc.name != path.stem:
            raise CatalogError(f"service {svc.name!r} must live in {svc.name}.yaml", where=str(path))
        services[svc.name] = svc
    if not services:
        raise CatalogError("no *.yaml service files", where=str(directory))
    asn_prefixes: dict[int, tuple[Cidr, ...]] = {}
    if prefix_table is not None:
        try:
            data, _ = read_signed(prefix_table, store, role="catalog", max_bytes=MAX_CATALOG_BYTES)
        except InputError as e:
            raise CatalogError(e.message, where=e.where) from None
        asn_prefixes = parse_prefix_table(data, str(prefix_table))
    return Catalog(MappingProxyType(services), MappingProxyType(asn_prefixes))


def parse_service(data: bytes, source: str) -> Service:
    try:
        doc = strictyaml.load(data, source, max_bytes=MAX_CATALOG_BYTES)
    except InputError as e:
        raise CatalogError(e.message, where=e.where) from None
    r = Reader(source)
    m = r.mapping(doc, "", 1, required=("service", "description"),
                  optional=("sources", "domains", "cidrs", "asns"))
    if m is None:
        r.raise_if_any(CatalogError)
        raise AssertionError("unreachable")
    name = r.string(m.get("service"), "service", m.lines.get("service"), pattern=SERVICE_NAME,
                    hint=f"a name matching {SERVICE_NAME}")
    description = r.string(m.get("description"), "description", m.lines.get("description"))
    sources = [s for s, p, ln in r.items(m.get("sources"), "sources", m.lines.get("sources")) if r.string(s, p, ln)]
    t = targets_of(r, m, "")
    if not (t.domains or t.cidrs or t.asns) and not r.problems:
        r.error("", 1, "service has no domains, cidrs or asns")
    r.raise_if_any(CatalogError)
    assert name and description
    return Service(name, description, t.domains, t.cidrs, t.asns, tuple(sources))  # type: ignore[arg-type]


def parse_prefix_table(data: bytes, source: str) -> dict[int, tuple[Cidr, ...]]:
    """`91.108.4.0/22 62041` per line; blank lines and `#` comments ignored."""
    text = strictyaml.decode(data, source, MAX_CATALOG_BYTES)
    problems: list[Problem] = []
    table: dict[int, list[Cidr]] = {}
    for lineno, raw in enumerate(text.splitlines(), 1):
        line = raw.split("#", 1)[0].strip()
        if not line:
            continue
        fields = line.split()
        if len(fields) != 2 or not fields[1].isdigit():
            problems.append(Problem(f"{source}:{lineno}", f"expected '<prefix> <asn>'; got {raw.strip()!r}"))
            continue
        try:
            cidr = ranges.parse_cidr(fields[0])
        except ValueError as e:
            problems.append(Problem(f"{source}:{lineno}", str(e)))
            continue
        table.setdefault(int(fields[1]), []).append(cidr)
    raise_problems(problems, CatalogError)
    return {asn: tuple(sorted(set(cidrs))) for asn, cidrs in table.items()}
