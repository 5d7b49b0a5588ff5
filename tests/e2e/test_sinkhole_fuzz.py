"""A bounded fuzz run against the sinkhole as its own process (`python -m blockd.dns`).

Random bytes and mutated valid queries over UDP and TCP (framed junk, bogus lengths, cut
messages), in two equal rounds. Between bursts a blocked name is asked for and must still be
NXDOMAIN; the process must stay up; its RSS after the second round must be where it was after
the first (the first round warms caches, memos and allocator pools; the second shows a leak:
before issue 12 every rejected datagram kept 0.4-1 KB).
"""

from __future__ import annotations

import random
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import dns.message
import dns.query
import dns.rcode
import pytest

from blockd.dns.testing import LoopThread, Upstream

pytestmark = pytest.mark.e2e

NAMES = ["blocked.example", "www.blocked.example", "exact.example", "a.example.net", "zz.example.net", "."]
QTYPES = ["A", "AAAA", "TXT", "MX", "ANY", "SOA"]
UDP_PER_ROUND = 20_000
TCP_PER_ROUND = 100
BURST = 128  # datagrams between two checks: fits the server's socket buffer, so none is lost
MAX_GROWTH_KIB = 4096


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError("no VmRSS")


VALID = [dns.message.make_query(n, t, use_edns=e).to_wire() for n in NAMES for t in QTYPES for e in (False, 0)]


def valid(rnd: random.Random) -> bytes:
    return rnd.choice(VALID)


def mutate(rnd: random.Random, data: bytes) -> bytes:
    b = bytearray(data)
    for _ in range(rnd.randint(1, 4)):
        op = rnd.randrange(6)
        if op == 0 and b:  # flip a bit
            i = rnd.randrange(len(b))
            b[i] ^= 1 << rnd.randrange(8)
        elif op == 1 and b:  # set a byte (often a label length or a count)
            b[rnd.randrange(len(b))] = rnd.choice([0, 0x3F, 0x40, 0xC0, 0xFF, rnd.randrange(256)])
        elif op == 2:  # cut
            del b[rnd.randrange(len(b) + 1):]
        elif op == 3:  # append junk
            b += rnd.randbytes(rnd.randint(1, 40))
        elif op == 4 and len(b) >= 12:  # counts
            b[4 + 2 * rnd.randrange(4) + 1] = rnd.randrange(256)
        elif op == 5 and len(b) >= 3:  # header flags / opcode
            b[2] = rnd.randrange(256)
    return bytes(b)


def packet(rnd: random.Random) -> bytes:
    if rnd.random() < 0.3:
        return rnd.randbytes(rnd.randint(0, 120))
    return mutate(rnd, valid(rnd))


class Box:
    def __init__(self, tmp: Path, extra: tuple[str, ...] = ()) -> None:
        self.lt = LoopThread()
        self.up = Upstream("example.net")
        self.lt.run(self.up.start())
        names = tmp / "names.txt"
        names.write_text("*.blocked.example\nexact.example\n")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "blockd.dns", "--listen", "127.0.0.1:0", "--names", str(names),
             "--upstream", f"127.0.0.1:{self.up.port}", "--cache-size", "500", *extra],
            stdout=subprocess.PIPE, stderr=subprocess.DEVNULL)
        try:
            assert self.proc.stdout is not None
            line = self.proc.stdout.readline().decode().split()
            while line and line[0] != "ready":  # structlog lines come first
                line = self.proc.stdout.readline().decode().split()
            assert line, "python -m blockd.dns exited before it was ready"
            self.port = int(line[1])
        except BaseException:
            self.close()  # never leave the child running
            raise

    def close(self) -> None:
        self.proc.terminate()
        self.proc.wait(30)
        if self.proc.stdout is not None:
            self.proc.stdout.close()
        self.lt.run(self.up.aclose())
        self.lt.close()

    def blocked(self, tcp: bool = False) -> int:
        q = dns.message.make_query("deep.www.blocked.example", "A")
        for _ in range(50):  # a datagram may be lost in the flood (a full socket buffer); TCP is not
            try:
                if tcp:  # from another source: the fuzzer's own may be at its connection cap
                    return dns.query.tcp(q, "127.0.0.1", 10, port=self.port, source="127.0.0.2").rcode()
                return dns.query.udp(q, "127.0.0.1", 0.2, port=self.port).rcode()
            except dns.exception.Timeout:
                continue
        raise AssertionError("the sinkhole stopped answering")

    def round(self, rnd: random.Random) -> None:
        """UDP_PER_ROUND datagrams in bursts, then TCP_PER_ROUND connections of framed junk."""
        with socket.socket(socket.AF_INET, socket.SOCK_DGRAM) as u:
            u.setblocking(False)
            for i in range(UDP_PER_ROUND):
                try:
                    u.sendto(packet(rnd), ("127.0.0.1", self.port))
                except BlockingIOError:
                    pass
                if i % 64 == 0:
                    try:
                        while u.recv(65535):
                            pass
                    except BlockingIOError:
                        pass
                if i % BURST == BURST - 1:  # answered in order: the burst before it has been handled
                    assert self.blocked() == dns.rcode.NXDOMAIN
                    assert self.proc.poll() is None
        for i in range(TCP_PER_ROUND):
            with socket.create_connection(("127.0.0.1", self.port), timeout=5) as t:
                try:
                    for _ in range(rnd.randint(1, 6)):
                        p = packet(rnd)
                        n = len(p) if rnd.random() < 0.8 else rnd.randrange(65536)
                        t.sendall(n.to_bytes(2, "big") + p)
                    if rnd.random() < 0.3:
                        t.sendall(rnd.randbytes(rnd.randint(1, 3)))  # a cut frame, then close
                except (ConnectionResetError, BrokenPipeError):
                    pass  # the server cut a bad frame: fine
        assert self.blocked(tcp=True) == dns.rcode.NXDOMAIN


@pytest.fixture(params=[(), ("--no-udp-batch",)], ids=["udp-batch", "udp-asyncio"])
def box(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[Box]:
    b = Box(tmp_path, request.param)
    yield b
    b.close()


def test_fuzz_udp_and_tcp_server_stays_up_blocks_and_rss_stays_flat(box: Box) -> None:
    rnd = random.Random(12)
    box.round(rnd)
    warm = rss_kib(box.proc.pid)
    box.round(rnd)
    after = rss_kib(box.proc.pid)
    assert box.proc.poll() is None
    assert box.blocked() == dns.rcode.NXDOMAIN and box.blocked(tcp=True) == dns.rcode.NXDOMAIN
    assert after - warm < MAX_GROWTH_KIB, f"RSS grew {after - warm} KiB over {UDP_PER_ROUND} datagrams"
