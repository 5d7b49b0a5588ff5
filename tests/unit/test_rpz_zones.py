"""Zones per authority / per order: names, partition, per-zone settings, generated resolver configs,
per-zone metrics, and the settings that are refused."""

from __future__ import annotations

from datetime import datetime, timezone
from pathlib import Path

import pytest

from blockd.dns import rpz, rpzconfig
from blockd.errors import ConfigError
from blockd.metrics import rpz_metrics
from blockd.model import DomainRule, OrderInfo, RuleSet
from blockd.settings import load_settings

T = datetime(2026, 1, 1, tzinfo=timezone.utc)


def order(oid: str, authority: str, url: str | None = None) -> OrderInfo:
    return OrderInfo(oid, "reg", 1, authority, f"ref-{oid}", url, "block", None, None, T)


ORDERS = {"a1": order("a1", "Example Court", "https://court.example/a1"), "a2": order("a2", "Example Court"),
          "v1": order("v1", "Bộ Thông tin và Truyền thông", "https://mic.example/v1")}


def rs(*rules: tuple[str, bool, set[str]]) -> RuleSet:
    return RuleSet.build([DomainRule(n, sub, frozenset(o)) for n, sub, o in rules], orders=ORDERS)


@pytest.mark.parametrize("text,want", [
    ("Example Court", "example-court"),
    ("Bộ Thông tin và Truyền thông", "bo-thong-tin-va-truyen-thong"),
    ("Đài  --  Court!", "dai-court"),
    ("???", ""),
    ("x" * 80, "x" * 40),
])
def test_label(text: str, want: str) -> None:
    assert rpz.label(text) == want


def test_zone_names_collisions_and_overrides() -> None:
    s = rpz.RpzSettings(layout="authority", zones=(rpz.ZoneOverride("Court B", zone="B.RPZ.example"),))
    names = rpz.zone_names(s, ["Example Court", "example  court", "???", "Court B"])
    assert names["Court B"] == "b.rpz.example."
    assert names["Example Court"] != names["example  court"]
    assert names["Example Court"].startswith("example-court-") and names["Example Court"].endswith(".rpz.blockd.")
    assert names["???"].startswith("z-")
    # stable: the same keys give the same names
    assert rpz.zone_names(s, ["example  court", "Example Court", "???", "Court B"]) == names


def test_partition_by_authority() -> None:
    s = rpz.RpzSettings(layout="authority")
    parts = rpz.partition(s, rs(("both.example", False, {"a1", "v1"}), ("court.example", True, {"a1", "a2"}),
                                ("mic.example", False, {"v1"}), ("orphan.example", False, {"nobody"})))
    court, mic = "example-court.rpz.blockd.", "bo-thong-tin-va-truyen-thong.rpz.blockd."
    assert set(parts) == {court, mic, "rpz.blockd."}
    key, c = parts[court]
    assert key == "Example Court"
    assert [(r.name, r.orders) for r in c.domains] == [("both.example", frozenset({"a1"})),
                                                       ("court.example", frozenset({"a1", "a2"}))]
    assert set(c.orders) == {"a1", "a2"}
    assert [r.name for r in parts[mic][1].domains] == ["both.example", "mic.example"]
    assert [r.name for r in parts["rpz.blockd."][1].domains] == ["orphan.example"]  # no known authority


def test_partition_by_order_and_one() -> None:
    r = rs(("both.example", False, {"a1", "v1"}))
    assert set(rpz.partition(rpz.RpzSettings(layout="order"), r)) == {"a1.rpz.blockd.", "v1.rpz.blockd."}
    assert rpz.partition(rpz.RpzSettings(), r) == {"rpz.blockd.": (None, r)}


def test_for_zone_override() -> None:
    s = rpz.RpzSettings(layout="authority", zone_file="/z/{zone}zone", notify=(("192.0.2.1", 53),),
                        allow_transfer=("192.0.2.0/24",),
                        zones=(rpz.ZoneOverride("Example Court", notify=(("198.51.100.1", 53),),
                                                allow_transfer=("198.51.100.0/24",)),))
    z = rpz.for_zone(s, "example-court.rpz.blockd.", "Example Court")
    assert (z.origin, z.zone_file, z.notify, z.allow_transfer) == (
        "example-court.rpz.blockd.", "/z/example-court.rpz.blockd.zone", (("198.51.100.1", 53),),
        ("198.51.100.0/24",))
    other = rpz.for_zone(s, "x.rpz.blockd.", "Other")
    assert (other.notify, other.allow_transfer) == (s.notify, s.allow_transfer)


@pytest.mark.parametrize("kwargs,match", [
    ({"layout": "authorty"}, r"layout: bad value 'authorty'; expected one of one, authority, order"),
    ({"layout": "authority", "zone_file": "/z/rpz.zone"}, r"must contain '\{zone\}'"),
    ({"zones": (rpz.ZoneOverride("x"), rpz.ZoneOverride("x"))}, r"zones\[1\]: match 'x' is given twice"),
    ({"zones": (rpz.ZoneOverride("x", allow_transfer=("192.0.2.1/24",)),)},
     r"zones\[0\].allow_transfer: '192.0.2.1/24' is not a prefix with host bits zero"),
    ({"zones": (rpz.ZoneOverride("x", zone="a.rpz."), rpz.ZoneOverride("y", zone="A.rpz"))},
     r"zones: zone 'a.rpz' is given to two authorities/orders"),
    ({"zones": (rpz.ZoneOverride("x", zone="../../etc/x."),)}, r"zones\[0\].zone: '../../etc/x.' is not a zone name"),
    ({"max_zones": 0}, r"max_zones: 0 must be >= 1"),
])
def test_bad_settings(kwargs: dict[str, object], match: str) -> None:
    with pytest.raises(ValueError, match=match):
        rpz.RpzSettings(**kwargs)  # type: ignore[arg-type]


def test_settings_from_yaml(tmp_path: Path) -> None:
    p = tmp_path / "blockd.yaml"
    p.write_text("trust_store: t\npolicy_dir: p\ncatalog_dir: c\nstate_dir: s\nenforcers:\n  rpz:\n"
                 "    layout: authority\n    zone_file: /z/{zone}zone\n    wipe_cache: ['127.0.0.2:53']\n"
                 "    zones:\n      - match: Example Court\n        zone: court.rpz.example.\n"
                 "        allow_transfer: [192.0.2.0/24]\n")
    s = load_settings(p).enforcers.rpz
    assert s is not None and s.layout == "authority" and s.wipe_cache == (("127.0.0.2", 53),)
    assert s.zones == (rpz.ZoneOverride("Example Court", "court.rpz.example.", None, ("192.0.2.0/24",)),)
    p.write_text(p.read_text().replace("layout: authority", "layout: per-court"))
    with pytest.raises(ConfigError, match=r"blockd.yaml:\d+: enforcers.rpz: layout: bad value 'per-court'"):
        load_settings(p)


def test_legal_texts_and_generated_configs() -> None:
    s = rpz.RpzSettings(layout="authority", zone_file="/z/{zone}zone",
                        tsig=rpz.TsigKey("xfr.", "c2VjcmV0", "hmac-sha256"))
    zones = rpzconfig.zones_for(s, rs(("a.example", False, {"a1"}), ("v.example", False, {"v1"})),
                                known=["gone.rpz.blockd."])
    assert [z.origin for z in zones] == ["rpz.blockd.", "bo-thong-tin-va-truyen-thong.rpz.blockd.",
                                         "example-court.rpz.blockd.", "gone.rpz.blockd."]
    # two orders of Example Court with one URL between them: the URL is named
    assert zones[2].text == "Blocked by order of Example Court, see https://court.example/a1"
    lua = rpzconfig.render("powerdns", s, zones, ("192.0.2.53", 5300))
    assert 'rpzPrimary({"192.0.2.53:5300"}, "example-court.rpz.blockd.", {policyName="example-court", ' \
           'extendedErrorCode=16, extendedErrorExtra="Blocked by order of Example Court, see ' \
           'https://court.example/a1", refresh=1' in lua
    assert 'tsigname="xfr.", tsigalgo="hmac-sha256", tsigsecret="c2VjcmV0"' in lua
    assert "B\\225\\187\\153 Th\\195\\180ng" in lua  # UTF-8 as Lua decimal escapes
    assert lua.count("rpzPrimary(") == 4
    bind = rpzconfig.render("bind", s, zones, ("192.0.2.53", 5300))
    assert 'primaries { 192.0.2.53 port 5300 key xfr; };' in bind and 'key "xfr" {' in bind
    assert bind.index('zone "rpz.blockd" min') < bind.index('zone "example-court.rpz.blockd" min')
    knot = rpzconfig.render("knot", s, zones, ("192.0.2.53", 5300))
    assert '"/z/example-court.rpz.blockd.zone", true))' in knot and "kres.extended_error.CENSORED" in knot
    assert "ignores rpz-ip" not in knot
    from dataclasses import replace
    assert "WARNING: enforcers.rpz.ip_triggers is on" in rpzconfig.render("knot", replace(s, ip_triggers=True), zones,
                                                                         ("192.0.2.53", 5300))
    ub = rpzconfig.render("unbound", s, zones, ("192.0.2.53", 5300))
    assert ub.count("rpz:\n") == 4 and "primary: 192.0.2.53@5300" in ub
    per_order = rpzconfig.zones_for(rpz.RpzSettings(layout="order"), rs(("a.example", False, {"a1"})))
    assert per_order[1].text == "Blocked by Example Court, order a1 (ref-a1), see https://court.example/a1"
    with pytest.raises(ValueError, match="resolver 'dnsmasq' unknown"):
        rpzconfig.render("dnsmasq", s, zones, ("192.0.2.53", 53))


@pytest.mark.parametrize("text,want", [('a"b\\c', '"a\\034b\\092c"'), ("é", '"\\195\\169"'), ("x\ny", '"x\\010y"')])
def test_lua_str(text: str, want: str) -> None:
    assert rpzconfig.lua_str(text) == want


def test_metrics_per_zone() -> None:
    zones = {"a.rpz.blockd.": (5, {"192.0.2.1": 5, "192.0.2.2": 4}),
             "b.rpz.blockd.": (2, {"192.0.2.1": 2, "192.0.2.2": 2})}
    fams = {f.name: f for f in rpz_metrics(None, {}, {}, zones=zones)}
    sync = {s.labels["secondary"]: s.value for s in fams["blockd_rpz_secondary_in_sync"].samples}
    assert sync == {"192.0.2.1": 1, "192.0.2.2": 0}  # lagging on one zone is lagging
    zsync = {(s.labels["zone"], s.labels["secondary"]): s.value for s in fams["blockd_rpz_zone_secondary_in_sync"].samples}
    assert zsync[("b.rpz.blockd.", "192.0.2.2")] == 1 and zsync[("a.rpz.blockd.", "192.0.2.2")] == 0
    assert "blockd_rpz_serial" not in fams  # one serial per zone, not one for the primary
    assert {s.value for s in fams["blockd_rpz_zone_serial"].samples} == {5, 2}


def test_journal_changed_names() -> None:
    s = rpz.RpzSettings()
    j = rpz.Journal(4)
    v1 = rpz.ZoneVersion(s, 1, frozenset({"a.example", "*.t.example", "t.example"}), RuleSet.empty())
    v2 = rpz.ZoneVersion(s, 2, frozenset({"a.example", "b.example"}), RuleSet.empty())
    v3 = rpz.ZoneVersion(s, 3, frozenset({"b.example", "c.example"}), RuleSet.empty())
    j.record(v1, v2)
    j.record(v2, v3)
    assert j.changed(1, 3) == ["a.example", "b.example", "c.example", "t.example"]
    assert j.changed(2, 3) == ["a.example", "c.example"]
    assert j.changed(7, 3) is None


def test_max_zones_keeps_the_rest_in_the_default_zone() -> None:
    s = rpz.RpzSettings(layout="authority", max_zones=2)
    parts = rpz.partition(s, rs(("a.example", False, {"a1"}), ("v.example", False, {"v1"})))
    assert set(parts) == {"rpz.blockd.", "bo-thong-tin-va-truyen-thong.rpz.blockd."}
    assert [r.name for r in parts["rpz.blockd."][1].domains] == ["a.example"]  # still enforced


def test_zone_file_comments_stay_comments() -> None:
    s = rpz.RpzSettings()
    evil = {"e1": OrderInfo("e1", "reg", 1, "Court\nevil.example CNAME .", "r\r\n; x", None, "block", None, None, T)}
    r = RuleSet.build([DomainRule("a.example", False, frozenset({"e1"}))], orders=evil)
    text = "".join(rpz.zone_text(s, rpz.ZoneVersion(s, 1, rpz.owners(r, False), r)))
    records = [line for line in text.splitlines() if line and not line.startswith(("; ", "$", "@"))]
    assert records == ["a.example CNAME . ; orders=e1"]
