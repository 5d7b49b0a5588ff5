"""monitoring/: the alert rules pass their promtool tests, and every query names a metric blockd exports.

The exported names come from the real registry (`metrics.create()` plus `LiveCollector`), with
the sample suffixes each type has: counters `_total`, histograms `_bucket`/`_sum`/`_count`,
info `_info`. So `blockd_rules_total` (a gauge) or `blockd_apply_failures` (no `_total`) is
an error, as it would be an empty panel in Grafana.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from blockd import metrics

ROOT = Path(__file__).resolve().parents[2]
MON = ROOT / "monitoring"
ALERTS = MON / "alerts.yml"
ALERTS_TEST = MON / "alerts_test.yml"
DASHBOARD = MON / "grafana-dashboard.json"

promtool = shutil.which("promtool")
needs_promtool = pytest.mark.skipif(promtool is None, reason="promtool not installed (Debian package prometheus)")

SUFFIXES = {"counter": ("_total",), "gauge": ("",), "histogram": ("_bucket", "_sum", "_count"),
            "summary": ("", "_sum", "_count"), "info": ("_info",)}
METRIC = re.compile(r"\bblockd_[a-z0-9_]*[a-z0-9]")


def exported_names() -> set[str]:
    m = metrics.create()
    live = metrics.Live(dns=lambda: ({}, {}))  # with the sinkhole on, its two families appear too
    live.rpz = lambda: (1, {"192.0.2.1": 1}, {})  # and with the RPZ primary, its families
    live.rpz_zones = lambda: {"rpz.blockd.": (1, {"192.0.2.1": 1})}
    live.block_page = lambda: (True, {})
    m.registry.register(metrics.LiveCollector(live))
    names = set()
    for family in m.registry.collect():
        names.update(family.name + s for s in SUFFIXES[family.type])
    return names


def referenced(expr: str) -> set[str]:
    # Label values in quotes ("blockd", "blockd_x") are not metric names.
    return set(METRIC.findall(re.sub(r'"(?:[^"\\]|\\.)*"', '""', expr)))


def dashboard_exprs(dash: dict[str, object]) -> Iterator[tuple[str, str]]:
    """(where, PromQL) for every panel target (rows included) and query variable."""
    def panels(items: list[dict[str, object]]) -> Iterator[dict[str, object]]:
        for p in items:
            yield p
            yield from panels(p.get("panels", []))  # type: ignore[arg-type]
    for p in panels(dash["panels"]):  # type: ignore[arg-type]
        for t in p.get("targets", []):  # type: ignore[attr-defined]
            yield f"panel {p['title']!r} {t['refId']}", t["expr"]
    for v in dash["templating"]["list"]:  # type: ignore[index]
        if v["type"] == "query":
            q = v["query"]
            yield f"variable {v['name']!r}", q["query"] if isinstance(q, dict) else q


def alert_rules() -> list[dict[str, object]]:
    doc = yaml.safe_load(ALERTS.read_text())
    return [r for g in doc["groups"] for r in g["rules"]]


def run(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(args, capture_output=True, text=True, timeout=120, cwd=MON)


# --- the names -----------------------------------------------------------------------------------

def test_exported_names_follow_the_type_suffixes() -> None:
    names = exported_names()
    assert {"blockd_apply_failures_total", "blockd_apply_duration_seconds_bucket", "blockd_rules",
            "blockd_kernel_packets_total", "blockd_dns_blocked_queries_total", "blockd_build_info"} <= names
    assert not {"blockd_rules_total", "blockd_apply_failures", "blockd_rules_bucket"} & names


@pytest.mark.parametrize("expr, bad", [
    ('rate(blockd_rules_total[5m])', {"blockd_rules_total"}),  # a gauge has no _total
    ('blockd_apply_failures{job="blockd_x"}', {"blockd_apply_failures"}),
    ('histogram_quantile(0.5, blockd_time_to_enforce_seconds_bucket)', set()),
    ('blockd_kernel_bytes_total / blockd_kernel_packets_total', set()),
])
def test_name_check_tells_good_from_bad(expr: str, bad: set[str]) -> None:
    assert referenced(expr) - exported_names() == bad


def test_dashboard_names_only_exported_metrics() -> None:
    names = exported_names()
    dash = json.loads(DASHBOARD.read_text())
    exprs = list(dashboard_exprs(dash))
    assert exprs
    unknown = {where: sorted(referenced(e) - names) for where, e in exprs if referenced(e) - names}
    assert not unknown
    assert all(referenced(e) for _, e in exprs), "every query reads a blockd metric"


def test_alerts_name_only_exported_metrics() -> None:
    names = exported_names()
    unknown = {r["alert"]: sorted(referenced(str(r["expr"])) - names) for r in alert_rules()
               if referenced(str(r["expr"])) - names}
    assert not unknown


# --- the dashboard --------------------------------------------------------------------------------------

def test_dashboard_shape() -> None:
    dash = json.loads(DASHBOARD.read_text())
    assert 36 <= dash["schemaVersion"] <= 41 and dash["uid"] and dash["title"]
    panels = dash["panels"]
    ids = [p["id"] for p in panels]
    assert len(ids) == len(set(ids))
    for p in panels:
        g = p["gridPos"]
        assert 0 <= g["x"] and g["x"] + g["w"] <= 24 and g["h"] > 0, p["title"]
        for t in p.get("targets", []):
            assert t["datasource"] == {"type": "prometheus", "uid": "${datasource}"}, p["title"]
            assert 'instance=~"$instance"' in t["expr"], (p["title"], t["expr"])
    # The panels the dashboard exists for, by the metric each one reads.
    needed = {
        "blockd_policy_serial", "blockd_policy_expiry_timestamp_seconds", "blockd_rules",
        "blockd_enforcer_in_sync", "blockd_apply_duration_seconds_bucket", "blockd_time_to_enforce_seconds_bucket",
        "blockd_dns_queries_total", "blockd_dns_blocked_queries_total", "blockd_kernel_packets_total",
        "blockd_guard_findings", "blockd_policy_rejections_total",
    }
    used = set().union(*(referenced(e) for _, e in dashboard_exprs(dash)))
    assert needed <= used
    assert any(e.startswith("topk(10,") and "blockd_dns_blocked_queries_total" in e for _, e in dashboard_exprs(dash))


@needs_promtool
def test_dashboard_queries_parse(tmp_path: Path) -> None:
    """Each query, with Grafana's variables filled in, is valid PromQL (as a recording rule)."""
    dash = json.loads(DASHBOARD.read_text())
    rules = []
    for i, (where, expr) in enumerate(dashboard_exprs(dash)):
        if expr.startswith("label_values("):  # Grafana's own function, not PromQL
            continue
        expr = expr.replace("$__rate_interval", "5m").replace("$instance", ".*")
        rules.append({"record": f"dashboard:q{i}", "expr": expr})
    f = tmp_path / "dashboard_rules.yml"
    f.write_text(yaml.safe_dump({"groups": [{"name": "dashboard", "rules": rules}]}))
    r = run(promtool or "promtool", "check", "rules", str(f))
    assert r.returncode == 0, r.stdout + r.stderr


# --- the alerts -------------------------------------------------------------------------------------------

@needs_promtool
def test_alert_rules_check() -> None:
    r = run(promtool or "promtool", "check", "rules", str(ALERTS))
    assert r.returncode == 0 and "SUCCESS" in r.stdout, r.stdout + r.stderr


@needs_promtool
def test_alert_rules_unit_tests() -> None:
    r = run(promtool or "promtool", "test", "rules", str(ALERTS_TEST))
    assert r.returncode == 0 and "SUCCESS" in r.stdout, r.stdout + r.stderr


def test_every_alert_is_tested_firing_and_silent() -> None:
    tests = yaml.safe_load(ALERTS_TEST.read_text())["tests"]
    cases = [c for t in tests for c in t["alert_rule_test"]]
    for rule in alert_rules():
        mine = [c for c in cases if c["alertname"] == rule["alert"]]
        assert any(c["exp_alerts"] for c in mine), f"{rule['alert']}: no test where it fires"
        assert any(not c["exp_alerts"] for c in mine), f"{rule['alert']}: no test where it stays silent"


@needs_promtool
def test_alert_tests_catch_a_wrong_threshold(tmp_path: Path) -> None:
    """The unit tests would fail for a rule that is wrong: a deadline window of 1 minute, not 1 hour."""
    broken = ALERTS.read_text().replace("time() < 3600)", "time() < 60)")
    assert broken != ALERTS.read_text()
    (tmp_path / ALERTS.name).write_text(broken)
    shutil.copy(ALERTS_TEST, tmp_path / ALERTS_TEST.name)
    r = subprocess.run([promtool or "promtool", "test", "rules", ALERTS_TEST.name], capture_output=True, text=True,
                       timeout=120, cwd=tmp_path)
    assert r.returncode != 0 and "BlockdOrderDeadlineAtRisk" in r.stdout + r.stderr
