"""What a payload format is: the one object config, routes, decode and explain ask.

A `Format` declares
- `options`: the route keys it takes beyond the common ones (a pydantic model:
  config validates a route's extra keys against it, so a key another format
  takes, or a typo, is an error naming the key);
- `template_fields` and `metric_from`: the names its metric template may use
  beyond the topic's, and how a metric name is made (from the topic alone,
  topic + one payload name, or per reading by the decoder);
- `decode`: bytes to readings, raising only `DecodeError`;
- `prepare`: validated options to what the decoder reads per message (a
  slotted struct on the hot path instead of a pydantic model).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

from pydantic import BaseModel, ConfigDict

from ingestd.events import Reading, Rejected

if TYPE_CHECKING:
    from ingestd.devices import DeviceState


class FormatOptions(BaseModel):
    """A format's own route keys (none by default)."""

    model_config = ConfigDict(extra="forbid", frozen=True, allow_inf_nan=False)


Decoder = Callable[
    ["DecodeContext", "RouteMatch", str, bytes, int, list[Reading], list[Rejected]], None
]
# "topic": the metric template over the topic's names is the whole metric name.
# "field": the template holds {field} once; the name is prefix + field + suffix.
# "payload": the decoder formats the template per reading (several payload names).
MetricFrom = Literal["topic", "field", "payload"]


def _same(options: FormatOptions) -> Any:
    return options


@dataclass(frozen=True, slots=True)
class Format:
    name: str
    # One line for `explain` and error messages: what a payload of this format is.
    summary: str
    decode: Decoder
    options: type[FormatOptions] = FormatOptions
    template_fields: frozenset[str] = frozenset()
    metric_from: MetricFrom = "topic"
    default_metric: str = "{metric}"
    prepare: Callable[[FormatOptions], Any] = field(default=_same)
    # Names the sensor template may use beyond the topic's. A format with any
    # names the sensor per message: RouteMatch.sensor is then the template,
    # formatted by the decoder.
    sensor_fields: frozenset[str] = frozenset()
    default_sensor: str = "{sensor}"
    # A route's `retained` unless it says otherwise: "store" for a format whose
    # meaning arrives in retained messages (descriptions, births).
    default_retained: str = "ignore"
    # The name a metric template must contain when a payload carries several
    # values (else they would all get one metric name).
    metric_requires: tuple[str, ...] = ("field",)  # one of these
    # For `explain`: what the format knows from earlier messages that bears on
    # this topic (lines of text), for formats with state; None for the rest.
    describe_state: Callable[[DeviceState, str], list[str]] | None = None
    # Topic filters for the messages in which devices describe themselves
    # (Homie's `$` topics), given a route's filter; the source keeps those the
    # route's filter covers. In a shared group they are subscribed outside it,
    # so every member has every description (and retained ones at subscribe,
    # which a shared subscription does not get). None: the format keeps no
    # descriptions.
    state_topics: Callable[[str], list[str]] | None = None
    # Device state that must outlive the process (a Sparkplug node's BIRTH and
    # sequence: without it every node is unknown after a restart until it is
    # born again). `save_state(state)` takes what changed since the last call,
    # {device: (position, description or None if unchanged)}; the store keeps
    # it with the chunk, and `load_state(state, rows)` puts it back at start
    # (rows of (device, position, description), the most recent first).
    save_state: Callable[[DeviceState], dict[str, tuple[bytes, bytes | None]]] | None = None
    load_state: Callable[[DeviceState, list[tuple[str, bytes, bytes]]], None] | None = None
    # Whether the decoder needs to know which redelivered messages (DUP) this
    # process has read already (the source then remembers what each QoS 1/2
    # packet id carried): a format whose state depends on message order must
    # not read a message twice, nor skip one it never read.
    tells_redeliveries: bool = False
    # Why the format cannot be read in parts (None: it can): in a shared group
    # its routes are read by the group's primary (`ingestd.primary`), and
    # check-config gives this reason where that cannot be (SQLite).
    unshareable: str | None = None

    def option_names(self) -> list[str]:
        return sorted(self.options.model_fields)


_REGISTRY: dict[str, Format] = {}


def register(fmt: Format) -> Format:
    if fmt.name in _REGISTRY:
        raise ValueError(f"format {fmt.name!r} is registered twice")
    _REGISTRY[fmt.name] = fmt
    return fmt


def get(name: str) -> Format:
    """The format called `name`; KeyError names the known ones."""
    try:
        return _REGISTRY[name]
    except KeyError:
        raise KeyError(f"unknown format {name!r} (known: {', '.join(names())})") from None


def names() -> list[str]:
    return list(_REGISTRY)


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
    # The topic's captured levels, in the route's order of `capture_names`
    # (the route's tuple, shared): a tuple, not a dict, as a route cache holds
    # one per topic (65,536 topics: a one-entry dict each took ~13 MB).
    captured: tuple[str, ...] = ()
    capture_names: tuple[str, ...] = ()

    @property
    def values(self) -> dict[str, str]:
        """The captured levels by name, for a template's format_map (a new dict)."""
        return dict(zip(self.capture_names, self.captured, strict=True))


@dataclass(slots=True)
class DecodeContext:
    """What a format's decoder may read and change besides its message: the
    pipeline's device state, the input limits, and, for the message being
    decoded, whether the broker re-sent it because we subscribed (`retained`)
    and whether it is a redelivery this process read before (`read_before`)."""

    state: DeviceState
    limits: InputLimits
    retained: bool = False
    read_before: bool = False
