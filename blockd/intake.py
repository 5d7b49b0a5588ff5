"""Files -> verified inputs: trust store, catalog, guards, and the policies that pass intake.

The I/O half of the pipeline (the other half, `compile`, is pure):

    load_context(settings)            trust store -> signed catalog + ASN table -> guards data
    read_policies(paths, ctx, now)    per file: verify signatures -> parse -> replay check ->
                                      time window; bad files are collected, never raised
"""

from __future__ import annotations

from dataclasses import dataclass
from datetime import datetime
from pathlib import Path

from blockd import trust
from blockd.catalog import load_catalog
from blockd.compile import CompileSettings
from blockd.errors import BlockdError, NotYetValidError
from blockd.guards import Guards, default_psl, load_shared_infra
from blockd.model import Catalog, Policy
from blockd.policy import check_window, load_policy
from blockd.settings import Settings
from blockd.state import StateStore


@dataclass(frozen=True, slots=True)
class Context:
    settings: Settings
    store: trust.TrustStore
    catalog: Catalog
    compile: CompileSettings
    state: StateStore


@dataclass(frozen=True, slots=True)
class Rejected:
    path: str
    error: BlockdError

    @property
    def reason(self) -> str:
        """A bounded label for metrics: the error class, e.g. `signature`, `replay`, `expired`."""
        return type(self.error).__name__.removesuffix("Error").lower() or "error"


@dataclass(frozen=True, slots=True)
class Intake:
    accepted: tuple[Policy, ...]  # valid now
    pending: tuple[Policy, ...]  # verified, not_before still ahead (not an error: it takes effect then)
    rejected: tuple[Rejected, ...]


def load_context(settings: Settings) -> Context:
    store = trust.load_trust_store(settings.trust_store)
    catalog = load_catalog(settings.catalog_dir, settings.prefix_table, store)
    g = settings.guards
    guards = Guards(default_psl(), load_shared_infra(settings.shared_infra_dir), g.min_prefix_v4, g.min_prefix_v6)
    compile_settings = CompileSettings(
        guards, g.growth_factor, g.growth_floor, settings.allow_domains, settings.allow_cidrs
    )
    return Context(settings, store, catalog, compile_settings, StateStore(settings.state_dir))


def policy_files(directory: Path) -> list[Path]:
    return sorted(p for p in directory.glob("*.yaml") if p.is_file()) + sorted(
        p for p in directory.glob("*.yml") if p.is_file()
    )


def read_policies(paths: list[Path], ctx: Context, now: datetime) -> Intake:
    accepted: list[Policy] = []
    pending: list[Policy] = []
    rejected: list[Rejected] = []
    for path in paths:
        try:
            policy = load_policy(path, ctx.store, max_bytes=ctx.settings.max_policy_bytes)
            ctx.state.check_replay(policy)
            check_window(policy, now)
        except NotYetValidError:
            pending.append(policy)
            continue
        except BlockdError as e:
            rejected.append(Rejected(str(path), e))
            continue
        accepted.append(policy)
    return Intake(tuple(accepted), tuple(pending), tuple(rejected))
