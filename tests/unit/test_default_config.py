"""systemd/blockd.yaml, the installed default config: it loads, and it says what install.md says."""

from __future__ import annotations

from pathlib import Path

import pytest

from blockd.errors import ConfigError
from blockd.settings import load_settings

ROOT = Path(__file__).resolve().parents[2]
CONFIG = ROOT / "systemd" / "blockd.yaml"


def test_default_config_loads() -> None:
    s = load_settings(CONFIG)
    etc = CONFIG.parent  # installed as /etc/blockd/blockd.yaml: relative paths land in /etc/blockd
    assert (s.trust_store, s.policy_dir, s.catalog_dir) == (etc / "trust", etc / "policies", etc / "catalog")
    assert s.state_dir == Path("/var/lib/blockd")
    nft, dns = s.enforcers.nft, s.enforcers.dns
    assert nft is not None and nft.hooks == ("forward", "output") and nft.verdict == "drop"
    assert dns is not None and dns.listen == (("127.0.0.1", 53), ("::1", 53)) and dns.upstreams
    assert s.enforcers.rpz is None and s.enforcers.ipset is None
    d = s.daemon
    assert d.metrics_listen == ("127.0.0.1", 9153)
    assert d.keep_rules_on_stop is True
    assert d.attest_dir == "/var/lib/blockd/attestations" and d.audit_log == "/var/lib/blockd/audit.jsonl"
    assert d.operator_key == str(etc / "operator.key")


def test_commented_out_sections_load_when_enabled(tmp_path: Path) -> None:
    """The ipset and rpz examples in the comments are valid once uncommented."""
    lines = CONFIG.read_text().splitlines()
    out = []
    for line in lines:
        stripped = line.lstrip()
        indent = line[: len(line) - len(stripped)]
        # "  # ipset:" / "  #   prefix: blockd": a commented key under `enforcers:`
        if indent == "  " and stripped.startswith(("# ipset:", "# rpz:", "#   ")) and ":" in stripped:
            out.append(indent + stripped[2:])
        else:
            out.append(line)
    cfg = tmp_path / "blockd.yaml"
    cfg.write_text("\n".join(out) + "\n")
    s = load_settings(cfg)
    assert s.enforcers.ipset is not None and s.enforcers.rpz is not None
    assert s.enforcers.rpz.listen == (("127.0.0.1", 5300),)


def test_a_wrong_key_in_the_default_config_is_refused(tmp_path: Path) -> None:
    """The load above would catch a typo: unknown keys are errors, not ignored."""
    cfg = tmp_path / "blockd.yaml"
    cfg.write_text(CONFIG.read_text().replace("  drift_check_s: 60", "  drift_check: 60"))
    with pytest.raises(ConfigError, match="drift_check"):
        load_settings(cfg)
