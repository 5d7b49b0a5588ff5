"""ipset enforcer: desired RuleSet -> two hash:net sets (`blockd4`, `blockd6`) for iptables `-m set`.

ipset has no transactions, so atomicity comes from swapping whole sets:

    full replace   (a set missing or too small, or a diff larger than half the set)
                   create shadow sets sized for the rule count, fill them (thousands of
                   entries per netlink message, IPSET_ATTR_ADT + LINENO), swap each with the
                   live set, destroy the old contents. If the fill or a swap fails, swaps
                   already made are undone and the shadows destroyed: the live sets are as
                   before.
    incremental    add then delete only the CIDR diff, all messages in one sendmsg. The kernel
                   applies them one by one; a failure part-way is undone with the inverse
                   operations (the datapath may see the partial diff for that moment).

With a `Change` from what is held, the plan's union intervals are split into CIDRs and sent
incrementally (or, when the plan does not fit what is held or the sets' maxelem, the full
path runs); either way each entry touched is TESTed right after.

hash:net holds CIDRs, so intervals are split (`cidr_keys`, via `ranges.interval_to_cidrs`);
`readback` dumps the sets (a linear kernel dump) and merges the CIDRs back into intervals.
Matching traffic is left to the operator's iptables rules
(`-m set --match-set blockd4 dst -j DROP`).
"""

from __future__ import annotations

import re
import socket
import struct
import time
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from datetime import datetime, timezone
from types import MappingProxyType
from typing import Literal

import structlog

from blockd.enforcers import netlink as nl
from blockd.enforcers.netlink import attr, attr_be32, attr_str, nest
from blockd.errors import ConfigError, EnforcerError
from blockd.model import Applied, NetRule, Plan, RuleSet
from blockd.ranges import BITS, interval_to_cidrs

log = structlog.get_logger("blockd.enforcers.ipset")

PROTOCOL = 7
CMD_CREATE, CMD_DESTROY, CMD_RENAME, CMD_SWAP, CMD_LIST, CMD_ADD, CMD_DEL, CMD_TEST, CMD_TYPE = 2, 3, 5, 6, 7, 9, 10, 11, 13
ERR_EXIST = 4103  # IPSET_ERR_EXIST: on TEST, the entry is not in the set
A_PROTOCOL, A_SETNAME, A_TYPENAME, A_REVISION, A_FAMILY, A_FLAGS, A_DATA, A_ADT, A_LINENO = 1, 2, 3, 4, 5, 6, 7, 8, 9
D_IP, D_CIDR, D_HASHSIZE, D_MAXELEM, D_ELEMENTS, D_MEMSIZE = 1, 3, 18, 19, 24, 26
FLAG_LIST_HEADER = 1 << 2
NFPROTO = {4: socket.AF_INET, 6: socket.AF_INET6}  # NFPROTO_IPV4 = 2, NFPROTO_IPV6 = 10
#: entries per ADD/DEL message: the ADT attribute has a u16 length (24 / 36 bytes per entry).
CHUNK = {4: 2000, 6: 1500}
ENOENT = 2
#: ipset's own error numbers (include/uapi/linux/netfilter/ipset/ip_set.h), for messages.
IPSET_ERRORS = {
    4097: "ipset protocol error", 4098: "unknown set type", 4099: "max number of sets reached",
    4100: "set is busy", 4101: "second set does not exist", 4102: "set types differ, cannot swap",
    4103: "element already added / not present", 4104: "invalid CIDR", 4105: "invalid netmask",
    4106: "address family mismatch", 4108: "set is referenced", 4352: "set is full (maxelem)",
}


@dataclass(frozen=True, slots=True)
class IpsetSettings:
    prefix: str = "blockd"  # sets are <prefix>4 and <prefix>6; shadows <prefix>4-new ...
    min_maxelem: int = 65536
    growth: float = 2.0  # maxelem = count * growth (rounded up to a power of two)

    def __post_init__(self) -> None:
        if not 0 < len(self.prefix) <= 26:  # IPSET_MAXNAMELEN is 32 with the NUL and "6-new"
            raise ConfigError(f"ipset.prefix: {self.prefix!r} must be 1-26 characters")
        if self.growth < 1.0 or self.min_maxelem < 1:
            raise ConfigError(f"ipset.growth {self.growth!r} must be >= 1 and min_maxelem {self.min_maxelem!r} >= 1")

    def name(self, version: int, shadow: bool = False) -> str:
        return f"{self.prefix}{version}{'-new' if shadow else ''}"

    def maxelem(self, count: int) -> int:
        return max(self.min_maxelem, 1 << (max(1, int(count * self.growth)) - 1).bit_length())


def _entry_struct(version: int) -> tuple[struct.Struct, bytes, bytes]:
    """One IPSET_ATTR_DATA { IP { IPADDR_IPVx }, CIDR } entry: constant headers + address + cidr."""
    alen = BITS[version] // 8
    hdr = struct.Struct("=HH").pack
    head = hdr(20 + alen, A_DATA | nl.NLA_F_NESTED) + hdr(8 + alen, D_IP | nl.NLA_F_NESTED) \
        + hdr(4 + alen, (1 if version == 4 else 2) | nl.NLA_F_NET_BYTEORDER)
    return struct.Struct(f"=12s{alen}s4sB3x"), head, hdr(5, D_CIDR)


_ENTRY = {4: _entry_struct(4), 6: _entry_struct(6)}
_ENTRY_RE = {
    v: re.compile(b"." + b"\\x00\\x07[\\x00\\x80]." + b"\\x00\\x01[\\x00\\x80]." + b"\\x00[\\x01\\x02][\\x00\\x40](.{"
                  + str(BITS[v] // 8).encode() + b"})\\x05\\x00\\x03[\\x00\\x40](.)\\x00\\x00\\x00", re.DOTALL)
    for v in (4, 6)
}


def cidr_keys(version: int, rules: Iterable[tuple[int, int, object]]) -> set[int]:
    """Sorted rules -> the CIDRs of their union as keys `network << 8 | prefixlen`.

    One pass (union, split, set) with a fast path for an interval that is one CIDR, and int
    keys, which hash faster than tuples in the diff.
    """
    bits = BITS[version]
    out: set[int] = set()
    add = out.add
    it = iter(rules)
    for start, end, _ in it:  # the first rule opens the current interval
        break
    else:
        return out
    for first, last, _ in it:
        if first <= end + 1:  # overlapping or adjacent: extend the current interval
            if last > end:
                end = last
            continue
        size = end - start + 1
        if size & (size - 1) == 0 and start & (size - 1) == 0:
            add(start << 8 | (bits + 1 - size.bit_length()))
        else:
            out.update(n << 8 | p for n, p in interval_to_cidrs(version, start, end))
        start, end = first, last
    out.update(n << 8 | p for n, p in interval_to_cidrs(version, start, end))
    return _no_slash0(bits, out)


def cidr_held(version: int, rules: Sequence[NetRule], key: int) -> bool:
    """Whether `key` is one of `cidr_keys(version, rules)`, in O(log N): a CIDR of the union
    interval holding its network address."""
    union = nl.union_at(rules, key >> 8)
    if union is None:
        return False
    return key in _no_slash0(BITS[version], {n << 8 | p for n, p in interval_to_cidrs(version, *union)})


def plan_cidr_keys(version: int, intervals: Iterable[tuple[int, int]]) -> set[int]:
    """A plan's union intervals -> CIDR keys, as `cidr_keys` splits them."""
    out: set[int] = set()
    for first, last in intervals:
        out.update(n << 8 | p for n, p in interval_to_cidrs(version, first, last))
    return _no_slash0(BITS[version], out)


def _no_slash0(bits: int, out: set[int]) -> set[int]:
    if 0 in out:  # 0.0.0.0/0 or ::/0: hash:net refuses /0, so hold it as the two /1s
        out.discard(0)
        out.update((1, (1 << (bits - 1)) << 8 | 1))
    return out


def pack_entries(version: int, cidrs: list[tuple[int, int]]) -> bytes:
    """(network, prefixlen) -> the IPSET_ATTR_DATA entries of one ADT attribute."""
    packer, head, cidr_hdr = _ENTRY[version]
    pack, alen = packer.pack, BITS[version] // 8
    return b"".join([pack(head, n.to_bytes(alen, "big"), cidr_hdr, p) for n, p in cidrs])


def parse_entries(version: int, adt: memoryview) -> Iterator[tuple[int, int]]:
    """ADT payload -> (network, prefixlen); fast path checked to cover every byte."""
    raw = bytes(adt)
    hits = _ENTRY_RE[version].findall(raw)
    if len(hits) * (20 + BITS[version] // 8) == len(raw):
        for addr, cidr in hits:
            yield int.from_bytes(addr, "big"), cidr[0]
        return
    for _, entry in nl.iter_attrs(adt):  # entries with extensions (counters, nomatch, ...)
        a = nl.attrs(entry)
        ip = next(iter(nl.attrs(a[D_IP]).values()))
        yield nl.be(ip), a[D_CIDR][0] if D_CIDR in a else BITS[version]


class IpsetEnforcer(nl.KernelEnforcer):
    """Holds `nl.addresses(desired)` in two ipset hash:net sets; see the module docstring."""

    def __init__(self, settings: IpsetSettings | None = None, *, netns: str | None = None, name: str = "ipset") -> None:
        super().__init__(name, netns)
        self.settings = settings or IpsetSettings()
        # CIDR keys (network << 8 | prefixlen) per family after our last successful change or
        # readback (nl.ProvenKeys once a read-back proved the kernel holds a share); None: unknown.
        self._held: dict[int, set[int] | nl.ProvenKeys] | None = None
        self._maxelem: dict[int, int] = {}  # 0 = set missing or not hash:net of that family
        #: when both sets were last dumped in full; when `_held` was last read in any part
        #: (a full dump, or a TEST of each entry a change touched) and how
        self._full_at: datetime | None = None
        self._read_at: datetime | None = None
        self._scope: Literal["full", "touched"] = "full"
        self._revision = {v: self._type_revision(v) for v in (4, 6)}

    # -- work, run in a thread (the async interface is nl.KernelEnforcer's) -------------------

    def _apply(self, desired: RuleSet) -> Applied:
        t0 = time.perf_counter()
        want = {4: cidr_keys(4, desired.v4), 6: cidr_keys(6, desired.v6)}
        if self._held is None:
            self._read_kernel()
        held = nl.as_sets(self._held or {4: set(), 6: set()})
        adds = {v: want[v] - held[v] for v in (4, 6)}
        dels = {v: held[v] - want[v] for v in (4, 6)}
        added, removed = len(adds[4]) + len(adds[6]), len(dels[4]) + len(dels[6])
        # Replace (atomic, and the new sets sized for their count, so the kernel never rehashes
        # while filling) when a set is missing or too small, or the diff is most of the set.
        full = (any(self._maxelem[v] < max(len(want[v]), 1) for v in (4, 6))
                or added + removed > (len(want[4]) + len(want[6])) // 2)
        if full:
            self._replace(want)
            added, removed = len(want[4]) + len(want[6]), len(held[4]) + len(held[6])
        else:
            self._incremental(adds, dels)
        # Read back what this change touched, right after it: after a replace both sets in
        # full; after an incremental change each added entry (present?) and deleted entry
        # (gone?) with one TEST each. Any surprise: read both sets in full.
        self._held = want
        t_read = time.perf_counter()
        if full:
            self._read_kernel()
        elif added + removed and not self._entries_hold(adds, dels):
            log.warning("ipset_readback_differs", enforcer=self.name, added=added, removed=removed)
            self._read_kernel()
        self.last_readback_s = time.perf_counter() - t_read
        equal = self._held is want or all(self._held[v] == want[v] for v in (4, 6))
        if equal:
            self._held = self._proven(desired, {v: len(want[v]) for v in (4, 6)})
        applied = Applied(
            enforcer=self.name, digest=desired.digest if equal else self._held_ruleset().digest,
            desired_digest=desired.digest, added=added, removed=removed, duration_s=time.perf_counter() - t0,
            counts={"ipv4_cidrs": len(self._held[4]), "ipv6_cidrs": len(self._held[6])},
            readback_scope=self._scope, readback_at=self._read_at, full_readback_at=self._full_at,
        )
        log.info("ruleset_applied", enforcer=self.name, added=added, removed=removed, replaced=full,
                 in_sync=equal, duration_s=round(applied.duration_s, 4))
        return applied

    def _apply_plan(self, desired: RuleSet, plan: Plan) -> Applied | None:
        """Send only `plan` (from exactly what `_held` holds) and TEST each entry it touched;
        None (nothing sent) when it does not fit `_held` or a set's maxelem."""
        t0 = time.perf_counter()
        held = self._held
        if held is None:
            return None
        adds = {4: plan_cidr_keys(4, plan.add_v4), 6: plan_cidr_keys(6, plan.add_v6)}
        dels = {4: plan_cidr_keys(4, plan.del_v4), 6: plan_cidr_keys(6, plan.del_v6)}
        for v in (4, 6):
            same = adds[v] & dels[v]  # a CIDR of both an old and a new interval: leave it
            adds[v] -= same
            dels[v] -= same
            if (not dels[v] <= held[v] or any(k in held[v] for k in adds[v])
                    or len(held[v]) + len(adds[v]) > self._maxelem.get(v, 0)):
                log.debug("ipset_plan_does_not_fit", enforcer=self.name, family=v)
                return None
        self._incremental(adds, dels, exclusive=True)
        # what it holds now: the desired share (the plan is the diff to it from what it held)
        self._held = self._proven(nl.addresses(desired), {v: len(held[v]) - len(dels[v]) + len(adds[v]) for v in (4, 6)})
        added, removed = len(adds[4]) + len(adds[6]), len(dels[4]) + len(dels[6])
        t_read = time.perf_counter()
        equal = not (added + removed) or self._entries_hold(adds, dels)
        if not equal:
            log.warning("ipset_readback_differs", enforcer=self.name, added=added, removed=removed)
            self._read_kernel()
        self.last_readback_s = time.perf_counter() - t_read
        share = nl.share_digest(desired)
        assert self._held is not None
        applied = Applied(
            enforcer=self.name, digest=share if equal else self._held_ruleset().digest, desired_digest=share,
            added=added, removed=removed, duration_s=time.perf_counter() - t0,
            counts={"ipv4_cidrs": len(self._held[4]), "ipv6_cidrs": len(self._held[6])},
            readback_scope=self._scope, readback_at=self._read_at, full_readback_at=self._full_at,
        )
        log.info("ruleset_applied", enforcer=self.name, added=added, removed=removed, path="plan",
                 in_sync=applied.in_sync, duration_s=round(applied.duration_s, 4))
        return applied

    def _entries_hold(self, adds: dict[int, set[int]], dels: dict[int, set[int]]) -> bool:
        """TEST every entry just added (must be present) and deleted (must be absent)."""
        msgs, expect = [], []
        for present, keys in ((True, adds), (False, dels)):
            for v in (4, 6):
                name = attr_str(A_SETNAME, self.settings.name(v))
                for k in sorted(keys[v]):
                    msgs.append(self._msg(CMD_TEST, 0, v, name + pack_entries(v, [(k >> 8, k & 0xFF)])))
                    expect.append(present)
        at = datetime.now(timezone.utc)
        failures = {f.index: f.errno for f in self._transact(msgs)}
        for i, present in enumerate(expect):
            if (i in failures) == present or (i in failures and failures[i] != ERR_EXIST):
                return False
        self._read_at, self._scope = at, "touched"
        return True

    def _incremental(self, adds: dict[int, set[int]], dels: dict[int, set[int]], exclusive: bool = False) -> None:
        """`exclusive`: an add of a present entry or a delete of an absent one is an error (a
        plan's view of the sets is then wrong) and the change is undone."""
        t0 = time.perf_counter()
        msgs = self._diff_msgs(adds, dels, exclusive)
        if not msgs:
            return
        failures = self._transact(msgs)
        if failures:
            # Undo with the inverse operations; without NLM_F_EXCL, deleting an entry that was
            # never added and re-adding one that was never deleted are no-ops.
            self._transact(self._diff_msgs(dels, adds))
            self._held = None
            raise _error(self.name, failures[0].errno,
                         f"incremental update failed and was undone; {failures[0].describe(IPSET_ERRORS)}")
        self._record(len(msgs), sum(len(x) for x in (*adds.values(), *dels.values())), sum(map(len, msgs)), t0)

    def _diff_msgs(self, adds: dict[int, set[int]], dels: dict[int, set[int]], exclusive: bool = False) -> list[bytes]:
        # Adds before deletes: a prefix that is re-split stays blocked in between.
        name, x = self.settings.name, exclusive
        msgs = [m for v in (4, 6) for m in self._adt_msgs(CMD_ADD, v, name(v), adds[v], x)]
        return msgs + [m for v in (4, 6) for m in self._adt_msgs(CMD_DEL, v, name(v), dels[v], x)]

    def _replace(self, want: dict[int, set[int]]) -> None:
        """Fill shadow sets, then swap both in; on any failure the live sets are unchanged."""
        t0 = time.perf_counter()
        s = self.settings
        msgs = []
        for v in (4, 6):
            self._destroy_quietly(s.name(v, shadow=True))
            count = len(want[v])
            msgs.append(self._msg(CMD_CREATE, nl.NLM_F_CREATE | nl.NLM_F_EXCL, v,
                                  attr_str(A_SETNAME, s.name(v, True)) + attr_str(A_TYPENAME, "hash:net")
                                  + attr(A_REVISION, bytes([self._revision[v]])) + attr(A_FAMILY, bytes([NFPROTO[v]]))
                                  + nest(A_DATA, _be32(D_HASHSIZE, 1 << max(10, (count // 2).bit_length())),
                                         _be32(D_MAXELEM, s.maxelem(count)))))
            msgs += self._adt_msgs(CMD_ADD, v, s.name(v, True), want[v])
        failures = self._transact(msgs)
        if failures:
            self._drop_shadows()
            raise _error(self.name, failures[0].errno, f"filling shadow sets; live sets unchanged; {failures[0].describe(IPSET_ERRORS)}")
        done: list[bytes] = []  # the inverse of each step taken, to undo them on failure
        for v in (4, 6):
            live, shadow = attr_str(A_SETNAME, s.name(v)), attr_str(A_SETNAME, s.name(v, True))
            as_second = {live: attr_str(A_TYPENAME, s.name(v)), shadow: attr_str(A_TYPENAME, s.name(v, True))}
            if self._maxelem.get(v, 0) or self._exists(s.name(v)):  # swap is its own inverse
                step = undo = self._msg(CMD_SWAP, 0, v, live + as_second[shadow])
            else:  # no live set yet: the shadow becomes it
                step = self._msg(CMD_RENAME, 0, v, shadow + as_second[live])
                undo = self._msg(CMD_RENAME, 0, v, live + as_second[shadow])
            failures = self._transact([step])
            if failures:
                for inverse in reversed(done):
                    self._transact([inverse])
                self._drop_shadows()
                raise _error(self.name, failures[0].errno,
                             f"swapping {s.name(v, True)} into {s.name(v)}; live sets unchanged; "
                             f"{failures[0].describe(IPSET_ERRORS)}")
            done.append(undo)
        self._drop_shadows()
        self._maxelem = {v: s.maxelem(len(want[v])) for v in (4, 6)}
        self._record(len(msgs), len(want[4]) + len(want[6]), sum(map(len, msgs)), t0)

    def _readback(self, full: bool = True) -> RuleSet:  # ipset has no generation: always a dump
        self._read_kernel()
        held = self._held_ruleset()
        if self._share is not None and held.digest == self._share.digest and self._held is not None:
            held = self._share  # as applied: kept as its rules again, not as a million keys
            self._held = self._proven(held, {v: len(self._held[v]) for v in (4, 6)})
        return held

    def _proven(self, share: RuleSet, counts: dict[int, int]) -> dict[int, set[int] | nl.ProvenKeys]:
        return {v: nl.ProvenKeys(share, v, counts[v], cidr_keys, cidr_held) for v in (4, 6)}

    def _held_ruleset(self) -> RuleSet:
        held = self._held or {4: set(), 6: set()}
        if isinstance(held[4], nl.ProvenKeys) and isinstance(held[6], nl.ProvenKeys) and held[4].share is held[6].share:
            return held[4].share
        return nl.held_ruleset(_spans(4, held[4]), _spans(6, held[6]))

    def _read_kernel(self) -> None:
        self._held = {4: set(), 6: set()}
        at = datetime.now(timezone.utc)
        for v in (4, 6):
            self._read_family(v)
        self._full_at = self._read_at = at
        self._scope = "full"

    def _read_family(self, v: int) -> None:
        """Dump `<prefix><v>` into `_held[v]` (and its maxelem); `_held` must not be None."""
        assert self._held is not None
        held: set[int] = set()
        self._maxelem[v] = 0
        try:
            for payload in self._sock.dump(self._msg(CMD_LIST, nl.NLM_F_DUMP, v, attr_str(A_SETNAME, self.settings.name(v)))):
                a = nl.attrs(payload)
                if A_DATA in a:  # the header: only our own type and family count as "present"
                    ok = nl.text(a[A_TYPENAME]) == "hash:net" and a[A_FAMILY][0] == NFPROTO[v]
                    self._maxelem[v] = nl.be(nl.attrs(a[A_DATA])[D_MAXELEM]) if ok else 0
                if A_ADT in a:
                    held.update(n << 8 | p for n, p in parse_entries(v, a[A_ADT]))
        except OSError as exc:
            if exc.errno != ENOENT:
                self._held = None
                raise _error(self.name, exc.errno, f"list {self.settings.name(v)}: {exc.strerror}") from exc
        self._held = {**self._held, v: held}

    def _stats(self) -> nl.KernelStats:
        elements = {}
        for v in (4, 6):
            name = self.settings.name(v)
            req = self._msg(CMD_LIST, nl.NLM_F_DUMP, v, attr_str(A_SETNAME, name) + attr_be32(A_FLAGS, FLAG_LIST_HEADER))
            try:
                for payload in self._sock.dump(req):
                    data = nl.attrs(payload).get(A_DATA)
                    if data is not None:
                        elements[name] = nl.be(nl.attrs(data)[D_ELEMENTS])
            except OSError as exc:
                if exc.errno != ENOENT:
                    raise _error(self.name, exc.errno, f"list {name}: {exc.strerror}") from exc
        # Packet counters live in the operator's iptables rules, not in the sets.
        return nl.KernelStats(self.name, MappingProxyType(elements))

    # -- helpers ----------------------------------------------------------------------------

    def _msg(self, cmd: int, flags: int, version: int, payload: bytes) -> bytes:
        return nl.msg((nl.NFNL_SUBSYS_IPSET << 8) | cmd, flags, NFPROTO[version], attr(A_PROTOCOL, bytes([PROTOCOL])) + payload)

    def _adt_msgs(self, cmd: int, version: int, setname: str, keys: Iterable[int],
                  exclusive: bool = False) -> list[bytes]:
        items = [(k >> 8, k & 0xFF) for k in sorted(keys)]
        # LINENO is mandatory whenever ADT carries entries; 0 = "not from a file".
        prefix = attr_str(A_SETNAME, setname) + attr(A_LINENO, struct.pack("=I", 0))
        out = []
        for k in range(0, len(items), CHUNK[version]):
            body = pack_entries(version, items[k:k + CHUNK[version]])
            # Without NLM_F_EXCL re-adding a present entry (deleting an absent one) is a no-op.
            out.append(self._msg(cmd, nl.NLM_F_EXCL if exclusive else 0, version, prefix + nest(A_ADT, body)))
        return out

    def _transact(self, msgs: list[bytes]) -> list[nl.Failure]:
        try:
            return self._sock.transact(msgs)
        except OSError as exc:
            self._held = None
            raise _error(self.name, exc.errno, f"ipset request: {exc.strerror}") from exc

    def _type_revision(self, version: int) -> int:
        req = self._msg(CMD_TYPE, 0, version, attr_str(A_TYPENAME, "hash:net") + attr(A_FAMILY, bytes([NFPROTO[version]])))
        try:
            for payload in self._sock.dump(req):
                return int(nl.attrs(payload)[A_REVISION][0])
        except OSError as exc:
            raise _error(self.name, exc.errno, f"ipset type hash:net: {exc.strerror}") from exc
        raise _error(self.name, None, "the kernel did not report a hash:net revision")

    def _exists(self, setname: str) -> bool:
        req = self._msg(CMD_LIST, nl.NLM_F_DUMP, 4, attr_str(A_SETNAME, setname) + attr_be32(A_FLAGS, FLAG_LIST_HEADER))
        try:
            return any(True for _ in self._sock.dump(req))
        except OSError as exc:
            if exc.errno == ENOENT:
                return False
            raise _error(self.name, exc.errno, f"list {setname}: {exc.strerror}") from exc

    def _destroy_quietly(self, setname: str) -> None:
        self._transact([self._msg(CMD_DESTROY, 0, 4, attr_str(A_SETNAME, setname))])  # ENOENT is fine

    def _drop_shadows(self) -> None:
        for v in (4, 6):
            self._destroy_quietly(self.settings.name(v, shadow=True))

    def _record(self, messages: int, elements: int, size: int, t0: float) -> None:
        self.last_commit = nl.Commit(messages, elements, size, time.perf_counter() - t0)
        log.debug("ipset_commit", enforcer=self.name, messages=messages, elements=elements, bytes=size,
                  duration_s=round(self.last_commit.duration_s, 4))


def _spans(version: int, held: Iterable[int]) -> dict[int, int]:
    """CIDR keys -> {first: last}; of nested CIDRs (only someone else adds those) keep the widest."""
    host = BITS[version]
    out: dict[int, int] = {}
    for key in held:
        n, p = key >> 8, key & 0xFF
        last = n + (1 << (host - p)) - 1
        if out.get(n, -1) < last:
            out[n] = last
    return out


def _be32(kind: int, value: int) -> bytes:
    return attr(kind | nl.NLA_F_NET_BYTEORDER, struct.pack(">I", value))


def _error(enforcer: str, code: int | None, message: str) -> EnforcerError:
    """The one place kernel/socket errors become EnforcerError (by errno, never by text)."""
    return EnforcerError(enforcer, message, errno=code)
