"""PostgreSQL for the tests: a cluster of the test's own (initdb in a temporary
directory, a free loopback port; stop, kill -9, restart) and PgReader, which asks
a database what the daemon stored."""

from __future__ import annotations

import concurrent.futures
import contextlib
import os
import shutil
import signal
import subprocess
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from tests.support.ports import free_port
from tests.support.waiting import wait_for


def _pg_bin(name: str) -> str:
    found = sorted(Path("/usr/lib/postgresql").glob(f"*/bin/{name}"))
    if found:
        return str(found[-1])
    path = shutil.which(name)
    if path is None:
        raise RuntimeError(f"{name} not found (.ci/run installs Debian's postgresql package)")
    return path


class Postgres:
    """A PostgreSQL cluster of the test's own: initdb into a temporary directory,
    a free loopback port, trust authentication on loopback. PostgreSQL refuses
    to run as root: as root its binaries run as the `postgres` user."""

    def __init__(
        self, port: int | None = None, *, durable: bool = False, primary: Postgres | None = None
    ) -> None:
        """`durable`: fsync as a production server does (the benchmark's);
        otherwise not, as tests need no crash safety from the disk. `primary`:
        a copy of that running cluster (`standby()` makes one) instead of a
        new one."""
        self.port = port or free_port()
        self.dir = Path(tempfile.mkdtemp(prefix="ingestd-pg-"))
        self.data = self.dir / "data"
        self.log = self.dir / "postgres.log"
        self._as: list[str] = []
        if os.geteuid() == 0:
            self._as = ["runuser", "-u", "postgres", "--"]
            shutil.chown(self.dir, "postgres", "postgres")
        if primary is not None:
            self._copy(primary)
            return
        self._run(
            _pg_bin("initdb"), "-D", str(self.data), "-U", "postgres", "-A", "trust",
            "--no-sync", "-E", "UTF8", "--locale=C",
        )  # fmt: skip
        with (self.data / "postgresql.conf").open("a") as conf:
            conf.write(
                f"port = {self.port}\nlisten_addresses = '127.0.0.1'\n"
                f"unix_socket_directories = '{self.dir}'\nmax_connections = 100\n"
            )
            if not durable:
                conf.write("fsync = off\nsynchronous_commit = off\nfull_page_writes = off\n")

    def _copy(self, primary: Postgres) -> None:
        """A base backup of `primary` that streams from it once started (-R:
        standby.signal and primary_conninfo). Replication needs nothing more
        of a test cluster: initdb's pg_hba trusts replication on 127.0.0.1,
        and PostgreSQL 15's defaults are wal_level = replica, max_wal_senders = 10."""
        self._run(
            _pg_bin("pg_basebackup"), "-D", str(self.data), "-h", "127.0.0.1",
            "-p", str(primary.port), "-U", "postgres", "-X", "stream", "-R", "-c", "fast",
            "--no-sync",
        )  # fmt: skip
        with (self.data / "postgresql.conf").open("a") as conf:
            # The primary's port and socket directory came with the copy.
            conf.write(f"port = {self.port}\nunix_socket_directories = '{self.dir}'\n")

    def standby(self, *, synchronous: bool = True) -> Postgres:
        """A streaming standby of this running cluster, started and caught up.

        `synchronous`: this cluster's commits made with synchronous_commit = on
        (ingestd's sessions set it) return only once the standby has flushed
        them (synchronous_standby_names, set by ALTER SYSTEM here: the
        standby's copy does not carry it, so once promoted it waits for no one).
        """
        replica = Postgres(primary=self).start()
        try:
            wait_for(
                lambda: (
                    self.sql("SELECT count(*) FROM pg_stat_replication WHERE state = 'streaming'")
                    == [("1",)]
                ),
                30,
                what="the standby streaming",
            )
            if synchronous:
                self.sql("ALTER SYSTEM SET synchronous_standby_names = '*'")
                self.sql("SELECT pg_reload_conf()")
                wait_for(
                    lambda: self.sql("SELECT sync_state FROM pg_stat_replication") == [("sync",)],
                    30,
                    what="the standby synchronous",
                )
        except BaseException:
            replica.cleanup()
            raise
        return replica

    def promote(self) -> None:
        """A standby becomes a primary (pg_ctl promote; returns once it takes writes)."""
        self._run(_pg_bin("pg_ctl"), "-D", str(self.data), "-w", "promote")

    def _run(self, *args: str, check: bool = True) -> subprocess.CompletedProcess[bytes]:
        return subprocess.run([*self._as, *args], capture_output=True, check=check)

    def url(self, db: str = "postgres") -> str:
        return f"postgresql://postgres@127.0.0.1:{self.port}/{db}"

    def start(self) -> Postgres:
        self._run(_pg_bin("pg_ctl"), "-D", str(self.data), "-l", str(self.log), "-w", "start")
        return self

    def stop(self, mode: str = "fast") -> None:
        self._run(_pg_bin("pg_ctl"), "-D", str(self.data), "-m", mode, "-w", "stop", check=False)

    def kill(self) -> None:
        """kill -9 of the server, postmaster and backends at once, as a crash of
        the machine would (crash recovery replays the WAL at the next start)."""
        pid_file = self.data / "postmaster.pid"
        if pid_file.exists():
            pid = int(pid_file.read_text().split("\n", 1)[0])
            for victim in [pid, *_children(pid)]:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(victim, signal.SIGKILL)
            deadline = time.monotonic() + 10
            while time.monotonic() < deadline and (_alive(pid) or _children(pid)):
                time.sleep(0.05)

    def restart(self) -> None:
        self.stop()
        self.start()

    def sql(self, statement: str, db: str = "postgres") -> list[tuple[Any, ...]]:
        """One statement, its rows (through psql: no event loop needed)."""
        out = subprocess.run(
            ["psql", "-X", "-q", "-A", "-t", "-F", "\t", "-v", "ON_ERROR_STOP=1",
             "-h", "127.0.0.1", "-p", str(self.port), "-U", "postgres", "-d", db,
             "-c", statement],
            capture_output=True, check=True, text=True,
        )  # fmt: skip
        return [tuple(line.split("\t")) for line in out.stdout.splitlines() if line]

    def create_db(self, name: str) -> str:
        self.sql(f'CREATE DATABASE "{name}"')
        return self.url(name)

    def cleanup(self) -> None:
        self.stop("immediate")
        shutil.rmtree(self.dir, ignore_errors=True)


def _children(pid: int) -> list[int]:
    out = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError, ValueError, IndexError):
            if int(stat.read_text().rsplit(")", 1)[1].split()[1]) == pid:
                out.append(int(stat.parent.name))
    return out


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    return True


class PgReader:
    """DbReader's questions asked of a PostgreSQL database (asyncpg on a private
    loop, so the values come back typed as from SQLite)."""

    def __init__(self, url: str) -> None:
        self.url = url

    def _query(self, sql: str, *args: object) -> list[tuple[Any, ...]]:
        import asyncio

        import asyncpg

        async def run() -> list[tuple[Any, ...]]:
            conn = await asyncpg.connect(self.url, timeout=10)
            try:
                return [tuple(r) for r in await conn.fetch(sql, *args)]
            finally:
                await conn.close()

        # In a thread of its own: callers may be inside a running loop (async tests).
        with concurrent.futures.ThreadPoolExecutor(1) as pool:
            return pool.submit(lambda: asyncio.run(run())).result()

    def count(self, table: str = "readings") -> int:
        try:
            return int(self._query(f"SELECT count(*) FROM {table}")[0][0])
        except Exception:
            return 0

    def rows(self, sql: str, *args: object) -> list[tuple[Any, ...]]:
        return self._query(sql, *args)

    def hold_lock(self, seconds: float) -> threading.Thread:
        """Another session holding an exclusive lock on the samples for `seconds`
        (returns once the lock is held)."""
        import asyncio

        import asyncpg

        locked = threading.Event()

        async def hold() -> None:
            conn = await asyncpg.connect(self.url, timeout=10)
            try:
                async with conn.transaction():
                    await conn.execute("LOCK TABLE samples IN EXCLUSIVE MODE")
                    locked.set()
                    await asyncio.sleep(seconds)
            finally:
                await conn.close()

        t = threading.Thread(target=lambda: asyncio.run(hold()), daemon=True)
        t.start()
        if not locked.wait(10):
            raise AssertionError("could not lock the samples table")
        return t
