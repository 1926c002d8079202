"""Baseline (a): the library's own ceiling. A bare aiomqtt loop that only counts.

Prints one JSON line: {"count", "first", "last", "cpu", "rss_kb"}; "first" is
the time the connection was established.
"""

from __future__ import annotations

import time

import aiomqtt
import uvloop

from bench.consumers import arguments, report


async def main(port: int, expect: int, qos: int, client_id: str) -> None:
    count = 0
    last = 0.0
    async with aiomqtt.Client(
        "127.0.0.1", port, identifier=client_id, clean_session=False
    ) as client:
        # Timed from the connection: a persistent session's backlog starts
        # flowing (into aiomqtt's queue) before subscribe() returns.
        first = time.time()
        await client.subscribe("sensors/+/+", qos)
        async for _message in client.messages:
            count += 1
            if count >= expect:
                last = time.time()
                break
    report(count, first, last)


if __name__ == "__main__":
    a = arguments()
    uvloop.run(main(a.port, a.expect, a.qos, a.client_id))
