"""PostgreSQL's errors sorted into what waiting can cure and what it cannot.

`classify` turns a driver or server error into a StoreUnavailable with one
of the store's fixed conditions (`ingestd.store.base.CONDITIONS`) where
waiting cures it (the writer holds the batch and retries), None where it
does not; `kept` says whether the connection is still good after it.
"""

from __future__ import annotations

from urllib.parse import urlsplit, urlunsplit

import asyncpg

from ingestd.errors import StoreUnavailable
from ingestd.store import base

# SQLSTATE (or its class, two characters) -> condition: what waiting can cure.
_TRANSIENT = {
    "08": base.CONNECTION_LOST,  # connection exception
    "57P01": base.UNREACHABLE,  # admin shutdown
    "57P02": base.UNREACHABLE,  # crash shutdown
    "57P03": base.UNREACHABLE,  # cannot connect now (starting up, recovering)
    "57014": base.TIMEOUT,  # query canceled: statement_timeout
    "53100": base.DISK_FULL,
    "53200": base.NO_MEMORY,
    "53300": base.UNREACHABLE,  # too many connections
    "40001": base.LOCKED,  # serialization failure
    "40P01": base.LOCKED,  # deadlock detected
    "55P03": base.LOCKED,  # lock not available
    "25006": base.READ_ONLY,  # read-only transaction (a standby, default_transaction_read_only)
    "58030": base.IO_ERROR,
}


def redacted(url: str) -> str:
    """The URL without a password, for logs."""
    parts = urlsplit(url)
    if parts.password is None:
        return url
    netloc = parts.netloc.rpartition("@")
    user = netloc[0].split(":", 1)[0]
    return urlunsplit(parts._replace(netloc=f"{user}@{netloc[2]}"))


def classify(exc: BaseException) -> StoreUnavailable | None:
    """A StoreUnavailable for what waiting can cure, None for real errors."""
    if isinstance(exc, asyncpg.exceptions.ConnectionDoesNotExistError):
        return StoreUnavailable(base.CONNECTION_LOST, str(exc) or type(exc).__name__)
    if isinstance(exc, asyncpg.exceptions.InterfaceError) and any(
        # The connection died under an operation; it cannot be used again.
        sign in str(exc)
        for sign in ("closed", "another operation is in progress")
    ):
        return StoreUnavailable(base.CONNECTION_LOST, str(exc))
    if isinstance(exc, asyncpg.exceptions.TargetServerAttributeNotMatched):
        # Every host of store.url answered and none takes writes: a standby
        # not yet promoted, or default_transaction_read_only.
        return StoreUnavailable(base.READ_ONLY, str(exc))
    if isinstance(exc, asyncpg.exceptions.InternalClientError):
        # The protocol state after the server dropped the connection mid-query
        # ("cannot switch to state ..."): a new connection cures it.
        return StoreUnavailable(base.CONNECTION_LOST, str(exc))
    if isinstance(exc, OSError | TimeoutError | ConnectionError):
        return StoreUnavailable(base.UNREACHABLE, str(exc) or type(exc).__name__)
    state = getattr(exc, "sqlstate", None)
    if isinstance(state, str):
        condition = _TRANSIENT.get(state) or _TRANSIENT.get(state[:2])
        if condition:
            return StoreUnavailable(condition, str(exc))
    return None


def kept(exc: BaseException) -> bool:
    """Conditions after which the connection itself is still good."""
    state = getattr(exc, "sqlstate", "")
    return state in ("57014", "40001", "40P01", "55P03")
