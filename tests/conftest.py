from __future__ import annotations

import itertools
import os
import shutil
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest

from ingestd.store.base import Store
from ingestd.store.postgres import PostgresStore
from ingestd.store.sqlite import SqliteStore
from tests.support.brokers import BrokerFactory, Mosquitto
from tests.support.daemon import DaemonFactory, DaemonProcess, daemon_for
from tests.support.db import DbReader, StoreUnderTest
from tests.support.postgres import PgReader, Postgres

_db_numbers = itertools.count()


@pytest.fixture
def mosquitto(tmp_path: Path) -> Iterator[Mosquitto]:
    """A fresh Mosquitto on a free loopback port, stopped after the test."""
    if shutil.which("mosquitto") is None and not Path("/usr/sbin/mosquitto").exists():
        pytest.fail("mosquitto is not installed (.ci/run installs it with apt-get)")
    broker = Mosquitto(tmp_path / "broker").start()
    try:
        yield broker
    finally:
        broker.kill()


@pytest.fixture
def daemons(tmp_path: Path, request: pytest.FixtureRequest) -> Iterator[DaemonFactory]:
    """Makes `python -m ingestd` subprocesses (`tests.support.daemon.daemon_for`, in
    `tmp_path` unless `workdir` says otherwise), not yet started; every daemon
    it made is killed at teardown, whatever the test did or failed to do. In a
    test that takes the `store` fixture, they write to that store."""
    made: list[DaemonProcess] = []
    engine: dict[str, str] = {}
    if "store" in request.fixturenames:
        engine = request.getfixturevalue("store").env

    def make(
        port: int,
        routes: str | None = None,
        *,
        workdir: Path | str | None = None,
        config: Path | str | None = None,
        **env: str,
    ) -> DaemonProcess:
        where = Path(workdir) if workdir else tmp_path
        daemon = daemon_for(where, port, routes, config=config, **{**engine, **env})
        made.append(daemon)
        return daemon

    yield make
    for daemon in made:
        daemon.kill()


@pytest.fixture
def brokers() -> Iterator[BrokerFactory]:
    """Makes extra Mosquittos (same arguments as `tests.support.daemon.Mosquitto`), not
    yet started; every one it made is killed at teardown."""
    made: list[Mosquitto] = []

    def make(*args: Any, **kwargs: Any) -> Mosquitto:
        broker = Mosquitto(*args, **kwargs)
        made.append(broker)
        return broker

    yield make
    for broker in made:
        broker.kill()


@pytest.fixture
def own_pg() -> Iterator[Postgres]:
    """A PostgreSQL cluster of the test's own, for tests that stop, kill or
    restart it (the session's, `pg_cluster`, is shared)."""
    cluster = Postgres().start()
    try:
        yield cluster
    finally:
        cluster.cleanup()


@pytest.fixture(scope="session")
def pg_cluster() -> Iterator[Postgres]:
    """One PostgreSQL cluster for the session's tests that only need a database
    (each gets its own, `pg_url`); tests that stop or kill PostgreSQL start a
    `Postgres` of their own."""
    cluster = Postgres().start()
    try:
        yield cluster
    finally:
        cluster.cleanup()


@pytest.fixture
def pg_url(pg_cluster: Postgres, request: pytest.FixtureRequest) -> str:
    """A fresh database on the session's cluster, for this test alone."""
    name = "t_" + "".join(c if c.isalnum() else "_" for c in request.node.name)[:50].lower()
    name += f"_{os.getpid()}_{next(_db_numbers)}"
    return pg_cluster.create_db(name)


@pytest.fixture(params=["sqlite", "postgres"])
def store(request: pytest.FixtureRequest, tmp_path: Path) -> StoreUnderTest:
    """Each engine in turn: the test's daemons (from `daemons`) write to it and
    `store.reader` reads what they stored."""
    if request.param == "sqlite":
        return StoreUnderTest("sqlite", {}, DbReader(tmp_path / "ingestd.db"))
    url = request.getfixturevalue("pg_url")
    return StoreUnderTest("postgres", {"INGESTD_STORE__URL": url}, PgReader(url))


@pytest.fixture(params=["sqlite", "postgres"])
def new_store(request: pytest.FixtureRequest, tmp_path: Path) -> Callable[[], Store]:
    """Each engine in turn: a function that makes a store object (not yet
    opened) on one database, the same each call, for tests of the store itself."""
    if request.param == "sqlite":
        return lambda: SqliteStore(tmp_path / "x.db")
    url = request.getfixturevalue("pg_url")
    return lambda: PostgresStore(url)
