"""Address arithmetic on integers: parse and format prefixes, split intervals into prefixes.

Pure and fast: a policy may hold a million prefixes, and `ipaddress` objects cost ~20x more
than the integer pairs used here. `netaddr` is the oracle the property tests compare against.
"""

from __future__ import annotations

import socket
from collections.abc import Iterable, Iterator

from blockd.model import Cidr

BITS = {4: 32, 6: 128}
#: host-part masks by prefix length: `network | HOST4[plen]` is the last address
HOST4 = [(1 << (32 - p)) - 1 for p in range(33)]
HOST6 = [(1 << (128 - p)) - 1 for p in range(129)]


class CidrSyntaxError(ValueError):
    """Raised with a message that says what is wrong and what is valid."""


def parse_cidr(text: str) -> Cidr:
    """`'91.108.4.0/22'` or `'2001:b28:f23d::/48'` (a bare address means /32 or /128).

    IPv4-mapped IPv6 (`::ffff:149.154.167.50`, `::ffff:0:0/96`) is returned as the IPv4 prefix.

    Host bits must be zero: `10.1.2.3/8` is refused rather than silently widened or narrowed,
    because either reading could block the wrong addresses.
    """
    addr, sep, plen_s = text.partition("/")
    if ":" in addr:
        version, family, host = 6, socket.AF_INET6, HOST6
    else:
        version, family, host = 4, socket.AF_INET, HOST4
    try:
        packed = socket.inet_pton(family, addr)
    except OSError:
        raise CidrSyntaxError(f"not an IPv{version} address: {addr!r}") from None
    bits = BITS[version]
    if sep:
        if not plen_s.isdigit() or not 0 <= int(plen_s) <= bits:
            raise CidrSyntaxError(f"prefix length {plen_s!r} is not an integer in 0..{bits}")
        plen = int(plen_s)
    else:
        plen = bits
    net = int.from_bytes(packed, "big")
    if net & host[plen]:
        fixed = format_cidr(version, net & ~host[plen], plen)
        raise CidrSyntaxError(f"host bits set in {text!r}; the network is {fixed}")
    if version == 6 and plen >= 96 and net >> 32 == 0xFFFF:
        # IPv4-mapped (::ffff:a.b.c.d): on the wire this is IPv4 traffic, so it is enforced as the
        # IPv4 prefix it names (and meets the IPv4 guards: ::ffff:0:0/96 is 0.0.0.0/0).
        return Cidr(4, net & 0xFFFFFFFF, plen - 96)
    return Cidr(version, net, plen)


def format_addr(version: int, value: int) -> str:
    if version == 4:
        return socket.inet_ntop(socket.AF_INET, value.to_bytes(4, "big"))
    return socket.inet_ntop(socket.AF_INET6, value.to_bytes(16, "big"))


def format_cidr(version: int, network: int, prefixlen: int) -> str:
    return f"{format_addr(version, network)}/{prefixlen}"


def interval_to_cidrs(version: int, first: int, last: int) -> Iterator[tuple[int, int]]:
    """The fewest prefixes `(network, prefixlen)` covering exactly `[first, last]`."""
    bits = BITS[version]
    while first <= last:
        # Largest block aligned at `first` that does not run past `last`.
        size = (first & -first).bit_length() - 1 if first else bits
        span = (last - first + 1).bit_length() - 1
        size = min(size, span)
        yield first, bits - size
        first += 1 << size


def to_cidrs(version: int, intervals: Iterable[tuple[int, int]]) -> Iterator[tuple[int, int]]:
    for first, last in intervals:
        yield from interval_to_cidrs(version, first, last)


def merge(intervals: Iterable[tuple[int, int]]) -> list[tuple[int, int]]:
    """Union of intervals as sorted, disjoint, non-adjacent intervals."""
    out: list[tuple[int, int]] = []
    for first, last in sorted(intervals):
        if out and first <= out[-1][1] + 1:
            if last > out[-1][1]:
                out[-1] = (out[-1][0], last)
        else:
            out.append((first, last))
    return out


def subtract(
    keep: list[tuple[int, int]], remove: list[tuple[int, int]]
) -> list[tuple[int, int]]:
    """`keep` minus `remove`; both sorted and disjoint. Splits intervals as needed."""
    out: list[tuple[int, int]] = []
    j, n = 0, len(remove)
    for first, last in keep:
        while j < n and remove[j][1] < first:
            j += 1
        k = j
        while k < n and remove[k][0] <= last:
            rf, rl = remove[k]
            if rf > first:
                out.append((first, rf - 1))
            first = max(first, rl + 1)
            if first > last:
                break
            k += 1
        if first <= last:
            out.append((first, last))
    return out


def overlaps(sorted_starts: list[int], sorted_ends: list[int], first: int, last: int) -> int | None:
    """Index of an interval of a sorted disjoint list that meets `[first, last]`, else None."""
    from bisect import bisect_right

    i = bisect_right(sorted_starts, last) - 1
    if i >= 0 and sorted_ends[i] >= first:
        return i
    return None
