"""Routes: which topics ingestd subscribes to and how a topic names its readings.

A route's topic pattern is an MQTT topic filter whose single-level wildcards
may be named: `sensors/{sensor}/{metric}` subscribes to `sensors/+/+` and
captures the two levels. The sensor id and metric name are templates over the
captured names (`{site}.{device}`); a JSON route's metric template may also use
`{field}`, the payload field the value came from.
"""

from __future__ import annotations

import re
import string
from collections.abc import Sequence
from dataclasses import dataclass

_NAME = re.compile(r"^\{([A-Za-z_][A-Za-z0-9_]*)\}$")
_CACHE_MAX = 65536


class RouteSpecError(ValueError):
    """A route's topic pattern or template is malformed."""


@dataclass(frozen=True, slots=True)
class CompiledRoute:
    index: int
    pattern: str
    subscription: str
    levels: tuple[str | None, ...]  # literal text, or None for a wildcard level
    captures: tuple[tuple[int, str], ...]  # (level position, name)
    multi: bool  # ends in '#'
    sensor_template: str
    metric_template: str
    format: str
    ts_field: str

    def specificity(self) -> tuple[int, ...]:
        """Sort key: literal levels before wildcards, level by level, '#' last."""
        key = [0 if lv is not None else 1 for lv in self.levels]
        if self.multi:
            key.append(2)
        return tuple(key)


@dataclass(frozen=True, slots=True)
class RouteMatch:
    """What a topic resolves to: the route and the names derived from the topic."""

    route: int
    format: str
    ts_field: str
    sensor: str
    # For a JSON route the metric is `metric_prefix + field + metric_suffix`;
    # for a value route `metric_prefix` is the whole metric name.
    metric_prefix: str
    metric_suffix: str


def compile_route(
    pattern: str, sensor: str, metric: str, fmt: str, ts_field: str = "ts", index: int = 0
) -> CompiledRoute:
    parts = pattern.split("/")
    levels: list[str | None] = []
    captures: list[tuple[int, str]] = []
    multi = False
    sub: list[str] = []
    for pos, part in enumerate(parts):
        if part == "#":
            if pos != len(parts) - 1:
                raise RouteSpecError(f"topic {pattern!r}: '#' must be the last level")
            multi = True
            sub.append("#")
            continue
        if part == "+":
            levels.append(None)
            sub.append("+")
            continue
        named = _NAME.match(part)
        if named:
            name = named.group(1)
            if any(n == name for _, n in captures):
                raise RouteSpecError(f"topic {pattern!r}: level name {{{name}}} used twice")
            captures.append((pos, name))
            levels.append(None)
            sub.append("+")
            continue
        if any(c in part for c in "+#{}"):
            raise RouteSpecError(
                f"topic {pattern!r}: level {part!r} mixes text with a wildcard; "
                "a wildcard or {name} must be a whole level"
            )
        levels.append(part)
        sub.append(part)
    names = {n for _, n in captures}
    _check_template("sensor", sensor, pattern, names)
    extra = {"field"} if fmt == "json" else set()
    fields = _check_template("metric", metric, pattern, names | extra)
    if fmt == "json" and fields.count("field") > 1:
        raise RouteSpecError(f"metric template {metric!r}: {{field}} may appear only once")
    return CompiledRoute(
        index=index,
        pattern=pattern,
        subscription="/".join(sub),
        levels=tuple(levels),
        captures=tuple(captures),
        multi=multi,
        sensor_template=sensor,
        metric_template=metric,
        format=fmt,
        ts_field=ts_field,
    )


def _check_template(what: str, template: str, pattern: str, allowed: set[str]) -> list[str]:
    try:
        parsed = list(string.Formatter().parse(template))
    except ValueError as exc:
        raise RouteSpecError(f"{what} template {template!r}: {exc}") from None
    fields: list[str] = []
    for _literal, field, spec, conv in parsed:
        if field is None:
            continue
        if spec or conv:
            raise RouteSpecError(f"{what} template {template!r}: no format specs or conversions")
        if field not in allowed:
            known = ", ".join(sorted("{" + a + "}" for a in allowed)) or "none"
            raise RouteSpecError(
                f"{what} template {template!r} uses {{{field}}}, which topic {pattern!r} "
                f"does not name (available: {known})"
            )
        fields.append(field)
    if not template:
        raise RouteSpecError(f"{what} template is empty")
    return fields


class RouteTable:
    """Routes ordered most specific first; `match` resolves a topic, cached."""

    def __init__(self, routes: Sequence[CompiledRoute]) -> None:
        self.routes = sorted(routes, key=CompiledRoute.specificity)
        self._cache: dict[str, RouteMatch | None] = {}

    def subscriptions(self) -> list[tuple[str, int]]:
        """Unique subscription filters, in route order (QoS is chosen by the caller)."""
        seen: dict[str, int] = {}
        for r in self.routes:
            seen.setdefault(r.subscription, r.index)
        return list(seen.items())

    def match(self, topic: str) -> RouteMatch | None:
        try:
            return self._cache[topic]
        except KeyError:
            pass
        result = self._resolve(topic)
        if len(self._cache) >= _CACHE_MAX:
            self._cache.clear()
        self._cache[topic] = result
        return result

    def _resolve(self, topic: str) -> RouteMatch | None:
        parts = topic.split("/")
        for route in self.routes:
            if _matches(route, parts):
                values = {name: parts[pos] for pos, name in route.captures}
                sensor = route.sensor_template.format_map(values)
                if route.format == "json":
                    marker = "\x00"
                    metric = route.metric_template.format_map({**values, "field": marker})
                    prefix, _, suffix = metric.partition(marker)
                else:
                    prefix, suffix = route.metric_template.format_map(values), ""
                return RouteMatch(route.index, route.format, route.ts_field, sensor, prefix, suffix)
        return None


def _matches(route: CompiledRoute, parts: list[str]) -> bool:
    n = len(route.levels)
    if route.multi:
        # 'a/#' matches 'a' itself and everything below it.
        if len(parts) < n:
            return False
    elif len(parts) != n:
        return False
    # Wildcards at the first level do not match topics starting with '$' (MQTT 4.7.2).
    if parts and parts[0].startswith("$") and (n == 0 or route.levels[0] is None):
        return False
    for want, got in zip(route.levels, parts, strict=False):
        if want is not None and want != got:
            return False
    return True
