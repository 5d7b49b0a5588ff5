"""blockd compliance: statements from real passes (the fixture generator) -> per order x operator
verdicts, chain problems, exit codes, JSON schema; plus pure cases built from one real statement."""

from __future__ import annotations

import asyncio
import hashlib
import json
import shutil
from dataclasses import replace
from datetime import timedelta
from pathlib import Path
from typing import Any

import pytest

from blockd import attest, minisign
from blockd.__main__ import main
from blockd.compliance import evaluate, fixture, report, statements
from blockd.compliance.check import check
from blockd.settings import defaults

ROOT = Path(__file__).resolve().parents[2]
SCHEMA = json.loads((ROOT / "docs/compliance.schema.json").read_text())
NOW = fixture.NOW


@pytest.fixture(scope="module")
def fx(tmp_path_factory: pytest.TempPathFactory) -> fixture.Fixture:
    return asyncio.run(fixture.generate(tmp_path_factory.mktemp("fleet"), operators=7))


def run_check(fx: fixture.Fixture, **kw: Any) -> dict[str, Any]:
    rep, refused = check([fx.policies], kw.get("keys", fx.keys), kw.get("statements", fx.statements),
                         defaults(ROOT), kw.get("now", NOW), kw.get("max_age", 25 * 3600))
    return report.to_json(rep, refused_inputs=refused)


@pytest.fixture(scope="module")
def doc(fx: fixture.Fixture) -> dict[str, Any]:
    return run_check(fx)


def cell(doc: dict[str, Any], operator: str, order: str) -> dict[str, Any]:
    (c,) = [c for c in doc["cells"] if c["operator"] == operator and c["order"] == f"demo-regulator/{order}"]
    return c


def op(doc: dict[str, Any], name: str) -> dict[str, Any]:
    (o,) = [o for o in doc["operators"] if o["name"] == name]
    return o


# operator (role) -> verdicts for (fx-telegram deadline 24 h, fx-casino 6 h, fx-mirror 7 d), and a
# fragment every one of whose problems lists must contain
CASES = [
    ("alpha", "on_time", ("complies", "complies", "complies"), None),
    ("bravo", "late", ("late", "late", "complies"), None),
    ("charlie", "out_of_sync", ("out_of_sync",) * 3, "dns (dns) read back 19 domain_subtree; the orders expand to 20"),
    ("delta", "tampered", ("complies",) * 3, "does not match the file's contents"),
    ("echo", "stale", ("out_of_sync",) * 3, "stale"),
    ("foxtrot", "gap", ("complies",) * 3, "seq 3 missing between"),
    ("golf", "on_time", ("complies",) * 3, None),
]


@pytest.mark.parametrize(("name", "role", "verdicts", "problem"), CASES)
def test_operator_verdicts(doc: dict[str, Any], fx: fixture.Fixture, name: str, role: str,
                           verdicts: tuple[str, ...], problem: str | None) -> None:
    assert fx.operators[name] == role
    got = tuple(cell(doc, name, o)["verdict"] for o in ("fx-telegram", "fx-casino", "fx-mirror"))
    assert got == verdicts
    o = op(doc, name)
    assert o["complies"] == (role == "on_time")
    if problem is None:
        assert o["problems"] == []
    else:
        assert any(problem in p for p in o["problems"]), o["problems"]


def test_cell_details(doc: dict[str, Any], fx: fixture.Fixture) -> None:
    a = cell(doc, "alpha", "fx-telegram")
    assert a["where"] == ["dns", "kernel"] and a["first_enforced_at"] == "2026-11-20T00:10:00Z"
    assert a["issued_to_enforced_s"] == 600 and a["deadline_status"] == "met" and a["in_sync"] is True
    assert a["rules"] == a["expected_rules"] == next(o["rules"] for o in doc["orders"] if o["id"] == "fx-telegram")
    assert a["received_to_enforced_s"] == 0 and a["evidence"].endswith("alpha/attestation-20261120T001000Z-000001.json")
    b = cell(doc, "bravo", "fx-casino")
    assert (b["issued_to_enforced_s"], b["deadline_status"]) == (30 * 3600, "missed")
    assert b["evidence"].endswith("-000002.json")  # seq 1 was before it received the orders
    assert cell(doc, "charlie", "fx-casino")["in_sync"] is False
    assert op(doc, "delta")["failed"][0]["path"].endswith("-000002.json")
    assert op(doc, "bravo")["failing"] == ["demo-regulator/fx-telegram: late", "demo-regulator/fx-casino: late"]


def test_verdict_and_exit_codes(doc: dict[str, Any], fx: fixture.Fixture, tmp_path: Path) -> None:
    assert (doc["verdict"], doc["exit_code"]) == ("not_comply", 1)
    assert doc["summary"]["complying"] == 2 and doc["summary"]["cells"]["late"] == 2
    # Only the on-time operators: every operator complies.
    keys, sts = tmp_path / "keys", tmp_path / "statements"
    for name in ("alpha", "golf"):
        (keys).mkdir(exist_ok=True)
        shutil.copy(fx.keys / f"{name}.pub", keys)
        shutil.copytree(fx.statements / name, sts / name)
    good = run_check(fx, keys=keys, statements=sts)
    assert (good["verdict"], good["exit_code"]) == ("comply", 0)
    # Earlier, before the 6 h deadline and with bravo still waiting: only pending.
    shutil.copy(fx.keys / "bravo.pub", keys)
    (sts / "bravo").mkdir()
    for f in sorted((fx.statements / "bravo").glob("attestation-*000001.json*")):
        shutil.copy(f, sts / "bravo")
    for name in ("alpha", "golf"):
        for f in (sts / name).glob("attestation-2026112[123]*"):
            f.unlink()
        for f in (sts / name).glob("latest.json*"):
            f.unlink()
    early = run_check(fx, keys=keys, statements=sts, now=fixture.T0 + timedelta(hours=2))
    assert cell(early, "bravo", "fx-casino")["verdict"] == "pending"
    assert (early["verdict"], early["exit_code"]) == ("pending", 3), report.text(early, verbose=True)
    # Past the deadline, the same statements: missed.
    late = run_check(fx, keys=keys, statements=sts, now=fixture.T0 + timedelta(hours=7))
    assert cell(late, "bravo", "fx-casino")["verdict"] == "missed" and late["exit_code"] == 1


def test_trust_store_layout_and_bad_key_refused_alone(fx: fixture.Fixture, tmp_path: Path) -> None:
    keys = tmp_path / "trust"
    for name in ("alpha", "golf"):
        (keys / name).mkdir(parents=True)
        shutil.copy(fx.keys / f"{name}.pub", keys / name / "key1.pub")
        (keys / name / "issuer.yaml").write_text("roles: [policy]\n")
    (keys / "broken").mkdir()
    (keys / "broken" / "k.pub").write_text("untrusted comment: x\nnot base64 at all\n")
    got = run_check(fx, keys=keys)
    assert op(got, "alpha")["complies"] and op(got, "golf")["complies"]
    assert any("operator key unusable" in p for p in op(got, "broken")["problems"])
    # Statements from operators whose keys are not given: unattributed, never silently dropped.
    assert {Path(f["path"]).parent.name for f in got["unattributed"]} >= {"bravo", "charlie", "delta"}
    assert got["exit_code"] == 1


def test_bad_regulator_policy_refused_alone(fx: fixture.Fixture, tmp_path: Path) -> None:
    pol = tmp_path / "pol"
    shutil.copytree(fx.policies, pol)
    (pol / "forged.yaml").write_text((pol / fixture.FILE).read_text().replace("serial: 7", "serial: 8"))
    shutil.copy(pol / f"{fixture.FILE}.minisig", pol / "forged.yaml.minisig")
    keys = tmp_path / "keys"
    keys.mkdir()
    shutil.copy(fx.keys / "alpha.pub", keys)
    rep, refused = check([pol], keys, fx.statements / "alpha", defaults(ROOT), NOW, 25 * 3600)
    got = report.to_json(rep, refused_inputs=refused)
    assert [Path(str(r["path"])).name for r in got["refused_inputs"]] == ["forged.yaml"]
    assert "signature" in str(got["refused_inputs"][0]["error"])
    assert op(got, "alpha")["complies"] and got["exit_code"] == 2


def test_cli_text_json_and_exit(fx: fixture.Fixture, capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    args = ["compliance", "--policies", str(fx.policies), "--operators", str(fx.keys), "--statements",
            str(fx.statements), "--now", NOW.isoformat(), "--html", str(tmp_path / "r.html")]
    assert main(args) == 1
    out = capsys.readouterr().out
    assert "DO NOT COMPLY: 2 of 7 operators comply with 3 orders; not: bravo, charlie, delta, echo, foxtrot" in out
    assert "  bravo        late " in out
    assert main([*args, "--json"]) == 1
    assert json.loads(capsys.readouterr().out)["summary"]["complying"] == 2
    assert "<style>" in (tmp_path / "r.html").read_text() and "http" not in (tmp_path / "r.html").read_text()
    assert main(["compliance", "--policies", str(tmp_path / "none"), "--operators", str(fx.keys),
                 "--statements", str(fx.statements)]) == 2
    assert "no regulator policy could be used" in capsys.readouterr().err


def test_json_matches_schema(doc: dict[str, Any]) -> None:
    validate(doc, SCHEMA, "$")


def validate(value: Any, schema: dict[str, Any], at: str) -> None:
    """The subset of JSON Schema docs/compliance.schema.json uses (type, enum, required,
    properties, additionalProperties, items, $ref to #/$defs)."""
    if "$ref" in schema:
        schema = SCHEMA["$defs"][schema["$ref"].rsplit("/", 1)[-1]]
    types = schema.get("type")
    if types is not None:
        names = types if isinstance(types, list) else [types]
        py = {"object": dict, "array": list, "string": str, "integer": int, "number": (int, float),
              "boolean": bool, "null": type(None)}
        assert any(isinstance(value, py[n]) and not (n in ("integer", "number") and isinstance(value, bool))
                   for n in names), f"{at}: {value!r} is not {names}"
    if "enum" in schema:
        assert value in schema["enum"], f"{at}: {value!r} not in {schema['enum']}"
    if isinstance(value, dict):
        for key in schema.get("required", ()):
            assert key in value, f"{at}: missing {key}"
        props = schema.get("properties", {})
        for key, v in value.items():
            if key in props:
                validate(v, props[key], f"{at}.{key}")
            elif isinstance(schema.get("additionalProperties"), dict):
                validate(v, schema["additionalProperties"], f"{at}.{key}")
            else:
                assert schema.get("additionalProperties", True) is not False, f"{at}: unexpected {key}"
    if isinstance(value, list) and "items" in schema:
        for i, v in enumerate(value):
            validate(v, schema["items"], f"{at}[{i}]")


# -- pure cases, from one real statement ------------------------------------------------------


@pytest.fixture(scope="module")
def real(fx: fixture.Fixture) -> tuple[dict[str, Any], statements.Statement]:
    path = fx.statements / "alpha" / "latest.json"
    key = minisign.parse_public_key((fx.keys / "alpha.pub").read_text())
    d = attest.verify(path, key)
    return d, statements.parse(d, path="s.json", sha256="a" * 64, operator="alpha")


def test_parse_tolerates_added_fields(real: tuple[dict[str, Any], statements.Statement]) -> None:
    d = json.loads(json.dumps(real[0]))
    d["predicate"]["future_field"] = {"x": 1}
    d["predicate"]["enforcers"]["dns"]["share_digest"] = "b" * 64
    d["predicate"]["enforcers"]["bgp"] = {"status": "failed", "error": "session down"}
    d["predicate"]["policies"][0]["orders"][0]["new"] = [1, 2]
    s = statements.parse(d, path="x", sha256="c" * 64, operator="alpha")
    bgp = next(e for e in s.enforcers if e.name == "bgp")
    assert bgp.failed and not bgp.in_sync and bgp.where == "bgp"
    assert s.orders == real[1].orders


@pytest.mark.parametrize(("mutate", "match"), [
    (lambda d: d["predicate"]["attestation"].update(seq="7"), r"predicate.attestation.seq: expected an integer"),
    (lambda d: d["predicate"]["attestation"].update(issued_at="yesterday"), r"issued_at: expected a UTC time"),
    (lambda d: d["predicate"]["policies"][0]["orders"][0].update(enforced_at=[]),
     r"predicate.policies\[0\].orders\[0\].enforced_at: expected an object"),
    (lambda d: d["predicate"].update(enforcers=[]), r"predicate.enforcers: expected an object"),
])
def test_parse_refuses_wrong_types(real: tuple[dict[str, Any], statements.Statement], mutate: Any, match: str) -> None:
    d = json.loads(json.dumps(real[0]))
    mutate(d)
    with pytest.raises(ValueError, match=match):
        statements.parse(d, path="x", sha256="c" * 64, operator="alpha")


def _chain(base: statements.Statement, seqs: list[int], *, broken: int | None = None) -> list[statements.Statement]:
    out: list[statements.Statement] = []
    for i, seq in enumerate(seqs):
        sha = hashlib.sha256(f"{seq}-{i}".encode()).hexdigest()
        prev = out[-1].sha256 if out else None
        out.append(replace(base, path=f"s{seq}-{i}.json", seq=seq, sha256=sha,
                           previous_sha256="0" * 64 if seq == broken else prev))
    return out


@pytest.mark.parametrize(("seqs", "broken", "want"), [
    ([1, 2, 3], None, []),
    ([2, 3], None, ["statements seq 1..1 are missing"]),
    ([1, 2, 5], None, ["seq 3..4 missing between s2-1.json and s5-2.json"]),
    ([1, 2, 2], None, ["seq 2: two different statements"]),
    ([1, 2, 3], 3, ["seq 3 (s3-2.json) names previous sha256 0000000000000000… but seq 2 hashes to"]),
])
def test_chain_problems(real: tuple[dict[str, Any], statements.Statement], seqs: list[int],
                        broken: int | None, want: list[str]) -> None:
    got = evaluate.chain_problems(_chain(real[1], seqs, broken=broken))
    assert len(got) == len(want) and all(w in g for g, w in zip(got, want)), got


def _expected(fx: fixture.Fixture) -> evaluate.Expected:
    rep, _ = check([fx.policies], fx.keys, fx.statements / "alpha", defaults(ROOT), NOW, 25 * 3600)
    return rep.expected


def test_disagreeing_policy_bytes(fx: fixture.Fixture, real: tuple[dict[str, Any], statements.Statement]) -> None:
    exp = _expected(fx)
    other = replace(exp, orders=tuple(replace(o, policy_sha256="f" * 64) for o in exp.orders), policies={"f" * 64: "x"})
    keys, _ = statements.load_keys(fx.keys)
    s = replace(real[1], issued_at=NOW - timedelta(hours=1), previous_sha256=None, seq=1)
    rep = evaluate.evaluate(other, keys, [s], [], NOW, 3600 * 25)
    c = next(c for c in rep.cells if c.operator == "alpha")
    assert c.verdict == "disagrees" and "the regulator issued ffffffffffffffff" in c.problems[0]


def test_backdated_and_impossible_claims(fx: fixture.Fixture, real: tuple[dict[str, Any], statements.Statement]) -> None:
    """An operator that first shows an order enforced late, claiming an earlier time, gets the
    later time; a claim from before the order was issued counts as no enforcement."""
    exp = _expected(fx)
    keys, _ = statements.load_keys(fx.keys)
    o = exp.orders[1]  # fx-casino, deadline T0+6h
    claim = real[1].orders[(o.key, o.serial)]
    empty = replace(real[1], path="s1.json", seq=1, sha256="1" * 64, previous_sha256=None,
                    issued_at=fixture.T0 + timedelta(hours=1), orders={})
    backdated = replace(real[1], path="s2.json", seq=2, sha256="2" * 64, previous_sha256="1" * 64,
                        issued_at=fixture.T0 + timedelta(hours=30),
                        orders={**real[1].orders, (o.key, o.serial): replace(
                            claim, enforced_everywhere_at=fixture.T0 + timedelta(minutes=30))})
    rep = evaluate.evaluate(exp, keys, [empty, backdated], [], fixture.T0 + timedelta(hours=31), 3600 * 25)
    c = next(c for c in rep.cells if c.operator == "alpha" and c.order == o.key)
    assert c.verdict == "late" and c.first_enforced_at == fixture.T0 + timedelta(hours=30)
    assert any("does not show it enforced" in p for p in c.problems)
    before = replace(backdated, orders={(o.key, o.serial): replace(
        claim, enforced_everywhere_at=fixture.T0 - timedelta(hours=1))})
    rep = evaluate.evaluate(exp, keys, [replace(before, seq=1, previous_sha256=None)], [],
                            fixture.T0 + timedelta(hours=31), 3600 * 25)
    c = next(c for c in rep.cells if c.operator == "alpha" and c.order == o.key)
    assert c.verdict == "missed" and any("before the order was issued" in p for p in c.problems)


def test_in_sync_is_what_the_digests_say(real: tuple[dict[str, Any], statements.Statement]) -> None:
    """A statement whose in_sync flag contradicts its own digests is not taken as in sync."""
    d = json.loads(json.dumps(real[0]))
    assert statements.parse(d, path="x", sha256="c" * 64, operator="alpha").in_sync
    d["predicate"]["enforcers"]["dns"]["readback_digest"] = "e" * 64  # flag still says in_sync: true
    s = statements.parse(d, path="x", sha256="c" * 64, operator="alpha")
    assert not s.in_sync and not next(e for e in s.enforcers if e.name == "dns").in_sync


def test_chain_times_backwards_and_future(fx: fixture.Fixture, real: tuple[dict[str, Any], statements.Statement]) -> None:
    chain = _chain(real[1], [1, 2])
    chain[1] = replace(chain[1], issued_at=chain[0].issued_at - timedelta(hours=1))
    assert "was issued 2026-11-23T22:00:00Z, before seq 1" in evaluate.chain_problems(chain)[0]
    keys, _ = statements.load_keys(fx.keys)
    ahead = replace(real[1], seq=1, previous_sha256=None, issued_at=NOW + timedelta(hours=2))
    rep = evaluate.evaluate(_expected(fx), keys, [ahead], [], NOW, 25 * 3600)
    alpha = next(o for o in rep.operators if o.name == "alpha")
    assert not alpha.complies and any("after now" in p for p in alpha.problems)


def test_html_links_are_paths_and_text_is_escaped(doc: dict[str, Any], tmp_path: Path) -> None:
    from blockd.compliance import html

    evil = json.loads(json.dumps(doc))
    c = evil["cells"][0]
    c["evidence"] = str(tmp_path / "javascript:alert(1).json")
    c["problems"] = ['<script>alert("x")</script>']
    evil["operators"][0]["problems"] = ["<img src=x onerror=alert(1)>"]
    page = html.render(evil, base=tmp_path)
    assert 'href="./javascript:alert(1).json"' in page
    assert "<script>" not in page and "<img" not in page and "&lt;img src=x" in page
