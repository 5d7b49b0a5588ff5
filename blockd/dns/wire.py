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


class Malformed(Exception):
    """A query we must not answer normally; `rcode` is FORMERR/NOTIMP, or None to drop it."""

    def __init__(self, rcode: int | None) -> None:
        super().__init__(rcode)
        self.rcode = rcode


_DROP = Malformed(None)
_FORMERR = Malformed(FORMERR)
_NOTIMP = Malformed(NOTIMP)


def parse(data: bytes) -> Query:
    """Parse a query; raise `Malformed` (with the rcode to answer, or None to drop).

    Accepted: QR=0, opcode QUERY, exactly one question with an uncompressed qname, no answer or
    authority records, at most one OPT among the additional records (others are skipped).
    """
    n = len(data)
    if n < 12 or data[2] & 0x80:  # too short to echo an id, or a response: never answer
        raise _DROP
    if data[2] & 0x78:
        raise _NOTIMP
    qd, an, ns, ar = _COUNTS.unpack_from(data, 4)
    if qd != 1 or an or ns:
        raise _FORMERR
    i = 12
    labels = []
    try:
        while True:
            ln = data[i]
            if ln == 0:
                break
            if ln > 63:  # compression pointer or extended label type in a question: refuse
                raise _FORMERR
            labels.append(i - 12)
            i += ln + 1
    except IndexError:
        raise _FORMERR from None
    qend = i + 1
    if qend - 12 > 255 or qend + 4 > n:
        raise _FORMERR
    qtype, qclass = _U32.unpack_from(data, qend)[0] >> 16, _U16.unpack_from(data, qend + 2)[0]
    edns, do, version = -1, False, 0
    pos = qend + 4
    for _ in range(ar):
        try:
            if data[pos] == 0:
                root = True
                pos += 1
            else:
                root = False
                pos = skip_name(data, pos)
            rtype, rclass, ttl, rdlen = _RR.unpack_from(data, pos)
        except (IndexError, ValueError, struct.error):
            raise _FORMERR from None
        pos += 10 + rdlen
        if pos > n:
            raise _FORMERR
        if rtype == T_OPT:
            if edns != -1 or not root:  # RFC 6891 6.1.1: more than one OPT, or a named OPT
                raise _FORMERR
            edns = rclass if rclass > 512 else 512
            version = (ttl >> 16) & 0xFF
            do = bool(ttl & 0x8000)
    return Query(qend, qtype, qclass, labels, edns, do, version)


def skip_name(data: bytes, pos: int) -> int:
    """Offset just past the (possibly compressed) name at `pos`; IndexError/ValueError if bad."""
    for _ in range(128):
        ln = data[pos]
        if ln == 0:
            return pos + 1
        if ln & 0xC0 == 0xC0:
            return pos + 2
        if ln > 63:
            raise ValueError("bad label type")
        pos += ln + 1
    raise ValueError("name too long")


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


def ede_option(code: int, text: str) -> bytes:
    """RFC 8914 option: OPTION-CODE 15, INFO-CODE, EXTRA-TEXT (UTF-8, no NUL), at most 400 bytes."""
    extra = text.replace("\x00", "").encode("utf-8")[:400]
    while True:  # do not cut a UTF-8 sequence in half
        try:
            extra.decode("utf-8")
            break
        except UnicodeDecodeError:
            extra = extra[:-1]
    body = _U16.pack(code) + extra
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
            pos = skip_name(wire, pos) + 4
        offs: list[int] = []
        ttls: list[int] = []
        neg = None
        for k in range(an + ns + ar):
            pos = skip_name(wire, pos)
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
