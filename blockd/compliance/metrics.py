"""The `--json` report document -> Prometheus text exposition, for a regulator that runs
`blockd compliance` on a schedule (cron, a systemd timer) and lets node_exporter's textfile
collector pick the file up. Alert rules: monitoring/compliance_alerts.yml.

Labels are bounded: `operator` (one per operator key given) and `verdict` (a fixed set); never
an order, a domain or an address.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any

from prometheus_client import CollectorRegistry, Gauge
from prometheus_client.exposition import generate_latest

from blockd.compliance.report import VERDICTS


def exposition(doc: dict[str, Any], now_s: float) -> bytes:
    reg = CollectorRegistry()
    complies = Gauge("blockd_compliance_operator_complies", "1 if the operator complies with every order",
                     ["operator"], registry=reg)
    failing = Gauge("blockd_compliance_operator_orders_failing", "orders the operator does not comply with",
                    ["operator"], registry=reg)
    failed = Gauge("blockd_compliance_statement_failures", "statement files that fail to verify, per operator",
                   ["operator"], registry=reg)
    latest = Gauge("blockd_compliance_latest_statement_timestamp_seconds",
                   "issue time of the operator's latest verified statement", ["operator"], registry=reg)
    cells = Gauge("blockd_compliance_cells", "order x operator cells by verdict", ["verdict"], registry=reg)
    unattributed = Gauge("blockd_compliance_unattributed_files", "files no operator key claims", registry=reg)
    refused = Gauge("blockd_compliance_refused_inputs", "regulator inputs refused (not checked)", registry=reg)
    run = Gauge("blockd_compliance_last_run_timestamp_seconds", "when this check ran", registry=reg)
    code = Gauge("blockd_compliance_exit_code", "0 all comply, 1 some do not, 2 input refused, 3 pending",
                 registry=reg)
    for op in doc["operators"]:
        complies.labels(op["name"]).set(1 if op["complies"] else 0)
        failing.labels(op["name"]).set(len(op["failing"]))
        failed.labels(op["name"]).set(len(op["failed"]))
        if op["latest_at"]:
            latest.labels(op["name"]).set(datetime.fromisoformat(op["latest_at"].replace("Z", "+00:00")).timestamp())
    for v in VERDICTS:
        cells.labels(v).set(doc["summary"]["cells"].get(v, 0))
    unattributed.set(len(doc["unattributed"]))
    refused.set(sum(1 for x in doc["refused_inputs"] if not x.get("skipped")))
    run.set(now_s)
    code.set(doc["exit_code"])
    return generate_latest(reg)
