"""`blockd demo`: the policy pipeline on the shipped, signed sample policy.

Verifies the sample (minisign, trust store), compiles it through the signed catalog, prints
the rule set summary and the guards' findings, and explains one rule's provenance.
"""

from __future__ import annotations

import argparse
from datetime import datetime, timezone
from pathlib import Path

from blockd.compile import compile_policies
from blockd.intake import load_context, policy_files, read_policies
from blockd.ranges import format_addr, to_cidrs
from blockd.settings import load_settings


def run_demo(args: argparse.Namespace) -> int:
    settings = load_settings(Path(args.config) if args.config else None)
    now = datetime.now(timezone.utc)
    ctx = load_context(settings)
    intake = read_policies(policy_files(settings.policy_dir), ctx, now)
    for r in intake.rejected:
        print(f"rejected: {r.error}")
    comp = compile_policies(intake.accepted, ctx.catalog, ctx.compile, now)
    rs = comp.ruleset
    print(f"1. verified {len(intake.accepted)} signed policy file(s) against the trust store {settings.trust_store}")
    for p in intake.accepted:
        print(f"   {p.source}: issuer {p.issuer}, serial {p.serial}, keys {', '.join(p.signers)}")
    c = rs.counts()
    print(f"2. compiled through the signed catalog ({', '.join(sorted(ctx.catalog.services))}):")
    print(f"   {c['domain_subtree']} name subtrees, {c['domain_exact']} exact names, "
          f"{c['ipv4_ranges']} IPv4 and {c['ipv6_ranges']} IPv6 ranges; digest {rs.digest[:16]}")
    for f in comp.findings:
        print(f"   guard {f.guard}: {f.rule}: {'allowed' if f.allowed else 'REFUSED'}: {f.reason}")
    if rs.v4:
        first = rs.v4[0]
        info = rs.orders[sorted(first.orders)[0]]
        cidrs = ", ".join(f"{format_addr(4, n)}/{p}" for n, p in to_cidrs(4, [(first.first, first.last)]))
        print(f"3. provenance: {cidrs} is blocked by order {info.id} of {info.issuer} "
              f"({info.authority}, {info.reference})")
    print("   next: `blockd run` enforces this in nftables/ipset and the DNS sinkhole (see README)")
    return 0 if not intake.rejected else 1
