"""Which limit and which scaling apply to a reading, and which keys never applied.

Three scopes, the most specific first; the limit and the scaling are each
resolved on their own (a rule that sets only a limit leaves the scaling to
the route's or the global one):

1. `[[processor.rules]]`: a sensor glob and a metric, the first matching rule
   in the file;
2. the reading's route's `limits` / `scaling` tables, by metric;
3. `[processor.limits]` / `[processor.scaling]`, by metric.

A glob match per reading would cost the hot path: the answer is resolved once
per series (topic, sensor, metric; per metric alone where nothing is scoped)
and kept in a `RecentCache`, bounded like every per-device cache.

A key is "matched" when a series resolves to it, whether it wins or a more
specific one does: what is reported is a key that names nothing ingestd sees,
a typo in all likelihood, which the otherwise strict config cannot catch at
load (metric names come from the devices). After `report_unmatched_after`
seconds of traffic (from the first reading after the rules took effect, judged
at a later reading: an idle daemon reports nothing) each key still unmatched
is logged once, with the names seen that come closest, and listed in
`ingestd_processor_key_unmatched`. A reload keeps what unchanged keys
matched (and a report of them); keys it adds get a window of their own.
"""

from __future__ import annotations

import difflib
import math
from collections.abc import Sequence
from dataclasses import dataclass
from fnmatch import fnmatchcase

import structlog

from ingestd.config import Limit, ProcessorSettings, RouteSettings, Scaling
from ingestd.events import Reading
from ingestd.recent import RecentCache
from ingestd.routes import RouteTable

log = structlog.get_logger("ingestd.metric_rules")

# Series whose resolution the cache keeps, and names kept for "did you mean".
KEPT = 65536
NAMES_KEPT = 4096


@dataclass(frozen=True, slots=True)
class Applied:
    """What applies to one series: the scaling and the limit, each with the
    config key it comes from ("" for none)."""

    scaling: Scaling | None = None
    scaling_key: str = ""
    lo: float = -math.inf
    hi: float = math.inf
    limit: Limit | None = None
    limit_key: str = ""

    def describe(self) -> str:
        """One line for `explain`: what applies, and where it is set."""
        parts = []
        if self.limit is not None:
            lo = "" if self.limit.min is None else f"{self.limit.min:g}"
            hi = "" if self.limit.max is None else f"{self.limit.max:g}"
            parts.append(f"limit [{lo or '-inf'}, {hi or 'inf'}] from {self.limit_key}")
        if self.scaling is not None:
            s = self.scaling
            unit = f" {s.unit}" if s.unit else ""
            parts.append(f"scaling *{s.scale:g} {s.offset:+g}{unit} from {self.scaling_key}")
        return "; ".join(parts) or "no limit, no scaling"


NOTHING = Applied()


@dataclass(frozen=True, slots=True)
class _Scope:
    """The limits and scalings one scope holds, by metric, and the prefix of
    their keys' names."""

    key: str
    limits: dict[str, Limit]
    scaling: dict[str, Scaling]


def route_key(route: RouteSettings) -> str:
    """How a route's keys are named in reports: by its topic (a shared group's
    member and primary each hold a part of the routes, so not by position)."""
    return f"routes[{route.topic}]"


class MetricRules:
    """The processor's limits and scalings, resolved per series.

    `scaled=False`: no scaling at all (readings scaled when first stored:
    `ingestd import` of exported rows, a replayed record scaled already)."""

    def __init__(
        self,
        processor: ProcessorSettings,
        routes: Sequence[RouteSettings] = (),
        *,
        scaled: bool = True,
        kept: int = KEPT,
    ) -> None:
        self.scaled = scaled
        self.rules = [
            (rule, rule.limit(), rule.scaling() if scaled else None) for rule in processor.rules
        ]
        self.rules = [r for r in self.rules if r[1] is not None or r[2] is not None]
        self.glob = _Scope("processor", processor.limits, processor.scaling if scaled else {})
        self.routes = [_Scope(route_key(r), r.limits, r.scaling if scaled else {}) for r in routes]
        by_route = any(s.limits or s.scaling for s in self.routes)
        self.table = (
            RouteTable([r.compile(i) for i, r in enumerate(routes)], kept=1024)
            if by_route
            else None
        )
        # Per series when a rule or a route scopes something, else per metric.
        self.scoped = bool(self.rules) or by_route
        self.active = self.scoped or bool(self.glob.limits or self.glob.scaling)
        self.cache: RecentCache[object, Applied] = RecentCache(kept)
        self.usage = KeyUsage(self._keys(), processor.report_unmatched_after)

    def _keys(self) -> dict[str, tuple[str, str]]:
        """Every key that can match: its name -> (metric, sensor glob or "")."""
        keys: dict[str, tuple[str, str]] = {}
        for scope in (self.glob, *self.routes):
            for kind, table in (("limits", scope.limits), ("scaling", scope.scaling)):
                keys.update({f"{scope.key}.{kind}.{m}": (m, "") for m in table})
        for i, (rule, _, _) in enumerate(self.rules):
            keys[_rule_key(i, rule.sensor, rule.metric)] = (rule.metric, rule.sensor)
        return keys

    def applied(self, r: Reading) -> Applied:
        """What applies to `r`'s series (cached; resolved on a miss)."""
        key: object = (r.topic, r.sensor, r.metric) if self.scoped else r.metric
        found = self.cache.recent(key)
        if found is None:
            found = self.cache[key] = self.resolve(r.topic, r.sensor, r.metric)
        return found

    def resolve(self, topic: str, sensor: str, metric: str) -> Applied:
        """The scaling and the limit for a series, most specific first; every
        key that matches is marked as matched, the winner or not."""
        limits: list[tuple[str, Limit]] = []
        scalings: list[tuple[str, Scaling]] = []
        for i, (rule, limit, scaling) in enumerate(self.rules):
            if rule.metric == metric and fnmatchcase(sensor, rule.sensor):
                name = _rule_key(i, rule.sensor, rule.metric)
                if limit is not None:
                    limits.append((name, limit))
                if scaling is not None:
                    scalings.append((name, scaling))
        scopes = [self.glob]
        if self.table is not None:
            match = self.table.match(topic)
            if match is not None:
                scopes.insert(0, self.routes[match.route])
        for scope in scopes:
            if metric in scope.limits:
                limits.append((f"{scope.key}.limits.{metric}", scope.limits[metric]))
            if metric in scope.scaling:
                scalings.append((f"{scope.key}.scaling.{metric}", scope.scaling[metric]))
        self.usage.saw(sensor, metric, [k for k, _ in limits] + [k for k, _ in scalings])
        if not limits and not scalings:
            return NOTHING
        out = Applied()
        if scalings:
            out = Applied(scalings[0][1], scalings[0][0])
        if limits:
            key, lim = limits[0]
            lo = -math.inf if lim.min is None else lim.min
            hi = math.inf if lim.max is None else lim.max
            out = Applied(out.scaling, out.scaling_key, lo, hi, lim, key)
        return out


def _rule_key(i: int, sensor: str, metric: str) -> str:
    return f"processor.rules[{i}] (sensor {sensor!r}, metric {metric!r})"


class KeyUsage:
    """Which keys matched a series since the rules took effect; the report of
    those that did not after `after` seconds of traffic."""

    def __init__(self, keys: dict[str, tuple[str, str]], after: float) -> None:
        self.keys = keys
        self.after = after
        self.unmatched = set(keys)
        self.metrics: set[str] = set()
        self.sensors: set[str] = set()
        self.readings = 0
        self.first_at: float | None = None
        self.reported: list[str] = []
        # Whether `watch` has anything left to do (read per chunk).
        self.watching = bool(keys) and after > 0

    def carry(self, old: KeyUsage) -> None:
        """A reload: what the keys it keeps unchanged had matched, and the
        names seen, go on; the window goes on too unless keys were added."""
        self.metrics |= old.metrics
        self.sensors |= old.sensors
        for key, what in self.keys.items():
            if old.keys.get(key) == what:
                if key not in old.unmatched:
                    self.unmatched.discard(key)
                if key in old.reported:
                    self.reported.append(key)
        if self.keys.keys() <= old.keys.keys():
            self.first_at, self.readings = old.first_at, old.readings
        self.watching = self.after > 0 and bool(self.unmatched - set(self.reported))

    def saw(self, sensor: str, metric: str, matched: list[str]) -> None:
        self.unmatched.difference_update(matched)
        if len(self.metrics) < NAMES_KEPT:
            self.metrics.add(metric)
        if len(self.sensors) < NAMES_KEPT:
            self.sensors.add(sensor)

    @property
    def unmatched_reported(self) -> list[str]:
        """The keys reported that still matched nothing (the metric's labels)."""
        return [k for k in self.reported if k in self.unmatched]

    def watch(self, now: float, readings: int) -> None:
        """A chunk of `readings` processed at `now`: the report, once it is due."""
        if not readings:
            return
        self.readings += readings
        if self.first_at is None:
            self.first_at = now
            return
        if now - self.first_at < self.after:
            return
        self.watching = False
        for key in sorted(self.unmatched - set(self.reported)):  # each said once
            self.reported.append(key)
            metric, glob = self.keys[key]
            close: list[str] = []
            if metric not in self.metrics:
                close = difflib.get_close_matches(metric, sorted(self.metrics), n=3)
            elif glob:
                close = difflib.get_close_matches(glob, sorted(self.sensors), n=3, cutoff=0.4)
            log.warning(
                "a limit or scaling key matched no reading: is it misspelt?",
                key=key,
                did_you_mean=close,
                seconds=round(now - self.first_at),
                readings=self.readings,
            )
