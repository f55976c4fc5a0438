"""Replaying an interactions file into the events topic (library and `hrnn produce`)."""
from __future__ import annotations

import subprocess
import sys
import time
import uuid
from collections import defaultdict
from pathlib import Path

import numpy as np
import pytest

from model.errors import ConfigError
from model.events import decode_event
from model.interactions import Interactions
from stream.kafka_clients import admin_client, create_producer, read_all
from stream.replay import ReplayError, events_from_interactions, replay
from stream.topics import TopicSpec, ensure_topics

HRNN = str(Path(sys.executable).with_name("hrnn"))
T0 = 1_700_000_000_000


def _small(n: int = 120, seed: int = 3) -> Interactions:
    rng = np.random.default_rng(seed)
    users = rng.choice([f"u{i}" for i in range(9)], n)
    items = rng.choice([f"i{i}" for i in range(15)], n)
    ts = T0 + rng.integers(0, 3_600_000, n)
    types = rng.choice(["click", "purchase"], n)
    values = np.where(rng.random(n) < 0.5, np.nan, rng.random(n))
    return Interactions.from_columns(users, items, ts, event_types=types, values=values,
                                     session_ids=rng.choice(["s1", "s2", "s3"], n))


class _RecordingProducer:
    """Unit-test fake: keeps produced messages and acknowledges each at the next poll/flush."""

    def __init__(self) -> None:
        self.sent: list[tuple[str, bytes, bytes, float]] = []
        self._pending: list = []

    def produce(self, topic, value=None, key=None, on_delivery=None, **_):
        self.sent.append((topic, key, value, time.monotonic()))
        self._pending.append(on_delivery)

    def poll(self, timeout=0):
        for cb in self._pending:
            cb(None, None)
        n, self._pending = len(self._pending), []
        return n

    def flush(self, timeout=0):
        self.poll()
        return 0


def test_events_come_in_global_time_order_with_row_index_ids():
    data = _small()
    events = list(events_from_interactions(data))
    assert len(events) == len(data)
    stamps = [e.timestamp_ms for e in events]
    assert stamps == sorted(stamps)
    assert sorted(int(e.event_id) for e in events) == list(range(len(data)))
    for e in events:
        row = int(e.event_id)
        assert e.user_id == data.user_ids[data.user[row]] and e.item_id == data.item_ids[data.item[row]]
        assert e.timestamp_ms == data.ts_ms[row]
        assert (e.event_value is None) == bool(np.isnan(data.value[row]))
        assert e.session_id is not None


def test_limit_sends_the_earliest_events_only():
    data = _small()
    producer = _RecordingProducer()
    assert replay(data, producer, "t", limit=10, progress=False) == 10
    sent_ts = [decode_event(v).timestamp_ms for _, _, v, _ in producer.sent]
    assert sent_ts == sorted(data.ts_ms.tolist())[:10]


def test_rate_limits_events_per_second():
    data = _small(n=21)
    producer = _RecordingProducer()
    started = time.monotonic()
    assert replay(data, producer, "t", rate=100.0, progress=False) == 21
    assert time.monotonic() - started >= 0.19  # 20 intervals of 10 ms
    assert producer.sent[-1][3] - producer.sent[0][3] >= 0.19


def test_speedup_replays_event_time_faster():
    ts = [T0, T0 + 1000, T0 + 3000]
    data = Interactions.from_columns(["a", "b", "a"], ["x", "y", "z"], ts)
    producer = _RecordingProducer()
    replay(data, producer, "t", speedup=10.0, progress=False)
    gaps = np.diff([s[3] for s in producer.sent])
    assert gaps[0] >= 0.095 and gaps[1] >= 0.19  # 1 s and 2 s of event time at 10x


@pytest.mark.parametrize("pace", [{"rate": float("nan")}, {"rate": float("inf")}, {"speedup": float("nan")},
                                  {"speedup": 0.0}])
def test_a_pace_that_is_no_positive_number_is_refused_not_ignored(pace):
    producer = _RecordingProducer()
    with pytest.raises(ConfigError, match=next(iter(pace))):
        replay(_small(), producer, "t", progress=False, **pace)


def test_rate_and_speedup_together_are_refused():
    with pytest.raises(ConfigError):
        replay(_small(), _RecordingProducer(), "t", rate=10, speedup=2, progress=False)


@pytest.mark.broker
def test_replay_produces_every_event_keyed_by_user_in_time_order(broker):
    data = _small(n=200)
    topic = f"events-{uuid.uuid4().hex[:8]}"
    admin = admin_client(broker.bootstrap)
    ensure_topics(admin, [TopicSpec(topic, 3)])
    sent = replay(data, create_producer(broker.bootstrap), topic, progress=False)
    assert sent == len(data)
    records = read_all(broker.bootstrap, topic, idle_s=1.0, timeout_s=30)
    assert len(records) == len(data)
    partitions_of_user: dict[str, set[int]] = defaultdict(set)
    by_user: dict[str, list[tuple[int, int, int]]] = defaultdict(list)
    for r in records:
        event = decode_event(r.value)  # valid per the event contract
        assert r.key == event.user_id.encode()
        partitions_of_user[event.user_id].add(r.partition)
        by_user[event.user_id].append((r.partition, r.offset, event.timestamp_ms))
    assert all(len(p) == 1 for p in partitions_of_user.values())
    for rows in by_user.values():
        stamps = [ts for _, _, ts in sorted(rows)]
        assert stamps == sorted(stamps)
    assert sorted(int(decode_event(r.value).event_id) for r in records) == list(range(len(data)))


def _hrnn(*args: str, timeout: float = 60) -> subprocess.CompletedProcess:
    return subprocess.run([HRNN, *args], capture_output=True, text=True, timeout=timeout)


@pytest.mark.broker
def test_produce_cli_replays_a_file_and_prints_the_count_last(broker, tmp_path):
    path = tmp_path / "events.csv"
    rows = ["USER_ID,ITEM_ID,TIMESTAMP,EVENT_TYPE"] + [f"u{i % 4},i{i % 7},{1_700_000_000 + i},click"
                                                       for i in range(30)]
    path.write_text("\n".join(rows) + "\n")
    topic = f"cli-{uuid.uuid4().hex[:8]}"
    proc = _hrnn("produce", "--bootstrap-servers", broker.bootstrap, "--data", str(path), "--topic", topic,
                 "--limit", "25", "--partitions", "2", "--quiet")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip().splitlines()[-1] == "25"
    records = read_all(broker.bootstrap, topic, idle_s=1.0, timeout_s=30)
    assert len(records) == 25
    assert {r.partition for r in records} <= {0, 1}


def test_produce_cli_on_a_missing_file_exits_non_zero_saying_why(tmp_path):
    missing = tmp_path / "nope.csv"
    proc = _hrnn("produce", "--bootstrap-servers", "127.0.0.1:1", "--data", str(missing))
    assert proc.returncode != 0
    assert "hrnn produce: error:" in proc.stderr and "nope.csv" in proc.stderr and "not found" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_produce_cli_on_a_malformed_file_exits_non_zero_naming_the_problem(tmp_path):
    bad = tmp_path / "bad.csv"
    bad.write_text("USER_ID,ITEM_ID,TIMESTAMP\nu1,i1,not-a-time\n")
    proc = _hrnn("produce", "--bootstrap-servers", "127.0.0.1:1", "--data", str(bad))
    assert proc.returncode != 0
    assert "hrnn produce: error:" in proc.stderr and "bad.csv" in proc.stderr and "TIMESTAMP" in proc.stderr
    assert "Traceback" not in proc.stderr


class _RejectingProducer(_RecordingProducer):
    """Unit-test fake: the broker rejects the events from the `first_rejected`-th on (a topic deleted, say)."""

    def __init__(self, first_rejected: int) -> None:
        super().__init__()
        self.first_rejected = first_rejected

    def poll(self, timeout=0):
        err = type("Err", (), {"str": lambda self: "Broker: Unknown topic or partition"})()
        for k, cb in enumerate(self._pending, start=len(self.sent) - len(self._pending)):
            cb(err if k >= self.first_rejected else None, None)
        n, self._pending = len(self._pending), []
        return n


def test_a_replay_stops_sending_at_the_first_rejection_and_says_how_far_it_got():
    """A paced replay that kept going after the broker began rejecting would run its whole length for nothing,
    and the events after the gap would reach the topic without the ones before them."""
    data = _small(n=120)
    producer = _RejectingProducer(first_rejected=10)
    with pytest.raises(ReplayError) as err:
        replay(data, producer, "t", rate=200, progress=False)  # pacing polls, so delivery reports come as it goes
    assert 11 <= len(producer.sent) < 20, len(producer.sent)  # stopped within the next reports served
    sent = len(producer.sent)
    assert (f"{sent - 10} of the {sent} events sent to 't' were rejected (10 delivered; sending stopped at the "
            f"first rejection, {120 - sent} not sent): Broker: Unknown topic or partition") in str(err.value)


def test_rejections_heard_of_only_at_the_end_are_reported_without_claiming_a_stop():
    producer = _RejectingProducer(first_rejected=29)
    with pytest.raises(ReplayError, match=r"1 of the 30 events sent to 't' were rejected \(29 delivered\): Broker"):
        replay(_small(n=30), producer, "t", progress=False)  # unpaced: the reports come at the flush


def test_retime_stamps_events_with_the_send_time():
    data = _small(n=30)
    producer = _RecordingProducer()
    before = int(time.time() * 1000)
    replay(data, producer, "t", retime=True, progress=False)
    after = int(time.time() * 1000)
    events = [decode_event(v) for _, _, v, _ in producer.sent]
    assert all(before <= e.timestamp_ms <= after for e in events)
    assert sorted(int(e.event_id) for e in events) == list(range(30))


def _relative_tab_log(tmp_path) -> Path:
    # tab-separated, but each user id holds two commas: the sniffer would read it as comma-separated
    path = tmp_path / "relative.csv"
    path.write_text("u,1,a\ti1\t0\nu,1,a\ti2\t60\nu,2,b\ti1\t30\n")
    return path


@pytest.mark.broker
def test_produce_cli_takes_the_loaders_delimiter_and_base_epoch_flags_as_train_does(broker, tmp_path):
    topic = f"cli-{uuid.uuid4().hex[:8]}"
    proc = _hrnn("produce", "--bootstrap-servers", broker.bootstrap, "--data", str(_relative_tab_log(tmp_path)),
                 "--topic", topic, "--columns", "USER_ID=0,ITEM_ID=1,TIMESTAMP=2", "--delimiter", "tab",
                 "--base-epoch", "1767225600", "--time-unit", "s", "--quiet")
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip().splitlines()[-1] == "3"
    events = [decode_event(r.value) for r in read_all(broker.bootstrap, topic, idle_s=1.0, timeout_s=30)]
    assert sorted((e.user_id, e.item_id, e.timestamp_ms) for e in events) == [
        ("u,1,a", "i1", 1_767_225_600_000), ("u,1,a", "i2", 1_767_225_660_000), ("u,2,b", "i1", 1_767_225_630_000)]


def test_produce_cli_hands_its_base_epoch_to_the_loader_before_touching_the_broker(tmp_path):
    proc = _hrnn("produce", "--bootstrap-servers", "127.0.0.1:1", "--data", str(_relative_tab_log(tmp_path)),
                 "--columns", "USER_ID=0,ITEM_ID=1,TIMESTAMP=2", "--delimiter", "tab", "--base-epoch", "1e300")
    assert proc.returncode == 2
    assert "hrnn produce: error:" in proc.stderr and "--base-epoch 1e+300 is out of range" in proc.stderr
    assert "Traceback" not in proc.stderr
