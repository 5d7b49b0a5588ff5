"""The enforcer interface every backend implements (kernel sets, DNS sinkhole, RPZ, BGP).

    enforced(rs)    -> RuleSet   the part of a rule set this backend holds (names, or addresses)
    apply(desired, change=None)
                    -> Applied   whole desired state in, one atomic commit; on failure raise
                                 EnforcerError and keep the old state. With `change` (the plan
                                 from the rule set whose digest is `change.base`), an enforcer
                                 that holds exactly that base commits only the plan and reads
                                 back what it touched; otherwise it diffs against what it holds
    readback()      -> RuleSet   what the backend really holds (no provenance); its digest is
                                 compared with the compiled RuleSet's digest
    aclose()                     release sockets/servers; never removes enforced rules unless
                                 the backend was configured to

`diff` (pure) lives in `blockd.model` so that `blockd plan` can use it without a backend.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

from blockd.model import Applied, Change, Plan, RuleSet, diff

__all__ = ["Change", "Enforcer", "Plan", "diff"]


@runtime_checkable
class Enforcer(Protocol):
    name: str

    def enforced(self, desired: RuleSet) -> RuleSet: ...

    async def apply(self, desired: RuleSet, change: Change | None = None) -> Applied: ...

    async def readback(self) -> RuleSet: ...

    async def aclose(self) -> None: ...
