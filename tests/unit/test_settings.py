"""Daemon settings: every problem at once, with where and what is valid; sd_notify; the watcher."""

from __future__ import annotations

import asyncio
import os
import shutil
import socket
from pathlib import Path

import pytest

from blockd.errors import ConfigError
from blockd.sdnotify import Notifier
from blockd.settings import load_settings
from blockd.watch import watch

BASE = "trust_store: t\npolicy_dir: p\ncatalog_dir: c\nstate_dir: s\n"


def load(tmp_path: Path, text: str):
    path = tmp_path / "blockd.yaml"
    path.write_text(BASE + text)
    return load_settings(path)


def test_paths_are_relative_to_the_config_and_enforcers_typed(tmp_path: Path) -> None:
    s = load(tmp_path, 'enforcers:\n  nft: {hooks: [forward]}\n  dns: {listen: ["127.0.0.1:5353", "[::1]:53"]}\n'
                       "daemon: {audit_log: audit.jsonl, keep_rules_on_stop: no}\n")
    assert s.policy_dir == tmp_path / "p" and s.daemon.audit_log == str(tmp_path / "audit.jsonl")
    assert s.enforcers.nft is not None and s.enforcers.nft.hooks == ("forward",)
    assert s.enforcers.dns is not None and s.enforcers.dns.listen == (("127.0.0.1", 5353), ("::1", 53))
    assert s.enforcers.ipset is None and s.daemon.keep_rules_on_stop is False


@pytest.mark.parametrize("text, match", [
    ("colour: red\n", r"blockd.yaml:5: colour: unknown key 'colour'; valid keys: "),
    ("enforcers: {nft: {hooks: [sideways]}}\n", r"nft.hooks: \['sideways'\] invalid; known: prerouting"),
    ('enforcers: {dns: {listen: ["127.0.0.1:99999"]}}\n', r"enforcers.dns.listen\[0\]: '127.0.0.1:99999': port"),
    ("enforcers: {dns: {tcp_max_per_source: 0, tcp_message_s: 0}}\n",
     r"enforcers.dns: tcp_max_per_source: 0 is below the minimum 1; tcp_message_s: 0.0 is below the minimum 0.1"),
    ("daemon: {keep_rules_on_stop: maybe}\n", r"daemon.keep_rules_on_stop: bad value 'maybe'; expected true or false"),
    ("daemon: {drift_check_s: soon}\n", r"daemon.drift_check_s: bad value 'soon'; expected a number"),
    ("guards: {min_prefix_v4: 40}\n", r"guards.min_prefix_v4: 40 is above the maximum 32"),
    ("allowlist: {cidrs: [10.0.0.1/8]}\n", r"allowlist.cidrs\[0\]: '10.0.0.1/8': host bits set"),
])
def test_errors_say_where_and_what_is_valid(tmp_path: Path, text: str, match: str) -> None:
    with pytest.raises(ConfigError, match=match):
        load(tmp_path, text)


def test_all_problems_at_once(tmp_path: Path) -> None:
    with pytest.raises(ConfigError) as e:
        load(tmp_path, "colour: red\ndaemon: {poll_s: x, metrics_listen: nowhere}\n")
    assert "3 problem(s)" in str(e.value)


def test_sd_notify_messages(tmp_path: Path) -> None:
    path = tmp_path / "notify.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(str(path))
        n = Notifier({"NOTIFY_SOCKET": str(path), "WATCHDOG_USEC": "30000000", "WATCHDOG_PID": str(os.getpid())})
        assert n.enabled and n.watchdog_interval == 15.0
        n.ready("ok")
        n.reloading()
        n.watchdog()
        msgs = [sock.recv(512).decode() for _ in range(3)]
    assert msgs[0] == "READY=1\nSTATUS=ok"
    assert msgs[1].startswith("RELOADING=1\nMONOTONIC_USEC=") and msgs[2] == "WATCHDOG=1"
    assert not Notifier({}).enabled and Notifier({"WATCHDOG_USEC": "1", "WATCHDOG_PID": "1"}).watchdog_interval is None


@pytest.mark.parametrize("force_poll", [False, True], ids=["inotify", "poll"])
def test_watcher_wakes_on_rename(tmp_path: Path, force_poll: bool) -> None:
    async def scenario() -> int:
        woke = asyncio.Event()
        count = 0

        def changed() -> None:
            nonlocal count
            count += 1
            woke.set()

        task = asyncio.create_task(watch(tmp_path, changed, poll_s=0.05, settle_s=0.01, force_poll=force_poll))
        await asyncio.wait_for(woke.wait(), 5)  # the first call covers the gap before the watch
        woke.clear()
        (tmp_path / ".p.yaml.tmp").write_text("x")
        os.replace(tmp_path / ".p.yaml.tmp", tmp_path / "p.yaml")
        await asyncio.wait_for(woke.wait(), 5)
        task.cancel()
        return count

    assert asyncio.run(scenario()) >= 2


REPLACE_WAYS = {
    "rm -rf and mkdir": lambda d: (shutil.rmtree(d), d.mkdir()),
    "mv a new directory over it": lambda d: ((d.parent / "new").mkdir(), shutil.rmtree(d), os.rename(d.parent / "new", d)),
    "rename away, then re-create": lambda d: (os.rename(d, d.parent / "old"), d.mkdir()),
}


@pytest.mark.parametrize("how", list(REPLACE_WAYS))
@pytest.mark.parametrize("force_poll", [False, True], ids=["inotify", "poll"])
def test_watcher_follows_a_replaced_directory(tmp_path: Path, force_poll: bool, how: str) -> None:
    """After the directory is replaced, a file landing in the new one still wakes the daemon."""
    d = tmp_path / "policies"
    d.mkdir()

    async def scenario() -> list[str]:
        woke = asyncio.Event()
        events: list[str] = []
        task = asyncio.create_task(watch(d, woke.set, poll_s=0.2, settle_s=0.01, force_poll=force_poll,
                                         on_replaced=events.append))
        await asyncio.wait_for(woke.wait(), 5)
        REPLACE_WAYS[how](d)
        deadline = asyncio.get_running_loop().time() + 10
        # The identity check runs at least every poll_s. Polling alone cannot tell a directory
        # re-created on the same inode number; its file snapshot still sees what lands there.
        while "replaced" not in events and not (force_poll and how == "rm -rf and mkdir"):
            assert asyncio.get_running_loop().time() < deadline, events
            await asyncio.sleep(0.05)
        woke.clear()
        (d / ".p.yaml.tmp").write_text("x")
        os.replace(d / ".p.yaml.tmp", d / "p.yaml")
        await asyncio.wait_for(woke.wait(), 5)
        task.cancel()
        return events

    events = asyncio.run(scenario())
    assert "replaced" in events or (force_poll and how == "rm -rf and mkdir")


def test_sd_notify_never_blocks_when_nobody_reads(tmp_path: Path) -> None:
    """A notify socket whose reader stalls fills up; the daemon's event loop (which answers
    DNS and handles SIGTERM) must not block in send. Found by bench/scale.py (issue 14)."""
    import threading

    path = tmp_path / "notify.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(str(path))
        n = Notifier({"NOTIFY_SOCKET": str(path)})
        done = threading.Event()

        def flood() -> None:
            for i in range(5000):  # far beyond any datagram queue (net.unix.max_dgram_qlen)
                n.status(f"pass {i}")
            done.set()

        t = threading.Thread(target=flood, daemon=True)
        t.start()
        assert done.wait(60), "Notifier.send blocked on a full notify socket"
        assert sock.recv(512).decode() == "STATUS=pass 0"  # what fit was delivered, in order
