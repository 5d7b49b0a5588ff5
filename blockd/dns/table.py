"""RuleSet -> immutable lookup table of blocked names, and the bytes of a blocked answer.

Keys are lowercase wire-format names (`b'\\x07example\\x03com\\x00'`), so a query is looked up
by slicing its own lowercased qname at label boundaries: O(labels) dict probes, no decoding.

Precedence (documented in docs/dns.md):
1. An enforcing rule beats a log-only (shadow) rule, wherever both match.
2. Otherwise the most specific matching rule wins: an exact rule or a subtree rule at the
   query name itself (their orders are combined), then subtree rules from the longest suffix up.
3. Among the orders of the winning rule, the answer mode ranks MODE_RANK (nxdomain, nodata,
   sinkhole, refused, drop, log); ties go to the smallest order id. That order's id, authority
   and reference are named in the EDE text (`ede_text`); the others are counted "+N more".
"""

from __future__ import annotations

import struct
from collections.abc import Mapping
from dataclasses import dataclass

from blockd.dns import sde, wire
from blockd.model import DNS_ANSWERS, DomainRule, OrderInfo, RuleSet

MODE_RANK = {m: i for i, m in enumerate(("nxdomain", "nodata", "sinkhole", "refused", "drop", "log"))}
assert set(MODE_RANK) == set(DNS_ANSWERS)
EDE_CODES = (15, 16, 17)  # Blocked, Censored, Filtered


@dataclass(frozen=True, slots=True)
class AnswerSettings:
    """How blocked names are answered (the part of SinkholeSettings the table needs)."""

    default_answer: str = "nxdomain"  # for orders whose dns_answer is None
    override_answer: str | None = None  # e.g. "log" to run the whole table in shadow mode
    ede_code: int = 16
    sinkhole_v4: str | None = None
    sinkhole_v6: str | None = None
    answer_ttl: int = 60  # TTL of sinkhole A/AAAA
    negative_ttl: int = 300  # SOA TTL and MINIMUM: how long a resolver in front caches the block
    soa_mname: str = "blockd.invalid"
    soa_rname: str = "hostmaster.blockd.invalid"
    #: structured DNS errors (blockd/dns/sde.py), for clients that ask for them
    sde_organization: str = ""
    sde_contact: tuple[str, ...] = ()
    sde_sub_error: int | None = None
    sde_option_code: int | None = None  # the SDE option's code (unassigned by IANA): unset, no client signals
    sde_language: str = "en"

    def __post_init__(self) -> None:
        for field, value in (("default_answer", self.default_answer), ("override_answer", self.override_answer)):
            if value is not None and value not in DNS_ANSWERS:
                raise ValueError(f"{field}: {value!r} is not an answer mode; valid: {', '.join(DNS_ANSWERS)}")
        if self.ede_code not in EDE_CODES:
            raise ValueError(f"ede_code: {self.ede_code!r}; valid: 15 (Blocked), 16 (Censored), 17 (Filtered)")


class Verdict:
    """What to answer for names held by one combination of orders (shared by many names)."""

    __slots__ = ("mode", "enforce", "rcode", "order", "orders", "own_orders", "index", "text", "opt", "opt_sde",
                 "opt_sde_small", "opt_sde_bare")

    def __init__(self, mode: str, order: str | None, orders: frozenset[str], own: frozenset[str], text: str,
                 ede_code: int, index: int, sde_text: tuple[str, str | None] | None = None) -> None:
        self.mode = mode
        self.enforce = mode != "log"
        self.rcode = wire.REFUSED if mode == "refused" else wire.NXDOMAIN if mode == "nxdomain" else wire.NOERROR
        self.order = order
        self.orders = orders
        self.own_orders = own
        self.index = index
        self.text = text
        ede = wire.ede_option(ede_code, text)
        self.opt = (wire.opt_rr(ede), wire.opt_rr(ede, do=True))  # by the query's DO bit
        # structured errors (sde.py): the full JSON, and for a UDP answer it would push past the
        # client's payload size the compact JSON (no j, o), then the EDE without EXTRA-TEXT
        self.opt_sde = self.opt_sde_small = self.opt_sde_bare = self.opt
        if sde_text is not None:
            full, small, bare = (wire.ede_option(ede_code, t) for t in (sde_text[0], sde_text[1] or "", ""))
            self.opt_sde = (wire.opt_rr(full), wire.opt_rr(full, do=True))
            self.opt_sde_small = (wire.opt_rr(small), wire.opt_rr(small, do=True))
            self.opt_sde_bare = (wire.opt_rr(bare), wire.opt_rr(bare, do=True))


def ede_text(order: str | None, info: OrderInfo | None, others: int) -> str:
    """The EXTRA-TEXT of a blocked answer (the one place it is built): the order id first, then
    its authority, reference and URL, within `wire.EDE_TEXT_MAX` bytes (cut with a visible mark),
    so a long authority name can never push the order id out."""
    if order is None:
        return "Blocked by policy"
    text = f"Blocked by order {order}"
    if info is not None:
        text += f" of {info.authority} ({info.reference})"
        if info.url:
            text += f", see {info.url}"
    if others:
        text += f"; +{others} more order(s)"
    return wire.cap_text(text)


class Table:
    """Immutable after `build`; the server swaps one reference to change policy atomically."""

    __slots__ = ("exact", "subtree", "verdicts", "digest", "hits", "answers")

    def __init__(self, exact: dict[bytes, Verdict], subtree: dict[bytes, Verdict], verdicts: list[Verdict],
                 digest: str, answers: Answers) -> None:
        self.exact = exact
        self.subtree = subtree
        self.verdicts = verdicts
        self.digest = digest  # of the RuleSet it was built from
        self.hits = [0] * len(verdicts)  # per-verdict hit counters (the only mutable part)
        self.answers = answers

    @classmethod
    def empty(cls, settings: AnswerSettings | None = None) -> Table:
        return cls.build(RuleSet.empty(), settings or AnswerSettings())

    @classmethod
    def build(cls, rs: RuleSet, settings: AnswerSettings) -> Table:
        verdicts: list[Verdict] = []
        cache: dict[tuple[frozenset[str], frozenset[str]], Verdict] = {}
        orders = rs.orders

        def verdict(own: frozenset[str], combined: frozenset[str]) -> Verdict:
            v = cache.get((own, combined))
            if v is None:
                v = _choose(own, combined, orders, settings, len(verdicts))
                verdicts.append(v)
                cache[(own, combined)] = v
            return v

        exact: dict[bytes, Verdict] = {}
        subtree: dict[bytes, Verdict] = {}
        to_wire = wire.name_to_wire
        doms = rs.domains
        n = len(doms)
        i = 0
        while i < n:
            name, sub, ords = doms[i]
            # domains are sorted by (name, subtree): an exact rule and a subtree rule for the same
            # name are adjacent, exact first; duplicates (same name and kind) are merged.
            j = i + 1
            while j < n and doms[j][0] == name and doms[j][1] == sub:
                ords = ords | doms[j][2]
                j += 1
            key = to_wire(name)
            if sub:
                subtree[key] = verdict(ords, ords)
                i = j
                continue
            s_ords: frozenset[str] | None = None
            while j < n and doms[j][0] == name:
                s_ords = doms[j][2] if s_ords is None else s_ords | doms[j][2]
                j += 1
            if s_ords is None:
                exact[key] = verdict(ords, ords)
            else:
                exact[key] = verdict(ords, ords | s_ords)
                subtree[key] = verdict(s_ords, s_ords)
            i = j
        return cls(exact, subtree, verdicts, rs.digest, Answers(settings))

    def lookup(self, q: bytes, labels: list[int]) -> tuple[Verdict, int] | None:
        """`q` is the lowercased wire qname; returns the winning verdict and the label offset of
        the rule name inside q (0 for the name itself), or None if no rule matches."""
        st = self.subtree
        v = self.exact.get(q) or st.get(q)
        if v is not None and v.enforce:
            return v, 0
        shadow = None if v is None else (v, 0)
        for k in labels[1:]:
            v = st.get(q[k:])
            if v is not None:
                if v.enforce:
                    return v, k
                if shadow is None:
                    shadow = (v, k)
        return shadow

    def __len__(self) -> int:
        return len(self.exact) + len(self.subtree)

    def to_ruleset(self) -> RuleSet:
        """The RuleSet this table serves (names from the keys, order ids from the verdicts)."""
        name = wire.wire_to_name
        doms = [DomainRule(name(k), False, v.own_orders) for k, v in self.exact.items()]
        doms += [DomainRule(name(k), True, v.own_orders) for k, v in self.subtree.items()]
        return RuleSet.build(doms)

    def order_hits(self) -> dict[str, int]:
        out: dict[str, int] = {}
        for v, h in zip(self.verdicts, self.hits):
            if h and v.order is not None:
                out[v.order] = out.get(v.order, 0) + h
        return out


def _choose(own: frozenset[str], combined: frozenset[str], orders: Mapping[str, OrderInfo],
            s: AnswerSettings, index: int) -> Verdict:
    best: tuple[int, str] | None = None
    for oid in combined:
        info = orders.get(oid)
        mode = s.override_answer or (info.dns_answer if info and info.dns_answer else s.default_answer)
        cand = (MODE_RANK[mode], oid)
        if best is None or cand < best:
            best = cand
    if best is None:
        mode = s.override_answer or s.default_answer
        order = None
    else:
        mode, order = next(m for m, r in MODE_RANK.items() if r == best[0]), best[1]
    text = ede_text(order, orders.get(order) if order else None, max(len(combined) - 1, 0))
    structured = None if s.sde_option_code is None else (
        sde.extra_text(text, s.sde_organization, s.sde_contact, s.sde_sub_error, s.sde_language, s.ede_code),
        sde.compact_text(s.sde_contact, s.sde_sub_error, s.ede_code))
    return Verdict(mode, order, combined, own, text, s.ede_code, index, structured)


_SOA_COUNTS = struct.Struct("!HHHH")


class Answers:
    """Pre-rendered pieces of blocked answers; `render` only concatenates bytes."""

    __slots__ = ("soa_tail", "a_rr", "aaaa_rr", "sde_needle")

    def __init__(self, s: AnswerSettings) -> None:
        self.sde_needle = sde.option_needle(s.sde_option_code)
        rdata = wire.soa_rdata(s.soa_mname, s.soa_rname, 1, 3600, 600, 86400, s.negative_ttl)
        # owner (a pointer to the matched rule name inside the question) is prepended per query
        self.soa_tail = struct.pack("!HHIH", wire.T_SOA, 1, s.negative_ttl, len(rdata)) + rdata
        self.a_rr = self.aaaa_rr = None
        if s.sinkhole_v4:
            t, rd = wire.addr_rdata(s.sinkhole_v4)
            if t != wire.T_A:
                raise ValueError(f"sinkhole_v4: {s.sinkhole_v4!r} is not an IPv4 address")
            self.a_rr = wire.rr(b"\xc0\x0c", wire.T_A, s.answer_ttl, rd)
        if s.sinkhole_v6:
            t, rd = wire.addr_rdata(s.sinkhole_v6)
            if t != wire.T_AAAA:
                raise ValueError(f"sinkhole_v6: {s.sinkhole_v6!r} is not an IPv6 address")
            self.aaaa_rr = wire.rr(b"\xc0\x0c", wire.T_AAAA, s.answer_ttl, rd)

    def render(self, data: bytes, q: wire.Query, off: int, v: Verdict, tcp: bool = False) -> bytes:
        """The blocked answer to `data` (whose parse is `q`), rule name at label offset `off`."""
        mode = v.mode
        ans = b""
        if mode == "sinkhole":
            if q.qtype == wire.T_A and self.a_rr is not None and q.qclass == 1:
                ans = self.a_rr
            elif q.qtype == wire.T_AAAA and self.aaaa_rr is not None and q.qclass == 1:
                ans = self.aaaa_rr
        ns = b"" if ans or mode == "refused" else wire.POINTERS[off] + self.soa_tail
        if q.edns < 0:
            return (wire.header(data, v.rcode, 1, 1 if ans else 0, 1 if ns else 0, 0)
                    + data[12 : q.qend + 4] + ans + ns)
        out = wire.header(data, v.rcode, 1, 1 if ans else 0, 1 if ns else 0, 1) + data[12 : q.qend + 4] + ans + ns
        if not sde.wants(data, q, self.sde_needle):
            return out + v.opt[q.do]
        full = out + v.opt_sde[q.do]
        limit = q.edns if q.edns > 512 else 512
        if tcp or len(full) <= limit:
            return full
        small = out + v.opt_sde_small[q.do]  # draft §5.2: j and o go first, then the EXTRA-TEXT,
        return small if len(small) <= limit else out + v.opt_sde_bare[q.do]  # before TC=1
