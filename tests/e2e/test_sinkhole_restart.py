"""A restart does not take DNS away: the sinkhole serves its persisted table (state_dir/dns-table.bin)
before the first pass is done, and a damaged or stale table is ignored with a log line.

"Before the first pass is done" is made certain, not raced: the restart uses an nft configuration
the kernel refuses (reject in postrouting), so the daemon never gets past start-up (no READY=1,
the pass retries), and every answer seen is served from the table it loaded.
"""

from __future__ import annotations

import re
import shutil

import pytest

from tests.e2e.test_daemon import Box, box, policy_text, wait_for  # noqa: F401 - `box` is the fixture

pytestmark = [pytest.mark.e2e]

FAILING_NFT = "{hooks: [postrouting], verdict: reject}"


def start_blocking(b: Box, serial: int, names: list[str]) -> None:
    b.write_policy("p.yaml", policy_text(serial, names, ["192.0.2.0/24"]))
    b.start()
    assert b.blocked(names[0])
    assert b.stop() == 0  # SIGTERM: the table is written before the process ends
    assert (b.tmp / "state" / "dns-table.bin").exists()


def restart_failing(b: Box) -> None:
    """Start with an nft enforcer the kernel refuses: the daemon stays in start-up."""
    text = b.config.read_text()
    b.config.write_text(re.sub(r"nft: .*", f"nft: {FAILING_NFT}", text, count=1))
    b.launch()
    b.notifications(lambda m: "not ready" in m and "FAILING: nft" in m, 60)


def metric(b: Box, result: str) -> float:
    m = re.search(rf'^blockd_dns_table_file_total\{{result="{result}"\}} (\S+)$', b.metrics(), re.M)
    return float(m.group(1)) if m else 0.0


def test_restart_answers_from_the_persisted_table_before_the_first_pass(box: Box) -> None:
    start_blocking(box, 1, ["blocked.example", "*.sub.example"])
    ready_before = len(box.events("daemon_ready"))
    restart_failing(box)
    out = wait_for(lambda: (o := box.dig("blocked.example")) and "status: NXDOMAIN" in o and o,
                   timeout=30, what="an answer from the restored table")
    assert "EDE: 16 (Censored): (Blocked by order demo-regulator/o1 of Test Court (T-1))" in out  # type: ignore[operator]
    assert box.blocked("a.b.sub.example") and not box.blocked("other.example")
    assert box.events("dns_table_restored") and len(box.events("daemon_ready")) == ready_before
    assert metric(box, "loaded") == 1.0


@pytest.mark.parametrize("damage", ["corrupt", "stale"])
def test_a_damaged_or_stale_table_is_ignored(box: Box, damage: str) -> None:
    path = box.tmp / "state" / "dns-table.bin"
    start_blocking(box, 1, ["blocked.example"])
    if damage == "corrupt":
        data = bytearray(path.read_bytes())
        data[len(data) // 2] ^= 0xFF
        path.write_bytes(bytes(data))
    else:  # the table of serial 1 put back after serial 2 was accepted
        shutil.copy(path, box.tmp / "serial1.bin")
        start_blocking(box, 2, ["blocked.example", "new.example"])
        shutil.copy(box.tmp / "serial1.bin", path)
    restored_before = len(box.events("dns_table_restored"))
    restart_failing(box)
    ignored = wait_for(lambda: box.events("dns_table_not_restored"), what="the log line")
    assert ignored[-1]["reason"] == damage, ignored  # type: ignore[index]
    assert metric(box, damage) == 1.0
    # nothing is served from it: no listener until the first pass succeeds (fail closed, as before)
    assert "status: NXDOMAIN" not in box.dig("blocked.example")
    assert len(box.events("dns_table_restored")) == restored_before


def test_restart_after_several_changes_serves_the_last_table_from_base_and_journal(box: Box) -> None:
    """Changes while running are saved as journal records (not whole tables); a restart serves
    the table of the last one: each name, its subtree flag, and the order text of the last serial."""
    steps = [["n1.example", "n2.example"], ["n1.example", "n2.example", "n3.example"],
             ["n2.example", "n3.example", "*.n4.example"], ["n3.example", "*.n4.example", "n5.example"]]
    box.write_policy("p.yaml", policy_text(1, steps[0], ["192.0.2.0/24"]))
    box.start()
    wait_for(lambda: box.events("dns_table_saved"), timeout=30, what="the base")
    for serial, names in enumerate(steps[1:], 2):
        box.write_policy("p.yaml", policy_text(serial, names, ["192.0.2.0/24"]))
        wait_for(lambda: f"(T-{serial})" in box.dig(names[-1].lstrip("*.")), timeout=30,  # noqa: B023
                 what=f"serial {serial} served")
    assert box.stop() == 0
    appended = box.events("dns_table_appended")
    assert appended and len(box.events("dns_table_saved")) == 1, "saved by records after the base"
    assert (box.tmp / "state" / "dns-table.journal").exists()
    restart_failing(box)
    out = wait_for(lambda: (o := box.dig("n3.example")) and "status: NXDOMAIN" in o and o,
                   timeout=30, what="an answer from the restored table")
    assert "Blocked by order demo-regulator/o1 of Test Court (T-4)" in out  # type: ignore[operator]
    assert box.blocked("a.b.n4.example") and box.blocked("n5.example")
    assert not box.blocked("n1.example") and not box.blocked("n2.example")
    restored = box.events("dns_table_restored")
    assert restored[-1]["journal_records"] == len(appended), restored
    assert metric(box, "loaded") == 1.0 and metric(box, "journal_dropped") == 0.0
