"""Issue 14: kernel enforcers take the change. With `Change(base, plan)` from what they hold,
nft and ipset commit only the plan and read back only what it touched; with any other base,
after a failure, or after someone changed the sets behind blockd's back, they diff in full.
Every case is checked with the native tool (`nft -j list`, `ipset save`)."""

from __future__ import annotations

import asyncio
import itertools
import os
import subprocess
from collections.abc import Callable, Iterator
from typing import Any

import pytest
from common import ruleset, v4_prefixes, v6_prefixes
from conftest import intervals_of, ipset_intervals, nft_intervals, sh

from blockd.enforcers.ipset import IpsetEnforcer
from blockd.enforcers.nft import NftEnforcer
from blockd.model import Change, RuleSet, diff

pytestmark = pytest.mark.kernel
KINDS = ["nft", "ipset"]
_n = itertools.count()


@pytest.fixture
def netns() -> Iterator[str]:
    ns = f"bkt-{os.getpid()}-d{next(_n)}"
    sh("ip", "netns", "add", ns)
    try:
        yield ns
    finally:
        subprocess.run(["ip", "netns", "del", ns], capture_output=True, check=False)


def make(kind: str, ns: str) -> Any:
    return NftEnforcer(netns=ns) if kind == "nft" else IpsetEnforcer(netns=ns)


def native(kind: str, ns: str) -> dict[int, list[tuple[int, int]]]:
    return nft_intervals(ns) if kind == "nft" else ipset_intervals(ns)


def steal(kind: str, ns: str, victim: tuple[int, int]) -> None:
    """Someone deletes one of blockd's v4 intervals behind its back, with the native tool."""
    from blockd.ranges import format_cidr, interval_to_cidrs
    cidrs = [format_cidr(4, n, p) for n, p in interval_to_cidrs(4, *victim)]
    if kind == "nft":
        from blockd.enforcers.nft import shard
        sh("nft", "delete", "element", "inet", "blockd", f"v4_{shard(4, victim[0]):02x}", f"{{ {', '.join(cidrs)} }}", ns=ns)
    else:
        for cidr in cidrs:
            sh("ipset", "del", "blockd4", cidr, ns=ns)


def base_and_next(n: int, k: int) -> tuple[RuleSet, RuleSet]:
    """A base of `n` v4 + n/10 v6 prefixes; the next drops `k` of each and adds `k` new ones."""
    v4, v6 = v4_prefixes(n + k, 11), v6_prefixes(n // 10 + k, 11)
    return ruleset(v4[:n], v6[:n // 10]), ruleset(v4[k:], v6[k:])


@pytest.mark.parametrize("kind", KINDS)
def test_change_from_what_is_held_commits_only_the_plan(netns: str, kind: str,
                                                        closing: Callable[[Any], Any]) -> None:
    async def scenario() -> None:
        enf = closing(make(kind, netns))
        a, b = base_and_next(20_000, 7)
        assert (await enf.apply(a)).in_sync
        plan = diff(a, b)
        applied = await enf.apply(b, Change(a.digest, plan))
        assert enf.last_path == "plan" and applied.in_sync and applied.readback_scope == "touched"
        assert (applied.added, applied.removed) == (14, 14)  # 7 v4 + 7 v6 each way
        assert enf.last_commit.elements == 28  # the plan, not a diff of 22,000 elements
        assert native(kind, netns) == intervals_of(b)
        assert (await enf.readback()).digest == b.digest
        # nothing changed (a touch, SIGHUP): no commit at all
        before = enf.last_commit
        same = await enf.apply(b, Change(b.digest, diff(b, b)))
        assert enf.last_path == "plan" and same.in_sync and (same.added, same.removed) == (0, 0)
        assert enf.last_commit is before
        # back again by plan
        back = await enf.apply(a, Change(b.digest, diff(b, a)))
        assert enf.last_path == "plan" and back.in_sync and native(kind, netns) == intervals_of(a)

    asyncio.run(scenario())


@pytest.mark.parametrize("kind", KINDS)
def test_a_change_from_another_base_is_applied_in_full(netns: str, kind: str,
                                                       closing: Callable[[Any], Any]) -> None:
    async def scenario() -> None:
        enf = closing(make(kind, netns))
        a, b = base_and_next(3000, 5)
        c = ruleset(v4_prefixes(3000, 12))
        await enf.apply(a)
        # a plan from c (which it never held) must not be trusted: applying it blindly would
        # delete what is not there and leave the rest of a in place
        applied = await enf.apply(b, Change(c.digest, diff(c, b)))
        assert enf.last_path == "full" and applied.in_sync and native(kind, netns) == intervals_of(b)
        # a first apply has no base at all
        fresh = closing(make(kind, netns))
        again = await fresh.apply(a, Change(b.digest, diff(b, a)))
        assert fresh.last_path == "full" and again.in_sync and native(kind, netns) == intervals_of(a)

    asyncio.run(scenario())


@pytest.mark.parametrize("kind", KINDS)
def test_sets_changed_behind_blockds_back_end_the_plans(netns: str, kind: str,
                                                        closing: Callable[[Any], Any]) -> None:
    async def scenario() -> None:
        enf = closing(make(kind, netns))
        a, b = base_and_next(3000, 5)
        await enf.apply(a)
        # someone deletes one of blockd's elements; the (drift check's) full read-back sees it
        steal(kind, netns, intervals_of(a)[4][100])
        assert (await enf.readback()).digest != a.digest
        applied = await enf.apply(b, Change(a.digest, diff(a, b)))
        assert enf.last_path == "full" and applied.in_sync  # and the stolen element is back
        assert native(kind, netns) == intervals_of(b)

    asyncio.run(scenario())


@pytest.mark.parametrize("kind", KINDS)
def test_after_a_failed_commit_the_next_change_is_applied_in_full(netns: str, kind: str,
                                                                  closing: Callable[[Any], Any]) -> None:
    async def scenario() -> None:
        from blockd.errors import EnforcerError
        enf = closing(make(kind, netns))
        a, b = base_and_next(3000, 5)
        await enf.apply(a)
        # the sets vanish without blockd reading them back: the plan's deletes find nothing
        if kind == "nft":
            sh("nft", "delete", "table", "inet", "blockd", ns=netns)
        else:
            sh("ipset", "flush", "blockd4", ns=netns)
        with pytest.raises(EnforcerError):
            await enf.apply(b, Change(a.digest, diff(a, b)))
        applied = await enf.apply(b, Change(a.digest, diff(a, b)))
        assert enf.last_path == "full" and applied.in_sync and native(kind, netns) == intervals_of(b)

    asyncio.run(scenario())


def test_an_unchanged_nft_generation_spares_the_full_dump_and_any_change_ends_that(
        netns: str, closing: Callable[[Any], Any]) -> None:
    """Issue 13 (idle CPU): a drift read-back at the ruleset generation blockd last left exact
    needs no dump of 1M elements; a change behind blockd's back, in any table, moves the
    generation, and the next read-back dumps and sees it."""
    async def scenario() -> None:
        enf = closing(NftEnforcer(netns=netns))
        a, b = base_and_next(2_000, 3)
        assert (await enf.apply(a)).in_sync
        first = await enf.readback()
        assert first.digest == a.share_digest(names=False)
        spared = enf.readbacks_spared
        again = await enf.readback()
        assert enf.readbacks_spared == spared + 1 and again.digest == first.digest
        assert enf.last_readback[0] == "touched"
        # blockd's own commit keeps the chain: the read-back after it is spared too
        assert (await enf.apply(b, Change(a.digest, diff(a, b)))).in_sync
        assert (await enf.readback()).digest == b.share_digest(names=False)
        assert enf.readbacks_spared == spared + 2
        # someone else's transaction in another table moves the generation: a real dump, equal
        sh("ip", "netns", "exec", netns, "nft", "add", "table", "inet", "someone_else")
        assert (await enf.readback()).digest == b.share_digest(names=False)
        assert enf.readbacks_spared == spared + 2 and enf.last_readback[0] == "full"
        # an element added behind blockd's back in its own set is found by the dump that follows
        sh("ip", "netns", "exec", netns, "nft", "add", "element", "inet", "blockd", "v4_c6", "{ 198.51.100.7 }")
        drifted = await enf.readback()
        assert drifted.digest != b.share_digest(names=False) and enf.last_readback[0] == "full"
        assert enf.readbacks_spared == spared + 2

    asyncio.run(scenario())


@pytest.mark.parametrize("kind", KINDS)
def test_a_touched_read_back_goes_in_chunks_each_answer_to_its_request(
        netns: str, kind: str, closing: Callable[[Any], Any], monkeypatch: pytest.MonkeyPatch) -> None:
    """Point reads (nft GETSETELEM, ipset TEST) have no transaction to keep together: sent all
    at once, a read-back of a million points overflowed the receive buffer (ENOBUFS, a failed
    apply). They go QUERY_CHUNK to a datagram, each answer still matched to its request (a
    misplaced one would fail the read-back and fall back to a full dump)."""
    from blockd.enforcers import netlink
    monkeypatch.setattr(netlink, "QUERY_CHUNK", 50)

    async def scenario() -> None:
        enf = closing(make(kind, netns))
        a, b = base_and_next(20_000, 150)
        assert (await enf.apply(a)).in_sync
        sent: list[int] = []
        real = enf._sock._sock
        monkeypatch.setattr(enf._sock, "_sock", _Counting(real, sent))
        applied = await enf.apply(b, Change(a.digest, diff(a, b)))
        assert enf.last_path == "plan" and applied.in_sync and applied.readback_scope == "touched"
        assert len(sent) > 10  # the commit, then the reads 50 at a time
        assert native(kind, netns) == intervals_of(b)

    asyncio.run(scenario())


class _Counting:
    """A socket that counts its sendall calls."""

    def __init__(self, sock: Any, sent: list[int]) -> None:
        self._real, self._sent = sock, sent

    def sendall(self, data: bytes) -> None:
        self._sent.append(len(data))
        self._real.sendall(data)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._real, name)


def test_nft_reads_the_whole_table_back_after_a_change_of_most_of_it(
        netns: str, closing: Callable[[Any], Any]) -> None:
    """A change touching more than a tenth of the table is read back by one dump: asked piece by
    piece, a registry import of 1M decisions took 51 s to read back (the dump: 5 s)."""
    async def scenario() -> None:
        enf = closing(make("nft", netns))
        prefixes = v4_prefixes(6010, 13)
        a, b = ruleset(prefixes[:2000]), ruleset(prefixes[:6000])
        assert (await enf.apply(a)).in_sync
        applied = await enf.apply(b, Change(a.digest, diff(a, b)))
        assert enf.last_path == "plan" and applied.in_sync and applied.readback_scope == "full"
        assert native("nft", netns) == intervals_of(b)
        c = ruleset(prefixes)  # ten more: read back one by one
        small = await enf.apply(c, Change(b.digest, diff(b, c)))
        assert small.in_sync and small.readback_scope == "touched"

    asyncio.run(scenario())


@pytest.mark.parametrize("kind", KINDS)
def test_what_a_read_back_proved_is_kept_as_its_rules_not_a_set_of_keys(
        netns: str, kind: str, closing: Callable[[Any], Any]) -> None:
    """Memory at registry scale: once a read-back proves the kernel holds the share applied, the
    enforcer keeps that share's rules (nl.ProvenKeys), not a set of a million keys; a read-back
    that finds something else keeps the keys it read, and the next apply diffs against those."""
    from blockd.enforcers import netlink as nl

    async def scenario() -> None:
        enf = closing(make(kind, netns))
        a, b = base_and_next(3000, 5)
        assert (await enf.apply(a)).in_sync
        assert all(isinstance(h, nl.ProvenKeys) and h.share.digest == nl.addresses(a).digest
                   for h in enf._held.values())
        assert (await enf.apply(b, Change(a.digest, diff(a, b)))).in_sync and enf.last_path == "plan"
        assert all(isinstance(h, nl.ProvenKeys) for h in enf._held.values())
        assert (await enf.readback_full()).digest == b.digest
        assert all(isinstance(h, nl.ProvenKeys) for h in enf._held.values())  # proved again
        steal(kind, netns, intervals_of(b)[4][7])
        assert (await enf.readback_full()).digest != b.digest
        assert isinstance(enf._held[4], set)  # what the kernel holds now: not a share of blockd's
        repaired = await enf.apply(b, Change(b.digest, diff(b, b)))
        assert repaired.in_sync and enf.last_path == "full" and native(kind, netns) == intervals_of(b)
        assert all(isinstance(h, nl.ProvenKeys) for h in enf._held.values())

    asyncio.run(scenario())
