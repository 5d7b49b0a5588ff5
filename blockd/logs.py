"""structlog setup, called once by `blockd run`: JSON lines to stdout (the journal keeps them)."""

from __future__ import annotations

import logging
import sys
from typing import TextIO

import structlog


def configure(*, json: bool = True, level: str = "info") -> None:
    renderer: structlog.typing.Processor = (
        structlog.processors.JSONRenderer() if json else structlog.dev.ConsoleRenderer(colors=False)
    )
    structlog.configure(
        processors=[
            structlog.contextvars.merge_contextvars,
            structlog.processors.add_log_level,
            structlog.processors.TimeStamper(fmt="iso", utc=True),
            structlog.processors.format_exc_info,
            renderer,
        ],
        wrapper_class=structlog.make_filtering_bound_logger(getattr(logging, level.upper())),
        logger_factory=structlog.PrintLoggerFactory(file=SafeStream(sys.stdout)),
        cache_logger_on_first_use=True,
    )


class SafeStream:
    """stdout for log lines that never takes the daemon down: a full disk behind
    `StandardOutput=append:`, a closed or broken stdout. A line that cannot be written is
    dropped and counted (`dropped`); enforcement goes on."""

    def __init__(self, stream: TextIO | None) -> None:
        self._stream = stream
        self.dropped = 0

    def write(self, text: str) -> int:
        try:
            if self._stream is None:
                raise OSError("stdout is closed")
            return self._stream.write(text)
        except (OSError, ValueError):
            self.dropped += 1
            return 0

    def flush(self) -> None:
        try:
            if self._stream is not None:
                self._stream.flush()
        except (OSError, ValueError):
            self.dropped += 1
