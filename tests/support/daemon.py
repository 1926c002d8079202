"""Real processes for the tests: a Mosquitto broker, the daemon, a publisher.

Nothing here is a mock: the broker is the mosquitto binary on a free loopback
port, the daemon is `python -m ingestd` in a subprocess, and readiness comes
over a real NOTIFY_SOCKET.
"""

from __future__ import annotations

import concurrent.futures
import contextlib
import json
import os
import shutil
import signal
import socket
import sqlite3
import subprocess
import sys
import tempfile
import threading
import time
import urllib.error
import urllib.request
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import paho.mqtt.client as paho
from paho.mqtt.enums import CallbackAPIVersion

from tests.support.ports import free_port
from tests.support.waiting import wait_for

REPO = Path(__file__).resolve().parents[2]
SHIPPED_CONFIG = REPO / "config" / "ingestd.toml"


@dataclass
class Daemon:
    """`python -m ingestd` as a subprocess, with a NOTIFY_SOCKET to hear READY=1."""

    config: Path
    env: dict[str, str]
    workdir: Path
    proc: subprocess.Popen[bytes] | None = None
    notices: list[str] = field(default_factory=list)
    # (monotonic time, notice) for each field received, in order.
    timed_notices: list[tuple[float, str]] = field(default_factory=list)
    _sock: socket.socket | None = None
    _reader: threading.Thread | None = None
    log_path: Path = field(init=False)
    peak_rss_kb: int = 0
    _log_offset: int = 0  # where this run's lines begin in the log

    def __post_init__(self) -> None:
        self.log_path = self.workdir / "daemon.log"

    def start(self) -> Daemon:
        self._log_offset = self.log_path.stat().st_size if self.log_path.exists() else 0
        sock_path = self.workdir / f"notify-{time.monotonic_ns()}.sock"
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self._sock.bind(str(sock_path))
        self._sock.settimeout(0.2)
        self.notices = []
        self._reader = threading.Thread(target=self._listen, daemon=True)
        self._reader.start()
        env = {k: v for k, v in os.environ.items() if not k.startswith("INGESTD_")}
        env["INGESTD_METRICS__PORT"] = "0"  # a free port, read back with metrics_url()
        env.update(self.env)
        env["NOTIFY_SOCKET"] = str(sock_path)
        with self.log_path.open("ab") as fh:
            self.proc = subprocess.Popen(
                [sys.executable, "-m", "ingestd", "--config", str(self.config)],
                stdout=fh,
                stderr=subprocess.STDOUT,
                env=env,
                cwd=self.workdir,
            )
        return self

    def _listen(self) -> None:
        sock = self._sock
        while sock is not None and sock.fileno() >= 0:
            try:
                data = sock.recv(4096)
            except TimeoutError:
                continue
            except OSError:
                return
            fields = data.decode().split("\n")
            now = time.monotonic()
            self.timed_notices.extend((now, f) for f in fields)
            self.notices.extend(fields)

    def metrics_url(self, timeout: float = 20) -> str:
        """http://host:port of the daemon's metrics server, from its log."""
        found: list[str] = []

        def listening() -> bool:
            # This run's lines only: a daemon started again in the same
            # directory appends to the log a previous one wrote.
            with self.log_path.open("rb") as fh:
                fh.seek(self._log_offset)
                mine = fh.read().decode(errors="replace")
            for line in mine.splitlines():
                if '"metrics listening"' in line:
                    found.append(json.loads(line)["url"].removesuffix("/metrics"))
                    return True
            return False

        wait_for(listening, timeout, what="the metrics server")
        return found[0]

    def wait_ready(self, timeout: float = 20) -> None:
        def ready() -> bool:
            if self.proc is not None and self.proc.poll() is not None:
                code = self.proc.returncode
                raise AssertionError(f"daemon exited early ({code}):\n{self.logs()}")
            return "READY=1" in self.notices

        wait_for(ready, timeout, what="READY=1 from the daemon")

    def sample_rss(self) -> int:
        """The daemon's peak RSS so far (VmHWM), in kB."""
        if self.proc is None:
            return 0
        with contextlib.suppress(OSError):
            for line in Path(f"/proc/{self.proc.pid}/status").read_text().splitlines():
                if line.startswith("VmHWM:"):
                    self.peak_rss_kb = max(self.peak_rss_kb, int(line.split()[1]))
        return self.peak_rss_kb

    def signal(self, sig: int = signal.SIGTERM) -> None:
        assert self.proc is not None
        self.proc.send_signal(sig)

    def wait(self, timeout: float = 30) -> int:
        assert self.proc is not None
        try:
            return self.proc.wait(timeout)
        finally:
            self._close_socket()

    def stop(self, timeout: float = 30) -> int:
        """SIGTERM and wait; returns the exit status."""
        if self.proc is None or self.proc.poll() is not None:
            self._close_socket()
            return self.proc.returncode if self.proc else 0
        self.sample_rss()
        self.signal(signal.SIGTERM)
        return self.wait(timeout)

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()
        self._close_socket()

    def _close_socket(self) -> None:
        if self._sock is not None:
            self._sock.close()
            self._sock = None

    def logs(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""


def write_config(path: Path, routes: str | None = None, **sections: dict[str, object]) -> Path:
    """A TOML config: the given sections (plain key = value tables) and routes."""
    lines: list[str] = []
    for name, values in sections.items():
        lines.append(f"[{name.replace('__', '.')}]")
        for key, value in values.items():
            lines.append(f"{key} = {_toml(value)}")
        lines.append("")
    lines.append(routes if routes is not None else DEFAULT_ROUTES)
    path.write_text("\n".join(lines))
    return path


class DaemonFactory(Protocol):
    def __call__(
        self,
        port: int,
        routes: str | None = None,
        *,
        # str too: a `**env` dict of strings must type-check against these
        workdir: Path | str | None = None,
        config: Path | str | None = None,
        **env: str,
    ) -> Daemon: ...


def daemon_for(
    workdir: Path,
    port: int,
    routes: str | None = None,
    *,
    config: Path | str | None = None,
    **env: str,
) -> Daemon:
    """A daemon, not yet started, run in `workdir`: `config`, or a config
    written there with `routes` (the default two if None); its database
    `workdir/ingestd.db`, a client id of its own and JSON logs; `env` adds or
    overrides INGESTD_* variables. Tests get theirs from the `daemons` fixture,
    which kills every one it made at teardown."""
    workdir.mkdir(parents=True, exist_ok=True)
    config = Path(config) if config else write_config(workdir / "ingestd.toml", routes=routes)
    base = {
        "INGESTD_MQTT__PORT": str(port),
        "INGESTD_STORE__PATH": str(workdir / "ingestd.db"),
        "INGESTD_MQTT__CLIENT_ID": f"ingestd-{workdir.name}",
        "INGESTD_DAEMON__LOG_FORMAT": "json",
        **env,
    }
    return Daemon(config, base, workdir)


def http_get(url: str) -> tuple[int, str]:
    """(status, body) of a GET, error statuses included."""
    try:
        with urllib.request.urlopen(url, timeout=5) as resp:
            return resp.status, resp.read().decode()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode()


def metric_value(text: str, name: str, labels: str = "") -> float:
    """One sample's value from the Prometheus text format."""
    wanted = f"{name}{{{labels}}}" if labels else name
    for line in text.splitlines():
        if line.startswith("#"):
            continue
        key, _, value = line.rpartition(" ")
        if key == wanted:
            return float(value)
    raise AssertionError(f"{wanted} not in metrics:\n{text}")


def _toml(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str | Path):
        return '"' + str(value).replace("\\", "\\\\").replace('"', '\\"') + '"'
    return str(value)


DEFAULT_ROUTES = """
[[routes]]
topic = "sensors/{sensor}/telemetry"
format = "json"
qos = 1

[[routes]]
topic = "sensors/{sensor}/{metric}"
format = "value"
qos = 1
"""


def publish(
    port: int,
    messages: Iterable[tuple[str, bytes]],
    *,
    qos: int = 1,
    inflight: int = 1000,
    client_id: str = "",
    retain: bool = False,
) -> int:
    """Publish and wait until every message is acknowledged by the broker.

    The in-flight window stays well under 65,535 so message ids never collide.
    """
    client = paho.Client(CallbackAPIVersion.VERSION2, client_id=client_id, protocol=paho.MQTTv311)
    client.max_inflight_messages_set(inflight)
    client.max_queued_messages_set(0)
    client.connect("127.0.0.1", port)
    client.loop_start()
    try:
        infos = []
        count = 0
        for topic, payload in messages:
            infos.append(client.publish(topic, payload, qos=qos, retain=retain))
            count += 1
            if len(infos) >= 5000:
                for info in infos:
                    info.wait_for_publish(30)
                infos.clear()
        for info in infos:
            info.wait_for_publish(30)
        return count
    finally:
        client.disconnect()
        client.loop_stop()


class DbReader:
    """Read-only looks into the daemon's SQLite file (a separate connection)."""

    def __init__(self, path: Path) -> None:
        self.path = path

    @contextlib.contextmanager
    def connect(self) -> Iterator[sqlite3.Connection]:
        conn = sqlite3.connect(f"file:{self.path}?mode=ro", uri=True, timeout=5)
        try:
            yield conn
        finally:
            conn.close()

    def count(self, table: str = "readings") -> int:
        if not self.path.exists():
            return 0
        try:
            with self.connect() as c:
                return int(c.execute(f"SELECT count(*) FROM {table}").fetchone()[0])
        except sqlite3.OperationalError:
            return 0

    def rows(self, sql: str, *args: object) -> list[tuple[Any, ...]]:
        with self.connect() as c:
            return list(c.execute(sql, args).fetchall())


def hold_exclusive_lock(path: Path, seconds: float) -> threading.Thread:
    """Another writer holding an exclusive lock on the database for `seconds`."""
    locked = threading.Event()

    def run() -> None:
        conn = sqlite3.connect(path, isolation_level=None)
        conn.execute("BEGIN EXCLUSIVE")
        locked.set()
        time.sleep(seconds)
        conn.execute("ROLLBACK")
        conn.close()

    t = threading.Thread(target=run, daemon=True)
    t.start()
    locked.wait(5)
    return t


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

    def __init__(self, port: int | None = None, *, durable: bool = False) -> None:
        """`durable`: fsync as a production server does (the benchmark's);
        otherwise not, as tests need no crash safety from the disk."""
        self.port = port or free_port()
        self.dir = Path(tempfile.mkdtemp(prefix="ingestd-pg-"))
        self.data = self.dir / "data"
        self.log = self.dir / "postgres.log"
        self._as: list[str] = []
        if os.geteuid() == 0:
            self._as = ["runuser", "-u", "postgres", "--"]
            shutil.chown(self.dir, "postgres", "postgres")
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


@dataclass
class StoreUnderTest:
    """The engine a parametrized test runs against: what the daemon is told
    (`env`), and a reader of what it stored."""

    name: str
    env: dict[str, str]
    reader: DbReader | PgReader

    def hold_lock(self, seconds: float) -> threading.Thread:
        """Nothing commits for `seconds`: another writer holds the lock."""
        if isinstance(self.reader, PgReader):
            return self.reader.hold_lock(seconds)
        return hold_exclusive_lock(self.reader.path, seconds)
