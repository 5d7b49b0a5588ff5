"""The RPZ delta path: zones extended from a Change equal a full render, in every layout, over
random deltas (re-tagged rules moving zones, exact and subtree rules of one name, IP triggers);
serials and journals; IXFR from every kept serial gives the current version; the touched
read-back; the fall-backs to the full path.

The enforcer and the primary run in-process; transfers are asked of `RpzServer.answer` (the
code that answers the TCP socket) and parsed with dnspython."""

from __future__ import annotations

import asyncio
import random
from dataclasses import replace
from datetime import datetime, timezone

import dns.message
import dns.name
import dns.rdatatype
import dns.rrset
import pytest

from blockd.dns import rpz
from blockd.dns.rpzserver import RpzServer
from blockd.enforcers.rpz import RpzEnforcer
from blockd.model import Change, DomainRule, NetRule, OrderInfo, RuleSet, diff, rule_delta

T = datetime(2026, 1, 1, tzinfo=timezone.utc)
AUTHORITIES = ("Court A", "Court B", "Ministry C")


def info(oid: str, authority: str) -> OrderInfo:
    return OrderInfo(oid, "issuer", 1, authority, f"ref-{oid}", None, "block", None, None, T)


def build(rules: dict[tuple[str, bool], frozenset[str]], nets: dict[int, frozenset[str]],
          orders: dict[str, OrderInfo]) -> RuleSet:
    """Names -> DomainRules; nets: /24 index -> a NetRule of that /24 (neighbours are adjacent)."""
    base = 0x0A000000
    return RuleSet.build([DomainRule(n, sub, o) for (n, sub), o in rules.items()],
                         [NetRule(base + i * 256, base + i * 256 + 255, o) for i, o in nets.items()], (),
                         orders)


class World:
    """A random policy world that changes a little each step."""

    def __init__(self, seed: int) -> None:
        self.rnd = random.Random(seed)
        self.orders = {f"o{i}": info(f"o{i}", AUTHORITIES[i % 3]) for i in range(6)}
        self.rules: dict[tuple[str, bool], frozenset[str]] = {}
        self.nets: dict[int, frozenset[str]] = {}
        for _ in range(60):
            self.add_rule()
        for i in range(20):
            self.nets[self.rnd.randrange(40)] = self.some_orders()

    def some_orders(self) -> frozenset[str]:
        return frozenset(self.rnd.sample(sorted(self.orders), self.rnd.choice((1, 1, 1, 2))))

    def add_rule(self) -> None:
        name = f"n{self.rnd.randrange(80)}.example"
        self.rules[(name, self.rnd.random() < 0.4)] = self.some_orders()

    def step(self) -> None:
        r = self.rnd
        for _ in range(r.randrange(1, 6)):
            self.add_rule()
        for key in r.sample(sorted(self.rules), min(len(self.rules), r.randrange(0, 5))):
            del self.rules[key]
        for key in r.sample(sorted(self.rules), min(len(self.rules), r.randrange(0, 3))):
            self.rules[key] = self.some_orders()  # orders change: the rule may move zones
        for _ in range(r.randrange(0, 3)):
            i = r.randrange(40)
            if i in self.nets:
                del self.nets[i]
            else:
                self.nets[i] = self.some_orders()
        if r.random() < 0.3:  # an order re-tagged to another authority: all its rules move
            oid = r.choice(sorted(self.orders))
            self.orders[oid] = replace(self.orders[oid], authority=r.choice(AUTHORITIES))

    def ruleset(self) -> RuleSet:
        return build(self.rules, self.nets, self.orders)


def run(coro):  # type: ignore[no-untyped-def]
    return asyncio.run(coro)


def ixfr_query(zone: str, serial: int) -> bytes:
    q = dns.message.make_query(zone, "IXFR")
    q.authority.append(dns.rrset.from_text(zone, 60, "IN", "SOA", f"localhost. h. {serial} 3600 60 1209600 60"))
    return q.to_wire()


def transfer(srv: RpzServer, zone: str, since: int) -> tuple[str, list[tuple[str, str]]]:
    """('ixfr' | 'axfr', the RRs answered in order as (relative owner, type))."""
    before = srv.stats["ixfr"]
    rrs: list[tuple[str, str]] = []
    origin = dns.name.from_text(zone)
    for msg in srv.answer(ixfr_query(zone, since), "127.0.0.1", True):
        m = dns.message.from_wire(msg, one_rr_per_rrset=True)
        for rr in m.answer:
            rrs.append((rr.name.relativize(origin).to_text(),
                        f"SOA {rr[0].serial}" if rr.rdtype == dns.rdatatype.SOA else rr.rdtype.name))
    return ("ixfr" if srv.stats["ixfr"] > before else "axfr"), rrs


def apply_ixfr(held: frozenset[str], rrs: list[tuple[str, str]]) -> tuple[int, frozenset[str]]:
    """RFC 1995 4: SOA(new), then per delta SOA(old), deletions, SOA(new), additions; SOA(new)."""
    cur = set(held)
    assert rrs[0][1].startswith("SOA") and rrs[-1] == rrs[0]
    mode = None
    for owner, kind in rrs[1:-1]:
        if kind.startswith("SOA"):
            mode = "del" if mode in (None, "add") else "add"
        elif mode == "del":
            assert owner in cur, f"IXFR deletes {owner}, which the version does not hold"
            cur.remove(owner)
        else:
            assert owner not in cur, f"IXFR adds {owner}, which the version holds"
            cur.add(owner)
    return int(rrs[0][1].split()[1]), frozenset(cur)


def check_ixfr(srv: RpzServer, history: dict[str, dict[int, frozenset[str]]], every: bool) -> None:
    """IXFR from the serial before the current one (`every`: from every serial the journal keeps),
    applied to that version as it was served, gives the version served now."""
    for z in srv.zones.values():
        v = z.version
        assert v is not None
        origin = z.settings.origin
        for d in (z.journal.deltas if every else list(z.journal.deltas)[-1:]):
            if z.journal.path(d.old, v.serial) is None:
                continue
            kind, rrs = transfer(srv, origin, d.old)
            assert kind == "ixfr"
            serial, owners = apply_ixfr(history[origin][d.old], rrs)
            assert (serial, owners) == (v.serial, v.owners)


LAYOUTS = [("one", False), ("one", True), ("authority", False), ("authority", True), ("order", True)]


@pytest.mark.parametrize("layout, ip", LAYOUTS)
@pytest.mark.parametrize("seed", [1, 2])
def test_delta_equals_full_render(layout: str, ip: bool, seed: int) -> None:
    s = rpz.RpzSettings(layout=layout, ip_triggers=ip, journal_versions=8)
    world = World(seed)

    async def main() -> None:
        srv = RpzServer(s)
        enf = RpzEnforcer(srv)
        cur = world.ruleset()
        a = await enf.apply(cur)
        assert a.in_sync and enf.last_path == "full"
        history: dict[str, dict[int, frozenset[str]]] = {}

        def remember() -> None:
            for z in srv.zones.values():
                if z.version is not None:
                    history.setdefault(z.settings.origin, {})[z.version.serial] = z.version.owners

        remember()
        paths = []
        for _ in range(25):
            world.step()
            new = world.ruleset()
            removed, added = rule_delta(cur, new)
            a = await enf.apply(new, Change(cur.digest, diff(cur, new), removed, added))
            paths.append(enf.last_path)
            # what every zone serves equals the full partition of the new rule set
            want = {o: rpz.owners(part, ip) for o, (_, part) in rpz.partition(s, new.share(names=True, addresses=ip)).items()}
            for z in srv.zones.values():
                assert z.version is not None
                assert z.version.owners == want.get(z.settings.origin, frozenset()), z.settings.origin
                assert len(z.version) == len(z.version.owners)
            assert set(want) <= {z.settings.origin for z in srv.zones.values()}
            full = await enf.readback()
            assert a.in_sync and a.digest == full.digest == enf.enforced(new).digest
            assert a.counts == full.counts()
            if enf.last_path == "delta":
                assert a.readback_scope == "touched" or a.added + a.removed == 0
            remember()
            check_ixfr(srv, history, every=False)
            cur = new
        check_ixfr(srv, history, every=True)
        assert paths.count("delta") >= 20, paths  # the full path is the exception (renames, overflow)
        await enf.aclose()

    run(main())


def test_new_serial_only_when_owners_change_and_journal_holds_the_delta() -> None:
    s = rpz.RpzSettings()
    o = frozenset({"o1"})
    orders = {"o1": info("o1", "Court A"), "o2": info("o2", "Court B")}
    r1 = RuleSet.build([DomainRule("a.example", False, o), DomainRule("b.example", True, o)], orders=orders)

    async def main() -> None:
        srv = RpzServer(s)
        enf = RpzEnforcer(srv)
        await enf.apply(r1)
        assert srv.serial == 1
        # provenance only (another order for b): same owners, same serial, the delta path
        r2 = RuleSet.build([DomainRule("a.example", False, o), DomainRule("b.example", True, frozenset({"o2"}))],
                           orders=orders)
        rem, add = rule_delta(r1, r2)
        await enf.apply(r2, Change(r1.digest, diff(r1, r2), rem, add))
        assert enf.last_path == "delta" and srv.serial == 1
        # b's subtree becomes exact: only the wildcard goes
        r3 = RuleSet.build([DomainRule("a.example", False, o), DomainRule("b.example", False, o)], orders=orders)
        rem, add = rule_delta(r2, r3)
        a = await enf.apply(r3, Change(r2.digest, diff(r2, r3), rem, add))
        assert enf.last_path == "delta" and srv.serial == 2 and (a.added, a.removed) == (0, 1)
        assert [(d.old, d.new, d.deleted, d.added) for d in srv.journal.deltas] == \
            [(1, 2, ("*.b.example",), ())]
        assert srv.version is not None and srv.version.owners == {"a.example", "b.example"}

    run(main())


def test_exact_and_subtree_of_one_name_read_back_in_sync() -> None:
    """A zone serves `x` and `*.x` for a subtree rule; an exact rule of x beside it adds nothing
    the zone can show, so the share leaves it out (the read-back cannot see it)."""
    o = frozenset({"o1"})
    both = RuleSet.build([DomainRule("x.example", False, o), DomainRule("x.example", True, o)])
    only = RuleSet.build([DomainRule("x.example", True, o)])

    async def main() -> None:
        enf = RpzEnforcer(RpzServer(rpz.RpzSettings()))
        a = await enf.apply(both)
        assert a.in_sync and enf.enforced(both).digest == only.digest
        assert enf.enforced(both).domains == only.domains
        rem, add = rule_delta(both, only)
        a = await enf.apply(only, Change(both.digest, diff(both, only), rem, add))
        assert enf.last_path == "delta" and a.in_sync and a.added + a.removed == 0

    run(main())


def test_change_from_another_base_takes_the_full_path() -> None:
    o = frozenset({"o1"})
    r1 = RuleSet.build([DomainRule("a.example", False, o)])
    r2 = RuleSet.build([DomainRule("b.example", False, o)])

    async def main() -> None:
        srv = RpzServer(rpz.RpzSettings())
        enf = RpzEnforcer(srv)
        await enf.apply(r1)
        rem, add = rule_delta(r2, r1)  # a change that starts from r2, which is not held
        a = await enf.apply(r1, Change(r2.digest, diff(r2, r1), rem, add))
        assert enf.last_path == "full" and a.in_sync
        # a change whose base is right but whose delta lies (removes a rule not held)
        bogus = Change(r1.digest, diff(r2, r1), *rule_delta(r2, r1))
        a = await enf.apply(r2, bogus)
        assert enf.last_path == "full" and a.in_sync
        assert srv.version is not None and srv.version.owners == {"b.example"}

    run(main())


def test_new_authority_that_renames_a_zone_takes_the_full_path() -> None:
    """`Court A` alone is court-a.rpz.blockd.; `court a` beside it gives both a hashed name."""
    s = rpz.RpzSettings(layout="authority")
    orders = {"a": info("a", "Court A"), "b": info("b", "court a")}
    r1 = RuleSet.build([DomainRule("x.example", False, frozenset({"a"}))], orders=orders)
    r2 = RuleSet.build([DomainRule("x.example", False, frozenset({"a"})),
                        DomainRule("y.example", False, frozenset({"b"}))], orders=orders)

    async def main() -> None:
        srv = RpzServer(s)
        enf = RpzEnforcer(srv)
        await enf.apply(r1)
        assert "court-a.rpz.blockd." in srv.zone_states()
        a = await enf.apply(r2, Change(r1.digest, diff(r1, r2), *rule_delta(r1, r2)))
        assert enf.last_path == "full" and a.in_sync
        want = rpz.partition(s, r2)
        for origin, (_, part) in want.items():
            z = srv.zone(origin)
            assert z is not None and z.version is not None and z.version.owners == rpz.owners(part, False)

    run(main())


def test_state_and_zone_file_written_by_the_delta_path(tmp_path) -> None:  # type: ignore[no-untyped-def]
    s = rpz.RpzSettings(state_file=str(tmp_path / "state.json"), zone_file=str(tmp_path / "zone"))
    o = frozenset({"o1"})
    r1 = RuleSet.build([DomainRule("a.example", False, o)], orders={"o1": info("o1", "Court A")})
    r2 = RuleSet.build([DomainRule("a.example", False, o), DomainRule("b.example", True, o)],
                       orders={"o1": info("o1", "Court A")})

    async def main() -> None:
        srv = RpzServer(s)
        enf = RpzEnforcer(srv)
        await enf.apply(r1)
        await enf.apply(r2, Change(r1.digest, diff(r1, r2), *rule_delta(r1, r2)))
        assert enf.last_path == "delta"
        assert rpz.load_state(s.state_file)["serial"] == 2
        text = (tmp_path / "zone").read_text()
        assert "serial 2" in text and "*.b.example CNAME ." in text and "; order o1: Court A ref-o1" in text
        # a zone file that cannot be written: the zone is served by transfer, the apply fails, the next retries
        (tmp_path / "zone").unlink()
        (tmp_path / "zone").mkdir()
        r3 = RuleSet.build([DomainRule("c.example", False, o)], orders={"o1": info("o1", "Court A")})
        from blockd.errors import EnforcerError

        with pytest.raises(EnforcerError, match="zone file"):
            await enf.apply(r3, Change(r2.digest, diff(r2, r3), *rule_delta(r2, r3)))
        assert srv.serial == 3 and srv.version is not None and srv.version.owners == {"c.example"}
        (tmp_path / "zone").rmdir()
        a = await enf.apply(r3, Change(r3.digest, diff(r3, r3), *rule_delta(r3, r3)))
        assert enf.last_path == "delta" and a.in_sync and "serial 3" in (tmp_path / "zone").read_text()

    run(main())


def test_version_overlay_shares_the_base_and_compacts() -> None:
    s = rpz.RpzSettings()
    base = frozenset(f"n{i}.example" for i in range(1000))
    v1 = rpz.ZoneVersion(s, 1, base, RuleSet.empty())
    v2 = rpz.ZoneVersion.next(v1, s, 2, {"n1.example"}, {"new.example"}, RuleSet.empty())
    v3 = rpz.ZoneVersion.next(v2, s, 3, {"new.example"}, {"n1.example"}, RuleSet.empty())
    assert v2._rep[0] is base and v2.overlay == 2 and len(v2) == 1000
    assert v2.has("new.example") and not v2.has("n1.example") and v3.has("n1.example")
    assert v3.overlay == 0 and v3.owners == base and v1.owners is base
    assert v2.owners == (base - {"n1.example"}) | {"new.example"} and v2.overlay == 0


def test_ixfr_over_udp_when_it_fits_else_the_soa_only() -> None:
    """RFC 1995 2: a small change goes over UDP whole (and counts as delivered); one that does
    not fit the client's UDP size gets the SOA only; a client outside the ACL never gets data."""
    o = frozenset({"o1"})
    r1 = RuleSet.build([DomainRule("a.example", False, o)])
    r2 = RuleSet.build([DomainRule("a.example", False, o), DomainRule("b.example", True, o)])
    big = RuleSet.build([DomainRule(f"n{i:04d}.example", False, o) for i in range(200)])

    def udp(srv: RpzServer, since: int, host: str = "127.0.0.1", payload: int | None = None) -> list[str]:
        q = dns.message.make_query("rpz.blockd.", "IXFR", use_edns=0 if payload else None, payload=payload or 0)
        q.authority.append(dns.rrset.from_text("rpz.blockd.", 60, "IN", "SOA", f"l. h. {since} 3600 60 1209600 60"))
        out, delivered, z = srv._answer_zone(q.to_wire(), host, False)
        assert len(out) == 1
        if delivered is not None and z is not None:
            srv.delivered(z, host, delivered)
        m = dns.message.from_wire(out[0], one_rr_per_rrset=True)
        return [rr.name.relativize(dns.name.from_text("rpz.blockd.")).to_text() for rr in m.answer]

    async def main() -> None:
        srv = RpzServer(rpz.RpzSettings())
        enf = RpzEnforcer(srv)
        await enf.apply(r1)
        await enf.apply(r2, Change(r1.digest, diff(r1, r2), *rule_delta(r1, r2)))
        assert udp(srv, 1) == ["@", "@", "@", "*.b.example", "b.example", "@"]
        assert srv.secondaries()["127.0.0.1"].serial == 2 and srv.stats["ixfr"] == 1
        assert udp(srv, 2) == ["@"]  # up to date
        assert udp(srv, 1, host="192.0.2.1") == ["@"]  # outside the transfer ACL: the SOA only
        await enf.apply(big, Change(r2.digest, diff(r2, big), *rule_delta(r2, big)))
        assert udp(srv, 2) == ["@"]  # 200 names do not fit 512 bytes: retry over TCP
        # they fit an EDNS 65000-byte answer: SOA, SOA(2), 3 deletions, SOA(3), 200 additions, SOA
        assert len(udp(srv, 2, payload=65000)) == 1 + 1 + 3 + 1 + 200 + 1

    run(main())
