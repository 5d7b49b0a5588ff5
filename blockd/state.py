"""Replay protection and the last accepted policies, persisted in the state directory.

    state/
      accepted.json                       {issuer: {serial, digest, accepted_at, file}}
      policies/<issuer>/<serial>.yaml     the accepted bytes, with their signatures beside them

Writes are ordered so a crash at any point leaves a consistent state: the policy copy and its
signatures are written (atomically) first, then `accepted.json` is replaced atomically, and
only then are older copies removed. On restart the copies restore the last accepted policies,
so enforcement resumes without waiting for the policy directory.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

from blockd.errors import PolicyError, ReplayError
from blockd.fsutil import atomic_write
from blockd.model import Policy


@dataclass(frozen=True, slots=True)
class Accepted:
    issuer: str
    serial: int
    digest: str
    accepted_at: str
    file: str  # relative to the state directory


class StateStore:
    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self._index = directory / "accepted.json"

    def accepted(self) -> dict[str, Accepted]:
        try:
            raw = json.loads(self._index.read_bytes())
        except FileNotFoundError:
            return {}
        except (OSError, ValueError) as e:
            raise PolicyError(f"state index is unreadable ({e}); restore it from backup", where=str(self._index)) from None
        return {issuer: Accepted(issuer=issuer, **rec) for issuer, rec in raw.items()}

    def check_replay(self, policy: Policy) -> None:
        """Refuse a rollback (lower serial) or a replayed serial with other content."""
        rec = self.accepted().get(policy.issuer)
        if rec is None:
            return
        if policy.serial < rec.serial:
            raise ReplayError(
                f"rollback refused: serial {policy.serial} is lower than serial {rec.serial} of issuer "
                f"{policy.issuer!r} accepted at {rec.accepted_at}; a new policy needs a serial above {rec.serial}",
                where=policy.source,
            )
        if policy.serial == rec.serial and policy.digest != rec.digest:
            raise ReplayError(
                f"serial {policy.serial} of issuer {policy.issuer!r} was accepted with other content "
                f"(sha256 {rec.digest[:16]}…, this file {policy.digest[:16]}…); a changed policy needs serial "
                f"{rec.serial + 1} or higher",
                where=policy.source,
            )

    def record(self, policy: Policy, data: bytes, signatures: list[tuple[str, bytes]], now: datetime) -> Accepted:
        """Persist `policy` (already verified and replay-checked) as its issuer's accepted one."""
        self.check_replay(policy)
        rel = f"policies/{policy.issuer}/{policy.serial}.yaml"
        copy = self.directory / rel
        atomic_write(copy, data)
        for i, (_, sig) in enumerate(signatures):
            atomic_write(copy.with_name(f"{copy.name}.{i}.minisig"), sig)
        index = {k: _as_json(v) for k, v in self.accepted().items()}
        rec = Accepted(policy.issuer, policy.serial, policy.digest, now.strftime("%Y-%m-%dT%H:%M:%SZ"), rel)
        index[policy.issuer] = _as_json(rec)
        atomic_write(self._index, json.dumps(index, indent=2, sort_keys=True).encode() + b"\n")
        for old in copy.parent.iterdir():
            if not old.name.startswith(f"{policy.serial}.yaml"):
                old.unlink()
        return rec

    def accepted_paths(self) -> list[Path]:
        return [self.directory / rec.file for rec in sorted(self.accepted().values(), key=lambda a: a.issuer)]


def _as_json(rec: Accepted) -> dict[str, object]:
    return {"serial": rec.serial, "digest": rec.digest, "accepted_at": rec.accepted_at, "file": rec.file}
