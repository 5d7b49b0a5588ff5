"""audit: hash chain, head file, tamper detection at the right line, torn tail after a crash."""

from __future__ import annotations

import hashlib
import json
from collections.abc import Callable, Iterator
from datetime import datetime, timedelta, timezone
from pathlib import Path

import pytest

from blockd import minisign
from blockd.audit import GENESIS, AuditError, AuditLog, Head, head_path, verify
from blockd.errors import SignatureError

T0 = datetime(2026, 11, 29, 10, 0, tzinfo=timezone.utc)


def clock() -> Callable[[], datetime]:
    ticks: Iterator[int] = iter(range(10**6))
    return lambda: T0 + timedelta(seconds=next(ticks))


def make_log(tmp_path: Path, n: int = 6, key: minisign.SecretKey | None = None) -> Path:
    path = tmp_path / "audit.jsonl"
    with AuditLog.open(path, clock=clock(), key=key) as log:
        for i in range(1, n + 1):
            log.append("policy_accepted", policy=f"p{i}.yaml", serial=i)
    return path


def lines(path: Path) -> list[bytes]:
    return path.read_bytes().splitlines(keepends=True)


def test_append_chains_entries_and_moves_the_head(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    with AuditLog.open(path, clock=clock()) as log:
        assert log.head() == Head(0, GENESIS)
        h1 = log.append("policy_accepted", policy="a.yaml", at=T0, signers={"b", "a"})
        h2 = log.append("policy_rejected", policy="b.yaml", reason="bad signature")
        assert log.head() == Head(2, h2)
    first, second = lines(path)
    assert hashlib.sha256(first[:-1]).hexdigest() == h1
    e1, e2 = json.loads(first), json.loads(second)
    assert e1 == {"seq": 1, "prev": GENESIS, "event": "policy_accepted", "time": "2026-11-29T10:00:01Z",
                  "policy": "a.yaml", "at": "2026-11-29T10:00:00Z", "signers": ["a", "b"]}
    assert e2["prev"] == h1
    # canonical: sorted keys, no spaces, so the bytes are reproducible
    assert first == json.dumps(e1, sort_keys=True, separators=(",", ":")).encode() + b"\n"
    head = json.loads(head_path(path).read_bytes())
    assert (head["seq"], head["sha256"], head["log"]) == (2, h2, "audit.jsonl")
    result = verify(path)
    assert (result.entries, result.head, result.unanchored) == (2, Head(2, h2), 0)
    assert dict(result.events) == {"policy_accepted": 1, "policy_rejected": 1}


def _edit(ls: list[bytes], i: int) -> list[bytes]:
    ls[i] = ls[i].replace(b'"serial":', b'"serial":1')
    return ls


def _swap(ls: list[bytes], i: int) -> list[bytes]:
    ls[i], ls[i + 1] = ls[i + 1], ls[i]
    return ls


def _forge_insert(ls: list[bytes], i: int) -> list[bytes]:
    prev = hashlib.sha256(ls[i - 1][:-1]).hexdigest()
    fake = {"seq": i + 1, "prev": prev, "event": "policy_accepted", "time": "2026-11-29T10:00:00Z"}
    return ls[:i] + [json.dumps(fake, sort_keys=True, separators=(",", ":")).encode() + b"\n"] + ls[i:]


# (name, tamper(lines) -> lines, expected AuditError.line, message fragment)
TAMPER = [
    ("edit line 3", lambda ls: _edit(ls, 2), 3, r"line 3 \(seq 3\) was altered"),
    ("edit line 1", lambda ls: _edit(ls, 0), 1, r"line 1 \(seq 1\) was altered"),
    ("edit last line", lambda ls: _edit(ls, 5), 6, "hashes to .* but the audit.head records"),
    ("one byte of whitespace", lambda ls: [ls[0], ls[1].replace(b",", b", ", 1), *ls[2:]], 2, "line 2 .* was altered"),
    ("delete line 3", lambda ls: ls[:2] + ls[3:], 3, "seq is 4, expected 3: entries were deleted"),
    ("delete line 1", lambda ls: ls[1:], 1, "seq is 2, expected 1"),
    ("reorder lines 3 and 4", lambda ls: _swap(ls, 2), 3, "seq is 4, expected 3"),
    ("insert a forged line 3", lambda ls: _forge_insert(ls, 2), 4, "seq is 3, expected 4"),
    ("truncate the last 2 lines", lambda ls: ls[:4], 5, "log ends at seq 4 but the audit.head records seq 6"),
    ("truncate to empty", lambda ls: [], 1, "log ends at seq 0 .* entries 1..6 were removed"),
    ("garbage line", lambda ls: [*ls[:3], b"not json\n", *ls[3:]], 4, "line 4: not JSON"),
]


@pytest.mark.parametrize("tamper, line, message", [t[1:] for t in TAMPER], ids=[t[0] for t in TAMPER])
def test_tampering_is_detected_at_the_right_line(tmp_path: Path, tamper: Callable[[list[bytes]], list[bytes]],
                                                 line: int, message: str) -> None:
    path = make_log(tmp_path)
    verify(path)
    path.write_bytes(b"".join(tamper(lines(path))))
    with pytest.raises(AuditError, match=message) as e:
        verify(path)
    assert e.value.line == line
    assert e.value.where.startswith(str(path))
    # the daemon refuses to append on top of a damaged log
    with pytest.raises(AuditError):
        AuditLog.open(path, clock=clock())


def test_prev_mismatch_reports_expected_and_found_hashes(tmp_path: Path) -> None:
    path = make_log(tmp_path)
    ls = lines(path)
    good = hashlib.sha256(ls[2][:-1]).hexdigest()
    path.write_bytes(b"".join(_edit(ls, 2)))
    with pytest.raises(AuditError) as e:
        verify(path)
    assert (e.value.seq, e.value.expected) == (3, good)
    assert e.value.found == hashlib.sha256(lines(path)[2][:-1]).hexdigest()


def test_consistent_rewrite_of_log_and_unsigned_head_is_caught_only_by_an_attested_anchor(tmp_path: Path) -> None:
    path = make_log(tmp_path)
    anchor = verify(path).head  # what an attestation bound
    # truncate to 4 entries and rewrite the head to match: the chain alone cannot tell
    ls = lines(path)[:4]
    path.write_bytes(b"".join(ls))
    head = json.loads(head_path(path).read_bytes())
    head.update(seq=4, sha256=hashlib.sha256(ls[3][:-1]).hexdigest())
    head_path(path).write_text(json.dumps(head))
    assert verify(path).entries == 4
    with pytest.raises(AuditError, match="the anchor records seq 6: entries 5..6 were removed"):
        verify(path, anchors=[anchor])


def test_signed_head_resists_a_forged_head(tmp_path: Path) -> None:
    key = minisign.generate()
    path = make_log(tmp_path, key=key)
    result = verify(path, public_key=key.public)
    assert result.head_signed_by == key.public.id_hex
    assert verify(path).head_signed_by is None  # not checked, so not claimed
    with AuditLog.open(path, clock=clock(), key=key) as log:  # reopening checks the signed head
        log.append("attestation_issued", id="x")
    with pytest.raises(SignatureError, match="does not match public key"):
        AuditLog.open(path, clock=clock(), key=minisign.generate())
    assert verify(path, public_key=key.public).entries == 7
    ls = lines(path)[:4]
    path.write_bytes(b"".join(ls))
    head = json.loads(head_path(path).read_bytes())
    head.update(seq=4, sha256=hashlib.sha256(ls[3][:-1]).hexdigest())
    head_path(path).write_text(json.dumps(head))
    with pytest.raises(SignatureError, match="does not match the file's contents"):
        verify(path, public_key=key.public)
    with pytest.raises(SignatureError, match="head file is not signed"):
        verify(make_log(tmp_path / "other"), public_key=key.public)


def test_torn_last_line_is_reported_then_moved_aside_and_logged(tmp_path: Path) -> None:
    path = make_log(tmp_path, n=3)
    torn = b'{"event":"policy_accepted","prev":"ab'
    with path.open("ab") as f:
        f.write(torn)
    with pytest.raises(AuditError, match=r"line 4: last line is torn \(37 bytes without a newline\)") as e:
        verify(path)
    assert e.value.line == 4
    with AuditLog.open(path, clock=clock()) as log:
        assert log.head().seq == 4
        log.append("drift_repaired", enforcer="nft")
    (aside,) = tmp_path.glob("audit.jsonl.torn-4-*")
    assert aside.read_bytes() == torn
    entries = [json.loads(x) for x in lines(path)]
    assert entries[3]["event"] == "torn_tail"
    assert entries[3]["bytes"] == len(torn)
    assert entries[3]["sha256"] == hashlib.sha256(torn).hexdigest()
    assert entries[3]["moved_to"] == aside.name
    assert verify(path).entries == 5


def test_crash_between_append_and_head_update_is_tolerated_once(tmp_path: Path) -> None:
    path = make_log(tmp_path, n=3)
    old_head = head_path(path).read_bytes()
    with AuditLog.open(path, clock=clock()) as log:
        log.append("ruleset_applied", enforcer="nft")
    head_path(path).write_bytes(old_head)  # as if the process died before the head was replaced
    assert verify(path).unanchored == 1
    with AuditLog.open(path, clock=clock()) as log:
        assert log.head().seq == 4
    assert verify(path).unanchored == 0
    # two entries past the head cannot come from one crash
    with AuditLog.open(path, clock=clock()) as log:
        log.append("a_event")
        log.append("b_event")
    head_path(path).write_bytes(old_head)
    with pytest.raises(AuditError, match="entries 4..6 come after the head file's seq 3") as e:
        verify(path)
    assert e.value.line == 4


def test_missing_head_or_log(tmp_path: Path) -> None:
    path = make_log(tmp_path, n=2)
    head_path(path).unlink()
    with pytest.raises(AuditError, match="audit.head is missing, so truncation at the end cannot be ruled out"):
        verify(path)
    path.unlink()
    with pytest.raises(AuditError, match="audit log and its head file are both missing"):
        verify(path)


def test_one_writer_and_bad_arguments(tmp_path: Path) -> None:
    path = tmp_path / "audit.jsonl"
    with AuditLog.open(path, clock=clock()) as log:
        with pytest.raises(AuditError, match="locked by another process"):
            AuditLog.open(path, clock=clock())
        with pytest.raises(ValueError, match=r"field name\(s\) \['seq'\] are reserved"):
            log.append("policy_accepted", seq=3)
        with pytest.raises(ValueError, match="'Policy Accepted' is not a snake_case name"):
            log.append("Policy Accepted")
        with pytest.raises(TypeError, match="field of type object is not JSON"):
            log.append("policy_accepted", thing=object())
        with pytest.raises(ValueError, match="NaN|Out of range"):
            log.append("policy_accepted", ratio=float("nan"))
        assert log.head().seq == 0
    assert verify(path).entries == 0
