"""HTTP 451 block page (RFC 7725) on a sinkhole address, fetched with curl and headless Chromium.

The page listens on port 80 of a loopback address of its own (127.77.x.1, from the pid), as it
would on `sinkhole_v4`; clients reach it by name (`--resolve`, `--host-resolver-rules`), as a
browser sent there by the sinkhole's A record would. Nothing listens on 443 of that address.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Iterator
from datetime import datetime, timezone
from pathlib import Path

import pytest

from blockd.blockpage import BlockPageServer, BlockPageSettings
from blockd.dns.testing import LoopThread
from blockd.model import DomainRule, OrderInfo, RuleSet

CURL = shutil.which("curl") or "/usr/bin/curl"
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
pytestmark = [pytest.mark.e2e]
T = datetime(2026, 1, 1, tzinfo=timezone.utc)
ADDR = f"127.77.{os.getpid() % 250 + 1}.1"
VN = "Bộ Thông tin và Truyền thông"
BLOCKED_BY = "https://isp.example/blocking"
ORDERS = {
    "mic-2026-7": OrderInfo("mic-2026-7", "regulator", 1, VN, "QĐ 7/2026", "https://mic.example/qd-7", "block",
                            "sinkhole", None, T),
    "court-1": OrderInfo("court-1", "regulator", 1, "Example Court", "2026/1", None, "block", "nxdomain", None, T),
}
RULES = RuleSet.build([DomainRule("casino.example", True, frozenset({"mic-2026-7"})),
                       DomainRule("plain.example", False, frozenset({"court-1"}))], orders=ORDERS)


@pytest.fixture(scope="module")
def page() -> Iterator[BlockPageServer]:
    lt = LoopThread()
    srv = BlockPageServer(BlockPageSettings(BLOCKED_BY, listen=((ADDR, 80),), languages=("en", "vi")))
    srv.update(RULES)
    lt.run(srv.start())
    try:
        yield srv
    finally:
        lt.run(srv.aclose())
        lt.close()


def curl(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([CURL, "-sS", "--max-time", "10", "-i", *args], capture_output=True, text=True, timeout=30)


def head_and_body(out: str) -> tuple[str, dict[str, str], str]:
    head, _, body = out.replace("\r\n", "\n").partition("\n\n")  # text mode may have folded CRLF already
    status, *lines = head.split("\n")
    return status, {k.lower(): v for k, _, v in (line.partition(": ") for line in lines)}, body


@pytest.mark.parametrize("accept,lang,words", [
    ("vi-VN,vi;q=0.9,en;q=0.5", "vi", ["Bị chặn vì lý do pháp lý", "Cơ quan", VN, "QĐ 7/2026"]),
    ("en-GB,en;q=0.9", "en", ["Blocked for legal reasons", "Authority", VN, "QĐ 7/2026"]),
    ("fr-FR,de;q=0.5", "en", ["Blocked for legal reasons"]),  # none offered: the first configured
    ("en;q=0.2, vi;q=0.8", "vi", ["Bị chặn"]),
])
def test_curl_gets_451_in_the_chosen_language(page: BlockPageServer, accept: str, lang: str,
                                              words: list[str]) -> None:
    r = curl("--resolve", f"www.casino.example:80:{ADDR}", "-H", f"Accept-Language: {accept}",
             "http://www.casino.example/some/path")
    assert r.returncode == 0, r.stderr
    status, h, body = head_and_body(r.stdout)
    assert status == "HTTP/1.1 451 Unavailable For Legal Reasons"
    assert h["link"] == f'<{BLOCKED_BY}>; rel="blocked-by"'
    assert h["content-language"] == lang and h["vary"] == "Accept-Language" and h["cache-control"] == "no-store"
    for w in [*words, "mic-2026-7", "https://mic.example/qd-7", "www.casino.example"]:
        assert w in body, w


def test_other_names_and_methods(page: BlockPageServer) -> None:
    # an order answered NXDOMAIN never sends a browser here: no page claims to explain it
    r = curl("--resolve", f"plain.example:80:{ADDR}", "http://plain.example/")
    assert head_and_body(r.stdout)[0] == "HTTP/1.1 404 Not Found"
    r = curl("--resolve", f"elsewhere.example:80:{ADDR}", "http://elsewhere.example/")
    assert head_and_body(r.stdout)[0] == "HTTP/1.1 404 Not Found"
    r = curl("-X", "POST", "--resolve", f"casino.example:80:{ADDR}", "http://casino.example/")
    assert head_and_body(r.stdout)[0] == "HTTP/1.1 405 Method Not Allowed"
    r = curl("-I", "--resolve", f"casino.example:80:{ADDR}", "http://casino.example/")
    assert r.stdout.startswith("HTTP/1.1 451 ") and "<html" not in r.stdout


def test_https_is_refused_without_a_certificate(page: BlockPageServer) -> None:
    r = subprocess.run([CURL, "-sS", "--max-time", "10", "--resolve", f"casino.example:443:{ADDR}",
                        "https://casino.example/"], capture_output=True, text=True, timeout=30)
    assert r.returncode == 7, (r.returncode, r.stderr)  # 7: could not connect (RST), not 60 (certificate)
    assert "Connection refused" in r.stderr or "Failed to connect" in r.stderr


@pytest.mark.skipif(CHROMIUM is None, reason="chromium missing (Debian package chromium, scripts/deps.sh)")
def test_chromium_shows_the_page(page: BlockPageServer, tmp_path: Path) -> None:
    shot = tmp_path / "block-page-vi.png"
    base = [CHROMIUM or "", "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
            "--disable-component-update", "--disable-sync", "--no-first-run", "--disable-extensions",
            f"--host-resolver-rules=MAP casino.example {ADDR}", "--lang=vi", "--accept-lang=vi-VN,vi,en"]
    before = page.stats["served"]
    dom = subprocess.run([*base, f"--user-data-dir={tmp_path / 'p1'}", "--dump-dom", "http://casino.example/"],
                         capture_output=True, text=True, timeout=120)
    assert dom.returncode == 0, dom.stderr[-2000:]
    assert "Bị chặn vì lý do pháp lý" in dom.stdout and VN in dom.stdout and "mic-2026-7" in dom.stdout
    r = subprocess.run([*base, f"--user-data-dir={tmp_path / 'p2'}", f"--screenshot={shot}", "--window-size=900,600",
                        "http://casino.example/"], capture_output=True, text=True, timeout=120)
    assert r.returncode == 0, r.stderr[-2000:]
    assert shot.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and shot.stat().st_size > 5000
    assert page.stats["served"] >= before + 2
    print(f"\nblock page screenshot: {shot}")
