"""`ingestd simulate`: publish realistic sample sensors to the configured broker.

Each sensor follows a slow daily cycle plus a random walk, and publishes a JSON
object with a device timestamp to `sensors/<sensor>/telemetry`; every fifth
round it also sends a plain number to `sensors/<sensor>/co2`. Those topics
match the routes of the shipped config/ingestd.toml.

With `--format sparkplug` each sensor is a Sparkplug B edge node instead
(`spBv1.0/ingestd-sim/...`): BIRTH, DATA by alias, rebirths on request, death
on stop.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import random
import signal
import sys
import time
from dataclasses import dataclass, field
from typing import Any

import aiomqtt
import msgspec

from ingestd.backoff import Backoff
from ingestd.config import MqttSettings, Settings
from ingestd.formats.sparkplug import REBIRTH
from ingestd.formats.sparkplug_pb import BY_NAME, Payload

_encode = msgspec.json.encode

PLACES = ("kitchen", "living-room", "bedroom", "cellar", "greenhouse", "garage", "attic", "office")


@dataclass
class SimSensor:
    name: str
    base_temp: float
    rng: random.Random
    temp_drift: float = 0.0
    humidity: float = field(default=45.0)
    co2: float = field(default=600.0)

    def sample(self, now: float) -> dict[str, float]:
        day = math.sin(2 * math.pi * ((now % 86400) / 86400 - 0.25))
        self.temp_drift = max(-3.0, min(3.0, self.temp_drift + self.rng.gauss(0, 0.05)))
        self.humidity = max(15.0, min(95.0, self.humidity + self.rng.gauss(0, 0.3)))
        self.co2 = max(400.0, min(2500.0, self.co2 + self.rng.gauss(0, 15)))
        return {
            "ts": round(now, 3),
            "temperature": round(self.base_temp + 3 * day + self.temp_drift, 2),
            "humidity": round(self.humidity, 1),
        }


def make_sensors(count: int, seed: int) -> list[SimSensor]:
    rng = random.Random(seed)
    sensors = []
    for i in range(count):
        place = PLACES[i % len(PLACES)]
        name = place if i < len(PLACES) else f"{place}-{i // len(PLACES) + 1}"
        sensors.append(SimSensor(name, rng.uniform(16, 24), random.Random(rng.random())))
    return sensors


def _stop_on_signals() -> asyncio.Event:
    """An event that SIGINT or SIGTERM sets."""
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    return stop


async def simulate(
    settings: Settings,
    *,
    sensors: int = 8,
    interval: float = 1.0,
    rounds: int = 0,
    qos: int = 1,
    seed: int = 1,
) -> int:
    """Publish until `rounds` rounds are done (0: until SIGINT/SIGTERM). Returns messages sent."""
    stop = _stop_on_signals()
    m = settings.mqtt
    fleet = make_sensors(sensors, seed)
    sent = 0
    readings = 0
    started = time.monotonic()

    def summary() -> int:
        print(
            f"simulator: sent {sent:,} messages ({readings:,} readings) at QoS {qos} to "
            f"{m.host}:{m.port} in {time.monotonic() - started:.1f} s",
            file=sys.stderr,
        )
        return sent

    password = m.password.get_secret_value() if m.password else None
    backoff = Backoff(0.5, 10.0)
    while not stop.is_set():
        try:
            async with aiomqtt.Client(
                m.host,
                m.port,
                username=m.username,
                password=password,
                identifier=f"ingestd-simulator-{seed}",
            ) as client:
                print(
                    f"simulator: publishing {sensors} sensors every {interval}s to "
                    f"{m.host}:{m.port}",
                    file=sys.stderr,
                )
                backoff.reset()
                done = 0
                next_round = time.monotonic()
                while (rounds == 0 or done < rounds) and not stop.is_set():
                    now = time.time()
                    for s in fleet:
                        sample = s.sample(now)
                        await client.publish(
                            f"sensors/{s.name}/telemetry", _encode(sample), qos=qos
                        )
                        sent += 1
                        readings += len(sample) - 1  # all but "ts"
                        if done % 5 == 0:
                            await client.publish(
                                f"sensors/{s.name}/co2", f"{s.co2:.0f}".encode(), qos=qos
                            )
                            sent += 1
                            readings += 1
                    done += 1
                    next_round += interval
                    with contextlib.suppress(TimeoutError):
                        async with asyncio.timeout(max(0.0, next_round - time.monotonic())):
                            await stop.wait()
                return summary()
        except aiomqtt.MqttError as exc:
            print(
                f"simulator: broker {m.host}:{m.port} unavailable ({exc}); retrying",
                file=sys.stderr,
            )
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(backoff.next()):
                    await stop.wait()
    return summary()


# -- Sparkplug B edge nodes ------------------------------------------------------

SPARKPLUG_GROUP = "ingestd-sim"
# name -> (alias, Sparkplug datatype, engUnit)
SPARKPLUG_METRICS = {
    "Environment/Temperature": (1, "Double", "°C"),
    "Environment/Humidity": (2, "Double", "%"),
    "Environment/CO2": (3, "Int32", "ppm"),
    "Status/Uptime": (4, "UInt64", "s"),
    "Status/Label": (5, "String", ""),
}


class EdgeNode:
    """One simulated Sparkplug B edge node (one sensor): NBIRTH with every
    metric by name, alias, datatype and engUnit; NDATA by alias only; the
    sequence wraps at 255; a rebirth request (NCMD) is answered with a new
    NBIRTH; NDEATH (also its will) carries the bdSeq of its birth."""

    def __init__(self, sensor: SimSensor, bd_seq: int) -> None:
        self.sensor = sensor
        self.bd_seq = bd_seq % 256
        self.seq = 0
        self.started = time.monotonic()
        self.rebirth = asyncio.Event()
        self.rebirths = 0

    def topic(self, kind: str) -> str:
        return f"spBv1.0/{SPARKPLUG_GROUP}/{kind}/{self.sensor.name}"

    def death(self) -> bytes:
        p = Payload(timestamp=int(time.time() * 1000))
        p.metrics.add(name="bdSeq", datatype=BY_NAME["UInt64"], long_value=self.bd_seq)
        return bytes(p.SerializeToString())

    def _values(self, now: float) -> dict[str, float | str]:
        sample = self.sensor.sample(now)
        return {
            "Environment/Temperature": sample["temperature"],
            "Environment/Humidity": sample["humidity"],
            "Environment/CO2": round(self.sensor.co2),
            "Status/Uptime": int(time.monotonic() - self.started),
            "Status/Label": self.sensor.name,
        }

    def birth(self, now: float) -> bytes:
        self.seq = 0
        p = Payload(timestamp=int(now * 1000), seq=0)
        p.metrics.add(name="bdSeq", datatype=BY_NAME["UInt64"], long_value=self.bd_seq)
        p.metrics.add(name=REBIRTH, datatype=BY_NAME["Boolean"], boolean_value=False)
        for name, value in self._values(now).items():
            alias, datatype, unit = SPARKPLUG_METRICS[name]
            m = p.metrics.add(name=name, alias=alias, datatype=BY_NAME[datatype])
            if unit:
                m.properties.keys.append("engUnit")
                m.properties.values.add(type=BY_NAME["String"], string_value=unit)
            _set_value(m, datatype, value)
        return bytes(p.SerializeToString())

    def data(self, now: float) -> bytes:
        self.seq = (self.seq + 1) % 256
        p = Payload(timestamp=int(now * 1000), seq=self.seq)
        for name, value in self._values(now).items():
            alias, datatype, _unit = SPARKPLUG_METRICS[name]
            if datatype != "String":  # unchanged: not sent again
                _set_value(p.metrics.add(alias=alias), datatype, value)
        return bytes(p.SerializeToString())

    def on_command(self, payload: bytes) -> None:
        try:
            metrics = Payload.FromString(payload).metrics
        except Exception:
            return
        if any(m.name == REBIRTH and m.boolean_value for m in metrics):
            self.rebirths += 1
            self.rebirth.set()


def _set_value(m: Any, datatype: str, value: float | str) -> None:
    if datatype == "Double":
        m.double_value = float(value)
    elif datatype == "Float":
        m.float_value = float(value)
    elif datatype == "Int32":
        m.int_value = int(value) & 0xFFFFFFFF
    elif datatype == "UInt64":
        m.long_value = int(value)
    else:
        m.string_value = str(value)


async def simulate_sparkplug(
    settings: Settings,
    *,
    sensors: int = 8,
    interval: float = 1.0,
    rounds: int = 0,
    qos: int = 0,
    seed: int = 1,
) -> int:
    """Each sensor as a Sparkplug B edge node of group `ingestd-sim`, on its own
    connection (its NDEATH is its will). Returns the DATA messages sent."""
    fleet = _Fleet(settings.mqtt, _stop_on_signals(), interval=interval, rounds=rounds, qos=qos)
    nodes = [EdgeNode(s, int(time.time()) + i) for i, s in enumerate(make_sensors(sensors, seed))]
    started = time.monotonic()
    m = settings.mqtt
    print(
        f"simulator: {sensors} Sparkplug B edge nodes (group {SPARKPLUG_GROUP}) publishing "
        f"every {interval}s to {m.host}:{m.port}",
        file=sys.stderr,
    )
    await asyncio.gather(*(fleet.run(n) for n in nodes))
    print(
        f"simulator: sent {fleet.sent:,} NDATA messages, answered "
        f"{sum(n.rebirths for n in nodes)} rebirth request(s), in "
        f"{time.monotonic() - started:.1f} s",
        file=sys.stderr,
    )
    return fleet.sent


class _Fleet:
    """What the edge nodes of one run share: the broker, the pace, the stop,
    and the count of NDATA messages they sent."""

    def __init__(
        self, mqtt: MqttSettings, stop: asyncio.Event, *, interval: float, rounds: int, qos: int
    ) -> None:
        self.mqtt, self.stop = mqtt, stop
        self.password = mqtt.password.get_secret_value() if mqtt.password else None
        self.interval, self.rounds, self.qos = interval, rounds, qos
        self.sent = 0

    async def run(self, node: EdgeNode) -> None:
        """One node, connected until its rounds are done or the stop: BIRTH on
        each connection, DEATH at the end (also its will), a reconnect with
        backoff while the broker is away."""
        m = self.mqtt
        backoff = Backoff(0.5, 10.0)
        while not self.stop.is_set():
            try:
                async with aiomqtt.Client(
                    m.host,
                    m.port,
                    username=m.username,
                    password=self.password,
                    identifier=f"ingestd-sim-{node.sensor.name}",
                    will=aiomqtt.Will(node.topic("NDEATH"), node.death(), qos=1),
                ) as client:
                    await client.subscribe(node.topic("NCMD"), qos=0)
                    listener = asyncio.ensure_future(_commands(client, node))
                    try:
                        await client.publish(
                            node.topic("NBIRTH"), node.birth(time.time()), qos=self.qos
                        )
                        backoff.reset()
                        await self._rounds(client, node)
                        with contextlib.suppress(aiomqtt.MqttError, TimeoutError):
                            async with asyncio.timeout(2):
                                await client.publish(node.topic("NDEATH"), node.death(), qos=1)
                        return
                    finally:
                        listener.cancel()
                        await asyncio.gather(listener, return_exceptions=True)
            except aiomqtt.MqttError as exc:
                if self.stop.is_set():
                    return  # stopping: the broker may be gone first (quickstart's Ctrl-C)
                print(
                    f"simulator: {node.sensor.name}: broker {m.host}:{m.port} unavailable "
                    f"({exc}); retrying",
                    file=sys.stderr,
                )
                with contextlib.suppress(TimeoutError):
                    async with asyncio.timeout(backoff.next()):
                        await self.stop.wait()

    async def _rounds(self, client: aiomqtt.Client, node: EdgeNode) -> None:
        """A message every interval until the rounds are done or the stop: DATA,
        or a new BIRTH when a rebirth was asked for."""
        done = 0
        next_round = time.monotonic() + self.interval
        while (self.rounds == 0 or done < self.rounds) and not self.stop.is_set():
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(max(0.0, next_round - time.monotonic())):
                    await self.stop.wait()
            if self.stop.is_set():
                break
            if node.rebirth.is_set():
                # This round's values go in the BIRTH (one sample, one time:
                # never two values at one timestamp).
                node.rebirth.clear()
                await client.publish(node.topic("NBIRTH"), node.birth(time.time()), qos=self.qos)
            else:
                await client.publish(node.topic("NDATA"), node.data(time.time()), qos=self.qos)
                self.sent += 1
            done += 1
            next_round += self.interval


async def _commands(client: aiomqtt.Client, node: EdgeNode) -> None:
    async for message in client.messages:
        node.on_command(bytes(message.payload) if isinstance(message.payload, bytes) else b"")
