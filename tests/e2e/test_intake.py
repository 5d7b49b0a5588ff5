"""A typo in a new signed policy, as root in a namespace: serial 2 is refused alone; serial 1 stays
enforced in the kernel, the sinkhole and the RPZ zone; the refusal is counted, audited, and the
shipped alert fires on a real Prometheus scraping the real daemon.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import textwrap

import pytest

from tests.conftest import ROOT
from tests.e2e.test_daemon import Box, box, wait_for  # noqa: F401 - the fixture

pytestmark = [pytest.mark.e2e]

POLICY = """\
issuer: demo-regulator
serial: {serial}
issued_at: 2026-01-01T00:00:00Z
not_before: 2026-01-01T00:00:00Z
not_after: 2030-01-01T00:00:00Z
orders:
  - id: o{serial}
    legal_basis: {{authority: Test Court, reference: T-{serial}}}
    action: block
    targets: {{services: [{service}], domains: [kept{serial}.example], cidrs: [192.0.2.{serial}]}}
"""


def with_rpz(b: Box) -> None:
    b.config.write_text(b.config.read_text().replace(
        '  dns: {listen: ["127.0.0.1:53"]}\n',
        '  dns: {listen: ["127.0.0.1:53"]}\n  rpz: {listen: ["127.0.0.1:5300"], zone: "rpz.test."}\n'))


def zone(b: Box) -> set[str]:
    out = b.run("dig", "@127.0.0.1", "-p", "5300", "rpz.test.", "AXFR", "+tcp", "+time=2").stdout
    return {line.split()[0] for line in out.splitlines() if line and not line.startswith(";") and "CNAME" in line}


def test_a_typo_in_a_new_serial_keeps_the_old_one_everywhere(box: Box) -> None:  # noqa: F811
    with_rpz(box)
    box.write_policy("p-1.yaml", POLICY.format(serial=1, service="telegram"))
    box.start()
    assert box.blocked("kept1.example") and box.blocked("web.telegram.org")
    nft, rpz = box.nft_elements(), zone(box)
    assert "192.0.2.1" in nft and "kept1.example.rpz.test." in rpz

    box.write_policy("p-2.yaml", POLICY.format(serial=2, service="telegramm"))
    wait_for(lambda: box.events("policy_rejected"), what="the refusal of serial 2")
    (event,) = box.events("policy_rejected")
    assert event["path"].endswith("p-2.yaml") and "unknown service 'telegramm'" in event["error"]
    assert box.blocked("kept1.example") and box.blocked("web.telegram.org") and not box.blocked("kept2.example")
    assert box.nft_elements() == nft and zone(box) == rpz
    metrics = box.metrics()
    assert 'blockd_policy_status{issuer="demo-regulator",status="rejected"} 1.0' in metrics
    assert 'blockd_policy_status{issuer="demo-regulator",status="active"} 1.0' in metrics
    assert 'blockd_policy_serial{issuer="demo-regulator"} 1.0' in metrics
    # per order: counted per issuer and status on /metrics, listed on GET /orders (issue 14)
    assert 'blockd_orders{issuer="demo-regulator",live="1",status="partially_refused"} 1.0' in metrics
    code = ("import urllib.request;print(urllib.request.urlopen("
            "'http://127.0.0.1:9153/orders?order=demo-regulator/o1',timeout=5).read().decode())")
    doc = json.loads(box.run(sys.executable, "-c", code, check=True).stdout)
    assert doc["total"] == 1 and doc["orders"][0]["status"] == "partially_refused" and doc["orders"][0]["live"] is True
    assert 'blockd_policy_rejections_total{reason="expand"} 1.0' in metrics
    audit = [json.loads(line) for line in (box.tmp / "audit.jsonl").read_text().splitlines()]
    assert any(e.get("event") == "policy_rejected" and e.get("file") == "p-2.yaml" for e in audit), audit

    # a restart enforces serial 1 from the state, and refuses serial 2 again
    box.stop()
    box.start()
    assert box.blocked("kept1.example") and box.nft_elements() == nft and zone(box) == rpz
    if shutil.which("prometheus"):
        _alert_fires_on_a_real_scrape(box)


def _alert_fires_on_a_real_scrape(b: Box) -> None:
    conf = b.tmp / "prometheus.yml"
    conf.write_text(textwrap.dedent(f"""\
        global: {{scrape_interval: 1s, evaluation_interval: 1s}}
        rule_files: ["{ROOT / 'monitoring/alerts.yml'}"]
        scrape_configs:
          - job_name: blockd
            static_configs: [{{targets: ["127.0.0.1:9153"]}}]
        """))
    prom = subprocess.Popen(
        ["ip", "netns", "exec", b.ns, "prometheus", f"--config.file={conf}", f"--storage.tsdb.path={b.tmp / 'tsdb'}",
         "--web.listen-address=127.0.0.1:9090"], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    query = 'ALERTS{alertname="BlockdPolicyFileRefused",alertstate="firing"}'
    code = ("import json,sys,urllib.request,urllib.parse;print(json.dumps(json.load(urllib.request.urlopen("
            "'http://127.0.0.1:9090/api/v1/query?query='+urllib.parse.quote(sys.argv[1]),timeout=2))))")
    try:
        def firing() -> list[dict] | None:
            r = b.run(sys.executable, "-c", code, query)
            return json.loads(r.stdout)["data"]["result"] if r.returncode == 0 else None

        (alert,) = wait_for(firing, timeout=60, what="BlockdPolicyFileRefused firing")  # type: ignore[misc]
        assert alert["metric"]["issuer"] == "demo-regulator"
    finally:
        prom.terminate()
        prom.wait(10)


def test_a_second_daemon_on_one_state_directory_refuses_to_start(box: Box) -> None:  # noqa: F811
    # without the audit log (whose own lock would stop the second one earlier)
    box.config.write_text("".join(line for line in box.config.read_text().splitlines(keepends=True)
                                  if "audit_log" not in line))
    box.write_policy("p-1.yaml", POLICY.format(serial=1, service="telegram"))
    box.start()
    second = box.run(sys.executable, "-m", "blockd", "run", "--config", str(box.config))
    assert second.returncode == 1
    assert "held_by_another_daemon" in second.stdout + second.stderr and "only one blockd may use it" in second.stdout + second.stderr
    assert box.proc is not None and box.proc.poll() is None and box.blocked("kept1.example")


def test_a_second_daemon_on_the_same_kernel_table_refuses_to_start(box: Box) -> None:  # noqa: F811
    """Another state directory, the same `inet blockd` table in the same namespace."""
    box.write_policy("p-1.yaml", POLICY.format(serial=1, service="telegram"))
    box.start()
    other = box.tmp / "other.yaml"
    other.write_text(box.config.read_text().replace(str(box.tmp / "state"), str(box.tmp / "state2"))
                     .replace("127.0.0.1:9153", "127.0.0.1:9154").replace('"127.0.0.1:53"', '"127.0.0.1:5353"')
                     .replace(str(box.tmp / "attestations"), str(box.tmp / "att2"))
                     .replace(str(box.tmp / "audit.jsonl"), str(box.tmp / "audit2.jsonl")))
    second = box.run(sys.executable, "-m", "blockd", "run", "--config", str(other))
    assert second.returncode == 1, second.stdout + second.stderr
    out = second.stdout + second.stderr
    assert "nft table inet blockd in this network namespace is driven by another blockd (pid" in out, out
    assert box.blocked("kept1.example") and "192.0.2.1" in box.nft_elements()
