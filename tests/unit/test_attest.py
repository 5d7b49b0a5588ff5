"""attest + tte: statement contents, caps, determinism, signing, real `minisign -V`, tamper checks."""

from __future__ import annotations

import hashlib
import json
import re
import shutil
import subprocess
from datetime import datetime, timedelta, timezone
from pathlib import Path
from types import MappingProxyType
from typing import Any

import pytest

from blockd import attest, audit, minisign, tte
from blockd.compile import CompileSettings, Compilation, compile_policies
from blockd.errors import SignatureError
from blockd.guards import Guards, SharedInfra, default_psl
from blockd.model import Applied, Catalog, Policy
from blockd.policy import parse_policy

UTC = timezone.utc
T1 = datetime(2026, 11, 28, 6, 0, tzinfo=UTC)  # first pass: both enforcers in sync
NOW = datetime(2026, 11, 29, 12, 0, tzinfo=UTC)  # this pass: dns drifted
SETTINGS = CompileSettings(Guards(default_psl(), SharedInfra.build(())))
CATALOG = Catalog(MappingProxyType({}))
MINISIGN = shutil.which("minisign")


def policy(issuer: str, serial: int, issued: str, not_before: str, orders: str) -> Policy:
    text = (f"issuer: {issuer}\nserial: {serial}\nissued_at: {issued}\nnot_before: {not_before}\n"
            f"not_after: 2030-01-01T00:00:00Z\norders:\n{orders}")
    return parse_policy(text.encode(), f"/var/lib/blockd/incoming/{issuer}-{serial}.yaml")


def order(oid: str, targets: str, *, action: str = "block", deadline: str | None = None) -> str:
    extra = f"    deadline: {deadline}\n" if deadline else ""
    return (f"  - id: {oid}\n    legal_basis: {{authority: Court, reference: case-{oid}}}\n"
            f"    action: {action}\n    targets: {targets}\n{extra}")


OLD = policy("reg", 1, "2026-11-01T00:00:00Z", "2026-11-01T00:00:00Z", order("o1", "{domains: [example.org]}"))
CUR = policy("reg", 2, "2026-11-28T00:00:00Z", "2026-11-28T00:00:00Z", "".join([
    order("o1", "{domains: [example.org]}", deadline="2026-11-29T00:00:00Z"),
    order("o2", "{cidrs: [10.0.0.0/8]}", deadline="2026-11-30T00:00:00Z"),
    order("o3", "{domains: [late.example.net]}", deadline="2026-11-28T01:00:00Z"),
    order("o4", "{domains: [x.example.org]}", action="unblock"),
    order("o5", "{cidrs: [192.0.2.0/24, 11.0.0.0/8]}"),
]))
LATER = policy("reg2", 1, "2026-11-28T00:00:00Z", "2026-12-01T00:00:00Z",
               order("p1", "{domains: [pending.example]}", deadline="2026-11-29T06:00:00Z"))
POLICIES = [OLD, CUR, LATER]
RECEIVED = {OLD.digest: NOW - timedelta(days=20), CUR.digest: datetime(2026, 11, 28, 2, 0, tzinfo=UTC),
            LATER.digest: datetime(2026, 11, 28, 3, 0, tzinfo=UTC)}


def applied(name: str, comp: Compilation, *, drifted: bool = False) -> Applied:
    return Applied(name, "f" * 64 if drifted else comp.ruleset.digest, comp.ruleset.digest, 3, 0, 0.0125,
                   MappingProxyType({**comp.ruleset.counts(), **({"domain_exact": 0} if drifted else {})}))


@pytest.fixture(scope="module")
def scenario() -> dict[str, Any]:
    first = compile_policies(POLICIES, CATALOG, SETTINGS, T1)
    enforced = tte.record({}, POLICIES, first.orders, {"nft": T1, "dns": T1 + timedelta(seconds=2)})
    comp = compile_policies(POLICIES, CATALOG, SETTINGS, NOW)
    passes = {"nft": attest.EnforcerPass(applied("nft", comp), NOW),
              "dns": attest.EnforcerPass(applied("dns", comp, drifted=True), NOW)}
    # dns is out of sync now: nothing new is recorded for it, the first times stay
    enforced = tte.record(enforced, POLICIES, comp.orders, {"nft": NOW, "dns": None})
    return {"comp": comp, "passes": passes, "enforced": enforced}


def build(s: dict[str, Any], **kw: Any) -> dict[str, Any]:
    args: dict[str, Any] = dict(
        policies=[attest.Received(p, RECEIVED[p.digest], RECEIVED[p.digest] + timedelta(seconds=1)) for p in POLICIES],
        compilation=s["comp"], enforcers=s["passes"], enforced=s["enforced"],
        audit_head=audit.Head(12, "ab" * 32), operator=attest.Operator("ISP Example AS64500", "noc@example.net"),
        host="edge-1", now=NOW, seq=7,
        rejected=[attest.RejectedFile("bad.yaml", "signature by unknown key 0123", "cd" * 32)],
    )
    args.update(kw)
    return attest.build_statement(**args)


def orders_of(st: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {f"{o['key']}@{p['serial']}": o for p in st["predicate"]["policies"] for o in p["orders"]}


# key@serial, status, deadline_status, issued_to_enforced_s, enforced on nft
ORDER_CASES = [
    ("reg/o1@2", "enforced", "met", 6 * 3600 + 2, "2026-11-28T06:00:00Z"),
    ("reg/o2@2", "refused", "refused", None, None),
    ("reg/o3@2", "enforced", "missed", 6 * 3600 + 2, "2026-11-28T06:00:00Z"),
    ("reg/o4@2", "unblocked", "none", 6 * 3600 + 2, "2026-11-28T06:00:00Z"),
    ("reg/o5@2", "partially_refused", "none", 6 * 3600 + 2, "2026-11-28T06:00:00Z"),
    ("reg/o1@1", "superseded", "not_applicable", None, None),
    ("reg2/p1@1", "pending", "missed", None, None),
]


@pytest.mark.parametrize("key, status, deadline, tte_s, nft_at", ORDER_CASES, ids=[c[0] for c in ORDER_CASES])
def test_order_status_timing_and_deadline(scenario: dict[str, Any], key: str, status: str, deadline: str,
                                          tte_s: float | None, nft_at: str | None) -> None:
    o = orders_of(build(scenario))[key]
    assert (o["status"], o["deadline_status"], o["issued_to_enforced_s"]) == (status, deadline, tte_s)
    assert o["enforced_at"].get("nft") == nft_at
    if tte_s is not None:
        assert o["enforced_everywhere_at"] == "2026-11-28T06:00:02Z"  # the later of the two enforcers
        assert o["received_to_enforced_s"] == 4 * 3600 + 2
    if status == "pending":
        assert o["pending_until"] == "2026-12-01T00:00:00Z"


def test_statement_shape_subjects_enforcers_and_bounded_findings(scenario: dict[str, Any]) -> None:
    st = build(scenario)
    assert st["_type"] == "https://in-toto.io/Statement/v1"
    assert st["predicateType"] == "https://blockd.dev/attestation/enforcement/v1"
    assert st["subject"] == sorted(({"name": Path(p.source).name, "digest": {"sha256": p.digest}} for p in POLICIES),
                                   key=lambda s: s["name"])
    pred = st["predicate"]
    assert pred["attestation"] == {"id": "20261129T120000Z-000007", "seq": 7, "issued_at": "2026-11-29T12:00:00Z",
                                   "reason": "change", "previous_sha256": None}
    assert pred["producer"]["host"] == "edge-1"
    assert pred["audit"] == {"seq": 12, "sha256": "ab" * 32}
    comp = scenario["comp"]
    assert pred["ruleset"]["digest"] == comp.ruleset.digest
    # the read-back digest, not the intended one
    assert pred["enforcers"]["dns"]["readback_digest"] == "f" * 64
    assert pred["enforcers"]["dns"]["committed_digest"] == comp.ruleset.digest
    assert pred["enforcers"]["dns"]["share_digest"] == comp.ruleset.digest
    assert pred["enforcers"]["dns"]["status"] == "out_of_sync"
    assert pred["enforcers"]["dns"]["counts"]["domain_exact"] == 0
    assert (pred["enforcers"]["nft"]["in_sync"], pred["enforcers"]["dns"]["in_sync"], pred["in_sync"]) == (True, False, False)
    assert [p["status"] for p in pred["policies"]] == ["superseded", "active", "pending"]
    assert pred["policies"][1]["received_at"] == "2026-11-28T02:00:00Z"
    assert pred["rejected"][0]["reason"].startswith("signature by unknown key")
    f = pred["findings"]
    assert (f["total"], f["refused"], f["allowed"], f["truncated"]) == (2, 2, 0, False)
    assert {x["guard"] for x in f["listed"]} == {"min_prefix"}
    assert orders_of(st)["reg/o2@2"]["refused"] == {"min_prefix": 1}
    assert orders_of(st)["reg/o2@2"]["first_refusal"] == {
        "rule": "10.0.0.0/8", "guard": "min_prefix", "reason": "/8 covers 16,777,216 addresses; the limit is /16"}
    assert orders_of(st)["reg/o1@2"]["first_refusal"] is None
    assert pred["orders"]["by_deadline_status"] == {"met": 1, "refused": 1, "missed": 2, "none": 2, "not_applicable": 1}


def test_caps_keep_totals_and_list_the_interesting_orders_first(scenario: dict[str, Any]) -> None:
    full = build(scenario)["predicate"]
    small = build(scenario, limits=attest.Limits(max_findings=1, max_orders=2))["predicate"]
    assert (small["findings"]["total"], len(small["findings"]["listed"]), small["findings"]["truncated"]) == (2, 1, True)
    assert small["findings"]["sha256"] == full["findings"]["sha256"]
    assert hashlib.sha256(audit.canonical(full["findings"]["listed"])).hexdigest() == full["findings"]["sha256"]
    assert (small["orders"]["total"], small["orders"]["listed"], small["orders"]["truncated"]) == (7, 2, True)
    assert sorted(orders_of({"predicate": small})) == ["reg/o3@2", "reg2/p1@1"]  # the missed deadlines
    assert small["orders"]["sha256"] == full["orders"]["sha256"]


def test_statement_and_signature_are_deterministic(scenario: dict[str, Any]) -> None:
    key = minisign.generate()
    a, b = build(scenario), build(scenario)
    assert attest.sign(a, key) == attest.sign(b, key)
    data, _ = attest.sign(a, key)
    assert json.loads(data) == a
    assert data == json.dumps(a, sort_keys=True, indent=2, ensure_ascii=False).encode() + b"\n"


@pytest.fixture
def written(scenario: dict[str, Any], tmp_path: Path) -> tuple[Path, minisign.SecretKey, Path]:
    key = minisign.generate()
    pub = tmp_path / "operator.pub"
    pub.write_text(key.public.to_text())
    path, sha = attest.issue(tmp_path / "export", build(scenario), key)
    assert sha == hashlib.sha256(path.read_bytes()).hexdigest()
    return path, key, pub


def test_write_verify_and_latest(written: tuple[Path, minisign.SecretKey, Path], scenario: dict[str, Any]) -> None:
    path, key, _ = written
    export = path.parent
    assert path.name == "attestation-20261129T120000Z-000007.json"
    assert sorted(p.name for p in export.iterdir()) == [path.name, path.name + ".minisig", "latest.json",
                                                         "latest.json.minisig"]
    assert attest.verify(path, key.public) == build(scenario)
    assert attest.verify(export / "latest.json", key.public) == build(scenario)
    assert attest.last(export) == (7, hashlib.sha256(path.read_bytes()).hexdigest())
    assert attest.last(export / "nothing") is None
    sig = minisign.parse_signature((export / "latest.json.minisig").read_text())
    assert "id:20261129T120000Z-000007" in sig.trusted_comment


def test_verify_errors_say_what_is_wrong(written: tuple[Path, minisign.SecretKey, Path], tmp_path: Path) -> None:
    path, key, _ = written
    with pytest.raises(SignatureError, match="does not match public key"):
        attest.verify(path, minisign.generate().public)
    with pytest.raises(SignatureError, match="attestation file not found"):
        attest.verify(tmp_path / "nope.json", key.public)
    other = tmp_path / "copy.json"
    other.write_bytes(path.read_bytes())
    with pytest.raises(SignatureError, match="signature file copy.json.minisig not found"):
        attest.verify(other, key.public)
    sig = path.with_name(path.name + ".minisig")
    sig.write_text(sig.read_text().replace("in_sync:false", "in_sync:true"))
    with pytest.raises(SignatureError, match="trusted comment .* does not match its global signature"):
        attest.verify(path, key.public)


def test_signed_by_key_but_not_an_attestation(tmp_path: Path) -> None:
    key = minisign.generate()
    path = tmp_path / "x.json"
    path.write_bytes(b'{"_type": "something else"}')
    path.with_name("x.json.minisig").write_text(minisign.sign(path.read_bytes(), key, trusted_comment="t"))
    with pytest.raises(SignatureError, match="signed, but _type is not 'https://in-toto.io/Statement/v1'"):
        attest.verify(path, key.public)


def _minisign_verify(path: Path, pub: Path) -> subprocess.CompletedProcess[str]:
    assert MINISIGN is not None
    return subprocess.run([MINISIGN, "-V", "-m", str(path), "-p", str(pub)], capture_output=True, text=True,
                          timeout=30, check=False)


@pytest.mark.skipif(MINISIGN is None, reason="minisign CLI not installed")
def test_stock_minisign_verifies_the_attestation(written: tuple[Path, minisign.SecretKey, Path]) -> None:
    path, _, pub = written
    for target in (path, path.parent / "latest.json"):
        run = _minisign_verify(target, pub)
        assert run.returncode == 0, run.stderr
        assert "Signature and comment signature verified" in run.stdout
        assert "id:20261129T120000Z-000007" in run.stdout


def test_one_byte_change_anywhere_fails_blockd_verify(written: tuple[Path, minisign.SecretKey, Path]) -> None:
    path, key, _ = written
    data = path.read_bytes()
    sig = minisign.parse_signature(path.with_name(path.name + ".minisig").read_text())
    # every byte, in memory (the check attest.verify makes first) ...
    for i in range(len(data)):
        with pytest.raises(SignatureError, match="does not match the file's contents"):
            minisign.verify(data[:i] + bytes([data[i] ^ 0x01]) + data[i + 1:], sig, key.public)
    # ... and through the file for a sample, plus an appended byte
    for changed in [bytes([data[0] ^ 1]) + data[1:], data[:-1] + b"\r", data + b" "]:
        path.write_bytes(changed)
        with pytest.raises(SignatureError, match="does not match the file's contents"):
            attest.verify(path, key.public)


@pytest.mark.skipif(MINISIGN is None, reason="minisign CLI not installed")
def test_one_byte_change_fails_stock_minisign(written: tuple[Path, minisign.SecretKey, Path]) -> None:
    path, _, pub = written
    data = path.read_bytes()
    text = data.decode()
    spots = [0, len(data) // 2, len(data) - 1, text.index('"readback_digest"') + 25, text.index('"in_sync"') + 12,
             text.index("2026-11-28T06:00:00Z") + 12]
    for i in spots:
        path.write_bytes(data[:i] + bytes([data[i] ^ 0x01]) + data[i + 1:])
        run = _minisign_verify(path, pub)
        assert run.returncode != 0, f"byte {i} changed but minisign accepted it"
        assert "Signature verification failed" in run.stderr


def test_statement_binds_the_audit_head(tmp_path: Path, scenario: dict[str, Any]) -> None:
    log_path = tmp_path / "audit.jsonl"
    with audit.AuditLog.open(log_path, clock=lambda: NOW) as log:
        log.append("policy_accepted", policy="reg-2.yaml")
        log.append("ruleset_applied", enforcer="nft")
        st = build(scenario, audit_head=log.head())
        log.append("attestation_issued", id=st["predicate"]["attestation"]["id"])
    assert audit.verify(log_path, anchors=[attest.audit_head(st)]).entries == 3
    log_path.write_bytes(b"".join(log_path.read_bytes().splitlines(keepends=True)[:1]))
    audit.head_path(log_path).unlink()  # an attacker removed the local head too: the signed anchor remains
    with pytest.raises(audit.AuditError, match="anchor records seq 2"):
        audit.verify(log_path, anchors=[attest.audit_head(st)], require_head=False)


# deadline, enforced everywhere at, status -> deadline status (now = NOW)
D = datetime(2026, 11, 29, 0, 0, tzinfo=UTC)
DEADLINE_CASES = [
    (D, D, "enforced", "met"),
    (D, D + timedelta(seconds=1), "enforced", "missed"),
    (D, None, "enforced", "missed"),  # past deadline, still not everywhere
    (NOW + timedelta(hours=1), None, "pending", "open"),
    (D, None, "pending", "missed"),
    (None, None, "enforced", "none"),
    (None, D, "enforced", "none"),
    (D, None, "refused", "refused"),
    (D, None, "expired", "not_applicable"),
    (D, D - timedelta(days=1), "superseded", "met"),
]


@pytest.mark.parametrize("deadline, enforced, status, want", DEADLINE_CASES)
def test_deadline_status(deadline: datetime | None, enforced: datetime | None, status: str, want: str) -> None:
    assert tte.deadline_status(deadline, enforced, status, NOW) == want


def test_record_keeps_first_times_and_times_each_serial_afresh() -> None:
    first = compile_policies([OLD], CATALOG, SETTINGS, T1)
    rec = tte.record({}, [OLD], first.orders, {"nft": T1, "dns": None})
    assert rec == {"reg/o1@1": {"nft": T1}}
    later = T1 + timedelta(hours=1)
    assert tte.record(rec, [OLD], first.orders, {"nft": later, "dns": later}) == {"reg/o1@1": {"nft": T1, "dns": later}}
    both = compile_policies([OLD, CUR], CATALOG, SETTINGS, T1)
    rec2 = tte.record(rec, [OLD, CUR], both.orders, {"nft": later, "dns": None})
    assert rec2["reg/o1@2"] == {"nft": later}  # the new serial is timed from its own first pass
    assert "reg/o2@2" not in rec2  # refused: nothing held
    assert rec2["reg/o1@1"] == {"nft": T1}  # history of the superseded serial is kept while it is passed in
    assert tte.record(rec2, [CUR], both.orders, {}) == {k: v for k, v in rec2.items() if k.endswith("@2")}


def test_timing_with_no_enforcers_is_never_enforced() -> None:
    t = tte.timing(issued_at=T1, received_at=None, verified_at=None, deadline=None, status="enforced",
                   enforced_at={"nft": T1}, enforcers=[], now=NOW)
    assert (t.enforced_everywhere_at, t.issued_to_enforced_s, dict(t.enforced_at)) == (None, None, {})


def test_the_example_in_docs_verifies(tmp_path: Path) -> None:
    doc = (Path(__file__).resolve().parents[2] / "docs" / "attestation.md").read_text()
    blocks = re.findall(r"```(?:\w*)\n(.*?)```", doc, re.S)
    pub = next(b for b in blocks if b.startswith("untrusted comment: minisign public key"))
    statement = next(b for b in blocks if b.startswith('{\n  "_type"'))
    sig = next(b for b in blocks if b.startswith("untrusted comment: blockd attestation"))
    path = tmp_path / "example.json"
    path.write_text(statement)
    path.with_name("example.json.minisig").write_text(sig)
    got = attest.verify(path, minisign.parse_public_key(pub))
    assert got["predicate"]["orders"]["by_deadline_status"] == {"met": 1, "refused": 1}


def test_enforced_record_round_trips_through_json() -> None:
    rec = {"reg/o1@2": {"nft": T1, "dns": T1 + timedelta(microseconds=5)}}
    text = json.dumps(tte.to_json(rec))
    assert tte.from_json(json.loads(text)) == rec
    with pytest.raises(ValueError, match="state.json: reg/o1@2: times must be ISO 8601"):
        tte.from_json({"reg/o1@2": {"nft": "yesterday"}}, "state.json")
