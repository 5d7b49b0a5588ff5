"""Guards against over-blocking: what a rule would hit besides its target.

    public_suffix  the name is a public suffix (`com`, `co.uk`, `github.io`): blocking it, or
                   its subtree, blocks every registrant below it
    min_prefix     a prefix shorter than /16 (IPv4) or /32 (IPv6), configurable
    shared_infra   a prefix that meets a cloud or CDN range (AWS, Google, Cloudflare, …): other
                   tenants share those addresses (Russia 2018: ~16 M addresses to reach Telegram)
    growth         the rule set would grow by more than a factor over the last accepted one

The checks are pure; `load_shared_infra` is the one I/O step (operators refresh the files).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from publicsuffixlist import PublicSuffixList

from blockd import ranges
from blockd.errors import CatalogError, Problem, raise_problems
from blockd.model import Cidr


@dataclass(frozen=True, slots=True)
class Provider:
    name: str
    source: str
    cidrs: tuple[Cidr, ...]


@dataclass(frozen=True, slots=True)
class _Index:
    """Sorted disjoint union of all providers' ranges, for one family; hits are named afterwards."""

    starts: list[int]
    ends: list[int]


@dataclass(frozen=True, slots=True)
class SharedInfra:
    providers: tuple[Provider, ...]
    _v4: _Index = field(repr=False)
    _v6: _Index = field(repr=False)

    @classmethod
    def build(cls, providers: tuple[Provider, ...]) -> SharedInfra:
        idx = {}
        for version in (4, 6):
            merged = ranges.merge((c.first, c.last) for p in providers for c in p.cidrs if c.version == version)
            idx[version] = _Index([a for a, _ in merged], [b for _, b in merged])
        return cls(providers, idx[4], idx[6])

    def hits(self, cidr: Cidr) -> list[tuple[str, Cidr]]:
        """Providers' ranges that `cidr` meets, as (provider name, range); empty when none."""
        index = self._v4 if cidr.version == 4 else self._v6
        first, last = cidr.first, cidr.last
        if ranges.overlaps(index.starts, index.ends, first, last) is None:
            return []  # the common case costs one bisect
        out = []
        for p in self.providers:
            for c in p.cidrs:
                if c.version == cidr.version and c.first <= last and first <= c.last:
                    out.append((p.name, c))
        return out


def load_shared_infra(directory: Path | None) -> SharedInfra:
    """`<provider>.txt` files: `# provider: Name`, `# source: …` headers, then one prefix a line."""
    if directory is None:
        return SharedInfra.build(())
    if not directory.is_dir():
        raise CatalogError("shared-infrastructure directory does not exist", where=str(directory))
    providers = []
    problems: list[Problem] = []
    for path in sorted(directory.glob("*.txt")):
        name, source, cidrs = path.stem, "", []
        for lineno, raw in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
            line = raw.strip()
            if line.startswith("#"):
                key, _, value = line[1:].partition(":")
                if key.strip() == "provider":
                    name = value.strip()
                elif key.strip() == "source":
                    source = value.strip()
                continue
            if not line:
                continue
            try:
                cidrs.append(ranges.parse_cidr(line))
            except ValueError as e:
                problems.append(Problem(f"{path}:{lineno}", str(e)))
        providers.append(Provider(name, source, tuple(sorted(set(cidrs)))))
    raise_problems(problems, CatalogError)
    return SharedInfra.build(tuple(providers))


@dataclass(frozen=True, slots=True)
class Guards:
    psl: PublicSuffixList
    infra: SharedInfra
    min_prefix_v4: int = 16
    min_prefix_v6: int = 32

    def check_name(self, name: str) -> str | None:
        """Why blocking `name` (or its subtree) is over-broad, or None."""
        if self.psl.is_public(name):
            return f"{name!r} is a public suffix; blocking it blocks every domain registered under it"
        return None

    def check_cidr(self, cidr: Cidr) -> list[tuple[str, str]]:
        """(guard, reason) pairs for `cidr`; empty when it passes."""
        out = []
        limit = self.min_prefix_v4 if cidr.version == 4 else self.min_prefix_v6
        if cidr.prefixlen < limit:
            size = f"{1 << (32 - cidr.prefixlen):,}" if cidr.version == 4 else f"2^{128 - cidr.prefixlen}"
            out.append(("min_prefix", f"/{cidr.prefixlen} covers {size} addresses; the limit is /{limit}"))
        hits = self.infra.hits(cidr)
        if hits:
            shown = ", ".join(f"{name} {c}" for name, c in hits[:3])
            more = f" and {len(hits) - 3} more" if len(hits) > 3 else ""
            out.append(("shared_infra", f"overlaps shared cloud/CDN ranges: {shown}{more}"))
        return out


def default_psl() -> PublicSuffixList:
    """The list shipped inside `publicsuffixlist` (works offline)."""
    return PublicSuffixList()

