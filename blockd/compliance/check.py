"""The I/O edge of `blockd compliance`: files -> (Report, refused inputs).

    regulator policies   each verified against the trust store (role policy) on its own; a bad
                         one is refused alone and listed, the rest are checked
    catalog              the regulator's signed catalog, ASN table and guards (as `blockd check`)
                         expand the orders: the rule counts the read-backs are compared with
    operators' keys      statements.load_keys
    statements           statements.collect, then evaluate.evaluate (pure)
"""

from __future__ import annotations

from datetime import datetime
from pathlib import Path

from blockd.compile import Prepared, compile_policies
from blockd.compliance import evaluate, statements
from blockd.errors import BlockdError
from blockd.intake import load_context, policy_files, read_candidates
from blockd.selection import select
from blockd.settings import Settings


def policy_paths(given: list[Path]) -> list[Path]:
    out: list[Path] = []
    for p in given:
        out += policy_files(p) if p.is_dir() else [p]
    return out


def check(policies: list[Path], operators: Path, received: Path, settings: Settings, now: datetime,
          max_age_s: float) -> tuple[evaluate.Report, list[dict[str, object]]]:
    ctx, _ = load_context(settings, save=False)
    refused: list[dict[str, object]] = []
    found_policies, unreadable = read_candidates(policy_paths(policies), ctx)
    # The orders as issued: the same selection the operators' daemons make (newest serial per
    # issuer, validity window), without an operator's state. Pending orders are evaluated as
    # pending; expired and superseded ones are listed as not evaluated.
    sel = select(found_policies, unreadable, {}, now, lambda p: Prepared(p, {}, (), (), ()))
    newest = [v.policy for v in sel.verdicts if v.status in ("active", "pending") and v.policy is not None]
    for v in sel.verdicts:
        if v.status == "rejected":
            refused.append({"path": v.source, "error": v.reason, "skipped": False})
        elif v.status in ("expired", "superseded"):
            refused.append({"path": v.source, "error": f"not evaluated: {v.status}: {v.reason}", "skipped": True})
    if not newest:
        raise BlockdError("no regulator policy could be used: " + "; ".join(str(r["error"]) for r in refused)
                          if refused else "no regulator policy given (*.yaml files or directories)")
    compilation = compile_policies(newest, ctx.catalog, ctx.compile, now)
    expected = evaluate.expected(newest, compilation)
    keys, bad_keys = statements.load_keys(operators)
    found, failures = statements.collect(received, keys)
    report = evaluate.evaluate(expected, keys, found, [*bad_keys, *failures], now, max_age_s)
    return report, refused
