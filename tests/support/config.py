"""Configs for the daemon under test: the shipped one, and TOML written for a test
(sections and routes; the default two routes)."""

from __future__ import annotations

from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
SHIPPED_CONFIG = REPO / "config" / "ingestd.toml"


def write_config(path: Path, routes: str | None = None, **sections: dict[str, object]) -> Path:
    """A TOML config: the given sections (plain key = value tables) and routes."""
    lines: list[str] = []
    for name, values in sections.items():
        lines.append(f"[{name.replace('__', '.')}]")
        for key, value in values.items():
            lines.append(f"{key} = {_toml(value)}")
        lines.append("")
    lines.append(routes if routes is not None else DEFAULT_ROUTES)
    path.write_text("\n".join(lines))
    return path


def _toml(value: object) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str | Path):
        return '"' + str(value).replace("\\", "\\\\").replace('"', '\\"') + '"'
    return str(value)


DEFAULT_ROUTES = """
[[routes]]
topic = "sensors/{sensor}/telemetry"
format = "json"
qos = 1

[[routes]]
topic = "sensors/{sensor}/{metric}"
format = "value"
qos = 1
"""
