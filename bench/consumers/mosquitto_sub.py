"""The limit reference: `mosquitto_sub` (C, libmosquitto), receive only.

Runs `mosquitto_sub -c -C <expect>` on the consumer's persistent session and
times it from start to exit (it exits after the last message); its output
goes to /dev/null. CPU seconds and peak RSS from wait4(). Prints one JSON
line: {"count", "first", "last", "cpu", "rss_kb"}.
"""

from __future__ import annotations

import os
import subprocess
import time

from bench.consumers import arguments, report


def main(port: int, expect: int, qos: int, client_id: str) -> None:
    first = time.time()
    proc = subprocess.Popen(
        [
            *("mosquitto_sub", "-h", "127.0.0.1", "-p", str(port), "-i", client_id, "-c"),
            *("-q", str(qos), "-t", "sensors/+/+", "-C", str(expect)),
        ],
        stdout=subprocess.DEVNULL,
    )
    _, status, usage = os.wait4(proc.pid, 0)
    last = time.time()
    if os.waitstatus_to_exitcode(status) != 0:
        raise SystemExit(f"mosquitto_sub exited with {os.waitstatus_to_exitcode(status)}")
    report(expect, first, last, usage.ru_utime + usage.ru_stime, usage.ru_maxrss)


if __name__ == "__main__":
    a = arguments()
    main(a.port, a.expect, a.qos, a.client_id)
