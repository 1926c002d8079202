"""The one exception hierarchy of ingestd.

Messages are for the operator: they say what is wrong, where (file, key, topic)
and, where it helps, what to do.
"""

from __future__ import annotations

import os

EX_CONFIG = os.EX_CONFIG if hasattr(os, "EX_CONFIG") else 78
EX_USAGE = os.EX_USAGE if hasattr(os, "EX_USAGE") else 64


class IngestdError(Exception):
    """Base class of every error ingestd raises on purpose."""


class ConfigError(IngestdError):
    """The configuration file or an environment override is invalid."""

    exit_code = EX_CONFIG


class RouteSpecError(IngestdError, ValueError):
    """A route's topic pattern or template is malformed (a ValueError, so the
    settings model reports it against the route's key)."""


class DecodeError(IngestdError):
    """A payload could not be turned into readings; the message is the reason."""


class StoreError(IngestdError):
    """The store failed in a way retrying will not fix."""


class StoreUnavailable(StoreError):
    """The store cannot take writes right now (locked, full, read-only, I/O error).

    The writer holds its batch and retries; nothing is acknowledged meanwhile.
    """

    def __init__(self, condition: str, detail: str) -> None:
        super().__init__(f"{condition}: {detail}")
        self.condition = condition


class NotPrimary(StoreError):
    """A commit of the primary's pipeline after another member took the role
    over (its epoch moved on): refused, so a deposed primary never overwrites
    what the new one wrote. Nothing of the batch is acknowledged."""


class DataCommandError(IngestdError):
    """A bad argument to a data command (`sensors`, `query`, `quarantine`,
    `stats`, `backup`), such as a time it cannot read; the CLI prints it and
    exits 1, as it does for a `StoreError` while reading."""


class StopTimeout(IngestdError):
    """The pipeline did not drain within daemon.stop_timeout."""
