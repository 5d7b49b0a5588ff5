"""BlockdRpzSecondaryLagging on a real Prometheus scraping the real daemon (`blockd run` in a
namespace) whose RPZ zone two real Unbound secondaries (Debian package) transfer.

The rule is the shipped one (monitoring/alerts.yml), copied with `for: 10m` shortened to 4 s so
the test takes seconds: its expression, labels and annotations are exactly what ships. While both
secondaries hold the serial, nothing fires; one is frozen (SIGSTOP) and a new policy lands: the
alert fires for that secondary and zone only; it is thawed, catches up, and the alert resolves.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import textwrap
import urllib.parse
from collections.abc import Iterator
from pathlib import Path

import pytest
import yaml

from blockd.dns import resolvers
from tests.conftest import ROOT
from tests.e2e.test_rpz_fleet import RESOLVERS, Fleet, needs_root, policy_text, wait_for

pytestmark = [pytest.mark.e2e]
PROM_PORT = 9390
FOR = "4s"


def rules_copy(dst: Path) -> dict[str, object]:
    """The shipped BlockdRpzSecondaryLagging rule, only `for:` shortened."""
    doc = yaml.safe_load((ROOT / "monitoring/alerts.yml").read_text())
    (rule,) = [r for g in doc["groups"] for r in g["rules"] if r.get("alert") == "BlockdRpzSecondaryLagging"]
    assert rule["for"] == "10m"
    rule = {**rule, "for": FOR}
    dst.write_text(yaml.safe_dump({"groups": [{"name": "blockd-rpz-lagging-test", "rules": [rule]}]},
                                  allow_unicode=True))
    return rule


@pytest.fixture
def fleet(tmp_path: Path) -> Iterator[Fleet]:
    if not os.path.exists(resolvers.UNBOUND) or not shutil.which("prometheus"):
        pytest.fail("unbound and prometheus are required (scripts/deps.sh installs them)")
    f = Fleet(tmp_path)
    two = [RESOLVERS["unbound-a"], RESOLVERS["unbound-b"]]  # the fleet's config lists bind too: drop it
    text = f.config.read_text()
    start = text.index("notify: [")
    f.config.write_text(text[:start] + "notify: [" + ", ".join(f'"{a}:53"' for a in two) + "]"
                        + text[text.index("]", start) + 1:])
    try:
        yield f
    finally:
        f.close()


@needs_root
def test_lagging_secondary_fires_on_a_real_prometheus(fleet: Fleet) -> None:
    rule = rules_copy(fleet.tmp / "rules.yml")
    conf = fleet.tmp / "prometheus.yml"
    conf.write_text(textwrap.dedent(f"""\
        global: {{scrape_interval: 1s, evaluation_interval: 1s}}
        rule_files: ["{fleet.tmp / 'rules.yml'}"]
        scrape_configs:
          - job_name: blockd
            static_configs: [{{targets: ["127.0.0.1:9153"]}}]
        """))
    fleet.write_policy(policy_text(1, ["base.example.net", "n1.example.net"]))
    fleet.start_blockd()
    for n in ("unbound-a", "unbound-b"):
        fleet.start_resolver(n)
    prom = fleet.ns.popen(["prometheus", f"--config.file={conf}", f"--storage.tsdb.path={fleet.tmp / 'tsdb'}",
                           f"--web.listen-address=127.0.0.1:{PROM_PORT}"], fleet.tmp / "prometheus.log")

    def api(query: str) -> list[dict] | None:
        def get() -> list[dict] | None:
            import urllib.request
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{PROM_PORT}/api/v1/query?query="
                                            + urllib.parse.quote(query), timeout=2) as r:
                    return json.load(r)["data"]["result"]
            except OSError:
                return None
        return fleet.in_ns(get)

    def series(name: str) -> dict[str, float]:
        return {r["metric"]["secondary"]: float(r["value"][1]) for r in api(name) or []}

    alerts = 'ALERTS{alertname="BlockdRpzSecondaryLagging"}'
    pending_q = 'ALERTS{alertname="BlockdRpzSecondaryLagging",alertstate="pending"}'
    firing_q = 'ALERTS{alertname="BlockdRpzSecondaryLagging",alertstate="firing"}'
    try:
        a, b = RESOLVERS["unbound-a"], RESOLVERS["unbound-b"]
        # both in sync, as Prometheus scraped it, for longer than `for:`: nothing pending or firing
        wait_for(lambda: series("blockd_rpz_zone_secondary_in_sync") == {a: 1.0, b: 1.0},
                 "both secondaries in sync in Prometheus", 60)
        # ... for at least 6 scrapes, and the rule evaluated meanwhile: it is neither pending nor firing
        in_sync_window = "count_over_time(blockd_rpz_zone_secondary_in_sync[1m]) >= 6"
        wait_for(lambda: len(api(in_sync_window) or []) == 2, "6 scrapes of both secondaries", 60)
        assert series("min_over_time(blockd_rpz_zone_secondary_in_sync[1m])") == {a: 1.0, b: 1.0}
        (evaluated,) = [r for g in fleet.in_ns(_rules, PROM_PORT) for r in g["rules"]]
        assert evaluated["health"] == "ok" and evaluated["name"] == "BlockdRpzSecondaryLagging"
        assert api(alerts) == [], "alert pending or firing while every secondary is in sync"

        fleet.procs["unbound-b"].send_signal(signal.SIGSTOP)  # frozen: it cannot take the next serial
        try:
            fleet.write_policy(policy_text(2, ["base.example.net", "n2.example.net"]))
            wait_for(lambda: series("blockd_rpz_zone_secondary_in_sync") == {a: 1.0, b: 0.0},
                     "unbound-b lagging, unbound-a in sync, in Prometheus", 60)
            pending = wait_for(lambda: api(pending_q) or api(firing_q), "the alert pending", 30)
            assert pending[0]["metric"]["secondary"] == b
            (firing,) = wait_for(lambda: api(firing_q), "the alert firing", 60)
            m = firing["metric"]
            assert (m["secondary"], m["zone"], m["severity"], m["job"]) == (b, "rpz.blockd.", "critical", "blockd")
            rules = fleet.in_ns(_rules, PROM_PORT)
            (active,) = [x for g in rules for r in g["rules"] for x in r.get("alerts", [])]
            assert active["annotations"]["summary"] == f"RPZ secondary {b} lags on zone rpz.blockd."
            assert active["annotations"]["description"].startswith(f"{b} has not held the current serial of "
                                                                    "rpz.blockd. served by blockd on 127.0.0.1:9153")
        finally:
            fleet.procs["unbound-b"].send_signal(signal.SIGCONT)
        # thawed, it catches up (NOTIFY retries every renotify_s) and the alert resolves
        wait_for(lambda: series("blockd_rpz_zone_secondary_in_sync") == {a: 1.0, b: 1.0}, "unbound-b caught up", 60)
        wait_for(lambda: api(alerts) == [], "the alert resolved", 30)
    except AssertionError as e:
        raise AssertionError(f"{e}\n{fleet.logs()}\n--- prometheus\n"
                             + (fleet.tmp / "prometheus.log").read_text(errors="replace")[-2000:]) from None
    finally:
        prom.terminate()
        prom.wait(10)


def _rules(port: int) -> list[dict]:
    import urllib.request
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/v1/rules", timeout=2) as r:
        return json.load(r)["data"]["groups"]
