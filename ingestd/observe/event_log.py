"""The logger stage: a bus observer that turns pipeline events into log lines.

It subscribes with the `drop` policy: under load it may miss events (and says
how many), but it never slows ingestion down.
"""

from __future__ import annotations

import asyncio
from typing import Any

import structlog

from ingestd.bus import Subscription
from ingestd.events import BatchCommitted, Processed, Rejected

log = structlog.get_logger("ingestd.events")

_PAYLOAD_SHOWN = 200


class EventLogger:
    def __init__(self, inbox: Subscription) -> None:
        self.inbox = inbox
        self._reported_drops = 0

    async def run(self) -> None:
        try:
            while True:
                self._handle(await self.inbox.get())
        except asyncio.CancelledError:
            # Log what is already queued, then stop.
            while not self.inbox.queue.empty():
                self._handle(self.inbox.get_nowait())
            raise

    def _handle(self, event: Any) -> None:
        if self.inbox.dropped > self._reported_drops:
            log.warning(
                "event log fell behind; events not logged",
                dropped=self.inbox.dropped - self._reported_drops,
            )
            self._reported_drops = self.inbox.dropped
        kind = type(event)
        if kind is Processed:
            self._quarantined(event.rejected)
            if event.readings and log.is_enabled_for(10):
                for r in event.readings:
                    log.debug(
                        "reading",
                        sensor=r.sensor,
                        metric=r.metric,
                        ts_ns=r.ts_ns,
                        seq=r.seq,
                        value=r.value,
                    )
        elif kind is BatchCommitted:
            self._quarantined(event.conflicts)
            log.info(
                "batch committed",
                readings=event.readings,
                duplicates=event.duplicates,
                quarantined=event.quarantined,
                messages=event.deliveries,
                ms=round(event.seconds * 1000, 2),
            )

    @staticmethod
    def _quarantined(rejected: list[Rejected]) -> None:
        for rej in rejected:
            log.info(
                "quarantined",
                topic=printable(rej.topic),
                reason=printable(rej.reason),
                payload=printable(rej.payload[:_PAYLOAD_SHOWN].decode("utf-8", "backslashreplace")),
                size=len(rej.payload),
                kind=rej.kind,
            )


_CONTROL = {c: f"\\x{c:02x}" for c in (*range(0x20), 0x7F)}


def printable(text: str) -> str:
    """What a device sent, safe for a terminal or a log line: control characters
    (escape sequences, newlines) shown as \\xNN."""
    return text.translate(_CONTROL)
