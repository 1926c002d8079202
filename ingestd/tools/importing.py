"""`ingestd import FILE...`: readings from files, through the pipeline live
data takes, into the store.

Formats:

- `csv`: what `ingestd query --format csv` writes (sensor, metric, time, ts,
  value, tags, unit, ts_ns; by header name, so columns may be left out or
  reordered: sensor, metric and value, and one of ts_ns, ts or time, are
  needed). These are stored readings: checked against the device clock and
  [processor.limits] again, not scaled again. Rows of one series and time
  that follow each other are numbered (`seq`) as the export lists them, so
  an export imported back is identical.
- `jsonl`: one `{"topic": ..., "payload": ..., "received": ...}` object a
  line (`received`: Unix seconds or ISO 8601, default now): each a message,
  decoded by the route its topic matches, as if it had just arrived.
- `senml`, `influx`: a device's log, decoded by the route `--topic` matches
  (which must be of that format): a SenML pack (or one pack a line), line
  protocol (lines decoded in groups; a bad one quarantined with its number).

Input the pipeline refuses is quarantined as live input is; a line that
cannot be read at all is quarantined with the file's name and its line
number. The store's keys make an import idempotent: a reading without a time
of its own is stamped with the file's modification time, as are its
quarantine records, so importing a file again stores nothing twice.
Parsing runs in a thread beside the commits, so the two overlap.
"""

from __future__ import annotations

import asyncio
import csv
import math
import os
import re
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TextIO

import msgspec

from ingestd.checks import process
from ingestd.config import ProcessorSettings, RouteSettings, Settings, route_table
from ingestd.decode import decode_all
from ingestd.devices import DeviceState
from ingestd.errors import DataCommandError
from ingestd.events import NS, Reading, Rejected
from ingestd.metric_rules import MetricRules
from ingestd.routes import RouteTable
from ingestd.tools.intake import Intake
from ingestd.tools.report import parse_time

FORMATS = ("csv", "jsonl", "senml", "influx")
_BY_SUFFIX = {
    ".csv": "csv",
    ".jsonl": "jsonl",
    ".ndjson": "jsonl",
    ".senml": "senml",
    ".json": "senml",
    ".lp": "influx",
    ".influx": "influx",
    ".line": "influx",
}
CHUNK = 20_000  # readings per transaction (a few tens of ms of the writer's lock)
LINES_PER_MESSAGE = 500  # line protocol lines decoded as one message
_PAYLOAD_FORMATS = {"senml": "senml", "influx": "influx"}

Chunk = tuple[list[Reading], list[Rejected]]


class _Message(msgspec.Struct):
    topic: str
    payload: str
    received: float | str | None = None


_read_message = msgspec.json.Decoder(_Message).decode


def file_format(path: Path, given: str | None) -> str:
    if given:
        return given
    fmt = _BY_SUFFIX.get(path.suffix.lower())
    if fmt is None:
        raise DataCommandError(
            f"{path}: cannot tell the format from the name: give --format ({', '.join(FORMATS)})"
        )
    return fmt


@dataclass
class FileReader:
    """One file's chunks of (readings, quarantine records), checked by the processor."""

    path: Path
    fmt: str
    table: RouteTable
    processor: ProcessorSettings
    topic: str
    now: float
    done_bytes: int = 0
    readings: int = 0  # read from the file so far
    routes: Sequence[RouteSettings] = ()  # their limits and scaling apply too

    def __post_init__(self) -> None:
        self.devices = DeviceState()
        # Stored readings (csv) were scaled when first stored.
        self.rules = MetricRules(self.processor, self.routes, scaled=self.fmt != "csv")
        self.origin = self.topic or f"import:{self.path}"
        if self.fmt in _PAYLOAD_FORMATS:
            if not self.topic:
                raise DataCommandError(
                    f"{self.path}: a {self.fmt} file needs --topic: the topic its "
                    "messages would have had, whose route reads them"
                )
            match = self.table.match(self.topic)
            want = _PAYLOAD_FORMATS[self.fmt]
            if match is None or match.fmt.name != want:
                got = "no route" if match is None else f"a route of format {match.fmt.name}"
                raise DataCommandError(
                    f"--topic {self.topic}: {got} matches it; a {self.fmt} file needs "
                    f"a route of format {want} (see ingestd explain --topic ...)"
                )

    def chunks(self) -> Iterator[Chunk]:
        parts = {
            "csv": self._csv,
            "jsonl": self._jsonl,
            "senml": self._senml,
            "influx": self._influx,
        }[self.fmt]()
        for readings, rejected in parts:
            self.readings += len(readings)
            yield process(readings, self.processor, self.now, rejected, self.rules), rejected

    def refused(self, line: int, text: str, why: str) -> Rejected:
        return Rejected(
            self.origin, text.encode(), f"{self.path} line {line}: {why}", self.now, "decode"
        )

    def _lines(self) -> Iterator[tuple[int, str]]:
        with open(self.path, encoding="utf-8-sig", errors="surrogateescape", newline="") as f:
            fd = f.fileno()
            for number, line in enumerate(f, 1):
                if number % 4096 == 0:
                    self.done_bytes = os.lseek(fd, 0, os.SEEK_CUR)
                yield number, line

    def _csv(self) -> Iterator[Chunk]:
        with open(self.path, encoding="utf-8-sig", errors="surrogateescape", newline="") as f:
            fd = f.fileno()
            rows = csv.reader(f)
            header = next(rows, None)
            if header is None:
                return
            col = {name: i for i, name in enumerate(header)}
            missing = [c for c in ("sensor", "metric", "value") if c not in col]
            if missing or not {"ts_ns", "ts", "time"} & col.keys():
                raise DataCommandError(
                    f"{self.path}: the header {','.join(header)!r} lacks "
                    f"{', '.join(missing) or 'a time'}: expected the columns "
                    "`ingestd query --format csv` writes "
                    "(sensor,metric,time,ts,value,tags,unit,ts_ns,seq)"
                )
            yield from self._csv_rows(rows, col, fd)

    def _csv_rows(self, rows: Iterator[list[str]], col: dict[str, int], fd: int) -> Iterator[Chunk]:
        s, m, v = col["sensor"], col["metric"], col["value"]
        tg, un = col.get("tags"), col.get("unit")
        when = self._csv_time(col)
        origin = self.origin
        readings: list[Reading] = []
        rejected: list[Rejected] = []
        current: tuple[str, int] = ("", -1)
        seen: dict[tuple[str, str, str], int] = {}
        header = [""] * len(col)
        for name, i in col.items():
            header[i] = name
        sq = col.get("seq")
        for row in rows:
            if row == header or not row:  # exports concatenated (each has its header); blank
                continue
            try:
                ts_ns = when(row)
                sensor, metric, value = row[s], row[m], finite(row[v])
                tags = row[tg] if tg is not None else ""
                unit = row[un] if un is not None else ""
                given = int(row[sq]) if sq is not None and row[sq] != "" else None
            except (ValueError, IndexError) as exc:
                text = ",".join(row)
                rejected.append(self.refused(rows.line_num, text, f"cannot read the row: {exc}"))  # type: ignore[attr-defined]
                continue
            if (sensor, ts_ns) != current:
                current, seen = (sensor, ts_ns), {}
            key = (metric, tags, unit)
            seq = seen.get(key, 0) if given is None else given  # an export's own seq
            seen[key] = seq + 1
            readings.append(Reading(sensor, metric, ts_ns, value, origin, tags, unit, seq))
            if len(readings) >= CHUNK:
                self.done_bytes = os.lseek(fd, 0, os.SEEK_CUR)
                yield readings, rejected
                readings, rejected = [], []
        yield readings, rejected

    def _csv_time(self, col: dict[str, int]) -> Callable[[list[str]], int]:
        if "ts_ns" in col:
            i = col["ts_ns"]
            return lambda row: int(row[i])
        if "ts" in col:
            i = col["ts"]
            return lambda row: _exact_ns(row[i])
        i = col["time"]
        return lambda row: round(parse_time(row[i]) * NS)

    def _jsonl(self) -> Iterator[Chunk]:
        batch: list[tuple[str, bytes, int]] = []
        bad: list[Rejected] = []
        now_ns = int(self.now * NS)
        for number, line in self._lines():
            if not line.strip():
                continue
            try:
                msg = _read_message(line.encode("utf-8", "surrogateescape"))
                received = now_ns if msg.received is None else _received_ns(msg.received)
            except (msgspec.DecodeError, msgspec.ValidationError, DataCommandError) as exc:
                bad.append(self.refused(number, line.rstrip("\n"), f"not a message object: {exc}"))
                continue
            batch.append((msg.topic, msg.payload.encode("utf-8", "surrogateescape"), received))
            if len(batch) >= 2000:
                yield self._decoded(batch, bad)
                batch, bad = [], []
        yield self._decoded(batch, bad)

    def _decoded(self, batch: list[tuple[str, bytes, int]], bad: list[Rejected]) -> Chunk:
        readings, rejected = decode_all(self.table, self.devices, batch)
        return readings, bad + rejected

    def _senml(self) -> Iterator[Chunk]:
        data = self.path.read_bytes()
        self.done_bytes = len(data)
        try:
            msgspec.json.decode(data)
        except msgspec.DecodeError:
            whole = False  # one pack a line
        else:
            whole = True
        now_ns = int(self.now * NS)
        if whole:
            yield self._payload(data, now_ns, None)
            return
        for number, line in self._lines():
            if line.strip():
                yield self._payload(line.encode("utf-8", "surrogateescape"), now_ns, number)

    def _payload(self, payload: bytes, now_ns: int, line: int | None) -> Chunk:
        readings, rejected = decode_all(self.table, self.devices, [(self.topic, payload, now_ns)])
        where = f"{self.path}" + (f" line {line}" if line is not None else "")
        return readings, [
            Rejected(r.topic, r.payload, f"{where}: {r.reason}", r.received_at, r.kind)
            for r in rejected
        ]

    def _influx(self) -> Iterator[Chunk]:
        group: list[tuple[int, str]] = []
        now_ns = int(self.now * NS)
        for number, line in self._lines():
            group.append((number, line))
            if len(group) >= LINES_PER_MESSAGE:
                yield self._influx_group(group, now_ns)
                group = []
        yield self._influx_group(group, now_ns)

    def _influx_group(self, group: list[tuple[int, str]], now_ns: int) -> Chunk:
        text = "".join(line for _, line in group).encode("utf-8", "surrogateescape")
        if not text.strip():
            return [], []
        readings, rejected = decode_all(self.table, self.devices, [(self.topic, text, now_ns)])
        if not rejected:
            return readings, rejected
        # Some line is bad: each on its own, so the record names it.
        readings, rejected = [], []
        for number, line in group:
            if not line.strip() or line.lstrip().startswith("#"):
                continue
            one = line.encode("utf-8", "surrogateescape")
            got, bad = decode_all(self.table, self.devices, [(self.topic, one, now_ns)])
            readings += got
            rejected += [
                Rejected(
                    r.topic,
                    r.payload,
                    f"{self.path} line {number}: {r.reason.removeprefix('line 1: ')}",
                    r.received_at,
                    r.kind,
                )
                for r in bad
            ]
        return readings, rejected


def _exact_ns(text: str) -> int:
    """Decimal Unix seconds (as `query` writes `ts`) to exact nanoseconds."""
    whole, _, frac = text.strip().partition(".")
    if not frac:
        return int(whole) * NS
    sign = -1 if whole.startswith("-") else 1
    return int(whole) * NS + sign * int(frac[:9].ljust(9, "0"))


def _received_ns(value: float | str) -> int:
    if isinstance(value, str):
        return round(parse_time(value) * NS)
    return round(value * NS)


@dataclass
class ImportResult:
    files: int
    read: int
    seconds: float


async def import_files(
    settings: Settings,
    paths: list[Path],
    fmt: str | None,
    topic: str,
    intake: Intake,
    progress: TextIO | None,
) -> ImportResult:
    """Each file's chunks committed in turn; the next chunk parsed (in a
    thread) while the last commits."""
    if fmt in _PAYLOAD_FORMATS:
        # The operator's own file: not held to the limit put on what devices send.
        inp = settings.input.model_copy(update={"max_payload_bytes": 1 << 62})
        settings = settings.model_copy(update={"input": inp})
    table = route_table(settings)
    started = time.monotonic()
    read = 0
    for path in paths:
        # The file's time, not the import's: what the clock check measures
        # against, and the time of a reading the file gives none, so that
        # importing the same file again gives the same keys.
        reader = FileReader(
            path,
            file_format(path, fmt),
            table,
            settings.processor,
            topic,
            path.stat().st_mtime,
            routes=settings.routes,
        )
        size = max(path.stat().st_size, 1)
        parts = reader.chunks()
        pending = asyncio.create_task(asyncio.to_thread(next, parts, None))
        while (chunk := await pending) is not None:
            pending = asyncio.create_task(asyncio.to_thread(next, parts, None))
            await intake.commit(*chunk)
            if progress is not None:
                _show(progress, path, reader, size, read, started)
        read += reader.readings
        if progress is not None:
            progress.write("\n")
    return ImportResult(len(paths), read, time.monotonic() - started)


def _show(out: TextIO, path: Path, reader: FileReader, size: int, before: int, t0: float) -> None:
    done = min(100, 100 * reader.done_bytes // size)
    n = before + reader.readings
    rate = n / max(time.monotonic() - t0, 1e-6)
    out.write(f"\rimport {path.name}: {done:3d}% {n:,} readings ({rate:,.0f}/s)")
    out.flush()


def default_progress() -> TextIO | None:
    return sys.stderr if sys.stderr.isatty() else None


_NUMBER = re.compile(r"[+-]?(?:[0-9]+(?:\.[0-9]*)?|\.[0-9]+)(?:[eE][+-]?[0-9]+)?")


def finite(text: str) -> float:
    """A CSV value as a reading takes it: a finite decimal number (what the
    live decoders accept), not nan, inf, 1_000 or digits of other scripts."""
    t = text.strip()
    if not _NUMBER.fullmatch(t):
        raise ValueError(f"{text!r} is not a finite decimal number")
    value = float(t)
    if not math.isfinite(value):
        raise ValueError(f"{text!r} is out of range")
    return value
