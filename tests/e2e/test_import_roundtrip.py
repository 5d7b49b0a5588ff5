"""Real registry dumps and lists round-trip through the CLI: `blockd import` -> `blockd sign` ->
`blockd check`: the policy verifies and parses with every order the import reported, and all
that `check` does not enforce is a guard finding, never a rejected file."""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]
DATA = ROOT / "tests" / "data"
SHARED = ROOT.parent / "shared" / "data"
KEY = ROOT / "policies" / "keys" / "demo-regulator.key"
WHEN = ["--issuer", "demo-regulator", "--serial", "3", "--issued-at", "2026-11-29T00:00:00Z"]
NOW = "2026-11-29T01:00:00Z"
pytestmark = pytest.mark.e2e


def blockd(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "blockd", *args], capture_output=True, text=True, cwd=ROOT,
                          timeout=300)


def roundtrip(tmp: Path, fmt: str, *args: str) -> tuple[dict, dict]:
    out = tmp / "imported.yaml"
    imp = blockd("import", fmt, *args, *WHEN, "-o", str(out), "--json")
    assert imp.returncode == 0, imp.stderr
    summary = json.loads(imp.stdout)
    assert "issuer: demo-regulator" in out.read_text()
    sign = blockd("sign", "--sec", str(KEY), str(out))
    assert sign.returncode == 0, sign.stderr
    chk = blockd("check", str(out), "--now", NOW, "--state-dir", str(tmp / "state"), "--json")
    report = json.loads(chk.stdout)
    assert report.get("rejected") == [], report
    (policy,) = report["policies"]
    assert policy["orders"] == summary["orders"] and policy["issuer"] == "demo-regulator"
    if chk.returncode != 0:  # refused only by guards (shared infrastructure, wide prefixes ...)
        assert report["findings"] and not report["rejected"]
    return summary, report


# The shipped dumps, plus the project's shared copies when they lie beside the checkout (the same
# files as the shipped ones are not run twice).
ZI = [*sorted((DATA / "z-i").glob("*.csv.gz")),
      *[p for p in sorted((SHARED / "z-i").glob("*.csv")) if not (DATA / "z-i" / f"{p.name}.gz").exists()]]


@pytest.mark.parametrize("dump", ZI, ids=[p.name for p in ZI])
def test_zi_dumps_roundtrip(tmp_path: Path, dump: Path) -> None:
    summary, report = roundtrip(tmp_path, "zi", str(dump))
    assert summary["orders"] > 1000
    # Every value the import could not use is listed, line by line, and counted by reason.
    assert summary["skipped"] == len(summary["skipped_lines"]) == sum(summary["skipped_by_reason"].values())
    assert all(line.startswith("line ") for line in summary["skipped_lines"])
    assert report["counts"]["domain_exact"] > 0 and report["counts"]["ipv4_ranges"] > 0


AF = SHARED / "lists" / "antifilter"
LISTS = [(DATA / "refilter" / "domains_all.lst.gz", ["--subtree"]), (DATA / "refilter" / "ipsum.lst.gz", []),
         *[(p, []) for p in sorted(AF.glob("allyouneed-*.lst"))],
         *[(p, ["--syntax", "clash"]) for p in sorted(AF.glob("*.clash.txt"))],
         *[(p, ["--syntax", "dnsmasq"]) for p in sorted(AF.glob("*.dnsmasq.conf"))]]


@pytest.mark.parametrize(("path", "extra"), LISTS, ids=[p.name for p, _ in LISTS])
def test_lists_roundtrip(tmp_path: Path, path: Path, extra: list[str]) -> None:
    summary, report = roundtrip(tmp_path, "list", str(path), *extra, "--order-id", "list-1",
                                "--authority", "Re:filter", "--reference", path.name)
    assert summary["orders"] == 1 and summary["skipped"] == 0
    assert summary["domains"] + summary["cidrs"] > 400


def test_piracy_shield_roundtrip_and_checksum(tmp_path: Path) -> None:
    fqdn = ["live-football.example", "Calcio-Streaming.EXAMPLE", "192.0.2.7", "stream.example"]
    ipv4 = ["198.51.100.7", "203.0.113.0/24", "2001:db8::7"]
    (tmp_path / "fqdn.txt").write_text("\n".join(fqdn))
    (tmp_path / "fqdn.sha256").write_text(hashlib.sha256("\n".join(fqdn).encode()).hexdigest() + "\n")
    (tmp_path / "ipv4.json").write_text(json.dumps({"status": "success", "data": ipv4}))
    (tmp_path / "ipv4.sha256").write_text(json.dumps(
        {"status": "success", "data": hashlib.sha256("\n".join(ipv4).encode()).hexdigest()}))
    args = ["--fqdn", str(tmp_path / "fqdn.txt"), "--fqdn-sha256", str(tmp_path / "fqdn.sha256"),
            "--ipv4", str(tmp_path / "ipv4.json"), "--ipv4-sha256", str(tmp_path / "ipv4.sha256"),
            "--order-id", "ps-ticket-0042", "--authority", "AGCOM", "--reference", "ticket 0042"]
    summary, report = roundtrip(tmp_path, "piracy-shield", *args)
    assert (summary["orders"], summary["domains"], summary["cidrs"], summary["skipped"]) == (1, 3, 2, 2)
    assert [c["matched"] for c in summary["checksums"]] == ["entries", "entries"]
    assert any("'192.0.2.7': looks like an IP address" in s for s in summary["skipped_lines"])
    assert any("an IPv6 entry in the IPv4 list" in s for s in summary["skipped_lines"])
    assert report["counts"] == {"domain_exact": 3, "domain_subtree": 0, "ipv4_ranges": 2, "ipv6_ranges": 0}
    # A list that does not match its checksum is refused: nothing is written.
    (tmp_path / "fqdn.txt").write_text("\n".join([*fqdn, "extra.example"]))
    out = tmp_path / "refused.yaml"
    bad = blockd("import", "piracy-shield", *args, *WHEN, "-o", str(out))
    assert bad.returncode == 1 and "SHA-256 mismatch" in bad.stderr and not out.exists()
