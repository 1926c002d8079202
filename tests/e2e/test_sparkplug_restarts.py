"""Sparkplug node state after a restart of ingestd (kill -9) with
redeliveries behind it, and across retention (written by a review, which
found each case failing: readings never sent stored, false gaps, messages
skipped unseen, a node forgotten, a start that failed on one bad row).

Committed-but-unacknowledged windows are made with a loopback proxy between
ingestd and the broker that withholds ingestd's PUBACKs: ingestd commits, the
broker never hears of it, and after a kill -9 it sends the whole window again
(DUP) to the restarted ingestd, as after a kill -9 between commit and PUBACK.
"""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from pathlib import Path

from ingestd.formats.sparkplug_pb import BY_NAME, Payload
from tests.support.brokers import BrokerFactory, Mosquitto
from tests.support.daemon import DaemonFactory, DaemonProcess
from tests.support.db import DbReader, StoreUnderTest, hold_exclusive_lock
from tests.support.metrics import http_get, metric_value
from tests.support.mqtt import publish
from tests.support.waiting import wait_for

ROUTE = """
[[routes]]
topic = "spBv1.0/#"
format = "sparkplug"
"""
ENV = {
    "INGESTD_MQTT__CLIENT_ID": "ingestd-restarts",
    "INGESTD_MQTT__BROKER_MAX_INFLIGHT": "1000",
    "INGESTD_MQTT__RECONNECT_MIN_DELAY": "0.1",
    "INGESTD_MQTT__RECONNECT_MAX_DELAY": "1",
}
DOUBLE = BY_NAME["Double"]
NODE = "spBv1.0/g/{}/n1"


class AckHoldingProxy:
    """TCP proxy to the broker; while `hold` is set, the client's PUBACKs are dropped."""

    def __init__(self, broker_port: int) -> None:
        self.broker_port = broker_port
        self.hold = False
        self.dropped = 0
        self._srv = socket.create_server(("127.0.0.1", 0))
        self.port = int(self._srv.getsockname()[1])
        self._socks: list[socket.socket] = []
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                client, _ = self._srv.accept()
            except OSError:
                return
            upstream = socket.create_connection(("127.0.0.1", self.broker_port))
            self._socks += [client, upstream]
            threading.Thread(target=self._pipe, args=(upstream, client, False), daemon=True).start()
            threading.Thread(target=self._pipe, args=(client, upstream, True), daemon=True).start()

    def _pipe(self, src: socket.socket, dst: socket.socket, from_client: bool) -> None:
        buf = b""
        with contextlib.suppress(OSError):
            while data := src.recv(65536):
                if not from_client:
                    dst.sendall(data)
                    continue
                buf += data
                out = b""
                while len(buf) >= 2:
                    length, mult, i, done = 0, 1, 1, False
                    while i < len(buf) and i <= 4:
                        length += (buf[i] & 127) * mult
                        mult *= 128
                        i += 1
                        if not buf[i - 1] & 128:
                            done = True
                            break
                    if not done or len(buf) < i + length:
                        break
                    packet, buf = buf[: i + length], buf[i + length :]
                    if self.hold and packet[0] >> 4 == 4:  # PUBACK
                        self.dropped += 1
                        continue
                    out += packet
                if out:
                    dst.sendall(out)
        for s in (src, dst):
            with contextlib.suppress(OSError):
                s.close()

    def close(self) -> None:
        self._srv.close()
        for s in self._socks:
            with contextlib.suppress(OSError):
                s.close()


def metric(daemon: DaemonProcess, name: str, labels: str = "") -> float:
    try:
        return metric_value(http_get(daemon.metrics_url() + "/metrics")[1], name, labels)
    except AssertionError:
        return 0.0  # a labelled counter not yet incremented is not exported


class Sent:
    """Messages of node g/n1 and what each metric was, by (metric, ts_ms)."""

    def __init__(self) -> None:
        self.messages: list[tuple[str, bytes]] = []
        self.values: dict[tuple[str, int], float] = {}

    def birth(self, ts: int, aliases: dict[str, int]) -> None:
        p = Payload(timestamp=ts, seq=0)
        p.metrics.add(name="bdSeq", datatype=BY_NAME["UInt64"], long_value=0)
        for name, alias in aliases.items():
            v = float(ts % 100_000) + alias / 10
            p.metrics.add(name=name, alias=alias, datatype=DOUBLE, double_value=v)
            self.values[(name, ts)] = v
        self.messages.append((NODE.format("NBIRTH"), p.SerializeToString()))

    def data(self, ts: int, seq: int, aliases: dict[str, int]) -> None:
        p = Payload(timestamp=ts, seq=seq)
        for name, alias in aliases.items():
            v = float(ts % 100_000) + alias / 10
            p.metrics.add(alias=alias, double_value=v)
            self.values[(name, ts)] = v
        self.messages.append((NODE.format("NDATA"), p.SerializeToString()))

    def take(self) -> list[tuple[str, bytes]]:
        out, self.messages = self.messages, []
        return out


OLD = {"A": 1, "B": 2, "C": 3}
NEW = {"D": 1, "B": 2, "C": 3}  # the node reconfigured: alias 1 is now metric D


def committed_window_then_kill(
    broker: Mosquitto, daemons: DaemonFactory, reader: object, sent: Sent, window: Sent
) -> DaemonProcess:
    """Commit `window` without its PUBACKs reaching the broker, kill -9 ingestd,
    start it again: the broker redelivers the window, DUP. The new daemon."""
    proxy = AckHoldingProxy(broker.port)
    try:
        first = daemons(proxy.port, ROUTE, **ENV).start()
        first.wait_ready()
        stored = len(sent.values)
        publish(broker.port, sent.take())
        wait_for(lambda: reader.count() == stored, 20, what="the start stored")  # type: ignore[attr-defined]
        time.sleep(1.0)  # its PUBACKs through
        proxy.hold = True
        publish(broker.port, window.take())
        want = stored + len(window.values)
        wait_for(lambda: reader.count() == want, 20, what="the window committed")  # type: ignore[attr-defined]
        time.sleep(1.0)
        assert proxy.dropped > 0
        first.kill()
    finally:
        proxy.close()
    again = daemons(broker.port, ROUTE, **ENV).start()
    again.wait_ready()
    wait_for(
        lambda: metric(again, "ingestd_messages_received_total") >= len(window.messages),
        20,
        what="the window redelivered",
    )
    time.sleep(1.5)
    return again


def test_redelivered_data_of_an_earlier_birth_is_not_read_with_the_restored_birth(
    tmp_path: Path, brokers: BrokerFactory, daemons: DaemonFactory, store: StoreUnderTest
) -> None:
    """Committed window: DATA seq 11-40 (aliases OLD), NBIRTH (aliases NEW),
    DATA seq 1-19. Restored: NEW, seq 19. The redelivered old DATA with seq 20
    is 'next' and is read with NEW's aliases (metric D invented at old times),
    then the redelivered NBIRTH is taken 'again' without resetting seq, and its
    DATA is a false gap: quarantine and a rebirth request."""
    broker = brokers(tmp_path / "broker", max_inflight=1000).start()
    t = int(time.time() * 1000) - 3_600_000
    start, window = Sent(), Sent()
    start.birth(t, OLD)
    for i in range(1, 11):
        start.data(t + 10 * i, i, OLD)
    for i in range(11, 41):
        window.data(t + 10 * i, i, OLD)
    window.birth(t + 410, NEW)
    for i in range(1, 20):
        window.data(t + 410 + 10 * i, i, NEW)
    expected = {**start.values, **window.values}
    again = committed_window_then_kill(broker, daemons, store.reader, start, window)
    rows = store.reader.rows("SELECT metric, ts_ns, value FROM readings")
    keys = [(m, ts // 1_000_000) for m, ts, _v in rows]
    invented = sorted(k for k in keys if k not in expected)
    assert invented == [], f"{len(invented)} readings never sent, e.g. {invented[:3]}"
    assert store.reader.count("quarantine") == 0
    assert metric(again, "ingestd_sparkplug_rebirth_requests_total") == 0
    assert again.stop() == 0


def test_a_committed_window_across_a_reboot_whose_clock_went_back_is_no_gap(
    tmp_path: Path, brokers: BrokerFactory, daemons: DaemonFactory
) -> None:
    """Committed window: DATA seq 30-40, then the node reboots with its clock an
    hour behind: NBIRTH, DATA seq 1-19. Restored: last_ms an hour before the
    old DATA, so the redelivered old DATA is not 'dated no later' and is taken
    for a sequence gap: false quarantine and a rebirth request."""
    broker = brokers(tmp_path / "broker", max_inflight=1000).start()
    db = DbReader(tmp_path / "ingestd.db")
    t = int(time.time() * 1000) - 3_600_000
    start, window = Sent(), Sent()
    start.birth(t, OLD)
    for i in range(1, 30):
        start.data(t + 10 * i, i, OLD)
    for i in range(30, 41):
        window.data(t + 10 * i, i, OLD)
    back = t - 3_600_000
    window.birth(back + 410, OLD)
    for i in range(1, 20):
        window.data(back + 410 + 10 * i, i, OLD)
    again = committed_window_then_kill(broker, daemons, db, start, window)
    reasons = [r for (r,) in db.rows("SELECT reason FROM quarantine")]
    assert reasons == [], reasons[:2]
    assert metric(again, "ingestd_sparkplug_rebirth_requests_total") == 0
    assert again.stop() == 0


def test_uncommitted_redeliveries_after_an_upstream_gap_are_never_silently_skipped(
    tmp_path: Path, mosquitto: Mosquitto, daemons: DaemonFactory
) -> None:
    """Uncommitted window (store locked) after the node's clock stepped back
    5 s: DATA seq 22 (21 lost upstream), 23-26. After kill -9 they are
    redelivered to a restored node, not next, dated before the last commit:
    skipped as 'committed before the restart' though they never were. They
    are neither stored nor quarantined: lost without a trace."""
    db = DbReader(tmp_path / "ingestd.db")
    first = daemons(mosquitto.port, ROUTE, **ENV).start()
    first.wait_ready()
    t = int(time.time() * 1000) - 3_600_000
    sent = Sent()
    sent.birth(t, OLD)
    for i in range(1, 21):
        sent.data(t + 10 * i, i, OLD)
    publish(mosquitto.port, sent.take())
    wait_for(lambda: db.count() == 3 * 21, 20, what="the start stored")
    time.sleep(1.0)
    lock = hold_exclusive_lock(tmp_path / "ingestd.db", 6)
    for seq in range(22, 27):
        sent.data(t - 5000 + seq, seq, OLD)
    publish(mosquitto.port, sent.take())
    wait_for(
        lambda: metric(first, "ingestd_inflight_unacked_messages") >= 5, 5, what="the window held"
    )
    first.kill()
    lock.join()
    again = daemons(mosquitto.port, ROUTE, **ENV).start()
    again.wait_ready()
    wait_for(lambda: metric(again, "ingestd_messages_received_total") >= 5, 20, what="redelivered")
    time.sleep(1.5)
    stored = db.count() - 3 * 21
    quarantined = db.count("quarantine")
    assert metric(again, "ingestd_values_skipped_total", 'kind="redelivered"') == 0
    assert stored // 3 + quarantined == 5, (stored, quarantined)
    assert again.stop() == 0


def test_a_node_silent_past_the_retention_cutoff_is_still_known_after_a_restart(
    tmp_path: Path, mosquitto: Mosquitto, daemons: DaemonFactory
) -> None:
    """Found by review: retention deleted the device_state row of a node
    silent past its cutoff while ingestd still followed it, and after a
    restart the node was unknown, its DATA quarantined. A node's state is its
    BIRTH, however old: retention leaves it (the rows are bounded in number,
    not by age)."""
    env = {
        **ENV,
        "INGESTD_STORE__RETENTION_DAYS": "0.0001",  # 8.64 s
        "INGESTD_STORE__MAINTENANCE_INTERVAL": "1",
    }
    db = DbReader(tmp_path / "ingestd.db")
    first = daemons(mosquitto.port, ROUTE, **env).start()
    first.wait_ready()
    sent = Sent()
    sent.birth(int(time.time() * 1000), OLD)
    sent.data(int(time.time() * 1000), 1, OLD)
    publish(mosquitto.port, sent.take())
    state = "SELECT count(*) FROM device_state WHERE format = 'sparkplug'"
    wait_for(lambda: db.rows(state) == [(1,)], 10, what="the node's state stored")
    time.sleep(12)  # silent past the cutoff, maintenance every second
    assert db.rows(state) == [(1,)]
    sent.data(int(time.time() * 1000), 2, OLD)
    publish(mosquitto.port, sent.take())
    assert first.stop() == 0
    again = daemons(mosquitto.port, ROUTE, **env).start()
    again.wait_ready()
    sent.data(int(time.time() * 1000), 3, OLD)
    publish(mosquitto.port, sent.take())
    time.sleep(2.0)
    assert [r for (r,) in db.rows("SELECT reason FROM quarantine")] == []
    assert metric(again, "ingestd_sparkplug_rebirth_requests_total") == 0
    assert again.stop() == 0
