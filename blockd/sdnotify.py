"""sd_notify(3) without libsystemd: one datagram to $NOTIFY_SOCKET per state change.

READY=1 once the first rule set is live, STATUS= with the policy serials and rule counts,
RELOADING=1 (with MONOTONIC_USEC, as Type=notify-reload expects) on SIGHUP, STOPPING=1 on
shutdown, WATCHDOG=1 from the event loop at half of $WATCHDOG_USEC. Without $NOTIFY_SOCKET
(not started by systemd) every call is a no-op.
"""

from __future__ import annotations

import os
import socket
import time


class Notifier:
    def __init__(self, env: dict[str, str] | None = None) -> None:
        env = dict(os.environ) if env is None else env
        path = env.get("NOTIFY_SOCKET", "")
        self._addr = ("\0" + path[1:]) if path.startswith("@") else path
        usec = env.get("WATCHDOG_USEC", "")
        pid = env.get("WATCHDOG_PID", "")
        mine = not pid or pid == str(os.getpid())
        #: seconds between WATCHDOG=1 pings, or None when systemd runs no watchdog for us
        self.watchdog_interval = int(usec) / 2e6 if usec.isdigit() and mine else None

    @property
    def enabled(self) -> bool:
        return bool(self._addr)

    def send(self, *fields: str) -> None:
        if not self._addr:
            return
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM | socket.SOCK_CLOEXEC) as s:
            try:
                # Never block: a reader that stalls (a full queue) must not freeze the event loop,
                # which answers DNS; a STATUS= dropped then is superseded by the next one.
                s.sendto("\n".join(fields).encode(), socket.MSG_DONTWAIT, self._addr)
            except OSError:
                pass  # systemd gone (shutdown), or its queue full: nothing to tell

    def ready(self, status: str) -> None:
        self.send("READY=1", f"STATUS={status}")

    def status(self, status: str) -> None:
        self.send(f"STATUS={status}")

    def reloading(self) -> None:
        self.send("RELOADING=1", f"MONOTONIC_USEC={time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000}")

    def stopping(self) -> None:
        self.send("STOPPING=1")

    def watchdog(self) -> None:
        self.send("WATCHDOG=1")
