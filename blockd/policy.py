"""Policy file -> verified Policy. The signature is checked on the raw bytes before any parsing.

    read bytes (size-limited) -> trust.verify (k-of-n minisign) -> strictyaml.load -> schema -> Policy

The format is documented in docs/policy-format.md. `check_window` and the replay checks in
`state` are separate steps because a policy whose `not_before` lies ahead is pending, not bad.
"""

from __future__ import annotations

import hashlib
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import TYPE_CHECKING

from blockd import ranges, strictyaml, trust
from blockd.fastyaml import Unsupported
from blockd.errors import ExpiredError, InputError, NotYetValidError, PolicyError, SignatureError
from blockd.fsutil import read_regular
from blockd.model import (
    DNS_ANSWERS, GUARDS, AllowCollateral, Cidr, LegalBasis, Order, Policy, Targets, gc_paused,
)
from blockd.names import display, normalise
from blockd.schema import Reader, join
from blockd.strictyaml import YMap

if TYPE_CHECKING:
    from blockd.fastpolicy import Items, Parsed
    from blockd.parsecache import ParseCache

ORDER_ID = r"[A-Za-z0-9][A-Za-z0-9._:/+-]{0,127}"
SERVICE_NAME = r"[a-z0-9][a-z0-9-]{0,63}"
MAX_POLICY_BYTES = 64 << 20


#: files at least this large have their SHA-256 taken beside the signature check
PARALLEL_HASH_BYTES = 8 << 20
MAX_SIGNATURE_BYTES = 16 << 10  # a minisign signature with a long trusted comment is well under 1 KiB


@dataclass(frozen=True, slots=True)
class SignedFile:
    """Exactly the bytes that were verified: the file and each detached signature beside it.

    The state directory records these, never a second read of the paths (which could have
    been swapped in between and would then fail verification after a restart).
    """

    data: bytes
    signatures: tuple[tuple[str, bytes], ...]  # (signature path, bytes)
    verified: trust.Verified
    #: SHA-256 of `data`, hex, when the reader computed it (a 170 MB registry: 0.3 s each time)
    sha256: str = ""

    @property
    def digest(self) -> str:
        return self.sha256 or hashlib.sha256(self.data).hexdigest()


def read_signed(path: Path, store: trust.TrustStore, *, role: str, max_bytes: int,
                what: str = "policy file", on_read: Callable[[bytes], None] | None = None) -> SignedFile:
    """Read a file and verify its detached signatures; nothing is parsed before this returns.
    `on_read` is given the bytes once read, before they are verified (to write them aside)."""
    where = str(path)
    paths = trust.signature_paths(path)
    if len(paths) > trust.MAX_SIGNATURES:  # before reading any: refusing must stay cheap
        raise SignatureError(f"{len(paths)} signature files; at most {trust.MAX_SIGNATURES} are read", where=where)
    try:
        data = read_regular(path, max_bytes, what=what)
        sigs = tuple((str(p), read_regular(p, MAX_SIGNATURE_BYTES, what="minisign signature")) for p in paths)
    except InputError as e:
        raise PolicyError(e.message, where=e.where) from None
    if on_read is not None:
        on_read(data)
    texts = [(name, raw.decode("utf-8", errors="replace")) for name, raw in sigs]
    if len(data) < PARALLEL_HASH_BYTES:
        return SignedFile(data, sigs, trust.verify(data, texts, store, role=role, where=where))
    # A large file: its SHA-256 (the policy's digest) is taken beside the verify's BLAKE2b (both
    # release the interpreter lock): on two cores the two hashes cost one.
    with ThreadPoolExecutor(max_workers=1) as pool:
        sha = pool.submit(lambda: hashlib.sha256(data).hexdigest())
        verified = trust.verify(data, texts, store, role=role, where=where)
        return SignedFile(data, sigs, verified, sha.result())


def load_policy(path: Path, store: trust.TrustStore, *, max_bytes: int = MAX_POLICY_BYTES) -> Policy:
    return load_signed_policy(path, store, max_bytes=max_bytes)[0]


def load_signed_policy(path: Path, store: trust.TrustStore, *, max_bytes: int = MAX_POLICY_BYTES,
                       parsed: ParseCache | None = None) -> tuple[Policy, SignedFile]:
    """Verify, then parse: the Policy and the exact bytes it was parsed from.

    With `parsed` (the daemon's cache across passes): a file whose identity and signature files
    are unchanged since they were verified, under the same trust store, is not read again
    (`ParseCache.unchanged`); bytes parsed before are not parsed again; a new file whose items
    are mostly those of a file parsed before parses only the items that changed.
    """
    identity = None
    if parsed is not None:
        hit = parsed.unchanged(path, store, max_bytes)
        if hit is not None:
            return hit
        identity = parsed.identity(path)
    signed = read_signed(path, store, role="policy", max_bytes=max_bytes,
                         on_read=parsed.on_read if parsed is not None else None)
    digest = signed.digest
    if parsed is not None:
        same = parsed.same_data(digest)
        if same is not None and same == signed.data:  # one copy of the bytes (a registry: 170 MB)
            signed = SignedFile(same, signed.signatures, signed.verified, digest)
    key = (digest, str(path), signed.verified.signers)
    policy = parsed.same_bytes(key) if parsed is not None else None
    if policy is None:
        result = parse_signed(signed.data, str(path), signers=signed.verified.signers, max_bytes=max_bytes,
                              digest=digest, items=parsed.items if parsed is not None else None)
        policy = result.policy
        if parsed is not None:
            parsed.policies[key] = policy
            if result.items is not None:
                parsed.files[key] = result.items
    if policy.issuer != signed.verified.issuer:
        raise SignatureError(
            f"file says issuer {policy.issuer!r} but is signed by keys of issuer {signed.verified.issuer!r}",
            where=str(path),
        )
    if parsed is not None:
        if identity is not None:
            parsed.verified(path, store, max_bytes, identity, (policy, signed))
        else:  # too new for its identity: the next pass compares its bytes instead of verifying again
            parsed.by_bytes(path, store, max_bytes, policy, signed)
    return policy, signed


def node_limit(max_bytes: int) -> int:
    """YAML nodes a policy may have: 8M, or one per 8 bytes of a larger `max_policy_bytes`
    (a registry of a million orders has about 21M nodes in 171 MB)."""
    return max(strictyaml.MAX_NODES, max_bytes // 8)


def parse_policy(data: bytes, source: str, *, signers: tuple[str, ...] = (),
                 max_bytes: int = MAX_POLICY_BYTES) -> Policy:
    """Pure: bytes -> Policy, reporting every schema problem at once (PolicyError)."""
    return parse_signed(data, source, signers=signers, max_bytes=max_bytes).policy


def parse_signed(data: bytes, source: str, *, signers: tuple[str, ...] = (), max_bytes: int = MAX_POLICY_BYTES,
                 digest: str | None = None, items: Items | None = None) -> Parsed:
    """The fast path when it can decide (`fastpolicy`: the same Policy), else the general one,
    which gives every error with its line. `items` reuses the orders of unchanged items."""
    from blockd import fastpolicy  # it builds on this module's helpers

    if digest is None:
        digest = hashlib.sha256(data).hexdigest()
    if len(data) <= max_bytes:
        try:
            with gc_paused():  # millions of objects and no cycles: collections would only walk them
                return fastpolicy.parse(data, None, source, signers=signers, digest=digest,
                                        max_depth=strictyaml.MAX_DEPTH, max_nodes=node_limit(max_bytes), items=items)
        except Unsupported:
            pass
    return fastpolicy.Parsed(parse_general(data, source, signers=signers, max_bytes=max_bytes, digest=digest))


def parse_general(data: bytes, source: str, *, signers: tuple[str, ...] = (), max_bytes: int = MAX_POLICY_BYTES,
                  digest: str | None = None) -> Policy:
    """The general path: strictyaml (libyaml events) and the schema Reader, every problem at once."""
    try:
        doc = strictyaml.load(data, source, max_bytes=max_bytes, max_nodes=node_limit(max_bytes))
    except InputError as e:
        raise PolicyError(e.message, where=e.where) from None
    r = Reader(source)
    top = r.mapping(
        doc, "", 1,
        required=("issuer", "serial", "issued_at", "not_before", "not_after", "orders"),
        optional=("description",),
    )
    if top is None:
        r.raise_if_any(PolicyError)
        raise AssertionError("unreachable")
    line = top.lines.get
    issuer = r.string(top.get("issuer"), "issuer", line("issuer"), pattern=trust.ISSUER_NAME,
                      hint=f"an issuer name matching {trust.ISSUER_NAME}")
    serial = r.integer(top.get("serial"), "serial", line("serial"), minimum=1)
    issued_at = r.timestamp(top.get("issued_at"), "issued_at", line("issued_at"))
    not_before = r.timestamp(top.get("not_before"), "not_before", line("not_before"))
    not_after = r.timestamp(top.get("not_after"), "not_after", line("not_after"))
    if not_before and not_after and not_before >= not_after:
        r.error("not_after", line("not_after"), f"{not_after:%Y-%m-%dT%H:%M:%SZ} is not after not_before "
                f"{not_before:%Y-%m-%dT%H:%M:%SZ}")
    orders: list[Order] = []
    seen: dict[str, str] = {}
    for item, path, ln in r.items(top.get("orders"), "orders", line("orders")):
        order = _order(r, item, path, ln)
        if order is None:
            continue
        if order.id in seen:
            r.error(join(path, "id"), ln, f"duplicate order id {order.id!r} (also {seen[order.id]})")
            continue
        seen[order.id] = path
        orders.append(order)
    if "orders" in top and not orders and not r.problems:
        r.error("orders", line("orders"), "no orders; a policy needs at least one")
    r.raise_if_any(PolicyError)
    assert issuer and serial and issued_at and not_before and not_after
    return Policy(
        issuer=issuer, serial=serial, issued_at=issued_at, not_before=not_before, not_after=not_after,
        orders=tuple(orders), digest=digest or hashlib.sha256(data).hexdigest(), source=source, signers=signers,
    )


def _order(r: Reader, item: object, path: str, ln: int) -> Order | None:
    m = r.mapping(item, path, ln, required=("id", "legal_basis", "action", "targets"),
                  optional=("deadline", "allow_collateral", "dns_answer"))
    if m is None:
        return None
    line = m.lines.get
    oid = r.string(m.get("id"), join(path, "id"), line("id"), pattern=ORDER_ID, hint=f"an id matching {ORDER_ID}")
    basis = _legal_basis(r, m.get("legal_basis"), join(path, "legal_basis"), line("legal_basis"))
    action = r.choice(m.get("action"), join(path, "action"), line("action"), ("block", "unblock"))
    deadline = r.timestamp(m["deadline"], join(path, "deadline"), line("deadline")) if "deadline" in m else None
    dns_answer = (r.choice(m["dns_answer"], join(path, "dns_answer"), line("dns_answer"), DNS_ANSWERS)
                  if "dns_answer" in m else None)
    targets = _targets(r, m.get("targets"), join(path, "targets"), line("targets"))
    allow = tuple(_allow(r, m.get("allow_collateral"), join(path, "allow_collateral"), line("allow_collateral")))
    if oid is None or basis is None or action is None or targets is None:
        return None
    return Order(oid, basis, action, targets, deadline, allow, dns_answer)  # type: ignore[arg-type]


def _legal_basis(r: Reader, value: object, path: str, ln: int | None) -> LegalBasis | None:
    m = r.mapping(value, path, ln, required=("authority", "reference"), optional=("url",))
    if m is None:
        return None
    authority = r.string(m.get("authority"), join(path, "authority"), m.lines.get("authority"))
    reference = r.string(m.get("reference"), join(path, "reference"), m.lines.get("reference"))
    url = r.optional_string(m.get("url"), join(path, "url"), m.lines.get("url"))
    if authority is None or reference is None:
        return None
    return LegalBasis(authority, reference, url)


def parse_domain(text: str) -> str:
    return display(*normalise(text))


def parse_asn(text: str) -> int:
    digits = text[2:] if text[:2].upper() == "AS" else text
    if not digits.isdigit() or not 1 <= int(digits) <= 4294967295:
        raise ValueError("expected an AS number 1..4294967295 (e.g. 62041 or AS62041)")
    return int(digits)


def targets_of(r: Reader, m: YMap, path: str) -> Targets:
    """The target lists shared by orders and catalog services."""
    line = m.lines.get
    services = [s for s, p, ln in r.items(m.get("services"), join(path, "services"), line("services"))
                if r.string(s, p, ln, pattern=SERVICE_NAME, hint=f"a service name matching {SERVICE_NAME}")]
    domains = r.each(m.get("domains"), join(path, "domains"), line("domains"), parse_domain, "a domain name")
    cidrs: list[Cidr] = r.each(m.get("cidrs"), join(path, "cidrs"), line("cidrs"), ranges.parse_cidr, "an IP prefix")
    asns = r.each(m.get("asns"), join(path, "asns"), line("asns"), parse_asn, "an AS number")
    return Targets(tuple(services), tuple(domains), tuple(cidrs), tuple(asns))  # type: ignore[arg-type]


def _targets(r: Reader, value: object, path: str, ln: int | None) -> Targets | None:
    m = r.mapping(value, path, ln, optional=("services", "domains", "cidrs", "asns"))
    if m is None:
        return None
    before = len(r.problems)
    t = targets_of(r, m, path)
    if not (t.services or t.domains or t.cidrs or t.asns) and len(r.problems) == before:
        r.error(path, ln, "no targets; give at least one of services, domains, cidrs, asns")
    return t


def _allow(r: Reader, value: object, path: str, ln: int | None) -> list[AllowCollateral]:
    out = []
    for item, ipath, iln in r.items(value, path, ln):
        m = r.mapping(item, ipath, iln, required=("rule", "guard", "reason"))
        if m is None:
            continue
        rule = r.string(m.get("rule"), join(ipath, "rule"), m.lines.get("rule"))
        guard = r.choice(m.get("guard"), join(ipath, "guard"), m.lines.get("guard"), GUARDS)
        reason = r.string(m.get("reason"), join(ipath, "reason"), m.lines.get("reason"))
        if rule is not None and rule != "*":
            try:
                rule = canonical_rule(rule)
            except ValueError as e:
                r.error(join(ipath, "rule"), m.lines.get("rule"), f"{rule!r}: {e}; expected a domain, a prefix or '*'")
                rule = None
        if rule is not None and guard is not None and reason is not None:
            out.append(AllowCollateral(rule, guard, reason))
    return out


def canonical_rule(text: str) -> str:
    """A domain or prefix in the one spelling findings use (so allow_collateral matches exactly)."""
    if "/" in text or ":" in text or text.replace(".", "").isdigit():
        return str(ranges.parse_cidr(text))
    return parse_domain(text)


def check_window(policy: Policy, now: datetime) -> None:
    """Raise NotYetValidError or ExpiredError when `now` is outside [not_before, not_after]."""
    fmt = "%Y-%m-%dT%H:%M:%SZ"
    if now < policy.not_before:
        raise NotYetValidError(
            f"not valid yet: not_before is {policy.not_before:{fmt}}, {_span(policy.not_before - now)} "
            f"after now ({now:{fmt}}); it takes effect then",
            where=policy.source,
        )
    if now > policy.not_after:
        raise ExpiredError(
            f"expired: not_after was {policy.not_after:{fmt}}, {_span(now - policy.not_after)} before now "
            f"({now:{fmt}}); ask the issuer for a renewed policy with a higher serial",
            where=policy.source,
        )


def _span(delta: object) -> str:
    seconds = int(delta.total_seconds())  # type: ignore[attr-defined]
    days, rest = divmod(seconds, 86400)
    hours, rest = divmod(rest, 3600)
    minutes = rest // 60
    return f"{days}d {hours}h {minutes}m" if days else f"{hours}h {minutes}m"

