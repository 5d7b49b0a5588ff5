"""The time validity windows are judged against: the wall clock, never allowed to go backwards.

    now()  ->  max(wall clock, highest wall time seen + monotonic time since)
                                                       (the mark is persisted in state/clock.json)

A wall clock stepped back (a bad NTP source, a VM restored from a snapshot, an operator's
`date -s`) would otherwise make a policy in force since an hour ago "not valid yet" and drop
it, or bring an expired policy back. With this clock neither happens: the step is measured
(`step_back_s`), logged once, exported as a metric and alerted on, and the windows keep
being judged against the highest time seen, carried forward by the monotonic clock (so a
`not_after` is still reached on time during a step back). A forward step is taken as it comes (a clock
that was behind, e.g. before NTP synchronised, is being corrected). If a forward step was a
mistake, the high-water mark keeps it: remove `clock.json` from the state directory after
fixing the clock (docs/install.md).
"""

from __future__ import annotations

import json
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path

import structlog

from blockd.fsutil import atomic_write

log = structlog.get_logger("blockd.clock")

#: steps back smaller than this are clock noise (NTP slews, leap smearing), not reported
NOISE_S = 2.0


#: a forward step larger than this is held back until it has lasted CONFIRM_S
FORWARD_TOLERANCE_S = 300.0
CONFIRM_S = 600.0


class MonotonicWallClock:
    def __init__(self, path: Path | None, floor: datetime | None = None) -> None:
        """`floor`: a time known to have passed (the latest `accepted_at` of the state), for a
        first start on a clock that is behind and has no mark yet."""
        self.path = path
        self.high: datetime | None = self._load()
        if floor is not None and (self.high is None or floor > self.high):
            self.high = floor
        self._mono = time.monotonic()  # when `high` was the time (after a restart: when it was loaded)
        self.step_back_s = 0.0
        #: a forward step being held back (seconds ahead of the judged time), 0 when none
        self.step_ahead_s = 0.0
        self._ahead_since: float | None = None
        self._observed = False
        self._reported = False
        self._saved: datetime | None = self.high

    def _load(self) -> datetime | None:
        if self.path is None:
            return None
        try:
            raw = json.loads(self.path.read_bytes())
            return datetime.fromisoformat(raw["high_water"]).astimezone(timezone.utc)
        except FileNotFoundError:
            return None
        except (OSError, ValueError, KeyError, TypeError) as e:
            log.warning("clock_state_unreadable", path=str(self.path), error=str(e))
            return None

    def now(self, wall: datetime | None = None, mono: float | None = None) -> datetime:
        wall = wall or datetime.now(timezone.utc)
        mono = time.monotonic() if mono is None else mono
        floor = self.high + timedelta(seconds=max(0.0, mono - self._mono)) if self.high is not None else None
        first, self._observed = not self._observed, True
        # A forward step is only measured against what this process saw: after a restart the mark
        # is as old as the downtime, and a clock ahead of it is the time that passed meanwhile.
        if not first and floor is not None and (wall - floor).total_seconds() > FORWARD_TOLERANCE_S:
            # A big forward step (a mistyped `date -s`, a bad NTP source) would expire policies at
            # once and, kept as the mark, for good. It is taken only once it has lasted CONFIRM_S
            # (a clock being corrected stays corrected); until then time flows from the mark.
            if self._ahead_since is None:
                self._ahead_since = mono
                log.warning("clock_step_forward", ahead_s=round((wall - floor).total_seconds(), 1),
                            wall=wall.isoformat(), judged_at=floor.isoformat(),
                            note=f"held back; taken if it lasts {CONFIRM_S:.0f} s")
            if mono - self._ahead_since < CONFIRM_S:
                self.step_ahead_s = (wall - floor).total_seconds()
                return floor
            log.warning("clock_step_forward_taken", wall=wall.isoformat(), was=floor.isoformat())
        self._ahead_since, self.step_ahead_s = None, 0.0
        if floor is None or wall >= floor:
            self.high, self._mono = wall, mono
            if self._reported:
                log.info("clock_step_back_ended", wall=wall.isoformat())
            self.step_back_s, self._reported = 0.0, False
            return wall
        self.step_back_s = (floor - wall).total_seconds()
        if self.step_back_s >= NOISE_S and not self._reported:
            self._reported = True
            log.warning("clock_step_back", behind_s=round(self.step_back_s, 1), wall=wall.isoformat(),
                        judged_at=floor.isoformat(),
                        note="validity windows are judged at the highest time seen, carried forward by the "
                             "monotonic clock; nothing accepted is dropped and nothing expired comes back")
        return floor

    def save(self) -> None:
        """Persist the high-water mark (at most once a minute of wall time: it is a floor, not a log)."""
        if self.path is None or self.high is None:
            return
        mark = self.high + timedelta(seconds=max(0.0, time.monotonic() - self._mono))
        if self._saved is not None and (mark - self._saved).total_seconds() < 60:
            return
        try:
            atomic_write(self.path, json.dumps({"high_water": mark.isoformat()}).encode() + b"\n")
            self._saved = mark
        except OSError as e:
            log.warning("clock_state_write_failed", path=str(self.path), error=e.strerror)
