"""Every subcommand, given what a new user or a bad week gives it: one line, exit 1 (2 for usage).

Missing files, directories, FIFOs, /dev/zero, bad values, a closed stdout: never a traceback,
never a hang, never a destroyed key.
"""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from tests.conftest import ROOT, Keys


@pytest.fixture
def odd(tmp_path: Path) -> dict[str, str]:
    fifo = tmp_path / "fifo.yaml"
    os.mkfifo(fifo)
    zero = tmp_path / "zero.yaml"
    zero.symlink_to("/dev/zero")
    (tmp_path / "dir.yaml").mkdir()
    return {"missing": str(tmp_path / "missing.yaml"), "fifo": str(fifo), "zero": str(zero),
            "dir": str(tmp_path / "dir.yaml")}


@pytest.fixture(autouse=True)
def _capture(capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    global _capsys
    _capsys = capsys
    monkeypatch.chdir(ROOT)
    monkeypatch.delenv("BLOCKD_DEBUG", raising=False)


_capsys: pytest.CaptureFixture[str] | None = None


def blockd(*argv: str) -> subprocess.CompletedProcess[str]:
    """Run the CLI in this process (fast); an exception escaping main() fails the test."""
    from blockd.__main__ import main

    assert _capsys is not None
    try:
        code = main(list(argv))
    except SystemExit as e:  # argparse's usage errors
        code = int(e.code or 0)
    out = _capsys.readouterr()
    return subprocess.CompletedProcess(list(argv), code, out.out, out.err)


def assert_one_line_error(proc: subprocess.CompletedProcess[str], code: int = 1) -> None:
    assert proc.returncode == code, (proc.returncode, proc.stdout, proc.stderr)
    assert "Traceback" not in proc.stderr and "internal error" not in proc.stderr, proc.stderr
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert lines, "an error must say something"
    assert lines[0].startswith(("blockd: error:", "usage:")), proc.stderr


FILE_COMMANDS = [
    ("check", ["check", "--state-dir", "{tmp}/state"]),
    ("plan", ["plan", "--state-dir", "{tmp}/state"]),
    ("verify", ["verify"]),
    ("sign", ["sign", "--sec", str(ROOT / "policies/keys/demo-regulator.key")]),
    ("attest-verify", ["attest", "verify", "--key", str(ROOT / "policies/trust/demo-regulator/demo-regulator.pub")]),
]


@pytest.mark.parametrize("kind", ["missing", "fifo", "zero", "dir"])
@pytest.mark.parametrize("name, argv", FILE_COMMANDS, ids=[c[0] for c in FILE_COMMANDS])
def test_bad_files(tmp_path: Path, odd: dict[str, str], name: str, argv: list[str], kind: str) -> None:
    args = [a.replace("{tmp}", str(tmp_path)) for a in argv] + [odd[kind]]
    proc = blockd(*args)
    if name in ("check", "plan"):
        # a refused file is a report (exit 1), naming the file and why, not a crash
        assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr
        assert odd[kind] in proc.stdout and "REJECTED" in proc.stdout, proc.stdout
        return
    if name in ("verify", "attest-verify"):
        assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr
        assert odd[kind] in proc.stdout + proc.stderr
        return
    assert_one_line_error(proc)
    assert odd[kind] in proc.stderr


@pytest.mark.parametrize("argv", [
    ["sign", "--sec", "{tmp}/missing.key", str(ROOT / "README.md")],
    ["sign", "--sec", "{tmp}/fifo.yaml", str(ROOT / "README.md")],
    ["attest", "verify", "--key", "{tmp}/missing.pub", str(ROOT / "README.md")],
    ["audit", "verify", "--key", "{tmp}/missing.pub", "{tmp}/audit.jsonl"],
    ["audit", "verify", "{tmp}/missing.jsonl"],
    ["audit", "verify", "{tmp}/fifo.yaml", "--no-key"],
    ["audit", "verify", "{tmp}/zero.yaml", "--no-key"],
    ["config", "check", "--config", "{tmp}/missing.yaml"],
    ["config", "check", "--config", "{tmp}/fifo.yaml"],
    ["config", "check", "--config", "{tmp}/dir.yaml"],
    ["check", "--config", "{tmp}/zero.yaml"],
    ["keygen", "--pub", "{tmp}/k", "--sec", "{tmp}/k"],
    ["keygen", "--pub", "{tmp}/nodir/k.pub", "--sec", "{tmp}/nodir/k.key"],
])
def test_missing_and_bad_arguments(tmp_path: Path, odd: dict[str, str], argv: list[str]) -> None:
    proc = blockd(*[a.replace("{tmp}", str(tmp_path)) for a in argv])
    assert_one_line_error(proc)


@pytest.mark.parametrize("argv", [
    ["check", "--now", "yesterday"],
    ["check", "--now", "2026-11-29T12:00:00"],
    ["sign", "--sec", "k", "--name", "../x", "f"],
    ["nonsense"],
    ["check", "--bogus"],
])
def test_usage_errors(argv: list[str]) -> None:
    assert_one_line_error(blockd(*argv), code=2)


def test_keygen_refuses_one_path_for_both_keys(tmp_path: Path) -> None:
    sec = tmp_path / "k"
    assert blockd("keygen", "--pub", str(tmp_path / "a.pub"), "--sec", str(sec)).returncode == 0
    before = sec.read_bytes()
    proc = blockd("keygen", "--pub", str(sec), "--sec", str(sec), "--force")
    assert_one_line_error(proc)
    assert "same file" in proc.stderr and sec.read_bytes() == before


def test_closed_stdout(tmp_path: Path) -> None:
    """`blockd plan | head`: the reader goes away; no traceback, and not a success."""
    r, w = os.pipe()
    os.close(r)
    try:
        proc = subprocess.run([sys.executable, "-m", "blockd", "plan", "--verbose", "--now", "2026-11-29T00:00:00Z",
                               "--state-dir", str(tmp_path / "state")], stdout=w, stderr=subprocess.PIPE,
                              text=True, cwd=ROOT, timeout=60)
    finally:
        os.close(w)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr and "BrokenPipe" not in proc.stderr, proc.stderr


@pytest.mark.parametrize("argv", [["config", "--json", "check"], ["config", "check", "--json"]])
def test_json_is_taken_where_it_makes_sense(argv: list[str]) -> None:
    import json

    proc = blockd(*argv)
    assert proc.returncode in (0, 1) and "Traceback" not in proc.stderr
    assert json.loads(proc.stdout)["command"] == "config check"


@pytest.mark.parametrize("cmd", ["run", "demo"])
def test_json_is_refused_where_it_would_be_ignored(cmd: str) -> None:
    assert_one_line_error(blockd(cmd, "--json"), code=2)


def test_pending_is_not_an_error(tmp_path: Path, keys: Keys, catalog_dir: Path, write_policy) -> None:
    """A policy whose not_before lies ahead: check and accept say pending, exit 0, with the reason."""
    import json

    config = tmp_path / "blockd.yaml"
    config.write_text(f"trust_store: {keys.trust}\npolicy_dir: {tmp_path / 'policies'}\ncatalog_dir: {catalog_dir}\n"
                      f"prefix_table: {tmp_path / 'prefix2as.txt'}\nshared_infra_dir: {ROOT / 'policies/shared-infra'}\n"
                      f"state_dir: {tmp_path / 'state'}\n")
    text = ("issuer: reg\nserial: 1\nissued_at: 2026-11-01T00:00:00Z\nnot_before: 2027-01-01T00:00:00Z\n"
            "not_after: 2030-01-01T00:00:00Z\norders:\n  - id: o1\n    legal_basis: {authority: C, reference: R}\n"
            "    action: block\n    targets: {domains: [a.example]}\n")
    path = write_policy(text)
    for cmd in ("check", "accept"):
        proc = blockd(cmd, "--config", str(config), "--json", str(path))  # judged now (before 2027)
        assert proc.returncode == 0, proc.stdout + proc.stderr
        (v,) = json.loads(proc.stdout)["policies"]
        assert v["status"] == "pending" and "takes effect at not_before 2027-01-01T00:00:00Z" in v["reason"]
    assert not (tmp_path / "state" / "accepted.json").exists(), "pending is recorded when it takes effect"


@pytest.mark.parametrize("json_flag", [[], ["--json"]])
def test_a_full_stdout(tmp_path: Path, json_flag: list[str]) -> None:
    """stdout on a full disk: one line on stderr, exit 1, no traceback."""
    with open("/dev/full", "w") as full:
        proc = subprocess.run([sys.executable, "-m", "blockd", "plan", *json_flag, "--now", "2026-11-29T00:00:00Z",
                               "--state-dir", str(tmp_path / "state")], stdout=full, stderr=subprocess.PIPE,
                              text=True, cwd=ROOT, timeout=60)
    assert proc.returncode == 1 and "Traceback" not in proc.stderr, proc.stderr
    assert proc.stderr.strip() == "blockd: error: No space left on device"
