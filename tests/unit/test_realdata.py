"""Real registry data: the 2018 z-i dump (Telegram-era cloud ranges) and the Re:filter lists."""

from __future__ import annotations

import gzip
from collections import Counter
from datetime import datetime, timezone
from pathlib import Path

import pytest

from blockd.compile import Compilation, CompileSettings, compile_policies
from blockd.guards import Guards, default_psl, load_shared_infra
from blockd.importers import list_to_policy, zi_to_policy
from blockd.model import Catalog
from blockd.policy import parse_policy
from blockd.ranges import parse_cidr

ROOT = Path(__file__).resolve().parents[2]
DATA = ROOT / "tests" / "data"
WINDOW = dict(
    issued_at=datetime(2026, 11, 1, tzinfo=timezone.utc),
    not_before=datetime(2026, 11, 1, tzinfo=timezone.utc),
    not_after=datetime(2030, 1, 1, tzinfo=timezone.utc),
)
NOW = datetime(2026, 11, 29, tzinfo=timezone.utc)

# The April 2018 Telegram blocking: AWS and Google Cloud ranges ordered blocked under
# decision 27-31-2015/Ид4082-15 (the dump's own rows; counted with awk on the raw CSV).
TELEGRAM_ERA = {
    "Amazon Web Services": """34.192.0.0/10 52.64.0.0/12 54.144.0.0/12 34.240.0.0/13 34.248.0.0/13 35.160.0.0/13
        54.64.0.0/13 13.56.0.0/14 18.204.0.0/14 35.156.0.0/14 13.230.0.0/15 18.184.0.0/15 18.194.0.0/15
        18.196.0.0/15 18.236.0.0/15 35.176.0.0/15 35.178.0.0/15 52.58.0.0/15 54.212.0.0/15 54.228.0.0/15
        13.125.0.0/16 18.130.0.0/16 18.144.0.0/16 18.218.0.0/16 35.180.0.0/16 52.32.0.0/16 52.56.0.0/16
        52.57.0.0/16""".split(),
    "Google": "35.192.0.0/12 35.208.0.0/12 35.224.0.0/12 35.184.0.0/13".split(),
}


@pytest.fixture(scope="module")
def settings() -> CompileSettings:
    return CompileSettings(Guards(default_psl(), load_shared_infra(ROOT / "policies" / "shared-infra")))


@pytest.fixture(scope="module")
def zi2018(settings: CompileSettings) -> Compilation:
    raw = gzip.decompress((DATA / "z-i" / "dump-2018-05-05-TRUNCATED-head.csv.gz").read_bytes())
    imported = zi_to_policy(raw, issuer="ru-rkn", serial=1, **WINDOW)
    policy = parse_policy(imported.policy_yaml.encode(), "zi-2018.yaml")
    return compile_policies([policy], Catalog({}), settings, NOW)


def test_every_telegram_era_cloud_range_is_refused(zi2018: Compilation) -> None:
    refused = {}
    for f in zi2018.refused:
        refused.setdefault(f.rule, set()).add(f.guard)
    for provider, prefixes in TELEGRAM_ERA.items():
        for prefix in prefixes:
            assert "shared_infra" in refused.get(prefix, ()), prefix
            if parse_cidr(prefix).prefixlen < 16:
                assert "min_prefix" in refused[prefix], prefix
    reasons = {f.rule: f.reason for f in zi2018.refused if f.guard == "shared_infra"}
    assert "Amazon Web Services" in reasons["34.192.0.0/10"] and "Google" in reasons["35.192.0.0/12"]
    # none of those addresses reaches the rule set
    for prefixes in TELEGRAM_ERA.values():
        for prefix in prefixes:
            c = parse_cidr(prefix)
            assert not any(r.first <= c.last and c.first <= r.last for r in zi2018.ruleset.v4), prefix


def test_zi2018_counts(zi2018: Compilation) -> None:
    assert zi2018.ruleset.counts() == {"domain_exact": 23267, "domain_subtree": 3852, "ipv4_ranges": 13556,
                                       "ipv6_ranges": 0}
    assert Counter(f.guard for f in zi2018.refused) == {"shared_infra": 24452, "min_prefix": 25, "public_suffix": 16}
    assert len(zi2018.orders) == 12451


def test_refilter_lists(settings: CompileSettings) -> None:
    domains = gzip.decompress((DATA / "refilter" / "domains_all.lst.gz").read_bytes()).decode().splitlines()
    prefixes = gzip.decompress((DATA / "refilter" / "ipsum.lst.gz").read_bytes()).decode().splitlines()
    a = list_to_policy(domains, issuer="refilter", serial=1, order_id="domains-all", authority="Re:filter",
                       reference="domains_all.lst", **WINDOW)
    b = list_to_policy(prefixes, issuer="refilter-ip", serial=1, order_id="ipsum", authority="Re:filter",
                       reference="ipsum.lst", **WINDOW)
    unique = {d.strip().lower() for d in domains if d.strip() and not d.startswith("#")}
    assert a.domains + a.cidrs == len(unique) == 86140
    comp = compile_policies([parse_policy(a.policy_yaml.encode(), "a.yaml"), parse_policy(b.policy_yaml.encode(), "b.yaml")],
                            Catalog({}), settings, NOW)
    counts = comp.ruleset.counts()
    guards = Counter(f.guard for f in comp.refused)
    assert counts == {"domain_exact": 86121, "domain_subtree": 0, "ipv4_ranges": 11023, "ipv6_ranges": 0}
    assert guards == {"shared_infra": 18333, "public_suffix": 12, "min_prefix": 11}
    # a list of "blocked" prefixes maintained by volunteers is mostly cloud address space
    assert {f.rule for f in comp.refused if f.guard == "public_suffix"} <= {d for d in unique}
