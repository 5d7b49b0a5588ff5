"""The fast policy parse (fastyaml + fastpolicy) against the general one (libyaml + schema.Reader).

The promise: where the fast path answers, it answers exactly what the general path answers (the
same Policy); where it cannot (anything unusual, every error), it leaves the answer and the
message to the general path. A new serial reuses the Order objects of unchanged items.
"""

from __future__ import annotations

import json
import random
from datetime import datetime, timezone
from pathlib import Path

import pytest
import yaml

from blockd import fastpolicy, fastyaml, strictyaml
from blockd.errors import InputError, PolicyError
from blockd.fastyaml import Unsupported
from blockd.importers import list_to_policy
from blockd.policy import parse_general, parse_policy, parse_signed
from tests.unit.test_policy import BAD, GOOD

ROOT = Path(__file__).resolve().parents[2]
T0 = datetime(2026, 1, 1, tzinfo=timezone.utc)
HEAD = ("issuer: reg\nserial: {serial}\nissued_at: 2026-01-01T00:00:00Z\nnot_before: 2026-01-01T00:00:00Z\n"
        "not_after: 2030-01-01T00:00:00Z\norders:\n")


def flow_item(i: int, tag: str = "") -> str:
    """One order the way bench/scale.py's registry writes it (flow mappings, JSON strings)."""
    cidrs = [f"10.{i // 250 % 250}.{i % 250}.0/24"] + ([f"2001:db8:{i:x}::/48"] if i % 3 == 0 else [])
    return (f"  - id: d{i}\n    legal_basis: {{authority: Bench Registry, reference: d{i}{tag}}}\n"
            f"    action: block\n    targets: {{domains: {json.dumps([f'n{i}.example'])}, cidrs: {json.dumps(cidrs)}}}\n")


def registry(n: int, serial: int = 1, changed: dict[int, str] | None = None) -> bytes:
    changed = changed or {}
    return (HEAD.format(serial=serial) + "".join(flow_item(i, changed.get(i, "")) for i in range(n))).encode()


def pyyaml_import(n: int) -> bytes:
    """The importers' shape: PyYAML's block style, indentless sequences, `url: null`."""
    names = [f"n{i}.example" for i in range(n)] + ["*.wild.example", "bücher.de", "a.xn--p1ai", "x_y.example"]
    return list_to_policy(names, issuer="reg", serial=3, issued_at=T0, not_before=T0,
                          not_after=T0.replace(year=2030), order_id="o-1", authority="Суд",
                          reference="2-1/26").policy_yaml.encode()


def as_plain(value: object) -> object:
    if isinstance(value, dict):
        return {k: as_plain(v) for k, v in value.items()}
    if isinstance(value, list):
        return [as_plain(v) for v in value]
    return value


def fast(data: bytes, items: fastpolicy.Items | None = None) -> fastpolicy.Parsed:
    return fastpolicy.parse(data, None, "p.yaml", signers=(), digest="d", max_depth=32, max_nodes=8_000_000,
                            items=items)


GOOD_SHAPES = {
    "registry (flow)": registry(50),
    "import (PyYAML block style)": pyyaml_import(30),
    "hand-written block style": (HEAD.format(serial=2) + """\
  # a comment line
  - id: o-1                          # trailing comments
    legal_basis:
      authority: 'Court ''A'''
      reference: "2-1/26"
      url: https://example.org/x?a=b
    action: unblock
    deadline: 2026-11-02T00:00:00+03:00
    dns_answer: refused
    targets:
      services: [telegram, vk]
      domains:
        - "*.Example.ORG."
        - t.me
      cidrs: [91.108.4.0/22, "2001:b28:f23c::/47", 192.0.2.7, 2001:db8::/32]
      asns: [62041, AS59930]
    allow_collateral:
      - {rule: "91.108.4.0/22", guard: shared_infra, reason: own range}
      - rule: "*"
        guard: growth
        reason: ordered
  - {id: o-2, legal_basis: {authority: C, reference: R, url: null}, action: block, targets: {domains: [a.example]}}
""").encode(),
}


@pytest.mark.parametrize("name", list(GOOD_SHAPES))
def test_fast_path_takes_the_common_shapes_and_equals_the_general_path(name: str) -> None:
    data = GOOD_SHAPES[name]
    assert fast(data).policy == parse_general(data, "p.yaml", digest="d")


def test_every_fixture_gives_the_same_policy_or_the_same_error() -> None:
    fixtures = [GOOD.encode(), *(GOOD.replace(old, new, 1).encode() for old, new, _ in BAD),
                *(p.read_bytes() for p in sorted((ROOT / "policies" / "examples").glob("*.yaml")))]
    for data in fixtures:
        try:
            want: object = parse_general(data, "p.yaml")
        except PolicyError as e:
            want = str(e)
        try:
            got: object = parse_policy(data, "p.yaml")
        except PolicyError as e:
            got = str(e)
        assert got == want


@pytest.mark.parametrize("old, new, match", BAD, ids=[b[2][:40] for b in BAD])
def test_the_fast_path_never_refuses_it_leaves_errors_to_the_general_one(old: str, new: str, match: str) -> None:
    with pytest.raises(Unsupported):
        fast(GOOD.replace(old, new, 1).encode())


BAD_IN_A_BIG_FILE = [
    # (order index, replace this, with that, the error)
    (7, "action: block", "action: ban", r"p\.yaml:\d+: orders\[7\]\.action: bad value 'ban'"),
    (3, "reference: d3}", "reference: d3, reference: x}", r"duplicate key 'reference'"),
    (5, "cidrs: [", "cidrs: [10.0.0.1/8, ", r"orders\[5\]\.targets\.cidrs\[0\]: '10\.0\.0\.1/8': host bits set"),
    (9, "n9.example", "n9..example", r"orders\[9\]\.targets\.domains\[0\]: 'n9\.\.example': bad label"),
    (2, "- id: d2", "- id: d1", r"duplicate order id 'd1'"),
    (4, "action: block", "action: block\n    colour: red", r"orders\[4\]\.colour: unknown key 'colour'"),
    (6, "d6}", "d6}  \n  broken: [", r"invalid YAML"),
]


@pytest.mark.parametrize("index, old, new, match", BAD_IN_A_BIG_FILE, ids=[b[3][:30] for b in BAD_IN_A_BIG_FILE])
def test_errors_in_a_large_file_keep_their_lines(index: int, old: str, new: str, match: str) -> None:
    items = [flow_item(i) for i in range(20)]
    assert old in items[index]
    items[index] = items[index].replace(old, new, 1)
    data = (HEAD.format(serial=1) + "".join(items)).encode()
    with pytest.raises(PolicyError, match=match) as fast_error:
        parse_policy(data, "p.yaml")
    with pytest.raises(PolicyError) as general_error:
        parse_general(data, "p.yaml")
    assert str(fast_error.value) == str(general_error.value)


# -- the reader against libyaml, on mutated documents ---------------------------------------------
PIECES = [" ", "  ", "\n", "\n  ", "\n    ", ":", ": ", "- ", "-", "#", " #", "'", '"', "[", "]", "{", "}", ",", ", ",
          "&a ", "*a", "!t ", "?", "|", ">", "%", "@", "`", "\\", "\t", "\r", "a", "b c", "1", "~", "null", "x:y",
          "---", "...", "\u2028", "\ufeff", "é", ":x", "a: b", "[a, b]", "{a: b}", '"q"', "'s'", ",]", "[,", "::"]
SEEDS = [GOOD, GOOD_SHAPES["hand-written block style"].decode(), registry(3).decode(), pyyaml_import(2).decode(),
         "a: [x, {y: z, w: [1, 2]}, \"q r\"]\nb:\n- c\n- d: e\n  f: [g]\n"]


def mutations(count: int, seed: int = 14) -> list[str]:
    rng = random.Random(seed)
    out = []
    for _ in range(count):
        text = rng.choice(SEEDS)
        for _ in range(rng.randint(1, 3)):
            at = rng.randrange(len(text) + 1)
            cut = rng.choice([0, 0, 1, 2])
            text = text[:at] + rng.choice(PIECES) + text[at + cut:]
        out.append(text)
    return out


def test_the_reader_agrees_with_libyaml_on_mutated_documents() -> None:
    decided = 0
    for text in mutations(6000):
        try:
            doc, keys, _ = fastyaml.load(text, max_depth=32, max_nodes=8_000_000)
        except Unsupported:
            continue
        decided += 1
        if keys != fastyaml.count_keys(doc):  # a duplicate key: libyaml refuses it
            with pytest.raises(InputError, match="duplicate key"):
                strictyaml.load(text.encode(), "m.yaml")
            continue
        try:
            general = strictyaml.load(text.encode(), "m.yaml")
        except InputError as e:
            pytest.fail(f"the fast reader took what libyaml refuses ({e}):\n{text}")
        assert as_plain(general) == doc, text
    assert decided > 500  # the fast reader decides many of them (else this test shows nothing)


FLOWS = [
    # (flow, what libyaml reads, or None when the fast reader must leave it to libyaml)
    ('[a, "b c", d e]', ["a", "b c", "d e"]),
    ("[2001:db8::/32, https://x.org/a?b=c]", ["2001:db8::/32", "https://x.org/a?b=c"]),
    ("{a: , b: c}", {"a": "", "b": "c"}),
    ("{a: [], b: {}}", {"a": [], "b": {}}),
    ("[a, ]", None), ('["a" "b"]', None), ('[a "b"]', None), ('["a"b]', None), ("[&x a]", None), ("[*x]", None),
    ("[!t a]", None), ("[? a]", None), ("[-1]", None), ('[" a"]', None), ('["a,b"]', None), ('["a: b"]', None),
    ("[a: b]", None), ("{a}", None), ("[a:]", None), ("[[a]", None), ('{"a":b}', None), ("[a #b]", None),
]


@pytest.mark.parametrize("flow, want", FLOWS, ids=[f[0] for f in FLOWS])
def test_flows(flow: str, want: object) -> None:
    text = f"k: {flow}\n"
    if want is None:
        with pytest.raises(Unsupported):
            fastyaml.load(text, max_depth=32, max_nodes=100)
    else:
        assert fastyaml.load(text, max_depth=32, max_nodes=100)[0] == {"k": want}
    try:
        assert want is None or as_plain(strictyaml.load(text.encode(), "f.yaml")) == {"k": want}
    except InputError:
        assert want is None


def test_limits_are_left_to_the_general_loader() -> None:
    with pytest.raises(Unsupported):  # the node limit
        fastyaml.load("a: [" + "x, " * 200 + "x]\n", max_depth=32, max_nodes=100)
    deep = "".join(" " * i + "a:\n" for i in range(40))
    with pytest.raises(Unsupported):  # the nesting limit
        fastyaml.load(deep, max_depth=32, max_nodes=10_000)
    assert yaml.__with_libyaml__


# -- incremental parse of a new serial -----------------------------------------------------------
CHANGES = [
    # (what changes between serial 1 and serial 2 of a 40-order registry, how many items are read again)
    ("one order changed", lambda: registry(40, 2, {17: "-x"}), 1),
    ("ten orders changed", lambda: registry(40, 2, {i: "-x" for i in range(0, 40, 4)}), 10),
    ("an order added", lambda: registry(41, 2), 1),
    ("the last order removed", lambda: registry(39, 2), 0),
    ("orders moved", lambda: HEAD.format(serial=2).encode() + b"".join(
        flow_item(i).encode() for i in [*range(20, 40), *range(20)]), 0),
    ("a comment after an item", lambda: registry(40, 2).replace(b"  - id: d9\n", b"  # new\n  - id: d9\n"), 1),
    ("the header changed", lambda: registry(40, 2).replace(b"serial: 2\n", b"serial: 2\ndescription: x\n"), 0),
]


@pytest.mark.parametrize("name, new, fresh", CHANGES, ids=[c[0] for c in CHANGES])
def test_incremental_parse_equals_a_full_parse_and_reuses_unchanged_orders(name: str, new: object, fresh: int) -> None:
    items = fastpolicy.Items()
    old = fast(registry(40), items)
    assert old.items is not None and len(items) == 40
    data = new()  # type: ignore[operator]
    again = fast(data, items)
    assert again.policy == parse_general(data, "p.yaml", digest="d")
    before = {id(o) for o in old.policy.orders}
    assert sum(id(o) not in before for o in again.policy.orders) == fresh  # the rest: the same objects


def test_incremental_parse_reads_only_what_changed() -> None:
    items = fastpolicy.Items()
    fast(registry(40), items)
    fastpolicy.incremental(registry(40, 2, {3: "-x"}), "p.yaml", signers=(), digest="d", max_depth=32,
                           max_nodes=8_000_000, items=items)
    assert len(items) == 41  # one new item parsed; the other 39 were found


INCREMENTAL_BAD = [
    # (a new serial that the full parser refuses or reads differently, the error or None)
    ("an error in a changed item names its line in the new file",
     lambda: registry(40, 2).replace(b"reference: d30}", b"reference: d30}\n    colour: red"),
     r"p\.yaml:129: orders\[30\]\.colour: unknown key"),
    ("a duplicate id across items", lambda: registry(40, 2).replace(b"- id: d12\n", b"- id: d11\n"),
     r"duplicate order id 'd11'"),
    ("a top-level key after the orders", lambda: registry(40, 2) + b"description: after\n", None),
    ("a quoted scalar that spans an item boundary",
     lambda: registry(40, 2).replace(b"reference: d5}", b'reference: "d5\n  - id: d6}'), None),
    ("an item split in the middle", lambda: registry(40, 2).replace(b"    action: block\n  - id: d8",
                                                                     b"  - action: block\n  - id: d8", 1), None),
]


@pytest.mark.parametrize("name, new, error", INCREMENTAL_BAD, ids=[c[0] for c in INCREMENTAL_BAD])
def test_incremental_parse_never_accepts_what_the_full_parse_refuses(name: str, new: object, error: str | None) -> None:
    items = fastpolicy.Items()
    fast(registry(40), items)
    data = new()  # type: ignore[operator]
    try:
        want: object = parse_general(data, "p.yaml", digest="d")
    except PolicyError as e:
        want = str(e)
    try:
        got: object = parse_signed(data, "p.yaml", digest="d", items=items).policy
    except PolicyError as e:
        got = str(e)
    assert got == want
    if error is not None:
        assert isinstance(got, str) and __import__("re").search(error, got)


def test_the_item_cache_is_bounded_by_the_files_present() -> None:
    from blockd.parsecache import ParseCache

    cache = ParseCache()
    for serial in range(1, 8):  # every serial changes every order
        data = registry(300, serial, {i: f"-{serial}" for i in range(300)})
        parsed = parse_signed(data, "p.yaml", digest=str(serial), items=cache.items)
        key = (str(serial), "p.yaml", ())
        cache.policies[key] = parsed.policy
        assert parsed.items is not None
        cache.files[key] = parsed.items
        cache.retain({(str(serial), "p.yaml")})
        assert len(cache.items) <= 2 * 300 + 1024
    assert len(cache.files) == 1
