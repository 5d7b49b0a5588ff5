"""Which policy is in force: the one decision, made in one place, for `run`, `check`, `plan`, `accept`.

    select(candidates, unreadable, accepted, now, prepare) -> Selection

Pure: no clock (`now` is passed in), no files, no logging. Every file gets exactly one verdict:

    active      in force: the issuer's newest serial that is valid now and expands cleanly
    pending     verified, `not_before` still ahead; takes effect then (not an error)
    superseded  a newer serial of the issuer is in force or was accepted before (an old file
                left in the directory is not a replay attempt)
    expired     `not_after` has passed
    rejected    refused, with the reason: signature, parse, replay (same serial as the accepted
                one, other bytes), conflict (two files, one serial, different bytes), expand
                (a service, ASN, ... it names is unknown)

Per issuer the candidates are tried newest first; one that cannot expand is rejected alone and
the next one (in the end the state's copy of the accepted policy) stays in force, so a typo in
a new policy never unblocks what its issuer ordered before.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import TYPE_CHECKING, Literal

from blockd.errors import BlockdError, PolicyError
from blockd.model import Policy

if TYPE_CHECKING:
    from blockd.compile import Prepared, Status as OrderStatus
    from blockd.policy import SignedFile

Status = Literal["active", "pending", "superseded", "expired", "rejected"]
STATUSES: tuple[Status, ...] = ("active", "pending", "superseded", "expired", "rejected")
FMT = "%Y-%m-%dT%H:%M:%SZ"


@dataclass(frozen=True, slots=True)
class Candidate:
    """A verified, parsed policy file; `from_state` for the state directory's restore copy."""

    policy: Policy
    signed: SignedFile | None = None
    from_state: bool = False


@dataclass(frozen=True, slots=True)
class Unreadable:
    """A file refused before it became a Policy (unreadable, signature, parse)."""

    source: str
    error: BlockdError
    digest: str | None = None


@dataclass(frozen=True, slots=True)
class AcceptedSerial:
    serial: int
    digest: str


@dataclass(frozen=True, slots=True)
class Verdict:
    source: str
    status: Status
    #: one line for an operator; for `rejected` the error itself
    reason: str
    issuer: str | None = None
    serial: int | None = None
    digest: str | None = None
    #: a bounded label for `rejected` (metrics): signature, policy, replay, conflict, expand, ...
    kind: str = ""
    policy: Policy | None = None
    error: BlockdError | None = None
    from_state: bool = False
    #: the exact bytes verified (what `accept` and the daemon record)
    signed: SignedFile | None = None

    def as_json(self) -> dict[str, object]:
        return {"file": self.source, "status": self.status, "reason": self.reason, "issuer": self.issuer,
                "serial": self.serial, "sha256": self.digest, "kind": self.kind or None,
                "from_state": self.from_state,
                "orders": len(self.policy.orders) if self.policy is not None else None,
                "signers": list(self.policy.signers) if self.policy is not None else []}


@dataclass(frozen=True, slots=True)
class Selection:
    prepared: tuple[Prepared, ...]  # the policies in force, one per issuer, sorted by issuer
    verdicts: tuple[Verdict, ...]  # one per file, sorted by (issuer, serial, source)

    @property
    def in_force(self) -> tuple[Policy, ...]:
        return tuple(p.policy for p in self.prepared)

    def with_status(self, *statuses: Status) -> tuple[Verdict, ...]:
        return tuple(v for v in self.verdicts if v.status in statuses)

    def next_boundary(self, now: datetime) -> datetime | None:
        """When the selection can change by the clock alone: a not_after or a not_before ahead."""
        times = [p.not_after for p in self.in_force if p.not_after > now]
        times += [v.policy.not_before for v in self.with_status("pending") if v.policy is not None]
        return min((t for t in times if t > now), default=None)

    def order_statuses(self) -> dict[str, OrderStatus]:
        """Orders of verified policies that are not in force, with their policy's status.

        An order that a policy in force also holds gets that policy's result in the merge, so
        the orders of a serial that the one in force was prepared beside (`Prepared.prior`)
        are listed by what the new serial dropped only: a re-issued registry's old serial
        costs its dropped orders, not a million keys."""
        replaced = {p.prior: p for p in self.prepared if p.prior is not None}
        out: dict[str, OrderStatus] = {}
        for v in self.verdicts:
            if v.policy is not None and v.status in ("pending", "superseded", "expired"):
                q = replaced.get(v.policy.digest)
                if q is not None and q.policy.issuer == v.policy.issuer:
                    for k in sorted(q.changed):
                        if k not in q.infos:
                            out.setdefault(k, v.status)
                    continue
                for o in v.policy.orders:
                    out.setdefault(f"{v.policy.issuer}/{o.id}", v.status)
        return out

    def policy_statuses(self) -> dict[str, str]:
        return {v.source: v.status for v in self.verdicts}

    def counts(self) -> dict[tuple[str, Status], int]:
        return status_counts(self.verdicts)


def select(
    candidates: Iterable[Candidate],
    unreadable: Iterable[Unreadable],
    accepted: Mapping[str, AcceptedSerial],
    now: datetime,
    prepare: Callable[[Policy], Prepared],
    *,
    strict: bool = False,
) -> Selection:
    """Decide every file's status; `prepare` expands a policy (PolicyError if it cannot).

    With `strict`, a policy that cannot expand raises instead of being rejected (for callers
    that hold policies in memory and have nothing to fall back to).
    """
    verdicts = [Verdict(u.source, "rejected", str(u.error), digest=u.digest, kind=_kind(u.error), error=u.error)
                for u in unreadable]
    by_issuer: dict[str, list[Candidate]] = {}
    seen: dict[str, Candidate] = {}
    copies: list[Candidate] = []
    for c in candidates:
        held = seen.get(c.policy.digest)
        if held is not None:
            # The same bytes twice. The directory's file and the state's copy: one verdict, for
            # the file an operator put down. Two files in the directory: the second is a copy.
            if held.from_state and not c.from_state:
                by_issuer[c.policy.issuer].remove(held)
            elif not c.from_state and not held.from_state:
                copies.append(c)
                continue
            else:
                continue
        seen[c.policy.digest] = c
        by_issuer.setdefault(c.policy.issuer, []).append(c)
    prepared: list[Prepared] = []
    for issuer in sorted(by_issuer):
        chosen, issuer_verdicts = _select_issuer(issuer, by_issuer[issuer], accepted.get(issuer), now, prepare, strict)
        verdicts.extend(issuer_verdicts)
        if chosen is not None:
            prepared.append(chosen)
    for c in copies:
        p, first = c.policy, seen[c.policy.digest].policy
        verdicts.append(Verdict(p.source, "superseded", f"the same bytes as {first.source} (one policy, two names)",
                                p.issuer, p.serial, p.digest, "", p, None, False, c.signed))
    verdicts.sort(key=lambda v: (v.issuer or "", v.serial or 0, v.source))
    return Selection(tuple(prepared), tuple(verdicts))


def _select_issuer(issuer: str, candidates: list[Candidate], acc: AcceptedSerial | None, now: datetime,
                   prepare: Callable[[Policy], Prepared], strict: bool) -> tuple[Prepared | None, list[Verdict]]:
    out: list[Verdict] = []

    def verdict(c: Candidate, status: Status, reason: str, kind: str = "", error: BlockdError | None = None) -> None:
        p = c.policy
        out.append(Verdict(p.source, status, reason, p.issuer, p.serial, p.digest, kind, p, error, c.from_state,
                           c.signed))

    # One serial, different bytes: the accepted bytes win; without an accepted copy neither
    # file can be trusted to be the issuer's intent, so both are refused.
    by_serial: dict[int, list[Candidate]] = {}
    for c in candidates:
        by_serial.setdefault(c.policy.serial, []).append(c)
    ordered: list[Candidate] = []
    for serial in sorted(by_serial, reverse=True):
        group = by_serial[serial]
        if len(group) == 1:
            ordered.append(group[0])
            continue
        if acc is not None and acc.serial == serial:
            ordered += [c for c in group if c.policy.digest == acc.digest]
            ordered += [c for c in group if c.policy.digest != acc.digest]  # refused as replays below
            continue
        names = ", ".join(sorted(c.policy.source for c in group))
        for c in group:
            error = PolicyError(f"conflict: {len(group)} files carry serial {serial} of issuer {issuer!r} with "
                                f"different content ({names}); none is used; remove all but one, or issue serial "
                                f"{serial + 1}", where=c.policy.source)
            verdict(c, "rejected", str(error), "conflict", error)

    chosen: Prepared | None = None
    for c in ordered:
        p = c.policy
        if acc is not None and p.serial < acc.serial:
            verdict(c, "superseded", f"serial {p.serial} is below serial {acc.serial}, accepted before; "
                                    f"serials only go up (no rollback)")
        elif acc is not None and p.serial == acc.serial and p.digest != acc.digest:
            error = PolicyError(
                f"replay refused: serial {p.serial} of issuer {issuer!r} was accepted with other content "
                f"(sha256 {acc.digest[:16]}…, this file {p.digest[:16]}…); a changed policy needs serial "
                f"{acc.serial + 1} or higher", where=p.source)
            verdict(c, "rejected", str(error), "replay", error)
        elif chosen is not None:
            verdict(c, "superseded", f"serial {chosen.policy.serial} is in force")
        elif now < p.not_before:
            verdict(c, "pending", f"not valid yet: takes effect at not_before {p.not_before:{FMT}}")
        elif now > p.not_after:
            verdict(c, "expired", f"expired: not_after was {p.not_after:{FMT}}; ask the issuer for a renewed "
                                  f"policy with a higher serial")
        else:
            try:
                chosen = prepare(p)
            except PolicyError as e:
                if strict:
                    raise
                verdict(c, "rejected", f"{e}", "expand", e)
                continue
            verdict(c, "active", "in force")
    return chosen, out


def _kind(error: BlockdError) -> str:
    """A bounded label: the error class, e.g. `signature`, `policy`, `replay`."""
    return type(error).__name__.removesuffix("Error").lower() or "error"



def newly_accepted(sel: Selection, accepted: Mapping[str, AcceptedSerial]) -> list[Verdict]:
    """The verdicts in force that the state does not hold yet (to record)."""
    out = []
    for v in sel.with_status("active"):
        acc = accepted.get(v.issuer or "")
        if v.from_state or v.signed is None or (acc is not None and acc.serial == v.serial):
            continue
        out.append(v)
    return out


def status_counts(verdicts: Iterable[Verdict]) -> dict[tuple[str, Status], int]:
    """(issuer, status) -> files; issuer "" for files refused before their issuer was known."""
    out: dict[tuple[str, Status], int] = {}
    for v in verdicts:
        if v.from_state and v.status != "active":
            continue  # the state's own copy is not a file anyone put down
        key = (v.issuer or "", v.status)
        out[key] = out.get(key, 0) + 1
    return out
