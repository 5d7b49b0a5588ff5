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

import bisect
from collections.abc import Iterable
from dataclasses import dataclass, field
from pathlib import Path

import idna
from publicsuffixlist import PSLFILE

from blockd import ranges
from blockd.errors import CatalogError, InputError, Problem, raise_problems
from blockd.fsutil import read_regular
from blockd.model import Cidr

_HOST = {4: ranges.HOST4, 6: ranges.HOST6}


@dataclass(frozen=True, slots=True)
class PublicSuffixes:
    """The Public Suffix List as three sets of A-labels; `is_public` is O(1).

    Equivalent to `publicsuffixlist.PublicSuffixList().is_public` (a test checks every rule),
    but about 5x faster, which matters at a million names.
    """

    exact: frozenset[str]
    wildcard: frozenset[str]  # "*.ck" is stored as "ck"
    exception: frozenset[str]  # "!www.ck" is stored as "www.ck"

    @classmethod
    def load(cls, path: str = PSLFILE) -> PublicSuffixes:
        exact, wildcard, exception = set(), set(), set()
        with open(path, encoding="utf-8") as f:
            for raw in f:
                rule = raw.strip()
                if not rule or rule.startswith("//"):
                    continue
                target = exact
                if rule.startswith("!"):
                    rule, target = rule[1:], exception
                elif rule.startswith("*."):
                    rule, target = rule[2:], wildcard
                if not rule.isascii():
                    rule = idna.encode(rule, uts46=True).decode("ascii")
                target.add(rule.lower())
        return cls(frozenset(exact), frozenset(wildcard), frozenset(exception))

    def is_public(self, name: str) -> bool:
        # The parent of a wildcard rule counts as public too (as publicsuffixlist reads it):
        # `*.compute.amazonaws.com` makes `compute.amazonaws.com` unregistrable in practice.
        if name in self.exact or name in self.wildcard:
            return name not in self.exception
        parent = name.partition(".")[2]
        if not parent:
            return True  # the list's default rule "*": any unlisted TLD is public
        return parent in self.wildcard and name not in self.exception


@dataclass(frozen=True, slots=True)
class Provider:
    name: str
    source: str
    cidrs: tuple[Cidr, ...]


@dataclass(frozen=True, slots=True)
class _Index:
    """Sorted disjoint intervals of one family, searchable by bisection."""

    starts: list[int]
    ends: list[int]

    @classmethod
    def of(cls, intervals: list[tuple[int, int]]) -> _Index:
        return cls([a for a, _ in intervals], [b for _, b in intervals])

    def meeting(self, first: int, last: int) -> list[tuple[int, int]]:
        """The intervals that meet [first, last]."""
        i = bisect.bisect_right(self.starts, last) - 1
        out = []
        while i >= 0 and self.ends[i] >= first:
            out.append((self.starts[i], self.ends[i]))
            i -= 1
        return out[::-1]


@dataclass(frozen=True, slots=True)
class SharedInfra:
    providers: tuple[Provider, ...]
    #: (family) -> union of every provider's ranges: the one bisect most prefixes cost
    _union: dict[int, _Index] = field(repr=False)
    #: (provider name, family) -> that provider's merged ranges, to name what a hit meets
    _each: dict[tuple[str, int], _Index] = field(repr=False)

    @classmethod
    def build(cls, providers: tuple[Provider, ...]) -> SharedInfra:
        """The providers given, and always the special-purpose ranges (`SPECIAL_PURPOSE`)."""
        providers = (*providers, SPECIAL_PURPOSE) if SPECIAL_PURPOSE not in providers else providers
        union, each = {}, {}
        for version in (4, 6):
            union[version] = _Index.of(
                ranges.merge((c.first, c.last) for p in providers for c in p.cidrs if c.version == version))
            for p in providers:
                each[(p.name, version)] = _Index.of(
                    ranges.merge((c.first, c.last) for c in p.cidrs if c.version == version))
        return cls(providers, union, each)

    def hits(self, cidr: Cidr) -> list[tuple[str, str]]:
        """Providers' ranges that `cidr` meets, as (provider name, range text); empty when none."""
        first, last = cidr.first, cidr.last
        if not self._union[cidr.version].meeting(first, last):
            return []
        out = []
        for p in self.providers:
            for a, b in self._each[(p.name, cidr.version)].meeting(first, last):
                text = ", ".join(ranges.format_cidr(cidr.version, n, plen)
                                 for n, plen in ranges.interval_to_cidrs(cidr.version, a, b))
                out.append((p.name, text if text.count(",") < 2 else
                            f"{ranges.format_addr(cidr.version, a)}-{ranges.format_addr(cidr.version, b)}"))
        return out


#: Addresses no order can mean to block, whatever list it came from: blocking them breaks the
#: host and the network itself (a registry dump holding 127.0.0.0/18 made the kernel drop the
#: sinkhole's own loopback traffic). Refused by the shared-infrastructure guard; a signed
#: `allow_collateral` can still name one.
SPECIAL_PURPOSE = Provider("special-purpose (RFC 6890)", "IANA IPv4/IPv6 special-purpose address registries", tuple(
    ranges.parse_cidr(c) for c in (
        "0.0.0.0/8",  # "this network"
        "127.0.0.0/8",  # loopback
        "169.254.0.0/16",  # link-local
        "224.0.0.0/4",  # multicast
        "240.0.0.0/4",  # reserved, and the limited broadcast address
        "::/128", "::1/128",  # unspecified, loopback
        "fe80::/10",  # link-local
        "ff00::/8",  # multicast
    )))

MAX_SHARED_INFRA_BYTES = 16 << 20
#: the widest prefix a shared-infrastructure list may hold, per IP version
SHARED_INFRA_FLOOR = {4: 8, 6: 16}


def read_shared_infra(directory: Path | None) -> dict[str, tuple[str, bytes]]:
    """`<provider>.txt` files -> {file name: (path, bytes)}; CatalogError names one that cannot be read."""
    if directory is None:
        return {}
    if not directory.is_dir():
        raise CatalogError("shared-infrastructure directory does not exist", where=str(directory))
    out = {}
    for path in sorted(directory.glob("*.txt")):
        try:
            out[path.name] = (str(path), read_regular(path, MAX_SHARED_INFRA_BYTES, what="shared-infrastructure list"))
        except InputError as e:
            raise CatalogError(e.message, where=e.where) from None
    return out


def load_shared_infra(directory: Path | None) -> SharedInfra:
    return parse_shared_infra(read_shared_infra(directory).values())


def parse_shared_infra(files: Iterable[tuple[str, bytes]]) -> SharedInfra:
    """`# provider: Name`, `# source: …` headers, then one prefix a line; every bad line reported."""
    providers = []
    problems: list[Problem] = []
    for where, data in files:
        name, source, cidrs = Path(where).stem, "", []
        try:
            text = data.decode("utf-8")
        except UnicodeDecodeError as e:
            problems.append(Problem(where, f"not UTF-8 (byte {e.start}); expected a text file"))
            continue
        for lineno, raw in enumerate(text.splitlines(), 1):
            line = raw.strip()
            if line.startswith("#"):
                key, _, value = line[1:].partition(":")
                if key.strip() == "provider":
                    name = value.strip()
                elif key.strip() == "source":
                    source = f"{source}; {value.strip()}" if source else value.strip()
                continue
            if not line:
                continue
            try:
                cidr = ranges.parse_cidr(line)
            except ValueError as e:
                problems.append(Problem(f"{where}:{lineno}", str(e)))
                continue
            floor = SHARED_INFRA_FLOOR[cidr.version]
            if cidr.prefixlen < floor:
                # An unsigned list: one wide line (0.0.0.0/0) would make every address "shared"
                # and refuse all IP blocking. The widest real provider ranges are /9 and /16.
                problems.append(Problem(f"{where}:{lineno}", f"{line!r} is wider than /{floor}; no provider's range "
                                        f"is, and it would shield all of that space from blocking"))
                continue
            cidrs.append(cidr)
        providers.append(Provider(name, source, tuple(sorted(set(cidrs)))))
    raise_problems(problems, CatalogError)
    return SharedInfra.build(tuple(providers))


@dataclass(frozen=True, slots=True)
class Guards:
    psl: PublicSuffixes
    infra: SharedInfra
    min_prefix_v4: int = 16
    min_prefix_v6: int = 32

    def check_name(self, name: str) -> str | None:
        """Why blocking `name` (or its subtree) is over-broad, or None."""
        if self.psl.is_public(name):
            return f"{name!r} is a public suffix; blocking it blocks every domain registered under it"
        return None

    def check_cidrs(self, cidrs: tuple[Cidr, ...]) -> list[tuple[Cidr, list[tuple[str, str]]]]:
        """The prefixes a guard stops, each with its (guard, reason) pairs; hot at 1M prefixes."""
        out = []
        limits = {4: self.min_prefix_v4, 6: self.min_prefix_v6}
        index = self.infra._union
        bisect_right = bisect.bisect_right
        for cidr in cidrs:
            version, first, plen = cidr
            last = first | _HOST[version][plen]
            idx = index[version]
            i = bisect_right(idx.starts, last) - 1
            hit = i >= 0 and idx.ends[i] >= first
            if plen >= limits[version] and not hit:
                continue
            problems = []
            if plen < limits[version]:
                size = f"{1 << (32 - plen):,}" if version == 4 else f"2^{128 - plen}"
                problems.append(("min_prefix", f"/{plen} covers {size} addresses; the limit is /{limits[version]}"))
            if hit:
                hits = self.infra.hits(cidr)
                shown = ", ".join(f"{name} {c}" for name, c in hits[:3])
                more = f" and {len(hits) - 3} more" if len(hits) > 3 else ""
                problems.append(("shared_infra", f"overlaps shared cloud/CDN ranges: {shown}{more}"))
            out.append((cidr, problems))
        return out


def default_psl() -> PublicSuffixes:
    """The list shipped inside the `publicsuffixlist` package (works offline)."""
    return PublicSuffixes.load()

