"""The daemon's accountability: pass results -> audit log entries and signed attestations.

    after_pass(result, enforcers)  audit: policy_accepted / policy_rejected / applied / unblocked;
                                   time-to-enforce record; an attestation when anything changed
    attest(result, enforcers, r)   build (pure, `attest.build_statement`) -> sign -> write
    event(name, ...)               any other audit entry (drift_repaired, ...)
    retry(result, enforcers)       write what a failed write left owed (events, a statement)

Enabled by `daemon.audit_log` and/or `daemon.attest_dir` (+ `daemon.operator_key`).

A write that fails (read-only or full disk, an immutable directory) never stops enforcement:
the failure is logged once per outage, counted through `on_failure(kind)` (kind `attestation`,
`audit` or `state`), and what was not written is kept and retried. Audit events wait in order
and are appended later with the time they happened (`occurred_at`); a `write_recovered` entry
says how long the log could not be written. A statement that could not be written is owed:
the next retry writes a fresh one (the current state, read back), under the next unused seq, so
the statement chain has no gap either.
"""

from __future__ import annotations

import hashlib
import json
import socket
from collections.abc import Callable, Mapping, Sequence
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import structlog

from blockd import attest, minisign, tte
from blockd.audit import GENESIS, AuditLog, Head, iso
from blockd.errors import BlockdError
from blockd.fsutil import atomic_write, read_regular
from blockd.model import RuleSet
from blockd.reconcile import PassResult
from blockd.settings import Settings

log = structlog.get_logger("blockd.accountability")

#: audit events kept in memory while the log cannot be written; older ones are dropped (and
#: the count is recorded in `write_recovered`)
MAX_QUEUED = 100_000
#: policy files larger than this are not hashed for `rejected[].sha256`
MAX_HASH_BYTES = 256 << 20


class Accountability:
    def __init__(self, settings: Settings, audit: AuditLog | None, key: minisign.SecretKey | None,
                 on_failure: Callable[[str], None] | None = None) -> None:
        self.settings = settings
        self.audit = audit
        self.key = key
        self.on_failure = on_failure or (lambda kind: None)
        self.export_dir = Path(settings.daemon.attest_dir) if settings.daemon.attest_dir else None
        self._audit_path: Path | None = audit.path if audit is not None else None
        self._last_pending: frozenset[str] = frozenset()
        #: a pass recorded with statement=False called for a statement (see after_pass)
        self._change_owed = False
        self._tte_path = settings.state_dir / "time-to-enforce.json"
        self.enforced = _load_tte(self._tte_path)
        self.verified: dict[str, datetime] = {}
        self.seen: dict[str, datetime] = {}  # digest -> first seen, pending policies too
        self._accepted: set[str] = set()
        self._rejected: dict[str, tuple[str | None, datetime]] = {}  # path -> (sha256, first refused)
        #: audit events not written yet: (event, fields, when it happened, written late)
        self._queue: list[tuple[str, dict[str, Any], datetime, bool]] = []
        self._dropped = 0
        #: kind -> (first failure time, failures) while a kind of write is failing
        self._outage: dict[str, tuple[datetime, int]] = {}
        #: reason of a statement that could not be written (None: nothing owed)
        self.owed: str | None = None
        self._tte_dirty = False
        self._shares: tuple[str, dict[str, str]] | None = None  # (rule set digest, attest.shares)
        prev = attest.last(self.export_dir) if self.export_dir else None
        self._seq = prev[0] if prev else 0
        self._previous_sha256 = prev[1] if prev else None

    @classmethod
    def from_settings(cls, settings: Settings, on_failure: Callable[[str], None] | None = None) -> Accountability | None:
        d = settings.daemon
        if not (d.audit_log or d.attest_dir):
            return None
        key = None
        if d.operator_key:
            raw = read_regular(Path(d.operator_key), 4096, what="minisign secret key")
            key = minisign.parse_secret_key(raw.decode("utf-8", errors="replace"), where=d.operator_key)
        self = cls(settings, None, key, on_failure)
        if d.audit_log:
            self._audit_path = Path(d.audit_log)
            self._open_audit()  # a log that cannot be opened now (read-only file system) is retried
        return self

    def _open_audit(self) -> bool:
        """Open the audit log if it is configured and not open yet. A damaged chain
        (AuditError) still stops the start: the operator must look before blockd appends."""
        if self.audit is not None or self._audit_path is None:
            return self.audit is not None
        try:
            self.audit = AuditLog.open(self._audit_path, key=self.key)
        except OSError as e:
            self._failed("audit", e, path=str(self._audit_path))
            return False
        return True

    @property
    def behind(self) -> bool:
        """Something could not be written yet: call `retry`."""
        return bool(self._queue) or self.owed is not None or self._tte_dirty or (
            self.audit is not None and self.audit.head_stale is not None) or (
            self.audit is None and self._audit_path is not None)

    # -- writes that may fail -----------------------------------------------------------------
    def _failed(self, kind: str, error: OSError, **fields: Any) -> None:
        self.on_failure(kind)
        first, n = self._outage.get(kind, (datetime.now(timezone.utc), 0))
        self._outage[kind] = (first, n + 1)
        if n == 0:  # once per outage; the metric counts every failure
            log.error("accountability_write_failed", kind=kind, errno=error.errno,
                      error=f"{error.strerror or error}: {error.filename or ''}".rstrip(": "),
                      hint="enforcement continues; the write is retried", **fields)

    def _recovered(self, kind: str) -> None:
        outage = self._outage.pop(kind, None)
        if outage is None:
            return
        since, failures = outage
        log.info("accountability_write_recovered", kind=kind, failures=failures, since=iso(since))
        if self._audit_path is not None:
            self._queue.append(("write_recovered", {"kind": kind, "failures": failures, "since": since,
                                                     "dropped": self._dropped if kind == "audit" else 0},
                                datetime.now(timezone.utc), False))
            if kind == "audit":
                self._dropped = 0

    def event(self, name: str, **fields: Any) -> None:
        if self.audit is None and self._audit_path is None:
            return
        if len(self._queue) >= MAX_QUEUED:
            self._queue.pop(0)
            self._dropped += 1
        self._queue.append((name, fields, datetime.now(timezone.utc), False))
        self._flush()

    def _flush(self) -> None:
        """Append the queued events in order; stop at the first failure (nothing is lost)."""
        if self._audit_path is None:
            self._queue.clear()
            return
        if not self._open_audit():
            self._queue = [(n, f, t, True) for n, f, t, _ in self._queue]
            return
        assert self.audit is not None
        while self._queue:
            name, fields, at, late = self._queue[0]
            try:
                self.audit.append(name, **fields, **({"occurred_at": at} if late else {}))
            except OSError as e:
                self._queue = [(n, f, t, True) for n, f, t, _ in self._queue]
                self._failed("audit", e, audit_event=name)
                return
            self._queue.pop(0)
            if self.audit.head_stale:  # the entry is in the log; its head file is not updated
                self._queue = [(n, f, t, True) for n, f, t, _ in self._queue]
                self._failed("audit", self.audit.head_stale)
                return
            if "audit" in self._outage:
                self._recovered("audit")

    def _save_tte(self) -> None:
        try:
            atomic_write(self._tte_path, json.dumps(tte.to_json(self.enforced), sort_keys=True).encode())
        except OSError as e:
            self._tte_dirty = True
            self._failed("state", e, path=str(self._tte_path))
            return
        self._tte_dirty = False
        self._recovered("state")

    def shares_for(self, ruleset: RuleSet) -> dict[str, str]:
        """`attest.shares(ruleset)`, computed once per rule set (the daemon calls this from a
        worker thread, so a 1M-rule digest never stalls the event loop)."""
        cached = self._shares
        if cached is None or cached[0] != ruleset.digest:
            cached = (ruleset.digest, attest.shares(ruleset))
            self._shares = cached
        return cached[1]

    # -- passes -------------------------------------------------------------------------------
    def after_pass(self, r: PassResult, enforcers: Mapping[str, attest.EnforcerPass], *,
                   statement: bool = True) -> None:
        """Record a pass (receipts, events, time-to-enforce) and state it if it changed what is
        held. With `statement=False` (a later pass is already queued) the statement it calls
        for is owed to the next pass recorded with `statement=True`, which states what is held
        then."""
        now = datetime.now(timezone.utc)
        for p in (*r.policies, *r.pending):
            self.seen.setdefault(p.digest, r.received.get(p.digest, now))
            self.verified.setdefault(p.digest, now)
        for p in r.policies:
            if p.digest not in self._accepted:
                self._accepted.add(p.digest)
                self.event("policy_accepted", issuer=p.issuer, serial=p.serial, sha256=p.digest,
                           orders=len(p.orders), file=Path(p.source).name)
        for rej in r.rejected:
            sha = _sha256(Path(rej.path))
            self._rejected[rej.path] = (sha, now)
            self.event("policy_rejected", file=Path(rej.path).name, reason=rej.reason, error=str(rej.error),
                       sha256=sha)
        if r.changed:
            for name, a in sorted(r.applied.items()):
                self.event("applied", enforcer=name, committed=a.desired_digest, readback=a.digest,
                           readback_scope=a.readback_scope, added=a.added, removed=a.removed, in_sync=a.in_sync)
            for name, error in sorted(r.failed.items()):
                self.event("apply_failed", enforcer=name, error=error)
            for key in r.compilation.unblocks:
                self.event("unblocked", order=key)
        self.record(r, enforcers)
        pending = frozenset(p.digest for p in r.pending)
        # A new pending policy changes no rule, but its receipt is stated at once.
        if r.changed or pending != self._last_pending:
            self._change_owed = True
        if statement and self._change_owed:
            self.attest(r, enforcers, reason="change")
            self._change_owed = False

    def record(self, r: PassResult, enforcers: Mapping[str, attest.EnforcerPass]) -> None:
        """Extend the time-to-enforce record with the enforcers in sync now."""
        synced = {name: (e.at if e.in_sync else None) for name, e in enforcers.items()}
        enforced = tte.record(self.enforced, list(r.policies), r.compilation.orders, synced)
        if enforced != self.enforced or self._tte_dirty:
            self.enforced = enforced
            self._save_tte()

    def attest(self, r: PassResult, enforcers: Mapping[str, attest.EnforcerPass], reason: str,
               drift_repairs: Sequence[Mapping[str, Any]] = ()) -> Path | None:
        """Sign and write a statement of `r` as `enforcers` hold it. On a write failure the
        statement is owed (see `retry`) and None is returned; enforcement is not affected."""
        if self.export_dir is None or self.key is None:
            return None
        now = datetime.now(timezone.utc)
        received = [attest.Received(p, self.seen.get(p.digest, r.received.get(p.digest)), self.verified.get(p.digest))
                    for p in r.policies]
        received += [attest.Received(p, self.seen.get(p.digest), self.verified.get(p.digest), pending=True)
                     for p in r.pending]
        rejected = [attest.RejectedFile(Path(x.path).name, f"{x.reason}: {x.error}", *self._rejected.get(x.path, (None, None)))
                    for x in r.rejected]
        operator = attest.Operator(self.settings.daemon.operator, self.settings.daemon.operator_contact)
        statement = attest.build_statement(
            policies=received, compilation=r.compilation, enforcers=enforcers,
            audit_head=(self.audit.head() if self.audit is not None
                        else None if self._audit_path is not None else Head(0, GENESIS)),
            operator=operator, host=socket.gethostname(), now=now, seq=self._seq + 1,
            enforced=self.enforced, rejected=rejected, previous_sha256=self._previous_sha256, reason=reason,
            parts=self.shares_for(r.compilation.ruleset), drift_repairs=drift_repairs,
        )
        try:
            path, digest = attest.issue(self.export_dir, statement, self.key)
        except OSError as e:
            self.owed = reason if self.owed is None else self.owed
            self._failed("attestation", e, seq=self._seq + 1)
            # The numbered file may have been written before latest.json failed: never reuse its seq.
            try:
                prev = attest.last(self.export_dir)
            except OSError:
                prev = None
            if prev is not None and prev[0] > self._seq:
                self._seq, self._previous_sha256 = prev
            return None
        self._seq += 1
        self._previous_sha256 = digest
        self._last_pending = frozenset(p.digest for p in r.pending)
        self.owed = None
        self._recovered("attestation")
        self.event("attestation_issued", file=path.name, sha256=digest, reason=reason, attestation_seq=self._seq)
        return path

    def retry(self, r: PassResult | None, enforcers: Mapping[str, attest.EnforcerPass]) -> None:
        """Write what earlier failures left behind: queued audit events, the head file, the
        time-to-enforce state, and an owed statement (fresh, with reason `retry`)."""
        if self.audit is not None and self.audit.head_stale is not None:
            try:
                self.audit.retry_head()
            except OSError as e:
                self._failed("audit", e)
        self._flush()
        if self._tte_dirty:
            self._save_tte()
        if self.owed is not None and r is not None:
            self.attest(r, enforcers, reason="retry")
        self._flush()


def _sha256(path: Path) -> str | None:
    """SHA-256 of a refused policy file as it lies there now (None: unreadable or too large)."""
    try:
        if path.stat().st_size > MAX_HASH_BYTES:
            return None
        return hashlib.sha256(path.read_bytes()).hexdigest()
    except OSError:
        return None


def _load_tte(path: Path) -> dict[str, dict[str, datetime]]:
    """First-enforced times survive restarts, so time-to-enforce is not reset by one."""
    try:
        return dict(tte.from_json(json.loads(path.read_bytes()), str(path)))
    except FileNotFoundError:
        return {}
    except (ValueError, BlockdError) as e:
        log.error("tte_state_unreadable", path=str(path), error=str(e))
        return {}
