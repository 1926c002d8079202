"""A Sparkplug B edge node for the tests: paho, the same protobuf definitions,
and a record of everything it sent, so the tests can check every stored value
against it. It answers rebirth requests (NCMD Node Control/Rebirth) with a new
NBIRTH, and can skip a sequence number on purpose."""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field

import paho.mqtt.client as mqtt
from paho.mqtt.enums import CallbackAPIVersion

from ingestd.formats.sparkplug import REBIRTH
from ingestd.formats.sparkplug_pb import BY_NAME, Payload

# name -> (alias, datatype, unit)
METRICS = {
    "Line/Temperature": (1, "Double", "°C"),
    "Line/Pressure": (2, "Float", "bar"),
    "Line/Count": (3, "Int32", ""),
    "Line/Running": (4, "Boolean", ""),
}


def value_of(name: str, i: int) -> float:
    """What the node sends for metric `name` in its i-th DATA (exact in every type)."""
    if name == "Line/Temperature":
        return 20 + i / 8
    if name == "Line/Pressure":
        return 1 + (i % 64) / 16
    if name == "Line/Count":
        return float(i - 5000)
    return float(i % 2)


def _set(m: object, datatype: str, v: float) -> None:
    if datatype == "Double":
        m.double_value = v  # type: ignore[attr-defined]
    elif datatype == "Float":
        m.float_value = v  # type: ignore[attr-defined]
    elif datatype == "Int32":
        m.int_value = int(v) & 0xFFFFFFFF  # type: ignore[attr-defined]
    else:
        m.boolean_value = bool(v)  # type: ignore[attr-defined]


@dataclass
class EdgeNode:
    port: int
    group: str = "plant"
    node: str = "press-1"
    # An hour ago: DATA i is stamped t0 + 10 i ms, within the processor's clock limits.
    t0_ms: int = field(default_factory=lambda: int(time.time() * 1000) - 3_600_000)
    bd_seq: int = 0
    seq: int = 0
    # ts_ms -> {metric: value} of every DATA and BIRTH sent
    sent: dict[int, dict[str, float]] = field(default_factory=dict)
    data_sent: int = 0
    # name -> alias, as the last BIRTH declared (METRICS' unless `birth` said otherwise)
    aliases: dict[str, int] = field(
        default_factory=lambda: {name: alias for name, (alias, _t, _u) in METRICS.items()}
    )
    births: int = 0
    rebirth_requests: int = 0
    _lock: threading.Lock = field(default_factory=threading.Lock)
    _rebirth: threading.Event = field(default_factory=threading.Event)
    _subscribed: threading.Event = field(default_factory=threading.Event)
    _connected_before: bool = False

    def topic(self, kind: str) -> str:
        return f"spBv1.0/{self.group}/{kind}/{self.node}"

    def connect(self) -> EdgeNode:
        self.client = mqtt.Client(CallbackAPIVersion.VERSION2, client_id=f"edge-{self.node}")
        self.client.max_inflight_messages_set(1000)
        self.client.max_queued_messages_set(0)
        self.client.will_set(self.topic("NDEATH"), self._death(), qos=1)
        self.client.on_message = self._on_message
        self.client.on_connect = self._on_connect
        self.client.reconnect_delay_set(1, 1)
        self.client.connect("127.0.0.1", self.port)
        self.client.loop_start()
        self.wait_connected()
        return self

    def _on_connect(self, client: mqtt.Client, *_args: object) -> None:
        # Again after every reconnect (a broker restart): the session is clean.
        client.subscribe(self.topic("NCMD"), 0)
        if self._connected_before:
            # A new session, a new BIRTH (before the next DATA), as nodes do:
            # the broker published the old session's NDEATH.
            self._rebirth.set()
        self._connected_before = True
        self._subscribed.set()

    def expect_reconnect(self) -> None:
        """Before its broker restarts: `wait_connected` then waits for the new connection."""
        self._subscribed.clear()

    def wait_connected(self, timeout: float = 10) -> None:
        """Until connected and subscribed to its commands (after a broker restart too)."""
        deadline = time.monotonic() + timeout
        while not (self.client.is_connected() and self._subscribed.is_set()):
            assert time.monotonic() < deadline, "the edge node did not (re)connect"
            time.sleep(0.01)
        time.sleep(0.2)

    def _death(self) -> bytes:
        p = Payload(timestamp=int(time.time() * 1000))
        p.metrics.add(name="bdSeq", datatype=BY_NAME["UInt64"], long_value=self.bd_seq)
        return bytes(p.SerializeToString())

    def _on_message(self, _c: mqtt.Client, _u: object, msg: mqtt.MQTTMessage) -> None:
        for m in Payload.FromString(msg.payload).metrics:
            if m.name == REBIRTH and m.boolean_value:
                self.rebirth_requests += 1
                self._rebirth.set()

    def _publish(self, kind: str, p: object) -> None:
        info = self.client.publish(self.topic(kind), p.SerializeToString(), qos=1)  # type: ignore[attr-defined]
        assert info.rc == 0, info.rc

    def birth(self, i: int, aliases: dict[str, int] | None = None) -> None:
        """NBIRTH (seq 0): every metric by name and alias, with its unit and the
        value of DATA i, stamped t0 + i ms (+ 0.5 ms apart from DATA i: a BIRTH
        carries its own time). `aliases`: other aliases than METRICS' (a node
        whose configuration changed), used by the DATA that follow."""
        with self._lock:
            self.seq = 0
            if aliases is not None:
                self.aliases = dict(aliases)
            ts = self.t0_ms + i * 10 + 5
            p = Payload(timestamp=ts, seq=0)
            p.metrics.add(name="bdSeq", datatype=BY_NAME["UInt64"], long_value=self.bd_seq)
            values: dict[str, float] = {}
            for name, (_alias, datatype, unit) in METRICS.items():
                alias = self.aliases[name]
                m = p.metrics.add(name=name, alias=alias, datatype=BY_NAME[datatype])
                if unit:
                    m.properties.keys.append("engUnit")
                    m.properties.values.add(type=BY_NAME["String"], string_value=unit)
                _set(m, datatype, value_of(name, i))
                values[name] = value_of(name, i)
            p.metrics.add(name=REBIRTH, datatype=BY_NAME["Boolean"], boolean_value=False)
            self.sent[ts] = values
            self.births += 1
            self._publish("NBIRTH", p)

    def data(self, i: int, *, skip_seq: bool = False, lost: int = 0) -> None:
        """NDATA i: every metric by alias only, stamped t0 + 10 i ms.
        `skip_seq` (one) or `lost` (that many): sequence numbers lost on the way."""
        if self._rebirth.is_set():  # answer a rebirth request first, as nodes do
            self._rebirth.clear()
            self.birth(i)
        with self._lock:
            # Lost, as if the network ate them.
            self.seq = (self.seq + lost + (1 if skip_seq else 0)) % 256
            self.seq = (self.seq + 1) % 256
            ts = self.t0_ms + i * 10
            p = Payload(timestamp=ts, seq=self.seq)
            values: dict[str, float] = {}
            for name, (_alias, datatype, _unit) in METRICS.items():
                m = p.metrics.add(alias=self.aliases[name])
                _set(m, datatype, value_of(name, i))
                values[name] = value_of(name, i)
            self.sent[ts] = values
            self.data_sent += 1
            self._publish("NDATA", p)

    def death(self) -> None:
        p = Payload(timestamp=int(time.time() * 1000))
        p.metrics.add(name="bdSeq", datatype=BY_NAME["UInt64"], long_value=self.bd_seq)
        self._publish("NDEATH", p)

    def close(self) -> None:
        time.sleep(0.3)
        self.client.disconnect()
        self.client.loop_stop()
