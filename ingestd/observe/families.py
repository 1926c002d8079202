"""How a metric family is read at scrape time: one `Definition` per family
(name, help, type, labels, how a `Scrape` reads it), so that
`ingestd.observe.metrics` is the table of what is exposed and nothing else."""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from functools import cached_property
from typing import TYPE_CHECKING, Literal

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from ingestd.observe.health import Health

if TYPE_CHECKING:
    from prometheus_client.metrics_core import Metric

    from ingestd.observe.health import Accounting, Tally
    from ingestd.observe.upstream import UpstreamWatch

# A family's samples: (label values, value) each.
Samples = Iterable[tuple[Sequence[str], float]]


class Scrape:
    """What one scrape reads: each part once, and only when a family asks
    (the tally is a snapshot taken on the event loop)."""

    def __init__(self, health: Health) -> None:
        self.health = health
        self.pipelines = health.running()

    @cached_property
    def tally(self) -> Tally:
        return self.health.fresh_tally()

    @property
    def accounting(self) -> Accounting:
        return self.tally.accounting

    @property
    def upstream(self) -> UpstreamWatch:
        assert self.health.upstream is not None, "read only where `watched`"
        return self.health.upstream


def always(s: Scrape) -> bool:
    return True


def watched(s: Scrape) -> bool:
    return s.health.upstream is not None


@dataclass(frozen=True)
class Definition:
    """One metric family: what it is called and means, how a scrape reads it,
    and whether it is shown at all."""

    name: str
    help: str
    type: Literal["counter", "gauge"]
    read: Callable[[Scrape], Samples]
    labels: tuple[str, ...] = ()
    shown: Callable[[Scrape], bool] = always

    def family(self, s: Scrape) -> Metric:
        make = CounterMetricFamily if self.type == "counter" else GaugeMetricFamily
        family = make(self.name, self.help, labels=self.labels)
        for labels, value in self.read(s):
            family.add_metric(labels, value)
        return family


def counter(
    name: str, help: str, read: Callable[[Scrape], float], shown: Callable[[Scrape], bool] = always
) -> Definition:
    return Definition(name, help, "counter", lambda s: [((), read(s))], shown=shown)


def gauge(
    name: str, help: str, read: Callable[[Scrape], float], shown: Callable[[Scrape], bool] = always
) -> Definition:
    return Definition(name, help, "gauge", lambda s: [((), read(s))], shown=shown)


def flag(on: bool) -> int:
    return 1 if on else 0
