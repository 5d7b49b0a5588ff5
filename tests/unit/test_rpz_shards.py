"""zone_file_shards: the zone cut into shard files for Knot Resolver, which re-reads a whole file on
every change. The shards hold exactly the zone's records; a new order rewrites one shard; the files
are replaced only when their text changed; the generated kresd config loads every shard."""

from __future__ import annotations

import os
from datetime import datetime, timezone
from pathlib import Path

import dns.rdatatype
import dns.zone
import pytest

from blockd.dns import rpz, rpzconfig
from blockd.model import DomainRule, NetRule, OrderInfo, RuleSet

T = datetime(2026, 1, 1, tzinfo=timezone.utc)


def order(oid: str) -> OrderInfo:
    return OrderInfo(oid, "regulator", 1, "Bộ Thông tin và Truyền thông", f"QD-{oid}", None, "block", None, None, T)


def ruleset(n_orders: int, per: int, extra: dict[str, list[str]] | None = None) -> RuleSet:
    rules = [DomainRule(f"n{o}-{i}.example", i % 2 == 0, frozenset({f"o{o}"})) for o in range(n_orders)
             for i in range(per)]
    rules += [DomainRule("shared.example", False, frozenset({"o1"})),  # exact and subtree, other orders
              DomainRule("shared.example", True, frozenset({"o2", "o3"}))]
    orders = {f"o{o}": order(f"o{o}") for o in range(n_orders)}
    for oid, names in (extra or {}).items():
        orders[oid] = order(oid)
        rules += [DomainRule(x, True, frozenset({oid})) for x in names]
    return RuleSet.build(rules, v4=[NetRule(0xC0000200, 0xC00002FF, frozenset({"o0"}))], orders=orders)


def version(s: rpz.RpzSettings, rs: RuleSet, serial: int = 7) -> rpz.ZoneVersion:
    return rpz.ZoneVersion(s, serial, rpz.owners(rs, s.ip_triggers), rs)


def records(text: str, origin: str) -> set[tuple[str, int, str]]:
    z = dns.zone.from_text(text, origin=origin, relativize=False, check_origin=True)
    return {(n.to_text(), rds.rdtype, rd.to_text()) for n, rds in z.iterate_rdatasets()
            if rds.rdtype not in (dns.rdatatype.SOA, dns.rdatatype.NS) for rd in rds}


@pytest.mark.parametrize("k,ip", [(2, False), (7, True), (16, False)])
def test_shards_hold_exactly_the_zone(k: int, ip: bool) -> None:
    s = rpz.RpzSettings(zone_file="/x/rpz.zone", zone_file_shards=k, ip_triggers=ip)
    rs = ruleset(20, 6)
    v = version(s, rs)
    whole = records("".join(rpz.zone_text(s, v)), s.origin)
    shards = rpz.shard_texts(s, v)
    assert len(shards) == k
    parts = [records(t, s.origin) for t in shards]
    assert set().union(*parts) == whole and sum(map(len, parts)) == len(whole)  # a partition: nothing twice
    assert sum(1 for p in parts if p) > 1  # spread, not all in one file
    for t in shards:  # each is a zone of its own: SOA first (kresd takes the origin from it)
        assert t.splitlines()[[ln.startswith("@ SOA") for ln in t.splitlines()].index(True) - 2] == f"$ORIGIN {s.origin}"
    # the names of one order stay in one shard
    for o in range(20):
        holders = {i for i, p in enumerate(parts) if any(n.startswith(f"n{o}-") or n.startswith(f"*.n{o}-")
                                                          for n, _, _ in p)}
        assert len(holders) == 1, (o, holders)


def test_a_new_order_rewrites_one_shard() -> None:
    s = rpz.RpzSettings(zone_file="/x/rpz.zone", zone_file_shards=16)
    before = rpz.shard_texts(s, version(s, ruleset(50, 4), 7))
    after = rpz.shard_texts(s, version(s, ruleset(50, 4, {"court-9": ["a.example", "b.example", "c.example"]}), 8))
    changed = [i for i in range(16) if before[i] != after[i]]
    assert len(changed) == 1  # the zone serial moved from 7 to 8: no shard carries it
    assert "court-9" in after[changed[0]] and "*.a.example CNAME ." in after[changed[0]]


def test_write_shards_replaces_only_what_changed(tmp_path: Path) -> None:
    s = rpz.RpzSettings(zone_file=str(tmp_path / "rpz.blockd.zone"), zone_file_shards=8)
    assert rpz.write_shards(s, version(s, ruleset(30, 3), 1)) == 8  # all missing: all written
    paths = [rpz.shard_path(s.zone_file or "", i) for i in range(8)]
    inodes = [os.stat(p).st_ino for p in paths]
    assert rpz.write_shards(s, version(s, ruleset(30, 3), 2)) == 0  # same records, new serial: nothing
    assert rpz.write_shards(s, version(s, ruleset(30, 3, {"court-9": ["a.example"]}), 3)) == 1
    now = [os.stat(p).st_ino for p in paths]
    assert sum(a != b for a, b in zip(inodes, now)) == 1  # replaced by rename: a new inode, one file
    os.unlink(paths[3])
    assert rpz.write_shards(s, version(s, ruleset(30, 3, {"court-9": ["a.example"]}), 3)) == 1  # a lost one
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".tmp-")]


@pytest.mark.parametrize("kwargs,match", [
    ({"zone_file_shards": 0, "zone_file": "/x/z"}, r"zone_file_shards: 0; valid: 1 to 256"),
    ({"zone_file_shards": 257, "zone_file": "/x/z"}, r"zone_file_shards: 257; valid: 1 to 256"),
    ({"zone_file_shards": 4}, r"zone_file_shards: 4 needs zone_file"),
])
def test_bad_settings(kwargs: dict[str, object], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        rpz.RpzSettings(**kwargs)  # type: ignore[arg-type]


def test_knot_config_loads_every_shard() -> None:
    s = rpz.RpzSettings(layout="authority", zone_file="/var/lib/blockd/{zone}zone", zone_file_shards=3)
    zones = rpzconfig.zones_for(s, ruleset(2, 2))
    lua = rpzconfig.render("knot", s, zones, ("127.0.0.1", 53))
    for z in zones:
        assert z.zone_file is not None
        for i in range(3):
            assert f'"{z.zone_file}.shard-{i}", true))' in lua
        assert f'"{z.zone_file}", true))' not in lua  # the whole file is for other readers
    assert lua.count("policy.rpz(") == 3 * len(zones)
    one = rpzconfig.render("knot", rpz.RpzSettings(zone_file="/z/rpz.zone"),
                           rpzconfig.zones_for(rpz.RpzSettings(zone_file="/z/rpz.zone"), ruleset(2, 2)),
                           ("127.0.0.1", 53))
    assert '"/z/rpz.zone", true))' in one and "shard" not in one
