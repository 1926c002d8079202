"""The command line of recovery: `ingestd quarantine replay` and `ingestd
import`, their options and what runs them (`replay`, `importing`)."""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
from pathlib import Path
from typing import Protocol

from ingestd.config import Settings
from ingestd.errors import EX_USAGE, DataCommandError, StoreError


class _Commands(Protocol):
    def add_parser(
        self, name: str, *, parents: list[argparse.ArgumentParser], help: str
    ) -> argparse.ArgumentParser: ...


def add_commands(
    sub: _Commands, data: argparse.ArgumentParser, quarantine: argparse.ArgumentParser
) -> None:
    """`quarantine replay` (under `quarantine`) and `import`."""
    actions = quarantine.add_subparsers(dest="action", metavar="ACTION")
    rp = actions.add_parser(
        "replay",
        parents=[data],
        help="run quarantined messages through the current config; store what now passes",
    )
    rp.add_argument("--since", default="0", help="received at or after (default: all)")
    rp.add_argument("--until", default=None, help="received before (default: now)")
    rp.add_argument("--reason", default="", help="only records whose reason contains this text")
    rp.add_argument("--topic", default="", help="only topics matching this MQTT filter (+, #)")
    rp.add_argument(
        "--dry-run", action="store_true", help="say what would happen to each record; write nothing"
    )
    im = sub.add_parser(
        "import",
        parents=[data],
        help="load readings from files (csv, jsonl, senml, influx) through the pipeline",
    )
    im.add_argument("files", nargs="+", type=Path, metavar="FILE")
    im.add_argument(
        "--format",
        "-f",
        choices=("csv", "jsonl", "senml", "influx"),
        default=None,
        help="the files' format (default: from the name: .csv .jsonl .senml/.json .lp/.influx)",
    )
    im.add_argument(
        "--topic", "-t", default="", help="the topic whose route reads senml and influx files"
    )
    im.add_argument(
        "--progress",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="a progress line on stderr (default: when stderr is a terminal)",
    )

    ro = sub.add_parser(
        "rollups",
        parents=[],
        help="the history kept per interval: 'rollups rebuild' computes it from the raw readings",
    )
    ro_actions = ro.add_subparsers(dest="action", metavar="ACTION", required=True)
    rb = ro_actions.add_parser(
        "rebuild",
        parents=[data],
        help="compute every rollup bucket again from the raw readings still kept (idempotent)",
    )
    rb.add_argument(
        "--since",
        default=None,
        help="from the bucket holding this time on (a duration ago, ISO 8601 or Unix seconds; "
        "default: all)",
    )


def wanted(command: str, args: argparse.Namespace) -> bool:
    return command in ("import", "rollups") or (
        command == "quarantine" and getattr(args, "action", None) == "replay"
    )


def run(command: str, args: argparse.Namespace, settings: Settings) -> int:
    from pydantic import ValidationError  # noqa: PLC0415

    try:
        if command == "import":
            return _import(args, settings)
        if command == "rollups":
            return _rollups(args, settings)
        return _replay(args, settings)
    except (DataCommandError, StoreError, OSError) as exc:
        print(f"ingestd: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print("ingestd: interrupted; what was committed stays (run it again: nothing "
              "is stored twice)", file=sys.stderr)  # fmt: skip
        return 130
    except ValidationError as exc:  # --db URL, checked as store.url is
        reasons = "; ".join(str(e["msg"]).removeprefix("Value error, ") for e in exc.errors())
        print(f"ingestd: --db: {reasons}", file=sys.stderr)
        return EX_USAGE


def _replay(args: argparse.Namespace, settings: Settings) -> int:
    from ingestd.store import open_reader  # noqa: PLC0415
    from ingestd.tools.replay import Selection, replay  # noqa: PLC0415
    from ingestd.tools.report import parse_time  # noqa: PLC0415

    now = time.time()
    sel = Selection(
        parse_time(args.since, now),
        parse_time(args.until, now) if args.until else now + 1,
        args.reason,
        args.topic,
    )
    with open_reader(settings.store, args.db) as reader:
        summary = replay(
            settings,
            reader,
            sel,
            db=args.db,
            dry_run=args.dry_run,
            out=sys.stdout,
            err=sys.stderr,
        )
    print(f"ingestd: {summary}", file=sys.stderr)
    return 0


def _import(args: argparse.Namespace, settings: Settings) -> int:
    from ingestd.tools.importing import default_progress, import_files  # noqa: PLC0415
    from ingestd.tools.intake import Intake  # noqa: PLC0415

    for path in args.files:
        if not path.is_file():
            raise DataCommandError(f"{path}: no such file")
    progress = (
        default_progress() if args.progress is None else (sys.stderr if args.progress else None)
    )

    async def go() -> str:
        intake = Intake(settings, args.db)
        await intake.open()
        try:
            done = await import_files(
                settings, args.files, args.format, args.topic, intake, progress
            )
        finally:
            await intake.close()
        t = intake.tally
        names = args.files[0].name if len(args.files) == 1 else f"{len(args.files)} files"
        conflicts = f" ({t.conflicts} conflicts with stored values)" if t.conflicts else ""
        return (
            f"import: {done.read:,} reading(s) read from {names} in {done.seconds:.1f} s "
            f"({done.read / max(done.seconds, 1e-9):,.0f}/s): {t.stored:,} stored, "
            f"{t.duplicates:,} already stored, {t.quarantined:,} quarantined{conflicts}"
        )

    print(f"ingestd: {asyncio.run(go())}", file=sys.stderr)
    return 0


def _rollups(args: argparse.Namespace, settings: Settings) -> int:
    from ingestd.store import with_db  # noqa: PLC0415
    from ingestd.tools.report import parse_time  # noqa: PLC0415
    from ingestd.tools.rollups import rebuild  # noqa: PLC0415

    if args.db is not None:
        settings = settings.model_copy(
            update={"store": with_db(settings.store, args.db, reading=False)}
        )
    since = parse_time(args.since) if args.since else None
    print(f"ingestd: {asyncio.run(rebuild(settings, since))}", file=sys.stderr)
    return 0
