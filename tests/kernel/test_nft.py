"""nftables enforcer against a real kernel: traffic, counters, readback, atomicity, diffs."""

from __future__ import annotations

import asyncio
import errno
from collections.abc import Callable

import pytest
from common import intervals, ruleset, v6_prefixes
from conftest import TARGETS4, TARGETS6, Topo, background, intervals_of, nft_intervals, policy, sh

from blockd.enforcers.nft import NftEnforcer, NftSettings
from blockd.errors import EnforcerError
from blockd.ranges import parse_cidr

Closing = Callable[[NftEnforcer], NftEnforcer]

pytestmark = pytest.mark.kernel

def test_reject_blocks_v4_v6_tcp_and_ping_and_counts(topo: Topo, closing: Closing) -> None:
    assert all(topo.connects(topo.c, a) for a in TARGETS4 + TARGETS6)

    async def scenario() -> None:
        enf = closing(NftEnforcer(NftSettings(verdict="reject"), netns=topo.m))
        desired = policy(background(300, 3), v6_prefixes(200, 3))
        applied = await enf.apply(desired)
        assert applied.in_sync and applied.added == sum(map(len, intervals_of(desired).values()))
        for ns in (topo.c, topo.m):  # forward hook, then output hook
            assert [topo.connects(ns, a) for a in TARGETS4] == [False, False, False, True]
            assert [topo.connects(ns, a) for a in TARGETS6] == [False, False, False, True]
        assert not topo.pings(topo.c, TARGETS4[0]) and topo.pings(topo.c, TARGETS4[3])
        assert not topo.pings(topo.c, TARGETS6[0]) and topo.pings(topo.c, TARGETS6[3])
        before = (await enf.stats()).counters
        assert before["daddr4"][0] > 0 and before["daddr6"][0] > 0
        assert not topo.connects(topo.c, TARGETS4[1])
        after = (await enf.stats()).counters
        assert after["daddr4"][0] > before["daddr4"][0] and after["daddr4"][1] > before["daddr4"][1]
        back = await enf.readback()
        assert back.digest == desired.digest
        assert nft_intervals(topo.m) == intervals_of(desired)

    asyncio.run(scenario())


def test_drop_on_source_address(topo: Topo, closing: Closing) -> None:
    async def scenario() -> None:
        enf = closing(NftEnforcer(NftSettings(verdict="drop", match_saddr=True, hooks=("forward",)), netns=topo.m))
        client = parse_cidr("10.77.1.2/32")
        await enf.apply(ruleset([(client.network, 32)], []))
        assert not topo.connects(topo.c, TARGETS4[3], timeout=0.4)  # the client itself is blocked
        assert topo.connects(topo.c, TARGETS6[3])
        assert topo.connects(topo.m, TARGETS4[3])  # output is not hooked; other sources pass
        assert (await enf.stats()).counters["saddr4"][0] >= 1

    asyncio.run(scenario())


def test_log_mode_counts_but_lets_through(topo: Topo, closing: Closing) -> None:
    async def scenario() -> None:
        enf = closing(NftEnforcer(NftSettings(verdict="log"), netns=topo.m))
        await enf.apply(policy())
        assert topo.connects(topo.c, TARGETS4[0]) and topo.connects(topo.c, TARGETS6[0])
        counters = (await enf.stats()).counters
        assert counters["daddr4"][0] > 0 and counters["daddr6"][0] > 0

    asyncio.run(scenario())


def test_failed_batch_keeps_old_state_byte_for_byte(topo: Topo, closing: Closing) -> None:
    async def scenario() -> None:
        enf = closing(NftEnforcer(netns=topo.m))
        old = policy(background(400, 5), v6_prefixes(100, 5))
        await enf.apply(old)
        # Someone else puts 10.50.0.0/24 into blockd's shard set for 10/8 ...
        sh("nft", "add", "element", "inet", "blockd", "v4_0a", "{ 10.50.0.0/24 }", ns=topo.m)
        snapshot = sh("nft", "-j", "list", "table", "inet", "blockd", ns=topo.m)
        held = policy(background(400, 5) + [(parse_cidr("10.50.0.0/24").network, 24)], v6_prefixes(100, 5))
        # ... so the kernel refuses the overlapping 10.50.0.128/25 in the middle of a batch
        # that also deletes 20 prefixes and adds 300 in shards before and after 10/8.
        new = policy(background(400, 5)[20:] + background(300, 6) + [(parse_cidr("10.50.0.128/25").network, 25)],
                     v6_prefixes(100, 5))
        with pytest.raises(EnforcerError) as caught:
            await enf.apply(new)
        assert caught.value.errno == errno.EEXIST
        assert sh("nft", "-j", "list", "table", "inet", "blockd", ns=topo.m) == snapshot
        assert (await enf.readback()).digest == held.digest
        # last_commit is still the first load: the failed batch committed nothing.
        assert enf.last_commit is not None and enf.last_commit.elements == sum(map(len, intervals_of(old).values()))
        # The next apply re-reads the kernel and replaces the foreign element.
        assert (await enf.apply(new)).in_sync
        assert (await enf.readback()).digest == new.digest
        assert nft_intervals(topo.m) == intervals_of(new)

    asyncio.run(scenario())


def test_incremental_sends_only_the_diff(topo: Topo, closing: Closing) -> None:
    async def scenario() -> None:
        enf = closing(NftEnforcer(netns=topo.m))
        base4, base6 = background(2000, 7), v6_prefixes(500, 7)
        a = policy(base4, base6)
        await enf.apply(a)
        fresh = [p for p in background(2100, 8) if p not in set(base4)][:70]
        b = policy(base4[50:] + fresh, base6[:-10])
        assert not set(intervals(fresh, 32)) & set(intervals(base4, 32))
        applied = await enf.apply(b)
        assert (applied.added, applied.removed) == (70, 60)
        assert enf.last_commit is not None and enf.last_commit.elements == 130
        assert enf.last_commit.messages <= 130  # element messages only: no table/chain/set
        assert (await enf.readback()).digest == b.digest
        assert nft_intervals(topo.m) == intervals_of(b)
        again = await enf.apply(b)
        assert (again.added, again.removed) == (0, 0)

    asyncio.run(scenario())


def test_other_tables_are_never_touched(topo: Topo, closing: Closing) -> None:
    sh("nft", "-f", "-", ns=topo.m, stdin="""
table inet other {
  set keep { type ipv4_addr; elements = { 192.0.2.1 }; }
  chain input { type filter hook input priority 0; policy accept; counter; }
}
table ip filter { chain forward { type filter hook forward priority 10; policy accept; }; }
""")
    before = sh("nft", "-j", "list", "tables", ns=topo.m), sh("nft", "list", "table", "inet", "other", ns=topo.m)

    async def scenario() -> None:
        enf = closing(NftEnforcer(netns=topo.m))
        await enf.apply(policy())
        sh("nft", "delete", "table", "inet", "blockd", ns=topo.m)
        await enf.readback()
        await enf.apply(policy())  # a full rebuild: delete + create of blockd's table only

    asyncio.run(scenario())
    tables = sh("nft", "-j", "list", "tables", ns=topo.m)
    assert '"name": "other"' in tables and '"name": "filter"' in tables and '"name": "blockd"' in tables
    assert sh("nft", "list", "table", "inet", "other", ns=topo.m) == before[1]


def test_applied_digest_is_read_back_from_the_elements_a_commit_touched(topo: Topo, closing: Closing) -> None:
    """Issues 11 and 14: Applied.digest comes from the kernel, never from "every message was
    ACKed", and the read-back after a commit costs what the commit changed.

    Someone else adds 10.60.0.0/24 to shard v4_0a behind blockd's back. A commit reads back
    only the elements it touched (scope `touched`) and says when the rest was last read in
    full; the full read-back (the drift check's) finds the stranger."""
    async def scenario() -> None:
        enf = closing(NftEnforcer(netns=topo.m))
        base = background(200, 7)
        first = await enf.apply(policy(base))
        # a new table is read back whole
        assert first.in_sync and first.readback_scope == "full" and first.readback_at == first.full_readback_at
        sh("nft", "add", "element", "inet", "blockd", "v4_0a", "{ 10.60.0.0/24 }", ns=topo.m)
        other = policy(base + [(parse_cidr("198.51.100.0/24").network, 24), (parse_cidr("10.62.0.0/24").network, 24)])
        a = await enf.apply(other)
        assert a.in_sync and a.readback_scope == "touched" and a.full_readback_at == first.full_readback_at
        assert a.readback_at is not None and first.readback_at is not None and a.readback_at > first.readback_at
        assert (await enf.readback()).digest != other.digest  # the full read-back finds it
        # the full read-back refreshed the view: the next apply removes the stranger
        fixed = await enf.apply(other)
        assert fixed.in_sync and fixed.removed == 1
        assert nft_intervals(topo.m) == intervals_of(other)

    asyncio.run(scenario())


def test_element_readback_sees_what_the_kernel_holds(topo: Topo, closing: Closing) -> None:
    """The per-element read-back (one GETSETELEM per touched bound) answers from the kernel:
    an element missing, cut short or grown, or a deleted one still (partly) there, fails it."""
    from blockd.enforcers.nft import plan_keys

    def key(cidr: str) -> set[int]:
        c = parse_cidr(cidr)
        return plan_keys(4, [(c.first, c.last)])

    async def scenario() -> None:
        enf = closing(NftEnforcer(netns=topo.m))
        await enf.apply(policy([(parse_cidr("10.62.0.0/24").network, 24), (parse_cidr("10.64.0.0/16").network, 16)]))
        none: set[int] = set()
        cases = [  # (adds, dels, True when the kernel holds that)
            (key("10.62.0.0/24"), none, True),
            (key("10.62.0.0/25"), none, False),  # the kernel holds more than that
            (key("10.62.0.0/23"), none, False),  # ... less
            (key("10.63.0.0/24"), none, False),  # nothing
            (none, key("10.63.0.0/24"), True),  # gone
            (none, key("10.62.0.0/24"), False),  # still there
            (none, key("10.64.128.0/24"), False),  # inside one that is there
            (key("10.64.0.0/16"), key("10.64.5.0/24"), True),  # deleted, but covered by one added
            (key("10.64.0.0/16") | key("10.62.0.0/24"), none, True),
        ]
        for adds, dels, held in cases:
            assert enf._elements_hold({4: adds, 6: set()}, {4: dels, 6: set()}) is held, (adds, dels)

    asyncio.run(scenario())
