"""Client address -> allowed? Prefix list matching with a small per-address memo.

The sinkhole must never be an open resolver: only loopback and the configured prefixes may
query it; everyone else gets REFUSED (and nothing is forwarded for them).
"""

from __future__ import annotations

import ipaddress
from collections.abc import Iterable

LOOPBACK = ("127.0.0.0/8", "::1/128")


class Acl:
    __slots__ = ("_nets", "_memo")

    def __init__(self, prefixes: Iterable[str]) -> None:
        nets = []
        for p in prefixes:
            try:
                nets.append(ipaddress.ip_network(p, strict=True))
            except ValueError as e:
                raise ValueError(f"allow: {p!r} is not a prefix with host bits zero ({e})") from None
        self._nets = tuple(nets)
        self._memo: dict[str, bool] = {}

    def allowed(self, host: str) -> bool:
        ok = self._memo.get(host)
        if ok is None:
            ok = self._check(host)
            if len(self._memo) > 65536:  # bounded: a scan from many sources must not grow it
                self._memo.clear()
            self._memo[host] = ok
        return ok

    def _check(self, host: str) -> bool:
        try:
            addr = ipaddress.ip_address(host.split("%", 1)[0])
        except ValueError:
            return False
        if isinstance(addr, ipaddress.IPv6Address) and addr.ipv4_mapped is not None:
            addr = addr.ipv4_mapped
        return any(addr.version == n.version and addr in n for n in self._nets)
