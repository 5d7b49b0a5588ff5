"""Drift: something outside blockd changes the kernel state; the repair loop restores it."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import Any

import pytest
import structlog
from common import v6_prefixes
from conftest import Topo, background, policy, sh

from blockd.enforcers.drift import check_and_repair, drift_loop
from blockd.enforcers.ipset import IpsetEnforcer
from blockd.enforcers.nft import NftEnforcer

pytestmark = pytest.mark.kernel

SABOTAGE = [
    ("nft", "nft flush set inet blockd v4_0a"),
    ("nft", "nft delete table inet blockd"),
    ("nft", "nft flush chain inet blockd hook_forward"),
    ("nft", "nft delete element inet blockd v6_d7 { fd77:100::1-fd77:100::3 }"),
    ("ipset", "ipset flush blockd4"),
    ("ipset", "ipset destroy blockd6"),
    ("ipset", "ipset del blockd4 10.77.100.4"),  # an absent entry: the command fails, nothing drifts
]


@pytest.mark.parametrize(("kind", "command"), SABOTAGE)
def test_repair_loop_restores_state(topo: Topo, closing: Callable[[Any], Any], kind: str, command: str) -> None:
    async def scenario() -> None:
        enf = closing(NftEnforcer(netns=topo.m) if kind == "nft" else IpsetEnforcer(netns=topo.m))
        desired = policy(background(500, 13), v6_prefixes(50, 13))
        await enf.apply(desired)
        assert not await check_and_repair(enf, desired)  # in sync: nothing to do
        sh(*command.split(), ns=topo.m, check=False)
        with structlog.testing.capture_logs() as logs:
            loop = asyncio.create_task(drift_loop(enf, lambda: desired, interval_s=0.05))
            try:
                deadline = time.monotonic() + 10
                # Done when the loop has checked once since the sabotage and the state is right.
                while not _checked(logs) or (await enf.readback()).digest != desired.digest:
                    assert time.monotonic() < deadline, f"not repaired after 10 s: {logs}"
                    await asyncio.sleep(0.02)
            finally:
                loop.cancel()
                with pytest.raises(asyncio.CancelledError):
                    await loop
        repaired = [e for e in logs if e["event"] == "drift_repaired"]
        if "10.77.100.4" in command:
            assert not repaired
        else:
            assert repaired[0]["enforcer"] == kind and repaired[0]["missing"] > 0
        assert (await enf.readback()).digest == desired.digest

    asyncio.run(scenario())


def _checked(logs: list[dict[str, Any]]) -> bool:
    return any(e["event"] in ("drift_repaired", "drift_checked") for e in logs)
