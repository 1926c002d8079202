"""Sampling profiles of the daemon during a benchmark run, with py-spy.

    .venv/bin/python -m bench.bench --rounds 1 --only "batch" --profile /tmp/prof
    .venv/bin/python -m bench.pyspy /tmp/prof/*.txt      # summarize again

py-spy (`pip install py-spy`) attaches to the running daemon by pid, samples
every thread's Python stack, and on SIGINT writes them as collapsed stacks
("frame;frame;frame count" lines). The summary lists where the samples were,
per function, by self time (the frame on top) and by total time (anywhere on
the stack), as shares of the event-loop thread and of all samples.
"""

from __future__ import annotations

import argparse
import re
import shutil
import signal
import subprocess
import sys
from collections import Counter
from pathlib import Path

_FRAME = re.compile(r"^(?P<func>.*?) \((?P<file>[^()]*?)(?::\d+)?\)$")


class Profiler:
    """py-spy recording one process until stop()."""

    def __init__(self, pid: int, out: Path, rate: int = 250) -> None:
        beside = Path(sys.executable).parent / "py-spy"
        exe = str(beside) if beside.exists() else shutil.which("py-spy")
        if exe is None:
            raise SystemExit("bench: --profile needs py-spy (pip install py-spy)")
        self.out = out
        self._proc = subprocess.Popen(
            [
                exe,
                "record",
                "--pid",
                str(pid),
                "--rate",
                str(rate),
                "--threads",
                "--nonblocking",
                "--format",
                "raw",
                "--output",
                str(out),
            ],
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )

    def stop(self) -> None:
        self._proc.send_signal(signal.SIGINT)
        try:
            self._proc.wait(30)
        except subprocess.TimeoutExpired:
            self._proc.kill()


def _short(frame: str) -> str:
    m = _FRAME.match(frame.strip())
    if not m:
        return frame.strip()
    path = m["file"]
    for marker in ("site-packages/", "/ingestd/", "/lib/python3"):
        if marker in path:
            path = path.split(marker, 1)[1]
            break
    return f"{m['func']} ({path})"


def summarize(path: Path, top: int = 15) -> str:
    self_time: Counter[str] = Counter()
    total_time: Counter[str] = Counter()
    threads: Counter[str] = Counter()
    samples = 0
    for line in path.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        n = int(count)
        frames = stack.split(";")
        thread = frames[0] if frames[0].startswith(("thread", "process")) else ""
        body = [_short(f) for f in frames if not f.startswith(("thread", "process"))]
        if not body:
            continue
        samples += n
        threads[thread] += n
        self_time[body[-1]] += n
        for f in set(body):
            total_time[f] += n
    if not samples:
        return f"{path.name}: no samples"
    shares = ", ".join(f"{t or '?'} {n / samples:.0%}" for t, n in threads.most_common())
    lines = [f"{path.name}: {samples:,} samples", f"threads: {shares}"]
    lines.append(f"{'self':>6} {'total':>6}  function")
    for func, n in self_time.most_common(top):
        lines.append(f"{n / samples:6.1%} {total_time[func] / samples:6.1%}  {func}")
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("files", nargs="+", type=Path)
    p.add_argument("--top", type=int, default=15)
    a = p.parse_args()
    for f in a.files:
        print(summarize(f, a.top), end="\n\n")


if __name__ == "__main__":
    main()
