"""The blockd error tree.

    BlockdError                      anything blockd refuses, with a message fit for an operator
    ├── InputError                   a file or value that is wrong: says what, where, the bad value, what is valid
    │   ├── SignatureError           missing, malformed or untrusted signature; threshold not met
    │   ├── PolicyError              policy text: encoding, YAML, schema, time window, replay
    │   │   ├── NotYetValidError     `now` is before `not_before` (the policy is pending, not bad)
    │   │   ├── ExpiredError         `now` is after `not_after`
    │   │   └── ReplayError          lower serial than accepted (rollback) or same serial, other bytes
    │   ├── CatalogError             service catalog, prefix table or shared-infrastructure data
    │   ├── ConfigError              daemon settings
    │   └── AuditError               the audit log's hash chain is broken (audit.py: names the line)
    └── EnforcerError                a kernel or DNS backend could not apply or read back;
                                     the previous state is still in force

`raise_problems` reports every error of one pass together.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from dataclasses import dataclass


class BlockdError(Exception):
    """Base of every error blockd raises on purpose."""


class InputError(BlockdError):
    """Bad input. `where` is `file` or `file:line` plus a path such as `orders[2].targets.cidrs[5]`."""

    def __init__(self, message: str, *, where: str = "", problems: Sequence[Problem] = ()) -> None:
        self.where = where
        self.message = message
        self.problems = tuple(problems)
        super().__init__(f"{where}: {message}" if where else message)


class SignatureError(InputError):
    pass


class PolicyError(InputError):
    pass


class NotYetValidError(PolicyError):
    pass


class ExpiredError(PolicyError):
    pass


class ReplayError(PolicyError):
    pass


class CatalogError(InputError):
    pass


class ConfigError(InputError):
    pass


class EnforcerError(BlockdError):
    """An enforcer failed; `enforcer` names it. The state it held before the call is unchanged."""

    def __init__(self, enforcer: str, message: str, *, errno: int | None = None) -> None:
        self.enforcer = enforcer
        self.errno = errno
        super().__init__(f"{enforcer}: {message}")


@dataclass(frozen=True, slots=True)
class Problem:
    where: str
    message: str

    def __str__(self) -> str:
        return f"{self.where}: {self.message}" if self.where else self.message


def raise_problems(problems: Iterable[Problem], kind: type[InputError] = InputError) -> None:
    """Raise `kind` for the problems found in one pass (all of them at once); nothing if none."""
    found = list(problems)
    if len(found) == 1:
        raise kind(found[0].message, where=found[0].where)
    if found:
        lines = "\n".join(f"  {p}" for p in found)
        raise kind(f"{len(found)} problem(s):\n{lines}", problems=found)
