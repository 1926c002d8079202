#!/usr/bin/env bash
# See ingestd work: set up (virtualenv, dependencies, Mosquitto if missing),
# start a private Mosquitto on a free local port, run the daemon with the
# shipped config and feed it with the built-in simulator. Ctrl-C stops all.
# The data stays in ./var/ingestd.db. Arguments go to the simulator, e.g.
# `scripts/quickstart.sh --format sparkplug` for Sparkplug B edge nodes.
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh

mkdir -p var/mosquitto
port=${QUICKSTART_PORT:-$(.venv/bin/python -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')}
mosquitto_bin=$(command -v mosquitto || echo /usr/sbin/mosquitto)
cat > var/mosquitto/mosquitto.conf <<CONF
listener $port 127.0.0.1
allow_anonymous true
persistence true
persistence_location $PWD/var/mosquitto/
max_inflight_messages 1000
max_queued_messages 0
user $(id -un)
CONF

pids=()
cleanup() {
  trap - EXIT INT TERM
  # On Ctrl-C the terminal has already sent SIGINT to the daemon and the
  # simulator (not the broker, in a session of its own): give them a moment to
  # stop cleanly (a second signal would force the daemon).
  if [ "${1:-}" = INT ]; then
    for _ in $(seq 50); do
      alive=0
      for pid in "${pids[@]:1}"; do kill -0 "$pid" 2>/dev/null && alive=1; done
      [ "$alive" = 0 ] && break
      sleep 0.2
    done
  fi
  # Daemon first (it drains and acknowledges), then simulator and broker.
  for pid in "${pids[2]}" "${pids[1]}" "${pids[0]}"; do
    kill -TERM "$pid" 2>/dev/null || true
    wait "$pid" 2>/dev/null || true
  done
  if [ -f var/ingestd.db ]; then
    .venv/bin/python - <<'PY'
import sqlite3
c = sqlite3.connect("var/ingestd.db")
n, = c.execute("SELECT count(*) FROM readings").fetchone()
print(f"\nquickstart: {n} readings stored in var/ingestd.db; for example:")
print('  sqlite3 var/ingestd.db "SELECT sensor, metric, datetime(ts, \'unixepoch\'), value'
      ' FROM readings ORDER BY ts DESC LIMIT 5"')
for row in c.execute("SELECT sensor, metric, datetime(ts, 'unixepoch'), value FROM readings"
                     " ORDER BY ts DESC LIMIT 5"):
    print("  ", *row)
PY
  fi
}
trap 'cleanup INT' INT
trap 'cleanup TERM' TERM
trap cleanup EXIT

# The broker in a session of its own: a terminal's Ctrl-C does not reach it, and
# cleanup stops it after the daemon has drained and had its acks confirmed.
setsid "$mosquitto_bin" -c var/mosquitto/mosquitto.conf >var/mosquitto/mosquitto.log 2>&1 &
pids+=($!)
export INGESTD_MQTT__PORT=$port INGESTD_MQTT__BROKER_MAX_INFLIGHT=1000
export INGESTD_STORE__PATH=$PWD/var/ingestd.db
echo "quickstart: broker on 127.0.0.1:$port, database var/ingestd.db; Ctrl-C to stop" >&2
.venv/bin/ingestd run --config config/ingestd.toml &
daemon=$!
pids+=($daemon)
# The simulator starts once the daemon is ready (subscribed): on a first run
# there is no session at the broker yet, and what it sent before would be lost.
.venv/bin/python - <<'PY' || true
import json, time, urllib.request
for _ in range(100):
    try:
        with urllib.request.urlopen("http://127.0.0.1:9799/readyz", timeout=1) as r:
            if json.load(r).get("broker"):
                break
    except OSError:
        pass
    time.sleep(0.1)
PY
.venv/bin/ingestd simulate --config config/ingestd.toml --sensors 8 --interval 1 "$@" &
pids+=($!)
wait "$daemon"
