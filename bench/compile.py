"""Compile 1M domains + 1M IPv4 prefixes (seeded, shaped like the real registry lists).

Prints wall time and peak RSS for the pure compile step, and separately for parsing the same
orders from policy YAML (what the daemon does before compiling). Target: compile <= 10 s and
<= 1 GiB on a 2-core machine.

    .venv/bin/python bench/compile.py [--domains N] [--prefixes N] [--orders K]
"""

from __future__ import annotations

import argparse
import random
import resource
import time
from datetime import datetime, timezone

from blockd.compile import CompileSettings, compile_policies
from blockd.guards import Guards, SharedInfra, default_psl
from blockd.model import Catalog, Cidr, LegalBasis, Order, Policy, Targets
from blockd.policy import parse_policy

TLDS = ["com", "net", "org", "ru", "info", "xyz", "top", "online", "site", "club", "io", "me"]


def gen_domains(rng: random.Random, n: int) -> list[str]:
    """Registry-like: mostly registrable names, some www./subdomain hosts, some `*.` subtrees."""
    alphabet = "abcdefghijklmnopqrstuvwxyz0123456789"
    out = set()
    while len(out) < n:
        base = "".join(rng.choices(alphabet, k=rng.randint(5, 14))) + "." + rng.choice(TLDS)
        r = rng.random()
        out.add(base if r < 0.7 else ("www." + base if r < 0.85 else "*." + base))
    return sorted(out)


def gen_prefixes(rng: random.Random, n: int) -> list[Cidr]:
    """60% /32, 20% /24, 20% /16-/30 (as in the antifilter/Re:filter lists), unicast space."""
    out = set()
    while len(out) < n:
        r = rng.random()
        plen = 32 if r < 0.6 else (24 if r < 0.8 else rng.randint(16, 30))
        addr = rng.randint(1 << 24, (223 << 24) - 1) & ~((1 << (32 - plen)) - 1)
        out.add(Cidr(4, addr, plen))
    return list(out)


def rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--domains", type=int, default=1_000_000)
    ap.add_argument("--prefixes", type=int, default=1_000_000)
    ap.add_argument("--orders", type=int, default=100, help="orders the rules are spread over")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--yaml", action="store_true", help="also time parsing the orders from policy YAML")
    args = ap.parse_args()
    rng = random.Random(args.seed)
    domains, prefixes = gen_domains(rng, args.domains), gen_prefixes(rng, args.prefixes)
    print(f"generated {len(domains):,} names and {len(prefixes):,} IPv4 prefixes over {args.orders} orders; "
          f"RSS {rss_mib():.0f} MiB")
    k = args.orders
    orders = tuple(
        Order(f"o{i}", LegalBasis("Court", f"R{i}"), "block",
              Targets(domains=tuple(domains[i::k]), cidrs=tuple(prefixes[i::k])))
        for i in range(k)
    )
    when = datetime(2026, 11, 1, tzinfo=timezone.utc)
    policy = Policy("bench", 1, when, when, datetime(2030, 1, 1, tzinfo=timezone.utc), orders, "0" * 64, "bench")
    settings = CompileSettings(Guards(default_psl(), SharedInfra.build(()), 16, 32))
    base_rss = rss_mib()
    t0 = time.perf_counter()
    comp = compile_policies([policy], Catalog({}), settings, datetime(2026, 11, 29, tzinfo=timezone.utc))
    dt = time.perf_counter() - t0
    c = comp.ruleset.counts()
    print(f"compile: {dt:.2f} s, peak RSS {rss_mib():.0f} MiB (inputs alone {base_rss:.0f} MiB); "
          f"{c['domain_exact']:,} exact + {c['domain_subtree']:,} subtree names, {c['ipv4_ranges']:,} IPv4 ranges, "
          f"{len(comp.findings)} findings, digest {comp.ruleset.digest[:12]}")
    print(f"target: <= 10 s and <= 1024 MiB -> {'MET' if dt <= 10 and rss_mib() <= 1024 else 'MISSED'}")
    if args.yaml:
        lines = ["issuer: bench", "serial: 1", "issued_at: 2026-11-01T00:00:00Z", "not_before: 2026-11-01T00:00:00Z",
                 "not_after: 2030-01-01T00:00:00Z", "orders:"]
        for o in orders:
            lines += [f"  - id: {o.id}", "    legal_basis: {authority: Court, reference: R}", "    action: block",
                      "    targets:", "      domains:"]
            lines += [f"        - '{d}'" for d in o.targets.domains]
            lines += ["      cidrs:"] + [f"        - {c}" for c in o.targets.cidrs]
        data = "\n".join(lines).encode()
        t0 = time.perf_counter()
        parsed = parse_policy(data, "bench.yaml")
        print(f"parse {len(data) / 1e6:.0f} MB policy YAML: {time.perf_counter() - t0:.2f} s "
              f"({sum(len(o.targets.domains) + len(o.targets.cidrs) for o in parsed.orders):,} targets), "
              f"peak RSS {rss_mib():.0f} MiB")


if __name__ == "__main__":
    main()
