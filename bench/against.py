"""bench.fleet's scenarios, this tree against an earlier commit's, the two
alternating in one run: a speed-up measured against its baseline on the same
machine at the same time (this machine's speed drifts by a third from one day
to the next, so a figure from another day says little).

    .venv/bin/python -m bench.against 53e9ff7 --fix 6cbf528 --only SenML --rounds 6

53e9ff7 is the code as it was when the fleet-scale issue was filed (it added
bench/fleet.py and nothing else). The commit is checked out in a temporary
git worktree, removed afterwards; its own bench.fleet drives its own daemon
(so it must have bench/fleet.py), with this venv's libraries. `--fix C`
applies commit C's changes to it first, a bench fix it lacks; C may touch
bench/ only, so the daemon stays as it was. 53e9ff7 needs 6cbf528: its
device times start at the top of the hour and run 500 s past it, so in an
hour's first minutes they were more than 300 s ahead of the clock, were
quarantined as from the future, and the run never ended. Round i runs
the earlier tree first when i is odd, this one first when even. Prints each
run's readings/s and ingestd's CPU a message, the medians, and the median of
the rounds' ratios (this tree / the earlier one).
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def run(tree: Path, only: str, messages: int | None) -> list[tuple[str, float, float]]:
    """One round of bench.fleet in `tree`: (scenario, readings/s, CPU us a
    message) of each ingestd row of its table."""
    argv = [sys.executable, "-m", "bench.fleet", "--only", only, "--rounds", "1"]
    if messages:
        argv += ["--messages", str(messages)]
    env = {**os.environ, "PYTHONPATH": str(tree)}
    done = subprocess.run(argv, cwd=tree, env=env, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        raise SystemExit(f"bench.against: bench.fleet in {tree} failed:\n{done.stderr[-2000:]}")
    rows = []
    for line in done.stdout.splitlines():
        cells = [c.strip() for c in line.strip().strip("|").split("|")]
        if len(cells) >= 5 and cells[0].startswith("ingestd"):
            rows.append((cells[0], float(cells[2].replace(",", "")), float(cells[4])))
    if not rows:
        raise SystemExit(f"bench.against: no ingestd scenario matched {only!r} in {tree}")
    return rows


def git(*args: str) -> str:
    return subprocess.run(
        ["git", "-C", str(ROOT), *args], capture_output=True, text=True, check=True
    ).stdout


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("commit", help="the earlier commit (it must have bench/fleet.py)")
    p.add_argument("--only", default="SenML", help="bench.fleet scenarios ('|'-separated)")
    p.add_argument("--rounds", type=int, default=6)
    p.add_argument("--messages", type=int, help="bench.fleet's --messages (default its own)")
    p.add_argument(
        "--fix", action="append", default=[], help="a commit of bench/ changes to apply first"
    )
    a = p.parse_args()
    head = git("rev-parse", "--short", "HEAD").strip()
    with tempfile.TemporaryDirectory(prefix="ingestd-against-") as tmp:
        old = Path(tmp) / "tree"
        subprocess.run(
            ["git", "-C", str(ROOT), "worktree", "add", "--detach", "-q", str(old), a.commit],
            check=True,
        )
        try:
            if not (old / "bench" / "fleet.py").exists():
                raise SystemExit(f"bench.against: {a.commit} has no bench/fleet.py")
            for fix in a.fix:
                touched = git("diff-tree", "--no-commit-id", "--name-only", "-r", fix).split()
                if not touched or any(not f.startswith("bench/") for f in touched):
                    raise SystemExit(f"bench.against: --fix {fix} touches more than bench/")
                subprocess.run(
                    ["git", "-C", str(old), "cherry-pick", "-n", fix],
                    stdout=subprocess.DEVNULL,  # "Auto-merging ...": not part of the table
                    check=True,
                )
            results: dict[str, dict[str, list[float]]] = {}
            print("| round | tree | scenario | readings/s | CPU us/message |")
            print("|---:|---|---|---:|---:|")
            for i in range(1, a.rounds + 1):
                order = [(a.commit, old), (head, ROOT)]
                for name, tree in order if i % 2 else order[::-1]:
                    for scenario, rate, cpu in run(tree, a.only, a.messages):
                        got = results.setdefault(scenario, {})
                        got.setdefault(name, []).append(rate)
                        got.setdefault(f"{name} cpu", []).append(cpu)
                        row = f"| {i} | {name} | {scenario} | {rate:,.0f} | {cpu:.1f} |"
                        print(row, flush=True)
        finally:
            subprocess.run(
                ["git", "-C", str(ROOT), "worktree", "remove", "--force", str(old)], check=False
            )
    print()
    for scenario, got in results.items():
        new, base = got[head], got[a.commit]
        ratios = [n / b for n, b in zip(new, base, strict=True)]
        print(
            f"{scenario}, medians of {len(new)} rounds: {head} {statistics.median(new):,.0f} "
            f"readings/s, {a.commit} {statistics.median(base):,.0f} "
            f"({statistics.median(new) / statistics.median(base):.2f}x; the rounds' ratios "
            f"{min(ratios):.2f}-{max(ratios):.2f}x, median {statistics.median(ratios):.2f}x). "
            f"CPU a message {statistics.median(got[f'{head} cpu']):.1f} us against "
            f"{statistics.median(got[f'{a.commit} cpu']):.1f}."
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
