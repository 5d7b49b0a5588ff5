"""zone_file_shards with the real Knot Resolver (Debian knot-resolver 5.6 + lua-cqueues): kresd
loads the shard files `blockd rpz config --for knot` names, blocks every name of the zone, and a
new order makes it re-read one shard only (kresd's log names the one file), then blocks its names.
An order lifted is unblocked the same way. See bench/knot_reload.py for what it saves."""

from __future__ import annotations

import os
import time
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path

import dns.edns
import dns.message
import dns.query
import dns.rcode
import pytest

from blockd.dns import rpz, rpzconfig
from blockd.dns.resolvers import KRESD, free_port, kresd_conf, start, stop
from blockd.dns.rpzserver import RpzServer
from blockd.dns.testing import LoopThread, Upstream
from blockd.enforcers.rpz import RpzEnforcer
from blockd.model import DomainRule, OrderInfo, RuleSet

pytestmark = [pytest.mark.e2e]
T = datetime(2026, 1, 1, tzinfo=timezone.utc)
K = 4


def rules(orders: list[str]) -> RuleSet:
    info = {o: OrderInfo(o, "regulator", 1, "Example Court", f"R-{o}", None, "block", None, None, T) for o in orders}
    return RuleSet.build([DomainRule(f"{o}-{i}.example.net", True, frozenset({o})) for o in orders for i in range(3)],
                         orders=info)


def rc(port: int, name: str) -> int | None:
    try:
        return dns.query.udp(dns.message.make_query(name, "A", use_edns=0), "127.0.0.1", 1.0, port=port).rcode()
    except (dns.exception.Timeout, OSError):
        return None


def wait_for(check: Callable[[], bool], what: str, timeout: float = 40) -> None:
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        if check():
            return
        time.sleep(0.02)  # a poll interval under a deadline
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


def test_kresd_reloads_only_the_shard_a_new_order_touches(tmp_path: Path) -> None:
    if not os.path.exists(KRESD):
        pytest.fail("knot-resolver is required (scripts/deps.sh installs it with lua-cqueues)")
    lt = LoopThread()
    up = Upstream("example.net")
    lt.run(up.start())
    s = rpz.RpzSettings(listen=(("127.0.0.1", 0),), zone_file=str(tmp_path / "rpz.blockd.zone"),
                        zone_file_shards=K, state_file=str(tmp_path / "rpz.state"))
    srv = RpzServer(s)
    lt.run(srv.start())
    enf = RpzEnforcer(srv)
    base = [f"o{i}" for i in range(12)]
    lt.run(enf.apply(rules(base)))
    shards = [rpz.shard_path(s.zone_file or "", i) for i in range(K)]
    assert all(os.path.exists(p) for p in shards)
    lua = rpzconfig.render("knot", s, rpzconfig.zones_for(s, rules(base)), ("127.0.0.1", srv.addresses[0][1]))
    port = free_port()
    d = tmp_path / "kresd"
    proc = start("kresd", d, kresd_conf(("127.0.0.1", port), up.port, "log_level('info')\n" + lua))
    try:
        wait_for(lambda: all(rc(port, f"www.{o}-2.example.net") == dns.rcode.NXDOMAIN for o in base), "kresd to block")
        assert rc(port, "free.example.net") == dns.rcode.NOERROR
        log = d / "log"
        for change, orders in (("a new order", [*base, "court-new"]), ("an order lifted", base[1:] + ["court-new"])):
            inodes = {p: os.stat(p).st_ino for p in shards}
            mark = log.read_text(errors="replace").count("RPZ reloading")
            lt.run(enf.apply(rules(orders)))
            touched = [p for p in shards if os.stat(p).st_ino != inodes[p]]
            assert len(touched) == 1, f"{change}: {touched}"
            if change == "a new order":
                wait_for(lambda: rc(port, "court-new-0.example.net") == dns.rcode.NXDOMAIN, "the new order blocked")
            else:
                wait_for(lambda: rc(port, "o0-0.example.net") == dns.rcode.NOERROR, "the lifted order unblocked")
            wait_for(lambda: log.read_text(errors="replace").count("RPZ reloading") > mark, "kresd's reload")
            reloads = [line for line in log.read_text(errors="replace").splitlines() if "RPZ reloading" in line][mark:]
            assert reloads and all(line.endswith(os.path.basename(touched[0])) for line in reloads), reloads
            assert all(rc(port, f"{o}-1.example.net") == dns.rcode.NXDOMAIN for o in orders)  # the rest still blocked
    except AssertionError as e:
        raise AssertionError(f"{e}\n--- kresd\n{(d / 'log').read_text(errors='replace')[-3000:]}") from None
    finally:
        stop(proc)
        lt.run(srv.aclose())
        lt.run(up.aclose())
        lt.close()
