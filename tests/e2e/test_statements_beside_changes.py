"""A statement lists every order (a minute for a registry of a million): it is written beside
the passes, never in their way. The daemon runs in this process (sinkhole on loopback), with
the statement writer held at a gate: the start and a new serial are enforced while it waits,
and when it is let go, the statement states what is held then."""

from __future__ import annotations

import asyncio
import json
import textwrap
import threading
from pathlib import Path

import dns.message
import dns.query
import dns.rcode

from blockd.daemon import Daemon
from blockd.dns.resolvers import free_port
from blockd.settings import load_settings
from tests.conftest import ROOT, drop_policy, repo_config
from tests.e2e.test_daemon import policy_text


def test_a_change_is_enforced_while_a_statement_is_still_being_written(tmp_path: Path) -> None:
    policies, attest_dir = tmp_path / "policies", tmp_path / "attestations"
    policies.mkdir()
    config = tmp_path / "blockd.yaml"
    config.write_text(repo_config(policies, tmp_path / "state") + textwrap.dedent(f"""\
        enforcers:
          dns: {{listen: ["127.0.0.1:{free_port()}"]}}
        daemon:
          drift_check_s: 3600
          attest_period_s: 86400
          poll_s: 0.2
          metrics_listen: "127.0.0.1:{free_port()}"
          operator_key: {ROOT / "policies/keys/demo-operator.key"}
          attest_dir: {attest_dir}
        """))
    drop_policy(policies, "p.yaml", policy_text(1, ["one.example"], []))
    daemon = Daemon(load_settings(config))
    acc = daemon.accountability
    assert acc is not None
    gate, held = threading.Event(), threading.Event()
    real = acc.attest

    def slow_attest(*args, **kwargs):  # type: ignore[no-untyped-def]
        if not gate.is_set():
            held.set()
            assert gate.wait(120), "never let go"
        return real(*args, **kwargs)

    acc.attest = slow_attest  # type: ignore[method-assign]

    def answer(name: str, port: int) -> int:
        q = dns.message.make_query(name, "A")
        return dns.query.udp(q, "127.0.0.1", port=port, timeout=2).rcode()

    async def until(check, what: str, timeout: float = 60) -> None:  # type: ignore[no-untyped-def]
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while not await check():
            assert loop.time() < deadline, f"timed out waiting for {what}"
            await asyncio.sleep(0.05)

    async def main() -> None:
        run = asyncio.create_task(daemon.run())
        loop = asyncio.get_running_loop()

        async def ready() -> bool:
            assert not run.done(), f"the daemon stopped: {run.result() if not run.cancelled() else 'cancelled'}"
            return daemon.ready

        await until(ready, "READY")

        async def statement_held() -> bool:
            return held.is_set()

        await until(statement_held, "the start's statement held at the gate")  # it is written beside, after READY
        assert not list(attest_dir.glob("*.json"))
        port = daemon.enforcers[0].server.addresses[0][1]  # type: ignore[attr-defined]

        async def live(name: str) -> bool:
            return await loop.run_in_executor(None, answer, name, port) == dns.rcode.NXDOMAIN

        await until(lambda: live("one.example"), "serial 1 answered")
        drop_policy(policies, "p.yaml", policy_text(2, ["two.example"], []))
        await until(lambda: live("two.example"), "serial 2 enforced while the statement waits")
        assert not list(attest_dir.glob("*.json")), "a statement was written past the gate"
        gate.set()
        await daemon.account_idle()
        daemon._stop.set()
        await run

    asyncio.run(main())
    written = sorted(attest_dir.glob("attestation-*.json"))
    assert written, "no statement after the gate opened"
    last = json.loads(written[-1].read_text())
    serials = {p["serial"] for p in last["predicate"]["policies"] if p["status"] == "active"}
    assert serials == {2}, f"the last statement does not state what is held: {serials}"
