"""A private Mosquitto for a test (the mosquitto binary on a free loopback port, with
persistence) and the type of the `brokers` fixture that makes more of them."""

from __future__ import annotations

import getpass
import shutil
import subprocess
from collections.abc import Callable
from pathlib import Path

from tests.support.ports import free_port, port_open
from tests.support.waiting import wait_for


class Mosquitto:
    """A private broker: start, stop (SIGTERM, saves persistence), kill -9, restart."""

    def __init__(
        self, workdir: Path, port: int | None = None, *, max_inflight: int = 20, extra: str = ""
    ) -> None:
        self.binary = shutil.which("mosquitto") or "/usr/sbin/mosquitto"
        self.dir = workdir
        self.dir.mkdir(parents=True, exist_ok=True)
        self.port = port or free_port()
        self.conf = self.dir / "mosquitto.conf"
        self.log = self.dir / "mosquitto.log"
        self.conf.write_text(
            f"listener {self.port} 127.0.0.1\n"
            "allow_anonymous true\n"
            "persistence true\n"
            f"persistence_location {self.dir}/\n"
            "autosave_interval 1\n"
            f"max_inflight_messages {max_inflight}\n"
            "max_queued_messages 0\n"
            f"user {getpass.getuser()}\n"
            f"{extra}\n"
        )
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> Mosquitto:
        assert self.proc is None or self.proc.poll() is not None
        with self.log.open("ab") as fh:
            self.proc = subprocess.Popen(
                [self.binary, "-c", str(self.conf)], stdout=fh, stderr=subprocess.STDOUT
            )
        wait_for(lambda: port_open(self.port), 10, what=f"mosquitto on port {self.port}")
        return self

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()

    def kill(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait()

    def restart(self) -> None:
        self.stop()
        self.start()

    def wait_saved(self, timeout: float = 15) -> None:
        """Until the broker has begun writing its persistence file after this call.

        A kill -9 loses whatever the broker received after its last save (its
        autosave runs every second or two): before killing it on purpose, a
        test must know the messages it counts on are on disk.
        """
        mark = "Saving in-memory database"
        before = self.log.read_text(errors="replace").count(mark)
        wait_for(
            lambda: self.log.read_text(errors="replace").count(mark) > before,
            timeout,
            what="the broker to save its persistence file",
        )


BrokerFactory = Callable[..., "Mosquitto"]
