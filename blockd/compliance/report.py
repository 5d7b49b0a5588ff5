"""Report -> the `--json` document (schema: docs/compliance.schema.json) and the text table.

Pure. The JSON is the one representation: the text and the HTML page are drawn from it, so the
three never disagree.
"""

from __future__ import annotations

from typing import Any

from blockd.audit import iso
from blockd.compliance.evaluate import Report

SCHEMA = "https://blockd.dev/compliance/report/v1"
EXIT_INPUT = 2
VERDICTS = ("complies", "late", "missed", "pending", "out_of_sync", "disagrees", "no_statement", "refused")


def _t(v: Any) -> str | None:
    return iso(v) if v is not None else None


def to_json(r: Report, *, refused_inputs: list[dict[str, object]] | None = None) -> dict[str, Any]:
    e = r.expected
    cells = [{
        "order": c.order, "serial": c.serial, "operator": c.operator, "verdict": c.verdict,
        "complies": c.complies, "where": list(c.where), "first_enforced_at": _t(c.first_enforced_at),
        "issued_to_enforced_s": c.issued_to_enforced_s, "received_at": _t(c.received_at),
        "received_to_enforced_s": c.received_to_enforced_s, "deadline": _t(c.deadline),
        "deadline_status": c.deadline_status, "in_sync": c.in_sync, "rules": c.rules,
        "expected_rules": c.expected_rules, "evidence": c.evidence, "latest": c.latest,
        "problems": list(c.problems),
    } for c in r.cells]
    operators = [{
        "name": s.name, "key_id": s.key_id, "complies": s.complies, "statements": s.statements,
        "first_seq": s.first_seq, "last_seq": s.last_seq, "latest_at": _t(s.latest_at), "latest": s.latest,
        "stale": s.stale, "in_sync": s.in_sync,
        "readback": [{"enforcer": x.enforcer, "where": x.where, "kind": x.kind, "got": x.got, "expected": x.expected}
                     for x in s.readback],
        "failed": [{"path": f.path, "reason": f.reason} for f in s.failures],
        "problems": list(s.problems),
        "failing": list(s.failing),
    } for s in r.operators]
    by_verdict = {v: sum(c.verdict == v for c in r.cells) for v in VERDICTS}
    refused_inputs = refused_inputs or []
    exit_code = EXIT_INPUT if any(not x.get("skipped") for x in refused_inputs) and r.exit_code != 1 else r.exit_code
    return {
        "schema": SCHEMA,
        "generated_at": iso(r.generated_at),
        "max_age_s": r.max_age_s,
        "verdict": r.verdict,
        "exit_code": exit_code,
        "orders": [{"key": o.key, "id": o.id, "issuer": o.issuer, "serial": o.serial, "policy": o.policy,
                    "policy_sha256": o.policy_sha256, "action": o.action, "reference": o.reference,
                    "issued_at": iso(o.issued_at), "deadline": _t(o.deadline), "status": o.status,
                    "rules": o.rules} for o in e.orders],
        "expected": {"ruleset_digest": e.ruleset_digest, "counts": dict(e.counts)},
        "operators": operators,
        "cells": cells,
        "unattributed": [{"path": f.path, "reason": f.reason} for f in r.unattributed],
        "refused_inputs": refused_inputs,
        "summary": {"operators": len(operators), "complying": sum(s.complies for s in r.operators),
                    "orders": len(e.orders), "cells": by_verdict},
    }


def _dur(s: float | None) -> str:
    if s is None:
        return "-"
    if abs(s) < 120:
        return f"{s:g}s"
    if abs(s) < 7200:
        return f"{s / 60:.0f}m"
    return f"{s / 3600:.1f}h"


def verdict_line(doc: dict[str, Any]) -> str:
    s = doc["summary"]
    bad = [o["name"] for o in doc["operators"] if not o["complies"]]
    head = {"comply": "COMPLY", "pending": "PENDING", "not_comply": "DO NOT COMPLY"}[doc["verdict"]]
    text = f"{head}: {s['complying']} of {s['operators']} operators comply with {s['orders']} orders"
    if bad:
        text += f"; not: {', '.join(bad)}"
    refused = [x for x in doc["refused_inputs"] if not x.get("skipped")]
    if refused:
        text += f"; {len(refused)} input(s) refused (not checked)"
    return text


def text(doc: dict[str, Any], *, verbose: bool = False) -> str:
    lines = []
    for x in doc["refused_inputs"]:
        lines.append(f"{'skipped' if x.get('skipped') else 'REFUSED'} input {x['path']}: {x['error']}")
    for o in doc["orders"]:
        lines.append(f"order {o['key']} (serial {o['serial']}, {o['reference']}): issued {o['issued_at']}, "
                     f"deadline {o['deadline'] or 'none'}, expands to {o['rules']} rules")
        for c in (c for c in doc["cells"] if c["order"] == o["key"] and c["serial"] == o["serial"]):
            where = "+".join(c["where"]) or "-"
            lines.append(f"  {c['operator']:<12} {c['verdict']:<12} where {where:<10} first "
                         f"{c['first_enforced_at'] or '-':<20} tte {_dur(c['issued_to_enforced_s']):>6}  deadline "
                         f"{c['deadline_status']:<7} in sync {_yn(c['in_sync'])}  rules {c['rules']}/{c['expected_rules']}")
            if verbose:
                lines += [f"      {p}" for p in c["problems"]]
                if c["evidence"]:
                    lines.append(f"      rests on {c['evidence']}")
    for op in doc["operators"]:
        state = "complies" if op["complies"] else "DOES NOT COMPLY"
        lines.append(f"operator {op['name']} (key {op['key_id']}): {state}; {op['statements']} statements, seq "
                     f"{op['first_seq']}..{op['last_seq']}, latest {op['latest_at'] or '-'}")
        lines += [f"  {p}" for p in op["problems"]]
        if op["failing"]:
            lines.append(f"  orders not complied with: {', '.join(op['failing'])}")
    for f in doc["unattributed"]:
        lines.append(f"unattributed {f['path']}: {f['reason']}")
    lines.append(verdict_line(doc))
    return "\n".join(lines)


def _yn(v: bool | None) -> str:
    return "?" if v is None else ("yes" if v else "NO")
