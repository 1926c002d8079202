"""Log lines that a device's messages cause, bounded in total.

A state change of one device (a Homie `$state`, a Sparkplug rebirth asked
for, a late will ignored) is worth a line, but the ids come from whoever can
publish: a flood of new ids must not buy a flood of lines. So these lines
share one budget, `LINES_PER_MINUTE` a minute in all; past it they are
counted (`ingestd_device_log_lines_suppressed_total`, and the summary line),
and one line says so once a minute.
"""

from __future__ import annotations

import time
from typing import Any

import structlog

LINES_PER_MINUTE = 20
_WINDOW = 60.0

log = structlog.get_logger("ingestd.devices")


class DeviceLog:
    """The shared budget of per-device info lines (one per process, held by the
    device state and kept across a reload)."""

    def __init__(self, per_minute: int = LINES_PER_MINUTE) -> None:
        self.per_minute = per_minute
        self.suppressed = 0  # lines not written, since start
        self._window_start = -_WINDOW
        self._written = 0
        self._told = False

    def info(self, logger: Any, event: str, **fields: Any) -> bool:
        """Write the line if the budget allows; else count it. True if written."""
        now = time.monotonic()
        if now - self._window_start >= _WINDOW:
            self._window_start, self._written, self._told = now, 0, False
        if self._written < self.per_minute:
            self._written += 1
            logger.info(event, **fields)
            return True
        self.suppressed += 1
        if not self._told:
            self._told = True
            log.warning(
                "more device state lines this minute than the log shows; the rest are "
                "counted (ingestd_device_log_lines_suppressed_total) and the state is "
                "still kept (ingestd sensors)",
                per_minute=self.per_minute,
            )
        return False
