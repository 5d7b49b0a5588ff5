"""The HTML compliance report of a multi-operator fixture, rendered by headless Chromium (Debian
package `chromium`): the screenshot is produced, and the DOM Chromium built holds the cells."""

from __future__ import annotations

import asyncio
import shutil
import struct
import subprocess
import sys
from html.parser import HTMLParser
from pathlib import Path

import pytest

from blockd.compliance import fixture

ROOT = Path(__file__).resolve().parents[2]
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
pytestmark = [pytest.mark.e2e,
              pytest.mark.skipif(CHROMIUM is None, reason="chromium missing (Debian package chromium, scripts/deps.sh)")]


def chromium(profile: Path, *args: str) -> subprocess.CompletedProcess[str]:
    assert CHROMIUM is not None
    return subprocess.run(
        [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-background-networking",
         "--disable-component-update", "--disable-sync", "--no-first-run", "--disable-extensions",
         f"--user-data-dir={profile}", *args],
        capture_output=True, text=True, timeout=120)


class Cells(HTMLParser):
    """td.cell elements by id with their data-verdict, links inside them, and any fetch attempt."""

    def __init__(self) -> None:
        super().__init__()
        self.cells: dict[str, str] = {}
        self.links: dict[str, str] = {}
        self.external: list[str] = []
        self.bars: list[str] = []
        self._in: str | None = None

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        a = dict(attrs)
        if tag == "td" and "cell" in (a.get("class") or "").split():
            self._in = a["id"] or ""
            self.cells[self._in] = a.get("data-verdict") or ""
        if tag == "a" and self._in:
            self.links[self._in] = a.get("href") or ""
        if tag == "rect" and "bar" in (a.get("class") or ""):
            self.bars.append(a.get("data-operator") or "")
        for key in ("src", "href"):
            if tag in ("script", "link", "img", "iframe") and a.get(key):
                self.external.append(a[key] or "")

    def handle_endtag(self, tag: str) -> None:
        if tag == "td":
            self._in = None


def test_html_report_renders_in_chromium(tmp_path: Path) -> None:
    fx = asyncio.run(fixture.generate(tmp_path / "fleet", operators=6))
    page = fx.root / "report.html"
    run = subprocess.run(
        [sys.executable, "-m", "blockd", "compliance", "--policies", str(fx.policies), "--operators", str(fx.keys),
         "--statements", str(fx.statements), "--now", fx.now.isoformat(), "--html", str(page), "--quiet"],
        capture_output=True, text=True, cwd=ROOT, timeout=120)
    assert run.returncode == 1, run.stdout + run.stderr
    assert run.stdout.startswith("DO NOT COMPLY: 1 of 6 operators comply"), run.stdout

    dom = chromium(tmp_path / "profile1", "--dump-dom", page.as_uri())
    assert dom.returncode == 0, dom.stderr[-2000:]
    parsed = Cells()
    parsed.feed(dom.stdout)
    assert len(parsed.cells) == 6 * 3
    want = {"alpha": "complies", "bravo": "late", "charlie": "out_of_sync", "delta": "complies",
            "echo": "out_of_sync", "foxtrot": "complies"}
    for name, verdict in want.items():
        assert parsed.cells[f"cell-{name}-demo-regulator/fx-casino"] == verdict
    assert parsed.cells["cell-bravo-demo-regulator/fx-mirror"] == "complies"  # 30 h, deadline 7 d
    # Each cell links to the statement it rests on, relative to the page, and the file is there.
    link = parsed.links["cell-bravo-demo-regulator/fx-casino"]
    assert link == "./statements/bravo/attestation-20261121T060000Z-000002.json"
    assert (page.parent / link).is_file()
    assert all((page.parent / h).is_file() for h in parsed.links.values())
    assert sorted(parsed.bars) == sorted(list(want) * 3)  # one bar per enforced cell in the timeline
    assert parsed.external == []  # nothing to fetch: self-contained

    shot = tmp_path / "report.png"
    r = chromium(tmp_path / "profile2", f"--screenshot={shot}", "--window-size=1280,1800", page.as_uri())
    assert r.returncode == 0, r.stderr[-2000:]
    data = shot.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    width, height = struct.unpack(">II", data[16:24])
    assert (width, height) == (1280, 1800) and len(data) > 20_000
