#!/usr/bin/env bash
# A Mosquitto for ingestd, run as you, with the settings ingestd needs
# (config/mosquitto.conf: a 1000-message in-flight window, no queue limit,
# persistence) on 127.0.0.1, port $INGESTD_MQTT__PORT or 1883.
#   scripts/broker.sh          start it in the background (data in var/mosquitto)
#   scripts/broker.sh stop     stop it
# If something already listens on the port, it says so and leaves it alone:
# apply config/mosquitto.conf to that broker (see README, "Broker settings").
set -euo pipefail
cd "$(dirname "$0")/.."
port=${INGESTD_MQTT__PORT:-1883}
dir=$PWD/var/mosquitto
pidfile=$dir/mosquitto.pid
say() { printf 'broker: %s\n' "$*" >&2; }

running() { [ -f "$pidfile" ] && kill -0 "$(cat "$pidfile")" 2>/dev/null; }
listening() { (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; }

if [ "${1:-start}" = stop ]; then
  if running; then
    pid=$(cat "$pidfile")
    kill -TERM "$pid"
    for _ in $(seq 50); do kill -0 "$pid" 2>/dev/null || break; sleep 0.1; done
    say "stopped (pid $pid)"
  else
    say "not running"
  fi
  rm -f "$pidfile"
  exit 0
fi

if running; then
  say "already running (pid $(cat "$pidfile")) on 127.0.0.1:$port"
  exit 0
fi
if listening; then
  say "something already listens on 127.0.0.1:$port: using it. Give it the settings in"
  say "config/mosquitto.conf, or pick another port: INGESTD_MQTT__PORT=18830 $0"
  exit 0
fi
bin=$(command -v mosquitto || echo /usr/sbin/mosquitto)
[ -x "$bin" ] || { say "mosquitto is not installed: run scripts/setup.sh"; exit 1; }
mkdir -p "$dir"
# The shipped settings, with this user's paths and port.
{
  echo "listener $port 127.0.0.1"
  echo "allow_anonymous true"
  echo "user $(id -un)"
  grep -v -e '^#' -e '^$' config/mosquitto.conf
  echo "persistence true"
  echo "persistence_location $dir/"
} > "$dir/mosquitto.conf"
"$bin" -c "$dir/mosquitto.conf" >"$dir/mosquitto.log" 2>&1 &
echo $! > "$pidfile"
for _ in $(seq 50); do
  listening && { say "running on 127.0.0.1:$port (pid $(cat "$pidfile")), log $dir/mosquitto.log"; exit 0; }
  kill -0 "$(cat "$pidfile")" 2>/dev/null || break
  sleep 0.1
done
say "mosquitto did not start; its log:"; cat "$dir/mosquitto.log" >&2; rm -f "$pidfile"; exit 1
