"""The command line: `ingestd [run]`, `check-config`, `simulate`, and the
operator's tools: `sensors`, `query`, `quarantine` (and `quarantine replay`),
`stats`, `backup`, `import`, `rollups rebuild`, `forget-session`."""

from __future__ import annotations

import argparse
import asyncio
import os
import sqlite3
import sys
import time
from collections.abc import Coroutine, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, TypeVar

from ingestd import DESCRIPTION, __version__
from ingestd.config import ENV_CONFIG, Settings, effective_settings_json, load_settings
from ingestd.errors import EX_CONFIG, EX_USAGE, ConfigError
from ingestd.tools import recover

if TYPE_CHECKING:
    from ingestd.store import Reader

T = TypeVar("T")
# Commands that read the database and need no [[routes]].
DATA_COMMANDS = ("sensors", "query", "quarantine", "stats", "backup")
# Commands that need no [[routes]] either.
NO_ROUTES = (*DATA_COMMANDS, "forget-session", "import", "rollups")


_TOPIC_HELP = "show which route this topic matches and what it yields"


class _Commands(Protocol):
    """What the command builders use of `ArgumentParser.add_subparsers()`."""

    def add_parser(
        self, name: str, *, parents: Sequence[argparse.ArgumentParser], help: str
    ) -> argparse.ArgumentParser: ...


def _parser() -> tuple[argparse.ArgumentParser, dict[str, argparse.ArgumentParser]]:
    p = argparse.ArgumentParser(
        prog="ingestd",
        description=DESCRIPTION,
    )
    p.add_argument("--version", action="version", version=f"ingestd {__version__}")
    common = _config_option()
    sub = p.add_subparsers(dest="command", metavar="COMMAND")
    sub.add_parser("run", parents=[common], help="run the daemon (the default command)")
    sample = _sample_message_options()
    _check_config_command(sub, common, sample)
    _explain_command(sub, common, sample)
    _simulate_command(sub, common)
    data = _database_option(common)
    output = _output_format_option()
    _sensors_command(sub, data, output)
    _query_command(sub, data, output)
    recover.add_commands(sub, data, _quarantine_command(sub, data, output))
    _stats_command(sub, data)
    _backup_command(sub, data)
    sub.add_parser(
        "forget-session",
        parents=[common],
        help="remove the broker's persistent session of mqtt.client_id (after a trial, "
        "or for an instance that is gone; stop the daemon first)",
    )

    # `ingestd -c FILE [COMMAND]`: the config given before the command (or with none).
    p.add_argument(
        "--config", "-c", type=Path, default=None, dest="top_config", help=argparse.SUPPRESS
    )
    return p, dict(sub.choices)


# Options shared by several commands (argparse parents).


def _config_option() -> argparse.ArgumentParser:
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--config",
        "-c",
        type=Path,
        default=None,
        help=f"TOML config file (default: ${ENV_CONFIG}, else built-in defaults)",
    )
    return common


def _sample_message_options() -> argparse.ArgumentParser:
    payload = argparse.ArgumentParser(add_help=False)
    payload.add_argument(
        "--payload",
        "-p",
        default=None,
        help="a sample payload for --topic (text; \\n for new lines)",
    )
    payload.add_argument(
        "--payload-file",
        type=Path,
        default=None,
        help="read the sample payload from this file (bytes as they are)",
    )
    payload.add_argument(
        "--after",
        action="append",
        default=[],
        metavar="TOPIC=FILE",
        help="decode this message first (repeatable), for formats whose meaning "
        "depends on earlier messages: a Sparkplug BIRTH, a Homie $description",
    )
    return payload


def _database_option(common: argparse.ArgumentParser) -> argparse.ArgumentParser:
    data = argparse.ArgumentParser(add_help=False, parents=[common])
    data.add_argument(
        "--db",
        default=None,
        metavar="PATH|URL",
        help="the database: a SQLite file or a postgresql:// URL "
        "(default: store.url or store.path from the config)",
    )
    return data


def _output_format_option() -> argparse.ArgumentParser:
    fmt = argparse.ArgumentParser(add_help=False)
    fmt.add_argument(
        "--format",
        "-f",
        choices=("table", "csv", "json"),
        default="table",
        help="output: an aligned table (default), CSV, or a JSON array",
    )
    return fmt


# One builder per command: its name, its help line and its own options.


def _check_config_command(
    sub: _Commands, common: argparse.ArgumentParser, sample: argparse.ArgumentParser
) -> None:
    check = sub.add_parser(
        "check-config",
        parents=[common, sample],
        help="validate the config and print the effective settings "
        "(with --topic: explain a sample message instead)",
    )
    check.add_argument("--topic", "-t", default=None, help=_TOPIC_HELP)


def _explain_command(
    sub: _Commands, common: argparse.ArgumentParser, sample: argparse.ArgumentParser
) -> None:
    ex = sub.add_parser(
        "explain",
        parents=[common, sample],
        help="which route a topic matches, and the readings a payload yields",
    )
    ex.add_argument("--topic", "-t", required=True, help=_TOPIC_HELP)


def _simulate_command(sub: _Commands, common: argparse.ArgumentParser) -> None:
    sim = sub.add_parser(
        "simulate", parents=[common], help="publish sample sensor data to the configured broker"
    )
    sim.add_argument("--sensors", type=int, default=8, help="number of sensors (default 8)")
    sim.add_argument(
        "--interval",
        type=float,
        default=1.0,
        help="seconds between readings of one sensor (default 1.0)",
    )
    sim.add_argument(
        "--rounds",
        type=int,
        default=0,
        help="stop after this many rounds (default 0: run until interrupted)",
    )
    sim.add_argument(
        "--format",
        choices=("json", "sparkplug"),
        default="json",
        help="json: sensors/<sensor>/telemetry objects (default); sparkplug: each "
        "sensor a Sparkplug B edge node (spBv1.0/ingestd-sim/...)",
    )
    sim.add_argument(
        "--qos",
        type=int,
        choices=(0, 1, 2),
        default=1,
        help="QoS of the published messages (default 1)",
    )


def _sensors_command(
    sub: _Commands, data: argparse.ArgumentParser, output: argparse.ArgumentParser
) -> None:
    sens = sub.add_parser(
        "sensors",
        parents=[data, output],
        help="sensors and metrics, with their last value and time",
    )
    sens.add_argument("--sensor", default=None, help="only sensors matching this glob")


def _query_command(
    sub: _Commands, data: argparse.ArgumentParser, output: argparse.ArgumentParser
) -> None:
    q = sub.add_parser(
        "query", parents=[data, output], help="readings over time, by sensor (glob) and/or tag"
    )
    q.add_argument(
        "--sensor",
        "-s",
        default=None,
        help="the sensor id, or a glob ('kitchen-*'; * and ? are wildcards); optional with --tag",
    )
    q.add_argument("--metric", "-m", default=None, help="one metric (default: all)")
    q.add_argument(
        "--since",
        default="1h",
        help="start: a duration ago (90s, 30m, 1h, 2d, 1w), ISO 8601 or Unix seconds (default 1h)",
    )
    q.add_argument("--until", default=None, help="end, exclusive (default: now)")
    q.add_argument("--limit", type=int, default=0, help="at most this many rows (default 0: all)")
    q.add_argument(
        "--every",
        default=None,
        metavar="INTERVAL",
        help="one row per series and interval (1m, 1h, 1d...): count, min, max, mean, sum, "
        "first, last, increase, read from the rollups",
    )
    q.add_argument(
        "--tag",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="only series with this tag (repeatable)",
    )
    q.add_argument(
        "--progress",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="report export progress on stderr (default: when stderr is a "
        "terminal and stdout is not)",
    )


def _quarantine_command(
    sub: _Commands, data: argparse.ArgumentParser, output: argparse.ArgumentParser
) -> argparse.ArgumentParser:
    qu = sub.add_parser(
        "quarantine", parents=[data, output], help="recent rejected payloads with the reasons"
    )
    qu.add_argument("--since", default="1d", help="how far back (default 1d)")
    qu.add_argument("--limit", type=int, default=50, help="at most this many (default 50; 0: all)")
    return qu


def _stats_command(sub: _Commands, data: argparse.ArgumentParser) -> None:
    st = sub.add_parser(
        "stats",
        parents=[data],
        help="the database's totals, every instance's readings (--instance: this "
        "instance's live figures from its /metrics)",
    )
    st.add_argument(
        "--instance",
        action="store_true",
        help="this instance's live figures from the running daemon's /metrics "
        "instead (an error if it does not answer)",
    )
    st.add_argument(
        "--url",
        default=None,
        help="the daemon's metrics address, for --instance (implies it; default: from [metrics])",
    )
    # Not the shared --format: stats has no CSV, and says name and value per line.
    st.add_argument(
        "--format",
        "-f",
        choices=("table", "json"),
        default="table",
        help="output: name and value per line (default), or a JSON object",
    )
    st.add_argument("--json", action="store_true", help="the same as --format json")


def _backup_command(sub: _Commands, data: argparse.ArgumentParser) -> None:
    bk = sub.add_parser("backup", parents=[data], help="an online, consistent copy of the database")
    bk.add_argument("dest", type=Path, help="the copy's path (must not exist)")


def _run_async(coro: Coroutine[Any, Any, T]) -> T:
    try:
        import uvloop  # noqa: PLC0415 - optional accelerator
    except ImportError:  # pragma: no cover - uvloop is a dependency on Linux
        return asyncio.run(coro)
    with asyncio.Runner(loop_factory=uvloop.new_event_loop) as runner:
        return runner.run(coro)


def main(argv: Sequence[str] | None = None) -> int:
    parser, commands = _parser()
    args, extra = parser.parse_known_args(argv)
    command = args.command or "run"
    if extra:
        # The usage of the command that was given, not the top level's.
        commands.get(command, parser).error(f"unrecognized arguments: {' '.join(extra)}")
    config_path: Path | None = getattr(args, "config", None) or args.top_config
    if config_path is None and os.environ.get(ENV_CONFIG):
        config_path = Path(os.environ[ENV_CONFIG])
    try:
        settings = load_settings(config_path, need_routes=command not in NO_ROUTES)
    except ConfigError as exc:
        print(f"ingestd: {exc}", file=sys.stderr)
        return EX_CONFIG

    if command == "explain" or (command == "check-config" and args.topic):
        return _explain(args, settings)

    if command == "check-config":
        print(effective_settings_json(settings))
        print(f"ingestd: configuration OK ({config_path or 'defaults'})", file=sys.stderr)
        return 0

    if recover.wanted(command, args):
        return recover.run(command, args, settings)
    if command in DATA_COMMANDS:
        return _data_command(command, args, settings)

    if command == "forget-session":
        return _forget_session(settings)

    from ingestd.observe.log import configure_logging  # noqa: PLC0415

    if command == "simulate":
        from ingestd.tools.simulate import simulate, simulate_sparkplug  # noqa: PLC0415

        configure_logging("warning", "console", sys.stderr)
        try:
            _run_async(
                (simulate_sparkplug if args.format == "sparkplug" else simulate)(
                    settings,
                    sensors=args.sensors,
                    interval=args.interval,
                    rounds=args.rounds,
                    qos=args.qos,
                )
            )
        except KeyboardInterrupt:
            return 130
        return 0

    from ingestd.app import Daemon  # noqa: PLC0415
    from ingestd.malloc import tune_heap  # noqa: PLC0415

    tune_heap()

    configure_logging(settings.daemon.log_level, settings.daemon.log_format)

    async def _daemon() -> int:
        return await Daemon(settings, config_path=config_path).run()

    try:
        return _run_async(_daemon())
    except ConfigError as exc:
        print(f"ingestd: {exc}", file=sys.stderr)
        return EX_CONFIG


def _explain(args: argparse.Namespace, settings: Settings) -> int:
    """`explain` (and `check-config --topic`): what the daemon would do with one message."""
    from ingestd.tools.explain import explain  # noqa: PLC0415

    if args.payload_file is not None:
        payload = args.payload_file.read_bytes()
    else:
        payload = (args.payload or "").replace("\\n", "\n").encode()
    before: list[tuple[str, bytes]] = []
    for item in args.after:
        topic, eq, path = item.partition("=")
        if not eq or not topic:
            print(f"ingestd: --after {item!r}: expected TOPIC=FILE", file=sys.stderr)
            return EX_USAGE
        try:
            before.append((topic, Path(path).read_bytes()))
        except OSError as exc:
            print(f"ingestd: --after {item!r}: {exc}", file=sys.stderr)
            return EX_USAGE
    sample = payload if (args.payload or args.payload_file) else None
    print(explain(settings, args.topic, sample, after=before))
    return 0


def _data_command(command: str, args: argparse.Namespace, settings: Settings) -> int:
    from pydantic import ValidationError  # noqa: PLC0415

    from ingestd.errors import DataCommandError, StoreError  # noqa: PLC0415
    from ingestd.store import open_reader  # noqa: PLC0415
    from ingestd.tools import report  # noqa: PLC0415
    from ingestd.tools.history import from_args as history  # noqa: PLC0415

    db: str | None = args.db
    try:
        if command == "stats":
            if args.instance or args.url is not None:
                stats = report.instance_stats(args.url, settings.metrics)
            else:
                # The whole database: every instance that writes to it; and
                # this instance's spool, if it has one (even with the database away).
                spool = report.spool_stats(settings.store.spool_path) if db is None else {}
                try:
                    with open_reader(settings.store, db) as reader:
                        stats = report.db_stats(reader) | spool
                except StoreError:
                    if spool:
                        report.print_stats(spool, as_json=args.json or args.format == "json")
                    raise
            report.print_stats(stats, as_json=args.json or args.format == "json")
            return 0
        with open_reader(settings.store, db) as reader:
            if command == "backup":
                return _backup(reader, args.dest)
            progress = None
            if command == "sensors":
                table = report.sensors(reader, args.sensor)
            elif command == "query":
                now = time.time()
                since = report.parse_time(args.since, now)
                if since >= now and not args.until:
                    raise DataCommandError(
                        f"--since {args.since!r} is in the future: nothing has been stored "
                        "after now (give --until too for a range ahead)"
                    )
                until = report.parse_time(args.until, now) if args.until else now
                if args.every:
                    table = history(reader, args, settings.rollup_plan().widths, since, until)
                else:
                    table = report.query(
                        reader, args.sensor, args.metric, since, until, args.limit, args.tag
                    )
                show = args.progress
                if show is None:
                    show = sys.stderr.isatty() and not sys.stdout.isatty()
                progress = sys.stderr if show else None
            else:
                since = report.parse_time(args.since)
                table = report.quarantine(reader, since, args.limit)
            report.write_table(sys.stdout, table, args.format, progress=progress)
    except (DataCommandError, StoreError) as exc:
        print(f"ingestd: {exc}", file=sys.stderr)
        return 1
    except sqlite3.DatabaseError as exc:  # a page found corrupt while reading
        print(f"ingestd: {exc} (README: 'A corrupt database file')", file=sys.stderr)
        return 1
    except ValidationError as exc:  # --db URL, checked as store.url is
        reasons = "; ".join(str(e["msg"]).removeprefix("Value error, ") for e in exc.errors())
        print(f"ingestd: --db: {reasons}", file=sys.stderr)
        return EX_USAGE
    except BrokenPipeError:  # `ingestd query ... | head`
        sys.stderr.close()
        return 0
    return 0


def _forget_session(settings: Settings) -> int:
    from ingestd.errors import DataCommandError  # noqa: PLC0415
    from ingestd.tools.session import forget_session  # noqa: PLC0415

    try:
        done = _run_async(forget_session(settings.mqtt))
    except (DataCommandError, ConfigError) as exc:
        print(f"ingestd: {exc}", file=sys.stderr)
        return EX_CONFIG if isinstance(exc, ConfigError) else 1
    print(f"ingestd: {done}")
    return 0


def _backup(reader: Reader, dest: Path) -> int:
    started = time.monotonic()
    shown = [-1]

    def progress(remaining: int, total: int) -> None:
        pct = int(100 * (total - remaining) / max(total, 1))
        if pct // 10 != shown[0] // 10:
            shown[0] = pct
            print(
                f"ingestd: backup {pct}% ({total - remaining:,}/{total:,} pages)", file=sys.stderr
            )

    done = reader.backup(str(dest), progress)
    print(f"ingestd: {done} in {time.monotonic() - started:.1f} s", file=sys.stderr)
    return 0
