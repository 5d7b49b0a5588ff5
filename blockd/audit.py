"""Events -> an append-only, hash-chained JSONL audit log, plus a small head file; and its verifier.

    audit.jsonl   one canonical JSON object per line (sorted keys, UTF-8, no spaces):
                  {"event": "policy_accepted", "prev": "<sha256 of the previous line>",
                   "seq": 7, "time": "2026-11-29T10:00:00.000000Z", ...fields}
                  entry hash = SHA-256 of the line's bytes without its newline;
                  the first entry's `prev` is 64 zeros (GENESIS)
    audit.head    {"log", "seq", "sha256", "time"} of the last entry, replaced atomically after
                  every append; with a key, also "key_id" and "minisig" (a minisign signature
                  of the canonical JSON of the other fields)

Every append is fsynced before the head moves, so after a crash the log is at most one entry
ahead of the head, or ends in a torn line (bytes without a newline). `AuditLog.open` moves a
torn line aside to `audit.jsonl.torn-<seq>-<time>` and records a `torn_tail` event: it is never
silently accepted or silently dropped.

`verify` finds an edit, deletion, insertion, reordering or truncation and names the line.
What the chain cannot show on its own is in docs/attestation.md ("What the audit log proves").
"""

from __future__ import annotations

import fcntl
import hashlib
import json
from functools import lru_cache
import os
import re
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path
from types import MappingProxyType
from typing import Any, BinaryIO

import structlog

from blockd import minisign
from blockd.errors import InputError, SignatureError
from blockd.fsutil import atomic_write

log = structlog.get_logger("blockd.audit")

GENESIS = "0" * 64
RESERVED = frozenset({"seq", "time", "event", "prev"})
_EVENT = re.compile(r"[a-z][a-z0-9_]{0,63}\Z")


class AuditError(InputError):
    """The audit log or its head is damaged or was changed. `line`/`seq` name the first entry that
    cannot be trusted (0 = the head file); `expected`/`found` are the hashes or values compared."""

    def __init__(self, message: str, *, where: str, line: int = 0, seq: int = 0,
                 expected: str = "", found: str = "") -> None:
        self.line, self.seq, self.expected, self.found = line, seq, expected, found
        super().__init__(message, where=where)


@dataclass(frozen=True, slots=True)
class Head:
    """The last entry of a log: its sequence number (0 = empty) and hash (GENESIS if empty)."""

    seq: int
    sha256: str

    def as_json(self) -> dict[str, Any]:
        return {"seq": self.seq, "sha256": self.sha256}


@dataclass(frozen=True, slots=True)
class Verified:
    """The result of `verify`: the log is intact up to `head`."""

    entries: int
    head: Head
    #: what audit.head records (None when verify was told the head file may be absent)
    recorded_head: Head | None
    #: entries after the recorded head: 0, or 1 after a crash between an append and the head update
    unanchored: int
    #: bytes of a torn last line, only when `allow_torn` (open moves them aside)
    torn: bytes = b""
    events: Mapping[str, int] = field(default_factory=lambda: MappingProxyType({}))
    #: key id whose signature of audit.head was verified (only when verify got a public key)
    head_signed_by: str | None = None


def canonical(obj: Any, *, indent: int | None = None) -> bytes:
    """Deterministic JSON: sorted keys, UTF-8, no NaN/Infinity; compact unless `indent`."""
    return json.dumps(
        obj, sort_keys=True, ensure_ascii=False, allow_nan=False, default=_jsonable, indent=indent,
        separators=(",", ":") if indent is None else (",", ": "),
    ).encode("utf-8")


def iso(t: datetime) -> str:
    """An aware datetime as `YYYY-MM-DDTHH:MM:SS[.ffffff]Z` (UTC)."""
    if t.tzinfo is None:
        raise ValueError(f"naive datetime {t.isoformat()!r}; pass an aware one (e.g. tzinfo=timezone.utc)")
    return _iso(t)


@lru_cache(maxsize=4096)
def _iso(t: datetime) -> str:
    # A statement of a registry repeats a few times (issued, received, enforced) a million
    # times: formatted once each.
    u = t.astimezone(timezone.utc)
    return u.strftime("%Y-%m-%dT%H:%M:%S") + (f".{u.microsecond:06d}Z" if u.microsecond else "Z")


def _jsonable(o: object) -> Any:
    if isinstance(o, datetime):
        return iso(o)
    if isinstance(o, Path):
        return str(o)
    if isinstance(o, (set, frozenset)):
        return sorted(o)
    if isinstance(o, Mapping):
        return dict(o)
    raise TypeError(f"audit/attestation field of type {type(o).__name__} is not JSON; use str, int, "
                    f"float, bool, None, list, dict, datetime or Path")


def _utc_now() -> datetime:
    return datetime.now(timezone.utc)


def head_path(log_path: Path) -> Path:
    return log_path.with_suffix(".head")


def _head_payload(log_name: str, head: Head, time: str, key_id: str | None) -> dict[str, Any]:
    payload: dict[str, Any] = {"log": log_name, "seq": head.seq, "sha256": head.sha256, "time": time}
    if key_id is not None:
        payload["key_id"] = key_id
    return payload


def read_head(log_path: Path, public_key: minisign.PublicKey | None = None) -> tuple[Head, str | None] | None:
    """audit.head -> (Head, signer key id or None); None if absent. With `public_key` the head
    must carry a valid signature by it (SignatureError otherwise)."""
    path = head_path(log_path)
    try:
        raw = path.read_bytes()
    except FileNotFoundError:
        return None
    try:
        doc = json.loads(raw)
        head = Head(int(doc["seq"]), str(doc["sha256"]))
    except (ValueError, KeyError, TypeError) as e:
        raise AuditError(f"head file is not a JSON object with seq and sha256 ({e})", where=str(path)) from None
    signer = None
    if "minisig" in doc:
        payload = {k: v for k, v in doc.items() if k != "minisig"}
        sig = minisign.parse_signature(str(doc["minisig"]), where=str(path))
        signer = sig.key_id_hex
        if public_key is not None:
            minisign.verify(canonical(payload), sig, public_key, where=str(path))
    elif public_key is not None:
        raise SignatureError(f"head file is not signed; expected a signature by key {public_key.id_hex}",
                             where=str(path))
    return head, signer


def verify(
    path: Path,
    *,
    anchors: Iterable[Head] = (),
    public_key: minisign.PublicKey | None = None,
    require_head: bool = True,
    allow_torn: bool = False,
) -> Verified:
    """Check every entry's seq and prev hash, the head file and each anchor (e.g. the heads bound
    by signed attestations). Raise AuditError naming the first bad line, seq and the hashes."""
    where = str(path)
    anchor_list = sorted(set(anchors), key=lambda h: h.seq)
    hashes: dict[int, str] = {}
    recorded = read_head(path, public_key)
    want = {h.seq for h in anchor_list} | ({recorded[0].seq} if recorded else set())
    events: dict[str, int] = {}
    prev, seq, torn = GENESIS, 0, b""
    f: BinaryIO | None
    try:
        f = path.open("rb")
    except FileNotFoundError:
        if recorded is None and not anchor_list:
            raise AuditError("audit log and its head file are both missing", where=where) from None
        f = None
    if f is not None:
        with f:
            for line_no, raw in enumerate(f, start=1):
                if not raw.endswith(b"\n"):
                    if allow_torn:
                        torn = raw
                        break
                    raise AuditError(
                        f"line {line_no}: last line is torn ({len(raw)} bytes without a newline): a write was "
                        f"interrupted by a crash; opening the log with blockd moves it aside and logs torn_tail",
                        where=f"{where}:{line_no}", line=line_no, seq=seq + 1,
                    )
                body = raw[:-1]
                entry = _parse(body, where, line_no)
                if entry["seq"] != seq + 1:
                    raise AuditError(
                        f"line {line_no}: seq is {entry['seq']}, expected {seq + 1}: entries were deleted, "
                        f"inserted or reordered at this line",
                        where=f"{where}:{line_no}", line=line_no, seq=seq + 1,
                        expected=str(seq + 1), found=str(entry["seq"]),
                    )
                if entry["prev"] != prev and line_no == 1:
                    raise AuditError(
                        f"line 1 (seq {entry['seq']}): prev is {entry['prev']}, expected {GENESIS} for the first "
                        f"entry: the log's beginning was removed, or line 1 was altered",
                        where=f"{where}:1", line=1, seq=1, expected=GENESIS, found=str(entry["prev"]),
                    )
                if entry["prev"] != prev:
                    bad = line_no - 1
                    raise AuditError(
                        f"line {line_no} (seq {entry['seq']}) records prev {entry['prev']} but line {bad} hashes to "
                        f"{prev}: line {bad} (seq {seq}) was altered, or this line's prev field was",
                        where=f"{where}:{bad}", line=bad, seq=seq, expected=str(entry["prev"]), found=prev,
                    )
                prev, seq = hashlib.sha256(body).hexdigest(), entry["seq"]
                events[entry["event"]] = events.get(entry["event"], 0) + 1
                if seq in want:
                    hashes[seq] = prev
    checks = ([("audit.head", recorded[0])] if recorded else []) + [("anchor", h) for h in anchor_list]
    for name, h in checks:
        _check_anchor(name, h, hashes, seq, where)
    if recorded is None and require_head and seq:
        raise AuditError(
            f"head file {head_path(path).name} is missing, so truncation at the end cannot be ruled out; "
            f"the log has {seq} entries", where=str(head_path(path)),
        )
    at = recorded[0].seq if recorded else seq
    if seq - at > 1:
        raise AuditError(
            f"entries {at + 1}..{seq} come after the head file's seq {at}; only one entry may (an append "
            f"interrupted before the head was updated): they were appended by something else",
            where=f"{where}:{at + 1}", line=at + 1, seq=at + 1,
        )
    return Verified(seq, Head(seq, prev), recorded[0] if recorded else None, seq - at, torn,
                    MappingProxyType(events), recorded[1] if recorded and public_key is not None else None)


def _check_anchor(name: str, h: Head, hashes: Mapping[int, str], last: int, where: str) -> None:
    if h.seq == 0:
        if h.sha256 != GENESIS:
            raise AuditError(f"{name} has seq 0 with hash {h.sha256}; expected {GENESIS}", where=where)
        return
    if h.seq > last:
        raise AuditError(
            f"log ends at seq {last} but the {name} records seq {h.seq}: entries {last + 1}..{h.seq} were "
            f"removed (truncated)", where=f"{where}:{last + 1}", line=last + 1, seq=last + 1,
            expected=h.sha256, found="(missing)",
        )
    if hashes[h.seq] != h.sha256:
        raise AuditError(
            f"line {h.seq} (seq {h.seq}) hashes to {hashes[h.seq]} but the {name} records {h.sha256}: "
            f"the log was altered at or before line {h.seq}", where=f"{where}:{h.seq}", line=h.seq, seq=h.seq,
            expected=h.sha256, found=hashes[h.seq],
        )


def _parse(body: bytes, where: str, line_no: int) -> dict[str, Any]:
    try:
        entry = json.loads(body)
    except (UnicodeDecodeError, ValueError) as e:
        raise AuditError(f"line {line_no}: not JSON ({e})", where=f"{where}:{line_no}", line=line_no) from None
    if (not isinstance(entry, dict) or type(entry.get("seq")) is not int or not isinstance(entry.get("prev"), str)
            or not isinstance(entry.get("event"), str) or not isinstance(entry.get("time"), str)):
        raise AuditError(
            f"line {line_no}: not an audit entry; expected an object with seq (int), prev, event and time (str)",
            where=f"{where}:{line_no}", line=line_no,
        )
    return entry


class AuditLog:
    """An open, locked audit log. Use `AuditLog.open`; one writer at a time (flock)."""

    def __init__(self, path: Path, fd: int, head: Head, size: int, clock: Callable[[], datetime],
                 key: minisign.SecretKey | None) -> None:
        self.path = path
        self._fd = fd
        self._head = head
        self._size = size
        self._clock = clock
        self._key = key
        #: the error of a failed head-file update after an entry was written (None: up to date);
        #: until it is written, no further entry is appended (at most one beyond the head)
        self.head_stale: OSError | None = None

    @classmethod
    def open(cls, path: Path, *, clock: Callable[[], datetime] = _utc_now,
             key: minisign.SecretKey | None = None) -> AuditLog:
        """Open (or create) the log for appending. Verifies the whole chain and the head (AuditError if
        broken: the operator must look before anything is appended on top). A torn last line is moved
        aside and recorded as a `torn_tail` event. With `key`, the head file is signed."""
        path.parent.mkdir(parents=True, exist_ok=True)
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_APPEND | os.O_CLOEXEC, 0o640)
        try:
            try:
                fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                raise AuditError("audit log is locked by another process (is another blockd running?)",
                                 where=str(path)) from None
            fresh = os.fstat(fd).st_size == 0 and read_head(path) is None
            checked = verify(path, allow_torn=True, require_head=not fresh,
                             public_key=key.public if key and not fresh and _signed(path) else None)
            size = os.fstat(fd).st_size - len(checked.torn)
            self = cls(path, fd, checked.head, size, clock, key)
            if fresh or checked.unanchored:
                self._write_head()
            if checked.torn:
                self._move_torn(checked.torn)
        except BaseException:
            os.close(fd)
            raise
        return self

    def _move_torn(self, torn: bytes) -> None:
        now = self._clock()
        aside = self.path.with_name(f"{self.path.name}.torn-{self._head.seq + 1}-{now:%Y%m%dT%H%M%SZ}")
        atomic_write(aside, torn, 0o640)
        os.ftruncate(self._fd, self._size)
        os.fsync(self._fd)
        digest = hashlib.sha256(torn).hexdigest()
        log.warning("audit_torn_tail", path=str(self.path), bytes=len(torn), moved_to=str(aside))
        self.append("torn_tail", bytes=len(torn), sha256=digest, moved_to=aside.name,
                    after_seq=self._head.seq)

    def head(self) -> Head:
        return self._head

    def append(self, event: str, **fields: Any) -> str:
        """Write one entry, fsync it, move the head; return the entry's hash. `event` is snake_case;
        field names must not be one of seq, time, event, prev."""
        if not _EVENT.match(event):
            raise ValueError(f"audit event {event!r} is not a snake_case name ([a-z][a-z0-9_]*, at most 64)")
        clash = RESERVED & fields.keys()
        if clash:
            raise ValueError(f"audit field name(s) {sorted(clash)} are reserved; reserved: {sorted(RESERVED)}")
        if self.head_stale is not None:
            self.retry_head()  # raises OSError while the head cannot be written: nothing appended
        seq = self._head.seq + 1
        line = canonical({**fields, "event": event, "prev": self._head.sha256, "seq": seq, "time": iso(self._clock())})
        data = line + b"\n"
        try:
            written = os.write(self._fd, data)
            if written != len(data):
                raise OSError(f"short write: {written} of {len(data)} bytes")
            os.fsync(self._fd)
        except OSError:
            # Leave no torn line behind for the next append to build on.
            os.ftruncate(self._fd, self._size)
            raise
        self._size += len(data)
        self._head = Head(seq, hashlib.sha256(line).hexdigest())
        try:
            self._write_head()
        except OSError as e:
            # The entry is durable; `verify` accepts one entry beyond the head. Say so, and
            # append nothing more until the head is written.
            self.head_stale = e
        return self._head.sha256

    def retry_head(self) -> None:
        """Write the head file an earlier append could not; OSError if it still cannot."""
        self._write_head()
        self.head_stale = None

    def _write_head(self) -> None:
        key_id = self._key.public.id_hex if self._key else None
        payload = _head_payload(self.path.name, self._head, iso(self._clock()), key_id)
        if self._key is not None:
            payload["minisig"] = minisign.sign(canonical(payload), self._key,
                                               trusted_comment=f"audit head seq:{self._head.seq}")
        atomic_write(head_path(self.path), canonical(payload, indent=2) + b"\n", 0o640)

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def __enter__(self) -> AuditLog:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def _signed(path: Path) -> bool:
    found = read_head(path)
    return found is not None and found[1] is not None
