"""Issue 14: per-order metrics stay bounded at registry scale; per-order detail is at GET /orders."""

from __future__ import annotations

import json
from datetime import datetime, timedelta, timezone

import pytest

from blockd import metrics as m

T0 = datetime(2026, 12, 1, tzinfo=timezone.utc)


def test_series_are_bounded_whatever_the_number_of_orders() -> None:
    # a registry import: 200k orders without deadlines, plus 1,200 Piracy-Shield-like tickets
    statuses = {f"rkn/d{i}": "enforced" for i in range(200_000)}
    statuses.update({f"ps/t{i}": "enforced" for i in range(1200)})
    statuses["ps/t7"] = "refused"
    deadlines = {f"ps/t{i}": T0 + timedelta(minutes=30 + i) for i in range(1200)}
    s = m.order_series(statuses, deadlines, live=True, limit=500)
    assert len(s.enforced) == len(s.deadlines) == 500 and s.omitted == 700
    # the most urgent: not live first (t7, refused), then the nearest deadlines
    assert s.enforced[("ps/t7",)] == 0.0 and ("ps/t0",) in s.enforced and ("ps/t499",) in s.enforced
    assert ("ps/t500",) not in s.enforced and not any(k[0].startswith("rkn/") for k in s.enforced)
    assert s.counts == {("rkn", "enforced", "1"): 200_000, ("ps", "enforced", "1"): 1199, ("ps", "refused", "0"): 1}


def test_nothing_is_live_while_an_enforcer_fails() -> None:
    s = m.order_series({"a/1": "enforced", "a/2": "pending"}, {"a/1": T0}, live=False)
    assert s.enforced == {("a/1",): 0.0} and s.counts == {("a", "enforced", "0"): 1, ("a", "pending", "0"): 1}


ROWS = [{"order": f"{i}/o{n}", "issuer": i, "status": "enforced" if n % 2 else "pending"}
        for i in ("a", "b") for n in range(5)]


@pytest.mark.parametrize("query, total, first", [
    ("", 10, "a/o0"),
    ("issuer=b", 5, "b/o0"),
    ("issuer=b&status=pending", 3, "b/o0"),
    ("order=a/o3", 1, "a/o3"),
    ("offset=8&limit=1", 10, "b/o3"),
    ("order=nope", 0, None),
])
def test_orders_page_filters_and_pages(query: str, total: int, first: str | None) -> None:
    doc = json.loads(m.orders_page(lambda: iter(ROWS), query))
    assert doc["total"] == total
    assert (doc["orders"][0]["order"] if doc["orders"] else None) == first


def test_orders_page_says_what_is_wrong_with_a_bad_limit() -> None:
    with pytest.raises(ValueError, match="offset and limit must be integers; got None, 'ten'"):
        m.orders_page(lambda: iter(ROWS), "limit=ten")


def test_the_tally_gives_the_series_the_full_pass_gives() -> None:
    from datetime import datetime, timezone

    from blockd.compile import tally_of
    from blockd.compile import OrderResult
    statuses = {f"reg/o{i}": ("enforced", "refused", "pending")[i % 3] for i in range(50)} | {"tix/t": "enforced"}
    deadlines = {"reg/o4": datetime(2026, 12, 1, tzinfo=timezone.utc), "tix/t": datetime(2026, 12, 2, tzinfo=timezone.utc)}
    tally = tally_of({k: OrderResult(k, v) for k, v in statuses.items()})  # type: ignore[arg-type]
    for live in (True, False):
        assert m.order_series(statuses, deadlines, live, limit=1, tally=tally) == m.order_series(statuses, deadlines, live, limit=1)
