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
import stat
import struct
from collections.abc import Callable
from pathlib import Path

import structlog

log = structlog.get_logger("blockd.watch")

_IN_CLOSE_WRITE, _IN_MOVED_FROM, _IN_MOVED_TO = 0x008, 0x040, 0x080
_IN_CREATE, _IN_DELETE, _IN_DELETE_SELF, _IN_MOVE_SELF = 0x100, 0x200, 0x400, 0x800
_MASK = _IN_CLOSE_WRITE | _IN_MOVED_FROM | _IN_MOVED_TO | _IN_CREATE | _IN_DELETE | _IN_DELETE_SELF | _IN_MOVE_SELF
_IN_NONBLOCK, _IN_CLOEXEC = os.O_NONBLOCK, os.O_CLOEXEC
_IN_IGNORED = 0x8000


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


def identity(directory: Path) -> tuple[int, int] | None:
    """(device, inode) of the directory itself: a new one means it was removed and re-created."""
    try:
        st = os.stat(directory)
    except OSError:
        return None
    return (st.st_dev, st.st_ino) if stat.S_ISDIR(st.st_mode) else None


async def watch(directory: Path, on_change: Callable[[], None], *, poll_s: float = 2.0, settle_s: float = 0.05,
                force_poll: bool = False, on_replaced: Callable[[str], None] | None = None) -> None:
    """Call `on_change()` after files in `directory` change; runs until cancelled.

    The directory itself may be removed, renamed away or replaced (`rm -rf` and re-create,
    `mv new policies`, a deploy tool): its parent is watched too, and every `poll_s` the
    directory's identity is compared, as a safety net. A replacement re-arms the watch, is
    reported through `on_replaced("replaced" | "removed")`, and wakes the daemon.
    """
    libc = None if force_poll else _libc()
    fd = libc.inotify_init1(_IN_NONBLOCK | _IN_CLOEXEC) if libc else -1
    if fd < 0:
        log.info("policy_watch", mode="poll", directory=str(directory), interval_s=poll_s)
        await _poll(directory, on_change, poll_s, on_replaced)
        return
    assert libc is not None
    loop = asyncio.get_running_loop()
    wake = asyncio.Event()
    wake.set()  # a change between the caller's last read and the watch must not be missed
    parent_wd = libc.inotify_add_watch(fd, os.fsencode(directory.parent), _PARENT_MASK)
    held: dict[str, object] = {"wd": -1, "id": None}

    def arm() -> None:
        held["wd"] = libc.inotify_add_watch(fd, os.fsencode(directory), _MASK)
        held["id"] = identity(directory)

    def readable() -> None:
        try:
            while data := os.read(fd, 65536):
                for wd, mask, _name in _events(data):
                    if wd == held["wd"] and mask & _IN_IGNORED:
                        held["wd"] = -1  # the kernel dropped the watch: the directory is gone
        except BlockingIOError:
            pass
        wake.set()

    arm()
    log.info("policy_watch", mode="inotify", directory=str(directory), watching_parent=parent_wd >= 0)
    loop.add_reader(fd, readable)
    try:
        while True:
            timed_out = False
            try:
                await asyncio.wait_for(wake.wait(), poll_s)
            except TimeoutError:
                timed_out = True  # the safety net: compare the directory's identity
            else:
                # Python 3.11's wait_for returns the result when the event fires as the task is
                # cancelled, losing the cancellation: the daemon's TaskGroup then waits forever
                _raise_if_cancelling()
                await asyncio.sleep(settle_s)  # coalesce a burst (write + rename + signature files)
            wake.clear()
            current = identity(directory)
            # A new inode, or the kernel dropped the watch (the directory was removed; a new one
            # can even reuse the inode number).
            if current != held["id"] or (current is not None and held["wd"] == -1):
                if isinstance(held["wd"], int) and held["wd"] >= 0:
                    libc.inotify_rm_watch(fd, held["wd"])
                gone = current is None
                if gone:
                    held["wd"], held["id"] = -1, None
                else:
                    arm()
                _replaced(directory, "removed" if gone else "replaced", on_replaced)
                on_change()
            elif not timed_out:
                on_change()
    finally:
        loop.remove_reader(fd)
        os.close(fd)


def _raise_if_cancelling() -> None:
    task = asyncio.current_task()
    if task is not None and task.cancelling():
        raise asyncio.CancelledError


_PARENT_MASK = _IN_CREATE | _IN_DELETE | _IN_MOVED_FROM | _IN_MOVED_TO
_EVENT = struct.Struct("iIII")


def _events(data: bytes) -> list[tuple[int, int, bytes]]:
    out, i = [], 0
    while i + _EVENT.size <= len(data):
        wd, mask, _cookie, length = _EVENT.unpack_from(data, i)
        name = data[i + _EVENT.size:i + _EVENT.size + length].rstrip(b"\0")
        out.append((wd, mask, name))
        i += _EVENT.size + length
    return out


def _replaced(directory: Path, how: str, on_replaced: Callable[[str], None] | None) -> None:
    log.warning("policy_dir_replaced", directory=str(directory), how=how,
                note="the watch is re-armed; the last good policies stay in force meanwhile")
    if on_replaced is not None:
        on_replaced(how)


async def _poll(directory: Path, on_change: Callable[[], None], interval: float,
                on_replaced: Callable[[str], None] | None = None) -> None:
    seen, ident = snapshot(directory), identity(directory)
    on_change()  # as above: cover the gap before the first snapshot
    while True:
        await asyncio.sleep(interval)
        now, current = snapshot(directory), identity(directory)
        if current != ident:
            _replaced(directory, "replaced" if current is not None else "removed", on_replaced)
            ident = current
            seen = None  # type: ignore[assignment]
        if now != seen:
            seen = now
            on_change()
