"""What rollups cost and what they buy (issue 25, "Speed and size").

    .venv/bin/python -m bench.rollups ingest --rounds 3   # rollups on vs off, both engines
    .venv/bin/python -m bench.rollups year                # a year of 1 Hz, hourly query
    .venv/bin/python -m bench.rollups size                # bytes on disk, both engines
    .venv/bin/python -m bench.rollups all                 # the three, about 25 minutes

ingest: the scenarios of `bench.bench` (a preloaded backlog, QoS 1
acknowledged after commit, one object per message or JSON arrays of 25
records = 50 readings per message) run with rollups off, on (the default:
1m and 1h), and on with `humidity` a counter, interleaved round by round;
the table gives each one's median and its ratio to rollups off in the same
run (the ratio of the medians, and the range of the per-round ratios).
"""

from __future__ import annotations

import argparse
import re
import statistics
import sys
import time
from pathlib import Path

from bench import bench
from bench.bench import Result, Scenario
from bench.pyspy import summarize

OFF = (("INGESTD_ROLLUPS__ENABLED", "false"),)
ON = (("INGESTD_ROLLUPS__ENABLED", "true"),)
COUNTER = (*ON, ("INGESTD_PROCESSOR__KINDS", '{"humidity": "counter"}'))
VARIANTS = (("off", OFF), ("on", ON), ("on, humidity a counter", COUNTER))
FAST = (("INGESTD_MQTT__BROKER_MAX_INFLIGHT", "1000"),)


def ingest_scenarios(engines: list[str]) -> list[tuple[str, str, str, Scenario]]:
    """(engine, payload, variant, scenario) for every combination."""
    out = []
    for engine in engines:
        for payload, messages, batch in (
            ("JSON, 1 object", None, 0),
            ("JSON arrays of 25", 20_000, 25),
        ):
            for variant, env in VARIANTS:
                name = f"{engine}, {payload}, rollups {variant}"
                sc = Scenario(
                    name,
                    "ingestd",
                    1,
                    1000,
                    (*FAST, *env),
                    messages=messages,
                    batch=batch,
                    store=engine,
                )
                out.append((engine, payload, variant, sc))
    return out


def ingest(
    rounds: int, messages: int, engines: list[str], only: str = "", profile: Path | None = None
) -> str:
    chosen = [c for c in ingest_scenarios(engines) if only.lower() in c[3].name.lower()]
    results: dict[str, list[Result]] = {sc.name: [] for *_, sc in chosen}
    started = time.monotonic()
    for rnd in range(rounds):
        for *_, sc in chosen:
            prof = None
            if profile:
                profile.mkdir(parents=True, exist_ok=True)
                slug = re.sub(r"[^a-z0-9]+", "-", sc.name.lower()).strip("-")
                prof = profile / f"{slug}-{rnd + 1}.txt"
            r = bench.run_one(sc, messages, prof)
            results[sc.name].append(r)
            print(
                f"round {rnd + 1}: {sc.name}: {r.rate:,.0f} readings/s, cpu {r.cpu:.2f}s, "
                f"db cpu {r.db_cpu:.2f}s, lost {r.lost}",
                file=sys.stderr,
                flush=True,
            )
            if prof and prof.exists():
                print(summarize(prof, 25), file=sys.stderr, flush=True)
    lines = [
        f"{rounds} interleaved round(s), {time.monotonic() - started:.0f} s; QoS 1 acknowledged "
        f"after commit, broker in-flight 1000; {messages:,} messages of one object (2 readings) "
        "or 20,000 of 25 (50 readings).",
        "",
        "| engine | payload | rollups | readings/s (median) | min-max | vs off (median) "
        "| per-round ratios | daemon CPU s | DB CPU s | lost |",
        "|---|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for engine, payload, variant, sc in chosen:
        rs = results[sc.name]
        base = results.get(f"{engine}, {payload}, rollups off", rs)
        rates = [r.rate for r in rs]
        per_round = [a.rate / b.rate for a, b in zip(rs, base, strict=True)]
        ratio = statistics.median(rates) / statistics.median([b.rate for b in base])
        lines.append(
            f"| {engine} | {payload} | {variant} | {statistics.median(rates):,.0f} | "
            f"{min(rates):,.0f}-{max(rates):,.0f} | {ratio:.2f}x | "
            f"{min(per_round):.2f}-{max(per_round):.2f} | "
            f"{statistics.median([r.cpu for r in rs]):.2f} | "
            f"{statistics.median([r.db_cpu for r in rs]):.2f} | "
            f"{max(r.lost for r in rs)} |"
        )
    return "\n".join(lines) + "\n"


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("what", choices=("ingest", "year", "size", "all"))
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--messages", type=int, default=100_000, help="ingest: one-object messages")
    p.add_argument("--engines", default="sqlite,postgres")
    p.add_argument("--only", default="", help="ingest: the scenarios whose name contains this")
    p.add_argument("--profile", type=Path, default=None, metavar="DIR", help="ingest: py-spy")
    a = p.parse_args()
    engines = [e.strip() for e in a.engines.split(",") if e.strip()]
    out: list[str] = []
    try:
        if a.what in ("ingest", "all"):
            out.append(ingest(a.rounds, a.messages, engines, a.only, a.profile))
    finally:
        bench.stop_postgres()
    print("\n".join(out))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
