"""Trust store (k of n, roles, issuer binding) and replay protection (rollback, same-serial swap)."""

from __future__ import annotations

import json
from datetime import datetime, timezone
from pathlib import Path

import pytest

from blockd import trust
from blockd.errors import ConfigError, ReplayError, SignatureError
from blockd.policy import load_policy, load_signed_policy
from blockd.state import StateStore
from tests.conftest import make_trust

POLICY = """\
issuer: {issuer}
serial: {serial}
issued_at: 2026-11-01T00:00:00Z
not_before: 2026-11-01T00:00:00Z
not_after: 2030-01-01T00:00:00Z
orders:
  - id: o1
    legal_basis: {{authority: Court, reference: R-{serial}}}
    action: block
    targets: {{domains: [t.me]}}
"""
NOW = datetime(2026, 11, 29, tzinfo=timezone.utc)


def _policy(tmp: Path, serial: int = 1, issuer: str = "reg", name: str = "p.yaml") -> Path:
    path = tmp / name
    path.write_text(POLICY.format(issuer=issuer, serial=serial))
    return path


@pytest.mark.parametrize(
    "signers, threshold, ok",
    [([0], 1, True), ([0], 2, False), ([0, 1], 2, True), ([0, 0], 2, False), ([0, 1, 2], 2, True), ([], 1, False)],
    ids=["1of3-one", "2of3-one", "2of3-two", "2of3-same-key-twice", "2of3-three", "no-signature"],
)
def test_k_of_n(tmp_path: Path, signers: list[int], threshold: int, ok: bool) -> None:
    keys = make_trust(tmp_path, regulators=3, threshold=threshold)
    store = trust.load_trust_store(keys.trust)
    path = _policy(tmp_path)
    for n, i in enumerate(signers):
        keys.sign(path, keys.regulator[i], name=f"s{n}")
    if ok:
        assert load_policy(path, store).signers
    else:
        with pytest.raises(SignatureError, match="threshold not met|no signature"):
            load_policy(path, store)


def test_unknown_key_and_tampered_file_are_named(tmp_path: Path) -> None:
    keys = make_trust(tmp_path)
    store = trust.load_trust_store(keys.trust)
    path = _policy(tmp_path)
    from blockd import minisign

    keys.sign(path, minisign.generate(), name="stranger")
    keys.sign(path, keys.regulator[0])
    path.write_text(path.read_text().replace("t.me", "x.me"))
    with pytest.raises(SignatureError) as e:
        load_policy(path, store)
    assert "is not in the trust store" in str(e.value)
    assert "does not match the file's contents" in str(e.value)


def test_role_and_issuer_binding(tmp_path: Path) -> None:
    keys = make_trust(tmp_path)
    store = trust.load_trust_store(keys.trust)
    path = _policy(tmp_path)
    keys.sign(path, keys.operator)  # operator holds only the catalog role
    with pytest.raises(SignatureError, match="may not sign policy files"):
        load_policy(path, store)
    other = _policy(tmp_path, issuer="someone-else", name="q.yaml")
    keys.sign(other)
    with pytest.raises(SignatureError, match="says issuer 'someone-else' but is signed by keys of issuer 'reg'"):
        load_policy(other, store)


def test_signature_checked_before_parsing(tmp_path: Path) -> None:
    keys = make_trust(tmp_path)
    path = tmp_path / "bomb.yaml"
    path.write_bytes(b"a: &a [x]\nb: [*a, *a]\n")
    with pytest.raises(SignatureError, match="no signature"):
        load_policy(path, trust.load_trust_store(keys.trust))


def test_bad_trust_store(tmp_path: Path) -> None:
    """A bad issuer file is refused alone: that issuer is left out, the others load."""
    keys = make_trust(tmp_path)
    (keys.trust / "reg" / "issuer.yaml").write_text("threshold: 5\n")
    store = trust.load_trust_store(keys.trust)
    assert "reg" not in store.issuers and "op" in store.issuers
    assert any("threshold 5 is more than the 1 usable key" in p.message for p in store.problems)
    with pytest.raises(ConfigError, match="is not a directory"):
        trust.load_trust_store(tmp_path / "missing")


@pytest.mark.parametrize("content, expect", [
    (b"garbage\n", "key skipped"),
    (b"", "key skipped"),
])
def test_bad_key_file_is_skipped_alone(tmp_path: Path, content: bytes, expect: str) -> None:
    keys = make_trust(tmp_path)
    (keys.trust / "reg" / "broken.pub").write_bytes(content)
    store = trust.load_trust_store(keys.trust)
    assert "reg" in store.issuers and len(store.issuers["reg"].keys) == 1
    (problem,) = store.problems
    assert problem.where.endswith("broken.pub") and expect in problem.message


def test_replay_rules(tmp_path: Path) -> None:
    keys = make_trust(tmp_path)
    store = trust.load_trust_store(keys.trust)
    state = StateStore(tmp_path / "state")
    p5 = _policy(tmp_path, 5, name="p5.yaml")
    keys.sign(p5)
    pol5, signed5 = load_signed_policy(p5, store)
    state.record(pol5, signed5, NOW)
    state.check_replay(pol5)  # the same bytes again are fine

    p4 = _policy(tmp_path, 4, name="p4.yaml")
    keys.sign(p4)
    with pytest.raises(ReplayError, match="rollback refused: serial 4 is lower than serial 5"):
        state.check_replay(load_policy(p4, store))

    p5b = _policy(tmp_path, 5, name="p5b.yaml")
    p5b.write_text(p5b.read_text().replace("t.me", "x.me"))
    keys.sign(p5b)
    with pytest.raises(ReplayError, match="serial 5 of issuer 'reg' was accepted with other content.*needs serial 6"):
        state.check_replay(load_policy(p5b, store))

    index = json.loads((tmp_path / "state" / "accepted.json").read_text())
    assert index["reg"]["serial"] == 5
    # the stored copy verifies on its own: a restart can restore it
    (copy,) = state.accepted_paths()
    assert load_policy(copy, store).serial == 5


def test_record_replaces_older_copies(tmp_path: Path) -> None:
    keys = make_trust(tmp_path)
    store = trust.load_trust_store(keys.trust)
    state = StateStore(tmp_path / "state")
    for serial in (1, 2):
        p = _policy(tmp_path, serial, name=f"p{serial}.yaml")
        keys.sign(p)
        state.record(*load_signed_policy(p, store), NOW)
    files = sorted(f.name for f in (tmp_path / "state" / "policies" / "reg").iterdir())
    assert files == ["2.yaml", "2.yaml.0.minisig"]


def test_a_flood_of_signature_files_is_refused_before_reading(tmp_path: Path) -> None:
    keys = make_trust(tmp_path)
    store = trust.load_trust_store(keys.trust)
    path = _policy(tmp_path)
    keys.sign(path)
    for i in range(trust.MAX_SIGNATURES + 1):
        (tmp_path / f"{path.name}.x{i}.minisig").write_text("junk")
    with pytest.raises(SignatureError, match=f"{trust.MAX_SIGNATURES + 2} signature files; at most"):
        load_policy(path, store)


@pytest.mark.parametrize("index", [b"[]", b'{"reg": 1}', b'{"reg": {"serial": "5"}}', b"{", b""])
def test_a_broken_state_index_is_rebuilt_from_the_copies(tmp_path: Path, index: bytes) -> None:
    keys = make_trust(tmp_path)
    store = trust.load_trust_store(keys.trust)
    state = StateStore(tmp_path / "state")
    p5 = _policy(tmp_path, 5, name="p5.yaml")
    keys.sign(p5)
    state.record(*load_signed_policy(p5, store), NOW)
    (tmp_path / "state" / "accepted.json").write_bytes(index)
    rebuilt = StateStore(tmp_path / "state").accepted()
    assert rebuilt["reg"].serial == 5 and rebuilt["reg"].file == "policies/reg/5.yaml"
    p4 = _policy(tmp_path, 4, name="p4.yaml")
    keys.sign(p4)
    with pytest.raises(ReplayError, match="rollback refused"):  # replay protection survives
        StateStore(tmp_path / "state").check_replay(load_policy(p4, store))


def _signed(tmp_path: Path, keys, store, serial: int):  # type: ignore[no-untyped-def]
    p = _policy(tmp_path, serial, name=f"p{serial}.yaml")
    keys.sign(p)
    return load_signed_policy(p, store)


@pytest.mark.parametrize("fate", ["committed", "discarded", "write failed", "crash before commit"])
def test_a_staged_copy_is_committed_by_rename_or_leaves_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                                fate: str) -> None:
    """A large copy written ahead (`stage`) becomes the accepted copy by a rename at commit,
    holding exactly the verified bytes; one never committed, or whose write failed, leaves
    nothing behind, and the commit still writes the copy."""
    from blockd import state as state_mod
    monkeypatch.setattr(state_mod, "STAGE_BYTES", 0)
    keys = make_trust(tmp_path)
    store = trust.load_trust_store(keys.trust)
    state = StateStore(tmp_path / "state")
    state.record(*_signed(tmp_path, keys, store, 1), NOW)
    pol, signed = _signed(tmp_path, keys, store, 2)
    if fate == "write failed":
        def fail(path: Path, data: bytes) -> None:
            raise OSError(28, "No space left on device", str(path))
        monkeypatch.setattr(state_mod, "_write_synced", fail)
    state.stage(signed.data)
    reg = tmp_path / "state" / "policies" / "reg"
    staging = tmp_path / "state" / "staging"
    if fate in ("committed", "crash before commit"):
        state._staged[0][2].result()
        (staged,) = staging.iterdir()
        assert staged.read_bytes() == signed.data  # written ahead, not yet accepted
        assert state.accepted()["reg"].serial == 1
        ino = staged.stat().st_ino
    if fate == "discarded":
        state.discard_staged(keep=())  # not waited for: removed once its write is done
        state_mod._stager.submit(lambda: None).result()  # one worker, in order: the write is done
        assert sorted(f.name for f in reg.iterdir()) == ["1.yaml", "1.yaml.0.minisig"]
        assert not staging.exists() or list(staging.iterdir()) == []  # removed, or never begun
        return
    if fate == "crash before commit":
        state = StateStore(tmp_path / "state")  # a restart: the staged file is an orphan
        assert state.accepted()["reg"].serial == 1 and [p.name for p in state.accepted_paths()] == ["1.yaml"]
        state.lock().close()  # the next holder of the state removes it
        assert sorted(f.name for f in reg.iterdir()) == ["1.yaml", "1.yaml.0.minisig"]
        assert list(staging.iterdir()) == []
    state.commit([(pol, signed)], NOW)
    assert sorted(f.name for f in reg.iterdir()) == ["2.yaml", "2.yaml.0.minisig"]
    assert (reg / "2.yaml").read_bytes() == signed.data
    assert load_policy(reg / "2.yaml", store).serial == 2
    if fate == "committed":
        assert (reg / "2.yaml").stat().st_ino == ino  # renamed into place, not written again
    assert not staging.exists() or list(staging.iterdir()) == []
