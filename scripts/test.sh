#!/usr/bin/env bash
# Run the tests against real Mosquitto, SQLite and PostgreSQL (sets up first;
# installs Debian's postgresql package when its binaries are missing: the
# PostgreSQL tests start clusters of their own from them).
#   scripts/test.sh          the quick run (skips tests marked slow)
#   scripts/test.sh --all    everything, fault injection included (what CI runs)
# Other arguments go to pytest, e.g. scripts/test.sh tests/unit -x -q
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
if ! ls /usr/lib/postgresql/*/bin/initdb >/dev/null 2>&1 || ! command -v psql >/dev/null; then
  if ! command -v apt-get >/dev/null 2>&1; then
    echo "test: PostgreSQL's binaries (initdb, pg_ctl, psql) are missing and there is no apt-get" >&2
    exit 1
  fi
  echo "test: installing postgresql with apt-get" >&2
  sudo=""; [ "$(id -u)" -ne 0 ] && sudo="sudo"
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq --no-install-recommends postgresql
fi
# A line per test, named as it starts (a fault test runs for minutes: the
# run is never silent), and the slowest ten at the end; -q after it quietens.
args=(-v --durations=10)
if [ "${1:-}" = "--all" ]; then
  shift
  args+=(-m "slow or not slow")
fi
exec .venv/bin/python -m pytest "${args[@]}" "$@"
