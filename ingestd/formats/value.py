"""The value format: the payload is one number (`21.5`, or true/false as 1/0);
the topic names the sensor and the metric."""

from __future__ import annotations

import math
import re
from typing import TYPE_CHECKING

from ingestd.errors import DecodeError
from ingestd.events import Reading, Rejected
from ingestd.formats.base import Format

if TYPE_CHECKING:
    from ingestd.formats.base import DecodeContext, RouteMatch

_NUMBER = re.compile(rb"^\s*[-+]?(\d+\.?\d*|\.\d+)([eE][-+]?\d+)?\s*$")


def decode_value(payload: bytes) -> float:
    """A plain number (`21.5`), or `true`/`false` as 1/0."""
    text = payload.strip()
    if text in (b"true", b"false"):
        return 1.0 if text == b"true" else 0.0
    if not _NUMBER.match(text):
        shown = payload[:32].decode("utf-8", "backslashreplace")
        raise DecodeError(f"payload is not a number: {shown!r}")
    value = float(text)
    if not math.isfinite(value):
        raise DecodeError("value is not a finite number")
    return value


def decode(
    ctx: DecodeContext,
    match: RouteMatch,
    topic: str,
    payload: bytes,
    received_ns: int,
    readings: list[Reading],
    rejected: list[Rejected],
) -> None:
    if not match.metric_prefix:
        raise DecodeError("topic gives an empty metric name")
    value = decode_value(payload)
    readings.append(
        Reading(match.sensor, match.metric_prefix, received_ns, value, topic, match.tags)
    )


FORMAT = Format(
    name="value",
    summary="a plain number (or true/false)",
    decode=decode,
    metric_from="topic",
    default_metric="{metric}",
)
