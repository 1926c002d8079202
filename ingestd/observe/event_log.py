"""The logger stage: a bus observer that turns pipeline events into log lines.

It subscribes with the `drop` policy: under load it may miss events (and says
how many), but it never slows ingestion down. Device text (topics, reasons,
payloads) is logged as it is: the renderer makes it safe, for every log line
(`observe.log`: escaped on the console, JSON-escaped in JSON lines).
"""

from __future__ import annotations

import asyncio
import re
import time
from collections.abc import Callable
from typing import Any

import structlog

from ingestd.bus import Subscription
from ingestd.events import DUPLICATES_ARE, BatchCommitted, Processed, Rejected

log = structlog.get_logger("ingestd.events")

_PAYLOAD_SHOWN = 200


# Quarantine reasons told apart by their shape: numbers and quoted text vary
# per message ("field 'x' is not a number" and "field 'y' ..." are one reason).
_VARYING = re.compile(r"'[^']*'|\"[^\"]*\"|-?\d+(?:\.\d+)?(?:e[-+]?\d+)?")
_REASONS_KEPT = 1024  # distinct reason shapes remembered (then forgotten, and logged anew)
_NEW_REASONS_PER_INTERVAL = 10  # first-occurrence lines at most per summary interval
_LATENCIES_KEPT = 4096
# The first summary comes this soon after the first commit (not a whole interval
# after "ready"): a new user sees the daemon working within seconds.
FIRST_SUMMARY_DELAY = 5.0


class _Interval:
    """What happened since the last summary line."""

    def __init__(self) -> None:
        self.messages = 0
        self.readings = 0
        self.duplicates = 0
        self.batches = 0
        self.spooled = 0  # readings committed to the local spool instead
        self.forwarded = 0  # readings forwarded from it to the store
        self.commit_ms: list[float] = []
        self.quarantined: dict[str, int] = {}
        self.examples: dict[str, str] = {}
        self.new_reasons_logged = 0
        self.new_reasons_unlogged = 0

    def latency(self, ms: float) -> None:
        if len(self.commit_ms) >= _LATENCIES_KEPT:
            del self.commit_ms[::2]  # keep every other: bounded, still spread over the interval
        self.commit_ms.append(ms)


class EventLogger:
    """Pipeline events as log lines, quiet at steady state.

    At info level a steady stream is one summary line every `summary_interval`
    seconds (the first one `first_summary_delay` seconds after the first commit,
    if that is sooner) (messages, readings, duplicates, quarantine by kind, batches,
    commit latency p50/p99, in-flight peak, backlog). Per-batch and per-reading
    lines are debug. A quarantine reason not seen before is logged at once
    (at most `_NEW_REASONS_PER_INTERVAL` per interval); repeats are counted into
    the summary. State changes are logged where they happen, at once.
    """

    def __init__(
        self,
        inbox: Subscription,
        summary_interval: float = 60.0,
        pipeline: Callable[[], dict[str, Any]] | None = None,
        first_summary_delay: float = FIRST_SUMMARY_DELAY,
    ) -> None:
        self.inbox = inbox
        self.summary_interval = summary_interval
        self.first_summary_delay = first_summary_delay
        self._first_commit_seen = False
        self._duplicates_explained = False
        self.pipeline = pipeline
        self._reported_drops = 0
        self._interval = _Interval()
        self._since = time.monotonic()
        self._due = self._since + summary_interval
        self._reasons: set[tuple[str, str]] = set()

    async def run(self) -> None:
        try:
            while True:
                wait = self._due - time.monotonic()
                if self.summary_interval > 0 and wait <= 0:
                    self.summarize()
                    continue
                try:
                    async with asyncio.timeout(wait if self.summary_interval > 0 else None):
                        event = await self.inbox.get()
                except TimeoutError:
                    continue
                self._handle(event)
        except asyncio.CancelledError:
            # Log what is already queued, and the last interval, then stop.
            while not self.inbox.queue.empty():
                self._handle(self.inbox.get_nowait())
            if self.summary_interval > 0:
                self.summarize()
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
            if not self._first_commit_seen:
                self._first_commit_seen = True
                self._due = min(self._due, time.monotonic() + self.first_summary_delay)
            self._quarantined(event.conflicts)
            ms = round(event.seconds * 1000, 2)
            now = self._interval
            now.messages += event.deliveries
            now.readings += event.readings
            now.duplicates += event.duplicates
            now.spooled += event.spooled
            now.forwarded += event.forwarded
            now.batches += 1
            now.latency(ms)
            log.debug(
                "batch committed",
                readings=event.readings,
                duplicates=event.duplicates,
                quarantined=event.quarantined,
                messages=event.deliveries,
                ms=ms,
            )

    def _quarantined(self, rejected: list[Rejected]) -> None:
        now = self._interval
        for rej in rejected:
            now.quarantined[rej.kind] = now.quarantined.get(rej.kind, 0) + 1
            now.examples.setdefault(rej.kind, rej.reason[:160])
            shape = (rej.kind, _VARYING.sub("*", rej.reason))
            first = shape not in self._reasons
            if first:
                if len(self._reasons) >= _REASONS_KEPT:
                    self._reasons.clear()
                self._reasons.add(shape)
            loud = first and now.new_reasons_logged < _NEW_REASONS_PER_INTERVAL
            if first and not loud:
                now.new_reasons_unlogged += 1
            if loud:
                now.new_reasons_logged += 1
            if loud or log.is_enabled_for(10):
                first_note = {"first": "a new reason; repeats are counted in the summary"}
                (log.info if loud else log.debug)(
                    "quarantined",
                    **(first_note if loud else {}),
                    topic=rej.topic,
                    reason=rej.reason,
                    payload=rej.payload[:_PAYLOAD_SHOWN].decode("utf-8", "backslashreplace"),
                    size=len(rej.payload),
                    kind=rej.kind,
                )

    def summarize(self) -> None:
        """The summary line of the interval just ended (one line, at info)."""
        now, self._interval = self._interval, _Interval()
        seconds = time.monotonic() - self._since
        self._since = time.monotonic()
        self._due = self._since + self.summary_interval
        fields: dict[str, Any] = {
            "seconds": round(seconds, 1),
            "messages": now.messages,
            "readings": now.readings,
            "duplicates": now.duplicates,
        }
        if now.duplicates and not self._duplicates_explained:
            self._duplicates_explained = True
            fields["duplicates_are"] = DUPLICATES_ARE
        fields |= {
            "quarantined": sum(now.quarantined.values()),
            "batches": now.batches,
        }
        if now.spooled or now.forwarded:
            fields["spooled"] = now.spooled
            fields["forwarded"] = now.forwarded
        if now.commit_ms:
            ordered = sorted(now.commit_ms)
            fields["commit_ms_p50"] = ordered[len(ordered) // 2]
            fields["commit_ms_p99"] = ordered[min(len(ordered) - 1, int(len(ordered) * 0.99))]
        if now.quarantined:
            fields["quarantined_by"] = dict(sorted(now.quarantined.items()))
            fields["quarantine_examples"] = dict(sorted(now.examples.items()))
        if now.new_reasons_unlogged:
            fields["new_reasons_not_shown"] = now.new_reasons_unlogged
        if self.pipeline is not None:
            fields.update(self.pipeline())
        log.info("summary", **fields)
