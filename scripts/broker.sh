#!/usr/bin/env bash
# A Mosquitto for ingestd, run as you, with the settings ingestd needs
# (config/mosquitto.conf: a 1000-message in-flight window, no queue limit,
# persistence) on 127.0.0.1, port $INGESTD_MQTT__PORT or 1883.
#   scripts/broker.sh          start it in the background (data in var/mosquitto)
#   scripts/broker.sh stop     stop it
# If something already listens on the port, it leaves it alone and warns what
# it cannot check about it (its queue and in-flight limits, persistence):
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
  # Not ours: say loudly what cannot be checked from outside, and what can.
  say "WARNING: a broker this script did not start already listens on 127.0.0.1:$port."
  say "It leaves that broker alone and CANNOT CHECK its settings; left at Mosquitto's defaults,"
  say "it LOSES messages for ingestd:"
  say "  max_queued_messages    the default 1000 drops, for good, the rest of a burst ingestd"
  say "                         falls behind (or that arrives while it restarts)"
  say "  max_inflight_messages  must match ingestd's mqtt.broker_max_inflight (default 20)"
  say "  persistence            off: a broker restart loses ingestd's session and its queue"
  if command -v mosquitto_sub >/dev/null 2>&1; then
    sub() { mosquitto_sub -h 127.0.0.1 -p "$port" -C 1 -W 2 "$@" 2>/dev/null || true; }
    version=$(sub -t '$SYS/broker/version')
    if [ -z "$version" ]; then
      say "It did not answer an anonymous subscribe to \$SYS/broker/version: not even what it is"
      say "could be read."
    else
      say "It says it is: $version."
      # Retained only while it changed in the last minute (Mosquitto 2.x).
      dropped=$(sub --retained-only -t '$SYS/broker/publish/messages/dropped')
      if [ -n "$dropped" ] && [ "$dropped" != 0 ]; then
        say "It has DROPPED $dropped messages since it started (\$SYS/broker/publish/messages/dropped)."
      fi
    fi
  fi
  say "Give it the settings in config/mosquitto.conf (README, Broker settings), or run one"
  say "from this script on another port: INGESTD_MQTT__PORT=18830 $0 (and the same in front"
  say "of each ingestd command). ingestd logs the broker's drops it sees."
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
