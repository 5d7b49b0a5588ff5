"""Shared fixtures: a throwaway trust store with regulator and operator keys, and signers."""

from __future__ import annotations

import os
import shutil
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest

from blockd import minisign

ROOT = Path(__file__).resolve().parent.parent
#: the demo regulator key that signed the shipped sample policy (policies/keys/)
DEMO_REGULATOR = minisign.parse_secret_key((ROOT / "policies/keys/demo-regulator.key").read_text())


def repo_config(policy_dir: Path, state_dir: Path) -> str:
    """The head of a blockd.yaml that uses the checkout's trust store, catalog and data."""
    p = ROOT / "policies"
    return (f"trust_store: {p / 'trust'}\npolicy_dir: {policy_dir}\ncatalog_dir: {p / 'catalog'}\n"
            f"prefix_table: {p / 'asn/prefix2as.txt'}\nshared_infra_dir: {p / 'shared-infra'}\n"
            f"state_dir: {state_dir}\n")


def drop_policy(directory: Path, name: str, text: str, *, sign: bool = True) -> Path:
    """Write a policy (signed with the demo regulator key) as a watched directory should see it:
    signature first, then the policy, each by rename, so no pass reads one without the other."""
    path = directory / name
    if sign:
        sig = minisign.sign(text.encode(), DEMO_REGULATOR, trusted_comment=f"file:{name}")
        (directory / f".{name}.minisig.tmp").write_text(sig)
        os.replace(directory / f".{name}.minisig.tmp", directory / f"{name}.minisig")
    (directory / f".{name}.tmp").write_text(text)
    os.replace(directory / f".{name}.tmp", path)
    return path


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
