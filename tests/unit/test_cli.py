"""The CLI: exit codes (0 clean, 1 refused, 2 usage), --json, and the shipped samples."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from blockd.__main__ import main
from tests.conftest import ROOT, Keys

POLICY = """\
issuer: reg
serial: {serial}
issued_at: 2026-11-01T00:00:00Z
not_before: 2026-11-01T00:00:00Z
not_after: 2030-01-01T00:00:00Z
orders:
  - id: o1
    legal_basis: {{authority: Court, reference: R1}}
    action: block
    targets: {{domains: [{domains}], cidrs: [{cidrs}]}}
"""
NOW = "2026-11-29T00:00:00Z"


def run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str]:
    code = main(list(argv))
    out = capsys.readouterr()
    return code, out.out + out.err


@pytest.fixture
def env(tmp_path: Path, keys: Keys, catalog_dir: Path) -> list[str]:
    config = tmp_path / "blockd.yaml"
    config.write_text(
        f"trust_store: {keys.trust}\npolicy_dir: {tmp_path / 'policies'}\ncatalog_dir: {catalog_dir}\n"
        f"prefix_table: {tmp_path / 'prefix2as.txt'}\nshared_infra_dir: {ROOT / 'policies' / 'shared-infra'}\n"
        f"state_dir: {tmp_path / 'state'}\n"
    )
    return ["--config", str(config), "--now", NOW]


def test_check_clean_then_refused(capsys, env, write_policy) -> None:
    good = write_policy(POLICY.format(serial=1, domains="t.me", cidrs="192.0.2.0/24"))
    code, out = run(capsys, "check", *env, str(good))
    assert code == 0 and out.rstrip().endswith("OK"), out
    bad = write_policy(POLICY.format(serial=2, domains="co.uk", cidrs="52.95.0.0/16"), name="bad.yaml")
    code, out = run(capsys, "check", *env, "--json", str(bad))
    report = json.loads(out)
    assert code == 1 and not report["ok"]
    assert {(f["guard"], f["rule"]) for f in report["findings"]} == {("public_suffix", "co.uk"),
                                                                     ("shared_infra", "52.95.0.0/16")}


def test_check_rejects_unsigned_and_expired(capsys, env, write_policy) -> None:
    unsigned = write_policy(POLICY.format(serial=1, domains="t.me", cidrs="192.0.2.0/24"), sign=False)
    code, out = run(capsys, "check", *env, str(unsigned))
    assert code == 1 and "no signature: expected p.yaml.minisig" in out
    old = write_policy(POLICY.format(serial=1, domains="t.me", cidrs="192.0.2.0/24").replace("2030-01-01", "2026-11-02"),
                       name="old.yaml")
    code, out = run(capsys, "check", *env, str(old))
    assert code == 1 and "expired: not_after was 2026-11-02T00:00:00Z" in out


def test_accept_then_plan_then_rollback(capsys, env, write_policy) -> None:
    v1 = write_policy(POLICY.format(serial=1, domains="t.me", cidrs="192.0.2.0/24"), name="v1.yaml")
    assert run(capsys, "accept", *env[:2], str(v1))[0] == 0
    v2 = write_policy(POLICY.format(serial=2, domains="t.me, x.org", cidrs="192.0.2.0/25"), name="v2.yaml")
    code, out = run(capsys, "plan", *env, "--json", str(v2))
    plan = json.loads(out)
    assert code == 0
    assert plan["add"] == {"domains": ["x.org"], "ipv4": [], "ipv6": []}
    assert plan["remove"] == {"domains": [], "ipv4": ["192.0.2.128/25"], "ipv6": []}
    assert run(capsys, "accept", *env[:2], str(v2))[0] == 0
    code, out = run(capsys, "check", *env, str(v1))
    assert code == 1 and "SUPERSEDED issuer reg serial 1: serial 1 is below serial 2, accepted before" in out


def test_keygen_sign_verify(capsys, tmp_path: Path, keys: Keys) -> None:
    pub, sec = tmp_path / "new.pub", tmp_path / "new.key"
    assert run(capsys, "keygen", "--pub", str(pub), "--sec", str(sec))[0] == 0
    assert sec.stat().st_mode & 0o777 == 0o600
    f = tmp_path / "p.yaml"
    f.write_text("issuer: reg\n")
    assert run(capsys, "sign", "--sec", str(sec), str(f))[0] == 0
    code, out = run(capsys, "verify", "--trust-store", str(keys.trust), str(f))
    assert code == 1 and "is not in the trust store" in out
    shutil.copy(pub, keys.trust / "reg" / "new.pub")
    code, out = run(capsys, "verify", "--trust-store", str(keys.trust), "--json", str(f))
    assert code == 0 and json.loads(out)["files"][0]["issuer"] == "reg"
    if shutil.which("minisign"):
        ok = subprocess.run(["minisign", "-V", "-p", str(pub), "-m", str(f)], capture_output=True, text=True)
        assert ok.returncode == 0, ok.stderr


def test_usage_errors_exit_2() -> None:
    for argv in (["check", "--bogus"], ["nonsense"], []):
        proc = subprocess.run([sys.executable, "-m", "blockd", *argv], capture_output=True, text=True, cwd=ROOT)
        assert proc.returncode == 2, (argv, proc.stderr)
    helped = subprocess.run([sys.executable, "-m", "blockd", "check", "--help"], capture_output=True, text=True, cwd=ROOT)
    assert helped.returncode == 0 and "--json" in helped.stdout


def test_every_shipped_file_loads_verifies_and_compiles(capsys, monkeypatch) -> None:
    """policies/ as shipped: catalog and table verify (operator key), samples check clean."""
    monkeypatch.chdir(ROOT)
    code, out = run(capsys, "verify", "--role", "catalog", *map(str, sorted((ROOT / "policies/catalog").glob("*.yaml"))),
                    str(ROOT / "policies/asn/prefix2as.txt"))
    assert code == 0, out
    code, out = run(capsys, "check", "--now", NOW, "--state-dir", "/nonexistent-blockd-state")
    assert code == 0, out
    assert "order demo-regulator/demo-2026-001: enforced" in out


def test_plan_uses_the_newest_serial_whatever_the_argument_order(capsys, env, write_policy) -> None:
    v9 = write_policy(POLICY.format(serial=9, domains="nine.example", cidrs="192.0.2.0/24"), name="p-9.yaml")
    v10 = write_policy(POLICY.format(serial=10, domains="ten.example", cidrs="192.0.2.0/24"), name="p-10.yaml")
    for order in ((v10, v9), (v9, v10)):
        code, out = run(capsys, "plan", *env, "--json", *map(str, order))
        plan = json.loads(out)
        assert code == 1  # p-9 is superseded: it would not take effect
        assert plan["add"]["domains"] == ["ten.example"], plan
        assert {(Path(p["file"]).name, p["status"]) for p in plan["policies"]} == {("p-9.yaml", "superseded"),
                                                                                  ("p-10.yaml", "active")}


def test_accept_refuses_while_a_daemon_holds_the_state(capsys, env, write_policy, tmp_path: Path) -> None:
    from blockd.state import StateStore

    v1 = write_policy(POLICY.format(serial=1, domains="t.me", cidrs="192.0.2.0/24"), name="v1.yaml")
    with StateStore(tmp_path / "state").lock("blockd run"):
        code, out = run(capsys, "accept", *env[:2], str(v1))
        assert code == 1 and "the state directory is held by blockd run (pid" in out, out
        assert not (tmp_path / "state" / "accepted.json").exists()
    assert run(capsys, "accept", *env[:2], str(v1))[0] == 0


def test_accept_refuses_now(capsys, env, write_policy) -> None:
    """accept records at the real clock: a --now could record a serial not in force now."""
    v1 = write_policy(POLICY.format(serial=1, domains="t.me", cidrs="192.0.2.0/24"), name="v1.yaml")
    code, out = run(capsys, "accept", *env, str(v1))
    assert code == 1 and "--now is for check and plan" in out


def test_check_of_the_directory_does_not_fail_on_an_old_serial(capsys, env, write_policy, tmp_path: Path) -> None:
    write_policy(POLICY.format(serial=1, domains="t.me", cidrs="192.0.2.0/24"), name="p-1.yaml")
    write_policy(POLICY.format(serial=2, domains="t.me", cidrs="192.0.2.0/24"), name="p-2.yaml")
    code, out = run(capsys, "check", *env)  # no files: the policy directory, as the daemon sees it
    assert code == 0 and "SUPERSEDED" in out and out.rstrip().endswith("OK"), out
    d = tmp_path / "policies"
    code, out = run(capsys, "check", *env, str(d / "p-1.yaml"), str(d / "p-2.yaml"))  # p-1 asked about: won't apply
    assert code == 1
