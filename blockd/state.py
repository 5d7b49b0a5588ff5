"""Replay protection and the last accepted policies, persisted in the state directory.

    state/
      accepted.json                       {issuer: {serial, digest, accepted_at, file}}
      policies/<issuer>/<serial>.yaml     the accepted bytes, with their signatures beside them
      lock                                who holds the flock on this directory (the daemon, `accept`)
      baseline.json                       size and orders of the last rule set (growth guard)
      trust/<issuer>/                     the last trust store that verified the accepted policies
      context/manifest.json, <sha256>     the last catalog, prefix table and shared-infra
                                          files that loaded cleanly (used when the live ones fail)

Writes are ordered so a crash at any point leaves a consistent state: the policy copy and its
signatures are written (atomically) first, then `accepted.json` is replaced atomically, and
only then are older copies removed. A large file's copy is written ahead, under a temporary
name in `staging/`, from the moment its bytes are read, while the pass verifies, parses and
merges them (`stage`): the commit of those bytes (verified ones) only renames it into place;
a staged copy that is never committed is removed. On restart the copies restore the last
accepted policies, so enforcement resumes without waiting for the policy directory.
"""

from __future__ import annotations

import fcntl
import hashlib
import json
import os
import shutil
from collections.abc import Iterable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from types import MappingProxyType

import structlog

from blockd.catalog import CatalogFiles
from blockd.compile import Baseline
from blockd.errors import PolicyError, ReplayError
from blockd.fsutil import atomic_write, fsync_dir
from blockd.model import Policy
from blockd.policy import SignedFile
from blockd.selection import AcceptedSerial

log = structlog.get_logger("blockd.state")

#: a copy at least this large is written ahead of its commit (`StateStore.stage`)
STAGE_BYTES = 4 << 20
#: the staged writes, one at a time (they are disk-bound; the pass is CPU-bound meanwhile)
_stager = ThreadPoolExecutor(max_workers=1, thread_name_prefix="blockd-stage")


@dataclass(frozen=True, slots=True)
class Accepted:
    issuer: str
    serial: int
    digest: str
    accepted_at: str
    file: str  # relative to the state directory


class StateLockedError(PolicyError):
    pass


class StateLock:
    def __init__(self, fd: int) -> None:
        self._fd: int | None = fd

    def close(self) -> None:
        if self._fd is not None:
            os.close(self._fd)  # closing the descriptor releases the flock
            self._fd = None

    def __enter__(self) -> StateLock:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class StateStore:
    def __init__(self, directory: Path) -> None:
        self.directory = directory
        self._index = directory / "accepted.json"
        self._baseline = directory / "baseline.json"
        self._warned = False
        #: copies written ahead (`stage`): (the bytes, the temporary name, its write)
        self._staged: list[tuple[bytes, Path, Future[None]]] = []
        self._stage_seq = 0

    def accepted(self) -> dict[str, Accepted]:
        """The index; if it is unreadable or malformed, rebuilt (in memory) from the copies.

        Every copy is verified again when it is used, and a commit removes older copies, so
        the copy under `policies/<issuer>/` is the accepted one: losing the index (a torn disk,
        a bad edit) costs neither the restore nor the replay protection.
        """
        try:
            raw = json.loads(self._index.read_bytes())
            return {issuer: _parse_accepted(issuer, rec) for issuer, rec in _mapping(raw).items()}
        except FileNotFoundError:
            return {}
        except (OSError, ValueError, TypeError, KeyError) as e:
            rebuilt = self._rebuild()
            if not self._warned:
                self._warned = True
                log.error("state_index_unreadable", path=str(self._index), error=str(e),
                          rebuilt={a.issuer: a.serial for a in rebuilt.values()},
                          note="using the policy copies in the state directory; the next commit rewrites it")
            return rebuilt

    def _rebuild(self) -> dict[str, Accepted]:
        out: dict[str, Accepted] = {}
        for sub in sorted((self.directory / "policies").glob("*")):
            copies = [(int(c.stem), c) for c in sub.glob("*.yaml") if c.stem.isdigit() and c.is_file()]
            if not copies:
                continue
            serial, copy = max(copies)
            data = copy.read_bytes()
            when = datetime.fromtimestamp(copy.stat().st_mtime, timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")
            out[sub.name] = Accepted(sub.name, serial, hashlib.sha256(data).hexdigest(), when,
                                     str(copy.relative_to(self.directory)))
        return out

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

    def lock(self, holder: str = "blockd run") -> StateLock:
        """Hold the state directory alone (flock on the directory itself) until the lock is closed.

        The daemon holds it for its life; `accept` for its commit. A second holder gets a
        StateLockedError naming the first one, and nothing is written by it. Locking needs no
        write: a full or read-only state directory can still be locked (and served from).
        """
        self.directory.mkdir(parents=True, exist_ok=True)
        fd = os.open(self.directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            try:
                who = (self.directory / "lock").read_text(errors="replace").strip() or "another process"
            except OSError:
                who = "another process"
            raise StateLockedError(f"the state directory is held by {who}; only one blockd may use it (a second "
                                   f"daemon would drive the same kernel table and state); stop it first",
                                   where=str(self.directory)) from None
        for orphan in self.directory.glob("staging/*.tmp"):  # written ahead by a holder that died
            try:
                orphan.unlink(missing_ok=True)
            except OSError:
                pass  # a read-only state: a later holder removes it
        try:
            atomic_write(self.directory / "lock", f"{holder} (pid {os.getpid()})\n".encode())
        except OSError as e:  # who holds it is a courtesy; the flock is the lock
            log.warning("state_lock_note_failed", path=str(self.directory / "lock"), error=e.strerror)
        return StateLock(fd)

    def accepted_serials(self) -> dict[str, AcceptedSerial]:
        return {issuer: AcceptedSerial(a.serial, a.digest) for issuer, a in self.accepted().items()}

    def record(self, policy: Policy, signed: SignedFile, now: datetime) -> Accepted:
        """Persist one policy as its issuer's accepted one (see `commit`)."""
        return self.commit([(policy, signed)], now)[0]

    def commit(self, entries: Sequence[tuple[Policy, SignedFile]], now: datetime) -> list[Accepted]:
        """Persist policies (verified, selected) as accepted, all or none.

        Each entry's bytes must be the ones its digest was taken from: the state never
        stores anything but what was verified. Everything is checked before anything is
        written; the copies are written first, then `accepted.json` is replaced once (the
        commit point), then older copies are removed.
        """
        index = self.accepted()
        records: list[tuple[Accepted, Path, SignedFile]] = []
        for policy, signed in entries:
            if signed.digest != policy.digest:
                raise PolicyError(f"the bytes to record (sha256 {signed.digest[:16]}…) are not the verified ones "
                                  f"({policy.digest[:16]}…); nothing recorded", where=policy.source)
            self.check_replay(policy)
            rel = f"policies/{policy.issuer}/{policy.serial}.yaml"
            rec = Accepted(policy.issuer, policy.serial, policy.digest, now.strftime("%Y-%m-%dT%H:%M:%SZ"), rel)
            records.append((rec, self.directory / rel, signed))
        for rec, copy, signed in records:
            if not self._place_staged(signed.data, copy):
                atomic_write(copy, signed.data)
            for i, (_, sig) in enumerate(signed.signatures):
                atomic_write(copy.with_name(f"{copy.name}.{i}.minisig"), sig)
        for rec, _, _ in records:
            index[rec.issuer] = rec
        if records:
            data = {k: _as_json(v) for k, v in sorted(index.items())}
            atomic_write(self._index, json.dumps(data, indent=2, sort_keys=True).encode() + b"\n")
        for rec, copy, signed in records:
            keep = {copy.name} | {f"{copy.name}.{i}.minisig" for i in range(len(signed.signatures))}
            for old in copy.parent.iterdir():
                if old.name not in keep:
                    old.unlink()
        return [rec for rec, _, _ in records]

    def stage(self, data: bytes) -> None:
        """Begin writing a copy of a large policy file's bytes, as soon as they are read: in a
        worker thread (the write and its fsync release the interpreter lock, so a 170 MB
        registry is on disk by the time the pass has verified, parsed, prepared and merged
        it, instead of after) and under a temporary name in `staging/`. Nothing is accepted
        by this: `commit` renames the copy into place only for bytes it records, which are
        verified ones; the rest are removed (`discard_staged`)."""
        if len(data) < STAGE_BYTES or any(d is data for d, _, _ in self._staged):
            return
        self._stage_seq += 1
        tmp = self.directory / "staging" / f"{os.getpid()}-{self._stage_seq}.tmp"
        self._staged.append((data, tmp, _stager.submit(_write_synced, tmp, data)))

    def discard_staged(self, keep: Iterable[bytes] = ()) -> None:
        """Remove the staged copies, but those of the bytes in `keep` (a serial that may still
        come into force: pending)."""
        held = list(keep)
        for entry in list(self._staged):
            data, tmp, write = entry
            if not any(data is k for k in held):
                self._staged.remove(entry)
                # not waited for (the pass goes on): removed once written, or never begun
                if not write.cancel():
                    write.add_done_callback(lambda _, tmp=tmp: tmp.unlink(missing_ok=True))

    def _place_staged(self, data: bytes, copy: Path) -> bool:
        """Rename the staged copy of `data` to `copy` once its write is done (True), or return
        False (none, or its write failed: `commit` writes the copy itself)."""
        entry = next((e for e in self._staged if e[0] is data), None) or \
            next((e for e in self._staged if len(e[0]) == len(data) and e[0] == data), None)
        if entry is None:
            return False
        self._staged.remove(entry)
        _, tmp, write = entry
        if write.exception() is not None:
            tmp.unlink(missing_ok=True)
            return False
        copy.parent.mkdir(parents=True, exist_ok=True)
        os.replace(tmp, copy)
        fsync_dir(copy.parent)
        fsync_dir(tmp.parent)
        return True

    # -- the growth guard's baseline ------------------------------------------------------
    def baseline(self) -> Baseline | None:
        """The size and orders of the last rule set applied (None before the first one)."""
        try:
            raw = json.loads(self._baseline.read_bytes())
            return Baseline(int(raw["size"]), frozenset(str(o) for o in raw["orders"]))
        except FileNotFoundError:
            return None
        except (OSError, ValueError, KeyError, TypeError) as e:
            log.warning("baseline_unreadable", path=str(self._baseline), error=str(e))
            return None

    def save_baseline(self, baseline: Baseline) -> None:
        if baseline == self.baseline():
            return
        data = {"size": baseline.size, "orders": sorted(baseline.orders)}
        atomic_write(self._baseline, json.dumps(data, separators=(",", ":")).encode() + b"\n")

    # -- the last good trust store ---------------------------------------------------------
    @property
    def trust_copy(self) -> Path:
        return self.directory / "trust"

    def save_trust_copy(self, source: Path, digest: str) -> None:
        """Copy the trust store (its issuer directories: keys and issuer.yaml) beside the state,
        for a restart after a bad edit of the live one. Replaced whole: the copy is written aside
        and swapped in by rename; `digest` marks what it holds (unchanged: nothing is written)."""
        mark = self.trust_copy / ".digest"
        try:
            if mark.read_text() == digest:
                return
        except OSError:
            pass
        new, old = self.directory / ".trust.new", self.directory / ".trust.old"
        for leftover in (new, old):
            shutil.rmtree(leftover, ignore_errors=True)
        for sub in sorted(p for p in source.iterdir() if p.is_dir()):
            for f in sorted(sub.iterdir()):
                if f.is_file() and (f.suffix == ".pub" or f.name == "issuer.yaml"):
                    atomic_write(new / sub.name / f.name, f.read_bytes())
        atomic_write(new / ".digest", digest.encode())
        if self.trust_copy.exists():
            os.rename(self.trust_copy, old)
        os.rename(new, self.trust_copy)
        shutil.rmtree(old, ignore_errors=True)

    # -- the last good catalog ------------------------------------------------------------
    def context_copy(self) -> CatalogFiles | None:
        """The catalog, prefix table and shared-infrastructure files last loaded cleanly.

        Stored content-addressed (`context/<sha256>`) under a manifest replaced atomically,
        so a crash while saving leaves the previous copy whole. Still verified on use.
        """
        directory = self.directory / "context"
        try:
            manifest = json.loads((directory / "manifest.json").read_bytes())
            files, paths = {}, {}
            for name, digest in manifest["files"].items():
                blob = directory / digest
                data = blob.read_bytes()
                if hashlib.sha256(data).hexdigest() != digest:
                    raise ValueError(f"{blob} does not match its digest")
                files[name], paths[name] = data, f"{blob} (state copy of {name})"
        except FileNotFoundError:
            return None
        except (OSError, ValueError, KeyError, TypeError, AttributeError) as e:
            log.warning("context_copy_unreadable", path=str(directory), error=str(e))
            return None
        paths[""] = f"{directory} (state copy)"
        return CatalogFiles(MappingProxyType(files), MappingProxyType(paths))

    def save_context_copy(self, files: CatalogFiles) -> None:
        directory = self.directory / "context"
        current = self.context_copy()
        if current is not None and current.digest == files.digest:
            return
        manifest = {}
        for name, data in sorted(files.files.items()):
            digest = hashlib.sha256(data).hexdigest()
            if not (directory / digest).exists():
                atomic_write(directory / digest, data)
            manifest[name] = digest
        atomic_write(directory / "manifest.json", json.dumps({"files": manifest}, indent=1).encode() + b"\n")
        for blob in directory.iterdir():
            if blob.name != "manifest.json" and blob.name not in manifest.values() and not blob.name.startswith("."):
                blob.unlink()

    def accepted_paths(self) -> list[Path]:
        return [self.directory / rec.file for rec in sorted(self.accepted().values(), key=lambda a: a.issuer)]


def _mapping(raw: object) -> dict[str, object]:
    if not isinstance(raw, dict):
        raise ValueError(f"expected an object of issuer -> record, got {type(raw).__name__}")
    return raw


def _parse_accepted(issuer: str, rec: object) -> Accepted:
    if not isinstance(rec, dict):
        raise ValueError(f"{issuer}: expected a record, got {type(rec).__name__}")
    a = Accepted(issuer=issuer, serial=rec["serial"], digest=rec["digest"], accepted_at=rec["accepted_at"],
                 file=rec["file"])
    if not isinstance(a.serial, int) or isinstance(a.serial, bool) or not all(
            isinstance(x, str) for x in (a.digest, a.accepted_at, a.file)) or ".." in Path(a.file).parts:
        raise ValueError(f"{issuer}: malformed record {rec!r}")
    return a


def _as_json(rec: Accepted) -> dict[str, object]:
    return {"serial": rec.serial, "digest": rec.digest, "accepted_at": rec.accepted_at, "file": rec.file}


def _write_synced(path: Path, data: bytes) -> None:
    """`data` in `path` (created or truncated), on disk when this returns."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, 0o600)
    try:
        os.fchmod(fd, 0o644)  # as atomic_write
        view = memoryview(data)
        while view:
            view = view[os.write(fd, view):]
        os.fsync(fd)
    except BaseException:
        os.close(fd)
        path.unlink(missing_ok=True)
        raise
    os.close(fd)
