"""Payload formats, one module each, found by name.

`get("json")` is the `Format` a route names: its options (route keys), the
names its metric template may use, and its decoder. Config, routes, decode
and explain ask this registry; none of them names a format. Adding a format
is one module here (a `FORMAT = Format(...)`), one line below, and its tests.
"""

from __future__ import annotations

from ingestd.formats import homie, influx, json_objects, senml, sparkplug, value
from ingestd.formats.base import Format, FormatOptions, get, names, register

for _module in (json_objects, senml, influx, value, homie, sparkplug):
    register(_module.FORMAT)

__all__ = ["Format", "FormatOptions", "get", "names", "register"]
