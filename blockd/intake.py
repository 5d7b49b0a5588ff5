"""Files -> verified inputs: trust store, catalog, guards, and the policy files as candidates.

The I/O half of the pipeline (`selection` and `compile` are the pure half):

    load_context(settings, previous)   trust store -> signed catalog + ASN table -> guards data;
                                       a bad file is refused alone: the last good catalog (held,
                                       or the state's copy) stays in use, and the refusal is
                                       returned as an InputFailure for the log, metrics, audit
    read_candidates(paths, ctx)        per file: read (regular, size-checked) -> verify -> parse;
                                       never raises: a bad file becomes an Unreadable; with a
                                       ParseCache, an unchanged file is not read again and a
                                       new one parses only its changed orders (parsecache)
    state_candidates(ctx)              the state's copies of the accepted policies, verified again
"""

from __future__ import annotations

import hashlib
from collections.abc import Mapping
from dataclasses import dataclass, replace
from pathlib import Path
from types import MappingProxyType

from blockd import trust
from blockd.catalog import CatalogFiles, build_catalog, read_catalog_files
from blockd.compile import CompileSettings
from blockd.errors import BlockdError, CatalogError, InputError, PolicyError
from blockd.fsutil import read_regular
from blockd.guards import Guards, default_psl, parse_shared_infra, read_shared_infra
from blockd.model import Catalog
from blockd.parsecache import ParseCache
from blockd.policy import load_signed_policy
from blockd.selection import AcceptedSerial, Candidate, Selection, Unreadable, Verdict
from blockd.settings import Settings
from blockd.state import StateStore

SHARED_INFRA = "shared-infra/"


@dataclass(frozen=True, slots=True)
class Context:
    settings: Settings
    store: trust.TrustStore
    catalog: Catalog
    compile: CompileSettings
    state: StateStore
    #: changes whenever anything a policy's expansion depends on changes (keys, catalog, guards)
    key: str = ""
    #: the files the catalog and guards were built from
    files: CatalogFiles | None = None
    #: "live" (the configured files) or "state copy" (they failed; the last good copy is in use)
    origin: str = "live"


@dataclass(frozen=True, slots=True)
class Rejected:
    """A refused policy file, as passes report it (log, metrics, audit, attestation)."""

    path: str
    error: BlockdError
    #: bounded label: signature, policy, replay, conflict, expand, ...
    reason: str = "error"
    sha256: str | None = None


@dataclass(frozen=True, slots=True)
class InputFailure:
    """A context input refused alone; what was in use before stays in use."""

    input: str  # bounded label: trust_store, catalog
    where: str
    message: str

    def __str__(self) -> str:
        return f"{self.where}: {self.message}" if self.where else self.message


def load_context(settings: Settings, previous: Context | None = None, *, save: bool = True
                 ) -> tuple[Context, list[InputFailure]]:
    """The context to verify and expand policies with, and what was refused building it.

    Raises only when there is nothing to fall back to: no trust store at all, or a catalog that
    fails with neither a previous context nor a state copy. With `save`, a catalog that loads
    cleanly becomes the state's copy (the daemon; the CLI's read-only commands pass False).
    """
    state = previous.state if previous is not None else StateStore(settings.state_dir)
    failures: list[InputFailure] = []
    try:
        store = trust.load_trust_store(settings.trust_store)
    except InputError as e:
        if previous is None:
            raise
        failures.append(InputFailure("trust_store", e.where, f"{e.message}; the trust store loaded before stays in use"))
        store = previous.store
    failures += [InputFailure("trust_store", p.where, p.message) for p in store.problems]
    if previous is not None:
        store = keep_refused_issuers(store, previous.store, failures)
    elif store.refused and state.trust_copy.is_dir():
        # A restart after a bad edit: the refused issuers come from the state's last good copy.
        try:
            store = keep_refused_issuers(store, trust.load_trust_store(state.trust_copy), failures)
        except InputError:
            pass

    files: CatalogFiles | None = None
    try:
        files = read_context_files(settings)
        if previous is not None and previous.files is not None and previous.store.digest == store.digest \
                and previous.files.digest == files.digest and previous.origin == "live":
            return previous, failures  # nothing changed: no re-parse, and the expansions stay cached
        ctx = build_context(settings, store, files, state, "live")
    except CatalogError as e:
        fallback = previous.files if previous is not None and previous.files is not None else state.context_copy()
        origin = "held" if previous is not None and previous.files is not None else "state copy"
        if fallback is None:
            raise
        try:
            ctx = build_context(settings, store, fallback, state, "state copy")
        except CatalogError as e2:
            raise CatalogError(f"{e.message}; and the last good copy fails too: {e2}", where=e.where) from None
        failures.append(InputFailure("catalog", e.where, f"{e.message}; the last good catalog ({origin}) stays in use"))
        return ctx, failures
    try:
        if save:
            state.save_context_copy(files)
    except OSError as e:
        failures.append(InputFailure("state", str(state.directory), f"cannot save the catalog's copy: {e.strerror}"))
    return ctx, failures


def keep_refused_issuers(store: trust.TrustStore, previous: trust.TrustStore,
                         failures: list[InputFailure]) -> trust.TrustStore:
    """An issuer refused for a bad file keeps its last good entry (a bad edit is not a
    revocation); an issuer whose directory or key was removed cleanly is gone, as intended."""
    kept = {name: previous.issuers[name] for name in store.refused if name in previous.issuers}
    if not kept:
        return store
    for name in sorted(kept):
        failures.append(InputFailure("trust_store", name, f"issuer {name!r} is refused; its last good keys, threshold "
                                                          f"and roles stay in use"))
    issuers = {**store.issuers, **kept}
    owners = {key_id: name for name, issuer in issuers.items() for key_id in issuer.keys}
    mark = hashlib.sha256(f"{store.digest}\0kept:{sorted(kept)}\0{previous.digest}".encode()).hexdigest()
    return replace(store, issuers=MappingProxyType(issuers), owners=MappingProxyType(owners), digest=mark)


def unexpandable_accepted(sel: Selection, accepted: Mapping[str, AcceptedSerial]) -> Verdict | None:
    """An accepted policy that the current catalog cannot expand (the catalog is to blame)."""
    digests = {a.digest for a in accepted.values()}
    return next((v for v in sel.with_status("rejected") if v.kind == "expand" and v.digest in digests), None)


def catalog_refusal(v: Verdict, origin: str) -> InputFailure:
    return InputFailure("catalog", v.source, f"the catalog cannot expand the accepted policy (serial {v.serial} "
                                             f"of {v.issuer!r}): {v.reason}; the last good catalog ({origin}) "
                                             f"stays in use")


def context_from_copy(settings: Settings, store: trust.TrustStore, state: StateStore) -> Context | None:
    """The context built from the state's last good catalog copy (None if there is none or it fails)."""
    files = state.context_copy()
    if files is None:
        return None
    try:
        return build_context(settings, store, files, state, "state copy")
    except CatalogError:
        return None


def read_context_files(settings: Settings) -> CatalogFiles:
    files = read_catalog_files(settings.catalog_dir, settings.prefix_table)
    infra = read_shared_infra(settings.shared_infra_dir)
    if not infra:
        return files
    merged, paths = dict(files.files), dict(files.paths)
    for name, (path, data) in infra.items():
        merged[SHARED_INFRA + name], paths[SHARED_INFRA + name] = data, path
    return CatalogFiles(MappingProxyType(merged), MappingProxyType(paths))


def build_context(settings: Settings, store: trust.TrustStore, files: CatalogFiles, state: StateStore,
                  origin: str) -> Context:
    catalog = build_catalog(files, store)
    infra = parse_shared_infra((files.where(n), d) for n, d in sorted(files.files.items()) if n.startswith(SHARED_INFRA))
    if settings.shared_infra_dir is not None and not any(n.startswith(SHARED_INFRA) for n in files.files):
        raise CatalogError("no shared-infrastructure lists (*.txt); the guard would check nothing",
                           where=str(settings.shared_infra_dir))
    g = settings.guards
    guards = Guards(default_psl(), infra, g.min_prefix_v4, g.min_prefix_v6)
    compile_settings = CompileSettings(
        guards, g.growth_factor, g.growth_floor, settings.allow_domains, settings.allow_cidrs
    )
    key = hashlib.sha256(f"{store.digest}\0{files.digest}\0{g!r}".encode()).hexdigest()
    return Context(settings, store, catalog, compile_settings, state, key, files, origin)


def policy_files(directory: Path) -> list[Path]:
    return sorted(p for p in directory.glob("*.yaml") if not p.name.startswith(".")) + sorted(
        p for p in directory.glob("*.yml") if not p.name.startswith(".")
    )


def read_candidates(paths: list[Path], ctx: Context, parsed: ParseCache | None = None
                    ) -> tuple[list[Candidate], list[Unreadable]]:
    candidates: list[Candidate] = []
    unreadable: list[Unreadable] = []
    for path in paths:
        try:
            policy, signed = load_signed_policy(path, ctx.store, max_bytes=ctx.settings.max_policy_bytes,
                                                parsed=parsed)
        except BlockdError as e:
            unreadable.append(Unreadable(str(path), e, _digest_of(path, ctx.settings.max_policy_bytes)))
            continue
        except (ValueError, RecursionError, MemoryError) as e:  # a parser's limit, not ours: still this file alone
            error = PolicyError(f"cannot be parsed ({type(e).__name__}: {str(e)[:200]})", where=str(path))
            unreadable.append(Unreadable(str(path), error, _digest_of(path, ctx.settings.max_policy_bytes)))
            continue
        candidates.append(Candidate(policy, signed))
    return candidates, unreadable


def state_candidates(ctx: Context, parsed: ParseCache | None = None) -> tuple[list[Candidate], list[Unreadable]]:
    """The accepted copies, verified as any file is (a tampered copy is refused, not trusted)."""
    found, bad = read_candidates(ctx.state.accepted_paths(), ctx, parsed)
    return [Candidate(c.policy, c.signed, from_state=True) for c in found], bad


def _digest_of(path: Path, max_bytes: int) -> str | None:
    """SHA-256 of a refused file when it can be read safely (for the attestation's `rejected`)."""
    try:
        return hashlib.sha256(read_regular(path, max_bytes)).hexdigest()
    except InputError:
        return None
