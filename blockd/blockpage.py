"""HTTP 451 block page (RFC 7725) on the sinkhole address: Host header + the RuleSet in force -> a page
naming the authority, the order, its reference and URL, in the subscriber's language.

Only orders whose DNS answer is `sinkhole` send browsers here (their names resolve to
`sinkhole_v4`/`sinkhole_v6`), so the page answers for those orders only; any other Host gets 404.
Response: `451 Unavailable For Legal Reasons`, `Link: <blocked_by>; rel="blocked-by"` (RFC 7725 4:
the entity implementing the block, i.e. the operator, not the authority), `Content-Language`,
`Vary: Accept-Language`, `Cache-Control: no-store`. Nothing listens on 443: an HTTPS connection to
the sinkhole address is refused by the kernel (RST) instead of meeting a forged certificate.

Pure parts: `choose_language`, `find_orders`, `render`; `BlockPageServer` is the asyncio edge.
"""

from __future__ import annotations

import asyncio
import html
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

import structlog

from blockd.model import OrderInfo, RuleSet

log = structlog.get_logger("blockd.blockpage")

MAX_REQUEST = 16 << 10
MAX_CLIENTS = 256  # connections at once; more are closed at once (a slow client holds one for 10 s)


@dataclass(frozen=True, slots=True)
class BlockPageSettings:
    #: the operator's page about its blocking (RFC 7725 `blocked-by`), e.g. https://isp.example/blocking
    blocked_by: str
    listen: tuple[tuple[str, int], ...] = (("127.0.0.1", 80),)
    #: languages offered, the first being the default when Accept-Language matches none
    languages: tuple[str, ...] = ("en",)
    #: the answer mode of orders that have none (SinkholeSettings.default_answer)
    default_answer: str = "nxdomain"

    def __post_init__(self) -> None:
        if not self.blocked_by.startswith(("https://", "http://")):
            raise ValueError(f"blocked_by: {self.blocked_by!r} is not an http(s) URL; RFC 7725 wants the URL of "
                             f"the operator's page about the block")
        unknown = [lang for lang in self.languages if lang not in TEXTS]
        if unknown or not self.languages:
            raise ValueError(f"languages: {unknown or list(self.languages)!r} not available; available: "
                             f"{', '.join(sorted(TEXTS))}")


#: page texts per language: title, intro, field labels, "and more orders", footer
TEXTS: Mapping[str, Mapping[str, str]] = {
    "en": {"title": "Blocked for legal reasons", "intro": "Access to {host} is blocked by your provider "
           "because a public authority ordered it.", "authority": "Authority", "order": "Order",
           "reference": "Reference", "decision": "Decision", "more": "Further orders apply to this name: {n}.",
           "footer": "Who applies this block and how to contest it:"},
    "vi": {"title": "Bị chặn vì lý do pháp lý", "intro": "Nhà cung cấp dịch vụ của bạn chặn truy cập "
           "tới {host} theo yêu cầu của cơ quan có thẩm quyền.", "authority": "Cơ quan", "order": "Quyết định số",
           "reference": "Số hiệu", "decision": "Văn bản", "more": "Tên miền này còn chịu thêm {n} quyết định khác.",
           "footer": "Đơn vị thực hiện việc chặn và cách khiếu nại:"},
}


def choose_language(accept: str | None, offered: Sequence[str]) -> str:
    """RFC 9110 12.5.4: the offered language with the highest q (ties: the client's order);
    `vi-VN` matches `vi`; `*` matches the first offered; none -> the first offered."""
    best, best_q = offered[0], 0.0
    for i, part in enumerate((accept or "").split(",")):
        tag, _, params = part.strip().partition(";")
        tag = tag.strip().lower()
        q = 1.0
        for p in params.split(";"):
            k, _, v = p.strip().partition("=")
            if k == "q":
                try:
                    q = float(v)
                except ValueError:
                    q = 0.0
        if q <= best_q or not tag:
            continue
        match = offered[0] if tag == "*" else next((o for o in offered if o == tag or tag.startswith(o + "-")
                                                    or o.startswith(tag + "-")), None)
        if match is not None:
            best, best_q = match, q
    return best


Index = Mapping[tuple[str, bool], tuple[OrderInfo, ...]]


def index(rs: RuleSet, default_answer: str) -> Index:
    """(name, subtree) -> the sinkhole-mode orders of that rule; built once per RuleSet, holding only
    the rules that send browsers to the page (usually few, whatever the size of `rs`)."""
    sinkhole = {oid: info for oid, info in rs.orders.items() if (info.dns_answer or default_answer) == "sinkhole"}
    if not sinkhole:
        return {}
    out: dict[tuple[str, bool], tuple[OrderInfo, ...]] = {}
    for r in rs.domains:
        hit = tuple(sinkhole[o] for o in sorted(r.orders) if o in sinkhole)
        if hit:
            out[(r.name, r.subtree)] = hit
    return out


def find_orders(idx: Index, host: str) -> list[OrderInfo]:
    """The sinkhole-mode orders that block `host` (an exact rule, or a subtree rule at it or above),
    most specific rule first, then by order id."""
    name = host.strip().rstrip(".").lower()
    if not name or len(name) > 253 or not idx:
        return []
    labels = name.split(".")
    out: list[OrderInfo] = []
    for i in range(len(labels)):
        suffix = ".".join(labels[i:])
        for subtree in ((False, True) if i == 0 else (True,)):
            for info in idx.get((suffix, subtree), ()):
                if info not in out:
                    out.append(info)
    return out


def render(host: str, orders: Sequence[OrderInfo], lang: str, blocked_by: str) -> str:
    t = TEXTS[lang]
    e = html.escape
    first = orders[0]
    rows = [(t["authority"], e(first.authority)), (t["order"], e(first.id)), (t["reference"], e(first.reference))]
    if first.url:
        rows.append((t["decision"], f'<a href="{e(first.url)}">{e(first.url)}</a>'))
    more = f"<p>{e(t['more'].format(n=len(orders) - 1))}</p>" if len(orders) > 1 else ""
    table = "".join(f"<tr><th>{k}</th><td>{v}</td></tr>" for k, v in rows)
    return (f'<!doctype html><html lang="{lang}"><head><meta charset="utf-8"><title>451 {e(t["title"])}</title>'
            '<meta name="viewport" content="width=device-width,initial-scale=1"><style>body{font-family:sans-serif;'
            'max-width:40em;margin:3em auto;padding:0 1em;color:#222}h1{color:#a00}th{text-align:left;'
            'padding-right:1em;vertical-align:top}</style></head><body>'
            f'<h1>451 · {e(t["title"])}</h1><p>{e(t["intro"].format(host=host))}</p><table>{table}</table>{more}'
            f'<p>{e(t["footer"])} <a href="{e(blocked_by)}">{e(blocked_by)}</a></p></body></html>\n')


def respond(s: BlockPageSettings, idx: Index, request: bytes) -> bytes:
    """One HTTP/1.1 request head -> the whole response (the connection is closed after it)."""
    lines = request.split(b"\r\n")
    parts = lines[0].split(b" ")
    if len(parts) != 3 or not parts[2].startswith(b"HTTP/1."):
        return _plain(400, "Bad Request", "bad request line\n")
    method = parts[0]
    headers: dict[str, str] = {}
    for line in lines[1:]:
        k, sep, v = line.partition(b":")
        if sep:
            headers[k.strip().lower().decode("latin-1")] = v.strip().decode("latin-1")
    if method not in (b"GET", b"HEAD"):
        return _plain(405, "Method Not Allowed", "GET or HEAD only\n", b"Allow: GET, HEAD\r\n")
    host = headers.get("host", "")
    if host.startswith("["):
        host = host[1:].partition("]")[0]
    else:
        host = host.rpartition(":")[0] if host.count(":") == 1 else host
    orders = find_orders(idx, host)
    if not orders:
        return _plain(404, "Not Found", f"no order in force blocks {host!r} with a block page\n")
    lang = choose_language(headers.get("accept-language"), s.languages)
    body = render(host.lower(), orders, lang, s.blocked_by).encode("utf-8")
    head = ("HTTP/1.1 451 Unavailable For Legal Reasons\r\n"
            f'Link: <{s.blocked_by}>; rel="blocked-by"\r\n'
            "Content-Type: text/html; charset=utf-8\r\n"
            f"Content-Language: {lang}\r\nVary: Accept-Language\r\nCache-Control: no-store\r\n"
            f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n").encode("utf-8")
    return head + (body if method == b"GET" else b"")


def _plain(code: int, reason: str, text: str, extra: bytes = b"") -> bytes:
    body = text.encode("utf-8")
    return (f"HTTP/1.1 {code} {reason}\r\nContent-Type: text/plain; charset=utf-8\r\n"
            f"Content-Length: {len(body)}\r\nConnection: close\r\n").encode() + extra + b"\r\n" + body


class BlockPageServer:
    """Serves `respond` on every `listen` address; `update(rs)` swaps the RuleSet (one reference)."""

    def __init__(self, settings: BlockPageSettings) -> None:
        self.settings = settings
        self.index: Index = {}
        self.addresses: list[tuple[str, int]] = []
        self.stats = {"served": 0, "not_found": 0, "bad": 0, "overload": 0}
        self._clients = 0
        self._servers: list[asyncio.base_events.Server] = []

    @property
    def listening(self) -> bool:
        return bool(self._servers)

    def update(self, rs: RuleSet) -> None:
        self.index = index(rs, self.settings.default_answer)  # the swap is one reference

    async def start(self) -> None:
        """Listen on every address, or on none (OSError, nothing left open)."""
        try:
            for host, port in self.settings.listen:
                srv = await asyncio.start_server(self._client, host, port, reuse_address=True, limit=MAX_REQUEST)
                self._servers.append(srv)
                self.addresses.append((host, srv.sockets[0].getsockname()[1]))
        except OSError:
            await self.aclose()
            self.addresses.clear()
            raise
        log.info("block_page_started", listen=[f"{h}:{p}" for h, p in self.addresses])

    async def keep_trying(self, max_delay_s: float = 60.0) -> None:
        """After a failed `start`: try again, doubling the wait from 1 s up to `max_delay_s`, until it
        listens (the sinkhole address may be configured after blockd starts). Logged once on success."""
        delay = 1.0
        while not self._servers:
            await asyncio.sleep(delay)
            delay = min(delay * 2, max_delay_s)
            try:
                await self.start()
            except OSError:
                continue

    async def aclose(self) -> None:
        for s in self._servers:
            s.close()
        for s in self._servers:
            await s.wait_closed()
        self._servers.clear()

    async def _client(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self._clients >= MAX_CLIENTS:
            self.stats["overload"] += 1
            writer.close()
            return
        self._clients += 1
        try:
            async with asyncio.timeout(10):
                head = await reader.readuntil(b"\r\n\r\n")
            out = respond(self.settings, self.index, head[:-4])
            kind = "served" if out.startswith(b"HTTP/1.1 451") else "not_found" if b" 404 " in out[:13] else "bad"
            self.stats[kind] += 1
            writer.write(out)
            await writer.drain()
        except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, TimeoutError, ConnectionError):
            self.stats["bad"] += 1
        finally:
            self._clients -= 1
            writer.close()
