"""After a pass: (verified policies, Compilation, every configured enforcer's state, audit head) ->
a signed in-toto Statement of what blockd enforced, written to an export directory for regulators.

    build_statement(...)  pure -> dict   the Statement (docs/attestation.md documents every field)
    sign(statement, key)  -> (bytes, str) canonical JSON and its minisign signature (stock
                                          `minisign -Vm file.json -p operator.pub` verifies it)
    write(dir, ...)       -> Path        attestation-<UTC time>-<seq>.json + .minisig, then
                                          latest.json + latest.json.minisig, each atomically
    verify(path, key)     -> dict        the Statement, or SignatureError saying what is wrong
    check(statement)      pure -> [str]  the regulator's checks: every enforcer holds its share
    chain(statements)     pure -> [str]  gaps and broken links between statements

Per enforcer the statement carries the digest of its own share of the rule set (names for the
sinkhole, addresses for the kernel) next to what it committed (acknowledged) and what was READ
BACK from it (`Applied.digest`, with when and how much), so the regulator's check is one
equality per enforcer. A failed enforcer is listed as failed, with its error; its orders are
not enforced there. Lists that grow with the rule set (findings, orders) are capped; their
totals and the SHA-256 of the full canonical list are always present, so the file stays
bounded at 1M rules.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any

import structlog

from blockd import __version__, minisign, tte
from blockd.audit import Head, canonical, iso
from blockd.compile import Compilation, order_key
from blockd.errors import SignatureError
from blockd.fsutil import atomic_write
from blockd.model import Applied, Finding, Policy, RuleSet

log = structlog.get_logger("blockd.attest")

STATEMENT_TYPE = "https://in-toto.io/Statement/v1"
PREDICATE_TYPE = "https://blockd.dev/attestation/enforcement/v1"
_NAME = re.compile(r"attestation-(\d{8}T\d{6}Z)-(\d{6,})\.json\Z")


@dataclass(frozen=True, slots=True)
class Received:
    """A policy that passed intake, and when its file was first seen and when it was verified.
    `pending`: verified, but its not_before is still ahead (nothing of it is enforced yet)."""

    policy: Policy
    received_at: datetime | None
    verified_at: datetime | None
    pending: bool = False


@dataclass(frozen=True, slots=True)
class RejectedFile:
    """A policy file intake refused (bad signature, schema, replay ...): name, why, its SHA-256."""

    name: str
    reason: str
    sha256: str | None = None
    received_at: datetime | None = None


@dataclass(frozen=True, slots=True)
class EnforcerPass:
    """One configured enforcer in a statement.

    `applied`: its last successful apply (or full read-back), None if it never applied;
    `at`: when that finished; `error`: why its last apply failed (None: it did not), and then
    `applied` is older than this rule set; `share_digest`: the digest of its share of this
    pass's rule set (names, addresses, ...), by default `applied.desired_digest`."""

    applied: Applied | None
    at: datetime
    error: str | None = None
    share_digest: str | None = None

    @property
    def share(self) -> str:
        d = self.share_digest or (self.applied.desired_digest if self.applied else None)
        if d is None:
            raise ValueError("an EnforcerPass needs share_digest when it has no Applied")
        return d

    @property
    def in_sync(self) -> bool:
        """Applied without error, and what was read back is this rule set's share."""
        return self.error is None and self.applied is not None and self.applied.digest == self.share


#: The shares of a rule set an enforcer can hold, in the order their names are tried.
SHARES = ("names", "addresses", "ipv4_addresses", "all")


def shares(ruleset: RuleSet) -> dict[str, str]:
    """Share name -> digest: what each kind of enforcer must read back to be in sync."""
    return {
        "names": ruleset.share_digest(v4=False, v6=False),
        "addresses": ruleset.share_digest(names=False),
        "ipv4_addresses": ruleset.share_digest(names=False, v6=False),
        "all": ruleset.digest,
    }


@dataclass(frozen=True, slots=True)
class Operator:
    name: str
    contact: str = ""


@dataclass(frozen=True, slots=True)
class Limits:
    max_findings: int = 1000
    max_orders: int = 10_000
    max_warnings: int = 100


def attestation_id(now: datetime, seq: int) -> str:
    return f"{iso(now)[:19].replace('-', '').replace(':', '')}Z-{seq:06d}"


def file_name(statement: Mapping[str, Any]) -> str:
    return f"attestation-{statement['predicate']['attestation']['id']}.json"


def build_statement(
    *,
    policies: Sequence[Received],
    compilation: Compilation,
    enforcers: Mapping[str, EnforcerPass],
    audit_head: Head | None,
    operator: Operator,
    host: str,
    now: datetime,
    seq: int,
    enforced: tte.EnforcedAt | None = None,
    rejected: Sequence[RejectedFile] = (),
    previous_sha256: str | None = None,
    reason: str = "change",
    version: str = __version__,
    limits: Limits = Limits(),
    parts: Mapping[str, str] | None = None,
    drift_repairs: Sequence[Mapping[str, Any]] = (),
) -> dict[str, Any]:
    """Pure. `enforcers` holds every configured enforcer, failed ones too. `enforced` is the
    daemon's `tte.record` (first time each enforcer held each order version); without it, this
    pass's in-sync enforcers are taken as the first. `reason` is `change` (a pass changed
    something), `periodic`, `manual`, `retry` (an earlier write failed) or `drift_repair` (an
    enforcer was found not holding its share and was repaired: `drift_repairs` says what, when). `parts`:
    `shares(compilation.ruleset)` if already computed (seconds at 1M rules)."""
    plist = [r.policy for r in policies]
    active = [r.policy for r in policies if not r.pending]
    pending = {r.policy.digest for r in policies if r.pending}
    if enforced is None:
        synced = {n: (e.at if e.in_sync else None) for n, e in enforcers.items()}
        enforced = tte.record({}, active, compilation.orders, synced)
    failing = sorted(n for n, e in enforcers.items() if not e.in_sync)
    times = {r.policy.digest: (r.received_at, r.verified_at) for r in policies}
    timings = tte.order_timings(plist, compilation.orders, times, enforced, list(enforcers), now,
                                pending=pending, failing=failing)
    refusals = _refusals(compilation.findings)
    first: dict[str, dict[str, str]] = {}
    for f in sorted(compilation.findings, key=lambda f: (f.rule, f.guard)):
        if not f.allowed:
            first.setdefault(f.order_id, {"rule": f.rule, "guard": f.guard, "reason": f.reason})

    current = tte.newest(active)
    per_policy: list[list[dict[str, Any]]] = []
    for r in policies:
        p = r.policy
        per_policy.append([])
        source = _name(p.source)
        for o in p.orders:
            key = order_key(p, o)
            t = timings[tte.version_key(p, o)]
            result = compilation.orders.get(key)
            if r.pending:
                status = "pending"
            elif current.get(p.issuer) is not p:
                status = "superseded"
            else:
                status = result.status if result else "pending"
            held = status in ("enforced", "partially_refused", "unblock")
            per_policy[-1].append({
                "policy": source, "key": key, "id": o.id, "serial": p.serial, "action": o.action,
                "legal_basis": {"authority": o.legal_basis.authority, "reference": o.legal_basis.reference,
                                "url": o.legal_basis.url},
                "status": "unblocked" if status == "unblock" else status,
                "pending_until": p.not_before if status == "pending" else None,
                "rules": result.rules if result and status not in ("superseded", "pending") else 0,
                "refused": refusals.get(key, {}) if status not in ("superseded", "pending") else {},
                "first_refusal": first.get(key) if status in ("refused", "partially_refused") else None,
                # enforcers that do not hold this rule set now (failed, or read back different)
                "not_enforced_on": failing if held else [],
                "issued_at": t.issued_at, "received_at": t.received_at, "verified_at": t.verified_at,
                "enforced_at": dict(t.enforced_at), "enforced_everywhere_at": t.enforced_everywhere_at,
                "issued_to_enforced_s": t.issued_to_enforced_s,
                "received_to_enforced_s": t.received_to_enforced_s,
                "deadline": t.deadline, "deadline_status": t.deadline_status,
            })
    orders = [o for group in per_policy for o in group]
    listed = _select(orders, limits.max_orders)

    ruleset = compilation.ruleset
    parts = dict(parts) if parts is not None else shares(ruleset)
    enforcer_json = {name: _enforcer(e, parts) for name, e in sorted(enforcers.items())}
    findings = sorted(compilation.findings, key=lambda f: (f.allowed, f.order_id, f.rule, f.guard, f.reason))
    finding_json = [{"order": f.order_id, "rule": f.rule, "guard": f.guard, "reason": f.reason,
                     "allowed": f.allowed} for f in findings]
    by_guard: dict[str, dict[str, int]] = {}
    for f in findings:
        g = by_guard.setdefault(f.guard, {"refused": 0, "allowed": 0})
        g["allowed" if f.allowed else "refused"] += 1
    aid = attestation_id(now, seq)
    subject = sorted(({"name": _name(p.source), "digest": {"sha256": p.digest}} for p in plist),
                     key=lambda s: (s["name"], s["digest"]["sha256"]))
    statement = {
        "_type": STATEMENT_TYPE,
        "subject": subject,
        "predicateType": PREDICATE_TYPE,
        "predicate": {
            "attestation": {"id": aid, "seq": seq, "issued_at": now, "reason": reason,
                            "previous_sha256": previous_sha256},
            "drift_repairs": [dict(d) for d in drift_repairs],
            "operator": {"name": operator.name, "contact": operator.contact},
            "producer": {"name": "blockd", "version": version, "host": host},
            "ruleset": {"digest": ruleset.digest, "counts": ruleset.counts(), "rules": len(ruleset),
                        "shares": parts},
            "enforcers": enforcer_json,
            "in_sync": bool(enforcer_json) and all(e["in_sync"] for e in enforcer_json.values()),
            "policies": [_policy(r, "pending" if r.pending else compilation.policies.get(r.policy.source, "not_compiled"),
                                 [o for o in group if id(o) in listed])
                         for r, group in sorted(zip(policies, per_policy),
                                                key=lambda x: (x[0].policy.issuer, x[0].policy.serial))],
            "orders": {
                "total": len(orders), "listed": len(listed), "truncated": len(listed) < len(orders),
                "by_status": _count(o["status"] for o in orders),
                "by_deadline_status": _count(o["deadline_status"] for o in orders),
                "sha256": _sha256(orders),
            },
            "rejected": [{"name": x.name, "reason": x.reason, "sha256": x.sha256, "received_at": x.received_at}
                         for x in sorted(rejected, key=lambda x: x.name)],
            "findings": {
                "total": len(findings), "refused": sum(not f.allowed for f in findings),
                "allowed": sum(f.allowed for f in findings), "by_guard": by_guard,
                "listed": finding_json[: limits.max_findings],
                "truncated": len(findings) > limits.max_findings, "sha256": _sha256(finding_json),
            },
            "warnings": {"total": len(compilation.warnings),
                         "listed": list(compilation.warnings[: limits.max_warnings])},
            # None: the audit log is configured but could not be opened (it is retried)
            "audit": {"seq": audit_head.seq if audit_head else None,
                      "sha256": audit_head.sha256 if audit_head else None},
        },
    }
    # Normalise datetimes etc. to JSON types now, so the dict equals what `verify` returns.
    result: dict[str, Any] = json.loads(canonical(statement))
    return result


def _enforcer(e: EnforcerPass, parts: Mapping[str, str]) -> dict[str, Any]:
    """One enforcer's entry: its share's digest next to what was committed and what was read."""
    a = e.applied
    share = e.share
    name = next((n for n in SHARES if parts[n] == share), "other")
    status = "failed" if e.error is not None else ("in_sync" if e.in_sync else "out_of_sync")
    return {
        "status": status, "error": e.error, "in_sync": status == "in_sync",
        "share": name, "share_digest": share,
        # acknowledged by the backend (every netlink message ACKed, the table swapped, ...)
        "committed_digest": a.desired_digest if a else None,
        # computed over what was read back from the backend at readback_at
        "readback_digest": a.digest if a else None,
        "readback_scope": a.readback_scope if a else None,
        "readback_at": (a.readback_at or e.at) if a else None,
        "full_readback_at": a.full_readback_at if a else None,
        "counts": dict(a.counts) if a else {}, "added": a.added if a else 0, "removed": a.removed if a else 0,
        "duration_s": round(a.duration_s, 6) if a else 0.0, "applied_at": e.at if a else None,
    }


def _name(source: str) -> str:
    """The file name only: a host path says nothing to a regulator and may leak layout."""
    return Path(source).name or source


def _policy(r: Received, status: str, orders: list[dict[str, Any]]) -> dict[str, Any]:
    p = r.policy
    return {
        "name": _name(p.source), "sha256": p.digest, "issuer": p.issuer, "serial": p.serial, "status": status,
        "signers": sorted(p.signers), "issued_at": p.issued_at, "not_before": p.not_before,
        "not_after": p.not_after, "received_at": r.received_at, "verified_at": r.verified_at,
        "orders_total": len(p.orders),
        "orders": orders,
    }


def _refusals(findings: Sequence[Finding]) -> dict[str, dict[str, int]]:
    out: dict[str, dict[str, int]] = {}
    for f in findings:
        if not f.allowed:
            per = out.setdefault(f.order_id, {})
            per[f.guard] = per.get(f.guard, 0) + 1
    return out


_RANK = {"missed": 0, "refused": 1, "open": 2}


def _select(orders: list[dict[str, Any]], limit: int) -> set[int]:
    """The orders to list when there are more than `limit`: missed deadlines, then refusals, then
    open deadlines, then the rest; within a rank by key. Returns their `id()`s."""
    if len(orders) <= limit:
        return {id(o) for o in orders}

    def rank(o: dict[str, Any]) -> tuple[int, int, str, int]:
        refused = 1 if o["status"] in ("refused", "partially_refused") else 0
        return (_RANK.get(o["deadline_status"], 3), -refused, o["key"], o["serial"])

    return {id(o) for o in sorted(orders, key=rank)[:limit]}


def _count(values: Any) -> dict[str, int]:
    out: dict[str, int] = {}
    for v in values:
        out[v] = out.get(v, 0) + 1
    return out


def _sha256(items: list[dict[str, Any]]) -> str:
    """SHA-256 of the canonical JSON of a full list, so a list shipped separately can be checked."""
    return hashlib.sha256(canonical(items)).hexdigest()


def encode(statement: Mapping[str, Any]) -> bytes:
    """The exact bytes that are signed: canonical JSON, 2-space indent, newline at the end."""
    return canonical(statement, indent=2) + b"\n"


def trusted_comment(statement: Mapping[str, Any]) -> str:
    pred = statement["predicate"]
    at = datetime.fromisoformat(pred["attestation"]["issued_at"].replace("Z", "+00:00"))
    return (f"timestamp:{int(at.timestamp())}\tfile:{file_name(statement)}\tid:{pred['attestation']['id']}"
            f"\truleset:{pred['ruleset']['digest']}\tin_sync:{str(pred['in_sync']).lower()}")


def sign(statement: Mapping[str, Any], key: minisign.SecretKey) -> tuple[bytes, str]:
    """(canonical JSON bytes, minisign signature text). Deterministic for the same input and key."""
    data = encode(statement)
    sig = minisign.sign(data, key, trusted_comment=trusted_comment(statement),
                        untrusted_comment=f"blockd attestation signature by operator key {key.public.id_hex}")
    return data, sig


def last(export_dir: Path) -> tuple[int, str] | None:
    """The highest-numbered attestation in `export_dir`: (seq, SHA-256 of its bytes), or None."""
    best: tuple[int, Path] | None = None
    if export_dir.is_dir():
        for p in export_dir.iterdir():
            m = _NAME.match(p.name)
            if m and (best is None or int(m.group(2)) > best[0]):
                best = (int(m.group(2)), p)
    if best is None:
        return None
    return best[0], hashlib.sha256(best[1].read_bytes()).hexdigest()


def write(export_dir: Path, data: bytes, signature: str, *, name: str) -> Path:
    """Write `name` and `name.minisig`, then latest.json(.minisig). The signature goes first, so a
    picker that keys on `*.json` never sees a statement without its signature. latest.json and its
    signature are each replaced atomically, but not together: a reader that fails to verify
    latest.json should re-read it (or use the numbered file, which never changes)."""
    if not _NAME.match(name):
        raise ValueError(f"attestation file name {name!r} must look like attestation-YYYYMMDDTHHMMSSZ-000001.json")
    path = export_dir / name
    sig = signature.encode()
    atomic_write(path.with_name(name + ".minisig"), sig)
    atomic_write(path, data)
    atomic_write(export_dir / "latest.json.minisig", sig)
    atomic_write(export_dir / "latest.json", data)
    log.info("attestation_written", path=str(path), bytes=len(data))
    return path


def issue(export_dir: Path, statement: Mapping[str, Any], key: minisign.SecretKey) -> tuple[Path, str]:
    """Sign and write; return the path and the SHA-256 of the JSON (for the audit log)."""
    data, sig = sign(statement, key)
    return write(export_dir, data, sig, name=file_name(statement)), hashlib.sha256(data).hexdigest()


def verify(json_path: Path, public_key: minisign.PublicKey, *, signature_path: Path | None = None) -> dict[str, Any]:
    """Check `json_path` against its detached signature (default `<json_path>.minisig`) and return
    the Statement. SignatureError says which file and what failed."""
    where = str(json_path)
    sig_path = signature_path or json_path.with_name(json_path.name + ".minisig")
    try:
        data = json_path.read_bytes()
    except FileNotFoundError:
        raise SignatureError("attestation file not found", where=where) from None
    try:
        sig_text = sig_path.read_text()
    except FileNotFoundError:
        raise SignatureError(f"signature file {sig_path.name} not found beside the attestation", where=where) from None
    sig = minisign.parse_signature(sig_text, where=str(sig_path))
    minisign.verify(data, sig, public_key, where=where)
    try:
        statement = json.loads(data)
    except (UnicodeDecodeError, ValueError) as e:
        raise SignatureError(f"signed, but not JSON ({e})", where=where) from None
    if not isinstance(statement, dict) or statement.get("_type") != STATEMENT_TYPE:
        raise SignatureError(f"signed, but _type is not {STATEMENT_TYPE!r}", where=where)
    if statement.get("predicateType") != PREDICATE_TYPE:
        raise SignatureError(
            f"signed, but predicateType is {statement.get('predicateType')!r}; expected {PREDICATE_TYPE!r}",
            where=where,
        )
    fields = dict(f.split(":", 1) for f in sig.trusted_comment.split("\t") if ":" in f)
    aid = statement["predicate"]["attestation"]["id"]
    if fields.get("id") != aid:
        raise SignatureError(
            f"trusted comment names attestation {fields.get('id')!r} but the statement is {aid!r}", where=where
        )
    return statement


def audit_head(statement: Mapping[str, Any]) -> Head | None:
    """The audit-log head a statement binds: pass it to `audit.verify(..., anchors=[...])`.
    None when the statement was made while the audit log could not be opened."""
    a = statement["predicate"]["audit"]
    if a["seq"] is None:
        return None
    return Head(int(a["seq"]), str(a["sha256"]))


def check(statement: Mapping[str, Any]) -> list[str]:
    """Pure: the regulator's checks of a signed statement (docs/attestation.md, "How to verify",
    steps 3-4), one problem per line; empty when the statement attests full enforcement.

    Per enforcer: not failed; its share digest is the rule set's share of that name; and the
    digest read back from it equals its share digest. Then the statement's own `in_sync`."""
    pred = statement["predicate"]
    parts = pred["ruleset"].get("shares", {})
    problems = []
    if not pred["enforcers"]:
        problems.append("no enforcer is listed: nothing is attested as enforced")
    for name, e in sorted(pred["enforcers"].items()):
        if e.get("status") == "failed":
            problems.append(f"enforcer {name}: failed: {e.get('error')}")
            continue
        want = parts.get(e.get("share"))
        if want is None or e.get("share_digest") != want:
            problems.append(f"enforcer {name}: share {e.get('share')!r} digest {e.get('share_digest')} is not the "
                            f"rule set's ({want}); known shares: {', '.join(sorted(parts))}")
        if e.get("readback_digest") != e.get("share_digest"):
            problems.append(f"enforcer {name}: read back {e.get('readback_digest')} at {e.get('readback_at')} but its "
                            f"share ({e.get('share')}) is {e.get('share_digest')}: it does not hold what was ordered")
        elif not e.get("in_sync"):
            problems.append(f"enforcer {name}: in_sync is false")
    if not pred["in_sync"] and not problems:
        problems.append("in_sync is false")
    return problems


def chain(statements: Sequence[tuple[str, str, Mapping[str, Any]]]) -> list[str]:
    """Pure: gaps and broken links in a set of statements from one export directory, given as
    (file name, SHA-256 of its bytes, statement). Sorted by seq, each must follow the one
    before (seq + 1) and name its SHA-256 as `previous_sha256`."""
    items = sorted(statements, key=lambda x: x[2]["predicate"]["attestation"]["seq"])
    problems = []
    for (pname, psha, pst), (name, _, st) in zip(items, items[1:]):
        a, b = pst["predicate"]["attestation"], st["predicate"]["attestation"]
        if b["seq"] == a["seq"]:
            problems.append(f"{name}: seq {b['seq']} again (also {pname})")
        elif b["seq"] != a["seq"] + 1:
            missing = f"{a['seq'] + 1}" if b["seq"] == a["seq"] + 2 else f"{a['seq'] + 1}..{b['seq'] - 1}"
            problems.append(f"statement seq {missing} missing between {pname} (seq {a['seq']}) and {name} "
                            f"(seq {b['seq']})")
        elif b["previous_sha256"] != psha:
            problems.append(f"{name}: previous_sha256 is {b['previous_sha256']} but {pname} (seq {a['seq']}) hashes "
                            f"to {psha}: the chain is broken here")
    return problems
