"""The policy watcher stops when cancelled, also when a change arrives in the same loop turn as
the cancellation (Python 3.11's wait_for would return the event and lose the cancel: the daemon's
shutdown then hung until SIGKILL)."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

from blockd.watch import watch


def test_cancel_racing_a_change_stops_the_watcher(tmp_path: Path) -> None:
    changes: list[int] = []

    async def main() -> bool:
        loop = asyncio.get_running_loop()
        task = asyncio.create_task(watch(tmp_path, lambda: changes.append(1), poll_s=600, settle_s=0.01))
        while not changes:  # the first wake (a change before the watch must not be missed)
            await asyncio.sleep(0.01)
        await asyncio.sleep(0.05)  # back in wait_for(wake.wait(), poll_s)
        (tmp_path / "p.yaml").write_text("x")
        time.sleep(0.2)  # the inotify event is queued: the next loop turn sees it before the timer below
        loop.call_later(0, task.cancel)  # runs in that same turn, after the reader callback
        try:
            await asyncio.wait_for(asyncio.shield(task), 10)
        except asyncio.CancelledError:
            return True
        except TimeoutError:
            task.cancel()
            return False
        return False

    assert asyncio.run(main()), "the watcher kept running after it was cancelled"
