"""`blockd compliance --prometheus`: the exposition lints with promtool, and the shipped alert rules
(monitoring/compliance_alerts.yml) pass their promtool tests and name only metrics it writes."""

from __future__ import annotations

import asyncio
import re
import shutil
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml

from blockd.__main__ import main
from blockd.compliance import fixture

ROOT = Path(__file__).resolve().parents[2]
MON = ROOT / "monitoring"
RULES, RULES_TEST = MON / "compliance_alerts.yml", MON / "compliance_alerts_test.yml"
promtool = shutil.which("promtool")
needs_promtool = pytest.mark.skipif(promtool is None, reason="promtool not installed (Debian package prometheus)")


@pytest.fixture(scope="module")
def exposition(tmp_path_factory: pytest.TempPathFactory) -> str:
    fx = asyncio.run(fixture.generate(tmp_path_factory.mktemp("fleet"), operators=4))  # on time, late, out of sync, tampered
    out = fx.root / "compliance.prom"
    code = main(["compliance", "--policies", str(fx.policies), "--operators", str(fx.keys), "--statements",
                 str(fx.statements), "--now", fx.now.isoformat(), "--prometheus", str(out), "--quiet"])
    assert code == 1
    return out.read_text()


def value(text: str, series: str) -> float:
    m = re.search(rf"^{re.escape(series)} (\S+)$", text, re.M)
    assert m, series
    return float(m.group(1))


def test_exposition_values(exposition: str) -> None:
    assert value(exposition, 'blockd_compliance_operator_complies{operator="alpha"}') == 1
    assert value(exposition, 'blockd_compliance_operator_complies{operator="bravo"}') == 0
    assert value(exposition, 'blockd_compliance_operator_orders_failing{operator="bravo"}') == 2
    assert value(exposition, 'blockd_compliance_statement_failures{operator="delta"}') == 1
    assert value(exposition, 'blockd_compliance_statement_failures{operator="alpha"}') == 0
    assert value(exposition, 'blockd_compliance_cells{verdict="late"}') == 2
    assert value(exposition, "blockd_compliance_exit_code") == 1
    assert value(exposition, 'blockd_compliance_latest_statement_timestamp_seconds{operator="alpha"}') == \
        (fixture.NOW.timestamp() - 3600)


@needs_promtool
def test_exposition_lints(exposition: str) -> None:
    r = subprocess.run([promtool or "promtool", "check", "metrics"], input=exposition, capture_output=True, text=True,
                       timeout=60)
    assert r.returncode == 0, r.stdout + r.stderr


def rules() -> list[dict[str, Any]]:
    return [r for g in yaml.safe_load(RULES.read_text())["groups"] for r in g["rules"]]


def test_alerts_name_only_written_metrics(exposition: str) -> None:
    written = set(re.findall(r"^# TYPE (\S+) ", exposition, re.M))
    for r in rules():
        names = set(re.findall(r"\bblockd_[a-z0-9_]*[a-z0-9]", str(r["expr"])))
        assert names and names <= written, (r["alert"], names - written)


def test_every_alert_is_tested_firing_and_silent() -> None:
    cases = [c for t in yaml.safe_load(RULES_TEST.read_text())["tests"] for c in t["alert_rule_test"]]
    for r in rules():
        mine = [c for c in cases if c["alertname"] == r["alert"]]
        assert any(c["exp_alerts"] for c in mine) and any(not c["exp_alerts"] for c in mine), r["alert"]


@needs_promtool
@pytest.mark.parametrize(("old", "new"), [(None, None), ("2 * 86400", "2 * 3600"), ("== 0", "== 2")])
def test_alert_rules_pass_and_catch_a_wrong_rule(tmp_path: Path, old: str | None, new: str | None) -> None:
    text = RULES.read_text()
    if old is not None:
        assert old in text
        text = text.replace(old, new or "")
    (tmp_path / RULES.name).write_text(text)
    shutil.copy(RULES_TEST, tmp_path / RULES_TEST.name)
    r = subprocess.run([promtool or "promtool", "test", "rules", RULES_TEST.name], capture_output=True, text=True,
                       timeout=60, cwd=tmp_path)
    assert (r.returncode == 0) == (old is None), r.stdout + r.stderr
