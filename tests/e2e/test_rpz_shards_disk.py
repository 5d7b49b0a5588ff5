"""zone_file_shards on a full disk (a real 1 MiB tmpfs, as root): no shard is replaced unless every
changed one could be written, no temporary file is left, the zone served stays the old one, and
the next try after space is freed writes the change."""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator
from datetime import datetime, timezone
from pathlib import Path

import pytest

from blockd.dns import rpz
from blockd.dns.rpzserver import RpzServer
from blockd.dns.testing import LoopThread
from blockd.enforcers.rpz import RpzEnforcer
from blockd.errors import EnforcerError
from blockd.model import DomainRule, OrderInfo, RuleSet

pytestmark = [pytest.mark.e2e, pytest.mark.skipif(os.geteuid() != 0, reason="mounts a tmpfs (root)")]
T = datetime(2026, 1, 1, tzinfo=timezone.utc)


def rules(orders: list[str], per: int = 40) -> RuleSet:
    info = {o: OrderInfo(o, "regulator", 1, "Example Court", f"R-{o}", None, "block", None, None, T) for o in orders}
    return RuleSet.build([DomainRule(f"{o}-{i}.example.net", True, frozenset({o})) for o in orders
                          for i in range(per)], orders=info)


@pytest.fixture
def small(tmp_path: Path) -> Iterator[Path]:
    d = tmp_path / "zones"
    d.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=1m,mode=0755", "tmpfs", str(d)], check=True)
    try:
        yield d
    finally:
        subprocess.run(["umount", "-l", str(d)], check=False)


def fill(d: Path) -> Path:
    ballast = d / "ballast"
    with open(ballast, "wb", buffering=0) as f:  # unbuffered: nothing left to flush at close
        try:
            while True:
                f.write(b"\0" * 4096)
        except OSError:
            pass
        for _ in range(64):  # the last partial page: a small write must not fit either
            try:
                f.write(b"\0")
            except OSError:
                break
    return ballast


def snapshot(d: Path) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in d.iterdir() if p.name != "ballast"}


def test_full_disk_replaces_no_shard(small: Path, tmp_path: Path) -> None:
    s = rpz.RpzSettings(listen=(("127.0.0.1", 0),), zone_file=str(small / "rpz.blockd.zone"), zone_file_shards=8,
                        state_file=str(tmp_path / "rpz.state"))
    v1 = rpz.ZoneVersion(s, 1, rpz.owners(rules([f"o{i}" for i in range(16)]), False),
                         rules([f"o{i}" for i in range(16)]))
    assert rpz.write_shards(s, v1) == 8
    before = snapshot(small)
    ballast = fill(small)
    # every order changed (more names each): every shard must be rewritten, ~80 KB, and the disk
    # has room for the first few only
    os.truncate(ballast, ballast.stat().st_size - 24 * 1024)
    rs2 = rules([f"o{i}" for i in range(16)], per=60)
    v2 = rpz.ZoneVersion(s, 2, rpz.owners(rs2, False), rs2)
    assert sum(map(len, rpz.shard_texts(s, v2))) > 48 * 1024
    with pytest.raises(OSError):
        rpz.write_shards(s, v2)
    assert snapshot(small) == before  # no shard replaced, no .tmp- file left
    ballast.unlink()
    assert rpz.write_shards(s, v2) == 8 and snapshot(small) != before


def test_enforcer_on_a_full_disk_replaces_no_shard_and_writes_them_on_retry(small: Path, tmp_path: Path) -> None:
    lt = LoopThread()
    s = rpz.RpzSettings(listen=(("127.0.0.1", 0),), zone_file=str(small / "rpz.blockd.zone"), zone_file_shards=8,
                        state_file=str(tmp_path / "rpz.state"))
    srv = RpzServer(s)
    lt.run(srv.start())
    try:
        enf = RpzEnforcer(srv)
        lt.run(enf.apply(rules(["o1", "o2"])))
        serial = srv.serial
        before = snapshot(small)
        ballast = fill(small)
        with pytest.raises(EnforcerError) as e:
            lt.run(enf.apply(rules(["o1", "o2", "o3"])))
        assert "No space left on device" in str(e.value)
        # The new version is served by transfer (secondaries are not held back by a zone file);
        # on disk nothing was replaced, no half-written shard set: Knot keeps the old zone.
        assert srv.serial != serial and snapshot(small) == before
        ballast.unlink()
        lt.run(enf.apply(rules(["o1", "o2", "o3"])))  # the daemon's retry writes the files owed
        after = snapshot(small)
        changed = [n for n in before if n.startswith("rpz.blockd.zone.shard-") and before[n] != after[n]]
        assert len(changed) == 1 and b"o3-0.example.net CNAME" in after[changed[0]]
    finally:
        lt.run(srv.aclose())
        lt.close()
