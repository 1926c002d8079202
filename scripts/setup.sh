#!/usr/bin/env bash
# Prepare this checkout to run ingestd and its tests; safe to run again.
#   - Mosquitto (and python3-venv) from apt-get when missing (Debian/Ubuntu)
#   - a virtualenv in .venv with ingestd and its development tools
# PYTHON=/path/to/python3.11+ picks the interpreter (default: python3).
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
say() { printf 'setup: %s\n' "$*" >&2; }

if ! command -v "$PYTHON" >/dev/null 2>&1; then
  say "no $PYTHON found: install Python 3.11 or newer (apt-get install python3)"; exit 1
fi
if ! "$PYTHON" -c 'import sys; sys.exit(sys.version_info < (3, 11))'; then
  say "$("$PYTHON" --version 2>&1) is too old: ingestd needs Python 3.11 or newer (set PYTHON=...)"
  exit 1
fi

packages=()
if ! command -v mosquitto >/dev/null 2>&1 && [ ! -x /usr/sbin/mosquitto ]; then
  packages+=(mosquitto)
fi
if ! command -v mosquitto_pub >/dev/null 2>&1; then
  packages+=(mosquitto-clients)  # the benchmark preloads with mosquitto_pub
fi
if [ ! -x .venv/bin/python ] && ! "$PYTHON" -c 'import ensurepip, venv' >/dev/null 2>&1; then
  packages+=(python3-venv)
fi
if [ ${#packages[@]} -gt 0 ]; then
  if ! command -v apt-get >/dev/null 2>&1; then
    say "missing ${packages[*]} and no apt-get here: install them with your package manager"; exit 1
  fi
  sudo=""
  if [ "$(id -u)" -ne 0 ]; then sudo="sudo"; fi
  say "installing ${packages[*]} with apt-get"
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends "${packages[@]}"
fi

if [ ! -x .venv/bin/python ]; then
  say "creating .venv with $("$PYTHON" --version 2>&1)"
  "$PYTHON" -m venv .venv
fi
# Reinstall only when the dependencies changed (pyproject.toml is the stamp).
stamp=.venv/.ingestd-installed
want=$(cksum < pyproject.toml)
if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ]; then
  say "installing ingestd and its dependencies into .venv"
  log=$(mktemp)
  if ! { .venv/bin/python -m pip install --disable-pip-version-check --upgrade pip \
         && .venv/bin/python -m pip install --disable-pip-version-check -e '.[dev]'; } >"$log" 2>&1; then
    cat "$log" >&2; rm -f "$log"; say "pip install failed (output above)"; exit 1
  fi
  rm -f "$log"
  echo "$want" > "$stamp"
fi
# `mosquitto -h` exits 3 after printing its version: under pipefail an `||`
# fallback would run too and print it twice. Pick the binary, then ask once.
mosquitto_bin=$(command -v mosquitto || echo /usr/sbin/mosquitto)
mosquitto_version=$({ "$mosquitto_bin" -h 2>/dev/null || true; } | head -1)
say "ready: $(.venv/bin/ingestd --version), ${mosquitto_version:-mosquitto (version unknown)}"
