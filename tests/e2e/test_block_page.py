"""HTTP 451 block page (RFC 7725) on a sinkhole address, fetched with curl and headless Chromium.

The page listens on port 80 of a loopback address of its own (127.77.x.1, from the pid), as it
would on `sinkhole_v4`; clients reach it by name (`--resolve`, `--host-resolver-rules`), as a
browser sent there by the sinkhole's A record would. Nothing listens on 443 of that address.
"""

from __future__ import annotations

import os
import shutil
import socket
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


def test_daemon_sinkhole_answer_leads_to_the_page(tmp_path: Path) -> None:
    """`blockd run`: a signed order with `dns_answer: sinkhole` -> the sinkhole answers its address
    -> the page on that address names the order; an order added later shows up without a restart."""
    import sys
    import textwrap
    import time

    import dns.message
    import dns.query

    from tests.conftest import ROOT, drop_policy, repo_config

    addr = f"127.77.{os.getpid() % 250 + 1}.2"
    pol = tmp_path / "policies"
    pol.mkdir()
    cfg = tmp_path / "blockd.yaml"
    cfg.write_text(repo_config(pol, tmp_path / "state") + textwrap.dedent(f"""\
        enforcers:
          dns: {{listen: ["{addr}:5353"], sinkhole_v4: "{addr}"}}
        daemon:
          metrics_listen: "{addr}:9153"
        block_page:
          blocked_by: {BLOCKED_BY}
          listen: ["{addr}:80"]
          languages: [vi, en]
        """))

    def policy(serial: int, names: list[str]) -> str:
        return textwrap.dedent(f"""\
            issuer: demo-regulator
            serial: {serial}
            issued_at: 2026-01-01T00:00:00Z
            not_before: 2026-01-01T00:00:00Z
            not_after: 2030-01-01T00:00:00Z
            orders:
              - id: mic-{serial}
                legal_basis: {{authority: "{VN}", reference: "QĐ {serial}/2026", url: "https://mic.example/{serial}"}}
                action: block
                dns_answer: sinkhole
                targets: {{domains: {names!r}}}
            """)

    drop_policy(pol, "mic.yaml", policy(1, ["casino.example"]))
    log = tmp_path / "blockd.log"
    with open(log, "ab") as out:
        proc = subprocess.Popen([sys.executable, "-m", "blockd", "run", "--config", str(cfg)], stdout=out,
                                stderr=subprocess.STDOUT, cwd=ROOT)

    def page_for(name: str) -> str:
        r = subprocess.run([CURL, "-s", "--max-time", "2", "-i", "--resolve", f"{name}:80:{addr}", f"http://{name}/"],
                           capture_output=True, text=True, timeout=10)
        return r.stdout

    def wait(cond: object, what: str) -> None:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if proc.poll() is not None:
                raise AssertionError(f"blockd exited {proc.returncode}:\n{log.read_text()[-3000:]}")
            if cond():  # type: ignore[operator]
                return
            time.sleep(0.1)  # poll interval under the deadline
        raise AssertionError(f"timed out waiting for {what}:\n{log.read_text()[-3000:]}")

    try:
        wait(lambda: page_for("casino.example").startswith("HTTP/1.1 451"), "the block page")
        r = dns.query.udp(dns.message.make_query("casino.example", "A"), addr, 2, port=5353)
        assert [rd.address for rr in r.answer for rd in rr] == [addr]  # the sinkhole sends browsers here
        body = page_for("casino.example")
        assert "QĐ 1/2026" in body and "Content-Language: vi" in body and "https://mic.example/1" in body
        drop_policy(pol, "mic.yaml", policy(2, ["casino.example", "poker.example"]))
        wait(lambda: "QĐ 2/2026" in page_for("poker.example"), "the new order on the page")
        import urllib.request

        metrics = urllib.request.urlopen(f"http://{addr}:9153/metrics", timeout=10).read().decode()
        assert "blockd_block_page_up 1.0" in metrics
        assert 'blockd_block_page_responses_total{result="served"}' in metrics
    finally:
        proc.terminate()
        proc.wait(20)


def test_a_page_that_cannot_listen_leaves_nothing_open() -> None:
    lt = LoopThread()
    srv = BlockPageServer(BlockPageSettings(BLOCKED_BY, listen=((ADDR, 0), ("192.0.2.1", 80))))
    try:
        with pytest.raises(OSError):
            lt.run(srv.start())  # 192.0.2.1 is not an address of this host
        assert not srv.listening and srv.addresses == []
    finally:
        lt.run(srv.aclose())
        lt.close()


def test_daemon_without_its_page_keeps_answering_and_retries(tmp_path: Path) -> None:
    """block_page on a port another process holds: logged once, blockd_block_page_up 0, the sinkhole
    still answers (the page is not a reason to leave names unblocked); once the port is free, the
    page comes up without a restart."""
    import json
    import sys
    import textwrap
    import time
    import urllib.request

    import dns.message
    import dns.query

    from tests.conftest import ROOT, drop_policy, repo_config

    addr = f"127.77.{os.getpid() % 250 + 1}.3"
    pol = tmp_path / "policies"
    pol.mkdir()
    cfg = tmp_path / "blockd.yaml"
    cfg.write_text(repo_config(pol, tmp_path / "state") + textwrap.dedent(f"""\
        enforcers:
          dns: {{listen: ["{addr}:5353"], sinkhole_v4: "{addr}"}}
        daemon:
          metrics_listen: "{addr}:9153"
        block_page:
          blocked_by: {BLOCKED_BY}
          listen: ["{addr}:80"]
        """))
    squatter = socket.socket()
    squatter.bind((addr, 80))
    squatter.listen()
    drop_policy(pol, "p.yaml", textwrap.dedent("""\
        issuer: demo-regulator
        serial: 1
        issued_at: 2026-01-01T00:00:00Z
        not_before: 2026-01-01T00:00:00Z
        not_after: 2030-01-01T00:00:00Z
        orders:
          - id: o1
            legal_basis: {authority: Example Court, reference: R-1}
            action: block
            dns_answer: sinkhole
            targets: {domains: [casino.example]}
        """))
    log = tmp_path / "blockd.log"
    with open(log, "ab") as out:
        proc = subprocess.Popen([sys.executable, "-m", "blockd", "run", "--config", str(cfg)], stdout=out,
                                stderr=subprocess.STDOUT, cwd=ROOT)
    try:
        deadline = time.monotonic() + 60
        metrics = ""
        while time.monotonic() < deadline and "blockd_block_page_up" not in metrics:
            assert proc.poll() is None, log.read_text()[-3000:]
            try:
                metrics = urllib.request.urlopen(f"http://{addr}:9153/metrics", timeout=2).read().decode()
            except OSError:
                time.sleep(0.1)  # poll interval under the deadline
        assert "blockd_block_page_up 0.0" in metrics, log.read_text()[-3000:]
        r = dns.query.udp(dns.message.make_query("casino.example", "A"), addr, 2, port=5353)
        assert [rd.address for rr in r.answer for rd in rr] == [addr]
        squatter.close()
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline and "blockd_block_page_up 1.0" not in metrics:
            time.sleep(0.2)  # poll interval under the deadline (the retry backs off from 1 s)
            metrics = urllib.request.urlopen(f"http://{addr}:9153/metrics", timeout=2).read().decode()
        assert "blockd_block_page_up 1.0" in metrics
        r2 = subprocess.run([CURL, "-s", "-i", "--max-time", "5", "--resolve", f"casino.example:80:{addr}",
                             "http://casino.example/"], capture_output=True, text=True, timeout=10)
        assert r2.stdout.startswith("HTTP/1.1 451 ")
        events = [json.loads(line)["event"] for line in log.read_text().splitlines() if line.startswith("{")]
        assert events.count("block_page_failed") == 1
    finally:
        squatter.close()
        proc.terminate()
        proc.wait(20)
