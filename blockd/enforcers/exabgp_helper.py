"""ExaBGP `process` helper: relay ExaBGP's API pipes to blockd's Unix socket, nothing else.

    ExaBGP --stdin-->  helper  --socket--> blockd (BgpEnforcer, asyncio)
    ExaBGP <--stdout-- helper  <--socket-- blockd

ExaBGP starts this program (`run` in its `process` block), writes JSON events and command
answers to its stdin and reads API commands from its stdout. The helper connects to the Unix
socket blockd listens on and copies bytes both ways, so the state and the commands stay on
blockd's event loop and a blockd restart does not need an ExaBGP restart (ExaBGP respawns the
helper when it exits; the new helper reconnects). It exits when either side closes.

Usage: python -m blockd.enforcers.exabgp_helper /path/to/api.sock
"""

from __future__ import annotations

import os
import socket
import sys
import threading
import time
from collections.abc import Callable


def _copy(read_fd: int, write: Callable[[bytes], object], done: threading.Event) -> None:
    try:
        while chunk := os.read(read_fd, 65536):
            write(chunk)
    except OSError:
        pass  # the other side went away; `done` ends the helper either way
    finally:
        done.set()


def _connect(path: str, deadline_s: float = 10.0) -> socket.socket:
    """Connect, retrying while blockd's listener is not up yet (ExaBGP may start first)."""
    end = time.monotonic() + deadline_s
    while True:
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.connect(path)
            return sock
        except OSError:
            sock.close()
            if time.monotonic() > end:
                raise
            time.sleep(0.1)  # a retry interval against a process we do not control


def main(argv: list[str]) -> int:
    if len(argv) != 2:
        print("usage: exabgp_helper SOCKET", file=sys.stderr)
        return 2
    sock = _connect(argv[1])
    done = threading.Event()
    stdout = sys.stdout.fileno()

    def to_exabgp(data: bytes) -> None:
        view = memoryview(data)
        while view:
            view = view[os.write(stdout, view):]

    threading.Thread(target=_copy, args=(sys.stdin.fileno(), sock.sendall, done), daemon=True).start()
    threading.Thread(target=_copy, args=(sock.fileno(), to_exabgp, done), daemon=True).start()
    done.wait()
    sock.close()
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv))
