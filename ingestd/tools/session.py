"""`ingestd forget-session`: remove the broker's persistent session of
`mqtt.client_id`.

ingestd's session (persistent by default) outlives the daemon: the broker
keeps queueing every message its subscriptions match, for `session_expiry`
seconds (MQTT 5) or for good (3.1.1), and drops them when the queue is full.
After a trial, or for an instance that is gone, connecting once under the
same id with a clean session (MQTT 3.1.1) or clean start and a session expiry
of 0 (MQTT 5), then disconnecting, makes the broker discard that session:
its subscriptions and whatever it held.
"""

from __future__ import annotations

import aiomqtt
import paho.mqtt.client as paho
from paho.mqtt.packettypes import PacketTypes
from paho.mqtt.properties import Properties

from ingestd.config import MqttSettings
from ingestd.errors import DataCommandError
from ingestd.mqtt.connect import connect_problem, tls_context


async def forget_session(s: MqttSettings) -> str:
    """Connect as `s.client_id` with a clean session and disconnect; return
    what was done, for the operator. Raises `DataCommandError` when the
    broker cannot be reached or refuses the connection."""
    v5 = s.protocol == "5"
    properties = None
    if v5:
        properties = Properties(PacketTypes.CONNECT)  # type: ignore[no-untyped-call]
        properties.SessionExpiryInterval = 0
    tls = s.tls
    context = (
        tls_context(tls.ca_file, tls.cert_file, tls.key_file, tls.insecure) if tls.enabled else None
    )
    broker = f"{s.host}:{s.port}"
    try:
        async with aiomqtt.Client(
            s.host,
            s.port,
            username=s.username,
            password=s.password.get_secret_value() if s.password is not None else None,
            identifier=s.client_id,
            protocol=aiomqtt.ProtocolVersion.V5 if v5 else aiomqtt.ProtocolVersion.V311,
            clean_session=None if v5 else True,
            clean_start=True if v5 else paho.MQTT_CLEAN_START_FIRST_ONLY,
            properties=properties,
            tls_context=context,
            tls_insecure=tls.insecure if context is not None else None,
            timeout=10,
        ):
            pass
    except aiomqtt.MqttError as exc:
        hint = connect_problem(exc)
        raise DataCommandError(
            f"cannot remove the session of client id {s.client_id!r}: broker {broker}: "
            + (hint or f"unreachable ({exc})")
        ) from None
    how = "clean start, session expiry 0 (MQTT 5)" if v5 else "clean session (MQTT 3.1.1)"
    return (
        f"removed the broker's session of client id {s.client_id!r} at {broker}, if it had "
        f"one: connected with {how} and disconnected; nothing is queued for that id any more"
    )
