"""The PostgreSQL backend (asyncpg): one database shared by many instances."""

from __future__ import annotations

from ingestd.store.postgres.queries import PostgresReader
from ingestd.store.postgres.schema import MIGRATIONS, SCHEMA_VERSION
from ingestd.store.postgres.store import PostgresStore

__all__ = ["MIGRATIONS", "SCHEMA_VERSION", "PostgresReader", "PostgresStore"]
