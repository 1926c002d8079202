#!/usr/bin/env bash
# Run the whole test suite against real Mosquitto and SQLite (sets up first).
# Extra arguments go to pytest, e.g. scripts/test.sh -m "not slow" -x
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
exec .venv/bin/python -m pytest "$@"
