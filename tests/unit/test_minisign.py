"""minisign format: round trips, tampering, and interop with the real `minisign` CLI both ways."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from blockd import minisign
from blockd.errors import SignatureError

MINISIGN = shutil.which("minisign")
needs_minisign = pytest.mark.skipif(MINISIGN is None, reason="minisign CLI not installed (make deps)")


@pytest.mark.parametrize("prehash", [True, False])
def test_round_trip(prehash: bool) -> None:
    key = minisign.generate()
    text = minisign.sign(b"policy bytes", key, trusted_comment="tc", prehash=prehash)
    sig = minisign.parse_signature(text)
    assert sig.algorithm == ("ED" if prehash else "Ed")
    minisign.verify(b"policy bytes", sig, key.public)


@pytest.mark.parametrize(
    "mutate, match",
    [
        (lambda d, s: (d + b"x", s), "does not match the file"),
        (lambda d, s: (d, s.replace("trusted comment: tc", "trusted comment: td")), "trusted comment"),
    ],
)
def test_tampering_is_detected(mutate, match: str) -> None:
    key = minisign.generate()
    data = b"issuer: x\n"
    data2, text = mutate(data, minisign.sign(data, key, trusted_comment="tc"))
    with pytest.raises(SignatureError, match=match):
        minisign.verify(data2, minisign.parse_signature(text), key.public)


def test_every_single_byte_flip_of_the_data_fails() -> None:
    key = minisign.generate()
    data = b"orders: [a, b]"
    sig = minisign.parse_signature(minisign.sign(data, key))
    for i in range(len(data)):
        flipped = data[:i] + bytes([data[i] ^ 1]) + data[i + 1 :]
        with pytest.raises(SignatureError):
            minisign.verify(flipped, sig, key.public)


def test_wrong_key() -> None:
    a, b = minisign.generate(), minisign.generate()
    sig = minisign.parse_signature(minisign.sign(b"x", a))
    with pytest.raises(SignatureError, match="does not match public key"):
        minisign.verify(b"x", sig, b.public)


@pytest.mark.parametrize(
    "text, match",
    [
        ("", "not a minisign signature"),
        ("untrusted comment: x\n!!!!\ntrusted comment: y\nAAAA\n", "not valid base64"),
        ("untrusted comment: x\nAAAA\ntrusted comment: y\nAAAA\n", "expected 74 bytes"),
    ],
)
def test_malformed_signatures(text: str, match: str) -> None:
    with pytest.raises(SignatureError, match=match):
        minisign.parse_signature(text)


def test_secret_key_text_round_trip() -> None:
    key = minisign.generate()
    again = minisign.parse_secret_key(key.to_text())
    assert again == key
    assert minisign.parse_public_key(key.public.to_text()) == key.public


@needs_minisign
@pytest.mark.parametrize("legacy", [False, True])
def test_blockd_verifies_minisign(tmp_path: Path, legacy: bool) -> None:
    subprocess.run([MINISIGN, "-G", "-W", "-p", "k.pub", "-s", "k.sec"], cwd=tmp_path, check=True, capture_output=True)
    (tmp_path / "f.yaml").write_bytes(b"issuer: demo\n")
    cmd = [MINISIGN, "-S", "-s", "k.sec", "-m", "f.yaml", "-t", "signed by minisign"] + (["-l"] if legacy else [])
    subprocess.run(cmd, cwd=tmp_path, check=True, capture_output=True)
    sig = minisign.parse_signature((tmp_path / "f.yaml.minisig").read_text())
    assert sig.algorithm == ("Ed" if legacy else "ED")
    assert sig.trusted_comment == "signed by minisign"
    minisign.verify(b"issuer: demo\n", sig, minisign.parse_public_key((tmp_path / "k.pub").read_text()))
    # blockd signs with the secret key minisign made
    key = minisign.parse_secret_key((tmp_path / "k.sec").read_text())
    assert key.public == minisign.parse_public_key((tmp_path / "k.pub").read_text())


@needs_minisign
@pytest.mark.parametrize("legacy", [False, True])
def test_minisign_verifies_blockd(tmp_path: Path, legacy: bool) -> None:
    key = minisign.generate()
    (tmp_path / "k.pub").write_text(key.public.to_text())
    (tmp_path / "f.yaml").write_bytes(b"serial: 7\n")
    (tmp_path / "f.yaml.minisig").write_text(minisign.sign(b"serial: 7\n", key, trusted_comment="by blockd",
                                                           prehash=not legacy))
    ok = subprocess.run([MINISIGN, "-V", "-p", "k.pub", "-m", "f.yaml"], cwd=tmp_path, capture_output=True, text=True)
    assert ok.returncode == 0, ok.stderr
    assert "Trusted comment: by blockd" in ok.stdout
    (tmp_path / "f.yaml").write_bytes(b"serial: 8\n")
    bad = subprocess.run([MINISIGN, "-V", "-p", "k.pub", "-m", "f.yaml"], cwd=tmp_path, capture_output=True, text=True)
    assert bad.returncode != 0


@needs_minisign
def test_password_protected_minisign_key(tmp_path: Path) -> None:
    subprocess.run([MINISIGN, "-G", "-p", "k.pub", "-s", "k.sec"], cwd=tmp_path, input=b"pw\npw\n",
                   check=True, capture_output=True)
    text = (tmp_path / "k.sec").read_text()
    # the message names the way that exists (there is no --password-file option)
    with pytest.raises(SignatureError, match="password-protected; set its password in the BLOCKD_KEY_PASSWORD env"):
        minisign.parse_secret_key(text)
    key = minisign.parse_secret_key(text, password=b"pw")
    assert key.public == minisign.parse_public_key((tmp_path / "k.pub").read_text())
    with pytest.raises(SignatureError, match="wrong password"):
        minisign.parse_secret_key(text, password=b"nope")
