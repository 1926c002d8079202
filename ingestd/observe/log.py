"""structlog configuration, in one place.

JSON lines when the output is not a terminal (journald, files, pipes), a
readable console rendering when it is, with device text escaped
(`ingestd.printable`). The level can be changed at run time
(loggers are not cached), which a reload relies on.
"""

from __future__ import annotations

import logging
import sys
from typing import Any, Literal, TextIO

import structlog

from ingestd.printable import printable

_LEVELS = {
    "debug": logging.DEBUG,
    "info": logging.INFO,
    "warning": logging.WARNING,
    "error": logging.ERROR,
}


def configure_logging(
    level: str = "info",
    fmt: Literal["auto", "json", "console"] = "auto",
    stream: TextIO | None = None,
) -> None:
    out = stream if stream is not None else sys.stdout
    as_json = fmt == "json" or (fmt == "auto" and not _isatty(out))
    stamp: list[Any] = [
        structlog.processors.add_log_level,
        structlog.processors.TimeStamper(fmt="iso", utc=True),
    ]
    render: list[Any]
    if as_json:
        render = [
            structlog.processors.dict_tracebacks,
            structlog.processors.EventRenamer("msg"),
            # ASCII only: a control or format character in device text is
            # written as a JSON escape, so the line stays one safe line and the
            # text stays exact.
            structlog.processors.JSONRenderer(default=str, ensure_ascii=True),
        ]
    else:
        render = [_printable_strings, structlog.dev.ConsoleRenderer(colors=_isatty(out))]
    structlog.configure(
        processors=[structlog.contextvars.merge_contextvars, *stamp, *render],
        wrapper_class=structlog.make_filtering_bound_logger(_LEVELS[level]),
        logger_factory=structlog.PrintLoggerFactory(out),
        cache_logger_on_first_use=False,
    )
    # Libraries that log through the standard library (aiomqtt, paho, asyncio's
    # "exception was never retrieved" with its traceback) render through the
    # same chain: one JSON object per line, a traceback included, never loose
    # text lines in a JSON log.
    handler = logging.StreamHandler(out)
    handler.setFormatter(
        structlog.stdlib.ProcessorFormatter(
            foreign_pre_chain=[structlog.stdlib.add_logger_name, *stamp],
            processors=[structlog.stdlib.ProcessorFormatter.remove_processors_meta, *render],
        )
    )
    root = logging.getLogger()
    root.handlers = [handler]
    root.setLevel(logging.WARNING)


# Rendered by the console renderer itself, from the exception: not device text,
# and their line breaks are meant.
_KEPT_AS_IS = frozenset({"exception", "exc_info", "stack"})


def _printable_strings(_logger: Any, _method: str, event: dict[str, Any]) -> dict[str, Any]:
    """Console lines are read by people: every text value (and the message,
    which for a library's log record may quote a topic) is escaped, so device
    text can neither move the cursor nor reorder the line. Other values are
    shown with repr(), which escapes them already."""
    for key, value in event.items():
        if isinstance(value, str) and key not in _KEPT_AS_IS:
            event[key] = printable(value)
    return event


def _isatty(stream: TextIO) -> bool:
    try:
        return stream.isatty()
    except (AttributeError, ValueError):
        return False
