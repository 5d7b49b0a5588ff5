"""blockd.importers: z-i dumps and plain lists -> policy YAML. Table-driven, inputs inline."""

from __future__ import annotations

import gzip
from functools import cache
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pytest
import yaml

from blockd.importers import Imported, list_to_policy, normalise_domain, zi_to_policy

DATA = Path(__file__).resolve().parents[1] / "data"
LOADER = getattr(yaml, "CSafeLoader", yaml.SafeLoader)
T0 = datetime(2026, 11, 29, 12, 0, tzinfo=timezone.utc)
WHEN = {"issued_at": T0, "not_before": T0, "not_after": T0 + timedelta(days=365)}
HEADER = "Updated: 2018-05-05 13:25:00 +0000\n"


def zi(rows: str) -> Imported:
    return zi_to_policy((HEADER + rows).encode("cp1251"), issuer="ru-rkn", serial=42, **WHEN)


def orders(result: Imported) -> list[dict[str, Any]]:
    doc = yaml.load(result.policy_yaml, Loader=LOADER)
    assert isinstance(doc, dict)
    out: list[dict[str, Any]] = doc["orders"]
    return out


def targets(result: Imported) -> list[tuple[str, dict[str, list[str]]]]:
    return [(o["id"], o["targets"]) for o in orders(result)]


# (rows, expected [(order id, targets)], expected skipped substrings)
ZI_CASES = [
    pytest.param(
        "1.2.3.4;example.com;http://example.com/x;Роскомнадзор;27-31-2018/Ид1433-18;2018-04-16\n",
        [("zi-27-31-2018-1433-18", {"domains": ["example.com"], "cidrs": ["1.2.3.4/32"]})],
        [],
        id="one-row",
    ),
    pytest.param(
        "1.2.3.4 | 2001:DB8::1 | 10.0.0.0/8 | 2001:db8:1::/48;;;суд;2-946/13;2013-06-10\n",
        [("zi-2-946-13", {"cidrs": ["1.2.3.4/32", "2001:db8::1/128", "10.0.0.0/8", "2001:db8:1::/48"]})],
        [],
        id="multi-ip-ipv6",
    ),
    pytest.param(
        "5.6.7.8;*.Casino.EXAMPLE.;;ФНС;2-6-27/115;2015-11-23\n",
        [("zi-2-6-27-115", {"domains": ["*.casino.example"], "cidrs": ["5.6.7.8/32"]})],
        [],
        id="wildcard-case-trailing-dot",
    ),
    pytest.param(
        ";пример.рф;http://пример.рф/;суд;2-1793/2017;2017-10-20\n"
        ";bk3.1хбет-линия.рус;;суд;2-1793/2017;2017-10-20\n"
        ";bk3.xn--1--blcqqatr5b1a2j.xn--p1acf;;суд;2-1793/2017;2017-10-20\n",
        [("zi-2-1793-2017", {"domains": ["xn--e1afmkfd.xn--p1ai", "bk3.xn--1--blcqqatr5b1a2j.xn--p1acf"]})],
        [],
        id="idn-u-and-a-label-dedupe",
    ),
    pytest.param(
        "1.2.3.4/24;;;Роскомнадзор;9-Restricting;2017-04-28\n",
        [],
        ["line 2: ip '1.2.3.4/24': host bits set in '1.2.3.4/24'; the network is 1.2.3.0/24"],
        id="host-bits-set",
    ),
    pytest.param(
        "1.2.3.4/24 | 5.6.7.0/24;bad_label-ok.example;;МВД;8/7/10-1;2017-09-30\n",
        [("zi-8-7-10-1", {"domains": ["bad_label-ok.example"], "cidrs": ["5.6.7.0/24"]})],
        ["line 2: ip '1.2.3.4/24': host bits set"],
        id="bad-value-keeps-rest-of-row",
    ),
    pytest.param(
        ";;http://example.com/;суд;2-1/2013;2013-01-01\n",
        [],
        ["line 2: no ip and no domain"],
        id="empty-ip-and-domain",
    ),
    pytest.param(
        "999.1.1.1;94.102.63.77;http://94.102.63.77/;суд;2-1/2013;2013-01-01\n"
        ";exa*mple.com;;суд;2-1/2013;2013-01-01\n"
        f";{'a' * 64}.com;;суд;2-1/2013;2013-01-01\n",
        [],
        [
            "line 2: ip '999.1.1.1': not an IPv4 address",
            "line 2: domain '94.102.63.77': looks like an IP address",
            "line 3: domain 'exa*mple.com': '*' is only allowed",
            "line 4: domain 'aaaa",
        ],
        id="unusable-values",
    ),
    pytest.param(
        '1.1.1.1;a.example;"http://a.example/?x=1&amp;y=2";МВД;8/7/10-15265;2017-09-30\n'
        "1.1.1.1;b.example;;МВД;8/7/10-15265;2017-09-30\n"
        "2.2.2.2;b.example;;суд;8/7/10-15265;2017-09-30\n"
        "3.3.3.3;c.example;;суд;only;letters;2017\n",
        [
            ("zi-8-7-10-15265", {"domains": ["a.example", "b.example"], "cidrs": ["1.1.1.1/32"]}),
            ("zi-8-7-10-15265-", {"domains": ["b.example"], "cidrs": ["2.2.2.2/32"]}),
        ],
        ["line 5: 7 fields; expected 6"],
        id="grouping-quoted-url-id-collision",
    ),
]


@pytest.mark.parametrize(("rows", "want", "skipped"), ZI_CASES)
def test_zi_rows(rows: str, want: list[tuple[str, dict[str, list[str]]]], skipped: list[str]) -> None:
    result = zi(rows)
    got = targets(result)
    assert len(got) == len(want) == result.orders
    for (got_id, got_t), (want_id, want_t) in zip(got, want, strict=True):
        assert got_id.startswith(want_id) if want_id.endswith("-") else got_id == want_id
        assert got_t == want_t
    assert result.domains == sum(len(t.get("domains", [])) for _, t in want)
    assert result.cidrs == sum(len(t.get("cidrs", [])) for _, t in want)
    assert len(result.skipped) == len(skipped)
    for line, fragment in zip(result.skipped, skipped, strict=True):
        assert fragment in line


def test_zi_order_shape_and_header() -> None:
    result = zi("1.2.3.4;t.me;;Роскомнадзор;27-31-2018/Ид1433-18;2018-04-16\n")
    doc = yaml.load(result.policy_yaml, Loader=LOADER)
    assert list(doc) == ["issuer", "serial", "issued_at", "not_before", "not_after", "orders"]
    assert doc["issuer"] == "ru-rkn" and doc["serial"] == 42
    assert doc["issued_at"] == T0 and doc["not_after"] == T0 + timedelta(days=365)
    assert "issued_at: 2026-11-29T12:00:00Z\n" in result.policy_yaml
    assert "Роскомнадзор" in result.policy_yaml  # allow_unicode, not \u escapes
    assert doc["orders"] == [
        {
            "id": "zi-27-31-2018-1433-18",
            "legal_basis": {"authority": "Роскомнадзор", "reference": "27-31-2018/Ид1433-18", "url": None},
            "action": "block",
            "targets": {"domains": ["t.me"], "cidrs": ["1.2.3.4/32"]},
        }
    ]
    assert "&" not in result.policy_yaml and "*id" not in result.policy_yaml  # no anchors/aliases
    assert "[" not in result.policy_yaml  # block-style lists


@pytest.mark.parametrize(
    ("when", "match"),
    [
        ({**WHEN, "issued_at": datetime(2026, 11, 29)}, "issued_at: .* has no timezone"),
        ({**WHEN, "not_after": T0}, "is not before not_after"),
    ],
)
def test_timestamps_checked(when: dict[str, datetime], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        zi_to_policy(b"", issuer="x", serial=1, **when)


@pytest.mark.parametrize(
    ("raw", "want"),
    [
        ("Example.COM.", "example.com"),
        ("*.example.com", "*.example.com"),
        ("пример.рф", "xn--e1afmkfd.xn--p1ai"),
        ("*.Пример.РФ", "*.xn--e1afmkfd.xn--p1ai"),
        ("_dmarc.example.com", "_dmarc.example.com"),
    ],
)
def test_normalise_domain(raw: str, want: str) -> None:
    assert normalise_domain(raw) == want


@pytest.mark.parametrize(
    ("raw", "match"),
    [
        ("", "empty name"),
        ("*.", "empty name"),
        ("a.*.example.com", r"'\*' is only allowed"),
        ("exa mple.com", "label 'exa mple'"),
        ("a..example.com", "label ''"),
        ("x" * 64 + ".com", "labels are 1-63"),
        (".".join(["a" * 63] * 4) + ".com", "the limit is 253"),
        ("10.0.0.1", "an IP address"),
    ],
)
def test_normalise_domain_refuses(raw: str, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        normalise_domain(raw)


LIST_KW: dict[str, Any] = {
    "issuer": "ru-refilter",
    "serial": 7,
    "order_id": "refilter-2026-07",
    "authority": "Re:filter",
    "reference": "domains_all.lst @17d83df9",
    **WHEN,
}

LIST_CASES = [
    pytest.param(
        "# comment\n\nexample.com\n*.Example.org  # inline comment\nпример.рф\nexample.com\n",
        {},
        {"domains": ["example.com", "*.example.org", "xn--e1afmkfd.xn--p1ai"]},
        [],
        id="domains",
    ),
    pytest.param(
        "91.108.4.0/22\n149.154.167.99\n2001:b28:f23d::/48\n2001:67c:4e8:f002::e\n",
        {},
        {"cidrs": ["91.108.4.0/22", "149.154.167.99/32", "2001:b28:f23d::/48", "2001:67c:4e8:f002::e/128"]},
        [],
        id="cidrs-v4-v6-bare",
    ),
    pytest.param(
        "10.1.2.3/8\n2001:db8::1/32\n1.2.3.4.example.com\nbad name\n",
        {},
        {"domains": ["1.2.3.4.example.com"]},
        ["line 1: '10.1.2.3/8': host bits set", "line 2: '2001:db8::1/32': host bits set", "line 4: 'bad name'"],
        id="unusable",
    ),
    pytest.param(
        "telegram.org\n*.t.me\n91.108.4.0/22\n",
        {"subtree": True, "action": "unblock", "url": "https://example.org/order"},
        {"domains": ["*.telegram.org", "*.t.me"], "cidrs": ["91.108.4.0/22"]},
        [],
        id="subtree-unblock",
    ),
]


@pytest.mark.parametrize(("text", "extra", "want", "skipped"), LIST_CASES)
def test_list_to_policy(text: str, extra: dict[str, Any], want: dict[str, list[str]], skipped: list[str]) -> None:
    result = list_to_policy(text.splitlines(), **LIST_KW, **extra)
    (order,) = orders(result)
    assert order["id"] == "refilter-2026-07"
    assert order["action"] == extra.get("action", "block")
    assert order["legal_basis"] == {
        "authority": "Re:filter",
        "reference": "domains_all.lst @17d83df9",
        "url": extra.get("url"),
    }
    assert order["targets"] == want
    assert (result.orders, result.domains, result.cidrs) == (
        1,
        len(want.get("domains", [])),
        len(want.get("cidrs", [])),
    )
    assert len(result.skipped) == len(skipped)
    for line, fragment in zip(result.skipped, skipped, strict=True):
        assert fragment in line


def test_list_to_policy_empty_and_bad_action() -> None:
    result = list_to_policy(["# nothing", ""], **LIST_KW)
    assert (result.orders, yaml.load(result.policy_yaml, Loader=LOADER)["orders"]) == (0, [])
    with pytest.raises(ValueError, match="action 'drop'; valid: block, unblock"):
        list_to_policy([], **LIST_KW, action="drop")


@cache
def real_dump(name: str) -> Imported:
    return zi_to_policy(gzip.decompress((DATA / "z-i" / name).read_bytes()), issuer="ru-rkn", serial=1, **WHEN)


# Expected counts on the real fixtures were computed independently of blockd, by a one-off
# script using neither the csv module nor blockd: split each row on ';', take ip/domain from the
# left and org/number from the right (so quoted URLs holding ';' do not shift them), parse each
# '|'-separated address with ipaddress.ip_network(strict=True), treat a domain made only of
# digits and dots as unusable, and count distinct (org, number), (org, number, domain) and
# (org, number, network) tuples, plus unusable values and rows with neither ip nor domain.
# Cross-checked: `awk -F';' '{print $(NF-2)";"$(NF-1)}' | sort -u | wc -l` gives 1734 / 12451
# decisions; in 2014 one decision has only unusable rows, hence 1733 orders.
# 2018: the one-off finds 29838 domain triples; one pair is the same name as U-label and A-label
# (bk3.1хбет-линия.рус / bk3.xn--1--blcqqatr5b1a2j.xn--p1acf), so 29837 after IDNA.
# All skipped values in both dumps are IP addresses in the domain field (6 and 896).
@pytest.mark.parametrize(
    ("name", "orders_", "domains", "cidrs", "skipped"),
    [
        ("dump-2014-04-22.csv.gz", 1733, 2071, 3428, 6),
        ("dump-2018-05-05-TRUNCATED-head.csv.gz", 12451, 29837, 54659, 896),
    ],
)
def test_zi_real_dumps(name: str, orders_: int, domains: int, cidrs: int, skipped: int) -> None:
    result = real_dump(name)
    assert (result.orders, result.domains, result.cidrs, len(result.skipped)) == (orders_, domains, cidrs, skipped)
    assert all("looks like an IP address" in s for s in result.skipped)
    doc = yaml.load(result.policy_yaml, Loader=LOADER)
    ids = [o["id"] for o in doc["orders"]]
    assert len(ids) == len(set(ids)) == orders_


def test_zi_2018_telegram_era_ranges() -> None:
    """The April 2018 Telegram order put AWS/Google/DigitalOcean /10../16 ranges in the register."""
    result = real_dump("dump-2018-05-05-TRUNCATED-head.csv.gz")
    wide = {
        c
        for o in orders(result)
        for c in o["targets"].get("cidrs", [])
        if ":" not in c and int(c.split("/")[1]) < 17
    }
    assert len(wide) == 43
    assert {"34.192.0.0/10", "35.192.0.0/12", "52.64.0.0/12", "54.144.0.0/12", "51.136.0.0/15"} <= wide


# Re:filter fixtures, counted with ipaddress / a regex: ipsum.lst has 30746 lines and 30726
# distinct networks, none with host bits set; domains_all.lst has 86140 distinct lines, 7 of them
# bare IPv4 addresses (which a plain list turns into /32 prefixes).
@pytest.mark.parametrize(
    ("name", "domains", "cidrs"),
    [("ipsum.lst.gz", 0, 30726), ("domains_all.lst.gz", 86133, 7)],
)
def test_refilter_lists(name: str, domains: int, cidrs: int) -> None:
    lines = gzip.decompress((DATA / "refilter" / name).read_bytes()).decode().splitlines()
    result = list_to_policy(lines, **LIST_KW, subtree=True)
    assert (result.orders, result.domains, result.cidrs, result.skipped) == (1, domains, cidrs, ())


# -- Piracy Shield ------------------------------------------------------------------------------

PS_KW: dict[str, Any] = {"issuer": "it-agcom", "serial": 3, "order_id": "ps-0042", "authority": "AGCOM",
                         "reference": "ticket 0042", **WHEN}

PS_CASES = [
    pytest.param(b'{"status": "success", "data": ["a.example", "B.Example."]}', "fqdn",
                 {"domains": ["a.example", "b.example"]}, [], id="json-envelope-fqdn"),
    pytest.param(b'["198.51.100.7", "203.0.113.0/24"]', "ipv4", {"cidrs": ["198.51.100.7/32", "203.0.113.0/24"]},
                 [], id="bare-json-ipv4"),
    pytest.param(b"2001:db8::1\n2001:db8:1::/48\n\n", "ipv6", {"cidrs": ["2001:db8::1/128", "2001:db8:1::/48"]},
                 [], id="text-ipv6-trailing-newline"),
    pytest.param(b"a.example\n192.0.2.1\nbad name\n", "fqdn", {"domains": ["a.example"]},
                 ["f:line 2: '192.0.2.1': looks like an IP address", "f:line 3: 'bad name'"], id="fqdn-unusable"),
    pytest.param(b"192.0.2.1\n2001:db8::1\n192.0.2.1/24\nexample.com\n", "ipv4", {"cidrs": ["192.0.2.1/32"]},
                 ["f:line 2: '2001:db8::1': an IPv6 entry in the IPv4 list",
                  "f:line 3: '192.0.2.1/24': host bits set", "f:line 4: 'example.com'"], id="ipv4-wrong-kind"),
]


@pytest.mark.parametrize(("data", "kind", "want", "skipped"), PS_CASES)
def test_piracy_shield_lists(data: bytes, kind: str, want: dict[str, list[str]], skipped: list[str]) -> None:
    from blockd.importers import piracy_shield_to_policy, ps_entries

    result = piracy_shield_to_policy([(kind, "f", ps_entries(data, "f"))], **PS_KW)
    (order,) = orders(result)
    assert order["id"] == "ps-0042" and order["legal_basis"]["authority"] == "AGCOM"
    assert order["targets"] == want
    assert len(result.skipped) == len(skipped)
    for line, fragment in zip(result.skipped, skipped, strict=True):
        assert fragment in line


@pytest.mark.parametrize(("data", "match"), [
    (b'{"status": "error", "code": 1003, "message": "Permission denied"}', "without status 'success'"),
    (b'{"status": "success", "data": [1, 2]}', "expected a list of strings"),
    (b"{not json", "looks like JSON but does not parse"),
    (b"\xff\xfe", "not UTF-8"),
])
def test_piracy_shield_bad_exports(data: bytes, match: str) -> None:
    from blockd.importers import ps_entries

    with pytest.raises(ValueError, match=match):
        ps_entries(data, "f")


def test_piracy_shield_checksums() -> None:
    import hashlib
    import json

    from blockd.importers import ChecksumError, ps_check_checksum, ps_entries

    data = b'{"status": "success", "data": ["a.example", "b.example"]}'
    entries = ps_entries(data, "f")
    joined = hashlib.sha256(b"a.example\nb.example").hexdigest()
    assert ps_check_checksum(data, entries, joined.encode(), "f") == "entries"
    assert ps_check_checksum(data, entries, json.dumps({"status": "success", "data": joined}).encode(), "f") == "entries"
    assert ps_check_checksum(data, entries, f"{hashlib.sha256(data).hexdigest()}  f.json\n".encode(), "f") == "file"
    with pytest.raises(ChecksumError, match="SHA-256 mismatch: the checksum file says 0000"):
        ps_check_checksum(data, entries, b"0" * 64, "f")
    with pytest.raises(ChecksumError, match="is not a SHA-256"):
        ps_check_checksum(data, entries, b"abc", "f")


WRAPPED = [
    pytest.param("clash", "IP-CIDR,192.0.2.0/24\nIP-CIDR6,2001:db8::/32,no-resolve\nDOMAIN,a.example\n"
                 "DOMAIN-SUFFIX,b.example\n# c\nGEOIP,RU\nIP-CIDR,c.example\nIP-CIDR,1.2.3.4/24\n",
                 {"domains": ["a.example", "*.b.example"], "cidrs": ["192.0.2.0/24", "2001:db8::/32"]},
                 ["line 6: 'GEOIP,RU': Clash rule type 'GEOIP'", "line 7: 'c.example': not an IPv4",
                  "line 8: '1.2.3.4/24': host bits set"], id="clash"),
    pytest.param("dnsmasq", "server=/a.example/127.0.0.1#5353\nipset=/b.example/c.example/blocked\n"
                 "address=/d.example/0.0.0.0\nconf-dir=/etc/dnsmasq.d\nserver=//1.1.1.1\n",
                 {"domains": ["*.a.example", "*.b.example", "*.c.example", "*.d.example"]},
                 ["line 4: 'conf-dir=/etc/dnsmasq.d': not a dnsmasq domain option",
                  "line 5: 'server=//1.1.1.1': expected /name/"], id="dnsmasq"),
]


@pytest.mark.parametrize(("syntax", "text", "want", "skipped"), WRAPPED)
def test_wrapped_lists(syntax: str, text: str, want: dict[str, list[str]], skipped: list[str]) -> None:
    result = list_to_policy(text.splitlines(), **LIST_KW, syntax=syntax)
    (order,) = orders(result)
    assert order["targets"] == want
    assert len(result.skipped) == len(skipped), result.skipped
    for line, fragment in zip(result.skipped, skipped, strict=True):
        assert fragment in line


def test_import_cli_errors_are_one_line(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from blockd.__main__ import main

    bad = tmp_path / "bad.lst"
    bad.write_bytes(b"a.example\n\xff\n")
    common = ["--issuer", "x", "--serial", "1", "-o", str(tmp_path / "out.yaml")]
    assert main(["import", "list", str(bad), "--order-id", "o", "--authority", "a", "--reference", "r", *common]) == 1
    assert capsys.readouterr().err == f"blockd: error: {bad}: not utf-8 at byte 10 (b'\\xff'); the format is utf-8\n"
    assert main(["import", "zi", str(tmp_path / "missing.csv"), *common]) == 1
    assert "No such file or directory" in capsys.readouterr().err
    assert not (tmp_path / "out.yaml").exists()
