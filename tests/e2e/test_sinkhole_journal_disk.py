"""A full disk under the sinkhole's journal: the sinkhole keeps answering from the table in force,
the failed saves are counted, and the first save after space comes back carries every change
missed, so a restart serves exactly the last table.

The state directory is a real tmpfs of 1 MiB (mounted on the test's own temporary directory,
unmounted after), filled by a file until the kernel says ENOSPC; the sinkhole listens on
127.0.0.1 and is asked by dnspython.
"""

from __future__ import annotations

import errno
import os
import subprocess
from collections.abc import Iterator
from datetime import datetime, timezone
from pathlib import Path

import dns.message
import dns.query
import dns.rcode
import pytest

from blockd.dns import wire
from blockd.dns.server import SinkholeServer, SinkholeSettings
from blockd.dns.table import Table, load_table
from blockd.dns.testing import LoopThread
from blockd.enforcers.dns import SinkholeEnforcer, TableStore
from blockd.model import Change, DomainRule, OrderInfo, RuleSet, diff, rule_delta
from tests.e2e.test_daemon import wait_for

pytestmark = pytest.mark.e2e
T0 = datetime(2026, 1, 1, tzinfo=timezone.utc)


def rules(serial: int, names: list[str]) -> RuleSet:
    oid = "court/o1"
    info = OrderInfo(oid, "court", serial, "Test Court", f"T-{serial}", None, "block", None, None, T0)
    return RuleSet.build([DomainRule(n, False, frozenset({oid})) for n in names], orders={oid: info})


@pytest.fixture
def tmpfs(tmp_path: Path) -> Iterator[Path]:
    d = tmp_path / "state"
    d.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m,mode=0700", "tmpfs", str(d)], check=True)
    try:
        yield d
    finally:
        subprocess.run(["umount", "-l", str(d)], check=False)


def fill(d: Path) -> Path:
    """Write a file until the file system is full (the kernel's ENOSPC, nothing simulated)."""
    f = d / "filler"
    fd = os.open(f, os.O_WRONLY | os.O_CREAT, 0o600)
    try:
        while True:
            os.write(fd, b"\0" * 4096)
    except OSError as e:
        assert e.errno == errno.ENOSPC, e
    finally:
        os.close(fd)
    return f


def test_a_full_tmpfs_during_an_append_keeps_serving_and_recovers(tmpfs: Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(TableStore, "accepted_digest", lambda self: "accepted")  # the state is not the subject
    base_names = [f"n{i}.example" for i in range(400)]
    steps = [rules(1, base_names)]
    for serial in range(2, 6):  # each serial: one name leaves, one enters, and the order's reference moves
        steps.append(rules(serial, [f"n{i}.example" for i in range(serial - 1, 400)] + [f"new{serial}.example"]))
    events: list[str] = []
    lt = LoopThread()
    server = SinkholeServer(SinkholeSettings(listen=(("127.0.0.1", 0),)))
    lt.run(server.start())
    enf = SinkholeEnforcer(server, store=TableStore(tmpfs), on_table_file=events.append)
    port = server.addresses[0][1]

    def ask(name: str) -> dns.message.Message:
        return dns.query.udp(dns.message.make_query(name, "A", use_edns=0), "127.0.0.1", 5, port=port)

    def apply(i: int) -> None:
        cur, new = steps[i - 1], steps[i]
        removed, added = rule_delta(cur, new)
        a = lt.run(enf.apply(new, Change(cur.digest, diff(cur, new), removed, added)))
        assert a.in_sync and enf.last_path == "patch"

    try:
        assert lt.run(enf.apply(steps[0])).in_sync
        wait_for(lambda: "saved" in events, timeout=60, what="the base")
        filler = fill(tmpfs)
        apply(1)
        wait_for(lambda: "save_failed" in events, timeout=60, what="the failed append")
        apply(2)
        wait_for(lambda: events.count("save_failed") == 2, timeout=60, what="the second failed append")
        # the sinkhole answers from the table in force, not from what is on disk
        for name, blocked in (("new3.example", True), ("n1.example", False), ("n0.example", False),
                              ("n2.example", True)):
            r = ask(name)
            assert (r.rcode() == dns.rcode.NXDOMAIN) == blocked, (name, r)
        assert "(T-3)" in ask("n2.example").options[0].text  # type: ignore[attr-defined]
        on_disk = load_table(tmpfs / "dns-table.bin", server.answer_settings, tmpfs / "dns-table.journal")
        assert on_disk.dropped is None and on_disk.records == 0  # nothing torn left behind
        filler.unlink()
        apply(3)
        wait_for(lambda: "appended" in events, timeout=60, what="the append after space came back")
        apply(4)
        lt.run(enf.aclose())
    finally:
        lt.close()
    assert events == ["saved", "save_failed", "save_failed", "appended", "appended"]
    got = load_table(tmpfs / "dns-table.bin", server.answer_settings, tmpfs / "dns-table.journal")
    assert got.dropped is None and got.records == 2
    assert got.table.serves_exactly(steps[4]) and got.table.to_ruleset().digest == steps[4].digest
    ref = Table.build(steps[4], server.answer_settings)
    for name in ("n4.example", "new2.example", "new3.example", "new5.example", "n399.example"):
        key = wire.name_to_wire(name)
        a, b = got.table.exact_verdict(key), ref.exact_verdict(key)
        assert (a and (a.text, a.orders)) == (b and (b.text, b.orders)), name
