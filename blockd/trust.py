"""Trust store and k-of-n verification of detached minisign signatures.

Trust store layout (one directory per issuer, as TUF keeps one key set per role):

    trust/
      ru-rkn/
        issuer.yaml        threshold: 2           (default 1)
                           roles: [policy]        (policy and/or catalog; default [policy])
        alice.pub          minisign public keys, any names ending in .pub
        bob.pub
        carol.pub

A file is accepted for a role when at least `threshold` distinct keys of one issuer holding
that role produced valid signatures. Signatures sit beside the file: `F.minisig` and any
`F.<name>.minisig`. Verification works on raw bytes, before anything parses them.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import MappingProxyType

from blockd import minisign, strictyaml
from blockd.errors import ConfigError, SignatureError
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


@dataclass(frozen=True, slots=True)
class Verified:
    issuer: str
    signers: tuple[str, ...]  # key ids (hex) with valid signatures


def load_trust_store(directory: Path) -> TrustStore:
    if not directory.is_dir():
        raise ConfigError(f"trust store {str(directory)!r} is not a directory", where=str(directory))
    issuers: dict[str, Issuer] = {}
    owners: dict[bytes, str] = {}
    for sub in sorted(p for p in directory.iterdir() if p.is_dir()):
        where = str(sub)
        if not re.fullmatch(ISSUER_NAME, sub.name):
            raise ConfigError(f"issuer directory name {sub.name!r} must match {ISSUER_NAME}", where=where)
        keys: dict[bytes, minisign.PublicKey] = {}
        for pub in sorted(sub.glob("*.pub")):
            key = minisign.parse_public_key(pub.read_text(), where=str(pub))
            if key.key_id in owners or key.key_id in keys:
                other = owners.get(key.key_id, sub.name)
                raise ConfigError(f"key {key.id_hex} is listed twice (also under {other!r})", where=str(pub))
            keys[key.key_id] = key
            owners[key.key_id] = sub.name
        threshold, roles = 1, frozenset({"policy"})
        meta = sub / "issuer.yaml"
        if meta.exists():
            r = Reader(str(meta))
            doc = r.mapping(strictyaml.load(meta.read_bytes(), str(meta)), "", 1, optional=("threshold", "roles"))
            if doc is not None:
                if "threshold" in doc:
                    threshold = r.integer(doc["threshold"], "threshold", doc.lines["threshold"], minimum=1) or 1
                if "roles" in doc:
                    roles = frozenset(
                        x for x in (r.choice(v, p, ln, ROLES) for v, p, ln in r.items(doc["roles"], "roles", doc.lines["roles"])) if x
                    )
            r.raise_if_any(ConfigError)
        if not keys:
            raise ConfigError(f"issuer {sub.name!r} has no *.pub keys", where=where)
        if threshold > len(keys):
            raise ConfigError(
                f"threshold {threshold} is more than the {len(keys)} key(s) of issuer {sub.name!r}", where=str(meta)
            )
        issuers[sub.name] = Issuer(sub.name, threshold, roles, MappingProxyType(keys))
    return TrustStore(MappingProxyType(issuers), MappingProxyType(owners))


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
    valid: dict[str, set[str]] = {}
    failures: list[str] = []
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
            minisign.verify(data, sig, issuer.keys[sig.key_id], where=sig_path)
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
