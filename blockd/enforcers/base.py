"""The enforcer interface every backend implements (kernel sets, DNS sinkhole, RPZ, BGP).

    enforced(rs)    -> RuleSet   the part of a rule set this backend holds (names, or addresses)
    apply(desired)  -> Applied   whole desired state in, diff against what is held, one atomic
                                 commit; on failure raise EnforcerError and keep the old state
    readback()      -> RuleSet   what the backend really holds (no provenance); its digest is
                                 compared with the compiled RuleSet's digest
    aclose()                     release sockets/servers; never removes enforced rules unless
                                 the backend was configured to

`diff` (pure) lives in `blockd.model` so that `blockd plan` can use it without a backend.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

from blockd.model import Applied, Plan, RuleSet, diff

__all__ = ["Enforcer", "Plan", "diff"]


@runtime_checkable
class Enforcer(Protocol):
    name: str

    def enforced(self, desired: RuleSet) -> RuleSet: ...

    async def apply(self, desired: RuleSet) -> Applied: ...

    async def readback(self) -> RuleSet: ...

    async def aclose(self) -> None: ...
