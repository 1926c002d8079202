"""scripts/setup.sh's last line names ingestd's and Mosquitto's versions, once
each (`mosquitto -h` exits 3 after printing its version, which under pipefail
ran an `||` fallback that printed it again); scripts/test.sh shows progress."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

from tests.support.config import REPO


@pytest.mark.skipif(
    shutil.which("mosquitto") is None or shutil.which("mosquitto_pub") is None,
    reason="needs mosquitto and mosquitto_pub installed (else setup.sh runs apt-get)",
)
def test_setup_prints_mosquittos_version_once(tmp_path: Path) -> None:
    # A checkout whose .venv is already set up (stamp current): setup.sh only checks.
    (tmp_path / "scripts").mkdir()
    shutil.copy(REPO / "scripts" / "setup.sh", tmp_path / "scripts" / "setup.sh")
    shutil.copy(REPO / "pyproject.toml", tmp_path / "pyproject.toml")
    venv_bin = tmp_path / ".venv" / "bin"
    venv_bin.mkdir(parents=True)
    for name, body in (("python", "exit 0"), ("ingestd", "echo 'ingestd 0.0.test'")):
        (venv_bin / name).write_text(f"#!/bin/sh\n{body}\n")
        (venv_bin / name).chmod(0o755)
    stamp = subprocess.run(
        ["cksum"], stdin=(tmp_path / "pyproject.toml").open("rb"), capture_output=True, check=True
    ).stdout.decode()
    (tmp_path / ".venv" / ".ingestd-installed").write_text(stamp)
    done = subprocess.run(
        ["bash", str(tmp_path / "scripts" / "setup.sh")], capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 0, done.stderr
    assert done.stderr.count("mosquitto version") == 1, done.stderr
    ready = done.stderr.strip().splitlines()[-1]
    assert ready.startswith("setup: ready: ingestd 0.0.test, mosquitto version "), ready


@pytest.mark.skipif(
    not list(Path("/usr/lib/postgresql").glob("*/bin/initdb")) or shutil.which("psql") is None,
    reason="needs PostgreSQL's binaries installed (else test.sh runs apt-get)",
)
@pytest.mark.parametrize(
    ("args", "extra"), [((), ()), (("--all", "-x"), ("-m", "slow or not slow", "-x"))]
)
def test_the_test_run_shows_progress(
    tmp_path: Path, args: tuple[str, ...], extra: tuple[str, ...]
) -> None:
    """scripts/test.sh (and so .ci/run) names each test as it starts: a fault
    test runs for minutes, and a run of dots sat silent through them."""
    (tmp_path / "scripts").mkdir()
    shutil.copy(REPO / "scripts" / "test.sh", tmp_path / "scripts" / "test.sh")
    venv_bin = tmp_path / ".venv" / "bin"
    venv_bin.mkdir(parents=True)
    for path, body in (
        (tmp_path / "scripts" / "setup.sh", "exit 0"),
        (venv_bin / "python", 'printf "%s\\n" "$@"'),  # the arguments pytest would get
    ):
        path.write_text(f"#!/bin/sh\n{body}\n")
        path.chmod(0o755)
    done = subprocess.run(
        ["bash", str(tmp_path / "scripts" / "test.sh"), *args],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.splitlines() == ["-m", "pytest", "-v", "--durations=10", *extra]
    ci = (REPO / ".ci" / "run").read_text()
    assert "\nscripts/test.sh --all " in ci  # CI runs it, so CI shows progress too
