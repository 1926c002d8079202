#!/usr/bin/env bash
# Run the tests against real Mosquitto and SQLite (sets up first).
#   scripts/test.sh          the quick run (skips tests marked slow)
#   scripts/test.sh --all    everything, fault injection included (what CI runs)
# Other arguments go to pytest, e.g. scripts/test.sh tests/unit -x
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
args=()
if [ "${1:-}" = "--all" ]; then
  shift
  args+=(-m "slow or not slow")
fi
exec .venv/bin/python -m pytest "${args[@]}" "$@"
