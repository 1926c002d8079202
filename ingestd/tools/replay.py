"""`ingestd quarantine replay`: quarantined input run again through the
current configuration, stored if it now passes.

Each record goes through the pipeline `explain` shows (`explain.outcome`:
route, format, rate limit, then scaling, clocks and limits), with its
original receive time, so a reading stamped with it gets the same key every
time. A record holds one of two things:

- a message (the route's format could not read it, no route matched, a rate
  limit): its topic and payload are decoded again, in arrival order, with
  the instance's saved device state (a Sparkplug node's BIRTH);
- one reading the processor refused (a limit, a device clock, a value that
  conflicts with a stored one): rebuilt from the record (`reading_payload`)
  and checked again against the clock and limits (scaling was applied
  before it was refused; only a reading refused *by* scaling is scaled again).

What now passes is stored, and its record removed, in one transaction per
page; a record still refused for the same reason stays as it is; one refused
for another reason is replaced by a record with the new one. A payload kept
only in part (over `input.max_payload_bytes`) cannot be replayed and stays.
"""

from __future__ import annotations

import asyncio
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from typing import TextIO

import msgspec

from ingestd.checks import process
from ingestd.config import ProcessorSettings, Settings, route_table
from ingestd.devices import DeviceState
from ingestd.errors import DataCommandError
from ingestd.events import NS, Reading, Rejected
from ingestd.metric_rules import MetricRules
from ingestd.mqtt.topics import levels_match
from ingestd.printable import printable
from ingestd.routes import RouteTable
from ingestd.store import Reader
from ingestd.store.base import QuarantineRecord
from ingestd.tools.explain import outcome
from ingestd.tools.intake import Intake
from ingestd.tools.report import iso

PAGE = 1000  # records per transaction

# The reasons the processor and the store give a single refused reading
# (checks.apply_limits / apply_scaling / apply_clock, Batch.conflict,
# checks.process_guarded): such a record's payload is the reading.
_READING_REASON = re.compile(
    r"^\S.* is (below|above) the limit (min|max)="
    r"|scaled by .* is not a finite number$"
    r"|^timestamp \S+ is .*\(processor\.(max_future_seconds|max_age_days) = "
    r"|^conflict: a different value "
    r"|^internal error: processing failed"
)
_SCALING_REASON = re.compile(r"scaled by .* is not a finite number$")
_TRUNCATED = "input.max_payload_bytes; first 1 KiB kept"


class _ReadingDoc(msgspec.Struct):
    sensor: str
    metric: str
    ts_ns: int
    value: float
    tags: str | None = None
    unit: str | None = None
    seq: int = 0


_read_doc = msgspec.json.Decoder(_ReadingDoc).decode


@dataclass
class Verdict:
    """What the current configuration makes of one record."""

    outcome: str  # "accepted", "refused" (new reason), "unchanged", "unreplayable"
    readings: list[Reading] = field(default_factory=list)
    rejected: list[Rejected] = field(default_factory=list)


@dataclass(frozen=True)
class Selection:
    since: float
    until: float
    reason: str = ""  # a substring of the reason ("": any)
    topic: str = ""  # an MQTT topic filter ("": any)

    def wants(self, topic: str) -> bool:
        if not self.topic:
            return True
        parts = self.topic.split("/")
        multi = parts[-1] == "#"
        levels = [None if p == "+" else p for p in (parts[:-1] if multi else parts)]
        return levels_match(levels, multi, topic.split("/"))


def reading_of(
    record: QuarantineRecord, table: RouteTable, processor: ProcessorSettings
) -> Reading | None:
    """The reading a processor-refused record holds, or None (a message)."""
    if not _READING_REASON.search(record.reason):
        return None
    try:
        doc = _read_doc(record.payload)
    except (msgspec.ValidationError, msgspec.DecodeError):
        return None
    tags, unit = doc.tags, doc.unit
    if tags is None:
        # Written before records kept the tags: the topic's, as its route gives them.
        match = table.match(record.topic)
        tags = match.tags if match is not None else ""
    if unit is None:
        scaling = processor.scaling.get(doc.metric)
        unit = scaling.unit if scaling is not None and scaling.unit else ""
    return Reading(doc.sensor, doc.metric, doc.ts_ns, doc.value, record.topic, tags, unit, doc.seq)


def judge(
    record: QuarantineRecord,
    table: RouteTable,
    devices: DeviceState,
    processor: ProcessorSettings,
    rules: tuple[MetricRules, MetricRules] | None = None,
) -> Verdict:
    """`rules`: (with scaling, without), as for the daemon's routes (default:
    `processor`'s alone). A record refused for a limit holds its reading
    scaled already: it is judged again without scaling."""
    if _TRUNCATED in record.reason:
        return Verdict("unreplayable")
    reading = reading_of(record, table, processor)
    rejected: list[Rejected] = []
    if reading is not None:
        if rules is None:
            rules = (MetricRules(processor), MetricRules(processor, scaled=False))
        scaled = _SCALING_REASON.search(record.reason) is not None
        kept = process(
            [reading], processor, record.received_at, rejected, rules[0 if scaled else 1]
        )
    else:
        received_ns = int(record.received_at * NS)
        kept, rejected = outcome(
            table,
            devices,
            processor,
            record.topic,
            record.payload,
            received_ns,
            rules[0] if rules is not None else None,
        )
    if (
        not kept
        and len(rejected) == 1
        and rejected[0].reason == record.reason
        and rejected[0].payload == record.payload
    ):
        return Verdict("unchanged")
    return Verdict("refused" if rejected and not kept else "accepted", kept, rejected)


@dataclass
class ReplayCounts:
    matched: int = 0
    accepted: int = 0
    refused: int = 0
    unchanged: int = 0
    unreplayable: int = 0
    readings: int = 0


def records(reader: Reader, sel: Selection) -> Iterator[list[QuarantineRecord]]:
    """The selected records a page at a time, up to the newest at the start."""
    upto = reader.quarantine_last_id()
    after = 0
    while True:
        page = reader.quarantine_page(sel.since, sel.until, sel.reason, after, upto, PAGE)
        if not page:
            return
        after = page[-1].id
        yield [r for r in page if sel.wants(r.topic)]


def replay(
    settings: Settings,
    reader: Reader,
    sel: Selection,
    *,
    db: str | None = None,
    dry_run: bool = False,
    out: TextIO,
    err: TextIO,
) -> str:
    """Replay the selected records; returns the summary line."""
    if not settings.routes:
        raise DataCommandError(
            "quarantine replay: the config has no [[routes]]: every message would be "
            "refused again (give --config the daemon's file)"
        )
    table = route_table(settings)
    checks = (
        settings.processor,
        MetricRules(settings.processor, settings.routes),
        MetricRules(settings.processor, settings.routes, scaled=False),
    )
    devices = DeviceState()
    counts = ReplayCounts()
    intake = None if dry_run else Intake(settings, db, err=err)
    with asyncio.Runner() as runner:
        if intake is not None:
            runner.run(intake.open())
            devices.restore(table.stateful, intake.store.devices)
        try:
            for page in records(reader, sel):
                step = _page(page, table, devices, checks, counts, out, dry_run)
                if intake is not None:
                    runner.run(intake.commit(*step))
        finally:
            if intake is not None:
                runner.run(intake.close())
    return _summary(counts, intake, dry_run)


def _page(
    page: list[QuarantineRecord],
    table: RouteTable,
    devices: DeviceState,
    checks: tuple[ProcessorSettings, MetricRules, MetricRules],
    counts: ReplayCounts,
    out: TextIO,
    dry_run: bool,
) -> tuple[list[Reading], list[Rejected], list[int]]:
    """One page judged: (readings to store, records to write, ids to remove)."""
    readings: list[Reading] = []
    rejected: list[Rejected] = []
    forget: list[int] = []
    say: Callable[[QuarantineRecord, str], None] = lambda rec, text: print(  # noqa: E731
        printable(f"#{rec.id} {iso(rec.received_at)} {rec.topic}: {text}"), file=out
    )
    for rec in page:
        counts.matched += 1
        v = judge(rec, table, devices, checks[0], checks[1:])
        setattr(counts, v.outcome, getattr(counts, v.outcome) + 1)
        counts.readings += len(v.readings)
        if v.outcome in ("accepted", "refused"):
            forget.append(rec.id)
            readings += v.readings
            rejected += v.rejected
        if not dry_run:
            continue
        if v.outcome == "unreplayable":
            say(rec, "cannot replay: only the payload's first 1 KiB was kept")
        elif v.outcome == "unchanged":
            say(rec, f"still refused: {rec.reason}")
        else:
            told = [f"would store {len(v.readings)} reading(s)"] if v.readings else []
            told += [f"refused: {r.reason}" for r in v.rejected]
            say(rec, "; ".join(told) or "accepted (no readings: would be removed)")
    return readings, rejected, forget


def _summary(c: ReplayCounts, intake: Intake | None, dry_run: bool) -> str:
    refused = f"{c.refused} refused for a new reason, {c.unchanged} still refused as before"
    cannot = f", {c.unreplayable} cannot be replayed (payload truncated)" if c.unreplayable else ""
    if dry_run or intake is None:
        return (
            f"quarantine replay (dry run, nothing written): {c.matched} record(s) matched: "
            f"{c.accepted} would be accepted ({c.readings} reading(s)), {refused}{cannot}"
        )
    t = intake.tally
    conflicts = (
        f", {t.conflicts} conflicting with stored values (quarantined)" if t.conflicts else ""
    )
    return (
        f"quarantine replay: {c.matched} record(s) matched: {c.accepted} accepted "
        f"({t.stored} reading(s) stored, {t.duplicates} already stored{conflicts}), "
        f"{refused}{cannot}; {t.forgotten} record(s) removed, {t.quarantined} written"
    )
