"""What the daemon keeps between passes about policy files, so that a pass costs what changed.

    unchanged(path)   a file whose identity and signature files are as they were when it was
                      verified, under the same trust store: the Policy and bytes of then,
                      without reading or verifying again
    policies          parses by (sha256, file, signers): bytes parsed before, under any name,
                      are not parsed again
    items             the last parse of each file (fastpolicy.Items: its verified bytes, one
                      Order per item): a new serial parses only the items whose bytes changed
    by_bytes(path)    a file verified while too new for its identity, or the state's copy the
                      daemon just wrote of bytes it verified: until its identity can be trusted,
                      a pass compares its bytes (and its signature files' bytes) with those,
                      instead of verifying it again

The identity of a file is (st_dev, st_ino, st_size, st_mtime_ns, st_ctime_ns), of the policy
and of every signature file beside it (their set is part of it). Every write changes ctime
(the kernel sets it; no utime call can set it back), a rename over the file changes the inode,
a new or removed signature changes the set; a different trust store changes its digest. A
file changed within the last RACY_NS (one timestamp tick could hide a second write) is read
again every pass until it is older (git's "racy" rule), compared byte for byte with what was
verified: no later write passes that unless it wrote the same bytes.
"""

from __future__ import annotations

import os
import stat
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path

from blockd import fastpolicy, trust
from blockd.errors import InputError
from blockd.fsutil import read_regular
from blockd.model import Policy
from blockd.policy import MAX_SIGNATURE_BYTES, SignedFile

#: a file changed more recently than this is not trusted to be unchanged by its identity
RACY_NS = 2_000_000_000
Identity = tuple[tuple[str, int, int, int, int, int], ...]
Key = tuple[str, str, tuple[str, ...]]


@dataclass
class ParseCache:
    policies: dict[Key, Policy] = field(default_factory=dict)
    #: per parse kept in `items` for the next serial: its snapshot, to keep them bounded
    files: dict[Key, fastpolicy.Snapshot] = field(default_factory=dict)
    items: fastpolicy.Items = field(default_factory=fastpolicy.Items)
    #: path -> (identity, (trust store digest, max bytes), policy, bytes verified)
    _verified: dict[str, tuple[Identity, tuple[str, int], Policy, SignedFile]] = field(default_factory=dict)
    #: path -> ((trust store digest, max bytes), policy, bytes, where it lay): files known by
    #: their bytes (`by_bytes`); where it lay: (path, device, inode, size) of it and its signature
    #: files then, for a file replaced or resized since (surely changed: not read to be compared)
    _written: dict[str, tuple[tuple[str, int], Policy, SignedFile, tuple[tuple[str, int, int, int], ...] | None]] = \
        field(default_factory=dict)
    racy_ns: int = RACY_NS
    #: called with a file's bytes as soon as they are read, before they are verified (the
    #: daemon begins writing a large file's state copy, renamed into place only if recorded)
    on_read: Callable[[bytes], None] | None = None

    def same_bytes(self, key: Key) -> Policy | None:
        """The Policy parsed from these bytes with these signers, under this file's name: the
        same bytes under another name (the state's copy of a file just accepted, a file renamed)
        are not parsed again."""
        policy = self.policies.get(key)
        if policy is None:
            digest, source, signers = key
            twin = next((p for k, p in self.policies.items() if k[0] == digest and k[2] == signers), None)
            if twin is not None:
                policy = self.policies[key] = replace(twin, source=source)
                files = next((v for k, v in self.files.items() if k[0] == digest and k[2] == signers), None)
                if files is not None:
                    self.files[key] = files
        return policy

    def same_data(self, digest: str) -> bytes | None:
        """The bytes of a file verified before with this SHA-256 (the directory's file and the
        state's copy hold the same bytes: kept once)."""
        return next((e[3].data for e in self._verified.values() if e[2].digest == digest), None)

    def identity(self, path: Path, *, racy: bool = False) -> Identity | None:
        """The identity of a policy file and its signature files; None when it cannot be
        trusted to show a change (not a regular file, or changed just now, unless `racy`)."""
        try:
            paths = [path, *trust.signature_paths(path)]
            stats = [os.stat(p) for p in paths]
        except OSError:
            return None
        if not stat.S_ISREG(stats[0].st_mode):
            return None
        now = time.time_ns()
        if not racy and any(now - max(st.st_mtime_ns, st.st_ctime_ns) < self.racy_ns for st in stats):
            return None
        return tuple((str(p), st.st_dev, st.st_ino, st.st_size, st.st_mtime_ns, st.st_ctime_ns)
                     for p, st in zip(paths, stats))

    def unchanged(self, path: Path, store: trust.TrustStore, max_bytes: int) -> tuple[Policy, SignedFile] | None:
        entry = self._verified.get(str(path))
        if entry is None or entry[1] != (store.digest, max_bytes):
            return self._still_written(path, store, max_bytes)
        # compared as it is now, however new: every write since the identity was taken changed
        # its ctime (an identity is only taken of a file old enough, or of the state's own copy)
        if self.identity(path, racy=True) != entry[0]:
            return None
        return entry[2], entry[3]

    def by_bytes(self, path: Path, store: trust.TrustStore, max_bytes: int, policy: Policy,
                 signed: SignedFile) -> None:
        """`path` (and its signature files) hold `signed`'s verified bytes: a file verified while
        too new for its identity to be trusted, or the state's copy this daemon just wrote.
        Until its identity can be trusted, a pass compares its bytes with these (a read and a
        compare, no verify, no parse)."""
        key = (policy.digest, str(path), signed.verified.signers)
        copy = self.same_bytes(key) or replace(policy, source=str(path))  # keeps the parse for the next serial
        self._written[str(path)] = ((store.digest, max_bytes), copy, signed, _place(self.identity(path, racy=True)))
        self._verified.pop(str(path), None)  # an older verification of this path no longer speaks for it

    def own_copy(self, path: Path, store: trust.TrustStore, max_bytes: int, policy: Policy,
                 signed: SignedFile) -> None:
        """`path` is the state's copy this daemon has just written (and synced) of `signed`'s
        verified bytes: known by the identity it has now, though it is new (the racy rule guards
        against a second write that an identity cannot show; the copy is the daemon's own, in
        its own directory, and it is verified again when a restart restores it). A later change
        of it is seen as of any file."""
        identity = self.identity(path, racy=True)
        if identity is None:
            self.by_bytes(path, store, max_bytes, policy, signed)
            return
        key = (policy.digest, str(path), signed.verified.signers)
        copy = self.same_bytes(key) or replace(policy, source=str(path))
        # the signature files as the state writes them (`StateStore.commit`): <copy>.<i>.minisig
        sigs = tuple((str(path.with_name(f"{path.name}.{i}.minisig")), b) for i, (_, b) in enumerate(signed.signatures))
        if sorted(str(p) for p in trust.signature_paths(path)) != sorted(p for p, _ in sigs):
            self.by_bytes(path, store, max_bytes, policy, signed)
            return
        self._verified[str(path)] = (identity, (store.digest, max_bytes), copy,
                                     SignedFile(signed.data, sigs, signed.verified, signed.sha256))
        self._written.pop(str(path), None)

    def _still_written(self, path: Path, store: trust.TrustStore, max_bytes: int
                       ) -> tuple[Policy, SignedFile] | None:
        w = self._written.get(str(path))
        if w is None or w[0] != (store.digest, max_bytes):
            return None
        _, policy, signed, place = w
        if place is None or _place(self.identity(path, racy=True)) != place:
            self._written.pop(str(path), None)
            return None  # replaced (a new inode) or resized since: changed, read and verified as any file
        before = self.identity(path)
        try:
            sig_paths = trust.signature_paths(path)
            if len(sig_paths) != len(signed.signatures):  # before reading any (refusing stays cheap)
                self._written.pop(str(path), None)
                return None
            data = read_regular(path, max_bytes)
            sigs = [read_regular(p, MAX_SIGNATURE_BYTES, what="minisign signature") for p in sig_paths]
        except (InputError, OSError):
            return None
        if data != signed.data or sorted(sigs) != sorted(b for _, b in signed.signatures):
            self._written.pop(str(path), None)
            return None  # changed since it was written: read and verified as any file
        result = (policy, SignedFile(signed.data, tuple(zip(map(str, sig_paths), sigs)), signed.verified,
                                     signed.sha256))
        if before is not None and self.identity(path) == before:  # old enough now: by identity from here on
            self._verified[str(path)] = (before, (store.digest, max_bytes), *result)
            self._written.pop(str(path), None)
        return result

    def verified(self, path: Path, store: trust.TrustStore, max_bytes: int, before: Identity,
                 result: tuple[Policy, SignedFile]) -> None:
        """Record a file verified and parsed, under the identity taken before it was read, if
        it still has it (a file replaced while being read is read again next pass)."""
        if self.identity(path) == before:
            self._verified[str(path)] = (before, (store.digest, max_bytes), *result)
            self._written.pop(str(path), None)
        else:
            self._verified.pop(str(path), None)

    def forget_identities(self) -> None:
        """Read and verify every file again on the next pass."""
        self._verified.clear()
        self._written.clear()

    def retain(self, present: set[tuple[str, str]]) -> None:
        """Keep only what belongs to files still present: (sha256, path) pairs."""
        self.policies = {k: p for k, p in self.policies.items() if (k[0], k[1]) in present}
        self.files = {k: v for k, v in self.files.items() if k in self.policies}
        self._verified = {path: e for path, e in self._verified.items() if (e[2].digest, path) in present}
        self._written = {path: w for path, w in self._written.items() if (w[1].digest, path) in present}
        self.items.keep(list(self.files.values()))


def _place(identity: Identity | None) -> tuple[tuple[str, int, int, int], ...] | None:
    """Where a file and its signature files lie: (path, device, inode, size) of each. A file
    whose place changed has surely changed (its timestamps may not show it while it is new)."""
    return None if identity is None else tuple(i[:4] for i in identity)
