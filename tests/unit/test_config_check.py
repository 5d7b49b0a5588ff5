"""`blockd config check` validates what `run` will use and reports every problem at once."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from blockd.__main__ import main
from tests.conftest import ROOT

HEAD = (f"trust_store: {ROOT / 'policies/trust'}\npolicy_dir: {ROOT / 'policies/examples'}\n"
        f"catalog_dir: {ROOT / 'policies/catalog'}\nprefix_table: {ROOT / 'policies/asn/prefix2as.txt'}\n"
        f"shared_infra_dir: {ROOT / 'policies/shared-infra'}\nstate_dir: /nonexistent-blockd-state\n")


def check(capsys: pytest.CaptureFixture[str], tmp_path: Path, body: str) -> tuple[int, dict]:
    config = tmp_path / "blockd.yaml"
    config.write_text(HEAD + body)
    code = main(["config", "check", "--json", "--config", str(config)])
    out = capsys.readouterr().out
    return code, json.loads(out)


def test_a_good_config_is_ok(capsys, tmp_path: Path) -> None:
    code, data = check(capsys, tmp_path, "enforcers:\n  dns:\n    listen: ['127.0.0.1:5353']\n")
    assert code == 0 and data["ok"] and data["enforcers"] == ["dns"], data


BAD = [
    ("block_page: {blocked_by: 'https://isp.example/blocking', listen: ['127.0.0.1:9153']}\n",
     "block_page.listen[0]: 127.0.0.1:9153 (tcp) is also daemon.metrics_listen"),
    ("allowlist:\n  cidrs: ['::ffff:0:0/96']\n", "allowlist.cidrs[0]: 0.0.0.0/0 is wider than the guards' min_prefix_v4"),
    ("enforcers:\n  dns:\n    default_answer: nxdomian\n", "enforcers.dns.default_answer: bad value 'nxdomian'"),
    ("daemon:\n  attest_dir: /tmp\n", "attest_dir is set but operator_key is not"),
    ("daemon:\n  drift_check_s: 0\n", "daemon.drift_check_s: 0.0 is too small"),
    ("daemon:\n  drift_check_s: -1\n", "daemon.drift_check_s: -1.0 is too small"),
    ("daemon:\n  attest_period_s: 0\n", "daemon.attest_period_s: 0.0 is too small"),
    ("daemon:\n  poll_s: 0\n", "daemon.poll_s: 0.0 is too small"),
    ("enforcers:\n  dns:\n    listen: ['127.0.0.1:9153']\n", "daemon.metrics_listen: 127.0.0.1:9153 (tcp) is also"),
    ("enforcers:\n  dns:\n    listen: ['127.0.0.1:5353']\n  rpz:\n    listen: ['0.0.0.0:5353']\n",
     "enforcers.rpz.listen[0]: 0.0.0.0:5353 (udp) is also enforcers.dns.listen[0]"),
    ("enforcers:\n  dns:\n    listen: ['[::]:5353']\n  rpz:\n    listen: ['127.0.0.2:5353']\n",
     "enforcers.rpz.listen[0]: 127.0.0.2:5353 (udp) is also enforcers.dns.listen[0]"),
]


@pytest.mark.parametrize("body, expect", BAD, ids=[b[1][:40] for b in BAD])
def test_values_that_cannot_work_are_refused(capsys, tmp_path: Path, body: str, expect: str) -> None:
    config = tmp_path / "blockd.yaml"
    config.write_text(HEAD + body)
    code = main(["config", "check", "--config", str(config)])
    err = capsys.readouterr().err
    assert code == 1 and expect in err, err


def test_every_problem_of_every_section_at_once(capsys, tmp_path: Path) -> None:
    body = ("enforcers:\n  dns:\n    default_answer: nxdomian\n    listen: ['127.0.0.1:9153']\n"
            "daemon:\n  drift_check_s: 0\n  attest_period_s: 0\n  attest_dir: /tmp\n")
    config = tmp_path / "blockd.yaml"
    config.write_text(HEAD + body)
    assert main(["config", "check", "--config", str(config)]) == 1
    err = capsys.readouterr().err
    assert "5 problem(s)" in err, err
    for part in ("default_answer", "drift_check_s", "attest_period_s", "operator_key", "metrics_listen"):
        assert part in err


def test_missing_shared_infra_and_key_files_are_reported(capsys, tmp_path: Path) -> None:
    config = tmp_path / "blockd.yaml"
    config.write_text(HEAD.replace(f"shared_infra_dir: {ROOT / 'policies/shared-infra'}\n", "")
                      + f"daemon:\n  operator_key: {tmp_path / 'missing.key'}\n  attest_dir: {tmp_path}\n")
    assert main(["config", "check", "--json", "--config", str(config)]) == 1
    data = json.loads(capsys.readouterr().out)
    text = "\n".join(data["problems"])
    assert "shared_infra_dir is not set" in text and "missing.key" in text, text


def test_the_shipped_config_enables_the_shared_infra_guard() -> None:
    from blockd.settings import load_settings

    s = load_settings(ROOT / "systemd" / "blockd.yaml")
    assert s.shared_infra_dir == ROOT / "systemd" / "shared-infra"


@pytest.mark.parametrize("line", ["0.0.0.0/0", "::/0", "10.0.0.0/7", "2000::/15"])
def test_a_shared_infra_line_wider_than_any_provider_is_refused(line: str) -> None:
    from blockd.errors import CatalogError
    from blockd.guards import parse_shared_infra

    with pytest.raises(CatalogError, match="is wider than"):
        parse_shared_infra([("x.txt", f"# provider: X\n192.0.2.0/24\n{line}\n".encode())])
