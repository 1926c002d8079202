"""README's "Running it yourself", run exactly as written by an unprivileged
user in a fresh copy of the repository (its own virtualenv, from PyPI)."""

from __future__ import annotations

import os
import pwd
import re
import shutil
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.config import REPO
from tests.support.ports import free_port

USER = "ingestd-readme"


def readme_block(heading: str) -> str:
    text = (REPO / "README.md").read_text()
    section = text.split(f"## {heading}\n", 1)[1]
    match = re.search(r"```sh\n(.*?)```", section, re.S)
    assert match is not None, f"no sh block under {heading!r}"
    return match.group(1)


@pytest.fixture
def unprivileged() -> Iterator[str]:
    """A user with no privileges (created when the tests run as root)."""
    if os.geteuid() != 0:
        yield pwd.getpwuid(os.geteuid()).pw_name
        return
    useradd = shutil.which("useradd") or "/usr/sbin/useradd"
    created = subprocess.run(
        [useradd, "--system", "--shell", "/bin/bash", USER], capture_output=True, text=True
    )
    assert created.returncode in (0, 9), created.stderr  # 9: exists already
    try:
        yield USER
    finally:
        subprocess.run(["pkill", "-KILL", "-u", USER], capture_output=True)
        subprocess.run([shutil.which("userdel") or "/usr/sbin/userdel", USER], capture_output=True)


def _copy_checkout(dest: Path) -> None:
    listed = subprocess.run(["git", "ls-files", "-z"], cwd=REPO, capture_output=True)
    if listed.returncode == 0:
        for name in listed.stdout.decode().split("\0"):
            if name and (REPO / name).is_file():
                target = dest / name
                target.parent.mkdir(parents=True, exist_ok=True)
                shutil.copy2(REPO / name, target)
    else:
        shutil.copytree(
            REPO,
            dest,
            dirs_exist_ok=True,
            ignore=shutil.ignore_patterns(".venv", "var", ".git", "__pycache__"),
        )


@pytest.mark.slow
def test_running_it_yourself_works_as_written_for_a_normal_user(unprivileged: str) -> None:
    script = readme_block("Running it yourself")
    home = Path(tempfile.mkdtemp(prefix="ingestd-readme-", dir="/tmp"))
    try:
        checkout = home / "ingestd"
        _copy_checkout(checkout)
        if os.geteuid() == 0:
            home.chmod(0o755)
            subprocess.run(["chown", "-R", f"{unprivileged}:", str(home)], check=True)
        env = {
            "HOME": str(home),
            "PATH": "/usr/local/bin:/usr/bin:/bin",
            "LANG": "C.UTF-8",
            # A free port for the broker and the daemon alike (README's hint).
            "INGESTD_MQTT__PORT": str(free_port()),
        }
        command = ["bash", "-e", "-c", script]
        if os.geteuid() == 0:
            runuser = shutil.which("runuser") or "/usr/sbin/runuser"
            command = [
                runuser,
                "-u",
                unprivileged,
                "--",
                "env",
                "-i",
                *[f"{k}={v}" for k, v in env.items()],
                *command,
            ]
        proc = subprocess.run(
            command, cwd=checkout, capture_output=True, text=True, timeout=600, env=env
        )
        out = proc.stdout + proc.stderr
        assert proc.returncode == 0, out
        assert "configuration OK" in out
        assert "simulator: sent " in out
        assert "readings (1):" in out
        assert "kitchen temperature = 21.5" in out
        rows = [line for line in proc.stdout.splitlines() if line.startswith("kitchen ")]
        assert rows, out
        db = checkout / "var" / "ingestd.db"
        assert db.exists()
        assert db.stat().st_uid == pwd.getpwnam(unprivileged).pw_uid
        left = subprocess.run(
            ["pgrep", "-u", unprivileged, "-f", "ingestd|mosquitto"], capture_output=True, text=True
        )
        assert left.stdout == "", f"processes left running: {left.stdout}"
    finally:
        shutil.rmtree(home, ignore_errors=True)
