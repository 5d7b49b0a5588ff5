"""Wake the daemon when a policy file changes: inotify on the directory, polling as a fallback.

inotify is used through ctypes (no extra dependency). Editors and `mv` replace files by
rename, so the directory is watched, not the files. Events are coalesced: many changes
within `settle_s` cause one wake-up.
"""

from __future__ import annotations

import asyncio
import ctypes
import ctypes.util
import os
from collections.abc import Callable
from pathlib import Path

import structlog

log = structlog.get_logger("blockd.watch")

_IN_CLOSE_WRITE, _IN_MOVED_FROM, _IN_MOVED_TO = 0x008, 0x040, 0x080
_IN_CREATE, _IN_DELETE, _IN_DELETE_SELF, _IN_MOVE_SELF = 0x100, 0x200, 0x400, 0x800
_MASK = _IN_CLOSE_WRITE | _IN_MOVED_FROM | _IN_MOVED_TO | _IN_CREATE | _IN_DELETE | _IN_DELETE_SELF | _IN_MOVE_SELF
_IN_NONBLOCK, _IN_CLOEXEC = os.O_NONBLOCK, os.O_CLOEXEC


def _libc() -> ctypes.CDLL | None:
    name = ctypes.util.find_library("c")
    if not name:
        return None
    libc = ctypes.CDLL(name, use_errno=True)
    return libc if hasattr(libc, "inotify_init1") else None


def snapshot(directory: Path) -> dict[str, tuple[int, int, int]]:
    """(mtime_ns, size, inode) of each file: the polling fallback compares these."""
    out = {}
    try:
        for entry in os.scandir(directory):
            st = entry.stat(follow_symlinks=True)
            out[entry.name] = (st.st_mtime_ns, st.st_size, st.st_ino)
    except OSError:
        pass
    return out


async def watch(directory: Path, on_change: Callable[[], None], *, poll_s: float = 2.0, settle_s: float = 0.05,
                force_poll: bool = False) -> None:
    """Call `on_change()` after files in `directory` change; runs until cancelled."""
    libc = None if force_poll else _libc()
    fd = libc.inotify_init1(_IN_NONBLOCK | _IN_CLOEXEC) if libc else -1
    wd = libc.inotify_add_watch(fd, os.fsencode(directory), _MASK) if libc and fd >= 0 else -1
    if wd < 0:
        if fd >= 0:
            os.close(fd)
        log.info("policy_watch", mode="poll", directory=str(directory), interval_s=poll_s)
        await _poll(directory, on_change, poll_s)
        return
    log.info("policy_watch", mode="inotify", directory=str(directory))
    loop = asyncio.get_running_loop()
    wake = asyncio.Event()
    wake.set()  # a change between the caller's last read and the watch must not be missed

    def readable() -> None:
        try:
            while os.read(fd, 65536):
                pass
        except BlockingIOError:
            pass
        wake.set()

    loop.add_reader(fd, readable)
    try:
        while True:
            await wake.wait()
            await asyncio.sleep(settle_s)  # coalesce a burst (write + rename + signature files)
            wake.clear()
            on_change()
    finally:
        loop.remove_reader(fd)
        os.close(fd)


async def _poll(directory: Path, on_change: Callable[[], None], interval: float) -> None:
    seen = snapshot(directory)
    on_change()  # as above: cover the gap before the first snapshot
    while True:
        await asyncio.sleep(interval)
        now = snapshot(directory)
        if now != seen:
            seen = now
            on_change()
