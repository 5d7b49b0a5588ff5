"""Signed service catalog and prefix-to-origin table -> Catalog.

    policies/catalog/<service>.yaml (+ .minisig)   service, description, sources, domains, cidrs, asns
    policies/asn/prefix2as.txt      (+ .minisig)   "<prefix> <asn>" per line, '#' comments

Both change what gets blocked, so both are verified (role `catalog`) before they are parsed.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType

from blockd import ranges, strictyaml, trust
from blockd.errors import CatalogError, InputError, Problem, raise_problems
from blockd.fsutil import read_regular
from blockd.model import Catalog, Cidr, Service
from blockd.policy import MAX_SIGNATURE_BYTES, SERVICE_NAME, targets_of
from blockd.schema import Reader

MAX_CATALOG_BYTES = 64 << 20  # a registry-scale prefix-to-origin table is tens of MB
PREFIX_TABLE = "asn/prefix2as.txt"


@dataclass(frozen=True, slots=True)
class CatalogFiles:
    """The catalog's inputs as bytes: read from disk, or restored from the state's last good copy.

    Names are relative: `catalog/<service>.yaml`, `asn/prefix2as.txt`, each signature beside its
    file as `<name>.minisig` / `<name>.<signer>.minisig`, shared-infrastructure lists as
    `shared-infra/<provider>.txt`. `paths` maps each name to the file it was read from, for
    error messages.
    """

    files: Mapping[str, bytes]
    paths: Mapping[str, str]

    def where(self, name: str) -> str:
        return self.paths.get(name, name)

    @property
    def digest(self) -> str:
        h = hashlib.sha256()
        for name in sorted(self.files):
            data = self.files[name]
            h.update(f"{name}\0{len(data)}\0".encode())
            h.update(data)
        return h.hexdigest()


def read_catalog_files(directory: Path, prefix_table: Path | None) -> CatalogFiles:
    """Read (never parse) the catalog's files and their signatures; CatalogError names a bad one."""
    files: dict[str, bytes] = {}
    paths: dict[str, str] = {}

    def take(path: Path, name: str, what: str) -> None:
        try:
            files[name], paths[name] = read_regular(path, MAX_CATALOG_BYTES, what=what), str(path)
            for sig in trust.signature_paths(path):
                sig_name = f"{name}{sig.name[len(path.name):]}"
                files[sig_name] = read_regular(sig, MAX_SIGNATURE_BYTES, what="minisign signature")
                paths[sig_name] = str(sig)
        except InputError as e:
            raise CatalogError(e.message, where=e.where) from None

    if not directory.is_dir():
        raise CatalogError("catalog directory does not exist", where=str(directory))
    paths[""] = str(directory)
    for path in sorted(directory.glob("*.yaml")):
        take(path, f"catalog/{path.name}", "catalog service file")
    if prefix_table is not None:
        take(prefix_table, PREFIX_TABLE, "prefix-to-origin table")
    return CatalogFiles(MappingProxyType(files), MappingProxyType(paths))


def build_catalog(files: CatalogFiles, store: trust.TrustStore) -> Catalog:
    """Verify every file (role `catalog`) before parsing it; CatalogError on the first bad one."""
    def verified(name: str) -> bytes:
        data = files.files[name]
        where = files.where(name)
        sigs = [(files.where(n), raw.decode("utf-8", errors="replace"))
                for n, raw in sorted(files.files.items()) if _is_signature_of(n, name)]
        try:
            trust.verify(data, sigs, store, role="catalog", where=where)
        except InputError as e:
            raise CatalogError(e.message, where=e.where) from None
        return data

    services: dict[str, Service] = {}
    for name in sorted(n for n in files.files if n.startswith("catalog/") and n.endswith(".yaml")):
        where = files.where(name)
        svc = parse_service(verified(name), where)
        if svc.name != Path(name).stem:
            raise CatalogError(f"service {svc.name!r} must live in {svc.name}.yaml", where=where)
        services[svc.name] = svc
    if not services:
        raise CatalogError("no *.yaml service files", where=files.paths.get("", "catalog"))
    asn_prefixes: dict[int, tuple[Cidr, ...]] = {}
    if PREFIX_TABLE in files.files:
        asn_prefixes = parse_prefix_table(verified(PREFIX_TABLE), files.where(PREFIX_TABLE))
    return Catalog(MappingProxyType(services), MappingProxyType(asn_prefixes))


def load_catalog(directory: Path, prefix_table: Path | None, store: trust.TrustStore) -> Catalog:
    return build_catalog(read_catalog_files(directory, prefix_table), store)


def _is_signature_of(candidate: str, name: str) -> bool:
    if not candidate.startswith(name + ".") or not candidate.endswith(".minisig"):
        return False
    middle = candidate[len(name) + 1:-len(".minisig")]
    return middle == "" or "/" not in middle


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
