"""The daemon inside the test's own event loop: the same `Daemon` that
`python -m ingestd` runs, without the process around it (no signals, no
NOTIFY_SOCKET, no interpreter start-up: about a second less per daemon).

For tests of what the daemon does with messages. Signals, kill -9, restarts
and anything about the process itself need the subprocess (`daemons`).
Blocking helpers (publishing with paho, waiting on the database) must run off
the loop: `await asyncio.to_thread(publish, ...)`, `await until(...)`.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from pathlib import Path
from types import TracebackType
from typing import Any

from ingestd.app import Daemon
from ingestd.config import Settings
from ingestd.observe.health import Accounting
from tests.support.config import DEFAULT_ROUTES


def settings_for(
    workdir: Path, port: int, routes: str | None = None, **sections: dict[str, Any]
) -> Settings:
    """What `daemon_for` configures, as settings: its own database and client id,
    the metrics server on a free port; `sections` override whole sections' keys."""
    import tomllib

    data: dict[str, Any] = tomllib.loads(routes if routes is not None else DEFAULT_ROUTES)
    data["mqtt"] = {
        "port": port,
        "client_id": f"ingestd-{workdir.name}",
        **sections.pop("mqtt", {}),
    }
    data["store"] = {"path": workdir / "ingestd.db", **sections.pop("store", {})}
    data["metrics"] = {"port": 0, **sections.pop("metrics", {})}
    data.update(sections)
    return Settings(**data)


class InProcess:
    """`async with InProcess(settings) as d:` runs the daemon until the block ends,
    then stops it as SIGTERM would and keeps its exit status in `d.status`."""

    def __init__(self, settings: Settings) -> None:
        self.daemon = Daemon(settings, handle_signals=False)
        self.status: int | None = None
        self._task: asyncio.Task[int] | None = None

    async def __aenter__(self) -> InProcess:
        self._task = asyncio.create_task(self.daemon.run(), name="daemon")
        ready = asyncio.create_task(self.daemon.ready.wait())
        await asyncio.wait({self._task, ready}, timeout=30, return_when=asyncio.FIRST_COMPLETED)
        if not self.daemon.ready.is_set():
            ready.cancel()
            await self.stop()
            raise AssertionError(f"the daemon did not become ready (status {self.status})")
        return self

    async def stop(self) -> int:
        assert self._task is not None
        self.daemon.request_stop()  # as SIGTERM does
        self.status = await asyncio.wait_for(self._task, 30)
        return self.status

    def accounting(self) -> Accounting:
        """The accounting identity's terms, as /metrics would show them now."""
        pipeline = self.daemon.metrics.health.pipeline
        assert pipeline is not None
        return Accounting.of(pipeline)

    async def __aexit__(
        self, kind: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        if self._task is not None and not self._task.done():
            await self.stop()


async def until(check: Callable[[], bool], seconds: float, what: str) -> None:
    """`wait_for` for async tests: poll `check` (in a thread) without blocking the loop."""
    timeout = seconds
    deadline = time.monotonic() + timeout
    while not await asyncio.to_thread(check):
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout} s waiting for {what}")
        await asyncio.sleep(0.05)
