"""minisign keys and detached signatures (https://jedisct1.github.io/minisign/), on `cryptography`.

    public key   "untrusted comment: …\\n" + base64("Ed" | key id (8) | Ed25519 public key (32))
    secret key   "untrusted comment: …\\n" + base64("Ed" | kdf "Sc" or "\\0\\0" | "B2" | salt (32)
                 | opslimit (8, LE) | memlimit (8, LE) | key id | seed+pk (64) | BLAKE2b-256 checksum)
                 — the last three fields are XORed with an scrypt stream when kdf is "Sc"
    signature    "untrusted comment: …\\n" + base64(alg | key id | sig (64)) + "\\n"
                 "trusted comment: …\\n" + base64(global sig (64)) + "\\n"

`alg` "ED" signs BLAKE2b-512(file) (the default since minisign 0.8), legacy "Ed" signs the file
itself. The global signature covers sig | trusted comment, so the trusted comment (a timestamp
and the file name) cannot be altered either. Both are checked by `verify`.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import os
import time
from dataclasses import dataclass

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey
from cryptography.hazmat.primitives.serialization import Encoding, PublicFormat

from blockd.errors import SignatureError

_UNTRUSTED = "untrusted comment: "
_TRUSTED = "trusted comment: "
_KDF_NONE = b"\x00\x00"
_KDF_SCRYPT = b"Sc"


@dataclass(frozen=True, slots=True)
class PublicKey:
    key_id: bytes  # 8 bytes; minisign prints it as big-endian hex of the little-endian u64
    key: bytes  # 32 bytes

    @property
    def id_hex(self) -> str:
        return self.key_id[::-1].hex().upper()

    def to_text(self, comment: str | None = None) -> str:
        blob = base64.b64encode(b"Ed" + self.key_id + self.key).decode()
        return f"{_UNTRUSTED}{comment or 'minisign public key ' + self.id_hex}\n{blob}\n"


@dataclass(frozen=True, slots=True)
class SecretKey:
    key_id: bytes
    seed: bytes  # 32-byte Ed25519 seed

    @property
    def public(self) -> PublicKey:
        pk = Ed25519PrivateKey.from_private_bytes(self.seed).public_key()
        return PublicKey(self.key_id, pk.public_bytes(Encoding.Raw, PublicFormat.Raw))

    def to_text(self, comment: str = "minisign encrypted secret key") -> str:
        """Serialise without a password, exactly as `minisign -G -W` does (the file's
        permissions protect it; the checksum field stays zero, as minisign leaves it)."""
        sk = self.seed + self.public.key
        blob = b"Ed" + _KDF_NONE + b"B2" + bytes(32) + bytes(16) + self.key_id + sk + bytes(32)
        return f"{_UNTRUSTED}{comment}\n{base64.b64encode(blob).decode()}\n"


@dataclass(frozen=True, slots=True)
class Signature:
    algorithm: str  # "ED" (prehashed) or "Ed" (legacy)
    key_id: bytes
    signature: bytes
    trusted_comment: str
    global_signature: bytes

    @property
    def key_id_hex(self) -> str:
        return self.key_id[::-1].hex().upper()


def generate() -> SecretKey:
    return SecretKey(os.urandom(8), os.urandom(32))


def _b64(line: str, where: str, what: str) -> bytes:
    try:
        return base64.b64decode(line.strip(), validate=True)
    except (binascii.Error, ValueError):
        raise SignatureError(f"{what} is not valid base64: {line.strip()[:60]!r}", where=where) from None


def _lines(text: str, where: str, what: str, count: int) -> list[str]:
    lines = [ln for ln in text.replace("\r\n", "\n").split("\n") if ln.strip()]
    if len(lines) < count or not lines[0].startswith(_UNTRUSTED):
        raise SignatureError(
            f"not a minisign {what}: expected {count} lines starting with {_UNTRUSTED.strip()!r}",
            where=where,
        )
    return lines


def parse_public_key(text: str, where: str = "") -> PublicKey:
    """Accepts a `.pub` file's text, or the bare base64 line (as `minisign -P` takes)."""
    stripped = text.strip()
    line = _lines(text, where, "public key", 2)[1] if stripped.startswith(_UNTRUSTED) else stripped
    raw = _b64(line, where, "public key")
    if len(raw) != 42 or raw[:2] != b"Ed":
        raise SignatureError(
            f"public key is {len(raw)} bytes with algorithm {raw[:2]!r}; expected 42 bytes, 'Ed'",
            where=where,
        )
    return PublicKey(raw[2:10], raw[10:42])


def _scrypt_stream(password: bytes, salt: bytes, opslimit: int, memlimit: int, n: int) -> bytes:
    """libsodium's crypto_pwhash_scryptsalsa208sha256 parameter choice (`pickparams`)."""
    opslimit = max(opslimit, 32768)
    r, p = 8, 1
    if opslimit < memlimit // 32:
        max_n = opslimit // (r * 4)
    else:
        max_n = memlimit // (r * 128)
    n_log2 = 1
    while n_log2 < 63 and (1 << n_log2) <= max_n // 2:
        n_log2 += 1
    if opslimit >= memlimit // 32:
        p = min((opslimit // 4) // (1 << n_log2), 0x3FFFFFFF) // r
    return hashlib.scrypt(
        password, salt=salt, n=1 << n_log2, r=r, p=max(p, 1), maxmem=min(2 * 128 * r * (1 << n_log2), 2**31 - 1), dklen=n
    )


def parse_secret_key(text: str, where: str = "", password: bytes | None = None) -> SecretKey:
    raw = _b64(_lines(text, where, "secret key", 2)[1], where, "secret key")
    if len(raw) != 158 or raw[:2] != b"Ed" or raw[4:6] != b"B2":
        raise SignatureError("not a minisign Ed25519 secret key (bad length or algorithm)", where=where)
    kdf, salt = raw[2:4], raw[6:38]
    ops, mem = int.from_bytes(raw[38:46], "little"), int.from_bytes(raw[46:54], "little")
    body = raw[54:158]
    if kdf == _KDF_SCRYPT:
        if password is None:
            raise SignatureError(
                "secret key is password-protected; set its password in the BLOCKD_KEY_PASSWORD environment variable",
                where=where,
            )
        stream = _scrypt_stream(password, salt, ops, mem, len(body))
        body = bytes(a ^ b for a, b in zip(body, stream))
    elif kdf != _KDF_NONE:
        raise SignatureError(f"unknown key derivation {kdf!r}; expected 'Sc' or none", where=where)
    key_id, sk, chk = body[:8], body[8:72], body[72:104]
    # minisign computes the checksum only for encrypted keys; `-W` keys carry 32 zero bytes.
    unchecked = kdf == _KDF_NONE and chk == bytes(32)
    if not unchecked and hashlib.blake2b(b"Ed" + key_id + sk, digest_size=32).digest() != chk:
        raise SignatureError("secret key checksum mismatch (wrong password or damaged file)", where=where)
    key = SecretKey(key_id, sk[:32])
    if key.public.key != sk[32:]:
        raise SignatureError("secret key is inconsistent: its public half does not match", where=where)
    return key


def parse_signature(text: str, where: str = "") -> Signature:
    lines = _lines(text, where, "signature", 4)
    raw = _b64(lines[1], where, "signature")
    if len(raw) != 74 or raw[:2] not in (b"ED", b"Ed"):
        raise SignatureError(
            f"signature is {len(raw)} bytes with algorithm {raw[:2]!r}; expected 74 bytes, 'ED' or 'Ed'",
            where=where,
        )
    if not lines[2].startswith(_TRUSTED):
        raise SignatureError(f"third line must start with {_TRUSTED.strip()!r}", where=where)
    glob = _b64(lines[3], where, "global signature")
    if len(glob) != 64:
        raise SignatureError(f"global signature is {len(glob)} bytes; expected 64", where=where)
    return Signature(raw[:2].decode(), raw[2:10], raw[10:74], lines[2][len(_TRUSTED) :], glob)


def sign(
    data: bytes,
    key: SecretKey,
    *,
    trusted_comment: str | None = None,
    untrusted_comment: str = "signature from blockd secret key",
    prehash: bool = True,
) -> str:
    """A detached signature file's text for `data`."""
    private = Ed25519PrivateKey.from_private_bytes(key.seed)
    alg = b"ED" if prehash else b"Ed"
    message = hashlib.blake2b(data).digest() if prehash else data
    sig = private.sign(message)
    if trusted_comment is None:
        trusted_comment = f"timestamp:{int(time.time())}"
    if "\n" in trusted_comment or "\r" in trusted_comment:
        raise SignatureError("trusted comment must be one line")
    glob = private.sign(sig + trusted_comment.encode())
    return (
        f"{_UNTRUSTED}{untrusted_comment}\n"
        f"{base64.b64encode(alg + key.key_id + sig).decode()}\n"
        f"{_TRUSTED}{trusted_comment}\n"
        f"{base64.b64encode(glob).decode()}\n"
    )


def verify(data: bytes, sig: Signature, key: PublicKey, where: str = "", *, prehash: bytes | None = None) -> None:
    """Raise SignatureError unless `sig` is `key`'s valid signature of `data` and its trusted comment.

    `prehash`: BLAKE2b-512 of `data`, when the caller checks several signatures of one file."""
    if sig.key_id != key.key_id:
        raise SignatureError(
            f"signature key id {sig.key_id_hex} does not match public key {key.id_hex}", where=where
        )
    public = Ed25519PublicKey.from_public_bytes(key.key)
    message = (prehash or hashlib.blake2b(data).digest()) if sig.algorithm == "ED" else data
    try:
        public.verify(sig.signature, message)
    except InvalidSignature:
        raise SignatureError(
            f"signature by key {key.id_hex} does not match the file's contents", where=where
        ) from None
    try:
        public.verify(sig.global_signature, sig.signature + sig.trusted_comment.encode())
    except InvalidSignature:
        raise SignatureError(
            f"trusted comment {sig.trusted_comment!r} does not match its global signature", where=where
        ) from None
