"""Structured DNS errors: does the query ask for them; an order's legal basis -> the JSON for the
EDE EXTRA-TEXT. Checked against draft-ietf-dnsop-structured-dns-error-22 (9 June 2026) and the
working group's editor's copy of 24 June 2026 (the newest full text in reach; the library also
holds -27, but only its front matter could be read). Section numbers are those of -22.

Client signal (§5.1, §5.4): the query's OPT carries the **SDE option**, a new EDNS(0) option
with no OPTION-DATA (OPTION-LENGTH 0; a non-zero length is still the signal, its data is
ignored). Its option code is "TBD" (§9.1: IANA has not assigned one in any text blockd could
read), so the operator sets it (`sde_option_code`, agreed with the clients); unset, no query
signals and every client gets RFC 8914 plain text. The signal of revisions -03 to -19 (an EDE
option with INFO-CODE 0 in the query) is not a signal: without the SDE option the server MUST
NOT assume support (§5.2), so such clients get the plain text.

EXTRA-TEXT (§4, §9.2): a minified I-JSON (RFC 7493) object, names in the draft's example order:

    {"c":[contact URIs],"j":justification,"s":sub-error,"o":organization,"l":language}

- `c` (optional): `sde_contact`, URIs whose scheme is in the Contact URI Schemes registry
  (§9.3): `tel` (RFC 3966) and `mailto` (RFC 6068). (-22 also listed `sips`; the editor's copy
  removed it, so blockd refuses it.) Clients ignore other schemes, so blockd refuses them.
- `j` (optional): the order's plain text (authority, order, reference, URL). Never empty (§4:
  an empty value marks a misbehaving server): a `j` that cannot fit is left out.
- `s` (optional): `sde_sub_error`, a value of the Sub-Error Codes registry (§9.4) applicable to
  `ede_code`. Sub-errors MUST NOT accompany Censored (§5.2), blockd's default EDE 16, and 0 is
  reserved (§6.1), so it is refused for 16 and only 1-6 (Blocked) / 1-4 (Filtered) are allowed.
- `o` (optional): `sde_organization`.
- `l`: `sde_language` (RFC 5646 §2.1 syntax), REQUIRED when `j` or `o` is present (§4),
  absent otherwise. It names the language of `j` and `o`: `j` is blockd's English template
  around the order's own names, so the default is "en".

Size (§4, §5.2): the JSON fits the 400 bytes blockd puts in EXTRA-TEXT (`wire.EDE_TEXT_MAX`),
`j` shortened with "…" (never the JSON cut). Over UDP, when the answer would exceed the
client's EDNS(0) payload size, `j` and `o` are left out first (the compact form: `c`, `s`),
then the EXTRA-TEXT entirely (the EDE INFO-CODE stays), and only then is the answer TC=1.
"""

from __future__ import annotations

import json
import re
import struct

from blockd.dns import wire

MAX_EXTRA = wire.EDE_TEXT_MAX  # bytes of UTF-8: blockd's cap on EXTRA-TEXT
MIN_J = 100  # bytes of EXTRA-TEXT the operator's `o` and `c` must leave for the justification

#: §9.3 Contact URI Schemes (editor's copy of 24 June 2026; -22 also had "sips")
CONTACT_SCHEMES = ("tel", "mailto")
#: §9.4 Sub-Error Codes: number -> (meaning, EDE INFO-CODEs it applies to, of blockd's 15/16/17)
SUB_ERRORS: dict[int, tuple[str, frozenset[int]]] = {
    1: ("Malware", frozenset({15, 17})),
    2: ("Phishing", frozenset({15, 17})),
    3: ("Spam", frozenset({15, 17})),
    4: ("Spyware", frozenset({15, 17})),
    5: ("Network operator policy", frozenset({15})),
    6: ("DNS operator policy", frozenset({15})),
}
EDE_NAMES = {15: "Blocked", 16: "Censored", 17: "Filtered"}
#: RFC 6891 §9 and the IANA EDNS0 Option Codes registry: codes other options hold (0-19 assigned,
#: 20292 Umbrella Ident, 26946 DeviceID, 65535 reserved); the SDE option cannot share one.
_TAKEN_CODES = frozenset(range(0, 20)) | {20292, 26946, 65535}

_HDR = struct.Struct("!HHIH")
_OPT = struct.Struct("!HH")

# RFC 5646 §2.1 Language-Tag (well-formed; case-insensitive)
_ALNUM = "[a-z0-9]"
_LANGTAG = (
    r"(?:[a-z]{2,3}(?:-[a-z]{3}){0,3}|[a-z]{4}|[a-z]{5,8})"  # language ["-" extlang]
    r"(?:-[a-z]{4})?"  # script
    r"(?:-(?:[a-z]{2}|[0-9]{3}))?"  # region
    rf"(?:-(?:{_ALNUM}{{5,8}}|[0-9]{_ALNUM}{{3}}))*"  # variant
    rf"(?:-[0-9a-wyz](?:-{_ALNUM}{{2,8}})+)*"  # extension
    rf"(?:-x(?:-{_ALNUM}{{1,8}})+)?"  # privateuse
)
_PRIVATEUSE = rf"x(?:-{_ALNUM}{{1,8}})+"
_GRANDFATHERED = (
    "en-gb-oed", "i-ami", "i-bnn", "i-default", "i-enochian", "i-hak", "i-klingon", "i-lux", "i-mingo",
    "i-navajo", "i-pwn", "i-tao", "i-tay", "i-tsu", "sgn-be-fr", "sgn-be-nl", "sgn-ch-de", "art-lojban",
    "cel-gaulish", "no-bok", "no-nyn", "zh-guoyu", "zh-hakka", "zh-min", "zh-min-nan", "zh-xiang",
)
_LANG_RE = re.compile(rf"(?:{_LANGTAG}|{_PRIVATEUSE})", re.IGNORECASE | re.ASCII)
# tel: RFC 3966 global number (+digits with visual separators) or a local number with phone-context
_TEL_RE = re.compile(r"tel:(?:\+[0-9().-]*[0-9][0-9().-]*|[0-9a-f*#().-]*[0-9a-f*#][0-9a-f*#().-]*"
                     r"(?=.*;phone-context=))(?:;[a-z0-9-]+(?:=[^\s;]+)?)*", re.IGNORECASE | re.ASCII)
# mailto: RFC 6068: at least one addr-spec (local@domain) before any "?" header part
_MAILTO_RE = re.compile(r"mailto:[^\s?@,]+@[^\s?@,]+(?:,[^\s?@,]+@[^\s?@,]+)*(?:\?\S*)?",
                        re.IGNORECASE | re.ASCII)
# I-JSON (RFC 7493 §2.1): no surrogates, no noncharacters
_NOT_IJSON = re.compile("[\ud800-\udfff\ufdd0-\ufdef\ufffe\uffff" + "".join(
    f"{chr(p + 0xFFFE)}{chr(p + 0xFFFF)}" for p in range(0x10000, 0x110000, 0x10000)) + "]")


def option_needle(code: int | None) -> bytes | None:
    """The option code as it appears on the wire (what `wants` searches for), None when unset."""
    return None if code is None else code.to_bytes(2, "big")


def wants(data: bytes, q: wire.Query, needle: bytes | None) -> bool:
    """True when the query's OPT carries the SDE option (code `needle`, any OPTION-LENGTH)."""
    if needle is None or q.edns < 0 or data.find(needle, q.qend + 4) < 0:  # the hot path
        return False
    code_wanted = int.from_bytes(needle, "big")
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
                    if code == code_wanted:
                        return True  # §5.4: OPTION-DATA of a non-zero length is ignored, not the signal
                    j += 4 + olen
                return False
            i += rdlen
    except (IndexError, struct.error):
        return False
    return False


def problems(ede_code: int, option_code: int | None, organization: str, contact: tuple[str, ...],
             sub_error: int | None, language: str) -> list[str]:
    """What is wrong with the structured-error settings (empty: nothing), each naming the field,
    the bad value and what is valid."""
    bad = []
    if option_code is not None and (not 0 <= option_code <= 65535 or option_code in _TAKEN_CODES):
        bad.append(f"sde_option_code: {option_code!r} is not usable; valid: 20-65534 except 20292 and 26946 "
                   "(the draft's SDE option code is not assigned yet: use the one your clients send, "
                   "e.g. from the local/experimental range 65001-65534)")
    for i, uri in enumerate(contact):
        scheme = uri.split(":", 1)[0].lower() if ":" in uri else ""
        if scheme not in CONTACT_SCHEMES:
            bad.append(f"sde_contact[{i}]: {uri!r} has scheme {scheme or 'none'!r}; valid: "
                       f"{', '.join(s + ':' for s in CONTACT_SCHEMES)} (the draft's Contact URI Schemes registry)")
        elif not (_TEL_RE if scheme == "tel" else _MAILTO_RE).fullmatch(uri):
            bad.append(f"sde_contact[{i}]: {uri!r} is not a {scheme}: URI; valid: e.g. "
                       + ("tel:+84-24-1234-5678 (RFC 3966)" if scheme == "tel" else "mailto:noc@isp.example (RFC 6068)"))
    if sub_error is not None:
        known = SUB_ERRORS.get(sub_error)
        name = EDE_NAMES.get(ede_code, str(ede_code))
        allowed = [n for n, (_, codes) in SUB_ERRORS.items() if ede_code in codes]
        valid = (", ".join(map(str, allowed)) if allowed
                 else "none (sub-errors MUST NOT accompany Censored: unset it, or use ede_code 15 or 17)")
        if known is None:
            bad.append(f"sde_sub_error: {sub_error!r} is not in the draft's Sub-Error Codes registry; "
                       f"valid with ede_code {ede_code} ({name}): {valid}")
        elif ede_code not in known[1]:
            bad.append(f"sde_sub_error: {sub_error} ({known[0]}) does not apply to ede_code {ede_code} ({name}); "
                       f"valid: {valid}")
    if not _LANG_RE.fullmatch(language) and language.lower() not in _GRANDFATHERED:
        bad.append(f"sde_language: {language!r} is not an RFC 5646 language tag; valid: e.g. en, vi, vi-VN")
    for field, value in (("sde_organization", organization), *((f"sde_contact[{i}]", c) for i, c in enumerate(contact))):
        if _NOT_IJSON.search(value) or "\x00" in value:
            bad.append(f"{field}: {value!r} holds a NUL, surrogate or noncharacter, which I-JSON (RFC 7493) forbids")
    if not bad:
        fixed = len(_dump({"c": list(contact), "j": "", "s": sub_error, "o": organization, "l": language}))
        if fixed > MAX_EXTRA - MIN_J:
            bad.append(f"sde_organization and sde_contact take {fixed} bytes of the {MAX_EXTRA} of EXTRA-TEXT; "
                       f"valid: at most {MAX_EXTRA - MIN_J}, leaving {MIN_J} for the order's justification")
    return bad


def _dump(doc: dict[str, object]) -> bytes:
    """Minified I-JSON: names in the draft's order, absent (None/empty) members left out."""
    out = {k: doc[k] for k in ("c", "j", "s", "o", "l") if doc.get(k) not in (None, "", [])}
    return json.dumps(out, ensure_ascii=False, separators=(",", ":")).encode("utf-8")


def extra_text(justification: str, organization: str = "", contact: tuple[str, ...] = (),
               sub_error: int | None = None, lang: str = "en", ede_code: int = 16) -> str:
    """The full JSON, at most MAX_EXTRA bytes of UTF-8: the justification gives way (cut, "…"),
    and is left out rather than sent empty. A sub-error that does not apply to `ede_code` is never
    sent (settings refuse it; this is the last guard)."""
    if sub_error is not None and ede_code not in SUB_ERRORS.get(sub_error, ("", frozenset()))[1]:
        sub_error = None
    j = _NOT_IJSON.sub("\ufffd", justification.replace("\x00", ""))

    def dump(j: str) -> bytes:
        return _dump({"c": list(contact), "j": j, "s": sub_error, "o": organization,
                      "l": lang if (j or organization) else ""})

    raw = dump(j)
    if len(raw) > MAX_EXTRA:  # the longest prefix of j (then "…") that fits, found by bisection
        lo, hi, raw = 0, len(j), dump("")
        while lo < hi:
            mid = (lo + hi + 1) // 2
            cand = dump(j[:mid] + wire.CUT_MARK)
            if len(cand) <= MAX_EXTRA:
                lo, raw = mid, cand
            else:
                hi = mid - 1
    return raw.decode("utf-8")


def compact_text(contact: tuple[str, ...] = (), sub_error: int | None = None, ede_code: int = 16) -> str | None:
    """The JSON without `j` and `o` (§5.2, for a UDP answer the full form would push past the
    client's payload size); None when nothing would be left (then EXTRA-TEXT is left out)."""
    if sub_error is not None and ede_code not in SUB_ERRORS.get(sub_error, ("", frozenset()))[1]:
        sub_error = None
    if not contact and sub_error is None:
        return None
    return _dump({"c": list(contact), "s": sub_error}).decode("utf-8")
