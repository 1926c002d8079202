"""What README, `ingestd --help` and pyproject say ingestd reads and writes is
what the code has: the format registry, the store engines, the schema versions
and tables. A format or an engine added without its docs fails here."""

from __future__ import annotations

import asyncio
import pkgutil
import re
import sqlite3
import tomllib
from pathlib import Path

import ingestd.store
from ingestd import DESCRIPTION, formats
from ingestd.cli import _parser
from ingestd.store.postgres import schema as pg_schema
from ingestd.store.sqlite import SqliteStore
from ingestd.store.sqlite import schema as sqlite_schema
from tests.support.config import REPO

README = (REPO / "README.md").read_text()
INTRO = README[: README.index("## Quick start")]
# How the prose names each one. A new format or engine needs an entry here and
# its words in README's intro and the description.
FORMAT_WORDS = {
    "json": "JSON",
    "value": "plain values",
    "influx": "InfluxDB line protocol",
    "senml": "SenML",
    "sparkplug": "Sparkplug B",
    "homie": "Homie",
}
ENGINE_WORDS = {"sqlite": "SQLite", "postgres": "PostgreSQL"}


def _engines() -> list[str]:
    return sorted(m.name for m in pkgutil.iter_modules(ingestd.store.__path__) if m.ispkg)


def _section(title: str) -> str:
    start = README.index(f"\n{title}\n")
    end = README.index("\n## ", start + 1)
    return README[start:end]


def test_readme_intro_lists_the_registrys_formats() -> None:
    listed = re.search(r"\(formats: (.*?)\)", INTRO, re.S)
    assert listed, "README's intro lists the formats as '(formats: `json` ..., ...)'"
    assert set(re.findall(r"`(\w+)`", listed.group(1))) == set(formats.names())
    assert set(FORMAT_WORDS) == set(formats.names()), "name a new format in FORMAT_WORDS"
    # ... and each has its paragraph under "Payload formats".
    described = re.findall(r"^\*\*(\w+)\*\*:", _section("### Payload formats"), re.M)
    assert sorted(described) == sorted(formats.names())


def test_readme_intro_and_diagram_name_every_store_engine() -> None:
    assert set(ENGINE_WORDS) == set(_engines()), "name a new engine in ENGINE_WORDS"
    listed = re.search(r"\(stores: (.*?)\)", INTRO, re.S)
    assert listed, "README's intro lists the stores as '(stores: SQLite ..., ...)'"
    diagram = INTRO[INTRO.index("```") :]
    for word in ENGINE_WORDS.values():
        assert word in listed.group(1), word
        assert word in diagram, word


def test_help_and_pyproject_describe_all_formats_and_stores() -> None:
    pyproject = tomllib.loads((REPO / "pyproject.toml").read_text())
    assert pyproject["project"]["description"] == DESCRIPTION
    parser, _ = _parser()
    assert parser.description == DESCRIPTION
    for word in (*FORMAT_WORDS.values(), *ENGINE_WORDS.values()):
        assert word in DESCRIPTION, word


def test_readme_schema_section_has_the_versions_and_tables(tmp_path: Path) -> None:
    section = _section("## The database")
    assert f"SQLite's is schema version {sqlite_schema.SCHEMA_VERSION}" in section
    assert f"PostgreSQL's version {pg_schema.SCHEMA_VERSION}" in section

    async def create() -> None:
        async with SqliteStore(tmp_path / "x.db"):
            pass

    asyncio.run(create())  # the real schema, as the daemon makes it
    with sqlite3.connect(tmp_path / "x.db") as conn:
        sqlite_tables = {
            name for (name,) in conn.execute("SELECT name FROM sqlite_master WHERE type = 'table'")
        }
    pg_tables = set(re.findall(r"CREATE TABLE (\w+)", "".join(pg_schema.MIGRATIONS)))
    for table in sqlite_tables | pg_tables | {"ingestd_schema"}:
        assert f"`{table}" in section, table
