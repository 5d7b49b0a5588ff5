"""Trust store and k-of-n verification of detached minisign signatures.

Trust store layout (one directory per issuer, as TUF keeps one key set per role):

    trust/
      ru-rkn/
        issuer.yaml        threshold: 2           (required file; threshold default 1)
                           roles: [policy]        (policy and/or catalog; default [policy])
        alice.pub          minisign public keys, any names ending in .pub
        bob.pub
        carol.pub

A file is accepted for a role when at least `threshold` distinct keys of one issuer holding
that role produced valid signatures. Signatures sit beside the file: `F.minisig` and any
`F.<name>.minisig`. Verification works on raw bytes, before anything parses them.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType

from blockd import minisign, strictyaml
from blockd.errors import ConfigError, InputError, Problem, SignatureError
from blockd.fsutil import read_regular
from blockd.schema import Reader

ROLES = ("policy", "catalog")
ISSUER_NAME = r"[a-z0-9][a-z0-9._-]{0,63}"


@dataclass(frozen=True, slots=True)
class Issuer:
    name: str
    threshold: int
    roles: frozenset[str]
    keys: Mapping[bytes, minisign.PublicKey]


@dataclass(frozen=True, slots=True)
class TrustStore:
    issuers: Mapping[str, Issuer]
    #: key id -> issuer name
    owners: Mapping[bytes, str]
    #: files refused while loading (each skipped alone), for the log, metrics and the audit log
    problems: tuple[Problem, ...] = ()
    #: SHA-256 over the keys, thresholds and roles loaded: equal digests, equal trust
    digest: str = ""
    #: issuers left out because a file of theirs is bad (not removed on purpose)
    refused: frozenset[str] = frozenset()


@dataclass(frozen=True, slots=True)
class Verified:
    issuer: str
    signers: tuple[str, ...]  # key ids (hex) with valid signatures


MAX_KEY_BYTES = 4 << 10
#: detached signatures read per file: more is an attack on the verifier, not a k-of-n policy
MAX_SIGNATURES = 64
MAX_ISSUER_BYTES = 64 << 10


def load_trust_store(directory: Path) -> TrustStore:
    """Every issuer directory that is whole; a bad key or issuer file is refused alone.

    A key file that does not parse is skipped (its issuer keeps its other keys). An issuer is
    left out whole (`refused`) when its `issuer.yaml` is missing or bad, or its usable keys
    cannot meet its threshold: guessing a threshold or roles would weaken it. A key listed
    under two issuers belongs to neither (which one signed would be ambiguous). Each refusal is
    in `problems`, for the log, a metric and the audit log; the daemon keeps a refused issuer's
    last good entry (intake.load_context). Only a missing trust store is an error.
    """
    if not directory.is_dir():
        raise ConfigError(f"trust store {str(directory)!r} is not a directory", where=str(directory))
    problems: list[Problem] = []
    refused: set[str] = set()
    found: dict[str, tuple[Path, dict[bytes, minisign.PublicKey]]] = {}
    for sub in sorted(p for p in directory.iterdir() if p.is_dir()):
        if not re.fullmatch(ISSUER_NAME, sub.name):
            problems.append(Problem(str(sub), f"issuer directory name {sub.name!r} must match {ISSUER_NAME}; skipped"))
            continue
        found[sub.name] = (sub, _read_keys(sub, problems))
    listed: dict[bytes, list[str]] = {}
    for name, (_, keys) in found.items():
        for key_id in keys:
            listed.setdefault(key_id, []).append(name)
    issuers: dict[str, Issuer] = {}
    digest = hashlib.sha256()
    for name, (sub, keys) in found.items():
        for key_id in [k for k in keys if len(listed[k]) > 1]:
            others = ", ".join(repr(n) for n in listed[key_id] if n != name)
            problems.append(Problem(str(sub), f"key {keys[key_id].id_hex} is also listed under {others}; it belongs "
                                              f"to neither until one copy is removed"))
            del keys[key_id]
        try:
            issuers[name] = _load_issuer(sub, keys, digest)
        except ValueError as e:  # a parser's own limit: the issuer file is bad all the same
            problems.append(Problem(str(sub / "issuer.yaml"), f"cannot be parsed ({e}); issuer {name!r} refused"))
            refused.add(name)
        except InputError as e:
            problems.append(Problem(e.where or str(sub), f"{e.message}; issuer {name!r} refused"))
            refused.add(name)
    owners = {key_id: name for name, issuer in issuers.items() for key_id in issuer.keys}
    return TrustStore(MappingProxyType(issuers), MappingProxyType(owners), tuple(problems), digest.hexdigest(),
                      frozenset(refused))


def _read_keys(sub: Path, problems: list[Problem]) -> dict[bytes, minisign.PublicKey]:
    keys: dict[bytes, minisign.PublicKey] = {}
    for pub in sorted(sub.glob("*.pub")):
        try:
            raw = read_regular(pub, MAX_KEY_BYTES, what="minisign public key")
            key = minisign.parse_public_key(raw.decode("utf-8", errors="replace"), where=str(pub))
        except InputError as e:
            problems.append(Problem(e.where or str(pub), f"{e.message}; key skipped"))
            continue
        keys.setdefault(key.key_id, key)
    return keys


def _load_issuer(sub: Path, keys: dict[bytes, minisign.PublicKey], digest: hashlib._Hash) -> Issuer:
    meta = sub / "issuer.yaml"
    if not meta.exists():
        raise ConfigError("no issuer.yaml: an issuer states its threshold and roles (e.g. `threshold: 1`, "
                          "`roles: [policy]`)", where=str(meta))
    r = Reader(str(meta))
    raw = read_regular(meta, MAX_ISSUER_BYTES, what="issuer file")
    doc = r.mapping(strictyaml.load(raw, str(meta)), "", 1, optional=("threshold", "roles"))
    threshold, roles = 1, frozenset({"policy"})
    if doc is not None:
        if "threshold" in doc:
            threshold = r.integer(doc["threshold"], "threshold", doc.lines["threshold"], minimum=1) or 1
        if "roles" in doc:
            roles = frozenset(
                x for x in (r.choice(v, p, ln, ROLES) for v, p, ln in r.items(doc["roles"], "roles", doc.lines["roles"])) if x
            )
    r.raise_if_any(ConfigError)
    if not keys:
        raise ConfigError(f"issuer {sub.name!r} has no usable *.pub keys", where=str(sub))
    if threshold > len(keys):
        raise ConfigError(f"threshold {threshold} is more than the {len(keys)} usable key(s) of issuer "
                          f"{sub.name!r}", where=str(meta))
    for key_id, key in sorted(keys.items()):
        digest.update(f"{sub.name}\0{key.id_hex}\0".encode() + key.key)
    digest.update(f"{sub.name}\0{threshold}\0{sorted(roles)}".encode())
    return Issuer(sub.name, threshold, roles, MappingProxyType(dict(keys)))


def signature_paths(path: Path) -> list[Path]:
    """`F.minisig` and `F.*.minisig` beside `F`."""
    found = {path.with_name(path.name + ".minisig")} | set(path.parent.glob(f"{glob_escape(path.name)}.*.minisig"))
    return sorted(p for p in found if p.is_file())


def glob_escape(name: str) -> str:
    return re.sub(r"([*?\[])", r"[\1]", name)


def verify(
    data: bytes,
    signatures: Sequence[tuple[str, str]],
    store: TrustStore,
    *,
    role: str,
    where: str,
) -> Verified:
    """Check `(signature_path, signature_text)` pairs against the store for `role`.

    Returns the one issuer whose threshold is met. Raises SignatureError otherwise, naming
    every signature that failed and why, and how many valid ones each issuer had.
    """
    if not signatures:
        raise SignatureError(
            f"no signature: expected {Path(where).name}.minisig (or {Path(where).name}.<name>.minisig) beside it",
            where=where,
        )
    if len(signatures) > MAX_SIGNATURES:
        raise SignatureError(f"{len(signatures)} signature files; at most {MAX_SIGNATURES} are read (a k-of-n "
                             f"threshold needs n signatures; remove stale ones)", where=where)
    valid: dict[str, set[str]] = {}
    failures: list[str] = []
    prehash: bytes | None = None  # BLAKE2b of the file, once however many signatures there are
    for sig_path, text in signatures:
        try:
            sig = minisign.parse_signature(text, where=sig_path)
            owner = store.owners.get(sig.key_id)
            if owner is None:
                raise SignatureError(f"key {sig.key_id_hex} is not in the trust store", where=sig_path)
            issuer = store.issuers[owner]
            if role not in issuer.roles:
                raise SignatureError(
                    f"key {sig.key_id_hex} belongs to {owner!r}, which may not sign {role} files "
                    f"(roles: {', '.join(sorted(issuer.roles))})",
                    where=sig_path,
                )
            if sig.algorithm == "ED" and prehash is None:
                prehash = hashlib.blake2b(data).digest()
            minisign.verify(data, sig, issuer.keys[sig.key_id], where=sig_path, prehash=prehash)
        except SignatureError as e:
            failures.append(str(e))
            continue
        valid.setdefault(owner, set()).add(sig.key_id_hex)
    met = [name for name, ids in valid.items() if len(ids) >= store.issuers[name].threshold]
    if len(met) == 1:
        return Verified(met[0], tuple(sorted(valid[met[0]])))
    if len(met) > 1:
        raise SignatureError(f"signed by several issuers ({', '.join(sorted(met))}); a file has one issuer", where=where)
    counts = [f"{name}: {len(ids)} of {store.issuers[name].threshold} required" for name, ids in sorted(valid.items())]
    detail = "; ".join(counts + failures) or "no valid signature"
    raise SignatureError(f"signature threshold not met ({detail})", where=where)
