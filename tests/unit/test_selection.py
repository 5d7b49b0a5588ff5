"""selection.select: the one decision of what is in force, table-driven."""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime, timedelta, timezone

import pytest

from blockd.compile import Prepared
from blockd.errors import PolicyError, SignatureError
from blockd.policy import parse_policy
from blockd.selection import AcceptedSerial, Candidate, Unreadable, select

NOW = datetime(2026, 12, 1, 12, 0, tzinfo=timezone.utc)
DAY = timedelta(days=1)

TEXT = """\
issuer: reg
serial: {serial}
issued_at: 2026-11-01T00:00:00Z
not_before: {nb:%Y-%m-%dT%H:%M:%SZ}
not_after: {na:%Y-%m-%dT%H:%M:%SZ}
orders:
  - id: o{serial}{variant}
    legal_basis: {{authority: Court, reference: R1}}
    action: block
    targets: {{domains: [t{serial}{variant}.example]}}
"""


@dataclass(frozen=True)
class F:
    """A file in a case: serial, variant (other bytes, same serial), window, where it lies."""

    serial: int
    variant: str = ""
    window: str = "now"  # now | ahead | past
    state: bool = False
    bad: bool = False  # cannot expand (an unknown service, an ASN without prefixes)

    @property
    def name(self) -> str:
        return f"{'state/' if self.state else ''}{self.serial}{self.variant}.yaml"

    def candidate(self) -> Candidate:
        nb, na = {"now": (NOW - DAY, NOW + 30 * DAY), "ahead": (NOW + DAY, NOW + 30 * DAY),
                  "past": (NOW - 30 * DAY, NOW - DAY)}[self.window]
        text = TEXT.format(serial=self.serial, variant=self.variant, nb=nb, na=na)
        return Candidate(parse_policy(text.encode(), self.name), from_state=self.state)


def digest_of(f: F) -> str:
    return f.candidate().policy.digest


CASES = [
    # name, files, accepted (a file), expected {file name: status}, in force (file name or None)
    ("newest valid serial wins", [F(1), F(2)], None,
     {"1.yaml": "superseded", "2.yaml": "active"}, "2.yaml"),
    ("a typo in a new serial keeps the accepted one", [F(1, state=True), F(2, bad=True)], F(1),
     {"state/1.yaml": "active", "2.yaml": "rejected"}, "state/1.yaml"),
    ("a pending serial leaves the accepted one in force", [F(1, state=True), F(2, window="ahead")], F(1),
     {"state/1.yaml": "active", "2.yaml": "pending"}, "state/1.yaml"),
    ("an older file left in the directory is superseded, not a replay", [F(2, state=True), F(1)], F(2),
     {"state/2.yaml": "active", "1.yaml": "superseded"}, "state/2.yaml"),
    ("two files, one serial, other bytes: both refused", [F(2, state=True), F(3, "a"), F(3, "b")], F(2),
     {"state/2.yaml": "active", "3a.yaml": "rejected", "3b.yaml": "rejected"}, "state/2.yaml"),
    ("the accepted serial with other bytes is a replay", [F(3, state=True), F(3, "x")], F(3),
     {"state/3.yaml": "active", "3x.yaml": "rejected"}, "state/3.yaml"),
    ("an expired accepted policy ends its orders", [F(1, window="past", state=True)], F(1, window="past"),
     {"state/1.yaml": "expired"}, None),
    ("an expired newest serial: the valid older one", [F(2, window="past"), F(1)], None,
     {"2.yaml": "expired", "1.yaml": "active"}, "1.yaml"),
    ("nothing valid: nothing in force", [F(1, bad=True)], None, {"1.yaml": "rejected"}, None),
    ("a newer good serial over a bad newest one", [F(1, state=True), F(2), F(3, bad=True)], F(1),
     {"state/1.yaml": "superseded", "2.yaml": "active", "3.yaml": "rejected"}, "2.yaml"),
]


@pytest.mark.parametrize("name, files, accepted, expected, in_force", CASES, ids=[c[0] for c in CASES])
def test_select(name: str, files: list[F], accepted: F | None, expected: dict[str, str], in_force: str | None) -> None:
    bad = {f.candidate().policy.digest for f in files if f.bad}

    def prepare(p):  # noqa: ANN001, ANN202
        if p.digest in bad:
            raise PolicyError("unknown service 'telegramm'; known: telegram", where=p.source)
        return Prepared(p, {}, (), (), ())

    acc = {"reg": AcceptedSerial(accepted.serial, digest_of(accepted))} if accepted else {}
    sel = select([f.candidate() for f in files], (), acc, NOW, prepare)
    assert {v.source: v.status for v in sel.verdicts} == expected
    assert [p.policy.source for p in sel.prepared] == ([in_force] if in_force else [])
    for v in sel.verdicts:
        assert v.reason, v  # every status says why
        if v.status == "rejected":
            assert v.kind in ("expand", "conflict", "replay") and v.error is not None


def test_reasons_name_the_cause() -> None:
    sel = select([F(2, state=True).candidate(), F(3, "a").candidate(), F(3, "b").candidate(),
                  F(4, window="ahead").candidate()], (), {"reg": AcceptedSerial(2, digest_of(F(2)))}, NOW,
                 lambda p: Prepared(p, {}, (), (), ()))
    by = {v.source: v for v in sel.verdicts}
    assert "conflict: 2 files carry serial 3" in by["3a.yaml"].reason and "3b.yaml" in by["3a.yaml"].reason
    assert by["4.yaml"].reason.startswith("not valid yet: takes effect at not_before 2026-12-02T12:00:00Z")
    assert sel.next_boundary(NOW) == NOW + DAY


def test_same_bytes_in_directory_and_state_are_one_file() -> None:
    f = F(1)
    state = Candidate(f.candidate().policy, from_state=True)
    sel = select([state, f.candidate()], (), {"reg": AcceptedSerial(1, digest_of(f))}, NOW,
                 lambda p: Prepared(p, {}, (), (), ()))
    assert [(v.source, v.status, v.from_state) for v in sel.verdicts] == [("1.yaml", "active", False)]


def test_unreadable_files_are_rejected_with_their_kind() -> None:
    err = SignatureError("no signature", where="x.yaml")
    sel = select([], [Unreadable("x.yaml", err, "ab" * 32)], {}, NOW, lambda p: Prepared(p, {}, (), (), ()))
    (v,) = sel.verdicts
    assert (v.status, v.kind, v.digest, v.issuer) == ("rejected", "signature", "ab" * 32, None)
    assert sel.counts() == {("", "rejected"): 1}


def test_strict_raises_instead_of_rejecting() -> None:
    def prepare(p):  # noqa: ANN001, ANN202
        raise PolicyError("unknown service", where=p.source)

    with pytest.raises(PolicyError):
        select([F(1).candidate()], (), {}, NOW, prepare, strict=True)


def test_one_policy_under_two_names_gets_two_verdicts() -> None:
    a = F(1).candidate()
    b = Candidate(parse_policy(TEXT.format(serial=1, variant="", nb=NOW - DAY, na=NOW + 30 * DAY).encode(), "copy.yaml"))
    sel = select([a, b], (), {}, NOW, lambda p: Prepared(p, {}, (), (), ()))
    assert {(v.source, v.status) for v in sel.verdicts} == {("1.yaml", "active"), ("copy.yaml", "superseded")}
    assert "the same bytes as 1.yaml" in next(v.reason for v in sel.verdicts if v.source == "copy.yaml")
