"""scripts/install.sh, the production install: a wheel built from the checkout,
in a virtualenv of the system Python, without development tools, that runs
from anywhere and that README's `pip install 'ingestd[postgres]'` extends."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from ingestd import __version__
from tests.support.config import REPO

SYSTEM_PYTHON = Path("/usr/bin/python3")
DEV_TOOLS = ("pytest", "mypy", "ruff", "hypothesis", "py-spy", "pytest-asyncio", "pytest-timeout")


def _env() -> dict[str, str]:
    # The tests run with PYTHONPATH at the checkout: the installed ingestd
    # must run without it.
    return {k: v for k, v in os.environ.items() if k not in ("PYTHONPATH", "VIRTUAL_ENV")}


def _install(prefix: Path, *args: str, **env: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        ["bash", str(REPO / "scripts" / "install.sh"), "--prefix", str(prefix), *args],
        capture_output=True,
        text=True,
        timeout=240,
        env=_env() | env,
    )


def _run(cwd: Path, *cmd: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, capture_output=True, text=True, timeout=120, env=_env(), cwd=cwd)


def _system_python_usable() -> bool:
    if not SYSTEM_PYTHON.exists():
        return False
    probe = "import sys, ensurepip, venv; sys.exit(sys.version_info < (3, 11))"
    return subprocess.run([str(SYSTEM_PYTHON), "-c", probe], capture_output=True).returncode == 0


@pytest.mark.skipif(
    not _system_python_usable(),
    reason="needs /usr/bin/python3 3.11+ with venv (apt-get install python3 python3-venv)",
)
def test_install_builds_a_wheel_into_a_venv_of_the_system_python(tmp_path: Path) -> None:
    prefix = tmp_path / "opt" / "ingestd"
    done = _install(prefix)
    assert done.returncode == 0, done.stderr
    assert f"install: ready: ingestd {__version__} in {prefix}" in done.stderr

    version = _run(tmp_path, str(prefix / "bin" / "ingestd"), "--version")
    assert version.stdout.strip() == f"ingestd {__version__}", version
    # The interpreter is the system one, reachable by the hardened unit.
    assert (prefix / "bin" / "python").resolve().is_relative_to("/usr")
    # A wheel, not the checkout: the code is in the venv's site-packages.
    where = _run(
        tmp_path, str(prefix / "bin" / "python"), "-c", "import ingestd; print(ingestd.__file__)"
    )
    assert Path(where.stdout.strip()).is_relative_to(prefix), where
    installed = _run(
        tmp_path, str(prefix / "bin" / "python"), "-m", "pip", "list", "--format=freeze"
    )
    names = {line.split("==")[0].lower() for line in installed.stdout.splitlines()}
    assert "ingestd" in names
    assert names.isdisjoint(DEV_TOOLS), names & set(DEV_TOOLS)
    assert "asyncpg" not in names

    # The entry point, from outside the checkout, on the shipped config.
    shipped = prefix / "share" / "ingestd" / "ingestd.toml"
    check = _run(
        tmp_path, str(prefix / "bin" / "ingestd"), "check-config", "--config", str(shipped)
    )
    assert check.returncode == 0, check.stderr
    # The units run what was installed (with the default prefix).
    for unit in ("ingestd.service", "ingestd@.service"):
        text = (prefix / "share" / "ingestd" / unit).read_text()
        assert "\nExecStart=/opt/ingestd/bin/ingestd run " in text, unit

    # README: `sudo /opt/ingestd/bin/pip install 'ingestd[postgres]'`, as written.
    extra = _run(tmp_path, str(prefix / "bin" / "pip"), "install", "-q", "ingestd[postgres]")
    assert extra.returncode == 0, extra.stderr
    imported = _run(
        tmp_path,
        str(prefix / "bin" / "python"),
        "-c",
        "import asyncpg, ingestd; print(ingestd.__file__)",
    )
    assert Path(imported.stdout.strip()).is_relative_to(prefix), imported


def test_install_refuses_an_interpreter_the_unit_cannot_reach(tmp_path: Path) -> None:
    real = Path(sys.executable).resolve()
    if not any(real.is_relative_to(p) for p in ("/root", "/home")):
        pytest.skip(f"the tests' interpreter {real} is not under /root or /home")
    done = _install(tmp_path / "ingestd", PYTHON=sys.executable)
    assert done.returncode == 1
    assert f"{real}, which the systemd units cannot reach (ProtectHome=yes)" in done.stderr
    assert not (tmp_path / "ingestd").exists()


def test_install_leaves_a_directory_that_is_not_a_venv_alone(tmp_path: Path) -> None:
    old = tmp_path / "ingestd"  # an earlier install from a checkout, say
    (old / ".git").mkdir(parents=True)
    done = _install(old, PYTHON=str(SYSTEM_PYTHON) if SYSTEM_PYTHON.exists() else sys.executable)
    assert done.returncode == 1, done.stderr
    assert "exists and is not a virtualenv" in done.stderr
    assert sorted(p.name for p in old.iterdir()) == [".git"]
