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

import dataclasses
import re
import string
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from ingestd import formats
from ingestd.errors import RouteSpecError
from ingestd.events import SensorStatus, canonical_tags
from ingestd.formats import Format, FormatOptions
from ingestd.observe.device_log import DeviceLog
from ingestd.recent import RecentCache

_NAME = re.compile(r"^\{([A-Za-z_][A-Za-z0-9_]*)\}$")
# Topics, sensors and (route, sensor) pairs each cache keeps, the most recently
# used (see ingestd.recent for what an entry weighs).
KEPT = 65536
# A counter that goes back by more than this restarted (a redelivery goes back
# by at most the broker's in-flight window).
_RESTART_BACKSTEP = 65535


@dataclass(frozen=True, slots=True)
class RouteOptions:
    """What any route may say beyond its topic and templates, whatever its format."""

    rate_limit: float = 0.0  # readings/s per sensor (0: no limit)
    rate_burst: float = 1.0
    rate_policy: str = "drop"  # drop | quarantine
    retained: str = "ignore"  # ignore | store: messages the broker re-sends on subscribe
    expect_within: float = 0.0  # seconds a route or sensor may stay silent (0: no limit)


@dataclass(frozen=True, slots=True)
class InputLimits:
    max_payload_bytes: int = 262144
    max_json_depth: int = 16


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
    options: RouteOptions = RouteOptions()
    tag_names: tuple[tuple[int, str], ...] = ()  # captured levels that become tags

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
    fmt: Format
    params: Any  # the format's prepared options
    sensor: str
    # By the format's `metric_from`: "field", the metric is `metric_prefix +
    # field + metric_suffix`; "topic", `metric_prefix` is the whole metric
    # name; "payload", the decoder formats `metric_template` with `values`.
    metric_prefix: str
    metric_suffix: str
    options: RouteOptions = RouteOptions()
    tags: str = ""  # canonical JSON of the topic's tag levels
    topic_tags: tuple[tuple[str, str], ...] = ()
    metric_template: str = ""
    values: dict[str, str] = dataclasses.field(default_factory=dict)


def compile_route(
    pattern: str,
    sensor: str,
    metric: str,
    fmt: str = "json",
    index: int = 0,
    options: RouteOptions | None = None,
    format_options: FormatOptions | None = None,
) -> CompiledRoute:
    """A route from its topic pattern, templates, format name and options
    (`format_options`: the format's own, validated; default: its defaults)."""
    try:
        codec = formats.get(fmt)
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
    used = set(_check_template("sensor", sensor, pattern, names | codec.sensor_fields))
    fields = _check_template("metric", metric, pattern, names | codec.template_fields)
    used.update(fields)
    need = codec.metric_requires
    if codec.metric_from != "topic" and need not in fields:
        # Without it every field of a payload would get the same metric name.
        raise RouteSpecError(
            f"metric template {metric!r} must contain {{{need}}}: a {codec.name} "
            f"route carries several values, each its own metric "
            f'(e.g. metric = "{{site}}.{{{need}}}")'
        )
    if codec.metric_from == "field" and fields.count("field") > 1:
        raise RouteSpecError(f"metric template {metric!r}: {{field}} may appear only once")
    tag_names = tuple((pos, n) for pos, n in captures if n not in used)
    return CompiledRoute(
        index=index,
        pattern=pattern,
        subscription="/".join(sub),
        levels=tuple(levels),
        captures=tuple(captures),
        multi=multi,
        sensor_template=sensor,
        metric_template=metric,
        fmt=codec,
        params=codec.prepare(format_options or codec.options()),
        options=options or RouteOptions(),
        tag_names=tag_names,
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


@dataclass(slots=True)
class DecodeCounts:
    """What decoding did with readings, for the accounting identity (metrics).

    `decoded`: readings the payloads gave (what `explain` lists). Of those, the
    rate limit dropped `rate_dropped` and quarantined `rate_quarantined`, and
    `retained_untimed` came from a retained message without a device time.
    `retained_ignored` counts retained messages not decoded at all.
    """

    decoded: int = 0
    rate_dropped: int = 0
    rate_quarantined: int = 0
    retained_untimed: int = 0
    retained_ignored: int = 0
    sequence_gaps: int = 0
    sequence_missing: int = 0
    non_numeric: int = 0  # values a format knows are not numbers (homie strings, enums)
    # Values a format read and did not store, by why (sparkplug: "string",
    # "dataset", "transient", "null", ...).
    skipped: dict[str, int] = dataclasses.field(default_factory=dict)
    rebirth_requests: int = 0  # Sparkplug rebirths asked for
    rebirths_suppressed: int = 0  # not asked: over rebirth_max_per_second in all


@dataclass(slots=True)
class SequenceState:
    """A device's message counter as ingestd has followed it: the last number
    seen, and the gaps found since the state was last taken for the store
    (`RouteTable.take_status`). The store adds those to the counts it holds,
    so a state forgotten (evicted) and rebuilt, or kept by another instance,
    never replaces counts already stored; `last` is persisted too, so a gap
    across an ingestd restart still counts."""

    last: int
    gaps: int = 0
    missing: int = 0


_NO_STATUS = SensorStatus()


class RouteTable:
    """Routes ordered most specific first; `match` resolves a topic, cached."""

    def __init__(
        self,
        routes: Sequence[CompiledRoute],
        limits: InputLimits | None = None,
        kept: int = KEPT,
    ) -> None:
        self.routes = sorted(routes, key=CompiledRoute.specificity)
        self.limits = limits or InputLimits()
        # `kept`: entries each per-topic and per-sensor cache holds (tests make it small).
        self._cache: RecentCache[str, RouteMatch | None] = RecentCache(kept)
        # Per-device rate limiting: (route, sensor) -> [tokens, last refill time].
        # A bucket forgotten starts again full: a burst, not a cliff.
        self.buckets: RecentCache[tuple[int, str], list[float]] = RecentCache(kept)
        self.counts = DecodeCounts()
        # Per sensor: the device's sequence counter; `sequences_changed` holds the
        # states whose gaps the next chunk carries to the store (by reference: a
        # state evicted meanwhile still reports what it found).
        self.sequences: RecentCache[str, SequenceState] = RecentCache(kept)
        self.sequences_changed: dict[str, SequenceState] = {}
        # Per route, and per (route, sensor): time of the last message, for
        # routes with expect_within. Sensors by recency: one forgotten (silent
        # longest, past the bound) no longer counts in ingestd_sensors_stale;
        # `ingestd sensors` judges staleness from the store, for all.
        self.route_seen: dict[int, int] = {}
        self.sensor_seen: RecentCache[tuple[int, str], int] = RecentCache(kept)
        # Sensors first heard of (this run) on a route with expect_within, and
        # that limit: the store keeps it so `ingestd sensors` can flag staleness.
        self.expect_changed: dict[str, float] = {}
        # What stateful formats learned from earlier messages, by format name
        # (homie: device descriptions and states).
        self.format_state: dict[str, Any] = {}
        # Whether the message being decoded is one the broker re-sent because
        # we subscribed (set by decode_message, for formats that care).
        self.retained_now = False
        # Whether the broker sent the message being decoded again (DUP) and
        # this process read it already (or committed it before a restart).
        self.read_before_now = False
        # Whether the source must tell which redeliveries were read already.
        self.tells_redeliveries = any(r.fmt.tells_redeliveries for r in self.routes)
        # The routes' formats that keep device state across restarts, once each.
        self.stateful = [
            f for f in {r.fmt.name: r.fmt for r in self.routes}.values() if f.save_state
        ]
        # A stateful format changed what it keeps across restarts (its
        # `save_state` says what): the next chunk carries it to the store.
        self.devices_changed = False
        # Lines about single devices share one budget (ids come from anyone).
        self.device_log = DeviceLog()
        # The state devices report of themselves (Homie's $state), changed
        # since the last chunk: the store keeps it for `ingestd sensors`.
        self.states_changed: dict[str, str] = {}
        # MQTT messages a format asks to send (Sparkplug rebirth requests):
        # (topic, payload), published by the source after the chunk.
        self.commands: list[tuple[str, bytes]] = []

    def take_status(self) -> SensorStatus:
        """The per-sensor state changed since the last call, for the store."""
        if not (
            self.sequences_changed
            or self.expect_changed
            or self.states_changed
            or self.devices_changed
        ):
            return _NO_STATUS  # the common chunk: nothing to store, nothing to allocate
        devices: dict[tuple[str, str], tuple[bytes, bytes | None]] = {}
        if self.devices_changed:
            self.devices_changed = False
            for fmt in self.stateful:
                assert fmt.save_state is not None
                saved = fmt.save_state(self)
                devices.update(((fmt.name, d), v) for d, v in saved.items())
        seqs: dict[str, tuple[int, int, int]] = {}
        for sensor, st in self.sequences_changed.items():
            # Gaps found since the last call: the store adds them to its counts.
            seqs[sensor] = (st.last, st.gaps, st.missing)
            st.gaps = st.missing = 0
        self.sequences_changed = {}
        expect, self.expect_changed = self.expect_changed, {}
        states, self.states_changed = self.states_changed, {}
        return SensorStatus(seqs, expect, states, devices)

    def carry_state(self, old: RouteTable) -> None:
        """A reloaded table goes on with the running one's per-device state."""
        self.buckets, self.counts = old.buckets, old.counts
        self.sequences, self.sequences_changed = old.sequences, old.sequences_changed
        self.route_seen, self.sensor_seen = old.route_seen, old.sensor_seen
        self.expect_changed = old.expect_changed
        self.format_state = old.format_state
        self.states_changed = old.states_changed
        self.commands = old.commands
        self.device_log = old.device_log
        self.devices_changed = old.devices_changed

    def sequence(self, sensor: str, seq: int) -> None:
        """Follow a device's message counter: a jump forward is a gap (messages
        lost upstream: device, network or broker); a step back is a redelivery
        or a device restart, not a gap."""
        state = self.sequences.recent(sensor)
        if state is None:
            # First seen (this run), or forgotten: no gap can be judged yet; the
            # store keeps the counts found before.
            state = self.sequences[sensor] = SequenceState(seq)
        elif seq > state.last:
            if seq > state.last + 1:
                missed = seq - state.last - 1
                state.gaps += 1
                state.missing += missed
                self.counts.sequence_gaps += 1
                self.counts.sequence_missing += missed
            state.last = seq
        elif seq < state.last and state.last - seq > _RESTART_BACKSTEP:
            state.last = seq  # the device restarted its counter
        else:
            return
        self.sequences_changed[sensor] = state

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
            if _matches(route, parts):
                values = {name: parts[pos] for pos, name in route.captures}
                # A format that names sensors from the payload gets the template.
                sensor = (
                    route.sensor_template
                    if route.fmt.sensor_fields
                    else route.sensor_template.format_map(values)
                )
                prefix = suffix = ""
                if route.fmt.metric_from == "field":
                    marker = "\x00"
                    metric = route.metric_template.format_map({**values, "field": marker})
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
                    values,
                )
        return None

    def allow(self, route: int, sensor: str, options: RouteOptions, n: int, now: float) -> int:
        """How many of `n` readings from this sensor the route's rate limit lets
        through now (a token bucket of `rate_burst`, refilled at `rate_limit`/s)."""
        key = (route, sensor)
        bucket = self.buckets.recent(key)
        if bucket is None:
            bucket = self.buckets[key] = [options.rate_burst, now]
        tokens = min(options.rate_burst, bucket[0] + max(now - bucket[1], 0.0) * options.rate_limit)
        allowed = min(n, int(tokens))
        bucket[0], bucket[1] = tokens - allowed, now
        return allowed


def restore_device_state(
    table: RouteTable, devices: dict[str, list[tuple[str, bytes, bytes]]]
) -> None:
    """Give each of the table's stateful formats what the store kept of it."""
    for fmt in table.stateful:
        rows = devices.get(fmt.name)
        if rows and fmt.load_state is not None:
            fmt.load_state(table, rows)


def filters_meet(a: str, b: str) -> bool:
    """True if some topic matches both MQTT filters (`a/+/c` and `a/b/#` do).

    A wildcard at the first level never matches a topic that starts with `$`
    (MQTT 4.7.2)."""
    x, y = a.split("/"), b.split("/")
    for i in range(max(len(x), len(y))):
        here = [f[i] for f in (x, y) if i < len(f)]
        if i == 0 and any(level.startswith("$") for level in here) and x[0] != y[0]:
            return False
        if "#" in here:
            return True
        if len(here) < 2:
            return False
        if "+" not in here and here[0] != here[1]:
            return False
    return True


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
