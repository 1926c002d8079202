"""`ingestd simulate`: publish realistic sample sensors to the configured broker.

Each sensor follows a slow daily cycle plus a random walk, and publishes a JSON
object with a device timestamp to `sensors/<sensor>/telemetry`; every fifth
round it also sends a plain number to `sensors/<sensor>/co2`. Those topics
match the routes of the shipped config/ingestd.toml.
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

import aiomqtt
import msgspec

from ingestd.backoff import Backoff
from ingestd.config import Settings

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
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
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
