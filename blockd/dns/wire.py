"""DNS wire format for the hot path: query bytes -> parsed question -> answer bytes.

No dnslib objects here: a blocked query is answered by copying the header id and the question
bytes and appending pre-rendered records (synthetic SOA, sinkhole A/AAAA, OPT with an RFC 8914
Extended DNS Error). Everything a query needs is found in one left-to-right walk (`parse`).

Layout reminders: the header is 12 bytes; the question starts at offset 12, so `0xC00C` (or
`0xC000 | 12 + k`) is a compression pointer to the qname (or to its suffix at label offset k).
"""

from __future__ import annotations

import socket
import struct
from typing import NamedTuple

# RCODEs and the extended RCODE BADVERS (16 = ext-rcode 1 << 4).
NOERROR, FORMERR, SERVFAIL, NXDOMAIN, NOTIMP, REFUSED = 0, 1, 2, 3, 4, 5
T_A, T_NS, T_CNAME, T_SOA, T_TXT, T_AAAA, T_OPT = 1, 2, 5, 6, 16, 28, 41
T_IXFR, T_AXFR, T_TSIG = 251, 252, 250
OPCODE_QUERY, OPCODE_NOTIFY = 0, 4
EDE_OPTION = 15
EDNS_PAYLOAD = 1232  # what we advertise (DNS flag day 2020)

_U16 = struct.Struct("!H")
_U32 = struct.Struct("!I")
_RR = struct.Struct("!HHIH")  # type, class, ttl, rdlength
_COUNTS = struct.Struct("!HHHH")
#: Compression pointers to every possible offset of a qname suffix inside the question.
POINTERS = tuple(_U16.pack(0xC000 | (12 + k)) for k in range(256))


class Query(NamedTuple):
    """The parts of a query the server needs. `edns` is the client's UDP payload size, or -1."""

    qend: int  # offset just past the qname's root label
    qtype: int
    qclass: int
    labels: list[int]  # offset of each label relative to offset 12
    edns: int
    do: bool
    version: int


#: `parse` result for a datagram that must not be answered at all (too short, or a response).
DROP = -1


def parse(data: bytes) -> Query | int:
    """Parse a query: a `Query`, or an int: the rcode to answer (FORMERR/NOTIMP), or DROP.

    Accepted: QR=0, opcode QUERY, exactly one question with an uncompressed qname, no answer or
    authority records, at most one OPT among the additional records (others are skipped).
    No exception is raised or caught here: a flood of junk allocates nothing that is kept
    (a shared exception object raised per packet grows its traceback chain without bound).
    """
    n = len(data)
    if n < 12 or data[2] & 0x80:  # too short to echo an id, or a response: never answer
        return DROP
    if data[2] & 0x78:
        return NOTIMP
    qd, an, ns, ar = _COUNTS.unpack_from(data, 4)
    if qd != 1 or an or ns:
        return FORMERR
    i = 12
    labels = []
    while True:
        if i >= n:
            return FORMERR
        ln = data[i]
        if ln == 0:
            break
        if ln > 63:  # compression pointer or extended label type in a question: refuse
            return FORMERR
        labels.append(i - 12)
        i += ln + 1
    qend = i + 1
    if qend - 12 > 255 or qend + 4 > n:
        return FORMERR
    qtype, qclass = _U32.unpack_from(data, qend)[0] >> 16, _U16.unpack_from(data, qend + 2)[0]
    edns, do, version = -1, False, 0
    pos = qend + 4
    for _ in range(ar):
        if pos >= n:
            return FORMERR
        if data[pos] == 0:
            root = True
            pos += 1
        else:
            root = False
            pos = skip_name(data, pos)
        if pos < 0 or pos + 10 > n:
            return FORMERR
        rtype, rclass, ttl, rdlen = _RR.unpack_from(data, pos)
        pos += 10 + rdlen
        if pos > n:
            return FORMERR
        if rtype == T_OPT:
            if edns != -1 or not root:  # RFC 6891 6.1.1: more than one OPT, or a named OPT
                return FORMERR
            edns = rclass if rclass > 512 else 512
            version = (ttl >> 16) & 0xFF
            do = bool(ttl & 0x8000)
    return Query(qend, qtype, qclass, labels, edns, do, version)


def skip_name(data: bytes, pos: int) -> int:
    """Offset just past the (possibly compressed) name at `pos`, or -1 if it is malformed."""
    n = len(data)
    for _ in range(128):
        if pos >= n:
            return -1
        ln = data[pos]
        if ln == 0:
            return pos + 1
        if ln & 0xC0 == 0xC0:
            return pos + 2 if pos + 2 <= n else -1
        if ln > 63:
            return -1
        pos += ln + 1
    return -1


def read_name(data: bytes, pos: int) -> tuple[bytes, list[int]] | None:
    """The name at `pos` with compression pointers followed: (lowercased uncompressed wire name,
    offset of each label in it), or None if it is malformed (loops, bad labels, > 255 bytes)."""
    n = len(data)
    out = bytearray()
    labels: list[int] = []
    for _ in range(128):  # a bound on labels plus pointers: pointer loops end here
        if pos >= n:
            return None
        ln = data[pos]
        if ln == 0:
            out.append(0)
            return (bytes(out).lower(), labels) if len(out) <= 255 else None
        if ln & 0xC0 == 0xC0:
            if pos + 1 >= n:
                return None
            pos = ((ln & 0x3F) << 8) | data[pos + 1]
            continue
        if ln > 63 or pos + 1 + ln > n:
            return None
        labels.append(len(out))
        out += data[pos : pos + 1 + ln]
        pos += ln + 1
    return None


def name_to_wire(name: str) -> bytes:
    """`'www.example.com'` (A-labels, no trailing dot) -> `b'\\x03www\\x07example\\x03com\\x00'`."""
    if not name:
        return b"\x00"
    return b"".join([_LEN[len(p)] + p for p in name.encode("ascii").split(b".")]) + b"\x00"


_LEN = tuple(bytes((i,)) for i in range(256))


def wire_to_name(wire: bytes) -> str:
    """Inverse of `name_to_wire` for uncompressed names (the table's keys)."""
    out = []
    i = 0
    while wire[i]:
        ln = wire[i]
        out.append(wire[i + 1 : i + 1 + ln])
        i += ln + 1
    return b".".join(out).decode("ascii", "backslashreplace")


#: Cap on EDE EXTRA-TEXT, in UTF-8 bytes (docs/dns.md); longer text is cut and ends in CUT_MARK.
EDE_TEXT_MAX = 400
CUT_MARK = "\u2026"  # "…", 3 bytes in UTF-8


def cap_text(text: str, limit: int = EDE_TEXT_MAX) -> str:
    """`text` without NULs if its UTF-8 form fits in `limit` bytes; else its longest prefix that
    fits together with CUT_MARK, cut on a character boundary, followed by CUT_MARK."""
    text = text.replace("\x00", "")
    raw = text.encode("utf-8")
    if len(raw) <= limit:
        return text
    room = limit - len(CUT_MARK.encode("utf-8"))
    # "ignore" drops only the partial character at the cut: the input was a valid str
    return raw[: max(room, 0)].decode("utf-8", "ignore") + CUT_MARK


def ede_option(code: int, text: str) -> bytes:
    """RFC 8914 option: OPTION-CODE 15, INFO-CODE, EXTRA-TEXT (UTF-8, no NUL, `cap_text`)."""
    body = _U16.pack(code) + cap_text(text).encode("utf-8")
    return _U16.pack(EDE_OPTION) + _U16.pack(len(body)) + body


def opt_rr(options: bytes = b"", *, do: bool = False, ext_rcode: int = 0) -> bytes:
    """Our OPT pseudo-RR: root owner, payload EDNS_PAYLOAD, version 0."""
    ttl = (ext_rcode << 24) | (0x8000 if do else 0)
    return b"\x00" + _RR.pack(T_OPT, EDNS_PAYLOAD, ttl, len(options)) + options


def rr(owner: bytes, rtype: int, ttl: int, rdata: bytes, rclass: int = 1) -> bytes:
    return owner + _RR.pack(rtype, rclass, ttl, len(rdata)) + rdata


def soa_rdata(mname: str, rname: str, serial: int, refresh: int, retry: int, expire: int, minimum: int) -> bytes:
    return name_to_wire(mname) + name_to_wire(rname) + struct.pack("!IIIII", serial, refresh, retry, expire, minimum)


def header(data: bytes, rcode: int, qd: int, an: int, ns: int, ar: int, *, tc: bool = False) -> bytes:
    """Response header for query `data`: id, opcode, RD and CD copied; QR, RA set; AA, AD clear."""
    b2 = 0x80 | (data[2] & 0x79) | (0x02 if tc else 0)
    b3 = 0x80 | (data[3] & 0x10) | (rcode & 0x0F)
    return data[:2] + bytes((b2, b3)) + _COUNTS.pack(qd, an, ns, ar)


def error_response(data: bytes, rcode: int, q: Query | None = None) -> bytes:
    """FORMERR/NOTIMP/REFUSED/SERVFAIL/BADVERS, with the question echoed when it parsed."""
    if len(data) < 12:
        return b""
    ext, rcode = rcode >> 4, rcode & 0x0F
    if q is None:
        return header(data, rcode, 0, 0, 0, 0)
    if q.edns < 0:
        return header(data, rcode, 1, 0, 0, 0) + data[12 : q.qend + 4]
    return header(data, rcode, 1, 0, 0, 1) + data[12 : q.qend + 4] + opt_rr(do=q.do, ext_rcode=ext)


def truncated(data: bytes, q: Query) -> bytes:
    """TC=1 answer with the question only: the client retries over TCP."""
    if q.edns < 0:
        return header(data, NOERROR, 1, 0, 0, 0, tc=True) + data[12 : q.qend + 4]
    return header(data, NOERROR, 1, 0, 0, 1, tc=True) + data[12 : q.qend + 4] + opt_rr(do=q.do)


def addr_rdata(addr: str) -> tuple[int, bytes]:
    if ":" in addr:
        return T_AAAA, socket.inet_pton(socket.AF_INET6, addr)
    return T_A, socket.inet_pton(socket.AF_INET, addr)


def response_ttls(wire: bytes) -> tuple[list[int], list[int], int] | None:
    """Offsets and values of every RR TTL in a response (OPT excluded), and the TTL to cache it
    for (min RR TTL; for a negative answer min(SOA TTL, SOA MINIMUM), RFC 2308). None if it
    cannot be walked or holds no TTL."""
    try:
        qd, an, ns, ar = _COUNTS.unpack_from(wire, 4)
        pos = 12
        for _ in range(qd):
            pos = skip_name(wire, pos)
            if pos < 0:
                return None
            pos += 4
        offs: list[int] = []
        ttls: list[int] = []
        neg = None
        for k in range(an + ns + ar):
            pos = skip_name(wire, pos)
            if pos < 0:
                return None
            rtype, _, ttl, rdlen = _RR.unpack_from(wire, pos)
            if rtype != T_OPT:
                offs.append(pos + 4)
                ttls.append(ttl & 0x7FFFFFFF)
                if rtype == T_SOA and an == 0 and an <= k < an + ns and rdlen >= 20:
                    minimum = _U32.unpack_from(wire, pos + 10 + rdlen - 4)[0]
                    neg = min(ttl, minimum)
            pos += 10 + rdlen
        if pos > len(wire):
            return None
    except (IndexError, ValueError, struct.error):
        return None
    if neg is not None:
        return offs, ttls, neg
    if not ttls:
        return None
    return offs, ttls, min(ttls)


T_DNAME = 39


def chain_targets(reply: bytes) -> list[tuple[bytes, list[int]]] | None:
    """The CNAME and DNAME targets in a response's answer section, in order, each as
    `read_name` gives it (lowercased wire name, label offsets); None if it cannot be walked."""
    n = len(reply)
    if n < 12:
        return None
    qd, an = _U16.unpack_from(reply, 4)[0], _U16.unpack_from(reply, 6)[0]
    pos = 12
    for _ in range(qd):
        pos = skip_name(reply, pos)
        if pos < 0 or pos + 4 > n:
            return None
        pos += 4
    out: list[tuple[bytes, list[int]]] = []
    for _ in range(an):
        pos = skip_name(reply, pos)
        if pos < 0 or pos + 10 > n:
            return None
        rtype, _, _, rdlen = _RR.unpack_from(reply, pos)
        pos += 10
        if pos + rdlen > n:
            return None
        if rtype == T_CNAME or rtype == T_DNAME:
            target = read_name(reply, pos)
            if target is None:
                return None
            out.append(target)
        pos += rdlen
    return out
