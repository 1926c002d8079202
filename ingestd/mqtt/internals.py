"""The internals of aiomqtt and paho-mqtt that `ingestd.mqtt.link` relies on
beyond their public API (see its docstring for why each is needed).

`tests/unit/test_mqtt_internals.py` checks that every one still exists, so an
upgrade of either library that removes one fails loudly in the tests, not
silently in production.
"""

from __future__ import annotations

from typing import Any

import aiomqtt
import paho.mqtt.client as paho

# (object, attribute) pairs the link depends on beyond the public API.
REQUIRED_INTERNALS: tuple[tuple[type[Any], str], ...] = (
    (aiomqtt.Client, "_on_socket_open"),
    (aiomqtt.Client, "_on_socket_close"),
    (aiomqtt.Client, "_misc_loop"),
    (paho.Client, "manual_ack_set"),
    (paho.Client, "ack"),
    (paho.Client, "loop_read"),
    (paho.Client, "_send_pingreq"),
    (paho.Client, "_sock_recv"),
    (paho.Client, "_handle_publish"),
    (paho.Client, "_handle_pubrel"),
    (paho.Client, "_send_pubrec"),
    (paho.Client, "_send_pubcomp"),
    (paho.Client, "_packet_handle"),
    (paho.Client, "_packet_queue"),
    (paho.Client, "_send_puback"),
    (paho.Client, "_easy_log"),
    (paho.Client, "_loop_rc_handle"),
)
# paho.Client instance attributes: `_ping_t` is non-zero while a PINGREQ is unanswered;
# `_sock` is the socket paho reads from (we put a buffer in front of it); `_in_packet`
# is the packet being handled ({"command": first byte, "packet": the rest});
# `_in_messages` holds QoS 2 messages waiting for PUBREL; `_last_bytes_received`
# and `_msgtime_mutex` are what its keepalive check reads.
REQUIRED_PAHO_ATTRS = (
    "_protocol",
    "_manual_ack",
    "_ping_t",
    "_sock",
    "_in_packet",
    "_in_messages",
    "_last_bytes_received",
    "_msgtime_mutex",
)
# Instance attributes of aiomqtt.Client (set in __init__) we rely on.
REQUIRED_INSTANCE_ATTRS = ("_client", "_disconnected", "_loop", "_misc_task")
