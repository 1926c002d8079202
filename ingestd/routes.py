"""Routes: which topics ingestd subscribes to and how a topic names its readings.

A route's topic pattern is an MQTT topic filter whose single-level wildcards
may be named: `sensors/{sensor}/{metric}` subscribes to `sensors/+/+` and
captures the two levels. The sensor id and metric name are templates over the
captured names (`{site}.{device}`); the metric template may also use the
names the route's format offers (`Format.template_fields`: `{field}` for json
and senml, `{measurement}` and `{field}` for influx). Named levels that neither
template uses become the reading's tags (`sensors/{site}/{sensor}` tags each
reading with its site).
"""

from __future__ import annotations

import re
import string
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from ingestd import formats
from ingestd.errors import RouteSpecError
from ingestd.events import canonical_tags
from ingestd.formats import Format, FormatOptions
from ingestd.formats.base import InputLimits, RouteMatch, RouteOptions
from ingestd.mqtt.topics import levels_match
from ingestd.recent import RecentCache

_NAME = re.compile(r"^\{([A-Za-z_][A-Za-z0-9_]*)\}$")
# Topics, sensors and (route, sensor) pairs each cache keeps, the most recently
# used (see ingestd.recent for what an entry weighs).
KEPT = 65536


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
    fmt: Format
    params: Any  # the format's prepared options (Format.prepare)
    options: RouteOptions = field(default_factory=RouteOptions)
    tag_names: tuple[tuple[int, str], ...] = ()  # captured levels that become tags
    capture_names: tuple[str, ...] = ()  # the captures' names, in their order

    def specificity(self) -> tuple[int, ...]:
        """Sort key: literal levels before wildcards, level by level, '#' last."""
        key = [0 if lv is not None else 1 for lv in self.levels]
        if self.multi:
            key.append(2)
        return tuple(key)


def compile_route(
    pattern: str,
    sensor: str,
    metric: str,
    format_name: str = "json",
    index: int = 0,
    options: RouteOptions | None = None,
    format_options: FormatOptions | None = None,
) -> CompiledRoute:
    """A route from its topic pattern, templates, format name and options
    (`format_options`: the format's own, validated; default: its defaults)."""
    try:
        fmt = formats.get(format_name)
    except KeyError as exc:
        raise RouteSpecError(str(exc.args[0])) from None
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
    used = set(_check_template("sensor", sensor, pattern, names | fmt.sensor_fields))
    fields = _check_template("metric", metric, pattern, names | fmt.template_fields)
    used.update(fields)
    need, *others = fmt.metric_requires
    if fmt.metric_from != "topic" and not set(fmt.metric_requires) & set(fields):
        # Without it every field of a payload would get the same metric name.
        alternatives = "".join(f" (or {{{n}}})" for n in others)
        raise RouteSpecError(
            f"metric template {metric!r} must contain {{{need}}}{alternatives}: a {fmt.name} "
            f"route carries several values, each its own metric "
            f'(e.g. metric = "{{site}}.{{{need}}}")'
        )
    if fmt.metric_from == "field" and fields.count("field") > 1:
        raise RouteSpecError(f"metric template {metric!r}: {{field}} may appear only once")
    tag_names = tuple((pos, n) for pos, n in captures if n not in used)
    return CompiledRoute(
        index=index,
        pattern=pattern,
        subscription="/".join(sub),
        levels=tuple(levels),
        captures=tuple(captures),
        capture_names=tuple(name for _, name in captures),
        multi=multi,
        sensor_template=sensor,
        metric_template=metric,
        fmt=fmt,
        params=fmt.prepare(format_options or fmt.options()),
        options=options or RouteOptions(),
        tag_names=tag_names,
    )


def _check_template(what: str, template: str, pattern: str, allowed: set[str]) -> list[str]:
    try:
        parsed = list(string.Formatter().parse(template))
    except ValueError as exc:
        raise RouteSpecError(f"{what} template {template!r}: {exc}") from None
    fields: list[str] = []
    for _literal, name, spec, conv in parsed:
        if name is None:
            continue
        if spec or conv:
            raise RouteSpecError(f"{what} template {template!r}: no format specs or conversions")
        if name not in allowed:
            known = ", ".join(sorted("{" + a + "}" for a in allowed)) or "none"
            raise RouteSpecError(
                f"{what} template {template!r} uses {{{name}}}, which topic {pattern!r} "
                f"does not name (available: {known})"
            )
        fields.append(name)
    if not template:
        raise RouteSpecError(f"{what} template is empty")
    return fields


class RouteTable:
    """Routes ordered most specific first; `match` resolves a topic, cached.

    Immutable but for that cache: a reload builds a new table and swaps it in;
    what ingestd learned of devices lives in `ingestd.devices.DeviceState`."""

    def __init__(
        self,
        routes: Sequence[CompiledRoute],
        limits: InputLimits | None = None,
        kept: int = KEPT,
    ) -> None:
        self.routes = sorted(routes, key=CompiledRoute.specificity)
        self.limits = limits or InputLimits()
        # `kept`: topics whose match the cache holds (tests make it small).
        self._cache: RecentCache[str, RouteMatch | None] = RecentCache(kept)
        # Whether the source must tell which redeliveries were read already.
        self.tells_redeliveries = any(r.fmt.tells_redeliveries for r in self.routes)
        # The routes' formats that keep device state across restarts, once each.
        self.stateful = [
            f for f in {r.fmt.name: r.fmt for r in self.routes}.values() if f.save_state
        ]

    @property
    def cached_topics(self) -> int:
        """Topics whose match is cached (the most recent `kept`, 65,536 by default)."""
        return len(self._cache)

    def match(self, topic: str) -> RouteMatch | None:
        cache = self._cache
        try:
            result = cache[topic]
        except KeyError:
            result = cache[topic] = self._resolve(topic)
            return result
        if cache.warm:  # a hit counts as a use from half full on (RecentCache)
            cache.move_to_end(topic)
        return result

    def _resolve(self, topic: str) -> RouteMatch | None:
        parts = topic.split("/")
        for route in self.routes:
            if levels_match(route.levels, route.multi, parts):
                captured = tuple(parts[pos] for pos, _ in route.captures)
                values = dict(zip(route.capture_names, captured, strict=True))
                # A format that names sensors from the payload gets the template.
                sensor = (
                    route.sensor_template
                    if route.fmt.sensor_fields
                    else route.sensor_template.format_map(values)
                )
                # "{sensor}" alone: the captured string itself, held once.
                sensor = next((c for c in captured if c == sensor), sensor)
                prefix = suffix = ""
                if route.fmt.metric_from == "field":
                    marker = "\x00"
                    # Other payload names the format offers (SenML's {record})
                    # are formatted by its decoder.
                    names = dict.fromkeys(route.fmt.template_fields, marker)
                    metric = route.metric_template.format_map({**values, **names})
                    prefix, _, suffix = metric.partition(marker)
                elif route.fmt.metric_from == "topic":
                    prefix = route.metric_template.format_map(values)
                topic_tags = tuple((n, parts[pos]) for pos, n in route.tag_names)
                return RouteMatch(
                    route.index,
                    route.fmt,
                    route.params,
                    sensor,
                    prefix,
                    suffix,
                    route.options,
                    canonical_tags(dict(topic_tags)),
                    topic_tags,
                    route.metric_template,
                    captured,
                    route.capture_names,
                )
        return None
