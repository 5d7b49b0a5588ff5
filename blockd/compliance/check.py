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

from blockd import tte
from blockd.compile import compile_policies
from blockd.compliance import evaluate, statements
from blockd.errors import BlockdError, ExpiredError, NotYetValidError
from blockd.intake import load_context, policy_files
from blockd.model import Policy
from blockd.policy import check_window, load_policy
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
    loaded: list[Policy] = []
    for path in policy_paths(policies):
        try:
            p = load_policy(path, ctx.store, max_bytes=settings.max_policy_bytes)
            check_window(p, now)
        except NotYetValidError:
            loaded.append(p)  # its orders are evaluated as pending
            continue
        except ExpiredError as e:
            refused.append({"path": str(path), "error": f"not evaluated: {e}", "skipped": True})
            continue
        except BlockdError as e:
            refused.append({"path": str(path), "error": str(e), "skipped": False})
            continue
        loaded.append(p)
    if not loaded:
        raise BlockdError("no regulator policy could be used: " + "; ".join(str(r["error"]) for r in refused)
                          if refused else "no regulator policy given (*.yaml files or directories)")
    # The orders in force are each issuer's newest serial; older serials are superseded.
    newest = list(tte.newest(loaded).values())
    for p in loaded:
        if p not in newest:
            refused.append({"path": p.source, "error": f"not evaluated: superseded by serial "
                                                         f"{tte.newest(loaded)[p.issuer].serial} of {p.issuer}",
                            "skipped": True})
    compilation = compile_policies(newest, ctx.catalog, ctx.compile, now)
    expected = evaluate.expected(newest, compilation)
    keys, bad_keys = statements.load_keys(operators)
    found, failures = statements.collect(received, keys)
    report = evaluate.evaluate(expected, keys, found, [*bad_keys, *failures], now, max_age_s)
    return report, refused
