"""N simulated operators, for tests and the demo: one signed regulator order set -> each operator's
keys, state and signed statement chain, produced by the real code from real passes.

Each operator has its own key pair, state directory and policy directory; a real `Reconciler`
(intake, signature checks, the signed catalog, the guards, compile) runs its passes at chosen
times, and `attest.build_statement` + `attest.issue` sign and write what they return, with
`tte.record` keeping first-enforced times as the daemon does. The enforcers are simulated (they
implement the real interface and hold their share of the rule set in memory, like `dryrun`):
no kernel is touched. Roles, cycled over the operators:

    on_time       receives the orders 10 minutes after issue; statements daily: complies
    late          receives them after 30 h, past two deadlines
    out_of_sync   enforced on time, then its DNS share loses a name (read-back differs)
    tampered      on time, but one statement was edited after signing
    stale         on time, then stops sending statements after the first day
    gap           on time, but one numbered statement is missing from what was received

    python -m blockd.compliance.fixture OUT [--operators 6] [--now 2026-11-24T00:00:00Z]
"""

from __future__ import annotations

import argparse
import asyncio
import shutil
import sys
import textwrap
import time
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from pathlib import Path

from blockd import attest, minisign, tte
from blockd.audit import GENESIS, Head
from blockd.enforcers.nft import piece_keys
from blockd.model import Applied, Change, RuleSet, diff
from blockd.reconcile import Reconciler
from blockd.settings import Settings

ROOT = Path(__file__).resolve().parents[2]
ROLES = ("on_time", "late", "out_of_sync", "tampered", "stale", "gap")
NAMES = ("alpha", "bravo", "charlie", "delta", "echo", "foxtrot", "golf", "hotel", "india", "juliett",
         "kilo", "lima", "mike", "november", "oscar", "papa")
T0 = datetime(2026, 11, 20, 0, 0, tzinfo=timezone.utc)  # the orders' issued_at
NOW = T0 + timedelta(days=4)
FILE = "fixture-orders.yaml"

ORDERS = textwrap.dedent(f"""\
    # Simulated regulator orders for the compliance fixture (blockd.compliance.fixture).
    issuer: demo-regulator
    serial: 7
    issued_at: {T0:%Y-%m-%dT%H:%M:%SZ}
    not_before: {T0:%Y-%m-%dT%H:%M:%SZ}
    not_after: 2030-01-01T00:00:00Z
    orders:
      - id: fx-telegram
        legal_basis: {{authority: Demo Ministry, reference: Order 12/2026}}
        action: block
        deadline: {T0 + timedelta(hours=24):%Y-%m-%dT%H:%M:%SZ}
        targets: {{services: [telegram]}}
        allow_collateral:
          - rule: 2a0a:f280::/29
            guard: min_prefix
            reason: the ASN table maps all of 2a0a:f280::/29 to Telegram Messenger Inc (AS211157)
      - id: fx-casino
        legal_basis: {{authority: Demo Gambling Authority, reference: Decision 2026-0031}}
        action: block
        deadline: {T0 + timedelta(hours=6):%Y-%m-%dT%H:%M:%SZ}
        targets: {{domains: [casino.example, "*.bets.example"]}}
      - id: fx-mirror
        legal_basis: {{authority: Demo District Court, reference: Case 2-4411/2026}}
        action: block
        deadline: {T0 + timedelta(days=7):%Y-%m-%dT%H:%M:%SZ}
        targets: {{domains: [mirror.example], cidrs: [203.0.113.0/24]}}
    """)


class SimEnforcer:
    """Holds its share of the rule set (`names` or `addresses`) in memory, as the DNS sinkhole and
    the kernel enforcers hold theirs. `lose` names it fails to hold model a backend that dropped
    entries: its read-back then differs from what it was asked to hold."""

    def __init__(self, name: str, share: str) -> None:
        self.name, self.share, self.lose = name, share, 0
        self._held = RuleSet.empty()

    def enforced(self, desired: RuleSet) -> RuleSet:
        if self.share == "names":
            return RuleSet.build(desired.domains, (), (), desired.orders)
        return RuleSet.build((), desired.v4, desired.v6)

    async def apply(self, desired: RuleSet, change: Change | None = None) -> Applied:
        t0 = time.perf_counter()
        want = self.enforced(desired)
        held = RuleSet.build(want.domains[self.lose:], want.v4, want.v6) if self.lose else want
        plan = diff(self._held, held)
        self._held = held
        # Counts in the units the real enforcers report: nft interval elements, DNS names.
        counts = ({"ipv4_elements": len(piece_keys(4, held.v4)), "ipv6_elements": len(piece_keys(6, held.v6))}
                  if self.share == "addresses" else held.counts())
        return Applied(self.name, held.digest, want.digest, plan.added, plan.removed, time.perf_counter() - t0,
                       counts)

    async def readback(self) -> RuleSet:
        return self._held

    async def aclose(self) -> None:
        return None


@dataclass(frozen=True, slots=True)
class Fixture:
    root: Path
    policies: Path  # the regulator's signed orders (directory)
    keys: Path  # operators' public keys, <operator>.pub
    statements: Path  # <operator>/attestation-*.json as received
    operators: dict[str, str]  # name -> role
    now: datetime


def _schedule(role: str, now: datetime) -> list[tuple[timedelta, str]]:
    daily = [(timedelta(days=d), "pass") for d in range(1, 4)] + [(now - T0 - timedelta(hours=1), "pass")]
    match role:
        case "late":
            return [(timedelta(hours=1), "pass"), (timedelta(hours=30), "receive"), (timedelta(days=3), "pass"),
                    (now - T0 - timedelta(hours=1), "pass")]
        case "out_of_sync":
            return [(timedelta(minutes=20), "receive"), (timedelta(days=1), "pass"), (timedelta(days=3), "drift"),
                    (now - T0 - timedelta(hours=1), "pass")]
        case "stale":
            return [(timedelta(minutes=15), "receive"), (timedelta(days=1), "pass")]
        case _:
            return [(timedelta(minutes=10), "receive"), *daily]


async def _operator(name: str, role: str, fx: Fixture, work: Path, regulator_key: Path) -> None:
    key = minisign.generate()
    (fx.keys / f"{name}.pub").write_text(key.public.to_text(f"operator {name}"))
    home = work / name
    (home / "policies").mkdir(parents=True)
    (home / "operator.key").write_text(key.to_text())
    settings = Settings(trust_store=ROOT / "policies/trust", policy_dir=home / "policies",
                        catalog_dir=ROOT / "policies/catalog", prefix_table=ROOT / "policies/asn/prefix2as.txt",
                        shared_infra_dir=ROOT / "policies/shared-infra", state_dir=home / "state")
    nft, dns = SimEnforcer("nft", "addresses"), SimEnforcer("dns", "names")
    rec = Reconciler(settings, [nft, dns])
    out = fx.statements / name
    out.mkdir(parents=True)
    enforced: dict[str, dict[str, datetime]] = {}
    previous: str | None = None
    for seq, (offset, event) in enumerate(_schedule(role, fx.now), 1):
        at = T0 + offset
        if event == "receive":
            for f in fx.policies.iterdir():
                shutil.copy(f, home / "policies" / f.name)
        if event == "drift":
            dns.lose = 1
        r = await rec.run_pass(now=at)
        synced = {n: (at if a.in_sync else None) for n, a in r.applied.items()}
        enforced = tte.record(enforced, list(r.policies), r.compilation.orders, synced)
        statement = attest.build_statement(
            policies=[attest.Received(p, r.received.get(p.digest), r.received.get(p.digest)) for p in r.policies],
            compilation=r.compilation, enforcers={n: attest.EnforcerPass(a, at) for n, a in r.applied.items()},
            audit_head=Head(0, GENESIS), operator=attest.Operator(f"{name.title()} Telecom", f"noc@{name}.example"),
            host=f"{name}-edge-1", now=at, seq=seq, enforced=enforced, previous_sha256=previous,
            reason="change" if r.changed else "periodic")
        _, previous = attest.issue(out, statement, key)
    numbered = sorted(out.glob("attestation-*.json"))
    if role == "tampered":
        victim = numbered[1]
        data = victim.read_bytes()
        victim.write_bytes(data.replace(b'"reason": "periodic"', b'"reason": "manual"', 1))
    if role == "gap":
        numbered[2].unlink()
        numbered[2].with_name(numbered[2].name + ".minisig").unlink()


async def generate(root: Path, operators: int = 6, now: datetime = NOW,
                   regulator_key: Path = ROOT / "policies/keys/demo-regulator.key") -> Fixture:
    """Write the fixture under `root` (which must not exist or be empty)."""
    if operators < 1 or operators > len(NAMES):
        raise ValueError(f"operators: {operators}; valid: 1..{len(NAMES)}")
    fx = Fixture(root, root / "regulator" / "policies", root / "keys", root / "statements",
                 {NAMES[i]: ROLES[i % len(ROLES)] for i in range(operators)}, now)
    for d in (fx.policies, fx.keys, fx.statements):
        d.mkdir(parents=True, exist_ok=True)
    secret = minisign.parse_secret_key(regulator_key.read_text(), where=str(regulator_key))
    policy = fx.policies / FILE
    policy.write_text(ORDERS)
    (fx.policies / f"{FILE}.minisig").write_text(
        minisign.sign(ORDERS.encode(), secret, trusted_comment=f"timestamp:{int(T0.timestamp())}\tfile:{FILE}"))
    for name, role in fx.operators.items():
        await _operator(name, role, fx, root / "operators", regulator_key)
    return fx


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m blockd.compliance.fixture", description=__doc__.splitlines()[0])
    p.add_argument("out", type=Path, help="directory to create")
    p.add_argument("--operators", type=int, default=len(ROLES), help=f"how many (1..{len(NAMES)})")
    p.add_argument("--now", default=f"{NOW:%Y-%m-%dT%H:%M:%SZ}", help="the time the regulator checks at")
    args = p.parse_args(argv)
    from blockd import logs

    logs.configure(json=False, level="warning")
    now = datetime.fromisoformat(args.now.replace("Z", "+00:00"))
    fx = asyncio.run(generate(args.out, args.operators, now))
    for name, role in fx.operators.items():
        print(f"{name}: {role}")
    print(f"blockd compliance --policies {fx.policies} --operators {fx.keys} --statements {fx.statements} "
          f"--now {args.now}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
