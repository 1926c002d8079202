"""Getting the data out: `ingestd sensors`, `query`, `quarantine`, `stats`.

The rows come from the store's `Reader` (read-only, streamed); this module
shapes them for people and programs: exact times, aligned text, CSV or JSON,
progress on long exports, and the running daemon's own figures.

Text a device chose (sensor ids, metrics, tags, topics) is escaped in the
table, which people read (`printable`: a U+202E in an id cannot reorder a
row). CSV and JSON are data and keep it exact: JSON writes such characters as
`\\uXXXX` escapes (ASCII output), CSV writes them as they are, so a CSV export
round-trips to the stored text; read it with a program, not a terminal.
"""

from __future__ import annotations

import csv
import json
import math
import re
import sys
import time
import urllib.error
import urllib.request
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TextIO

from ingestd.config import MetricsSettings
from ingestd.errors import DataCommandError
from ingestd.events import DUPLICATES_ARE, NS
from ingestd.printable import printable
from ingestd.spool import read_state
from ingestd.store.base import Reader

_DURATION = re.compile(r"^(\d+(?:\.\d+)?)\s*(s|m|h|d|w)$")
_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}
PROGRESS_EVERY = 100_000


def parse_time(text: str, now: float | None = None) -> float:
    """`1h`/`30m`/`2d`/`1w`/`90s` ago, an ISO 8601 time (naive = UTC), or Unix seconds."""
    now = time.time() if now is None else now
    t = text.strip()
    m = _DURATION.match(t)
    if m:
        return now - float(m[1]) * _UNITS[m[2]]
    try:
        value = float(t)
    except ValueError:
        pass
    else:
        if math.isfinite(value):
            return value
    try:
        dt = datetime.fromisoformat(t)
    except ValueError:
        raise DataCommandError(
            f"cannot read time {text!r}: use a duration (90s, 30m, 1h, 2d, 1w), "
            "an ISO 8601 time or Unix seconds"
        ) from None
    if dt.tzinfo is None:
        dt = dt.replace(tzinfo=UTC)
    return dt.timestamp()


def iso(ts: float) -> str:
    return datetime.fromtimestamp(ts, UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def iso_ns(ns: int) -> str:
    """An exact UTC time: milliseconds always, finer digits where there are any."""
    seconds, frac = divmod(ns, NS)
    digits = f"{frac:09d}".rstrip("0").ljust(3, "0")
    return datetime.fromtimestamp(seconds, UTC).strftime("%Y-%m-%dT%H:%M:%S.") + digits + "Z"


def seconds_text(ns: int) -> str:
    """Unix seconds as exact decimal text (a float would round to 15-17 digits)."""
    seconds, frac = divmod(ns, NS)
    digits = f"{frac:09d}".rstrip("0")
    return f"{seconds}.{digits}" if digits else str(seconds)


@dataclass(frozen=True)
class Table:
    columns: Sequence[str]
    rows: Iterable[Sequence[Any]]


def write_table(out: TextIO, table: Table, output: str, *, progress: TextIO | None = None) -> int:
    """Write rows as an aligned text table, CSV or a JSON array; return the count."""
    rows: Iterable[Sequence[Any]] = table.rows
    if progress is not None:
        rows = _with_progress(rows, progress)
    n = 0
    if output == "csv":
        w = csv.writer(out, lineterminator="\n")
        # A lone carriage return is not the line terminator, so the writer
        # would leave it bare: such a row is quoted whole (it reads back).
        quoted = csv.writer(out, lineterminator="\n", quoting=csv.QUOTE_ALL)
        w.writerow(table.columns)
        for row in rows:
            fields = [v.text() if isinstance(v, _Payload) else v for v in row]
            cr = any(isinstance(f, str) and "\r" in f for f in fields)
            (quoted if cr else w).writerow(fields)
            n += 1
    elif output == "json":
        cols = list(table.columns)
        out.write("[")
        for row in rows:
            out.write(",\n " if n else "\n ")
            out.write(_json_object(cols, row))
            n += 1
        out.write("\n]\n" if n else "]\n")
    else:
        # Aligned columns need the widths first: buffer, but only the text.
        text = [[_cell(v) for v in row] for row in rows]
        n = len(text)
        widths = [max([len(c)] + [len(r[i]) for r in text]) for i, c in enumerate(table.columns)]
        out.write(
            "  ".join(c.ljust(w) for c, w in zip(table.columns, widths, strict=True)).rstrip()
            + "\n"
        )
        for r in text:
            out.write("  ".join(v.ljust(w) for v, w in zip(r, widths, strict=True)).rstrip() + "\n")
    return n


def _json_object(cols: list[str], row: Sequence[Any]) -> str:
    parts = []
    for c, v in zip(cols, row, strict=True):
        text: str
        if isinstance(v, _Exact):
            text = v
        elif isinstance(v, _Payload):
            text = json.dumps(v.text())
        else:
            text = json.dumps(v, default=str)
        parts.append(f"{json.dumps(c)}: {text}")
    return "{" + ", ".join(parts) + "}"


def _cell(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.15g}"
    if isinstance(v, _Payload):
        return v.preview()
    return "" if v is None else printable(str(v))


def _with_progress(rows: Iterable[Sequence[Any]], err: TextIO) -> Iterator[Sequence[Any]]:
    started = time.monotonic()
    n = 0
    for row in rows:
        yield row
        n += 1
        if n % PROGRESS_EVERY == 0:
            rate = n / max(time.monotonic() - started, 1e-9)
            err.write(f"ingestd: {n:,} rows exported ({rate:,.0f}/s)\n")
            err.flush()
    err.write(f"ingestd: {n:,} rows exported in {time.monotonic() - started:.2f} s\n")


# -- the commands' queries ------------------------------------------------------------


def sensors(reader: Reader, like: str | None = None, now: float | None = None) -> Table:
    """Each series with its last reading, whether the sensor is stale (silent
    longer than its route's expect_within), and the gaps seen in its message
    counter (messages lost upstream)."""
    now_ns = int((time.time() if now is None else now) * NS)

    def stale(ns: int, expect: float | None) -> str:
        if not expect:
            return ""
        return "yes" if now_ns - ns > expect * NS else "no"

    return Table(
        (
            "sensor",
            "metric",
            "tags",
            "unit",
            "last_value",
            "last_seen",
            "stale",
            "seq_gaps",
            "seq_missing",
            "state",
        ),
        (
            (
                r.sensor,
                r.metric,
                r.tags,
                r.unit,
                r.value,
                iso_ns(r.ts_ns),
                stale(r.ts_ns, r.expect_within),
                r.seq_gaps,
                r.seq_missing,
                r.state,
            )
            for r in reader.sensors(like)
        ),
    )


def tag_pairs(sensor: str | None, tags: Sequence[str]) -> list[tuple[str, str]]:
    """--tag KEY=VALUE as pairs; one of --sensor and --tag is needed."""
    pairs: list[tuple[str, str]] = []
    for tag in tags:
        key, eq, value = tag.partition("=")
        if not eq or not key:
            raise DataCommandError(f"--tag {tag!r}: expected KEY=VALUE")
        pairs.append((key, value))
    if sensor is None and not pairs:
        raise DataCommandError(
            "give --sensor (an id or a glob, 'kitchen-*'; '*' for every sensor) "
            "or --tag KEY=VALUE, or both"
        )
    return pairs


def query(
    reader: Reader,
    sensor: str | None,
    metric: str | None,
    since: float,
    until: float,
    limit: int | None = None,
    tags: Sequence[str] = (),
) -> Table:
    """Readings in [since, until) of the sensors `sensor` (a glob) matches,
    and/or of the series with every tag in `tags` (KEY=VALUE); `limit` 0 or
    None: all of them.

    `ts` is exact decimal text of Unix seconds (JSON and CSV readers parse it
    as a number; a float would round it), `ts_ns` the same as an integer.
    """
    if until <= since:
        raise DataCommandError("--until must be later than --since")
    pairs = tag_pairs(sensor, tags)
    rows = reader.readings(sensor, metric, _to_ns(since), _to_ns(until), limit, pairs)
    return Table(
        ("sensor", "metric", "time", "ts", "value", "tags", "unit", "ts_ns", "seq"),
        (
            (s, m, iso_ns(ns), _Exact(seconds_text(ns)), v, t, u, ns, q)
            for s, m, ns, v, t, u, q in rows
        ),
    )


class _Exact(str):
    """A number kept as its exact text: JSON writes it as a number, not a string."""

    __slots__ = ()


class _Payload(bytes):
    """A stored payload: the table shows a one-line preview of its start;
    CSV and JSON, which are data, write all of it (see `text`)."""

    __slots__ = ()

    def text(self) -> str:
        """The whole payload as text: exact for UTF-8 (every JSON, CSV or
        SenML payload), bytes that are not UTF-8 as `\\xNN`."""
        return self.decode("utf-8", "backslashreplace")

    def preview(self, size: int = 120) -> str:
        text = self[:size].decode("utf-8", "backslashreplace")
        # Devices send anything: keep one line, control characters escaped.
        text = text.encode("unicode_escape").decode("ascii")
        return text + ("..." if len(self) > size else "")


def _to_ns(seconds: float) -> int:
    return max(0, min(int(seconds * NS), 2**63 - 1))


def quarantine(reader: Reader, since: float, limit: int | None) -> Table:
    """Quarantined messages received since `since`, newest first; `limit` 0 or
    None: all of them."""
    return Table(
        ("received", "topic", "reason", "payload"),
        (
            (iso(t), topic, reason, _Payload(p))
            for t, topic, reason, p in reader.quarantined(since, limit)
        ),
    )


def db_stats(reader: Reader) -> dict[str, Any]:
    t = reader.totals()
    return {
        "source": "database",
        "path": t.where,
        "sensors": t.sensors,
        "series": t.series,
        "readings": t.readings,
        "quarantined": t.quarantined,
        "first_reading": iso_ns(t.first_ns) if t.first_ns is not None else None,
        "last_reading": iso_ns(t.last_ns) if t.last_ns is not None else None,
        "size_mb": round(t.size_bytes / 1e6, 1),
    }


def spool_stats(path: Path | None) -> dict[str, Any]:
    """The local spool's figures (store.spool), {} without one."""
    if path is None:
        return {}
    state = read_state(path)
    if state is None:
        return {"spool": str(path), "spool_readings": 0}
    return {
        "spool": str(path),
        "spool_readings": state.readings,
        "spool_batches": state.batches,
        "spool_mb": round(state.bytes / 1e6, 1),
        "spool_oldest": iso_ns(int(state.oldest * 1e9)) if state.oldest else None,
    }


_LIVE = {
    "ingestd_readings_spooled": "readings_spooled",
    "ingestd_spool_readings": "spool_readings",
    "ingestd_spool_bytes": "spool_bytes",
    "ingestd_spool_oldest_age_seconds": "spool_oldest_age_s",
    "ingestd_messages_received_total": "messages_received",
    "ingestd_readings_committed_total": "readings_committed",
    "ingestd_readings_duplicate_total": "readings_duplicate",
    "ingestd_batches_committed_total": "batches",
    "ingestd_inflight_messages": "in_flight",
    "ingestd_broker_connected": "broker_connected",
    "ingestd_broker_reconnects_total": "reconnects",
    "ingestd_store_available": "store_available",
    "ingestd_ready": "ready",
}


def live_stats(url: str, timeout: float = 2.0) -> dict[str, Any] | None:
    """The running daemon's figures from its /metrics, or None if it does not answer."""
    try:
        with urllib.request.urlopen(url.rstrip("/") + "/metrics", timeout=timeout) as resp:
            text = resp.read().decode()
    except (urllib.error.URLError, OSError):
        return None
    out: dict[str, Any] = {"source": "daemon", "url": url}
    quarantined = 0.0
    for line in text.splitlines():
        if line.startswith("#") or " " not in line:
            continue
        key, _, value = line.rpartition(" ")
        name = key.split("{", 1)[0]
        if name in _LIVE:
            out[_LIVE[name]] = _number(value)
        elif name == "ingestd_quarantined_total":
            quarantined += float(value)
            reason = key.split('reason="', 1)[1].split('"', 1)[0] if 'reason="' in key else "?"
            out[f"quarantined_{reason}"] = _number(value)
        elif name == "ingestd_bus_queue_depth":
            sub = key.split('subscriber="', 1)[1].split('"', 1)[0]
            out[f"queue_{sub}"] = _number(value)
    out["quarantined"] = _number(str(quarantined))
    return out


def _number(text: str) -> int | float:
    v = float(text)
    return int(v) if v.is_integer() else v


def print_stats(stats: dict[str, Any], out: TextIO = sys.stdout, as_json: bool = False) -> None:
    if as_json:
        out.write(json.dumps(stats, indent=2) + "\n")
        return
    width = max(len(k) for k in stats)
    for k, v in stats.items():
        shown = f"{v:,}" if isinstance(v, int) and not isinstance(v, bool) else printable(str(v))
        if k == "readings_duplicate" and v:
            shown += f" ({DUPLICATES_ARE})"
        out.write(f"{k.ljust(width)}  {shown}\n")


def instance_stats(url: str | None, metrics: MetricsSettings) -> dict[str, Any]:
    """One instance's live figures (`stats --instance`), never silently the
    database's instead."""
    if url is None and not metrics.enabled:
        raise DataCommandError(
            "stats --instance: the config disables [metrics]: give the daemon's address with --url"
        )
    # The address the daemon logs ("metrics listening") ends in /metrics.
    url = (
        (url or f"http://{metrics.host}:{metrics.port}").removesuffix("/").removesuffix("/metrics")
    )
    stats = live_stats(url)
    if stats is None:
        raise DataCommandError(
            f"stats --instance: no daemon answers at {url}/metrics (is it running, with this "
            "[metrics] host and port? --url gives another address; without --instance: "
            "the database's totals)"
        )
    return stats
