#!/usr/bin/env bash
# Install ingestd for production: a wheel built from this checkout, in a
# virtualenv of its own made with the system Python. No development tools,
# no checkout at run time; the systemd units run /opt/ingestd/bin/ingestd.
#   sudo scripts/install.sh               into /opt/ingestd
#   sudo scripts/install.sh --postgres    with asyncpg too (store.url)
#   scripts/install.sh --prefix DIR       somewhere else
# PYTHON=/path/to/python3.11+ picks the interpreter (default /usr/bin/python3).
# Run it again after a `git pull` to upgrade in place; restart the units then.
set -euo pipefail
cd "$(dirname "$0")/.."
umask 022  # the service's dynamic user must read what is installed

PYTHON=${PYTHON:-/usr/bin/python3}
prefix=/opt/ingestd
extras=""
say() { printf 'install: %s\n' "$*" >&2; }
while [ $# -gt 0 ]; do
  case "$1" in
    --prefix) prefix=${2:?--prefix needs a directory}; shift 2 ;;
    --postgres) extras="[postgres]"; shift ;;
    *) say "unknown argument $1 (--prefix DIR, --postgres)"; exit 2 ;;
  esac
done
case "$prefix" in /*) ;; *) prefix="$PWD/$prefix" ;; esac
if [ -e "$prefix" ] && [ ! -f "$prefix/pyvenv.cfg" ] && [ -n "$(ls -A "$prefix")" ]; then
  say "$prefix exists and is not a virtualenv (an earlier install from a checkout?):"
  say "move it away, or install elsewhere with --prefix DIR"
  exit 1
fi

if [ ! -x "$PYTHON" ]; then
  say "no $PYTHON: install Python 3.11 or newer (apt-get install python3), or set PYTHON=..."; exit 1
fi
if ! "$PYTHON" -c 'import sys; sys.exit(sys.version_info < (3, 11))'; then
  say "$("$PYTHON" --version 2>&1) is too old: ingestd needs Python 3.11 or newer (set PYTHON=...)"
  exit 1
fi
# The venv's python is a symlink to this interpreter: the hardened units
# (ProtectHome=yes, a dynamic user) cannot reach one under /root or /home,
# where pyenv and the like put theirs.
real=$("$PYTHON" -c 'import os, sys; print(os.path.realpath(sys.executable))')
case "$real" in
  /root/*|/home/*|/run/user/*)
    say "$PYTHON is $real, which the systemd units cannot reach (ProtectHome=yes):"
    say "use the system Python (apt-get install python3 python3-venv) or one under /usr or /opt"
    exit 1 ;;
esac
if ! "$PYTHON" -c 'import ensurepip, venv' >/dev/null 2>&1; then
  say "$PYTHON cannot make a virtualenv: apt-get install python3-venv"; exit 1
fi

work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT
log="$work/log"
run() { "$@" >>"$log" 2>&1 || { cat "$log" >&2; say "failed: $* (output above)"; exit 1; }; }

if [ ! -f "$prefix/pyvenv.cfg" ]; then
  say "creating a virtualenv in $prefix with $("$PYTHON" --version 2>&1) ($real)"
  run "$PYTHON" -m venv "$prefix"
fi
# Build from a copy: a build in the checkout would leave build/ and
# *.egg-info behind, owned by root.
mkdir "$work/src"
cp -r pyproject.toml README.md LICENSE ingestd "$work/src/"
find "$work/src" -name __pycache__ -prune -exec rm -rf {} +
say "building the wheel"
run "$prefix/bin/python" -m pip install --disable-pip-version-check -q --upgrade pip
run "$prefix/bin/python" -m pip wheel --disable-pip-version-check -q --no-deps \
  --wheel-dir "$work/wheel" "$work/src"
wheel=$(ls "$work"/wheel/ingestd-*.whl)
say "installing $(basename "$wheel")$extras into $prefix"
run "$prefix/bin/python" -m pip install --disable-pip-version-check -q "$wheel$extras"
# The same version again (an upgrade without a version bump): replace the code.
run "$prefix/bin/python" -m pip install --disable-pip-version-check -q \
  --force-reinstall --no-deps "$wheel"
# What a host without the checkout needs: the documented config, the units,
# and the README they point at.
mkdir -p "$prefix/share/ingestd/config"
cp README.md systemd/ingestd.service systemd/ingestd@.service "$prefix/share/ingestd/"
# What the daemon's messages and README point at (config/mosquitto.conf, the
# Grafana dashboards), beside the shipped config: no checkout needed.
cp -r config/ingestd.toml config/mosquitto.conf config/grafana "$prefix/share/ingestd/config/"
cp config/ingestd.toml "$prefix/share/ingestd/"
say "ready: $("$prefix/bin/ingestd" --version) in $prefix; config and units in $prefix/share/ingestd"
