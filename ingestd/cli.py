"""The command line: `ingestd [run]`, `check-config`, `simulate`."""

from __future__ import annotations

import argparse
import asyncio
import sys
from collections.abc import Coroutine, Sequence
from pathlib import Path
from typing import Any, TypeVar

from ingestd import __version__
from ingestd.config import ENV_CONFIG, effective_settings_json, load_settings
from ingestd.errors import EX_CONFIG, ConfigError

T = TypeVar("T")


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(
        prog="ingestd",
        description="Sensor telemetry ingestion daemon: MQTT in, SQLite batches out.",
    )
    p.add_argument("--version", action="version", version=f"ingestd {__version__}")
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--config", "-c", type=Path, default=None,
        help=f"TOML config file (default: ${ENV_CONFIG}, else built-in defaults)",
    )
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    sub.add_parser("run", parents=[common], help="run the daemon (the default command)")
    sub.add_parser("check-config", parents=[common],
                   help="validate the config and print the effective settings")
    sim = sub.add_parser("simulate", parents=[common],
                         help="publish sample sensor data to the configured broker")
    sim.add_argument("--sensors", type=int, default=8, help="number of sensors (default 8)")
    sim.add_argument("--interval", type=float, default=1.0,
                     help="seconds between readings of one sensor (default 1.0)")
    sim.add_argument("--rounds", type=int, default=0,
                     help="stop after this many rounds (default 0: run until interrupted)")
    sim.add_argument("--qos", type=int, choices=(0, 1, 2), default=1)
    p.add_argument("--config", "-c", type=Path, default=None, dest="top_config",
                   help=argparse.SUPPRESS)
    return p


def _run_async(coro: Coroutine[Any, Any, T]) -> T:
    try:
        import uvloop  # noqa: PLC0415 - optional accelerator
    except ImportError:  # pragma: no cover - uvloop is a dependency on Linux
        return asyncio.run(coro)
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        return runner.run(coro)


def main(argv: Sequence[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    command = args.command or "run"
    config_path: Path | None = getattr(args, "config", None) or args.top_config
    try:
        settings = load_settings(config_path)
    except ConfigError as exc:
        print(f"ingestd: {exc}", file=sys.stderr)
        return EX_CONFIG

    if command == "check-config":
        print(effective_settings_json(settings))
        print(f"ingestd: configuration OK ({config_path or 'defaults'})", file=sys.stderr)
        return 0

    from ingestd.observe.log import configure_logging  # noqa: PLC0415

    if command == "simulate":
        from ingestd.simulate import simulate  # noqa: PLC0415

        configure_logging("warning", "console", sys.stderr)
        try:
            _run_async(simulate(settings, sensors=args.sensors, interval=args.interval,
                                rounds=args.rounds, qos=args.qos))
        except KeyboardInterrupt:
            return 130
        return 0

    from ingestd.app import Daemon  # noqa: PLC0415

    configure_logging(settings.daemon.log_level, settings.daemon.log_format)

    async def _daemon() -> int:
        return await Daemon(settings).run()

    try:
        return _run_async(_daemon())
    except ConfigError as exc:
        print(f"ingestd: {exc}", file=sys.stderr)
        return EX_CONFIG
