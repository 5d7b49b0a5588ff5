"""Time-to-enforce: (policies, order results, per-enforcer sync times, now) -> per-order timings.

Pure: no clock, files or logging; the daemon passes `now` and keeps the record between passes.

Two steps, both pure:

    record(previous, policies, orders, synced)   -> EnforcedAt: order version -> enforcer -> the
                                                    first time that enforcer's read-back held it
    timing(...)                                  -> Timing: issued -> received -> verified ->
                                                    enforced on every enforcer; deadline status

An order *version* is `"<issuer>/<order id>@<serial>"`: a re-issued order (new serial) is timed
from its own `issued_at` to the first pass that enforced that serial, so a time-to-enforce is
never negative and never borrowed from an older serial.

Deadline status, per order:

    met             enforced on every enforcer at or before the deadline
    missed          enforced after the deadline, or still not enforced and `now` is past it
    open            not enforced yet, deadline still ahead
    at_risk         not enforced everywhere yet, deadline ahead, and an enforcer that must hold
                    it is failing or out of sync
    none            the order has no deadline
    refused         every rule of the order was refused by a guard: nothing to enforce
    not_applicable  superseded or expired before it was ever enforced
"""

from __future__ import annotations

from collections.abc import Collection, Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from types import MappingProxyType
from typing import Literal

from blockd.compile import OrderResult, order_key
from blockd.model import Order, Policy

DeadlineStatus = Literal["met", "missed", "open", "at_risk", "none", "refused", "not_applicable"]

#: order version -> enforcer name -> first time the enforcer's read-back held it
EnforcedAt = Mapping[str, Mapping[str, datetime]]

#: Statuses whose order is (or, for unblock, whose removal is) held by the enforcers.
HELD: frozenset[str] = frozenset({"enforced", "partially_refused", "unblock"})


def version_key(policy: Policy, order: Order) -> str:
    return f"{order_key(policy, order)}@{policy.serial}"


@dataclass(frozen=True, slots=True)
class Timing:
    issued_at: datetime
    received_at: datetime | None
    verified_at: datetime | None
    deadline: datetime | None
    #: enforcer -> first time its read-back held this order version
    enforced_at: Mapping[str, datetime] = field(default_factory=lambda: MappingProxyType({}))
    #: the latest of `enforced_at` once every enforcer holds it, else None
    enforced_everywhere_at: datetime | None = None
    deadline_status: DeadlineStatus = "none"

    @property
    def issued_to_enforced_s(self) -> float | None:
        return _seconds(self.issued_at, self.enforced_everywhere_at)

    @property
    def received_to_enforced_s(self) -> float | None:
        return _seconds(self.received_at, self.enforced_everywhere_at)


def _seconds(start: datetime | None, end: datetime | None) -> float | None:
    if start is None or end is None:
        return None
    return round((end - start).total_seconds(), 3)


def newest(policies: Iterable[Policy]) -> dict[str, Policy]:
    """issuer -> its highest-serial policy (the only one compile lets count)."""
    out: dict[str, Policy] = {}
    for p in policies:
        if p.issuer not in out or p.serial > out[p.issuer].serial:
            out[p.issuer] = p
    return out


def record(
    previous: EnforcedAt,
    policies: Sequence[Policy],
    orders: Mapping[str, OrderResult],
    synced: Mapping[str, datetime | None],
) -> dict[str, dict[str, datetime]]:
    """Extend `previous` with this pass: for every held order version of a newest policy and every
    enforcer whose read-back was in sync at `synced[name]` (None = not in sync), keep the first
    time seen. Versions of policies no longer passed in are dropped; `previous` is not mutated.
    """
    current = newest(policies)
    out: dict[str, dict[str, datetime]] = {}
    for p in policies:
        for o in p.orders:
            vk = version_key(p, o)
            times = dict(previous.get(vk, {}))
            result = orders.get(order_key(p, o))
            if current[p.issuer] is p and result is not None and result.status in HELD:
                for name, at in synced.items():
                    if at is not None and name not in times:
                        times[name] = at
            if times:
                out[vk] = times
    return out


def timing(
    *,
    issued_at: datetime,
    received_at: datetime | None,
    verified_at: datetime | None,
    deadline: datetime | None,
    status: str,
    enforced_at: Mapping[str, datetime],
    enforcers: Collection[str],
    now: datetime,
    failing: Collection[str] = (),
) -> Timing:
    """One order version's timing. `enforcers` are the names that must all hold it; with none
    configured (dry run) nothing is ever enforced everywhere. `failing`: enforcers that do not
    hold the current rule set (failed or out of sync); an order one of them has not held yet is
    not enforced everywhere, and its deadline is at risk."""
    held = {name: enforced_at[name] for name in sorted(enforcers) if name in enforced_at}
    everywhere = max(held.values()) if enforcers and len(held) == len(enforcers) else None
    state = deadline_status(deadline, everywhere, status, now)
    if state == "open" and set(failing) & set(enforcers):
        state = "at_risk"
    return Timing(
        issued_at, received_at, verified_at, deadline, MappingProxyType(held), everywhere, state,
    )


def deadline_status(deadline: datetime | None, enforced: datetime | None, status: str, now: datetime) -> DeadlineStatus:
    if status == "refused":
        return "refused"
    if enforced is not None:
        if deadline is None:
            return "none"
        return "met" if enforced <= deadline else "missed"
    if status in ("superseded", "expired"):
        return "not_applicable"
    if deadline is None:
        return "none"
    return "missed" if now > deadline else "open"


def order_timings(
    policies: Sequence[Policy],
    orders: Mapping[str, OrderResult],
    received: Mapping[str, tuple[datetime | None, datetime | None]],
    enforced: EnforcedAt,
    enforcers: Collection[str],
    now: datetime,
    *,
    pending: Collection[str] = (),
    failing: Collection[str] = (),
) -> dict[str, Timing]:
    """Order version -> Timing for every order of `policies`. `received` maps a policy digest to
    (received_at, verified_at). The status of an order of a superseded policy is `superseded`;
    of a policy whose digest is in `pending` (not_before ahead), `pending`."""
    current = newest(p for p in policies if p.digest not in pending)
    out: dict[str, Timing] = {}
    for p in policies:
        rec, ver = received.get(p.digest, (None, None))
        for o in p.orders:
            result = orders.get(order_key(p, o))
            if p.digest in pending:
                status = "pending"
            elif current.get(p.issuer) is not p:
                status = "superseded"
            else:
                status = result.status if result else "pending"
            out[version_key(p, o)] = timing(
                issued_at=p.issued_at, received_at=rec, verified_at=ver, deadline=o.deadline, status=status,
                enforced_at=enforced.get(version_key(p, o), {}) if p.digest not in pending else {},
                enforcers=enforcers, now=now, failing=failing,
            )
    return out


def to_json(enforced: EnforcedAt) -> dict[str, dict[str, str]]:
    """EnforcedAt -> plain JSON (UTC ISO times) for the daemon's state file."""
    return {k: {n: t.astimezone(timezone.utc).isoformat().replace("+00:00", "Z") for n, t in sorted(v.items())}
            for k, v in sorted(enforced.items())}


def from_json(obj: object, where: str = "") -> dict[str, dict[str, datetime]]:
    """The inverse of `to_json`; ValueError naming the bad entry."""
    if not isinstance(obj, dict):
        raise ValueError(f"{where}: expected an object of order version -> enforcer -> time, got {type(obj).__name__}")
    out: dict[str, dict[str, datetime]] = {}
    for k, v in obj.items():
        if not isinstance(v, dict):
            raise ValueError(f"{where}: {k}: expected an object of enforcer -> time, got {v!r}")
        try:
            out[k] = {n: datetime.fromisoformat(str(t).replace("Z", "+00:00")) for n, t in v.items()}
        except ValueError:
            raise ValueError(f"{where}: {k}: times must be ISO 8601 UTC like 2026-11-29T12:00:00Z; got {v!r}") from None
    return out
