"""Where readings are kept: one interface (`base`), one package per engine.

The daemon, maintenance and the CLI get their store from `open_store` and
`open_reader` and use only the interface; the settings pick the engine.
"""

from __future__ import annotations

from pathlib import Path

from ingestd.config import StoreSettings
from ingestd.diskguard import DiskGuard
from ingestd.rollups import RollupPlan
from ingestd.store.base import CONDITIONS, Batch, Reader, Store, Upkeep


def open_store(
    settings: StoreSettings, rollups: RollupPlan | None = None, *, tool: bool = False
) -> Store:
    """The daemon's store (not yet opened: `await store.open()`); `rollups`:
    what it keeps of them (Settings.rollup_plan()). `tool`: a command's, which
    reports a corrupt SQLite file rather than setting it aside (the daemon's)."""
    if settings.postgres:
        from ingestd.store.postgres import PostgresStore  # noqa: PLC0415 - optional

        return PostgresStore(
            settings.url,
            password=settings.password(),
            statement_timeout_ms=settings.statement_timeout_ms,
            partition_days=settings.partition_days,
            partitions_ahead=settings.partitions_ahead,
            partitions_behind=settings.partitions_behind,
            retention_days=settings.retention_days,
            rollups=rollups,
        )
    from ingestd.store.sqlite import SqliteStore  # noqa: PLC0415 - the engine chosen

    return SqliteStore(
        settings.path,
        synchronous=settings.synchronous,
        busy_timeout_ms=settings.busy_timeout_ms,
        rollups=rollups,
        check_seconds=settings.check_seconds,
        set_aside_corrupt=not tool,
        disk=DiskGuard(settings.path, settings.min_free_bytes),
    )


def with_db(settings: StoreSettings, db: str | None, *, reading: bool = True) -> StoreSettings:
    """The settings with `db` (`--db`: a SQLite file's path or a PostgreSQL
    URL) as the engine and place; unchanged for None."""
    if db is None:
        return settings
    if "://" in db:
        # Checked as store.url is (postgresql:// only, no password in it),
        # but for reading any target_session_attrs, a standby's too;
        # store.password_file still applies.
        return StoreSettings.model_validate(
            {**settings.model_dump(), "url": db}, context={"reading": reading}
        )
    return settings.model_copy(update={"url": "", "path": Path(db)})


def open_reader(settings: StoreSettings, db: str | None = None) -> Reader:
    """Read-only access for the CLI; `db` (`--db`: a SQLite file's path or a
    PostgreSQL URL) overrides the settings' engine and place."""
    settings = with_db(settings, db)
    if settings.postgres:
        from ingestd.store.postgres import PostgresReader  # noqa: PLC0415

        return PostgresReader(settings.url, settings.password())
    from ingestd.store.sqlite import SqliteReader  # noqa: PLC0415

    return SqliteReader(settings.path)


__all__ = [
    "CONDITIONS",
    "Batch",
    "Reader",
    "Store",
    "Upkeep",
    "open_reader",
    "open_store",
    "with_db",
]
