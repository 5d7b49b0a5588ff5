"""What the structured-DNS-error check costs on the blocked path: `SinkholeServer.answer` for a blocked
EDNS query, with the check (this tree) against the same answer with `sde.wants` replaced by a
constant False (the reference: the answer as it was before), measured in the same run.

    .venv/bin/python bench/sde.py [queries]
Prints µs per answer (median of 5 rounds) for: plain EDNS queries (the hot path: no EDE option
in the query), queries that send the SDE option (code 65001 here; JSON answer), and the ratio to the reference.
"""

from __future__ import annotations

import statistics
import sys
import time
from pathlib import Path

# bench/dns.py would shadow dnspython: drop this directory from sys.path, add the repository.
_HERE = Path(__file__).resolve().parent
sys.path[:] = [p for p in sys.path if Path(p or ".").resolve() != _HERE]
sys.path.insert(0, str(_HERE.parent))
import dns.edns  # noqa: E402
import dns.message  # noqa: E402

from blockd.dns import sde, table  # noqa: E402
from blockd.dns.server import SinkholeServer, SinkholeSettings  # noqa: E402
from blockd.model import DomainRule, RuleSet  # noqa: E402


def run(server: SinkholeServer, queries: list[bytes]) -> float:
    t0 = time.perf_counter()
    for q in queries:
        server.answer(q, "127.0.0.1", False)
    return (time.perf_counter() - t0) / len(queries) * 1e6


def main() -> None:
    n = int(sys.argv[1]) if len(sys.argv) > 1 else 100_000
    rules = RuleSet.build([DomainRule(f"name{i}.example", True, frozenset({"o1"})) for i in range(1000)])
    server = SinkholeServer(SinkholeSettings(listen=(("127.0.0.1", 0),), udp_batch=False, sde_option_code=65001,
                                             sde_organization="ISP Example", sde_contact=("mailto:noc@isp.example",)))
    server.swap(table.Table.build(rules, server.settings.answers()))
    plain = [dns.message.make_query(f"www.name{i % 1000}.example", "A", use_edns=0).to_wire() for i in range(n)]
    signal = [dns.message.make_query(f"www.name{i % 1000}.example", "A", use_edns=0,
                                     options=[dns.edns.GenericOption(65001, b"")]).to_wire()
              for i in range(n)]
    real = sde.wants
    rows = {}
    for label, qs in (("plain EDNS", plain), ("signalling", signal)):
        ours, ref = [], []
        for _ in range(5):
            ours.append(run(server, qs))
            table.sde.wants = lambda data, q, needle: False  # type: ignore[assignment]
            ref.append(run(server, qs))
            table.sde.wants = real
        rows[label] = (statistics.median(ours), statistics.median(ref))
    for label, (ours, ref) in rows.items():
        print(f"{label:12s} answer {ours:6.2f} us  reference (no check) {ref:6.2f} us  ratio {ours / ref:5.2f}x")


if __name__ == "__main__":
    main()
