from __future__ import annotations

import shutil
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from tests.helpers import BrokerFactory, Daemon, DaemonFactory, Mosquitto, daemon_for


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
def daemons(tmp_path: Path) -> Iterator[DaemonFactory]:
    """Makes `python -m ingestd` subprocesses (`tests.helpers.daemon_for`, in
    `tmp_path` unless `workdir` says otherwise), not yet started; every daemon
    it made is killed at teardown, whatever the test did or failed to do."""
    made: list[Daemon] = []

    def make(
        port: int,
        routes: str | None = None,
        *,
        workdir: Path | str | None = None,
        config: Path | str | None = None,
        **env: str,
    ) -> Daemon:
        where = Path(workdir) if workdir else tmp_path
        daemon = daemon_for(where, port, routes, config=config, **env)
        made.append(daemon)
        return daemon

    yield make
    for daemon in made:
        daemon.kill()


@pytest.fixture
def brokers() -> Iterator[BrokerFactory]:
    """Makes extra Mosquittos (same arguments as `tests.helpers.Mosquitto`), not
    yet started; every one it made is killed at teardown."""
    made: list[Mosquitto] = []

    def make(*args: Any, **kwargs: Any) -> Mosquitto:
        broker = Mosquitto(*args, **kwargs)
        made.append(broker)
        return broker

    yield make
    for broker in made:
        broker.kill()
