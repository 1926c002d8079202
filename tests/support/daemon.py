"""The daemon as the e2e tests run it: `python -m ingestd` in a subprocess of its
own directory, its readiness heard over a real NOTIFY_SOCKET, its log and peak
RSS at hand; `daemon_for` configures one, `DaemonFactory` is the `daemons`
fixture's type. Nothing here is a mock.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Protocol

from tests.support.config import write_config
from tests.support.waiting import wait_for


@dataclass
class DaemonProcess:
    """`python -m ingestd` as a subprocess (the process around `ingestd.app.Daemon`),
    with a NOTIFY_SOCKET to hear READY=1."""

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

    def start(self) -> DaemonProcess:
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
    ) -> DaemonProcess: ...


def daemon_for(
    workdir: Path,
    port: int,
    routes: str | None = None,
    *,
    config: Path | str | None = None,
    **env: str,
) -> DaemonProcess:
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
    return DaemonProcess(config, base, workdir)
