"""A corrupt database file: found, set aside, and a fresh one started.

Found at open by a check bounded in time (the header, then `PRAGMA
quick_check` for at most `store.check_seconds`: a check of a large file on a
slow card is cut short rather than holding the start up), and while running
by SQLITE_CORRUPT or SQLITE_NOTADB from any statement. Either way the file and
its -wal and -shm are renamed `<name>.corrupt-<time>` (-wal, -shm after it, so
`sqlite3` opening the set-aside file finds its own log), never deleted, and
the store opens a fresh database at the path: ingestion goes on, and what the
old file held can be recovered from it at leisure (`RECOVER`).
"""

from __future__ import annotations

import asyncio
import sqlite3
import time
from dataclasses import dataclass
from pathlib import Path

import structlog

from ingestd.errors import StoreError

log = structlog.get_logger("ingestd.store")

_CODES = {sqlite3.SQLITE_CORRUPT, sqlite3.SQLITE_NOTADB}
HEADER = b"SQLite format 3\x00"
SIDE = ("-wal", "-shm")
QUICK_CHECK_ERRORS = 10  # quick_check(N): the first few problems say enough
_STEPS = 10_000  # virtual machine steps between looks at the clock
# What a fresh database does not have that the old one did, for the log.
LOST = (
    "the fresh database starts empty: the readings and quarantine stored before "
    "are in the set-aside file only; the device state kept in the database "
    "(sequence counters and their gap totals, Sparkplug and Homie descriptions, "
    "series ids) starts afresh: counters count again from their next message, "
    "and a device ingestd does not hold in memory is known again from its next "
    "birth or description"
)


class CorruptDatabase(StoreError):
    """SQLite says the database file is corrupt (or not a database at all);
    `found`: what it said."""

    def __init__(self, path: Path, found: str) -> None:
        super().__init__(
            f"{path}: {found} (the file is corrupt: the daemon sets it aside and "
            "starts a fresh one; README, Troubleshooting, says how to recover it)"
        )
        self.found = found


def is_corrupt(exc: sqlite3.Error) -> bool:
    code = getattr(exc, "sqlite_errorcode", None)
    return code is not None and code & 0xFF in _CODES


@dataclass(frozen=True, slots=True)
class Checked:
    """What the check at open found: `problem` None if nothing (as far as it
    got: `complete` False when its time ran out first)."""

    problem: str | None
    complete: bool
    seconds: float


def check(path: Path, seconds: float, busy_timeout_ms: int) -> Checked:
    """The header, then quick_check for at most `seconds` (0: the header only).

    Only corruption is a problem here: a file that is locked, unreadable or
    missing is left to the open that follows, which says what it is.
    """
    started = time.monotonic()

    def done(problem: str | None, complete: bool = True) -> Checked:
        return Checked(problem, complete, round(time.monotonic() - started, 3))

    try:
        with path.open("rb") as fh:
            head = fh.read(len(HEADER))
    except OSError:
        return done(None)
    if not head:
        return done(None)  # empty: SQLite makes it a database
    if head != HEADER:
        return done(f"its header is not an SQLite database's (it begins {head[:16]!r})")
    if seconds <= 0:
        return done(None, complete=False)
    deadline = started + seconds
    conn = sqlite3.connect(path, timeout=busy_timeout_ms / 1000)
    try:
        conn.set_progress_handler(lambda: time.monotonic() > deadline, _STEPS)
        rows = conn.execute(f"PRAGMA quick_check({QUICK_CHECK_ERRORS})").fetchall()
    except sqlite3.Error as exc:
        if is_corrupt(exc):
            return done(f"quick_check: {exc}")
        return done(None, complete=getattr(exc, "sqlite_errorcode", 0) != sqlite3.SQLITE_INTERRUPT)
    finally:
        conn.close()
    found = [str(r[0]) for r in rows]
    return done(None if found == ["ok"] else "quick_check: " + "; ".join(found))


async def check_at_open(path: Path, seconds: float, busy_timeout_ms: int) -> str | None:
    """`check` in a thread: what is wrong with the file, or None."""
    checked = await asyncio.to_thread(check, path, seconds, busy_timeout_ms)
    if checked.problem is None and not checked.complete and seconds > 0:
        log.info(
            "quick_check of the database stopped at store.check_seconds; "
            "the rest of the file is checked as it is used",
            path=str(path),
            seconds=checked.seconds,
        )
    return checked.problem


def set_aside_reported(path: Path, found: str, when: str) -> str:
    """`set_aside`, logged (`report`); the words for the StoreUnavailable.
    StoreError if the file cannot be moved."""
    try:
        aside, side = set_aside(path)
    except OSError as exc:
        raise StoreError(
            f"{path} is corrupt ({found}) and could not be set aside: {exc}; "
            "move it (and its -wal, -shm) away by hand and start ingestd again"
        ) from None
    report(path, aside, side, found, when)
    return f"{path} is corrupt ({found}); set aside as {aside}"


def set_aside(path: Path) -> tuple[Path, list[Path]]:
    """Rename the database at `path` and its -wal and -shm to a timestamped
    `.corrupt-` name beside it: (the database's new name, the side files')."""
    stamp = time.strftime("%Y%m%dT%H%M%S")
    aside = path.with_name(f"{path.name}.corrupt-{stamp}")
    n = 1
    while any(Path(f"{aside}{sfx}").exists() for sfx in ("", *SIDE)):
        n += 1
        aside = path.with_name(f"{path.name}.corrupt-{stamp}-{n}")
    path.rename(aside)
    moved: list[Path] = []
    for sfx in SIDE:
        side = Path(f"{path}{sfx}")
        if side.exists():
            side.rename(f"{aside}{sfx}")
            moved.append(Path(f"{aside}{sfx}"))
    return aside, moved


def recover_steps(aside: Path) -> str:
    """What to do with a set-aside file, as commands. `ingestd import` reads
    CSV (not SQLite): the recovered database goes through `ingestd query`.
    (The sqlite3 3.40.1 of Debian 12 fails `.recover` with "SQL logic error",
    even on a sound ingestd file: a sqlite3 of 3.41 or later is needed.)"""
    recovered = aside.with_name(f"{aside.name}.recovered.db")
    csv = aside.with_name(f"{aside.name}.recovered.csv")
    return (
        f"sqlite3 {aside} .recover | sqlite3 {recovered} (sqlite3 3.41 or later); "
        f"ingestd query --db {recovered} --sensor '*' --since 0 --format csv > {csv}; "
        f"ingestd import {csv}"
    )


def report(path: Path, aside: Path, side: list[Path], found: str, when: str) -> None:
    log.error(
        "database file corrupt: set aside (not deleted) and a fresh database started; "
        "ingestion goes on",
        path=str(path),
        set_aside=str(aside),
        side_files=[str(p) for p in side],
        found=found,
        when=when,
        lost=LOST,
        next=recover_steps(aside),
    )
