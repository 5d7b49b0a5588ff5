"""Structured DNS errors (draft-ietf-dnsop-structured-dns-error): the query's OPT -> does the client
understand them; an order's legal basis -> the draft's JSON for the EDE EXTRA-TEXT.

A client signals support with an EDE option in its query: INFO-CODE 0 ("Other") and no
EXTRA-TEXT (OPTION-LENGTH 2), or OPTION-LENGTH 0 (earlier revisions). Then the blocked answer's
EXTRA-TEXT is I-JSON with the draft's short names:

    {"j": justification, "o": organization, "c": [contact URIs], "s": sub-error, "l": language}

`j` is today's plain text (authority, order, reference, URL), `o` and `c` are the operator's
(`SinkholeSettings.sde_organization`, `sde_contact`), `s` only when configured
(`sde_sub_error`: a value of the draft's sub-error registry, none of which is specific to a legal
mandate), `l` the language of `j` and `o`. Other clients keep today's plain text. The JSON
always fits the 400 bytes blockd puts in EXTRA-TEXT: `j` is shortened, never the JSON cut.
"""

from __future__ import annotations

import json
import struct

from blockd.dns import wire

MAX_EXTRA = 400  # bytes: wire.ede_option's cut
_HDR = struct.Struct("!HHIH")
_OPT = struct.Struct("!HH")


def wants(data: bytes, q: wire.Query) -> bool:
    """True when the query's OPT carries the structured-error signal (an EDE option, INFO-CODE 0)."""
    if q.edns < 0 or data.find(b"\x00\x0f", q.qend + 4) < 0:  # no option code 15 anywhere: the hot path
        return False
    try:
        i = q.qend + 4
        for _ in range(int.from_bytes(data[10:12], "big")):
            while True:  # owner name (the OPT's is the root; others are skipped)
                ln = data[i]
                if ln == 0:
                    i += 1
                    break
                if ln >= 0xC0:
                    i += 2
                    break
                i += ln + 1
            rtype, _, _, rdlen = _HDR.unpack_from(data, i)
            i += 10
            if rtype == wire.T_OPT:
                j, end = i, min(i + rdlen, len(data))
                while j + 4 <= end:
                    code, olen = _OPT.unpack_from(data, j)
                    if code == wire.EDE_OPTION and (olen == 0 or data[j + 4 : j + 6] == b"\x00\x00"):
                        return True
                    j += 4 + olen
                return False
            i += rdlen
    except (IndexError, struct.error):
        return False
    return False


def extra_text(justification: str, organization: str = "", contact: tuple[str, ...] = (),
               sub_error: int | None = None, lang: str = "en") -> str:
    """The draft's JSON, at most MAX_EXTRA bytes of UTF-8 (the justification gives way)."""
    doc: dict[str, object] = {"j": justification}
    if organization:
        doc["o"] = organization
    if contact:
        doc["c"] = list(contact)
    if sub_error is not None:
        doc["s"] = sub_error
    doc["l"] = lang
    text = json.dumps(doc, ensure_ascii=False, separators=(",", ":"))
    while len(text.encode("utf-8")) > MAX_EXTRA and doc["j"]:
        j = str(doc["j"])
        doc["j"] = j[: max(len(j) - max(len(text.encode("utf-8")) - MAX_EXTRA, 1) - 1, 0)] + "…"
        if doc["j"] == "…":
            doc["j"] = ""
        text = json.dumps(doc, ensure_ascii=False, separators=(",", ":"))
    return text
