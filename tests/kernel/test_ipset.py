"""ipset enforcer against a real kernel, matched by iptables/ip6tables `-m set` in the middle namespace."""

from __future__ import annotations

import asyncio
from collections.abc import Callable

import pytest
from common import v6_prefixes
from conftest import TARGETS4, TARGETS6, Topo, background, intervals_of, ipset_intervals, policy, sh

from blockd.enforcers.ipset import IpsetEnforcer, IpsetSettings
from blockd.errors import EnforcerError
from blockd.ranges import parse_cidr

pytestmark = pytest.mark.kernel
Closing = Callable[[IpsetEnforcer], IpsetEnforcer]


def match_sets(ns: str) -> None:
    for tool, name in (("iptables", "blockd4"), ("ip6tables", "blockd6")):
        for chain in ("FORWARD", "OUTPUT"):
            sh(tool, "-A", chain, "-m", "set", "--match-set", name, "dst", "-j", "REJECT", ns=ns)


def packets(ns: str, tool: str, chain: str) -> int:
    rows = sh(tool, "-L", chain, "-v", "-x", "-n", ns=ns).splitlines()[2:]
    return sum(int(r.split()[0]) for r in rows if "match-set" in r)


def saved_lines(ns: str) -> list[str]:
    return sorted(line for line in sh("ipset", "save", ns=ns).splitlines() if line.startswith("add "))


def test_iptables_match_set_blocks_v4_v6_and_counts(topo: Topo, closing: Closing) -> None:
    async def scenario() -> None:
        enf = closing(IpsetEnforcer(netns=topo.m))
        desired = policy(background(300, 3), v6_prefixes(200, 3))
        assert (await enf.apply(desired)).in_sync
        match_sets(topo.m)
        for ns in (topo.c, topo.m):  # FORWARD, then OUTPUT
            assert [topo.connects(ns, a) for a in TARGETS4] == [False, False, False, True]
            assert [topo.connects(ns, a) for a in TARGETS6] == [False, False, False, True]
        assert not topo.pings(topo.c, TARGETS4[0]) and topo.pings(topo.c, TARGETS4[3])
        assert not topo.pings(topo.c, TARGETS6[0]) and topo.pings(topo.c, TARGETS6[3])
        before = packets(topo.m, "iptables", "FORWARD")
        assert before > 0 and packets(topo.m, "ip6tables", "FORWARD") > 0
        assert not topo.connects(topo.c, TARGETS4[2])
        assert packets(topo.m, "iptables", "FORWARD") > before
        want = intervals_of(desired)
        stats = await enf.stats()
        assert dict(stats.elements) == {"blockd4": len(ipset_lines(topo.m, "blockd4")),
                                        "blockd6": len(ipset_lines(topo.m, "blockd6"))}
        assert (await enf.readback()).digest == desired.digest
        assert ipset_intervals(topo.m) == want

    asyncio.run(scenario())


def ipset_lines(ns: str, name: str) -> list[str]:
    return [line for line in saved_lines(ns) if line.split()[1] == name]


def test_incremental_sends_only_the_diff(topo: Topo, closing: Closing) -> None:
    async def scenario() -> None:
        enf = closing(IpsetEnforcer(netns=topo.m))
        base4 = background(2000, 7)
        await enf.apply(policy(base4, v6_prefixes(500, 7)))
        fresh = [p for p in background(2100, 8) if p not in set(base4)][:70]
        b = policy(base4[50:] + fresh, v6_prefixes(500, 7)[:-10])
        applied = await enf.apply(b)
        assert (applied.added, applied.removed) == (70, 60)  # the test prefixes are CIDRs already
        assert enf.last_commit is not None and enf.last_commit.elements == 130
        assert (await enf.readback()).digest == b.digest
        assert ipset_intervals(topo.m) == intervals_of(b)

    asyncio.run(scenario())


def test_failed_swap_keeps_old_sets_byte_for_byte(topo: Topo, closing: Closing) -> None:
    async def scenario() -> None:
        enf = closing(IpsetEnforcer(IpsetSettings(min_maxelem=64), netns=topo.m))
        await enf.apply(policy(background(20, 9), v6_prefixes(10, 9)))
        # Someone replaces blockd6 with a set of another type: the swap into it must fail.
        sh("ipset", "destroy", "blockd6", ns=topo.m)
        sh("ipset", "create", "blockd6", "hash:ip", "family", "inet6", ns=topo.m)
        sh("ipset", "add", "blockd6", "fd77:100::9", ns=topo.m)
        snapshot = sh("ipset", "save", ns=topo.m)
        # 200 prefixes > maxelem 64: a full replace (shadow, fill, swap v4, swap v6 fails).
        with pytest.raises(EnforcerError) as caught:
            await enf.apply(policy(background(200, 10), v6_prefixes(10, 9)))
        assert caught.value.errno is not None
        assert sh("ipset", "save", ns=topo.m) == snapshot
        assert "blockd4-new" not in sh("ipset", "list", "-n", ns=topo.m)

    asyncio.run(scenario())


def test_failed_incremental_update_is_undone(topo: Topo, closing: Closing) -> None:
    async def scenario() -> None:
        enf = closing(IpsetEnforcer(netns=topo.m))
        base4 = background(100, 11)
        await enf.apply(policy(base4, v6_prefixes(10, 11)))
        sh("ipset", "destroy", "blockd6", ns=topo.m)
        sh("ipset", "create", "blockd6", "hash:ip", "family", "inet6", ns=topo.m)
        before = saved_lines(topo.m)
        # v4 adds and deletes go through, then the v6 adds fail: everything is undone.
        with pytest.raises(EnforcerError):
            await enf.apply(policy(base4[10:] + background(30, 12), v6_prefixes(20, 11)))
        assert saved_lines(topo.m) == before

    asyncio.run(scenario())


def test_failed_first_load_leaves_no_set_behind(topo: Topo, closing: Closing) -> None:
    async def scenario() -> None:
        sh("ipset", "create", "blockd6", "hash:ip", "family", "inet6", ns=topo.m)  # not ours
        snapshot = sh("ipset", "save", ns=topo.m)
        enf = closing(IpsetEnforcer(netns=topo.m))
        # blockd4 is created by renaming its shadow; the swap into the foreign blockd6 then
        # fails, and the rename is undone.
        with pytest.raises(EnforcerError, match="set types differ"):
            await enf.apply(policy(background(50, 14), v6_prefixes(10, 14)))
        assert sh("ipset", "save", ns=topo.m) == snapshot

    asyncio.run(scenario())


def test_applied_digest_is_read_back_from_the_entries_a_change_touched(topo: Topo, closing: Closing) -> None:
    """Issue 11: after an incremental change each entry it added or deleted is TESTed in the
    kernel; a stranger elsewhere waits for the full read-back (scope `touched`, with the time of
    the last full one). An address still blocked after its entry was deleted (a stranger
    covers it) is found at once, and the Applied digest is the kernel's."""
    host = (parse_cidr("10.73.0.5/32").network, 32)

    async def scenario() -> None:
        enf = closing(IpsetEnforcer(netns=topo.m))
        base4, base6 = background(300, 4) + [host], v6_prefixes(200, 4)
        first = await enf.apply(policy(base4, base6))
        assert first.in_sync and first.readback_scope == "full" and first.readback_at == first.full_readback_at
        sh("ipset", "add", "blockd4", "10.70.0.0/24", ns=topo.m)
        only6 = policy(base4, base6[:-1])
        a = await enf.apply(only6)
        assert a.in_sync and a.readback_scope == "touched" and a.full_readback_at == first.full_readback_at
        assert a.readback_at is not None and first.readback_at is not None and a.readback_at > first.readback_at
        assert (await enf.readback()).digest != only6.digest  # the full read-back finds the stranger
        assert (await enf.apply(only6)).removed == 1  # and the next apply removes it
        sh("ipset", "add", "blockd4", "10.73.0.0/24", ns=topo.m)
        gone = policy([p for p in base4 if p != host], base6[:-1])
        b = await enf.apply(gone)
        assert not b.in_sync and b.desired_digest == gone.digest and b.readback_scope == "full"
        assert b.digest == (await enf.readback()).digest != gone.digest

    asyncio.run(scenario())
