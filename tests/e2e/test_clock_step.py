"""The wall clock stepped back under a running daemon (libfaketime): nothing accepted and in its
window is dropped, a not_after is still reached on time, and an expired policy does not return."""

from __future__ import annotations

import signal
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest

from tests.e2e.test_daemon import Box, box, policy_text, wait_for  # noqa: F401 - the fixture

LIB = Path("/usr/lib/x86_64-linux-gnu/faketime/libfaketime.so.1")
pytestmark = [pytest.mark.e2e, pytest.mark.skipif(not LIB.exists(), reason="libfaketime missing (make deps)")]


def test_a_clock_stepped_back_neither_drops_nor_revives(box: Box, monkeypatch: pytest.MonkeyPatch) -> None:  # noqa: F811
    offset = box.tmp / "faketime"
    offset.write_text("+0\n")
    monkeypatch.setenv("LD_PRELOAD", str(LIB))
    monkeypatch.setenv("FAKETIME_TIMESTAMP_FILE", str(offset))
    monkeypatch.setenv("FAKETIME_NO_CACHE", "1")
    monkeypatch.setenv("FAKETIME_DONT_FAKE_MONOTONIC", "1")
    now = datetime.now(timezone.utc)
    ends = now + timedelta(seconds=25)
    box.write_policy("p.yaml", policy_text(1, ["stepped.example"], [], not_before=now - timedelta(hours=1),
                                           not_after=ends))
    box.start()
    monkeypatch.delenv("LD_PRELOAD")  # the test's own tools run on the real clock
    assert box.blocked("stepped.example")

    offset.write_text("-1d\n")  # the daemon's wall clock steps back a day
    box.signal(signal.SIGHUP)
    wait_for(lambda: any(e["reason"] == "reload" for e in box.events("reconcile_pass")), what="a pass after the step")
    assert box.blocked("stepped.example"), "a policy valid since an hour ago must not become 'not valid yet'"
    assert box.events("clock_step_back"), "the step is logged"
    wait_for(lambda: "blockd_clock_behind_seconds 8" in box.metrics(), what="the step in /metrics")

    # not_after is reached on time although the wall clock says yesterday
    wait_for(lambda: not box.blocked("stepped.example"), timeout=90, what="the policy to end at not_after")
    late = (datetime.now(timezone.utc) - ends).total_seconds()
    # judged by the stepped wall clock it would end a day late; the boundary is re-checked every 5 s
    assert late < 45, f"ended {late:.0f} s after not_after"

    offset.write_text("-2d\n")  # a second step back must not revive it
    box.signal(signal.SIGHUP)
    wait_for(lambda: sum(e["reason"] == "reload" for e in box.events("reconcile_pass")) >= 2, what="another pass")
    assert not box.blocked("stepped.example"), "an expired policy must not come back"
