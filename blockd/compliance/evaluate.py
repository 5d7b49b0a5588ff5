"""Pure: the orders as issued (and what they expand to) x each operator's verified statements,
at `now` -> a Report: per order x operator a Cell, per operator its chain and read-back.

Times come from the regulator's own policies (issued_at, deadline), never from the operator's
copy; the operator contributes only what its signed statements say it enforced, and when.

Cell verdicts, first match wins:

    no_statement   no verified statement from this operator at all
    disagrees      the operator's statement covers this issuer/serial with other bytes
    late           enforced everywhere after the deadline
    missed         not enforced and the deadline has passed
    pending        not enforced yet, deadline ahead (or none)
    out_of_sync    enforced once, but the latest statement is stale, not in sync, or lacks it
    complies       enforced by the deadline (if any) and in sync in a fresh latest statement

An operator complies when every cell does and its statement chain has no problem (a file that
fails to verify, a gap or broken link, a fork, a stale latest statement, read-back counts that
differ from the expansion).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime

from blockd.compile import Compilation, order_key
from blockd.compliance.statements import KINDS, Failure, OperatorKey, Statement
from blockd.model import Policy, RuleSet

HELD = frozenset({"enforced", "partially_refused", "unblocked", "unblock"})
EXIT_COMPLY, EXIT_NOT_COMPLY, EXIT_PENDING = 0, 1, 3
#: a statement dated more than this after `now` is reported (clocks differ by seconds, not minutes)
FUTURE_SLACK_S = 300


@dataclass(frozen=True, slots=True)
class ExpectedOrder:
    key: str
    id: str
    issuer: str
    serial: int
    policy: str
    policy_sha256: str
    action: str
    reference: str
    issued_at: datetime
    deadline: datetime | None
    status: str  # the regulator's own compile of it: enforced, refused, ...
    rules: int


@dataclass(frozen=True, slots=True)
class Expected:
    orders: tuple[ExpectedOrder, ...]
    counts: Mapping[str, int]
    ruleset_digest: str
    policies: Mapping[str, str]  # sha256 -> file name


def expected(policies: Sequence[Policy], compilation: Compilation) -> Expected:
    orders = []
    for p in sorted(policies, key=lambda p: (p.issuer, p.serial)):
        for o in p.orders:
            res = compilation.orders.get(order_key(p, o))
            orders.append(ExpectedOrder(
                order_key(p, o), o.id, p.issuer, p.serial, _name(p.source), p.digest, o.action,
                o.legal_basis.reference, p.issued_at, o.deadline, res.status if res else "not_compiled",
                res.rules if res else 0))
    return Expected(tuple(orders), expected_counts(compilation.ruleset), compilation.ruleset.digest,
                    {p.digest: _name(p.source) for p in policies})


def expected_counts(rs: RuleSet) -> dict[str, int]:
    """What a rule set comes to in each enforcer's own unit, computed with the enforcers' own
    pure functions: the rule set's kinds, nft's interval elements, ipset's CIDRs, BGP prefixes."""
    from blockd.enforcers.bgp import prefixes_of
    from blockd.enforcers.ipset import cidr_keys
    from blockd.enforcers.nft import piece_keys

    prefixes = prefixes_of(rs)
    out = dict(rs.counts())
    for v, rules in ((4, rs.v4), (6, rs.v6)):
        out[f"ipv{v}_elements"] = len(piece_keys(v, rules))
        out[f"ipv{v}_cidrs"] = len(cidr_keys(v, rules))
        out[f"ipv{v}_prefixes"] = len(prefixes[v])
    return out


def _name(source: str) -> str:
    return source.replace("\\", "/").rsplit("/", 1)[-1]


@dataclass(frozen=True, slots=True)
class Cell:
    order: str
    serial: int
    operator: str
    verdict: str
    where: tuple[str, ...]  # kernel, dns, rpz, bgp ... that held it
    first_enforced_at: datetime | None
    issued_to_enforced_s: float | None
    received_at: datetime | None
    received_to_enforced_s: float | None
    deadline: datetime | None
    deadline_status: str  # met, missed, pending, none
    in_sync: bool | None  # None: the latest statement does not say
    rules: int | None
    expected_rules: int
    evidence: str | None  # the statement file the first-enforced time rests on
    latest: str | None  # the statement file the in-sync state rests on
    problems: tuple[str, ...] = ()

    @property
    def complies(self) -> bool:
        return self.verdict == "complies"


@dataclass(frozen=True, slots=True)
class Readback:
    enforcer: str
    where: str
    kind: str
    got: int | None
    expected: int


@dataclass(frozen=True, slots=True)
class OperatorSummary:
    name: str
    key_id: str
    statements: int
    first_seq: int | None
    last_seq: int | None
    latest_at: datetime | None
    latest: str | None
    stale: bool
    in_sync: bool | None
    readback: tuple[Readback, ...]
    failures: tuple[Failure, ...]
    problems: tuple[str, ...]  # the chain's and the read-back's; per order see `failing`
    complies: bool
    failing: tuple[str, ...] = ()  # "<order key>: <verdict>" for each cell that does not comply


@dataclass(frozen=True, slots=True)
class Report:
    generated_at: datetime
    max_age_s: float
    expected: Expected
    operators: tuple[OperatorSummary, ...]
    cells: tuple[Cell, ...]
    unattributed: tuple[Failure, ...]
    verdict: str  # comply, not_comply, pending
    exit_code: int


def chain_problems(chain: Sequence[Statement]) -> list[str]:
    """Gaps, forks and broken links in one operator's statements (sorted by seq, deduplicated)."""
    problems: list[str] = []
    if not chain:
        return problems
    if chain[0].seq > 1:
        problems.append(f"statements seq 1..{chain[0].seq - 1} are missing (the first held is seq {chain[0].seq})")
    for prev, cur in zip(chain, chain[1:]):
        if cur.seq == prev.seq:
            problems.append(f"seq {cur.seq}: two different statements ({prev.path}, {cur.path}): a forked chain")
        elif cur.seq > prev.seq + 1:
            gap = f"{prev.seq + 1}" if cur.seq == prev.seq + 2 else f"{prev.seq + 1}..{cur.seq - 1}"
            problems.append(f"seq {gap} missing between {prev.path} and {cur.path}")
        elif cur.issued_at < prev.issued_at:
            problems.append(f"seq {cur.seq} ({cur.path}) was issued {cur.issued_at:%Y-%m-%dT%H:%M:%SZ}, before seq "
                            f"{prev.seq} ({prev.issued_at:%Y-%m-%dT%H:%M:%SZ}): its times cannot be trusted")
        elif cur.previous_sha256 != prev.sha256:
            problems.append(f"seq {cur.seq} ({cur.path}) names previous sha256 {str(cur.previous_sha256)[:16]}… "
                            f"but seq {prev.seq} hashes to {prev.sha256[:16]}…: a statement was replaced")
    return problems


def _dedupe(statements: Sequence[Statement]) -> list[Statement]:
    """One entry per distinct file content (latest.json repeats a numbered file), by seq."""
    by_sha: dict[str, Statement] = {}
    for s in sorted(statements, key=lambda s: ("latest" in s.path.rsplit("/", 1)[-1], s.path)):
        by_sha.setdefault(s.sha256, s)
    return sorted(by_sha.values(), key=lambda s: (s.seq, s.path))


def evaluate(exp: Expected, keys: Mapping[bytes, OperatorKey], statements: Sequence[Statement],
             failures: Sequence[Failure], now: datetime, max_age_s: float) -> Report:
    names = sorted({k.operator for k in keys.values()} | {f.operator for f in failures if f.operator})
    key_ids = {k.operator: k.key.id_hex for k in keys.values()}
    cells: list[Cell] = []
    summaries: list[OperatorSummary] = []
    for name in names:
        chain = _dedupe([s for s in statements if s.operator == name])
        fails = tuple(f for f in failures if f.operator == name)
        problems = [f"does not verify: {f.reason}" if f.reason.startswith(f.path) else f"{f.path}: {f.reason}"
                    for f in fails]
        problems += chain_problems(chain)
        latest = chain[-1] if chain else None
        stale = latest is not None and (now - latest.issued_at).total_seconds() > max_age_s
        future = [s for s in chain if (s.issued_at - now).total_seconds() > FUTURE_SLACK_S]
        if future:
            problems.append(f"{future[0].path} is dated {future[0].issued_at:%Y-%m-%dT%H:%M:%SZ}, after now "
                            f"({now:%Y-%m-%dT%H:%M:%SZ}): a clock ahead, or a statement made for later")
        if latest is None:
            problems.append("no verified statement received")
        elif stale:
            problems.append(f"latest statement {latest.path} was issued {latest.issued_at:%Y-%m-%dT%H:%M:%SZ}, "
                            f"more than {max_age_s:g} s before {now:%Y-%m-%dT%H:%M:%SZ}: stale")
        readback = _readback(exp, latest) if latest else ()
        problems += [f"latest statement: enforcer {e.name} ({e.where}) failed" for e in (latest.enforcers if latest else ())
                     if e.failed]
        problems += [f"latest statement: {r.enforcer} ({r.where}) read back {r.got} {r.kind}; the orders expand "
                     f"to {r.expected}" for r in readback if r.got != r.expected]
        own = [_cell(o, name, chain, latest, stale, now) for o in exp.orders]
        cells += own
        in_sync = None if latest is None else (latest.in_sync and not stale)
        summaries.append(OperatorSummary(
            name, key_ids.get(name, ""), len(chain), chain[0].seq if chain else None,
            latest.seq if latest else None, latest.issued_at if latest else None, latest.path if latest else None,
            stale, in_sync, readback, fails, tuple(problems),
            not problems and all(c.complies or c.verdict == "refused" for c in own),
            tuple(f"{c.order}: {c.verdict}" for c in own if not c.complies and c.verdict != "refused")))
    unattributed = tuple(f for f in failures if f.operator is None)
    if all(s.complies for s in summaries) and not unattributed:
        verdict, code = "comply", EXIT_COMPLY
    elif all(not s.problems for s in summaries) and not unattributed and all(
            c.verdict in ("complies", "pending", "refused") for c in cells):
        verdict, code = "pending", EXIT_PENDING
    else:
        verdict, code = "not_comply", EXIT_NOT_COMPLY
    return Report(now, max_age_s, exp, tuple(summaries), tuple(cells), unattributed, verdict, code)


def _readback(exp: Expected, latest: Statement) -> tuple[Readback, ...]:
    """Per enforcer and rule kind it holds: its read-back count against the expansion. Compared
    only when the statement covers exactly the regulator's policies (else the counts include
    other issuers' orders and say nothing about these)."""
    if {p.sha256 for p in latest.policies} != set(exp.policies):
        return ()
    out = []
    for e in latest.enforcers:
        for kind in KINDS.get(e.where, ()):
            if kind not in e.counts or kind not in exp.counts:
                continue
            if kind == "ipv6_prefixes" and e.counts[kind] == 0:
                continue  # a BGP session without the IPv6 family announces none, by configuration
            out.append(Readback(e.name, e.where, kind, e.counts[kind], exp.counts[kind]))
    return tuple(out)


def _cell(o: ExpectedOrder, operator: str, chain: Sequence[Statement], latest: Statement | None,
          stale: bool, now: datetime) -> Cell:
    problems: list[str] = []
    first, evidence, received = None, None, None
    where: set[str] = set()
    for s in chain:
        claim = s.orders.get((o.key, o.serial))
        if claim is None:
            continue
        received = received or claim.received_at
        if claim.enforced_everywhere_at is not None and first is None:
            first, evidence = claim.enforced_everywhere_at, s.path
            by_name = {e.name: e.where for e in s.enforcers}
            where = {by_name.get(n, n) for n in claim.enforced_at}
            if first > s.issued_at:
                problems.append(f"{s.path} claims enforcement at {first:%Y-%m-%dT%H:%M:%SZ}, after the statement "
                                "itself was issued")
            if first < o.issued_at:
                problems.append(f"{s.path} claims enforcement at {first:%Y-%m-%dT%H:%M:%SZ}, before the order was "
                                f"issued ({o.issued_at:%Y-%m-%dT%H:%M:%SZ})")
    if first is not None and evidence is not None:
        # A backdated claim: a statement issued after the claimed time that does not show the
        # order enforced contradicts it. The chain then supports only the evidence's own time.
        for s in chain:
            if s.path == evidence:
                break
            c = s.orders.get((o.key, o.serial))
            if s.issued_at >= first and (c is None or c.enforced_everywhere_at is None):
                problems.append(f"{evidence} claims enforcement since {first:%Y-%m-%dT%H:%M:%SZ}, but {s.path} "
                                f"(issued {s.issued_at:%Y-%m-%dT%H:%M:%SZ}) does not show it enforced; counted "
                                "from the statement that first does")
                first = next(x.issued_at for x in chain if x.path == evidence)
                break
    disagree = [f"{s.path} covers {p.name or o.policy} ({p.issuer} serial {p.serial}) with sha256 {p.sha256[:16]}…; "
                f"the regulator issued {o.policy_sha256[:16]}…"
                for s in chain for p in s.policies
                if p.issuer == o.issuer and p.serial == o.serial and p.sha256 != o.policy_sha256]
    problems += disagree[:1]
    claim = latest.orders.get((o.key, o.serial)) if latest else None
    in_sync: bool | None
    if latest is None:
        in_sync = None
    elif claim is None:
        in_sync = None if latest.orders_truncated else False
        if first is not None:
            problems.append(f"the latest statement {latest.path} " + (
                "does not list it (list truncated)" if latest.orders_truncated else "no longer lists it"))
    else:
        in_sync = claim.status in HELD and latest.in_sync and not stale
    if first is not None and first < o.issued_at:
        first = None  # an impossible claim is not counted as enforcement
    if o.deadline is None:
        dstatus = "none"
    elif first is not None:
        dstatus = "met" if first <= o.deadline else "missed"
    else:
        dstatus = "missed" if now > o.deadline else "pending"
    rules = claim.rules if claim else None
    if rules is not None and rules != o.rules:
        problems.append(f"the latest statement gives {rules} rules for this order; it expands to {o.rules}")
    if not chain:
        verdict = "no_statement"
    elif disagree:
        verdict = "disagrees"
    elif o.status == "refused" and first is None:
        verdict = "refused"  # every rule refused by the guards: there is nothing to enforce
    elif first is not None and dstatus == "missed":
        verdict = "late"
    elif first is None:
        verdict = "missed" if dstatus == "missed" else "pending"
    elif not in_sync or problems:
        verdict = "out_of_sync"
    else:
        verdict = "complies"
    return Cell(
        o.key, o.serial, operator, verdict, tuple(sorted(where)), first, _secs(o.issued_at, first), received,
        _secs(received, first), o.deadline, dstatus, in_sync, rules, o.rules, evidence,
        latest.path if latest else None, tuple(problems))


def _secs(start: datetime | None, end: datetime | None) -> float | None:
    return None if start is None or end is None else round((end - start).total_seconds(), 3)
