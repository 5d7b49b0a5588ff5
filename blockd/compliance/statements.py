"""Operators' keys and attestation files -> verified, parsed Statements, and what failed.

    load_keys(dir)            one key per operator: `dir/<operator>.pub`, or the trust-store
                              layout `dir/<operator>/*.pub` (issuer.yaml, if any, is ignored)
    collect(root, keys)       every `*.json` under `root` that is, or claims to be, a statement:
                              signature checked with the key its `.minisig` names (so a file
                              lands with its operator wherever it lies), then parsed
    parse(doc, ...)           a verified statement dict -> Statement

This is the only module that knows the statement's JSON layout (docs/attestation.md). It reads
what it needs and ignores fields it does not know, so statements with added fields (per-enforcer
share digests, failed enforcers, pending policies) still read. A value that is there but of the
wrong type is an error naming the field, never a guess.
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from types import MappingProxyType
from typing import Any

from blockd import attest, minisign
from blockd.errors import BlockdError

#: enforcer name -> where it enforces; names not listed are shown as they are
WHERE = {"nft": "kernel", "ipset": "kernel", "dns": "dns", "sinkhole": "dns", "rpz": "rpz", "bgp": "bgp"}
#: the count keys, per place, that are its share of the rule set, in the units its enforcers
#: report them (nft: interval elements, ipset: CIDRs, BGP: prefixes; DNS and RPZ: names).
#: Only keys a statement carries are compared; other places' counts are shown, not compared.
KINDS = {"kernel": ("ipv4_elements", "ipv6_elements", "ipv4_cidrs", "ipv6_cidrs", "ipv4_ranges", "ipv6_ranges"),
         "bgp": ("ipv4_prefixes", "ipv6_prefixes"),
         "dns": ("domain_exact", "domain_subtree"), "rpz": ("domain_exact", "domain_subtree")}


def where_of(enforcer: str) -> str:
    if enforcer in WHERE:
        return WHERE[enforcer]
    head = enforcer.split("-", 1)[0].split("_", 1)[0]
    return WHERE.get(head, enforcer)


@dataclass(frozen=True, slots=True)
class OperatorKey:
    operator: str
    key: minisign.PublicKey
    path: str


@dataclass(frozen=True, slots=True)
class Failure:
    """A file that is not a usable statement, and why. `operator` is None if no key claims it."""

    path: str
    reason: str
    operator: str | None = None


@dataclass(frozen=True, slots=True)
class EnforcerState:
    name: str
    where: str
    in_sync: bool
    failed: bool
    counts: Mapping[str, int]
    readback_digest: str | None


@dataclass(frozen=True, slots=True)
class PolicyClaim:
    name: str
    sha256: str
    issuer: str
    serial: int
    status: str


@dataclass(frozen=True, slots=True)
class OrderClaim:
    key: str
    serial: int
    status: str
    rules: int | None
    enforced_at: Mapping[str, datetime]
    enforced_everywhere_at: datetime | None
    received_at: datetime | None
    deadline_status: str | None


@dataclass(frozen=True, slots=True)
class Statement:
    path: str
    sha256: str  # of the file's bytes, as the next statement's previous_sha256 names it
    operator: str  # who signed it (by key), not the name it gives itself
    operator_name: str  # `predicate.operator.name`
    id: str
    seq: int
    issued_at: datetime
    previous_sha256: str | None
    in_sync: bool
    ruleset_digest: str | None
    enforcers: tuple[EnforcerState, ...]
    policies: tuple[PolicyClaim, ...]
    #: (order key, serial) -> claim
    orders: Mapping[tuple[str, int], OrderClaim] = field(default_factory=lambda: MappingProxyType({}))
    orders_truncated: bool = False


def load_keys(directory: Path) -> tuple[dict[bytes, OperatorKey], list[Failure]]:
    """key id -> OperatorKey, and the key files that could not be used (each refused alone)."""
    if not directory.is_dir():
        raise BlockdError(f"{directory}: operator keys: not a directory; expected <operator>.pub files "
                          "or <operator>/*.pub subdirectories")
    found: list[tuple[str, Path]] = [(p.stem, p) for p in sorted(directory.glob("*.pub")) if p.is_file()]
    for sub in sorted(p for p in directory.iterdir() if p.is_dir()):
        found += [(sub.name, p) for p in sorted(sub.glob("*.pub")) if p.is_file()]
    keys: dict[bytes, OperatorKey] = {}
    bad: list[Failure] = []
    for operator, path in found:
        try:
            key = minisign.parse_public_key(path.read_text(errors="replace"), where=str(path))
        except BlockdError as e:
            bad.append(Failure(str(path), f"operator key unusable: {e}", operator))
            continue
        if key.key_id in keys:
            other = keys[key.key_id]
            bad.append(Failure(str(path), f"key {key.id_hex} is also {other.operator!r}'s ({other.path}); "
                                          "a key belongs to one operator", operator))
            continue
        keys[key.key_id] = OperatorKey(operator, key, str(path))
    if not keys and not bad:
        raise BlockdError(f"{directory}: no operator keys (*.pub or */*.pub)")
    return keys, bad


def collect(root: Path, keys: Mapping[bytes, OperatorKey], *, max_bytes: int = 256 << 20
            ) -> tuple[list[Statement], list[Failure]]:
    """Every statement file under `root`, verified and parsed; the rest as Failures."""
    if not root.is_dir():
        raise BlockdError(f"{root}: statements: not a directory")
    good: list[Statement] = []
    bad: list[Failure] = []
    for path in sorted(p for p in root.rglob("*.json") if p.is_file()):
        where = str(path)
        sig_path = path.with_name(path.name + ".minisig")
        if not sig_path.is_file():
            bad.append(Failure(where, f"no signature: {sig_path.name} is missing beside it"))
            continue
        try:
            if path.stat().st_size > max_bytes:
                raise BlockdError(f"{where}: {path.stat().st_size} bytes; the limit is {max_bytes}")
            sig = minisign.parse_signature(sig_path.read_text(errors="replace"), where=str(sig_path))
        except BlockdError as e:
            bad.append(Failure(where, str(e)))
            continue
        owner = keys.get(sig.key_id)
        if owner is None:
            bad.append(Failure(where, f"signed by key {sig.key_id_hex}, which is no operator's key"))
            continue
        try:
            before = path.read_bytes()
            doc = attest.verify(path, owner.key)
            if path.read_bytes() != before:  # the hash must be of the bytes that verified
                raise BlockdError(f"{where}: changed while it was being verified; check again")
            good.append(parse(doc, path=where, sha256=hashlib.sha256(before).hexdigest(), operator=owner.operator))
        except BlockdError as e:
            bad.append(Failure(where, str(e), owner.operator))
        except (ValueError, TypeError, KeyError) as e:
            bad.append(Failure(where, f"signed, but not a statement blockd can read: {e}", owner.operator))
    return good, bad


# -- parsing: one verified dict -> Statement ------------------------------------------------


def parse(doc: Mapping[str, Any], *, path: str, sha256: str, operator: str) -> Statement:
    """ValueError names the field when a value is missing or of the wrong type."""
    pred = _obj(doc, "predicate")
    att = _obj(pred, "attestation", "predicate")
    enforcers = []
    for name, e in sorted(_obj(pred, "enforcers", "predicate").items()):
        if not isinstance(e, Mapping):
            raise ValueError(f"predicate.enforcers.{name}: expected an object, got {type(e).__name__}")
        failed = e.get("failed") is True or e.get("status") == "failed"
        raw_counts = e.get("counts") if e.get("counts") is not None else {}
        if not isinstance(raw_counts, Mapping):
            raise ValueError(f"predicate.enforcers.{name}.counts: expected an object of kind -> count")
        counts = {k: v for k, v in raw_counts.items() if isinstance(v, int)}
        # `share_digest` is the enforcer's share of the rule set in force (older statements called
        # it `desired_digest`); `readback_digest` what was read back from the backend.
        readback = _opt_str(e.get("readback_digest"))
        desired = _opt_str(e.get("share_digest")) or _opt_str(e.get("desired_digest"))
        # In sync is what the digests say, not only what the flag says: a flag that contradicts
        # them (a bug, or an edited-then-re-signed statement) is not taken as in sync.
        agrees = readback is None or desired is None or readback == desired
        enforcers.append(EnforcerState(name, where_of(name), e.get("in_sync") is True and not failed and agrees,
                                       failed, MappingProxyType(counts), readback))
    policies: list[PolicyClaim] = []
    orders: dict[tuple[str, int], OrderClaim] = {}
    for i, p in enumerate(_list(pred, "policies", "predicate")):
        at = f"predicate.policies[{i}]"
        if not isinstance(p, Mapping):
            raise ValueError(f"{at}: expected an object")
        policies.append(PolicyClaim(str(p.get("name", "")), _str(p, "sha256", at), _str(p, "issuer", at),
                                    _int(p, "serial", at), str(p.get("status", ""))))
        listed = p.get("orders") if p.get("orders") is not None else []
        if not isinstance(listed, list):
            raise ValueError(f"{at}.orders: expected a list")
        for j, o in enumerate(listed):
            oat = f"{at}.orders[{j}]"
            if not isinstance(o, Mapping):
                raise ValueError(f"{oat}: expected an object")
            serial = _int(o, "serial", oat)
            key = _str(o, "key", oat)
            enforced = o.get("enforced_at", {}) if o.get("enforced_at") is not None else {}
            if not isinstance(enforced, Mapping):
                raise ValueError(f"{oat}.enforced_at: expected an object of enforcer -> time")
            orders[(key, serial)] = OrderClaim(
                key, serial, str(o.get("status", "")), o.get("rules") if isinstance(o.get("rules"), int) else None,
                MappingProxyType({n: _time(t, f"{oat}.enforced_at.{n}") for n, t in sorted(enforced.items())}),
                _opt_time(o.get("enforced_everywhere_at"), f"{oat}.enforced_everywhere_at"),
                _opt_time(o.get("received_at"), f"{oat}.received_at"),
                _opt_str(o.get("deadline_status")),
            )
    summary, ruleset, operator_obj = (_opt_obj(pred, k) for k in ("orders", "ruleset", "operator"))
    return Statement(
        path=path, sha256=sha256, operator=operator, operator_name=str(operator_obj.get("name", "")),
        id=_str(att, "id", "predicate.attestation"), seq=_int(att, "seq", "predicate.attestation"),
        issued_at=_time(att.get("issued_at"), "predicate.attestation.issued_at"),
        previous_sha256=_opt_str(att.get("previous_sha256")),
        in_sync=pred.get("in_sync") is True and bool(enforcers) and all(e.in_sync for e in enforcers),
        ruleset_digest=_opt_str(ruleset.get("digest")),
        enforcers=tuple(enforcers), policies=tuple(policies), orders=MappingProxyType(orders),
        orders_truncated=summary.get("truncated") is True,
    )


def _obj(m: Mapping[str, Any], key: str, at: str = "") -> Mapping[str, Any]:
    v = m.get(key)
    if not isinstance(v, Mapping):
        raise ValueError(f"{at + '.' if at else ''}{key}: expected an object, got {type(v).__name__}")
    return v


def _opt_obj(m: Mapping[str, Any], key: str) -> Mapping[str, Any]:
    v = m.get(key)
    return v if isinstance(v, Mapping) else {}


def _list(m: Mapping[str, Any], key: str, at: str) -> list[Any]:
    v = m.get(key)
    if not isinstance(v, list):
        raise ValueError(f"{at}.{key}: expected a list, got {type(v).__name__}")
    return v


def _str(m: Mapping[str, Any], key: str, at: str) -> str:
    v = m.get(key)
    if not isinstance(v, str) or not v:
        raise ValueError(f"{at}.{key}: expected a string, got {v!r}")
    return v


def _int(m: Mapping[str, Any], key: str, at: str) -> int:
    v = m.get(key)
    if not isinstance(v, int) or isinstance(v, bool):
        raise ValueError(f"{at}.{key}: expected an integer, got {v!r}")
    return v


def _opt_str(v: object) -> str | None:
    return v if isinstance(v, str) and v else None


def _time(v: object, at: str) -> datetime:
    if not isinstance(v, str):
        raise ValueError(f"{at}: expected a UTC time like 2026-11-29T12:00:00Z, got {v!r}")
    try:
        t = datetime.fromisoformat(v.replace("Z", "+00:00"))
    except ValueError:
        raise ValueError(f"{at}: expected a UTC time like 2026-11-29T12:00:00Z, got {v!r}") from None
    if t.tzinfo is None:
        raise ValueError(f"{at}: {v!r} has no time zone")
    return t


def _opt_time(v: object, at: str) -> datetime | None:
    return None if v is None else _time(v, at)
