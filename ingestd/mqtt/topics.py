"""MQTT topic filters, as the broker reads them: matching, covering, meeting,
and the subscription plan built on them.

A filter is levels split at `/`, `+` matching one level and a last `#` the
rest (its parent included: `a/#` matches `a`). One more rule, written once
here (`_hidden`): a wildcard at a filter's first level never matches a topic
whose first level starts with `$` (MQTT 4.7.2), so `#` gets nothing of
`$SYS/...`.

Routes match topics with `levels_match`; config orders the routes whose
filters meet (`filters_meet`); the source subscribes to `subscription_plan`'s
filters and names the routes a filter serves with `filter_covers`. Strings
in, answers out: nothing here knows routes or readings.
"""

from __future__ import annotations

from collections.abc import Sequence


def _hidden(filter_level: str, topic_level: str) -> bool:
    """True if a filter's first level cannot match a topic's (or another
    filter's) first level by the `$` rule (MQTT 4.7.2): the one is a wildcard
    and the other starts with `$`."""
    return filter_level in ("+", "#") and topic_level.startswith("$")


def levels_match(levels: Sequence[str | None], multi: bool, parts: Sequence[str]) -> bool:
    """True if the topic split into `parts` matches the filter given as its
    levels before any `#` (None for a `+`) and whether it ends in `#` (`multi`)."""
    n = len(levels)
    if multi:
        # 'a/#' matches 'a' itself and everything below it.
        if len(parts) < n:
            return False
    elif len(parts) != n:
        return False
    first = levels[0] if n else "#"
    if parts and _hidden("+" if first is None else first, parts[0]):
        return False
    for want, got in zip(levels, parts, strict=False):
        if want is not None and want != got:
            return False
    return True


def filter_covers(outer: str, inner: str) -> bool:
    """True if every topic matching filter `inner` also matches filter `outer`.

    By the `$` rule, `#` does not cover `$SYS/#`.
    """
    a, b = outer.split("/"), inner.split("/")
    if _hidden(a[0], b[0]):
        return False
    for i, level in enumerate(a):
        if level == "#":
            return True
        if i >= len(b):
            return False
        if b[i] == "#":
            return False
        if level != "+" and level != b[i]:
            return False
    return len(a) == len(b)


def filters_meet(a: str, b: str) -> bool:
    """True if some topic matches both filters (`a/+/c` and `a/b/#` do).

    By the `$` rule, `#` and `$SYS/#` do not meet."""
    x, y = a.split("/"), b.split("/")
    if _hidden(x[0], y[0]) or _hidden(y[0], x[0]):
        return False
    for i in range(max(len(x), len(y))):
        here = [f[i] for f in (x, y) if i < len(f)]
        if "#" in here:
            return True
        if len(here) < 2:
            return False
        if "+" not in here and here[0] != here[1]:
            return False
    return True


def subscription_plan(
    wanted: Sequence[tuple[str, int]],
    shared_group: str = "",
    descriptions: Sequence[tuple[str, int]] = (),
) -> list[tuple[str, int]]:
    """The (filter, QoS) pairs to subscribe for the `wanted` ones, without overlap.

    A broker delivers a message once per matching subscription (Mosquitto 2
    does, for 3.1.1 and 5 alike), so a filter covered by another one is not
    subscribed: `sensors/+/telemetry` is left out next to `sensors/+/+`. The
    covering filter gets the highest QoS of those it covers.

    In a shared group the wanted filters are subscribed through it
    (`$share/<group>/...`), and `descriptions`, the topics in which devices
    describe themselves, outside it as well: every member needs every
    description, and through the group a live one reaches one member.
    Retained ones are not sent to a shared subscription at all by the MQTT 5
    rule (4.8.2; Mosquitto 2.0.11, measured, does send them to each member at
    its subscribe). A member may then get such a message twice (measured:
    over MQTT 5, not 3.1.1).
    """
    if not shared_group:
        return _without_overlap(wanted)
    shared = [(f"$share/{shared_group}/{t}", q) for t, q in _without_overlap(wanted)]
    return shared + _without_overlap(descriptions)


def _without_overlap(wanted: Sequence[tuple[str, int]]) -> list[tuple[str, int]]:
    kept: dict[str, int] = {}
    for topic, _ in wanted:
        if any(other != topic and filter_covers(other, topic) for other, _ in wanted):
            continue
        kept.setdefault(topic, 0)
    for topic, qos in wanted:
        for keeper, current in kept.items():
            if filter_covers(keeper, topic):
                kept[keeper] = max(current, qos)
    return list(kept.items())
