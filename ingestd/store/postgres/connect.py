"""Connections that write, to whichever of store.url's hosts takes writes now.

A store.url may name several hosts, a primary and its standbys
(`postgresql://user@db1:5432,db2:5432/ingest`). asyncpg tries them in order
and takes the first that satisfies `target_session_attrs`; with `read-write`
that is the one that accepts writes, so after a failover it is the promoted
standby. A writer has no use for a server that refuses writes, so ingestd
asks for `read-write` when the URL does not name an attribute (config.py
refuses any but `read-write` and `primary`); asyncpg's own default, `any`,
would take a standby that answers first. PGTARGETSESSIONATTRS is therefore
not consulted for these connections.
"""

from __future__ import annotations

from typing import Any
from urllib.parse import parse_qs, urlsplit

import asyncpg

WRITABLE = "read-write"
CONNECT_TIMEOUT = 10.0  # seconds, for all the URL's hosts together

# Which server a connection is on: its address for the logs, and the
# postmaster's start time, which tells a promoted standby (or a restarted
# server) from the one the store last read its state from.
_SERVER = (
    "SELECT coalesce(host(inet_server_addr()) || ':' || inet_server_port(), 'local socket'), "
    "pg_postmaster_start_time()"
)


def session_attrs(url: str) -> str:
    """The target_session_attrs a writing connection asks for."""
    named = parse_qs(urlsplit(url).query).get("target_session_attrs")
    return named[-1] if named else WRITABLE


async def connect_writable(
    url: str, *, password: str | None, server_settings: dict[str, str]
) -> Any:
    """A connection to the first of the URL's hosts that takes writes.

    CONNECT_TIMEOUT covers all the hosts together. None taking writes while one
    answers raises asyncpg's TargetServerAttributeNotMatched; none answering,
    the last host's error."""
    return await asyncpg.connect(
        url,
        password=password,
        timeout=CONNECT_TIMEOUT,
        server_settings=server_settings,
        target_session_attrs=session_attrs(url),
    )


async def server_of(conn: Any) -> tuple[str, object]:
    """(host:port, the postmaster's start time) of the server `conn` is on."""
    row = await conn.fetchrow(_SERVER)
    return str(row[0]), row[1]
