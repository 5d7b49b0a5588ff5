"""`python -m blockd.dns`: run the sinkhole alone (benchmarks, demos) on a names file.

    python -m blockd.dns --listen 127.0.0.1:5300 --names blocked.txt --upstream 127.0.0.1:5301

The names file has one name per line; `*.name` marks a subtree. All names get order `cli`.
Prints `ready <port> <load seconds>` on stdout once it answers. UDP is batched (recvmmsg/sendmmsg
in a thread) where available, as in `blockd run`; `--no-udp-batch` serves it from the event loop.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import signal
import sys
import time

from blockd.dns.server import SinkholeServer, SinkholeSettings
from blockd.enforcers.dns import SinkholeEnforcer
from blockd.model import DomainRule, RuleSet


def _hostport(text: str) -> tuple[str, int]:
    host, _, port = text.rpartition(":")
    return host.strip("[]"), int(port)


def load_names(path: str) -> RuleSet:
    orders = frozenset({"cli"})
    rules = []
    with open(path, encoding="ascii") as f:
        for line in f:
            n = line.strip().rstrip(".").lower()
            if not n or n.startswith("#"):
                continue
            if n.startswith("*."):
                rules.append(DomainRule(n[2:], True, orders))
            else:
                rules.append(DomainRule(n, False, orders))
    return RuleSet.build(rules)


async def main(args: argparse.Namespace) -> None:
    settings = SinkholeSettings(listen=(args.listen,), upstreams=tuple(args.upstream), default_answer=args.answer,
                                ede_code=args.ede, cache_size=args.cache_size, udp_batch=args.udp_batch)
    server = SinkholeServer(settings)
    await server.start()
    enf = SinkholeEnforcer(server)
    t0 = time.perf_counter()
    await enf.apply(load_names(args.names) if args.names else RuleSet.empty())
    gc.collect()
    print(f"ready {server.addresses[0][1]} {enf.last_load_s:.3f} {time.perf_counter() - t0:.3f}", flush=True)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    await stop.wait()
    print(server.stats.snapshot(), file=sys.stderr, flush=True)
    await server.aclose()


if __name__ == "__main__":
    p = argparse.ArgumentParser(prog="python -m blockd.dns")
    p.add_argument("--listen", type=_hostport, default=("127.0.0.1", 5300))
    p.add_argument("--names")
    p.add_argument("--upstream", type=_hostport, action="append", default=[])
    p.add_argument("--answer", default="nxdomain")
    p.add_argument("--ede", type=int, default=16)
    p.add_argument("--cache-size", type=int, default=100_000)
    p.add_argument("--uvloop", action="store_true")
    p.add_argument("--no-udp-batch", dest="udp_batch", action="store_false",
                   help="serve UDP from the event loop instead of recvmmsg/sendmmsg threads")
    a = p.parse_args()
    if a.uvloop:
        import uvloop

        uvloop.install()
    asyncio.run(main(a))
