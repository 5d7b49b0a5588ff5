"""Shared fixtures: a throwaway trust store with regulator and operator keys, and signers."""

from __future__ import annotations

import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest

from blockd import minisign

ROOT = Path(__file__).resolve().parent.parent


@dataclass
class Keys:
    trust: Path
    regulator: list[minisign.SecretKey]
    operator: minisign.SecretKey

    def sign(self, path: Path, key: minisign.SecretKey | None = None, name: str | None = None) -> Path:
        key = key or self.regulator[0]
        out = path.with_name(f"{path.name}.{name}.minisig" if name else f"{path.name}.minisig")
        out.write_text(minisign.sign(path.read_bytes(), key, trusted_comment=f"file:{path.name}"))
        return out


def make_trust(tmp: Path, *, regulators: int = 1, threshold: int = 1) -> Keys:
    trust = tmp / "trust"
    reg = [minisign.generate() for _ in range(regulators)]
    op = minisign.generate()
    (trust / "reg").mkdir(parents=True)
    for i, k in enumerate(reg):
        (trust / "reg" / f"k{i}.pub").write_text(k.public.to_text())
    (trust / "reg" / "issuer.yaml").write_text(f"threshold: {threshold}\nroles: [policy]\n")
    (trust / "op").mkdir()
    (trust / "op" / "op.pub").write_text(op.public.to_text())
    (trust / "op" / "issuer.yaml").write_text("roles: [catalog]\n")
    return Keys(trust, reg, op)


@pytest.fixture
def keys(tmp_path: Path) -> Keys:
    return make_trust(tmp_path)


@pytest.fixture
def catalog_dir(tmp_path: Path, keys: Keys) -> Path:
    """The shipped catalog and ASN table, re-signed with the test operator key."""
    d = tmp_path / "catalog"
    shutil.copytree(ROOT / "policies" / "catalog", d, ignore=shutil.ignore_patterns("*.minisig"))
    for f in d.glob("*.yaml"):
        keys.sign(f, keys.operator)
    table = tmp_path / "prefix2as.txt"
    shutil.copy(ROOT / "policies" / "asn" / "prefix2as.txt", table)
    keys.sign(table, keys.operator)
    return d


@pytest.fixture
def write_policy(tmp_path: Path, keys: Keys) -> Callable[..., Path]:
    def write(text: str, name: str = "p.yaml", sign: bool = True) -> Path:
        path = tmp_path / "policies" / name
        path.parent.mkdir(exist_ok=True)
        path.write_text(text)
        if sign:
            keys.sign(path)
        return path

    return write
