"""The verify skip: an unchanged file is not read again; every kind of change is read and verified again."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import pytest

from blockd import trust
from blockd.errors import SignatureError
from blockd.parsecache import ParseCache
from blockd.policy import MAX_POLICY_BYTES, load_signed_policy
from tests.conftest import Keys, make_trust

POLICY = """\
issuer: reg
serial: {serial}
issued_at: 2026-11-01T00:00:00Z
not_before: 2026-11-01T00:00:00Z
not_after: 2030-01-01T00:00:00Z
orders:
  - id: o1
    legal_basis: {{authority: Court, reference: R-{serial}}}
    action: block
    targets: {{domains: [t{serial}.example]}}
"""


def write(path: Path, keys: Keys, serial: int, *, sign: bool = True) -> None:
    path.write_text(POLICY.format(serial=serial))
    if sign:
        keys.sign(path, keys.regulator[0])


def rewrite_in_place(path: Path, text: str) -> None:
    """Same inode, same size, mtime set back: only ctime tells (the kernel sets it on every change)."""
    st = os.stat(path)
    assert len(text.encode()) == st.st_size
    with open(path, "r+b") as f:
        f.write(text.encode())
    while os.stat(path).st_ctime_ns == st.st_ctime_ns:  # one timestamp tick may not have passed yet
        os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert os.stat(path).st_mtime_ns == st.st_mtime_ns and os.stat(path).st_ino == st.st_ino


def rename_over(path: Path, keys: Keys) -> None:
    tmp = path.with_name(".new.yaml")
    write(tmp, keys, 2)
    os.replace(tmp.with_name(tmp.name + ".minisig"), path.with_name(path.name + ".minisig"))
    os.replace(tmp, path)


def add_signature(path: Path, keys: Keys) -> None:
    keys.sign(path, keys.regulator[1], name="second")


CHANGES: list[tuple[str, Callable[[Path, Keys], None], str]] = [
    ("in-place rewrite, mtime restored", lambda p, k: rewrite_in_place(p, POLICY.format(serial=9)), "refused"),
    ("renamed over", rename_over, "serial 2"),
    ("a new signature beside it", add_signature, "two signers"),
    ("the signature removed", lambda p, k: p.with_name(p.name + ".minisig").unlink(), "refused"),
]


@pytest.mark.parametrize("name, change, then", CHANGES, ids=[c[0] for c in CHANGES])
def test_a_changed_file_is_read_and_verified_again(tmp_path: Path, name: str, change: Callable[[Path, Keys], None],
                                                   then: str) -> None:
    keys = make_trust(tmp_path, regulators=2)
    store = trust.load_trust_store(keys.trust)
    path = tmp_path / "p.yaml"
    write(path, keys, 1)
    cache = ParseCache(racy_ns=0)
    first = load_signed_policy(path, store, parsed=cache)
    again = load_signed_policy(path, store, parsed=cache)
    assert again[0] is first[0] and again[1] is first[1]  # unchanged: the same objects, not read again
    assert cache.unchanged(path, store, MAX_POLICY_BYTES) is not None
    change(path, keys)
    assert cache.unchanged(path, store, MAX_POLICY_BYTES) is None
    if then == "refused":
        with pytest.raises(SignatureError):
            load_signed_policy(path, store, parsed=cache)
    elif then == "serial 2":
        assert load_signed_policy(path, store, parsed=cache)[0].serial == 2
    else:
        assert len(load_signed_policy(path, store, parsed=cache)[0].signers) == 2


def test_a_new_trust_store_verifies_again(tmp_path: Path) -> None:
    keys = make_trust(tmp_path, regulators=2)
    path = tmp_path / "p.yaml"
    write(path, keys, 1)
    cache = ParseCache(racy_ns=0)
    load_signed_policy(path, trust.load_trust_store(keys.trust), parsed=cache)
    (keys.trust / "reg" / "k0.pub").unlink()  # the signing key is revoked
    revoked = trust.load_trust_store(keys.trust)
    assert cache.unchanged(path, revoked, MAX_POLICY_BYTES) is None
    with pytest.raises(SignatureError):
        load_signed_policy(path, revoked, parsed=cache)


def test_a_file_changed_just_now_is_known_by_its_bytes_not_its_identity(tmp_path: Path) -> None:
    """Too new for its identity (one timestamp tick could hide a second write): the next pass
    compares its bytes with those verified; a same-size rewrite in the same tick is caught."""
    keys = make_trust(tmp_path)
    store = trust.load_trust_store(keys.trust)
    path = tmp_path / "p.yaml"
    write(path, keys, 1)
    cache = ParseCache()  # the default: two seconds
    policy, signed = load_signed_policy(path, store, parsed=cache)
    assert cache.identity(path) is None  # racy
    hit = cache.unchanged(path, store, MAX_POLICY_BYTES)
    assert hit is not None and hit[0] is policy and hit[1].data is signed.data
    st = os.stat(path)
    path.write_text(POLICY.format(serial=9))  # same size, signature no longer matching
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert cache.unchanged(path, store, MAX_POLICY_BYTES) is None
    with pytest.raises(SignatureError):
        load_signed_policy(path, store, parsed=cache)


def test_forget_identities_and_retain(tmp_path: Path) -> None:
    keys = make_trust(tmp_path)
    store = trust.load_trust_store(keys.trust)
    path = tmp_path / "p.yaml"
    write(path, keys, 1)
    cache = ParseCache(racy_ns=0)
    policy, _ = load_signed_policy(path, store, parsed=cache)
    cache.forget_identities()
    assert cache.unchanged(path, store, MAX_POLICY_BYTES) is None
    load_signed_policy(path, store, parsed=cache)
    cache.retain({(policy.digest, str(path))})
    assert cache.unchanged(path, store, MAX_POLICY_BYTES) is not None
    cache.retain(set())  # the file is gone
    assert cache.unchanged(path, store, MAX_POLICY_BYTES) is None and not cache.policies


def test_the_same_bytes_under_another_name_are_verified_not_parsed_again(tmp_path: Path) -> None:
    """The state's copy of a file just accepted: read and verified as any file, parsed once."""
    keys = make_trust(tmp_path, regulators=2)
    store = trust.load_trust_store(keys.trust)
    path, copy, other = tmp_path / "p.yaml", tmp_path / "state-copy.yaml", tmp_path / "other.yaml"
    write(path, keys, 1)
    cache = ParseCache(racy_ns=0)
    first, _ = load_signed_policy(path, store, parsed=cache)
    copy.write_bytes(path.read_bytes())
    copy.with_name(copy.name + ".minisig").write_bytes(path.with_name(path.name + ".minisig").read_bytes())
    signed_first = cache._verified[str(path)][3]
    twin, twin_signed = load_signed_policy(copy, store, parsed=cache)
    assert twin.orders is first.orders and twin.digest == first.digest  # not parsed again
    assert twin_signed.data is signed_first.data  # the same bytes are held once
    assert twin.source == str(copy) and first.source == str(path)  # each under its own name
    # Signed by other keys, the same bytes are another parse (signers are part of the Policy).
    other.write_bytes(path.read_bytes())
    keys.sign(other, keys.regulator[1])
    assert load_signed_policy(other, store, parsed=cache)[0].orders is not first.orders
    # A copy whose signature does not verify is refused, whatever was parsed before.
    bad = tmp_path / "bad.yaml"
    bad.write_bytes(path.read_bytes())
    bad.with_name(bad.name + ".minisig").write_bytes(other.with_name(other.name + ".minisig").read_bytes()[:-8] + b"AAAAAAAA")
    with pytest.raises(SignatureError):
        load_signed_policy(bad, store, parsed=cache)


def _copy_with(path: Path, copy: Path) -> None:
    copy.write_bytes(path.read_bytes())
    copy.with_name(copy.name + ".0.minisig").write_bytes(path.with_name(path.name + ".minisig").read_bytes())


WRITTEN_CASES: list[tuple[str, Callable[[Path, Keys], None], bool]] = [
    ("as written", lambda c, k: None, True),
    ("its bytes changed, same size", lambda c, k: c.write_bytes(c.read_bytes().replace(b"t1.", b"x1.")), False),
    ("its signature replaced", lambda c, k: c.with_name(c.name + ".0.minisig").write_text("untrusted comment: x\n"),
     False),
    ("a second signature beside it", lambda c, k: c.with_name(c.name + ".1.minisig").write_bytes(
        c.with_name(c.name + ".0.minisig").read_bytes()), False),
]


@pytest.mark.parametrize("name, change, reused", WRITTEN_CASES, ids=[c[0] for c in WRITTEN_CASES])
def test_a_copy_this_daemon_wrote_is_compared_not_verified_while_it_is_new(tmp_path: Path, name: str,
                                                                          change: Callable[[Path, Keys], None],
                                                                          reused: bool) -> None:
    keys = make_trust(tmp_path)
    store = trust.load_trust_store(keys.trust)
    path, copy = tmp_path / "p.yaml", tmp_path / "state" / "1.yaml"
    copy.parent.mkdir()
    write(path, keys, 1)
    cache = ParseCache()  # two seconds: the copy is too new for its identity
    policy, signed = load_signed_policy(path, store, parsed=cache)
    _copy_with(path, copy)
    cache.by_bytes(copy, store, MAX_POLICY_BYTES, policy, signed)
    change(copy, keys)
    hit = cache.unchanged(copy, store, MAX_POLICY_BYTES)
    if reused:
        assert hit is not None and hit[0].orders is policy.orders and hit[1].data is signed.data
        assert hit[0].source == str(copy) and [p for p, _ in hit[1].signatures] == [str(copy) + ".0.minisig"]
        other = trust.load_trust_store(make_trust(tmp_path / "other").trust)
        assert cache.unchanged(copy, other, MAX_POLICY_BYTES) is None  # another trust store: verified again
    else:
        assert hit is None


@pytest.mark.parametrize("size", [1 << 10, 9 << 20], ids=["small", "past PARALLEL_HASH_BYTES"])
def test_read_signed_gives_the_sha256_of_exactly_the_verified_bytes(tmp_path: Path, size: int) -> None:
    import hashlib

    from blockd.policy import read_signed

    keys = make_trust(tmp_path)
    store = trust.load_trust_store(keys.trust)
    path = tmp_path / "p.yaml"
    path.write_bytes(POLICY.format(serial=1).encode() + b"#" * size + b"\n")
    keys.sign(path, keys.regulator[0])
    signed = read_signed(path, store, role="policy", max_bytes=64 << 20)
    assert signed.digest == hashlib.sha256(path.read_bytes()).hexdigest()
    path.write_bytes(path.read_bytes().replace(b"t1.", b"t2."))  # the signature no longer matches
    with pytest.raises(SignatureError):
        read_signed(path, store, role="policy", max_bytes=64 << 20)


@pytest.mark.parametrize("name, change, reused", WRITTEN_CASES, ids=[c[0] for c in WRITTEN_CASES])
def test_the_states_own_copy_is_known_by_its_identity_at_once(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                                              name: str, change: Callable[[Path, Keys], None],
                                                              reused: bool) -> None:
    """The copy the daemon has just written is not read again on the next pass (no byte
    compare of a 170 MB registry while it is new); any later change of it shows in its
    identity (ctime, size, inode, signature files) and it is read and verified as any file."""
    import blockd.parsecache as pc
    keys = make_trust(tmp_path)
    store = trust.load_trust_store(keys.trust)
    path, copy = tmp_path / "p.yaml", tmp_path / "state" / "1.yaml"
    copy.parent.mkdir()
    write(path, keys, 1)
    cache = ParseCache()
    policy, signed = load_signed_policy(path, store, parsed=cache)
    _copy_with(path, copy)
    cache.own_copy(copy, store, MAX_POLICY_BYTES, policy, signed)
    change(copy, keys)
    monkeypatch.setattr(pc, "read_regular", lambda *a, **k: pytest.fail("the copy was read again"))
    hit = cache.unchanged(copy, store, MAX_POLICY_BYTES)
    if reused:
        assert hit is not None and hit[0].orders is policy.orders and hit[1].data is signed.data
        assert hit[0].source == str(copy) and [p for p, _ in hit[1].signatures] == [str(copy) + ".0.minisig"]
    else:
        assert hit is None
        monkeypatch.undo()
        if name == "its signature replaced":
            with pytest.raises(SignatureError):
                load_signed_policy(copy, store, parsed=cache)


@pytest.mark.parametrize("how", ["renamed over", "resized in place"])
def test_a_file_known_by_its_bytes_then_replaced_is_not_read_to_be_compared(tmp_path: Path,
                                                                           monkeypatch: pytest.MonkeyPatch,
                                                                           how: str) -> None:
    """A file verified while too new for its identity is compared by its bytes on the next
    pass; once it lies elsewhere (a rename over it: a new inode) or has another size, it has
    surely changed: it is read and verified as any file, not read a first time to be compared
    (a re-issued registry was read twice: 173 MB compared, then verified)."""
    import blockd.parsecache as pc
    keys = make_trust(tmp_path)
    store = trust.load_trust_store(keys.trust)
    path = tmp_path / "p.yaml"
    write(path, keys, 1)
    cache = ParseCache()  # two seconds: the file is too new for its identity
    load_signed_policy(path, store, parsed=cache)
    if how == "renamed over":
        rename_over(path, keys)
    else:
        write(path, keys, 10)  # serial 10: one byte longer, same inode
    monkeypatch.setattr(pc, "read_regular", lambda *a, **k: pytest.fail("read to be compared"))
    assert cache.unchanged(path, store, MAX_POLICY_BYTES) is None
    monkeypatch.undo()
    assert load_signed_policy(path, store, parsed=cache)[0].serial == (2 if how == "renamed over" else 10)
