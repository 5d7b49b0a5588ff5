"""Operational faults on a real daemon in a namespace: a full state directory (a real tmpfs filled
to the last byte) and a policy directory removed and re-created under it."""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.e2e.test_daemon import Box, box, policy_text, wait_for  # noqa: F401 - the fixture

pytestmark = [pytest.mark.e2e]


@pytest.fixture
def small_state(box: Box) -> Iterator[Path]:  # noqa: F811
    """The box's state directory on a 2 MiB tmpfs of its own."""
    state = box.tmp / "state"
    state.mkdir(exist_ok=True)
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=2m,mode=0755", "tmpfs", str(state)], check=True)
    try:
        yield state
    finally:
        subprocess.run(["umount", "-l", str(state)], check=False)


def status_containing(b: Box, text: str, timeout: float) -> str:
    """The first STATUS= line blockd sends (sd_notify) that contains `text`."""
    import time

    assert b.notify is not None
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            msg = b.notify.recv(4096).decode()
        except TimeoutError:
            continue
        for line in msg.split("\n"):
            if line.startswith("STATUS=") and text in line:
                return line
    raise AssertionError(f"no STATUS= with {text!r} within {timeout}s:\n{b.log.read_text()[-4000:]}")


def fill(directory: Path) -> Path:
    """Write until the filesystem says ENOSPC; the file that filled it."""
    ballast = directory / "ballast"
    with open(ballast, "wb") as f:
        try:
            while True:
                f.write(b"\0" * 65536)
                f.flush()
        except OSError:
            pass
    # the last partial block and any inode slack: a small file must not fit any more either
    for i in range(64):
        try:
            (directory / f"ballast-{i}").write_bytes(b"\0" * 4096)
        except OSError:
            break
    return ballast


def test_a_full_state_directory_holds_new_orders_back_and_recovers_by_itself(box: Box, small_state: Path) -> None:  # noqa: F811
    box.write_policy("p-1.yaml", policy_text(1, ["one.example"], ["192.0.2.1"]))
    box.start()
    assert box.blocked("one.example")
    ballast = fill(small_state)
    box.write_policy("p-2.yaml", policy_text(2, ["two.example"], ["192.0.2.2"]))
    status = status_containing(box, "STATE DIRECTORY NOT WRITABLE", 30)
    assert "No space left on device" in status
    assert box.blocked("one.example") and not box.blocked("two.example"), "nothing new before it is recorded"
    assert "192.0.2.1" in box.nft_elements() and "192.0.2.2" not in box.nft_elements()
    metrics = box.metrics()
    assert "blockd_state_write_failures_total" in metrics and "blockd_state_write_failures_total 0.0" not in metrics
    assert 'blockd_policy_status{issuer="demo-regulator",status="pending"} 1.0' in metrics

    # a restart while the disk is full serves what the state holds (no start_failed loop)
    box.stop()
    box.start()
    assert box.blocked("one.example") and not box.blocked("two.example")

    # space comes back: the retry (backoff) records and enforces serial 2 without any signal
    for f in small_state.glob("ballast*"):
        f.unlink()
    wait_for(lambda: box.blocked("two.example"), timeout=90, what="serial 2 after the disk has room again")
    assert "192.0.2.2" in box.nft_elements() and not box.blocked("one.example")
    assert (small_state / "policies" / "demo-regulator" / "2.yaml").exists()
    del ballast


def test_a_replaced_policy_directory_is_followed(box: Box) -> None:  # noqa: F811
    box.write_policy("p-1.yaml", policy_text(1, ["one.example"], []))
    box.start()
    assert box.blocked("one.example")
    shutil.rmtree(box.policies)
    os.mkdir(box.policies)  # `rm -rf` then a deploy tool re-creates it
    wait_for(lambda: box.events("policy_dir_replaced"), what="the replacement noticed")
    assert box.blocked("one.example"), "the state keeps the last good policy while the directory is empty"
    box.write_policy("p-2.yaml", policy_text(2, ["two.example"], []))
    wait_for(lambda: box.blocked("two.example"), what="a policy in the new directory, without SIGHUP")
    assert 'blockd_policy_dir_events_total{event="replaced"}' in box.metrics()


def test_logs_on_a_full_disk_do_not_stop_the_daemon(box: Box) -> None:  # noqa: F811
    """`StandardOutput=append:` on a full /var: log lines are dropped, blocking goes on."""
    logs = box.tmp / "logs"
    logs.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=256k", "tmpfs", str(logs)], check=True)
    try:
        box.log = logs / "blockd.log"  # Box.start appends the daemon's stdout to box.log
        box.log.touch()
        fill(logs)
        _enforce_with_full_log(box)
    finally:
        box.stop()
        subprocess.run(["umount", "-l", str(logs)], check=False)


def _enforce_with_full_log(box: Box) -> None:
    box.write_policy("p-1.yaml", policy_text(1, ["one.example"], []))
    box.start()
    assert box.blocked("one.example")
    box.write_policy("p-2.yaml", policy_text(2, ["two.example"], []))
    wait_for(lambda: box.blocked("two.example"), what="a new policy while no log line can be written")
    assert box.proc is not None and box.proc.poll() is None
