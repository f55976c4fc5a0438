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


def test_a_paced_replay_behind_its_schedule_still_stops_at_the_first_rejection():
    """A loaded machine (or a rate above what the producer takes) leaves no wait in which pacing polls."""
    producer = _RejectingProducer(first_rejected=10)
    with pytest.raises(ReplayError, match="sending stopped at the first rejection, 109 not sent"):
        replay(_small(n=120), producer, "t", rate=1e9, progress=False)


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


# --- session ids go out as the file wrote them: per-file codes gave two files' sessions the same id "0" ---------

def _session_files(tmp_path) -> tuple[Path, Path]:
    day1, day2 = tmp_path / "day1.csv", tmp_path / "day2.csv"
    header = "USER_ID,ITEM_ID,TIMESTAMP,SESSION_ID\n"
    day1.write_text(header + "u1,i1,1767225600,checkout-7781\nu1,i2,1767225660,checkout-7781\n")
    day2.write_text(header + "u1,i3,1767225720,browse-9902\nu1,i4,1767225780,browse-9902\n")
    return day1, day2


def test_replayed_events_carry_the_files_own_session_ids_so_two_files_never_share_one(tmp_path):
    from model.loaders import load_interactions

    day1, day2 = (load_interactions(p) for p in _session_files(tmp_path))
    assert [e.session_id for e in events_from_interactions(day1)] == ["checkout-7781", "checkout-7781"]
    assert [e.session_id for e in events_from_interactions(day2)] == ["browse-9902", "browse-9902"]


def test_an_event_without_a_session_id_is_replayed_without_one_beside_events_that_keep_theirs():
    data = Interactions.from_columns(["a", "a", "b"], ["x", "y", "z"], [T0, T0 + 1, T0 + 2],
                                     session_ids=["cart-1", None, "cart-2"])
    assert [(e.user_id, e.session_id) for e in events_from_interactions(data)] == [
        ("a", "cart-1"), ("a", None), ("b", "cart-2")]


def test_a_subset_of_the_events_still_replays_their_session_ids():
    data = Interactions.from_columns(["a", "b", "c"], ["x", "y", "z"], [T0, T0 + 1, T0 + 2],
                                     session_ids=["s-a", "s-b", "s-c"])
    part = data.subset(np.array([False, True, True]))
    assert [e.session_id for e in events_from_interactions(part)] == ["s-b", "s-c"]


@pytest.mark.broker
def test_produce_cli_sends_each_files_own_session_ids(broker, tmp_path):
    topic = f"cli-{uuid.uuid4().hex[:8]}"
    for path in _session_files(tmp_path):
        proc = _hrnn("produce", "--bootstrap-servers", broker.bootstrap, "--data", str(path), "--topic", topic,
                     "--partitions", "1", "--quiet")
        assert proc.returncode == 0, proc.stderr
    events = [decode_event(r.value) for r in read_all(broker.bootstrap, topic, idle_s=1.0, timeout_s=30)]
    assert [(e.item_id, e.session_id) for e in events] == [
        ("i1", "checkout-7781"), ("i2", "checkout-7781"), ("i3", "browse-9902"), ("i4", "browse-9902")]


# --- times the worker dead-letters (outside 1990..2200) are refused before the broker is touched: the replay
# --- ended with exit 0 and every event in the DLQ as bad_timestamp ------------------------------------------

def test_produce_cli_refuses_a_log_whose_times_every_worker_dead_letters_before_touching_the_broker(tmp_path):
    proc = _hrnn("produce", "--bootstrap-servers", "127.0.0.1:1", "--data", str(_relative_tab_log(tmp_path)),
                 "--columns", "USER_ID=0,ITEM_ID=1,TIMESTAMP=2", "--delimiter", "tab", "--quiet", timeout=8)
    assert proc.returncode == 2, proc.stderr
    err = proc.stderr
    assert "hrnn produce: error:" in err and "3 of the 3 events" in err and "bad_timestamp" in err
    assert "user 'u,1,a', item 'i1' at epoch ms 0 (1970-01-01" in err  # the first one in sending order
    assert "--base-epoch" in err and "--retime" in err
    assert "Traceback" not in err and "broker" not in err


def test_a_replay_check_of_times_looks_only_at_the_events_a_limit_sends():
    from model.errors import DataError
    from stream.replay import check_event_times

    data = Interactions.from_columns(["a", "a", "b"], ["x", "y", "z"], [T0, T0 + 1, 8_000_000_000_000])
    check_event_times(data, limit=2)
    with pytest.raises(DataError, match=r"1 of the 3 events .* user 'b', item 'z' at epoch ms 8000000000000"):
        check_event_times(data)


@pytest.mark.broker
def test_produce_cli_sends_a_log_of_relative_times_when_retime_stamps_send_times(broker, tmp_path):
    topic = f"cli-{uuid.uuid4().hex[:8]}"
    before = int(time.time() * 1000)
    proc = _hrnn("produce", "--bootstrap-servers", broker.bootstrap, "--data", str(_relative_tab_log(tmp_path)),
                 "--topic", topic, "--columns", "USER_ID=0,ITEM_ID=1,TIMESTAMP=2", "--delimiter", "tab",
                 "--retime", "--quiet")
    assert proc.returncode == 0, proc.stderr
    events = [decode_event(r.value) for r in read_all(broker.bootstrap, topic, idle_s=1.0, timeout_s=30)]
    assert len(events) == 3 and all(e.timestamp_ms >= before for e in events)


def test_produce_cli_refuses_a_non_ascii_delimiter_with_exit_2_not_a_traceback(tmp_path):
    path = tmp_path / "events.csv"
    path.write_text("USER_IDéITEM_IDéTIMESTAMP\nu1éi1é1767225600\n", encoding="utf-8")
    proc = _hrnn("produce", "--bootstrap-servers", "127.0.0.1:1", "--data", str(path), "--delimiter", "é", timeout=8)
    assert proc.returncode == 2, proc.stderr
    assert "hrnn produce: error:" in proc.stderr and "delimiter 'é' is not an ASCII character" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_events_still_undelivered_name_the_servers_they_were_sent_to():
    producer = create_producer("127.0.0.1:1")  # nothing listens there
    producer.flush = lambda _timeout: len(producer)  # the 60 s wait, cut short: what is queued stays undelivered
    with pytest.raises(ReplayError, match=r"10 events to 'ev' were still undelivered after 60 s on 127\.0\.0\.1:1 "
                                          r"\(is the broker reachable\? check --bootstrap-servers\)"):
        replay(_small(10), producer, "ev", progress=False)
