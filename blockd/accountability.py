"""The daemon's accountability: pass results -> audit log entries and signed attestations.

    after_pass(result)   audit: policy_accepted / policy_rejected / applied / unblocked;
                         time-to-enforce record; an attestation when anything changed
    attest(result)       build (pure, `attest.build_statement`) -> sign (operator key) -> write
    event(name, ...)     any other audit entry (drift_repaired, ...)

Enabled by `daemon.audit_log` and/or `daemon.attest_dir` (+ `daemon.operator_key`).
"""

from __future__ import annotations

import json
import socket
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

import structlog

from blockd import attest, minisign, tte
from blockd.audit import GENESIS, AuditLog, Head
from blockd.errors import BlockdError
from blockd.fsutil import atomic_write
from blockd.reconcile import PassResult
from blockd.settings import Settings

log = structlog.get_logger("blockd.accountability")


class Accountability:
    def __init__(self, settings: Settings, audit: AuditLog | None, key: minisign.SecretKey | None) -> None:
        self.settings = settings
        self.audit = audit
        self.key = key
        self.export_dir = Path(settings.daemon.attest_dir) if settings.daemon.attest_dir else None
        self._tte_path = settings.state_dir / "time-to-enforce.json"
        self.enforced = _load_tte(self._tte_path)
        self.verified: dict[str, datetime] = {}
        self._accepted: set[str] = set()
        prev = attest.last(self.export_dir) if self.export_dir else None
        self._seq = prev[0] if prev else 0
        self._previous_sha256 = prev[1] if prev else None

    @classmethod
    def from_settings(cls, settings: Settings) -> Accountability | None:
        d = settings.daemon
        if not (d.audit_log or d.attest_dir):
            return None
        key = None
        if d.operator_key:
            key = minisign.parse_secret_key(Path(d.operator_key).read_text(), where=d.operator_key)
        audit = AuditLog.open(Path(d.audit_log), key=key) if d.audit_log else None
        return cls(settings, audit, key)

    def event(self, name: str, **fields: Any) -> None:
        if self.audit is not None:
            self.audit.append(name, **fields)

    def after_pass(self, r: PassResult) -> None:
        now = datetime.now(timezone.utc)
        for p in r.policies:
            self.verified.setdefault(p.digest, now)
            if p.digest not in self._accepted:
                self._accepted.add(p.digest)
                self.event("policy_accepted", issuer=p.issuer, serial=p.serial, sha256=p.digest,
                           orders=len(p.orders), file=Path(p.source).name)
        for rej in r.rejected:
            self.event("policy_rejected", file=Path(rej.path).name, reason=rej.reason, error=str(rej.error))
        if r.changed:
            for name, a in sorted(r.applied.items()):
                self.event("applied", enforcer=name, digest=a.digest, desired=a.desired_digest, added=a.added,
                           removed=a.removed, in_sync=a.in_sync)
            for key, res in sorted(r.compilation.orders.items()):
                if res.status == "unblock":
                    self.event("unblocked", order=key)
        synced = {name: (now if a.in_sync else None) for name, a in r.applied.items()}
        enforced = tte.record(self.enforced, list(r.policies), r.compilation.orders, synced)
        if enforced != self.enforced:
            self.enforced = enforced
            atomic_write(self._tte_path, json.dumps(tte.to_json(enforced), sort_keys=True).encode())
        if r.changed:
            self.attest(r, reason="change")

    def attest(self, r: PassResult, reason: str) -> Path | None:
        if self.export_dir is None or self.key is None:
            return None
        now = datetime.now(timezone.utc)
        self._seq += 1
        received = [attest.Received(p, r.received.get(p.digest), self.verified.get(p.digest)) for p in r.policies]
        rejected = [attest.RejectedFile(Path(x.path).name, f"{x.reason}: {x.error}") for x in r.rejected]
        statement = attest.build_statement(
            policies=received,
            compilation=r.compilation,
            enforcers={n: attest.EnforcerPass(a, now) for n, a in r.applied.items()},
            audit_head=self.audit.head() if self.audit is not None else Head(0, GENESIS),
            operator=attest.Operator(self.settings.daemon.operator),
            host=socket.gethostname(),
            now=now,
            seq=self._seq,
            enforced=self.enforced,
            rejected=rejected,
            previous_sha256=self._previous_sha256,
            reason=reason,
        )
        path, digest = attest.issue(self.export_dir, statement, self.key)
        self._previous_sha256 = digest
        self.event("attestation_issued", file=path.name, sha256=digest, reason=reason)
        return path


def _load_tte(path: Path) -> dict[str, dict[str, datetime]]:
    """First-enforced times survive restarts, so time-to-enforce is not reset by one."""
    try:
        return dict(tte.from_json(json.loads(path.read_bytes()), str(path)))
    except FileNotFoundError:
        return {}
    except (ValueError, BlockdError) as e:
        log.error("tte_state_unreadable", path=str(path), error=str(e))
        return {}
