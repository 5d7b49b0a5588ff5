"""Three real operators (each a `blockd run` with its own key and state, in its own network
namespace, enforcing with real nftables and the DNS sinkhole) report to one regulator, whose
`blockd compliance` then tells who complies: one does, one whose kernel set was changed behind
blockd's back is out of sync, one that never received the order is pending."""

from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
import textwrap
from collections.abc import Iterator
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest

from blockd import minisign
from tests.conftest import ROOT
from tests.e2e.test_daemon import Box, pytestmark, wait_for  # noqa: F401 - the same skips apply

T = "%Y-%m-%dT%H:%M:%SZ"


def order_text(now: datetime) -> str:
    return textwrap.dedent(f"""\
        issuer: demo-regulator
        serial: 41
        issued_at: {(now - timedelta(minutes=1)).strftime(T)}
        not_before: {(now - timedelta(minutes=1)).strftime(T)}
        not_after: 2030-01-01T00:00:00Z
        orders:
          - id: fleet-1
            legal_basis: {{authority: Test Ministry, reference: Order F-1}}
            action: block
            deadline: {(now + timedelta(hours=1)).strftime(T)}
            targets: {{domains: [fleet.example, "*.fleet-cdn.example"], cidrs: [192.0.2.0/24, "2001:db8:f1::/48"]}}
        """)


@pytest.fixture
def fleet(tmp_path: Path) -> Iterator[dict[str, Box]]:
    boxes: dict[str, Box] = {}
    try:
        for name, period in (("good", 86400), ("drifted", 1), ("unreached", 86400)):
            ns = f"bkc-{name[:4]}-{abs(hash(str(tmp_path))) % 100000}"
            subprocess.run(["ip", "netns", "add", ns], check=True)
            subprocess.run(["ip", "-n", ns, "link", "set", "lo", "up"], check=True)
            home = tmp_path / name
            home.mkdir()
            box = Box(home, ns, drift_check_s=3600, attest_period_s=period)
            key = minisign.generate()
            (home / "operator.key").write_text(key.to_text())
            (home / "operator.pub").write_text(key.public.to_text())
            box.config.write_text(box.config.read_text().replace(str(ROOT / "policies/keys/demo-operator.key"),
                                                                 str(home / "operator.key")))
            boxes[name] = box
        yield boxes
    finally:
        for box in boxes.values():
            if box.proc is not None:
                box.stop()
            subprocess.run(["ip", "netns", "del", box.ns], check=False)


def test_regulator_checks_a_fleet_of_real_daemons(fleet: dict[str, Box], tmp_path: Path) -> None:
    now = datetime.now(timezone.utc).replace(microsecond=0)
    text = order_text(now)
    regulator = tmp_path / "regulator"
    (regulator / "orders").mkdir(parents=True)
    for name in ("good", "drifted"):
        fleet[name].write_policy("order-41.yaml", text)
    shutil.copy(fleet["good"].policies / "order-41.yaml", regulator / "orders")
    shutil.copy(fleet["good"].policies / "order-41.yaml.minisig", regulator / "orders")
    for box in fleet.values():
        box.start()
    for box in fleet.values():
        wait_for(lambda b=box: (b.tmp / "attestations" / "latest.json").exists(), what="a first statement")
    assert fleet["good"].blocked("fleet.example") and "192.0.2.0/24" in fleet["good"].nft_elements()

    # Behind blockd's back, on one operator: the next periodic statement says what the kernel holds.
    drifted = fleet["drifted"]
    first = json.loads((drifted.tmp / "attestations" / "latest.json").read_text())["predicate"]["attestation"]["seq"]
    sets = json.loads(drifted.run("nft", "-j", "list", "sets", "inet", check=True).stdout)["nftables"]
    script = "".join(f"flush set inet blockd {i['set']['name']}\n" for i in sets
                     if "set" in i and i["set"]["table"] == "blockd")
    flushed = subprocess.run(["ip", "netns", "exec", drifted.ns, "nft", "-f", "-"], input=script, text=True,
                             capture_output=True)
    assert flushed.returncode == 0, flushed.stderr
    assert "192.0.2.0/24" not in drifted.nft_elements()

    def statement_out_of_sync() -> bool:
        p = json.loads((drifted.tmp / "attestations" / "latest.json").read_text())["predicate"]
        return p["attestation"]["seq"] > first and not p["enforcers"]["nft"]["in_sync"]

    wait_for(statement_out_of_sync, timeout=30, what="a periodic statement with the flushed set")
    for box in fleet.values():
        box.stop()

    # What the regulator holds: its order, the operators' public keys, the statements received.
    keys, received = regulator / "keys", regulator / "received"
    keys.mkdir()
    for name, box in fleet.items():
        shutil.copy(box.tmp / "operator.pub", keys / f"{name}.pub")
        shutil.copytree(box.tmp / "attestations", received / name)
    run = subprocess.run([sys.executable, "-m", "blockd", "compliance", "--policies", str(regulator / "orders"),
                          "--operators", str(keys), "--statements", str(received), "--json",
                          "--html", str(regulator / "report.html")],
                         capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert run.returncode == 1, run.stdout + run.stderr
    doc = json.loads(run.stdout)
    cells = {c["operator"]: c for c in doc["cells"]}
    good = cells["good"]
    assert good["verdict"] == "complies" and good["where"] == ["dns", "kernel"] and good["in_sync"] is True
    assert good["deadline_status"] == "met" and 0 < good["issued_to_enforced_s"] < 3600
    assert good["rules"] == good["expected_rules"] == 4
    assert cells["drifted"]["verdict"] == "out_of_sync" and cells["drifted"]["in_sync"] is False
    assert cells["drifted"]["first_enforced_at"] is not None
    assert cells["unreached"]["verdict"] == "pending" and cells["unreached"]["deadline_status"] == "pending"
    ops = {o["name"]: o for o in doc["operators"]}
    assert ops["good"]["complies"] and ops["good"]["problems"] == [], json.dumps(ops["good"])
    assert not ops["drifted"]["complies"]
    assert any(re.search(r"nft \(kernel\) read back 0 ipv4_(ranges|elements); the orders expand to 1", p)
               for p in ops["drifted"]["problems"]), ops["drifted"]["problems"]
    assert doc["verdict"] == "not_comply"
