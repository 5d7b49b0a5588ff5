"""Prometheus metrics: definitions on a registry passed in, and a collector for live counters.

Labels are bounded: enforcer, kind, issuer, guard, reason, result, set — never a domain or
an address. An order id is a label only on the per-order series of deadline-bearing orders,
at most ORDER_SERIES_MAX of them (the most urgent: not live first, then nearest deadline); a
registry import has an order per decision (hundreds of thousands), so every order is counted
per issuer and status (`blockd_orders`), and per-order detail is at GET /orders (JSON) and in
the attestation. Counters that live elsewhere (kernel rule counters, the sinkhole's
answer counts) are read at scrape time by `LiveCollector` from the latest snapshot the
daemon took, so they are exported as counters, not gauges.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from datetime import datetime
from urllib.parse import parse_qs

import asyncio
import json

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, Info, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from blockd import __version__


@dataclass
class Metrics:
    registry: CollectorRegistry
    build: Info
    policy_serial: Gauge
    policy_issued: Gauge
    policy_expiry: Gauge
    policy_info: Gauge
    ruleset_info: Gauge
    rules: Gauge
    apply_duration: Histogram
    apply_failures: Counter
    rejections: Counter
    findings: Gauge
    drift_repairs: Counter
    in_sync: Gauge
    reconcile: Counter
    last_reconcile: Gauge
    time_to_enforce: Histogram
    order_deadline: Gauge
    order_enforced: Gauge
    orders: Gauge
    order_series_omitted: Gauge
    policy_status: Gauge
    input_refused: Gauge
    input_failures: Counter
    policy_dir_events: Counter
    state_write_failures: Counter
    clock_behind: Gauge
    clock_ahead: Gauge
    write_failures: Counter
    ready: Gauge
    dns_table_file: Counter


def create(registry: CollectorRegistry | None = None) -> Metrics:
    r = registry or CollectorRegistry()
    m = Metrics(
        registry=r,
        build=Info("blockd_build", "blockd version", registry=r),
        policy_serial=Gauge("blockd_policy_serial", "Serial of the policy in force, per issuer", ["issuer"], registry=r),
        policy_issued=Gauge("blockd_policy_issued_timestamp_seconds", "issued_at of the policy in force",
                            ["issuer"], registry=r),
        policy_expiry=Gauge("blockd_policy_expiry_timestamp_seconds", "not_after of the policy in force",
                            ["issuer"], registry=r),
        policy_info=Gauge("blockd_policy_info", "SHA-256 of the policy in force (value 1)", ["issuer", "digest"],
                          registry=r),
        ruleset_info=Gauge("blockd_ruleset_info", "Digest of the compiled rule set in force (value 1)", ["digest"],
                           registry=r),
        rules=Gauge("blockd_rules", "Rules held, per enforcer (compiled = desired) and kind", ["enforcer", "kind"],
                    registry=r),
        apply_duration=Histogram("blockd_apply_duration_seconds", "Time one enforcer takes to apply a rule set",
                                 ["enforcer"], registry=r,
                                 buckets=(0.001, 0.005, 0.01, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60)),
        apply_failures=Counter("blockd_apply_failures_total", "Failed applies (old state kept)", ["enforcer"],
                               registry=r),
        rejections=Counter("blockd_policy_rejections_total", "Policy files refused, by reason", ["reason"],
                           registry=r),
        findings=Gauge("blockd_guard_findings", "Rules stopped (or let through) by an over-blocking guard",
                       ["guard", "allowed"], registry=r),
        drift_repairs=Counter("blockd_drift_repairs_total", "Drift found in read-back and repaired", ["enforcer"],
                              registry=r),
        in_sync=Gauge("blockd_enforcer_in_sync", "1 when the read-back digest equals the desired digest",
                      ["enforcer"], registry=r),
        reconcile=Counter("blockd_reconcile_total", "Reconcile passes, by result", ["result"], registry=r),
        last_reconcile=Gauge("blockd_last_reconcile_timestamp_seconds", "End of the last successful reconcile pass",
                             registry=r),
        time_to_enforce=Histogram("blockd_time_to_enforce_seconds",
                                  "From a policy's issued_at (or receipt, if later) to its rules being live",
                                  ["enforcer"], registry=r,
                                  buckets=(0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60, 300, 900, 3600, 14400, 86400)),
        order_deadline=Gauge("blockd_order_deadline_timestamp_seconds", "Deadline of an order (if it has one)",
                             ["order"], registry=r),
        order_enforced=Gauge("blockd_order_enforced", "1 when the order's rules are live on every enforcer "
                             "(deadline-bearing orders only, the most urgent ORDER_SERIES_MAX)", ["order"], registry=r),
        orders=Gauge("blockd_orders", "Orders per issuer and status; live=1: enforced on every enforcer",
                     ["issuer", "status", "live"], registry=r),
        order_series_omitted=Gauge("blockd_order_series_omitted", "Deadline-bearing orders without their own "
                                   "blockd_order_* series (beyond ORDER_SERIES_MAX; see GET /orders)", registry=r),
        policy_status=Gauge("blockd_policy_status", "Policy files per issuer and status (active, pending, superseded, "
                            "expired, rejected); issuer \"\" when a file was refused before its issuer was known",
                            ["issuer", "status"], registry=r),
        input_refused=Gauge("blockd_input_refused", "1 while an input (trust_store, catalog, state) is refused and the "
                            "last good one is in use", ["input"], registry=r),
        input_failures=Counter("blockd_input_failures_total", "Inputs refused (each refusal counted once)", ["input"],
                               registry=r),
        dns_table_file=Counter("blockd_dns_table_file_total", "The sinkhole's persisted table: loads at start "
                               "(loaded, missing, corrupt, stale, unreadable, empty; journal_dropped: a journal's "
                               "tail not applied) and saves (saved: a new base, appended: a journal record, save_failed)",
                               ["result"], registry=r),
        policy_dir_events=Counter("blockd_policy_dir_events_total", "The policy directory itself was removed or "
                                  "replaced (the watch was re-armed)", ["event"], registry=r),
        state_write_failures=Counter(
            "blockd_state_write_failures_total", "Passes that could not record newly accepted policies in the state "
            "directory (full, read-only, immutable): the new orders wait, not enforced, and the pass is retried",
            registry=r),
        clock_behind=Gauge("blockd_clock_behind_seconds", "How far the wall clock is behind the highest time seen "
                           "(a step back); validity windows are judged at the highest time", registry=r),
        clock_ahead=Gauge("blockd_clock_ahead_held_seconds", "A forward step of the wall clock being held back "
                          "(taken once it has lasted 10 minutes); 0 when none", registry=r),
        write_failures=Counter("blockd_attestation_write_failures_total",
                               "Failed writes of statements (attestation), the audit log (audit) or the "
                               "time-to-enforce state (state); enforcement continues, the write is retried",
                               ["kind"], registry=r),
        ready=Gauge("blockd_ready", "1 once every required enforcer has applied and READY=1 was sent",
                    registry=r),
    )
    for how in ("removed", "replaced"):
        m.policy_dir_events.labels(how)
    for name in ("trust_store", "catalog", "state"):
        m.input_refused.labels(name).set(0)
        m.input_failures.labels(name)
    m.build.info({"version": __version__})
    return m


#: per-order series (blockd_order_enforced, blockd_order_deadline_timestamp_seconds) at most
ORDER_SERIES_MAX = 500
#: orders in one GET /orders answer unless `limit` says otherwise (at most ORDERS_PAGE_MAX)
ORDERS_PAGE, ORDERS_PAGE_MAX = 1000, 100_000


@dataclass(frozen=True, slots=True)
class OrderSeries:
    """What the per-order metrics export: bounded whatever the number of orders."""

    enforced: Mapping[tuple[str], float]
    deadlines: Mapping[tuple[str], float]
    counts: Mapping[tuple[str, str, str], float]  # (issuer, status, live) -> orders
    omitted: int


def order_series(statuses: Mapping[str, str], deadlines: Mapping[str, datetime | None], live: bool,
                 limit: int = ORDER_SERIES_MAX, tally: Mapping[tuple[str, str], int] | None = None) -> OrderSeries:
    """Pure: order key ("issuer/id") -> status, and its deadline -> the bounded series.

    An order is live when its status is enforced (or partially refused) and every enforcer
    applied the rule set. Orders with a deadline get their own series, the most urgent first:
    those not live, then by deadline; the rest are only counted. `tally` ((issuer, status) ->
    orders, `Compilation.tally`) spares the pass over every order: only the orders with a
    deadline are looked at then.
    """
    counts: dict[tuple[str, str, str], float] = {}
    urgent: list[tuple[bool, float, str]] = []
    if tally is not None:
        for (issuer, status), n in tally.items():
            ok = status in ("enforced", "partially_refused") and live
            counts[(issuer, status, "1" if ok else "0")] = n
        for key, deadline in deadlines.items():
            status = statuses.get(key)
            if deadline is not None and status is not None:
                ok = status in ("enforced", "partially_refused") and live
                urgent.append((ok, deadline.timestamp(), key))
    for key, status in statuses.items() if tally is None else ():
        ok = status in ("enforced", "partially_refused") and live
        issuer = key.split("/", 1)[0]
        c = (issuer, status, "1" if ok else "0")
        counts[c] = counts.get(c, 0) + 1
        deadline = deadlines.get(key)
        if deadline is not None:
            urgent.append((ok, deadline.timestamp(), key))
    urgent.sort()
    kept = urgent[:limit]
    return OrderSeries({(k,): 1.0 if ok else 0.0 for ok, _, k in kept}, {(k,): d for _, d, k in kept}, counts,
                       len(urgent) - len(kept))


def orders_page(rows: Callable[[], Iterable[Mapping[str, object]]], query: str) -> bytes:
    """GET /orders?issuer=&status=&order=&offset=&limit= -> JSON {total, offset, orders: [...]}."""
    q = {k: v[-1] for k, v in parse_qs(query).items()}
    try:
        offset = max(0, int(q.get("offset", 0)))
        limit = min(ORDERS_PAGE_MAX, max(0, int(q.get("limit", ORDERS_PAGE))))
    except ValueError:
        raise ValueError(f"offset and limit must be integers; got {q.get('offset')!r}, {q.get('limit')!r}") from None
    picked = [r for r in rows() if all(str(r.get(f)) == q[f] for f in ("issuer", "status", "order") if f in q)]
    doc = {"total": len(picked), "offset": offset, "orders": picked[offset:offset + limit]}
    return json.dumps(doc, default=str, separators=(",", ":")).encode()


def replace_labels(gauge: Gauge, values: Mapping[tuple[str, ...], float]) -> None:
    """Set a labelled gauge to exactly `values` (old label sets disappear)."""
    gauge.clear()
    for labels, value in values.items():
        gauge.labels(*labels).set(value)


@dataclass
class Live:
    """The latest counters read from the enforcers; the daemon refreshes it, scrapes read it."""

    kernel: dict[str, object] = field(default_factory=dict)  # enforcer -> KernelStats
    dns: Callable[[], tuple[Mapping[str, int], Mapping[str, int]]] | None = None  # (by result, by order)
    #: the sinkhole's defences: (TCP connections refused or cut by reason, upstream replies rejected by reason)
    dns_defence: Callable[[], tuple[Mapping[str, int], Mapping[str, int]]] | None = None
    #: (serial served or None, {secondary address: serial it holds or None}, RpzServer.stats)
    rpz: Callable[[], tuple[int | None, Mapping[str, int | None], Mapping[str, int]]] | None = None
    #: every RPZ zone served: {zone: (serial, {secondary address: serial it holds or None})}
    rpz_zones: Callable[[], Mapping[str, tuple[int, Mapping[str, int | None]]]] | None = None
    #: the HTTP 451 page: (listening, {result: responses})
    block_page: Callable[[], tuple[bool, Mapping[str, int]]] | None = None


class LiveCollector(Collector):
    def __init__(self, live: Live) -> None:
        self.live = live

    def collect(self) -> Iterable[CounterMetricFamily | GaugeMetricFamily]:
        packets = CounterMetricFamily("blockd_kernel_packets", "Packets matched by blockd's kernel rules",
                                      labels=["enforcer", "rule"])
        octets = CounterMetricFamily("blockd_kernel_bytes", "Bytes matched by blockd's kernel rules",
                                     labels=["enforcer", "rule"])
        elements = GaugeMetricFamily("blockd_kernel_set_elements", "Elements held in each kernel set",
                                     labels=["enforcer", "set"])
        for name, stats in sorted(self.live.kernel.items()):
            for rule, (p, b) in sorted(getattr(stats, "counters", {}).items()):
                packets.add_metric([name, rule], p)
                octets.add_metric([name, rule], b)
            for set_name, n in sorted(getattr(stats, "elements", {}).items()):
                elements.add_metric([name, set_name], n)
        yield packets
        yield octets
        yield elements
        if self.live.dns is not None:
            by_result, by_order = self.live.dns()
            queries = CounterMetricFamily("blockd_dns_queries", "DNS queries answered, by result", labels=["result"])
            for result, n in sorted(by_result.items()):
                queries.add_metric([result], n)
            yield queries
            # By issuer, not by order (unbounded); per order: GET /orders.
            blocked = CounterMetricFamily("blockd_dns_blocked_queries", "Blocked DNS answers, by the issuer of "
                                          "the order named in them", labels=["issuer"])
            by_issuer: dict[str, int] = {}
            for order, n in by_order.items():
                issuer = order.split("/", 1)[0]
                by_issuer[issuer] = by_issuer.get(issuer, 0) + n
            for issuer, n in sorted(by_issuer.items()):
                blocked.add_metric([issuer], n)
            yield blocked
            closed_by, rejected_by = self.live.dns_defence() if self.live.dns_defence is not None else ({}, {})
            closed = CounterMetricFamily("blockd_dns_tcp_connections_closed",
                                         "DNS TCP connections refused or cut by the sinkhole, by reason",
                                         labels=["reason"])
            for reason, n in sorted(closed_by.items()):
                closed.add_metric([reason], n)
            yield closed
            rejected = CounterMetricFamily("blockd_dns_upstream_replies_rejected",
                                           "Upstream DNS replies refused (forged or not matching the query), by reason",
                                           labels=["reason"])
            for reason, n in sorted(rejected_by.items()):
                rejected.add_metric([reason], n)
            yield rejected
        if self.live.rpz is not None:
            zones = self.live.rpz_zones() if self.live.rpz_zones is not None else None
            yield from rpz_metrics(*self.live.rpz(), zones=zones)
        if self.live.block_page is not None:
            up, counts = self.live.block_page()
            yield GaugeMetricFamily("blockd_block_page_up", "1 while the HTTP 451 block page listens", value=int(up))
            served = CounterMetricFamily("blockd_block_page_responses", "Block page responses, by result "
                                         "(served: a 451 page; not_found: no sinkhole order for the Host)",
                                         labels=["result"])
            for result in ("served", "not_found", "bad", "overload"):
                served.add_metric([result], counts.get(result, 0))
            yield served


def rpz_metrics(serial: int | None, secondaries: Mapping[str, int | None], stats: Mapping[str, int],
                zones: Mapping[str, tuple[int, Mapping[str, int | None]]] | None = None,
                ) -> Iterable[CounterMetricFamily | GaugeMetricFamily]:
    """The RPZ primary's serial, what each secondary holds, and transfer/NOTIFY counters.

    `secondary` labels are addresses, bounded by the `notify` list plus the transfer ACL
    (at most `rpzserver.MAX_SECONDARIES`). A secondary whose serial is unknown is not in sync.
    With more than one zone (`zones`, layout `authority` or `order`), `blockd_rpz_serial` and
    `blockd_rpz_secondary_serial` are per zone only (`blockd_rpz_zone_*`), and
    `blockd_rpz_secondary_in_sync` is 1 only when the secondary holds every zone's serial.
    `zone` labels are bounded by the authorities (or orders) in force.
    """
    multi = zones is not None and len(zones) > 1
    if serial is not None and not multi:
        yield GaugeMetricFamily("blockd_rpz_serial", "SOA serial of the RPZ zone being served", value=serial)
    held = GaugeMetricFamily("blockd_rpz_secondary_serial", "Last SOA serial each RPZ secondary is known to hold",
                             labels=["secondary"])
    in_sync = GaugeMetricFamily("blockd_rpz_secondary_in_sync",
                                "1 when the secondary is known to hold the serial being served (of every zone)",
                                labels=["secondary"])
    if not multi:
        for addr, s in sorted(secondaries.items()):
            if s is not None:
                held.add_metric([addr], s)
            in_sync.add_metric([addr], 1 if s is not None and s == serial else 0)
    else:
        assert zones is not None
        addrs = sorted({a for _, held_by in zones.values() for a in held_by})
        for addr in addrs:
            ok = all(held_by.get(addr) == zs for zs, held_by in zones.values() if addr in held_by)
            in_sync.add_metric([addr], 1 if ok else 0)
    yield held
    yield in_sync
    if zones is not None:
        zserial = GaugeMetricFamily("blockd_rpz_zone_serial", "SOA serial served, per RPZ zone", labels=["zone"])
        zheld = GaugeMetricFamily("blockd_rpz_zone_secondary_serial", "Last SOA serial of the zone each "
                                  "secondary is known to hold", labels=["zone", "secondary"])
        zsync = GaugeMetricFamily("blockd_rpz_zone_secondary_in_sync", "1 when the secondary is known to hold "
                                  "the zone's serial being served", labels=["zone", "secondary"])
        for zone, (zs, held_by) in sorted(zones.items()):
            zserial.add_metric([zone], zs)
            for addr, s in sorted(held_by.items()):
                if s is not None:
                    zheld.add_metric([zone, addr], s)
                zsync.add_metric([zone, addr], 1 if s == zs else 0)
        yield zserial
        yield zheld
        yield zsync
    transfers = CounterMetricFamily("blockd_rpz_transfers", "Zone transfers served, by kind (ixfr_as_axfr: "
                                    "an IXFR the journal could not bridge, answered with the full zone)",
                                    labels=["kind"])
    for kind in ("axfr", "ixfr", "ixfr_as_axfr"):
        transfers.add_metric([kind], stats.get(kind, 0))
    yield transfers
    notifies = CounterMetricFamily("blockd_rpz_notifies", "NOTIFYs per secondary and zone change, by result "
                                   "(failed: no answer after every retry)", labels=["result"])
    notifies.add_metric(["acked"], stats.get("notify_acked", 0))
    notifies.add_metric(["failed"], stats.get("notify_failed", 0))
    yield notifies
    wipes = CounterMetricFamily("blockd_rpz_cache_wipes", "Names wiped from resolvers' caches by NOTIFY after "
                                "their transfer (wipe_cache), by result", labels=["result"])
    wipes.add_metric(["acked"], stats.get("cache_wipes", 0))
    wipes.add_metric(["failed"], stats.get("cache_wipes_failed", 0))
    yield wipes


async def serve(registry: CollectorRegistry, host: str, port: int,
                orders: Callable[[], Iterable[Mapping[str, object]]] | None = None) -> asyncio.Server:
    """A minimal HTTP/1.1 server for GET /metrics (and GET /orders with `orders`) on the event loop.

    prometheus_client's own server does a reverse DNS lookup of the listen address when it
    binds (http.server calls getfqdn): a stall, and a query leaving the box, at start-up.
    """

    async def handle(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            request = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
            method, target, *_ = request.split(b" ", 2)
            path, _, query = target.partition(b"?")
            status, kind = b"200 OK", CONTENT_TYPE_LATEST.encode()
            if method not in (b"GET", b"HEAD") or path not in (b"/metrics", b"/", b"/orders") or (
                    path == b"/orders" and orders is None):
                status, kind, body = b"404 Not Found", b"text/plain", b""
            elif path == b"/orders":
                assert orders is not None
                kind = b"application/json"
                try:
                    # a worker thread: at registry scale the scan takes a while, and DNS is served here
                    body = await asyncio.to_thread(orders_page, orders, query.decode(errors="replace"))
                except ValueError as e:
                    status, body = b"400 Bad Request", json.dumps({"error": str(e)}).encode()
            else:
                body = generate_latest(registry)
            writer.write(b"HTTP/1.1 " + status + b"\r\nContent-Type: " + kind +
                         b"\r\nContent-Length: " + str(len(body)).encode() + b"\r\nConnection: close\r\n\r\n")
            if method == b"GET":
                writer.write(body)
            await writer.drain()
        except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, TimeoutError, ConnectionError, ValueError):
            pass
        finally:
            writer.close()

    return await asyncio.start_server(handle, host, port, reuse_address=True)
