"""Domain names as written by people -> the A-label form DNS queries carry.

`normalise('Bücher.DE.')` -> `('xn--bcher-kva.de', False)`; `normalise('*.t.me')` -> `('t.me', True)`.
IDNs go through UTS 46 + IDNA 2008 (`idna`), which is what browsers send: Python's built-in
codec is IDNA 2003 and maps `faß.de` to `fass.de`, a different name.
"""

from __future__ import annotations

import re

import idna

#: A hostname-ish label: letters, digits, hyphen, underscore (real names use `_`), 1–63 chars,
#: no leading or trailing hyphen.
_LABEL = r"(?:[a-z0-9_](?:[a-z0-9_-]{0,61}[a-z0-9_])?)"
_ASCII_NAME = re.compile(rf"{_LABEL}(?:\.{_LABEL})*")
MAX_NAME = 253


class DomainNameError(ValueError):
    """Raised with a message that says what is wrong and what is valid."""


def normalise(text: str) -> tuple[str, bool]:
    """Return `(a_label_name, subtree)`; raise DomainNameError on anything that is not a domain name."""
    name = text.strip()
    subtree = name.startswith("*.")
    if subtree:
        name = name[2:]
    if name.endswith("."):
        name = name[:-1]
    if not name:
        raise DomainNameError("empty name; expected e.g. 'example.org' or '*.example.org'")
    if "*" in name:
        raise DomainNameError("'*' is only allowed as the whole first label ('*.example.org')")
    lowered = name.lower()
    if not lowered.isascii():
        try:
            lowered = idna.encode(name, uts46=True).decode("ascii")
        except idna.IDNAError as e:
            raise DomainNameError(f"not a valid internationalised name ({e})") from None
    if len(lowered) > MAX_NAME:
        raise DomainNameError(f"name is {len(lowered)} characters; the limit is {MAX_NAME}")
    if not _ASCII_NAME.fullmatch(lowered):
        bad = next(
            (lab for lab in lowered.split(".") if not re.fullmatch(_LABEL, lab)), lowered
        )
        raise DomainNameError(
            f"bad label {bad!r}: labels are 1-63 of a-z 0-9 - _ and do not start or end with '-'"
        )
    if lowered.rpartition(".")[2].isdigit():
        raise DomainNameError("looks like an IP address, not a domain name; put addresses in cidrs")
    if lowered.startswith("xn--") or ".xn--" in lowered:
        for label in lowered.split("."):
            if label.startswith("xn--"):
                try:
                    idna.decode(label)
                except idna.IDNAError as e:
                    raise DomainNameError(f"invalid punycode label {label!r} ({e})") from None
    return lowered, subtree


def display(name: str, subtree: bool) -> str:
    return f"*.{name}" if subtree else name


def parents(name: str) -> list[str]:
    """`a.b.c` -> `['a.b.c', 'b.c', 'c']`: the names whose subtree rules cover `name`."""
    labels = name.split(".")
    return [".".join(labels[i:]) for i in range(len(labels))]
