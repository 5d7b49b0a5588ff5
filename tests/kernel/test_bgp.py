"""BGP enforcer against a real BIRD 2 router in fresh network namespaces.

    bkg-<pid>-<n>a  blockd's BgpEnforcer -> ExaBGP 10.79.0.1 --veth-- 10.79.0.2 BIRD  bkg-<pid>-<n>r

BIRD imports only routes tagged BLACKHOLE (65535,666) and resolves their next-hops (192.0.2.1,
100::1) to blackhole statics, as an RTBH edge router does. Every assertion about what is
announced is checked twice: ExaBGP's adj-rib-out (`readback`) and BIRD's table (`birdc show
route all`), parsed here independently of blockd.
"""

from __future__ import annotations

import asyncio
import itertools
import os
import re
import shutil
from collections.abc import Iterator

import pytest
from common import ruleset, v6_prefixes
from scaleout import BirdLab, routable_v4, wait_until

from blockd.enforcers.base import Enforcer
from blockd.enforcers.bgp import BgpEnforcer, BgpSettings, api_lines, delivered, parse_rib_out
from blockd.errors import ConfigError, EnforcerError
from blockd.model import NetRule, RuleSet
from blockd.ranges import format_cidr, parse_cidr

pytestmark = pytest.mark.skipif(shutil.which("bird") is None, reason="bird2 is not installed (scripts/deps.sh)")
_serial = itertools.count()


@pytest.fixture
def lab() -> Iterator[BirdLab]:
    with BirdLab(f"bkg-{os.getpid()}-{next(_serial)}") as lab:
        yield lab


def rs(*cidrs: str) -> RuleSet:
    v4, v6 = [], []
    for text in cidrs:
        c = parse_cidr(text)
        (v4 if c.version == 4 else v6).append(NetRule(c.first, c.last, frozenset({"order-1"})))
    return RuleSet.build(v4=v4, v6=v6)


def bird_routes(lab: BirdLab, table: str = "all") -> dict[str, set[str]]:
    """`birdc show route all` -> {prefix: communities} for routes learnt from blockd's session."""
    out: dict[str, set[str]] = {}
    current = None
    for line in lab.birdc("show", "route", "all", "table", table, "protocol", "blockd").splitlines():
        m = re.match(r"^(\S+)\s+(\w+)\s+\[blockd ", line)
        if m:
            current = m.group(1)
            out[current] = {"dest=" + m.group(2)}
        elif current and line.strip().startswith("BGP.community:"):
            out[current] |= set(re.findall(r"\(\d+,\d+\)", line))
    return out


def bird_flows(lab: BirdLab) -> set[str]:
    text = lab.birdc("show", "route", "table", "flow4tab") + lab.birdc("show", "route", "table", "flow6tab")
    return set(re.findall(r"flow[46] \{ dst (\S+); \}", text))


def expect_in_bird(lab: BirdLab, want: set[str], deadline_s: float = 30) -> dict[str, set[str]]:
    seen: dict[str, set[str]] = {}

    def ready() -> bool:
        nonlocal seen
        seen = bird_routes(lab)
        return set(seen) == want

    try:
        wait_until(ready, deadline_s, "BIRD's table")
    except TimeoutError:
        raise AssertionError(f"BIRD holds {sorted(seen)[:10]}..., want {sorted(want)[:10]}...") from None
    return seen


async def started(lab: BirdLab, **kw: object) -> BgpEnforcer:
    enf = BgpEnforcer(lab.settings(**kw), netns=lab.a)
    await enf.wait_established(30)
    return enf


# --- against BIRD -------------------------------------------------------------------------------

BLOCK = ("198.51.100.0/24", "203.0.113.7/32", "2001:db8:1::/48", "2001:db8:ff::1/128")


@pytest.mark.kernel
def test_announce_then_unblock_withdraws(lab: BirdLab) -> None:
    async def run() -> None:
        enf = await started(lab)
        try:
            assert isinstance(enf, Enforcer)
            # 10.80.0.0-10.80.0.2 is not a prefix: announced as /31 + /32, read back as one interval.
            odd = RuleSet.build(v4=[*rs(*BLOCK).v4, NetRule(0x0A500000, 0x0A500002, frozenset({"o"}))],
                                v6=rs(*BLOCK).v6)
            applied = await enf.apply(odd)
            assert applied.in_sync and applied.added == 6 and applied.removed == 0, applied
            assert (await enf.readback()).digest == odd.digest
            seen = await asyncio.to_thread(expect_in_bird, lab, {*BLOCK, "10.80.0.0/31", "10.80.0.2/32"})
            for prefix, attrs in seen.items():
                assert {"dest=blackhole", "(65535,666)", "(65535,65281)"} <= attrs, (prefix, attrs)

            # Unblock two orders' prefixes (and the odd interval): withdrawn from BIRD.
            keep = rs("198.51.100.0/24", "2001:db8:1::/48")
            applied = await enf.apply(keep)
            assert applied.in_sync and applied.removed == 4 and applied.added == 0, applied
            assert (await enf.readback()).digest == keep.digest
            await asyncio.to_thread(expect_in_bird, lab, {"198.51.100.0/24", "2001:db8:1::/48"})

            # Idempotent: nothing sent the second time.
            again = await enf.apply(keep)
            assert again.counts["api_lines"] == 0 and again.in_sync

            # A blocked range that grows is one withdraw plus one announce, never a gap in BIRD.
            grown = rs("198.51.100.0/23", "2001:db8:1::/48")
            applied = await enf.apply(grown)
            assert (applied.added, applied.removed) == (1, 1) and applied.in_sync
            await asyncio.to_thread(expect_in_bird, lab, {"198.51.100.0/23", "2001:db8:1::/48"})

            await enf.apply(RuleSet.empty())
            await asyncio.to_thread(expect_in_bird, lab, set())
            assert (await enf.readback()).digest == RuleSet.empty().digest
        finally:
            await enf.aclose()

    asyncio.run(run())


@pytest.mark.kernel
@pytest.mark.slow
def test_bird_restart_gets_everything_back(lab: BirdLab) -> None:
    """20k prefixes in 10 batched lines; BIRD is killed and restarted; ExaBGP re-sends all."""
    v4, v6 = routable_v4(18_000), v6_prefixes(2_000, seed=3)
    want = ruleset(v4, v6)
    names = {format_cidr(4, n, p) for n, p in v4} | {format_cidr(6, n, p) for n, p in v6}

    async def run() -> None:
        enf = await started(lab)
        try:
            applied = await enf.apply(want)
            assert applied.in_sync, applied
            assert applied.counts["api_lines"] == 10  # 2000 prefixes per line, per family
            await asyncio.to_thread(wait_until, lambda: lab.count() == len(names), 120, "20k routes in BIRD", 0.2)
            assert set(bird_routes(lab)) == names

            lab.stop_bird()
            await asyncio.to_thread(lab.start_bird)
            await asyncio.to_thread(wait_until, lambda: lab.established(), 90, "session re-established", 0.2)
            await asyncio.to_thread(wait_until, lambda: lab.count() == len(names), 120, "20k routes back", 0.2)
            assert set(bird_routes(lab)) == names
            # blockd did nothing: ExaBGP re-sent from its adj-rib-out, which still matches.
            await enf.wait_established(30)
            assert (await enf.readback()).digest == want.digest
            assert enf.peer_state[lab.settings().peers[0]] == "up"
        finally:
            await enf.aclose()

    asyncio.run(run())


@pytest.mark.kernel
def test_flowspec_discard_rules(lab: BirdLab) -> None:
    async def run() -> None:
        enf = await started(lab, flowspec=True)
        try:
            want = rs("198.51.100.0/24", "2001:db8:1::/48")
            applied = await enf.apply(want)
            assert applied.in_sync, applied
            await asyncio.to_thread(wait_until, lambda: bird_flows(lab) == {"198.51.100.0/24", "2001:db8:1::/48"},
                                    30, "FlowSpec rules in BIRD")
            text = lab.birdc("show", "route", "all", "table", "flow4tab")
            assert "(generic, 0x80060000, 0x0)" in text  # traffic-rate 0: discard (RFC 8955 7.3)
            await enf.apply(rs("2001:db8:1::/48"))
            await asyncio.to_thread(wait_until, lambda: bird_flows(lab) == {"2001:db8:1::/48"}, 30, "flow withdrawn")
            expect_in_bird(lab, {"2001:db8:1::/48"})
        finally:
            await enf.aclose()

    asyncio.run(run())


@pytest.mark.kernel
def test_routes_queue_while_session_down(lab: BirdLab) -> None:
    """apply() before the router is reachable: held in ExaBGP, sent when the session comes up.
    Until then no router is told anything, so the read-back is not in sync (issue 11)."""
    lab.stop_bird()

    async def run() -> None:
        enf = BgpEnforcer(lab.settings(), netns=lab.a)
        try:
            applied = await enf.apply(rs(*BLOCK))
            assert not applied.in_sync and applied.counts["peers_up"] == 0
            assert applied.digest == RuleSet.empty().digest and applied.desired_digest == rs(*BLOCK).digest
            await asyncio.to_thread(lab.start_bird)
            await asyncio.to_thread(expect_in_bird, lab, set(BLOCK), 60)
            await enf.wait_established(30)
            assert (await enf.readback()).digest == rs(*BLOCK).digest
        finally:
            await enf.aclose()

    asyncio.run(run())


@pytest.mark.kernel
def test_aclose_ends_session_and_routes_go(lab: BirdLab) -> None:
    async def run() -> None:
        enf = await started(lab)
        await enf.apply(rs(*BLOCK))
        await asyncio.to_thread(expect_in_bird, lab, set(BLOCK))
        await enf.aclose()
        await asyncio.to_thread(expect_in_bird, lab, set())

    asyncio.run(run())


@pytest.mark.kernel
def test_exabgp_crash_is_reported_then_repaired(lab: BirdLab) -> None:
    """ExaBGP dies: the next apply raises EnforcerError; the one after restarts it and
    re-announces everything (a new ExaBGP starts empty, so nothing is assumed held)."""
    async def run() -> None:
        enf = await started(lab)
        try:
            await enf.apply(rs(*BLOCK))
            await asyncio.to_thread(expect_in_bird, lab, set(BLOCK))
            proc = enf._proc
            assert proc is not None
            proc.kill()
            await proc.wait()
            await asyncio.to_thread(expect_in_bird, lab, set())  # session gone, routes gone
            with pytest.raises(EnforcerError, match="exabgp exited"):
                await enf.apply(rs(*BLOCK))
            applied = await enf.apply(rs(*BLOCK))
            assert applied.added == len(BLOCK), applied
            await asyncio.to_thread(expect_in_bird, lab, set(BLOCK), 60)
            await enf.wait_established(30)
            assert (await enf.readback()).digest == rs(*BLOCK).digest
        finally:
            await enf.aclose()

    asyncio.run(run())


@pytest.mark.kernel
def test_missing_exabgp_is_an_enforcer_error(lab: BirdLab) -> None:
    async def run() -> None:
        enf = BgpEnforcer(lab.settings(exabgp="/nonexistent/exabgp"), netns=lab.a)
        with pytest.raises(EnforcerError, match="exabgp"):
            await enf.apply(rs(*BLOCK))
        await enf.aclose()

    asyncio.run(run())


# --- pure parts (no root) ---------------------------------------------------------------------

def test_batched_lines() -> None:
    s = BgpSettings(local_address="10.0.0.1", peers=("10.0.0.2",), local_as=65001, peer_as=65002,
                    router_id="10.0.0.1", batch_size=2)
    lines = api_lines(s, "announce", 4, [(0x0A000000, 32), (0x0A000002, 32), (0x0A000004, 31)])
    assert lines == [
        "announce attributes next-hop 192.0.2.1 origin igp community [ 65535:666 65535:65281 ] "
        "local-preference 200 nlri 10.0.0.0/32 10.0.0.2/32",
        "announce attributes next-hop 192.0.2.1 origin igp community [ 65535:666 65535:65281 ] "
        "local-preference 200 nlri 10.0.0.4/31",
    ]
    assert api_lines(s, "withdraw", 6, [(1 << 120, 8)]) == ["withdraw attributes next-hop 100::1 nlri 100::/8"]


def test_rib_out_parse_needs_every_community() -> None:
    head = "neighbor 10.0.0.2 local-ip 10.0.0.1 local-as 65001 peer-as 65002 router-id 10.0.0.1 family-allowed in-open"
    rib = parse_rib_out([
        f"{head} ipv4 unicast 198.51.100.0/24 next-hop 192.0.2.1 origin igp community [ blackhole no-export ]",
        f"{head} ipv4 unicast 198.51.101.0/24 next-hop 192.0.2.1 origin igp community [ no-export ]",
        f"{head} ipv6 flow flow destination-ipv6 2001:db8:1::/48/0 extended-community rate-limit:0",
    ], ("65535:666", "65535:65281"))
    assert rib.unicast["10.0.0.2"][4] == {(parse_cidr("198.51.100.0/24").network, 24)}
    assert rib.flow["10.0.0.2"][6] == {(parse_cidr("2001:db8:1::/48").network, 48)}


def test_readback_counts_only_peers_with_a_session() -> None:
    """A route in ExaBGP's RIB-out for a peer whose session is down reaches no router."""
    head = "neighbor {} local-ip 10.0.0.1 local-as 65001 peer-as 65002 router-id 10.0.0.1 family-allowed in-open"
    line = " ipv4 unicast 198.51.100.0/24 next-hop 192.0.2.1 origin igp community [ blackhole no-export ]"
    rib = parse_rib_out([head.format(p) + line for p in ("10.0.0.2", "10.0.0.3")], ("65535:666", "65535:65281"))
    want = rs("198.51.100.0/24").digest
    peers = ("10.0.0.2", "10.0.0.3")
    assert delivered(rib, peers, peers, flowspec=False).digest == want
    assert delivered(rib, peers, ["10.0.0.2"], flowspec=False).digest == RuleSet.empty().digest
    assert delivered(rib, peers, [], flowspec=False).digest == RuleSet.empty().digest
    assert delivered(rib, peers, peers, flowspec=True).digest == RuleSet.empty().digest  # no FlowSpec rule


@pytest.mark.parametrize(("field", "value", "message"), [
    ("peers", (), "bgp.peers: empty"),
    ("next_hop4", "100::1", "bgp.next_hop4: '100::1' is not an IPv4 address"),
    ("communities", ("65535:666", "blackhole"), r"bgp.communities\[1\]: 'blackhole' is not a community"),
    ("batch_size", 0, "bgp.batch_size: 0 is not in 1..20000"),
    ("local_as", 0, "bgp.local_as: 0 is not an ASN"),
])
def test_settings_errors(field: str, value: object, message: str) -> None:
    base: dict[str, object] = dict(local_address="10.0.0.1", peers=("10.0.0.2",), local_as=65001, peer_as=65002,
                                   router_id="10.0.0.1")
    base[field] = value
    with pytest.raises(ConfigError, match=message):
        BgpSettings(**base)  # type: ignore[arg-type]
