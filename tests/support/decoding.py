"""A route table and the device state it decodes with, as the source holds
them: what the format and decode tests drive."""

from __future__ import annotations

from collections.abc import Collection, Iterable
from dataclasses import dataclass, field

from ingestd.decode import decode_all
from ingestd.devices import DeviceState
from ingestd.events import Reading, Rejected, SensorStatus
from ingestd.routes import RouteTable


@dataclass
class Decoding:
    table: RouteTable
    state: DeviceState = field(default_factory=DeviceState)

    def decode(
        self,
        deliveries: Iterable[tuple[str, bytes, int]],
        retained: Iterable[tuple[str, bytes, int]] = (),
        retained_at: Collection[int] = (),
        read_before: Collection[int] = (),
    ) -> tuple[list[Reading], list[Rejected]]:
        return decode_all(
            self.table,
            self.state,
            deliveries,
            retained=retained,
            retained_at=retained_at,
            read_before=read_before,
        )

    def take_status(self) -> SensorStatus:
        return self.state.take_status(self.table.stateful)
