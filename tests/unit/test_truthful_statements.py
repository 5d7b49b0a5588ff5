"""Issue 11: a statement says what is really enforced, and what failed.

    check/chain       the regulator's checks (`blockd attest verify`), one element of difference fails
    failed enforcers  attested as failed, orders not enforced there, deadlines at risk / missed
    audit verify      without --key the head is unverified (exit 1 unless --no-key); an entry after
                      the signed head is reported as unsigned
    write failures    an unwritable export directory or audit log: counted, retried, chain intact
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from dataclasses import replace
from datetime import datetime, timedelta, timezone
from pathlib import Path
from types import MappingProxyType
from typing import Any

import pytest

from blockd import attest, audit, minisign, tte
from blockd.__main__ import main
from blockd.accountability import Accountability
from blockd.compile import compile_policies
from blockd.model import Applied, NetRule, RuleSet
from blockd.reconcile import PassResult
from blockd.settings import DaemonSettings, Settings
from tests.unit.test_attest import CATALOG, SETTINGS, order, policy

UTC = timezone.utc
NOW = datetime(2026, 11, 29, 12, 0, tzinfo=UTC)
BOTH = policy("reg", 3, "2026-11-29T00:00:00Z", "2026-11-29T00:00:00Z",
              order("o1", "{domains: [example.org], cidrs: [192.0.2.0/24]}", deadline="2026-11-30T00:00:00Z"))
COMP = compile_policies([BOTH], CATALOG, SETTINGS, NOW)
NAMES = RuleSet.build(COMP.ruleset.domains)
ADDRS = RuleSet.build(v4=COMP.ruleset.v4, v6=COMP.ruleset.v6)


def held(name: str, share: RuleSet, readback: RuleSet | None = None) -> attest.EnforcerPass:
    rb = readback or share
    return attest.EnforcerPass(Applied(name, rb.digest, share.digest, 1, 0, 0.01, MappingProxyType(rb.counts()),
                                       "touched", NOW, NOW - timedelta(minutes=1)), NOW)


def statement(enforcers: dict[str, attest.EnforcerPass], **kw: Any) -> dict[str, Any]:
    return attest.build_statement(
        policies=[attest.Received(BOTH, NOW, NOW)], compilation=COMP, enforcers=enforcers,
        audit_head=audit.Head(0, audit.GENESIS), operator=attest.Operator("isp", "noc@isp.example"), host="h",
        now=kw.pop("now", NOW), seq=kw.pop("seq", 1), **kw)


def test_in_sync_statement_passes_the_regulators_check() -> None:
    st = statement({"nft": held("nft", ADDRS), "dns": held("dns", NAMES)})
    pred = st["predicate"]
    assert pred["in_sync"] and attest.check(st) == []
    assert pred["enforcers"]["nft"]["share"] == "addresses" and pred["enforcers"]["dns"]["share"] == "names"
    # one equality per enforcer; the shares differ from the whole rule set's digest
    assert pred["enforcers"]["nft"]["readback_digest"] == pred["ruleset"]["shares"]["addresses"] != pred["ruleset"]["digest"]
    assert pred["enforcers"]["nft"]["readback_scope"] == "touched"
    assert pred["enforcers"]["nft"]["full_readback_at"] == "2026-11-29T11:59:00Z"


def test_a_readback_one_element_off_fails_verify() -> None:
    extra = RuleSet.build(v4=[*ADDRS.v4, NetRule(0x0A000000, 0x0A000000, frozenset())])
    st = statement({"nft": held("nft", ADDRS, readback=extra), "dns": held("dns", NAMES)})
    assert not st["predicate"]["in_sync"]
    problems = attest.check(st)
    assert len(problems) == 1 and problems[0].startswith(f"enforcer nft: read back {extra.digest}")
    assert "it does not hold what was ordered" in problems[0]


def test_a_failed_enforcer_is_attested_as_failed_and_its_orders_not_enforced() -> None:
    error = "nftables transaction of 1540 messages aborted, kernel state unchanged; message 3: EOPNOTSUPP"
    enforcers = {"nft": attest.EnforcerPass(None, NOW, error, ADDRS.digest), "dns": held("dns", NAMES)}
    st = statement(enforcers)
    pred = st["predicate"]
    assert pred["in_sync"] is False
    nft = pred["enforcers"]["nft"]
    assert (nft["status"], nft["error"], nft["readback_digest"], nft["committed_digest"]) == ("failed", error, None, None)
    o = pred["policies"][0]["orders"][0]
    assert o["enforced_at"] == {"dns": "2026-11-29T12:00:00Z"}  # dns holds it, nft does not
    assert o["enforced_everywhere_at"] is None and o["not_enforced_on"] == ["nft"]
    assert o["deadline_status"] == "at_risk"
    assert attest.check(st) == [f"enforcer nft: failed: {error}"]
    later = statement(enforcers, now=NOW + timedelta(days=1))
    assert later["predicate"]["policies"][0]["orders"][0]["deadline_status"] == "missed"


def test_pending_policy_is_in_the_statement_and_does_not_supersede() -> None:
    nxt = policy("reg", 4, "2026-11-29T00:00:00Z", "2027-01-01T00:00:00Z", order("o1", "{domains: [later.example]}"))
    st = attest.build_statement(
        policies=[attest.Received(BOTH, NOW, NOW), attest.Received(nxt, NOW, NOW, pending=True)], compilation=COMP,
        enforcers={"dns": held("dns", NAMES), "nft": held("nft", ADDRS)}, audit_head=audit.Head(0, audit.GENESIS),
        operator=attest.Operator("isp"), host="h", now=NOW, seq=1)
    by_serial = {p["serial"]: p for p in st["predicate"]["policies"]}
    assert by_serial[4]["status"] == "pending" and by_serial[4]["orders"][0]["status"] == "pending"
    assert by_serial[4]["orders"][0]["pending_until"] == "2027-01-01T00:00:00Z"
    assert by_serial[3]["orders"][0]["status"] == "enforced"


def test_chain_reports_gaps_and_broken_links() -> None:
    a, b, d = (statement({"dns": held("dns", NAMES)}, seq=n) for n in (1, 2, 4))
    sha = {1: "11" * 32, 2: "22" * 32, 4: "44" * 32}
    b["predicate"]["attestation"]["previous_sha256"] = sha[1]
    assert attest.chain([("a", sha[1], a), ("b", sha[2], b)]) == []
    gaps = attest.chain([("d", sha[4], d), ("a", sha[1], a), ("b", sha[2], b)])
    assert gaps == ["statement seq 3 missing between b (seq 2) and d (seq 4)"]
    b["predicate"]["attestation"]["previous_sha256"] = "00" * 32
    assert "b: previous_sha256 is 0000" in attest.chain([("a", sha[1], a), ("b", sha[2], b)])[0]


def _issue(tmp: Path, key: minisign.SecretKey, st: dict[str, Any]) -> tuple[Path, str]:
    return attest.issue(tmp, st, key)


def test_attest_verify_cli_runs_the_documented_checks(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    key = minisign.generate()
    pub = tmp_path / "op.pub"
    pub.write_text(key.public.to_text())
    good, sha1 = _issue(tmp_path / "x", key, statement({"nft": held("nft", ADDRS), "dns": held("dns", NAMES)}))
    assert main(["attest", "verify", "--key", str(pub), str(good)]) == 0
    off = RuleSet.build(v4=ADDRS.v4[:-1] + (NetRule(ADDRS.v4[-1].first, ADDRS.v4[-1].last - 1, frozenset()),))
    bad, sha2 = _issue(tmp_path / "x", key, statement({"nft": held("nft", ADDRS, off), "dns": held("dns", NAMES)},
                                                      seq=3, previous_sha256=sha1))
    capsys.readouterr()
    assert main(["attest", "verify", "--key", str(pub), str(bad)]) == 1
    out = capsys.readouterr().out
    assert "signature OK" in out and "NOT ENFORCED AS ORDERED" in out and "enforcer nft: read back" in out
    assert main(["attest", "verify", "--signature-only", "--key", str(pub), str(bad)]) == 0
    capsys.readouterr()
    assert main(["attest", "verify", "--signature-only", "--key", str(pub), str(good), str(bad)]) == 1
    assert "chain: statement seq 2 missing between" in capsys.readouterr().out


def _log(tmp: Path, key: minisign.SecretKey | None) -> Path:
    path = tmp / "audit.jsonl"
    with audit.AuditLog.open(path, key=key) as log:
        log.append("policy_accepted", serial=1)
        log.append("applied", enforcer="nft")
    return path


def test_audit_verify_without_key_says_unverified(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    key = minisign.generate()
    path = _log(tmp_path, key)
    assert main(["audit", "verify", str(path)]) == 1
    assert "UNVERIFIED: no signature was checked" in capsys.readouterr().out
    assert main(["audit", "verify", "--no-key", str(path)]) == 0
    assert "UNVERIFIED (--no-key" in capsys.readouterr().out
    pub = tmp_path / "op.pub"
    pub.write_text(key.public.to_text())
    assert main(["audit", "verify", "--key", str(pub), str(path)]) == 0
    assert "head seq 2" in capsys.readouterr().out


def test_audit_verify_reports_an_unsigned_entry_after_the_signed_head(tmp_path: Path,
                                                                       capsys: pytest.CaptureFixture[str]) -> None:
    key = minisign.generate()
    path = _log(tmp_path, key)
    lines = path.read_bytes().splitlines()
    prev = hashlib.sha256(lines[-1]).hexdigest()
    forged = audit.canonical({"event": "policy_accepted", "prev": prev, "seq": 3, "time": "2026-11-29T12:00:00Z"})
    with path.open("ab") as f:
        f.write(forged + b"\n")
    pub = tmp_path / "op.pub"
    pub.write_text(key.public.to_text())
    assert main(["audit", "verify", "--key", str(pub), "--json", str(path)]) == 1
    out = json.loads(capsys.readouterr().out)
    assert out["head"]["seq"] == 2 and out["unsigned_entries"] == 1 and out["ok"] is False
    assert main(["audit", "verify", "--key", str(pub), str(path)]) == 1
    assert "entry 3 comes after the signed head and is NOT covered by a signature (unsigned)" in capsys.readouterr().out


# --- write failures ----------------------------------------------------------------------------

def _settings(tmp: Path, **daemon: Any) -> Settings:
    return Settings(trust_store=tmp, policy_dir=tmp, catalog_dir=tmp, prefix_table=None, shared_infra_dir=None,
                    state_dir=tmp / "state", daemon=DaemonSettings(**daemon))


def _result() -> PassResult:
    return PassResult(COMP, (BOTH,), (), (), {"dns": held("dns", NAMES).applied}, {}, True, None, {BOTH.digest: NOW})


@pytest.mark.skipif(os.geteuid() == 0, reason="root ignores directory permissions; the e2e test uses chattr +i")
def test_unwritable_export_dir_is_counted_and_retried_without_a_gap(tmp_path: Path) -> None:
    _unwritable_case(tmp_path, lambda d: d.chmod(0o500), lambda d: d.chmod(0o700))


@pytest.mark.skipif(os.geteuid() != 0, reason="chattr +i needs root")
def test_immutable_export_dir_is_counted_and_retried_without_a_gap(tmp_path: Path) -> None:
    run = lambda flag: lambda d: subprocess.run(["chattr", flag, str(d)], check=True)  # noqa: E731
    _unwritable_case(tmp_path, run("+i"), run("-i"))


def _unwritable_case(tmp_path: Path, lock: Any, unlock: Any) -> None:
    key = minisign.generate()
    (tmp_path / "op.key").write_text(key.to_text())
    export = tmp_path / "export"
    export.mkdir()
    failures: list[str] = []
    acc = Accountability(_settings(tmp_path, attest_dir=str(export), operator_contact="noc@isp.example"),
                         audit.AuditLog.open(tmp_path / "audit.jsonl", key=key), key, failures.append)
    passes = {"dns": held("dns", NAMES)}
    r = _result()
    assert acc.attest(r, passes, "change") is not None
    lock(export)
    try:
        assert acc.attest(r, passes, "change") is None and acc.owed == "change" and acc.behind
        acc.retry(r, passes)
        assert failures == ["attestation", "attestation"]
    finally:
        unlock(export)
    path = acc.attest(r, passes, "periodic")
    assert path is not None and not acc.behind
    files = sorted(export.glob("attestation-*.json"))
    assert len(files) == 2
    sts = [(f.name, hashlib.sha256(f.read_bytes()).hexdigest(), json.loads(f.read_bytes())) for f in files]
    assert attest.chain(sts) == []  # seq 1, 2: the failed writes used no number
    assert sts[1][2]["predicate"]["operator"]["contact"] == "noc@isp.example"
    text = (tmp_path / "audit.jsonl").read_text()
    assert '"event":"write_recovered"' in text and '"kind":"attestation"' in text
    assert audit.verify(tmp_path / "audit.jsonl", public_key=key.public).entries >= 3


def test_audit_append_failure_keeps_events_in_order_and_the_chain_verifiable(tmp_path: Path) -> None:
    """The log's file system refuses writes (RLIMIT_FSIZE stands in for a full disk)."""
    code = f"""
import resource, signal, sys
sys.path.insert(0, {str(Path(__file__).resolve().parents[2])!r})
from pathlib import Path
from blockd import audit
from blockd.accountability import Accountability
from tests.unit.test_truthful_statements import _settings
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
tmp = Path({str(tmp_path)!r})
failures = []
log = audit.AuditLog.open(tmp / "audit.jsonl")
acc = Accountability(_settings(tmp, audit_log=str(tmp / "audit.jsonl")), log, None, failures.append)
acc.event("first")
size = (tmp / "audit.jsonl").stat().st_size
resource.setrlimit(resource.RLIMIT_FSIZE, (size + 10, resource.RLIM_INFINITY))
acc.event("second", n=2)
acc.event("third", n=3)
assert acc.behind and failures and set(failures) == {{"audit"}}, failures
resource.setrlimit(resource.RLIMIT_FSIZE, (resource.RLIM_INFINITY, resource.RLIM_INFINITY))
acc.retry(None, {{}})
assert not acc.behind
print(len(failures))
"""
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    lines = [json.loads(x) for x in (tmp_path / "audit.jsonl").read_text().splitlines()]
    assert [x["event"] for x in lines] == ["first", "second", "third", "write_recovered"]
    assert "occurred_at" in lines[1] and "occurred_at" not in lines[0]
    assert lines[3]["kind"] == "audit" and lines[3]["failures"] >= 2
    assert audit.verify(tmp_path / "audit.jsonl").entries == 4


def test_deadline_at_risk_only_while_an_enforcer_fails() -> None:
    t = tte.timing(issued_at=NOW, received_at=NOW, verified_at=NOW, deadline=NOW + timedelta(hours=1),
                   status="enforced", enforced_at={"dns": NOW}, enforcers=["dns", "nft"], now=NOW, failing=["nft"])
    assert t.deadline_status == "at_risk"
    t = tte.timing(issued_at=NOW, received_at=NOW, verified_at=NOW, deadline=NOW + timedelta(hours=1),
                   status="enforced", enforced_at={"dns": NOW}, enforcers=["dns", "nft"], now=NOW)
    assert t.deadline_status == "open"


DOC = Path(__file__).resolve().parents[2] / "docs" / "attestation.md"


def doc_steps() -> str:
    text = DOC.read_text()
    section = text[text.index("## How to verify"):text.index("## The statement")]
    return section[section.index("```sh\n") + 6:section.index("```", section.index("```sh\n") + 6)]


def test_the_documented_steps_agree_with_attest_verify(tmp_path: Path) -> None:
    """docs/attestation.md "How to verify", run literally with bash + minisign + jq, gives the
    same verdict as `blockd attest verify` on good, one-element-off, failed and gapped statements."""
    missing = [t for t in ("minisign", "jq", "sha256sum", "bash") if __import__("shutil").which(t) is None]
    if missing:
        pytest.fail(f"{', '.join(missing)} not installed (scripts/deps.sh installs them)")
    key = minisign.generate()
    pub = tmp_path / "op.pub"
    pub.write_text(key.public.to_text())
    good = {"nft": held("nft", ADDRS), "dns": held("dns", NAMES)}
    off = RuleSet.build(v4=[*ADDRS.v4, NetRule(0x0A000000, 0x0A000000, frozenset())])
    failed = {"nft": attest.EnforcerPass(None, NOW, "ENOTSUP", ADDRS.digest), "dns": held("dns", NAMES)}
    first, sha1 = attest.issue(tmp_path / "a", statement(good, seq=1), key)
    second, _ = attest.issue(tmp_path / "a", statement(good, seq=2, previous_sha256=sha1), key)
    cases = [  # (file, previous, expected ok)
        (first, None, True),
        (second, first, True),
        (attest.issue(tmp_path / "b", statement({**good, "nft": held("nft", ADDRS, off)}), key)[0], None, False),
        (attest.issue(tmp_path / "c", statement(failed), key)[0], None, False),
        (attest.issue(tmp_path / "d", statement(good, seq=3, previous_sha256=sha1), key)[0], first, False),
    ]
    script = doc_steps()
    for path, prev, ok in cases:
        env = dict(os.environ, FILE=str(path), KEY=str(pub), PREV=str(prev or ""))
        run = subprocess.run(["bash", "-euo", "pipefail", "-c", script], env=env, capture_output=True, text=True,
                             timeout=60)
        assert (run.returncode == 0) is ok, (path, run.stdout, run.stderr)
        cli = main(["attest", "verify", "--key", str(pub), *([str(prev)] if prev else []), str(path)])
        assert (cli == 0) is ok, path


@pytest.mark.skipif(os.geteuid() != 0, reason="chattr +i needs root")
def test_an_audit_log_that_cannot_be_opened_at_start_is_retried(tmp_path: Path) -> None:
    """A restart with an immutable audit log must not crash: events wait, statements say the
    audit head is unknown, and once it opens the events are appended and the chain verifies."""
    key = minisign.generate()
    (tmp_path / "op.key").write_text(key.to_text())
    log = tmp_path / "audit.jsonl"
    audit.AuditLog.open(log, key=key).close()
    subprocess.run(["chattr", "+i", str(log)], check=True)
    failures: list[str] = []
    try:
        acc = Accountability.from_settings(_settings(tmp_path, audit_log=str(log), attest_dir=str(tmp_path / "x"),
                                                     operator_key=str(tmp_path / "op.key")), failures.append)
        assert acc is not None and acc.audit is None and failures == ["audit"]
        acc.event("policy_accepted", serial=1)
        path = acc.attest(_result(), {"dns": held("dns", NAMES)}, "change")
        assert path is not None and json.loads(path.read_bytes())["predicate"]["audit"] == {"seq": None, "sha256": None}
        assert acc.behind
    finally:
        subprocess.run(["chattr", "-i", str(log)], check=True)
    acc.retry(_result(), {"dns": held("dns", NAMES)})
    assert not acc.behind and acc.audit is not None
    events = [json.loads(x)["event"] for x in log.read_text().splitlines()]
    assert events == ["policy_accepted", "attestation_issued", "write_recovered"]
    assert audit.verify(log, public_key=key.public).entries == 3


def test_passes_queued_behind_a_statement_are_stated_once_by_the_newest(tmp_path: Path) -> None:
    """The accountant records every pass it was given, and one statement stands for those
    queued behind another: made by the newest, owed until then, never dropped."""
    key = minisign.generate()
    (tmp_path / "op.key").write_text(key.to_text())
    export = tmp_path / "export"
    export.mkdir()
    acc = Accountability(_settings(tmp_path, attest_dir=str(export)), None, key, lambda kind: None)
    passes = {"dns": held("dns", NAMES)}
    unchanged = replace(_result(), changed=False)
    for statement, r, files in [(False, _result(), 0),  # a change queued behind a later pass: owed
                                (False, unchanged, 0),  # still owed
                                (True, unchanged, 1),   # the newest pays it
                                (True, unchanged, 1)]:  # nothing owed, nothing changed: no statement
        acc.after_pass(r, passes, statement=statement)
        assert len(list(export.glob("attestation-*.json"))) == files
