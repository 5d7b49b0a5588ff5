"""Order targets -> concrete names and prefixes, through the service catalog and the ASN table.

Pure. Unknown services and ASNs without prefixes are errors (the policy asks for something
blockd cannot know), reported together with the order and path that named them.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import TypeVar

from blockd.errors import PolicyError, Problem, raise_problems
from blockd.model import Catalog, Cidr, Order, Policy

_T = TypeVar("_T")


@dataclass(frozen=True, slots=True)
class Expanded:
    """One order's targets, flattened; `via` says where a rule came from (for findings)."""

    domains: tuple[str, ...]  # display form: `*.name` marks a subtree
    cidrs: tuple[Cidr, ...]
    via: Mapping[str, str]  # rule text -> "service telegram" / "AS62041" (only for indirect rules)


_DIRECT: Mapping[str, str] = MappingProxyType({})  # the `via` of an order that names only names and prefixes


def expand_order(policy: Policy, index: int, order: Order, catalog: Catalog) -> Expanded:
    t = order.targets
    if not t.services and not t.asns:  # a registry's decisions: its own tuples, nothing shared with others
        return Expanded(_distinct(t.domains), _distinct(t.cidrs), _DIRECT)
    problems: list[Problem] = []
    domains = list(order.targets.domains)
    cidrs = list(order.targets.cidrs)
    via: dict[str, str] = {}
    asns = [(asn, f"orders[{index}].targets.asns") for asn in order.targets.asns]
    for i, name in enumerate(order.targets.services):
        svc = catalog.services.get(name)
        if svc is None:
            known = ", ".join(sorted(catalog.services)) or "(catalog is empty)"
            problems.append(Problem(f"{policy.source}: orders[{index}].targets.services[{i}]",
                                    f"unknown service {name!r}; known: {known}"))
            continue
        for d in svc.domains:
            via.setdefault(d, f"service {name}")
        for c in svc.cidrs:
            via.setdefault(str(c), f"service {name}")
        domains.extend(svc.domains)
        cidrs.extend(svc.cidrs)
        asns.extend((asn, f"service {name} asns") for asn in svc.asns)
    for asn, where in asns:
        prefixes = catalog.asn_prefixes.get(asn)
        if not prefixes:
            problems.append(Problem(f"{policy.source}: order {order.id}: {where}",
                                    f"AS{asn} has no prefixes in the prefix-to-origin table"))
            continue
        for c in prefixes:
            via.setdefault(str(c), f"AS{asn}")
        cidrs.extend(prefixes)
    raise_problems(problems, PolicyError)
    return Expanded(tuple(dict.fromkeys(domains)), tuple(dict.fromkeys(cidrs)), via)


def _distinct(items: tuple[_T, ...]) -> tuple[_T, ...]:
    """`items` without repeats, in order: the tuple itself when it has none."""
    if len(items) < 2:
        return items
    once = tuple(dict.fromkeys(items))
    return items if len(once) == len(items) else once
