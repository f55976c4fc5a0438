"""The worker driven by in-memory fakes of its Kafka clients (no broker): whole batches with poison
records, rebalances that land between the consume() calls of one poll, and changelog restores from
a leader that answers late or not at all."""
from __future__ import annotations

import threading
import time
from pathlib import Path

import numpy as np
import pytest
from confluent_kafka import KafkaError, KafkaException, Message, TopicPartition

from model.artifact import latest_version_dir
from model.events import Event, encode_event
from model.inference import Recommender
from model.state import UserState, encode_state
from stream import records, worker
from stream.settings import WorkerSettings
from stream.store import StateStores
from stream.worker import Worker, WorkerError, read_changelog
from worker_testkit import BASE_MS, make_registry

CHANGELOG = "g.state-changelog"


def event(partition: int, offset: int, user: str) -> Message:
    return Message(topic="ev", partition=partition, offset=offset, key=user.encode(),
                   value=encode_event(Event(user, "item-1", "click", BASE_MS)), timestamp=(1, BASE_MS))


class FakeProducer:
    """Delivers on flush; keeps (topic, partition, key, value, headers) of what it delivered."""

    def __init__(self) -> None:
        self.pending: list[tuple] = []
        self.sent: list[tuple] = []
        self.txn_offsets: list[list[tuple[int, int]]] = []
        self.fenced_commits = 0  # commits to fail as when the group moved on: the batch is aborted and read again
        self.timed_out_commits = 0  # commits that time out and stay in progress, as librdkafka's do
        self.commit_calls = 0
        self.failing_aborts = False
        self._committing = False
        self._next: dict[tuple[str, int], int] = {}

    def produce(self, topic, value=None, key=None, partition=None, headers=None, on_delivery=None, **_):
        self.pending.append((topic, 0 if partition is None else partition, key, value, headers, on_delivery))

    def poll(self, timeout=0):
        return 0

    def flush(self, timeout=None):
        for topic, p, key, value, headers, on_delivery in self.pending:
            o = self._next.get((topic, p), 0)
            self._next[(topic, p)] = o + 1
            self.sent.append((topic, p, key, value, headers))
            if on_delivery:
                on_delivery(None, Message(topic=topic, partition=p, offset=o, key=key, value=value))
        self.pending = []
        return 0

    def send_offsets_to_transaction(self, offsets, metadata, timeout=None):
        if self._committing:  # librdkafka refuses it while a commit that timed out is in progress
            raise KafkaException(KafkaError(KafkaError._CONFLICT, "Conflicting commit_transaction API call is "
                                            "already in progress", retriable=True))
        self.txn_offsets.append([(tp.partition, tp.offset) for tp in offsets])

    def begin_transaction(self):
        self._committing = False

    def commit_transaction(self, timeout=None):
        self.commit_calls += 1
        if self.timed_out_commits:
            self.timed_out_commits -= 1
            self._committing = True
            raise KafkaException(KafkaError(KafkaError._TIMED_OUT, "Timed out waiting for operation to finish, "
                                            "retry call to resume", retriable=True))
        self._committing = False
        if self.fenced_commits:
            self.fenced_commits -= 1
            raise KafkaException(KafkaError(KafkaError._FENCED, "fenced", txn_requires_abort=True))

    def abort_transaction(self, timeout=None):
        if self.failing_aborts:
            raise KafkaException(KafkaError(KafkaError._TIMED_OUT, "abort timed out", retriable=True))

    def to(self, topic: str) -> list[tuple]:
        return [r for r in self.sent if r[0] == topic]


class FakeConsumer:
    """consume() plays a script: a list of records, or a callable (a rebalance callback runs inside it)."""

    def __init__(self) -> None:
        self.script: list = []
        self.commits: list[list[tuple[int, int]]] = []
        self.committed_offsets: dict[int, int] = {}
        self.seeks: list[tuple[int, int]] = []

    def consume(self, num_messages=1, timeout=-1):
        if not self.script:
            return []
        step = self.script.pop(0)
        return step() if callable(step) else list(step)

    def commit(self, offsets=None, asynchronous=True):
        self.commits.append([(tp.partition, tp.offset) for tp in offsets])
        return offsets

    def committed(self, tps, timeout=None):
        return [TopicPartition(tp.topic, tp.partition, self.committed_offsets.get(tp.partition, -1001)) for tp in tps]

    def seek(self, tp):
        self.seeks.append((tp.partition, tp.offset))

    def position(self, tps):
        return [TopicPartition(tp.topic, tp.partition, -1001) for tp in tps]

    def get_watermark_offsets(self, tp, timeout=None, cached=False):
        return 0, 0

    def consumer_group_metadata(self):
        return None

    def close(self):
        pass


class EmptyChangelog:
    def get_watermark_offsets(self, tp, timeout=None, cached=False):
        return 0, 0

    def close(self):
        pass


@pytest.fixture(scope="module")
def registry(tmp_path_factory) -> Path:
    return make_registry(tmp_path_factory.mktemp("registry"))


@pytest.fixture(params=["at_least_once", "exactly_once"])
def guarantee(request) -> str:
    return request.param


@pytest.fixture
def make_worker(registry, tmp_path):
    made: list[Worker] = []

    def make(processing_guarantee: str = "at_least_once") -> Worker:
        s = WorkerSettings(registry=str(registry), state_dir=str(tmp_path / "state"), input_topic="ev",
                           output_topic="rec", group="g", device="cpu", follow_updates=False,
                           follow_availability=False, processing_guarantee=processing_guarantee)
        w = Worker(s, recommender=Recommender.load(latest_version_dir(registry), "cpu"))
        w._producer, w._consumer, w._restorer = FakeProducer(), FakeConsumer(), EmptyChangelog()
        w._read_input_log = lambda: None
        made.append(w)
        return w

    yield make
    for w in made:
        w.stores.close_all()


def assign(w: Worker, *partitions: int) -> None:
    w._on_assign(w._consumer, [TopicPartition("ev", p) for p in partitions])


def revoke(w: Worker, *partitions: int) -> None:
    w._on_revoke(w._consumer, [TopicPartition("ev", p) for p in partitions])


def committed(w: Worker) -> list[list[tuple[int, int]]]:
    """The input offsets the batch made durable: committed by the consumer, or sent with the transaction."""
    return w._producer.txn_offsets if w.settings.exactly_once else w._consumer.commits


def users_answered(w: Worker) -> list[str]:
    return [key if isinstance(key, str) else key.decode() for _, _, key, _, _ in w._producer.to("rec")]


# ---- poison records ------------------------------------------------------------------------------

def test_a_batch_holding_poison_records_dead_letters_them_and_answers_and_commits_the_rest(make_worker):
    w = make_worker()
    assign(w, 0)
    nested = Message(topic="ev", partition=0, offset=1, key=b"a", value=b"[" * 1000 + b"]" * 1000)
    huge = Message(topic="ev", partition=0, offset=2, key=b"a", value=b'{"user_id":"a","item_id":"i","event_type":'
                   b'"click","timestamp":%d,"event_value":1%s}' % (BASE_MS, b"0" * 400))
    result = w.process_batch([event(0, 0, "alice"), nested, huge, event(0, 3, "bob")])
    dead = w._producer.to("ev.dlq")
    assert [(v, records.header(h, records.H_REASON)) for _, _, _, v, h in dead] == \
        [(nested.value(), "bad_json"), (huge.value(), "bad_field")]
    assert users_answered(w) == ["alice", "bob"]
    assert w._consumer.commits == [[(0, 4)]]
    assert (result.dead_lettered, result.recommendations) == (2, 2)


# ---- a worker the group moved on without ----------------------------------------------------------

def _refusing_commit(code: int):
    def commit(offsets=None, asynchronous=True):
        raise KafkaException(KafkaError(code, "commit refused"))
    return commit


def test_a_batch_whose_commit_says_the_group_moved_on_keeps_its_states_but_not_the_changelog_offset_and_is_rewound(
        make_worker):
    """Its partitions may be another worker's, which stored newer states: the store's changelog offset must not move
    past them, or a later catch-up would miss them. Its states are kept: read again, the batch is replays, so one
    slower than max.poll.interval.ms is not redone and refused forever."""
    w = make_worker()
    assign(w, 0)
    w._consumer.commit = _refusing_commit(KafkaError.UNKNOWN_MEMBER_ID)
    w.process_batch([event(0, 3, "alice"), event(0, 4, "bob")])
    assert users_answered(w) == ["alice", "bob"]  # delivered: at least once
    assert w.stores[0].get("alice").source_offset == 3 and w.stores[0].changelog_offset == -1
    assert w._consumer.seeks == [(0, 3)]
    del w._consumer.commit  # the group takes its commits again
    result = w.process_batch([event(0, 3, "alice"), event(0, 4, "bob")])  # read again: replays, and committed
    assert result.replayed == 2 and w._consumer.commits == [[(0, 5)]]


def test_a_batch_whose_commit_failed_otherwise_is_stored_as_the_owner_it_still_is(make_worker):
    w = make_worker()
    assign(w, 0)
    w._consumer.commit = _refusing_commit(KafkaError.REQUEST_TIMED_OUT)
    w.process_batch([event(0, 3, "alice")])
    assert w.stores[0].get("alice").source_offset == 3 and w._consumer.seeks == []


def test_a_batch_held_past_max_poll_interval_is_not_processed_but_read_again(make_worker):
    """librdkafka has left the group by then: another worker may be writing newer states of these users."""
    w = make_worker()
    assign(w, 0)
    w._max_poll_s = 0.05
    w._consumer.script = [[event(0, 5, "alice")]]
    batch = w.poll_batch()
    time.sleep(0.1)  # a stall between the poll and the batch's work
    result = w.process_batch(batch)
    assert result.aborted == 1 and w._producer.sent == [] and w._consumer.commits == []
    assert w.stores[0].get("alice") is None and w._consumer.seeks == [(0, 5)]


@pytest.mark.parametrize("guarantee", ["at_least_once", "exactly_once"])
def test_a_batch_whose_model_step_stalled_past_max_poll_interval_produces_nothing_and_is_read_again(
        make_worker, monkeypatch, guarantee):
    """A stall inside the model's work (a throttled pod, a slow device): a worker that took the partition over
    may have written newer states meanwhile, which this batch's changelog records would follow."""
    w = make_worker(guarantee)
    assign(w, 0)
    w._max_poll_s = 0.05
    w._consumer.script = [[event(0, 5, "alice"), Message(topic="ev", partition=0, offset=6, key=b"a",
                                                         value=b"not json")]]
    batch = w.poll_batch()
    recommend = Recommender.recommend

    def stalling(self, *args, **kwargs):
        time.sleep(0.1)
        return recommend(self, *args, **kwargs)

    monkeypatch.setattr(Recommender, "recommend", stalling)
    result = w.process_batch(batch)
    assert result.aborted == 1 and w._producer.sent == [] and w._producer.pending == []
    assert w._consumer.commits == [] and w._producer.txn_offsets == []
    assert w.stores[0].get("alice") is None and w._consumer.seeks == [(0, 5)]


# ---- metrics -------------------------------------------------------------------------------------

class ListedItems:
    """An availability reader that has read its topic to the end: these items are off sale."""

    topic, caught_up, error = "availability", True, None

    def __init__(self, *items: str) -> None:
        self.unavailable = frozenset(items)

    def stop(self) -> None:
        pass


def test_an_idle_worker_reports_the_items_off_sale_before_any_event_arrives(make_worker):
    w = make_worker()
    assign(w, 0)
    w.availability = ListedItems("item-1", "item-2", "item-3")
    assert w.poll_once() is None
    assert w.metrics.value("hrnn_unavailable_items") == 3


def test_an_aborted_transaction_counts_its_dead_letters_and_latencies_only_when_its_batch_is_read_again(
        make_worker):
    w = make_worker("exactly_once")
    assign(w, 0)
    w._producer.fenced_commits = 1
    batch = [event(0, 0, "alice"), Message(topic="ev", partition=0, offset=1, key=b"a", value=b"not json"),
             event(0, 2, "bob")]
    m = w.metrics

    def counted() -> tuple[float, float, float]:
        return (m.value("hrnn_recommendations_out_total"), m.value("hrnn_dlq_total", {"reason": "bad_json"}) or 0,
                m.value("hrnn_event_to_recommendation_seconds_count"))

    assert w.process_batch(batch).aborted == 1
    assert counted() == (0, 0, 0)
    assert w.process_batch(batch).aborted == 0
    assert counted() == (2, 1, 2)


def test_a_transaction_commit_that_timed_out_is_resumed_not_begun_again_with_its_offsets(make_worker):
    """librdkafka keeps a commit that timed out in progress, resumes it when called again and refuses to add the
    offsets meanwhile: sending them again on each retry stopped the worker on a slow broker."""
    w = make_worker("exactly_once")
    assign(w, 0)
    w._producer.timed_out_commits = 1
    result = w.process_batch([event(0, 0, "alice"), event(0, 1, "bob")])
    assert result.aborted == 0 and result.recommendations == 2
    assert w._producer.commit_calls == 2 and w._producer.txn_offsets == [[(0, 2)]]


def test_a_transaction_whose_abort_fails_too_stops_the_worker_with_a_typed_error_naming_both(make_worker):
    from stream.worker import WorkerError

    w = make_worker("exactly_once")
    assign(w, 0)
    w._producer.fenced_commits, w._producer.failing_aborts = 1, True
    with pytest.raises(WorkerError, match="transaction failed: fenced; aborting it failed too: .*abort timed out"):
        w.process_batch([event(0, 0, "alice")])


# ---- a rebalance inside the poll -----------------------------------------------------------------

def test_a_partition_revoked_in_a_later_consume_of_the_poll_leaves_nothing_of_the_batch_behind(
        make_worker, guarantee, tmp_path):
    w = make_worker(guarantee)
    assign(w, 0, 1)

    def third_consume():  # librdkafka serves the cooperative revocation of partition 1 inside this call
        revoke(w, 1)
        return [event(0, 0, "alice")]

    w._consumer.script = [[], [event(1, 0, "bob")], third_consume]
    batch = w.poll_batch()
    assert [(m.partition(), m.offset()) for m in batch] == [(0, 0)]
    w.process_batch(batch)
    assert users_answered(w) == ["alice"]
    assert {p for _, p, *_ in w._producer.to(CHANGELOG)} == {0}
    assert committed(w) == [[(0, 1)]]  # partition 1: its new owner reads offset 0 from the committed offset
    assert w.stores.get(1) is None  # no changelog restore for a partition another worker owns now
    w.stores.close_all()
    stored = StateStores(w.settings.state_dir, "g", "ev").open(1)
    try:
        assert stored.user_ids() == []
    finally:
        stored.close()


def test_a_partition_assigned_again_in_a_later_consume_keeps_only_the_records_of_its_new_assignment(make_worker):
    w = make_worker()
    assign(w, 0)

    def revoked():  # returns what was fetched before the revocation
        revoke(w, 0)
        return [event(0, 5, "bob")]

    def assigned_again():  # the new assignment starts from the committed offset: 5 is read again
        assign(w, 0)
        return [event(0, 5, "bob")]

    w._consumer.script = [[], revoked, assigned_again]
    batch = w.poll_batch()
    assert [(m.partition(), m.offset()) for m in batch] == [(0, 5)]
    assert w._consumer.seeks == []


def test_a_partition_revoked_and_assigned_again_in_one_consume_is_rewound_to_its_committed_offset(make_worker):
    w = make_worker()
    assign(w, 0, 1)
    w._consumer.committed_offsets = {1: 4}

    def rebalanced():  # an eager rebalance: revoked and assigned again, records of both assignments around it
        revoke(w, 1)
        assign(w, 1)
        return [event(1, 4, "bob"), event(0, 7, "alice")]

    w._consumer.script = [[], [event(1, 5, "carol")], rebalanced]
    batch = w.poll_batch()
    assert [(m.partition(), m.offset()) for m in batch] == [(0, 7)]
    assert w._consumer.seeks == [(1, 4)]  # nothing of partition 1 skipped, none of it twice in one batch


def test_a_batch_never_opens_the_store_of_a_partition_it_was_not_assigned(make_worker):
    w = make_worker()
    assign(w, 0)
    with pytest.raises(WorkerError, match="partition 1 .* not assigned"):
        w.process_batch([event(0, 0, "alice"), event(1, 0, "bob")])
    assert w.stores.partitions == [0] and w._consumer.commits == []


# ---- restoring from the changelog ----------------------------------------------------------------

def changelog_record(offset: int) -> Message:
    z = np.zeros(4, np.float32)
    value = encode_state(UserState("v1", z, z, "s", 1, 1, [], offset, 1))
    return Message(topic=CHANGELOG, partition=0, offset=offset, key=f"user-{offset}".encode(), value=value,
                   headers=records.changelog_headers(offset))


class SlowChangelog:
    """Offsets 0..2 hold records, the high watermark is `high`. No fetch answers before `answers_after_s`
    (None: never); then the records come in one fetch and the position stops at `position_after`."""

    def __init__(self, answers_after_s: float | None, *, high: int = 3, position_after: int = 3,
                 n_records: int = 3, transport_errors: bool = False) -> None:
        self.answers_after_s, self.high, self.position_after = answers_after_s, high, position_after
        self.n_records, self.transport_errors = n_records, transport_errors
        self.at = -1001  # librdkafka's OFFSET_INVALID until a fetch came back
        self.assigned_at = 0.0

    def get_watermark_offsets(self, tp, timeout=None, cached=False):
        return 0, self.high

    def assign(self, tps):
        self.assigned_at = time.monotonic()

    def unassign(self):
        pass

    def consume(self, num_messages=1, timeout=-1):
        time.sleep(timeout)
        late = self.answers_after_s is None or time.monotonic() - self.assigned_at < self.answers_after_s
        if late and self.transport_errors:  # what librdkafka reports while the leader cannot be reached
            return [Message(topic=CHANGELOG, partition=0, offset=-1, error=KafkaError(KafkaError._TRANSPORT))]
        if late or self.at >= 0:
            return []
        self.at = self.position_after
        return [changelog_record(o) for o in range(self.n_records)]

    def position(self, tps):
        return [TopicPartition(CHANGELOG, 0, self.at)]


@pytest.fixture
def short_idle(monkeypatch):
    monkeypatch.setattr(worker, "_RESTORE_IDLE_S", 0.3)


def restored(changelog: SlowChangelog, timeout_s: float) -> list[int]:
    return [r.offset for r in read_changelog(changelog, CHANGELOG, 0, 0, timeout_s)]


def test_a_restore_waits_for_a_leader_that_answers_after_the_idle_period_and_reads_every_record(short_idle):
    assert restored(SlowChangelog(answers_after_s=1.0), timeout_s=30) == [0, 1, 2]


def test_a_restore_from_a_changelog_that_never_answers_fails_naming_the_setting_to_raise(short_idle):
    t0 = time.monotonic()
    with pytest.raises(WorkerError, match=r"did not answer a fetch within 1 s .*restore_timeout_s"):
        restored(SlowChangelog(answers_after_s=None), timeout_s=1)
    assert time.monotonic() - t0 < 5


def test_a_restore_from_a_leader_that_is_down_fails_at_its_deadline_despite_the_errors_it_reports(short_idle):
    outcome: list[BaseException] = []

    def restore() -> None:
        try:
            restored(SlowChangelog(answers_after_s=None, transport_errors=True), timeout_s=1)
        except BaseException as exc:  # noqa: BLE001 (checked below, in the test's thread)
            outcome.append(exc)

    waiter = threading.Thread(target=restore, daemon=True)
    waiter.start()
    waiter.join(10)
    assert len(outcome) == 1 and isinstance(outcome[0], WorkerError), "the restore did not end at its deadline"
    assert "did not answer a fetch within 1 s" in str(outcome[0])


def test_a_restore_silent_short_of_the_watermark_after_its_records_fails_at_its_deadline_naming_the_offsets(
        short_idle):
    # librdkafka's position moves past transaction markers: silence short of the watermark is a stalled leader
    t0 = time.monotonic()
    with pytest.raises(WorkerError, match=r"not caught up within 1 s \(at 3, end ~5\).*restore_timeout_s"):
        restored(SlowChangelog(answers_after_s=0, high=5, position_after=3), timeout_s=1)
    assert time.monotonic() - t0 < 5


def test_a_restore_silent_short_of_the_watermark_after_a_fetch_without_records_fails_at_its_deadline(short_idle):
    t0 = time.monotonic()
    with pytest.raises(WorkerError, match=r"not caught up within 1 s \(at 4, end ~5\)"):
        restored(SlowChangelog(answers_after_s=0, high=5, position_after=4, n_records=0), timeout_s=1)
    assert time.monotonic() - t0 < 5


# ---- lag -----------------------------------------------------------------------------------------

class Watermarks(FakeConsumer):
    """No position (librdkafka has none until a record is read after an assignment or a seek); these watermarks."""

    def __init__(self, low: int, high: int) -> None:
        super().__init__()
        self.low, self.high = low, high

    def get_watermark_offsets(self, tp, timeout=None, cached=False):
        return self.low, self.high


def reported_lag(w: Worker) -> float | None:
    w._last_lag = 0.0
    w._maybe_report_lag()
    return w.metrics.value("hrnn_consumer_lag", {"partition": "0"})


@pytest.mark.parametrize("low, committed, lag", [(0, 400, 0), (0, 350, 50), (0, None, 400), (500, 200, 0)])
def test_a_partition_without_a_position_reports_its_lag_from_where_it_reads(make_worker, low, committed, lag):
    """From the committed offset (none: the log's start; below the log's start, as retention deleted what the
    group had not read: there)."""
    w = make_worker()
    w._consumer = Watermarks(low, max(low, 400))
    if committed is not None:
        w._consumer.committed_offsets[0] = committed
    assign(w, 0)
    assert reported_lag(w) == lag


def test_a_rewound_partition_reports_its_lag_from_the_offset_it_was_rewound_to(make_worker):
    """A rewind (an aborted transaction, a failed commit) leaves no position either: not the lag at assignment."""
    w = make_worker()
    w._consumer = Watermarks(0, 400)
    assign(w, 0)  # never committed: 400 behind
    w._consumer.committed_offsets[0] = 400
    w._rewind({0: 350})
    assert reported_lag(w) == 50


# ---- a transaction that fails before its commit ------------------------------------------------------

def failing(error: KafkaError):
    def call(*args, **kwargs):
        raise KafkaException(error)
    return call


def test_a_produce_refused_in_an_abortable_transaction_aborts_it_and_reads_the_batch_again(make_worker):
    """librdkafka refuses produce() with _STATE once the transaction can only be aborted (an earlier record
    failed, the coordinator aborted it): the batch must not stay half-produced in an open transaction."""
    w = make_worker("exactly_once")
    assign(w, 0)
    aborts = []
    w._producer.abort_transaction = lambda *args: aborts.append("abort")
    w._producer.produce = failing(KafkaError(KafkaError._STATE, "transactional state is abortable"))
    result = w.process_batch([event(0, 0, "alice"), event(0, 1, "bob")])
    assert result.aborted == 1 and aborts == ["abort"] and w._producer.commit_calls == 0
    assert w.stores[0].get("alice") is None and w._consumer.seeks == [(0, 0)]


@pytest.mark.parametrize("call", ["begin_transaction", "produce"])
def test_a_fenced_producer_stops_the_worker_with_a_typed_error_and_stores_nothing(make_worker, call):
    w = make_worker("exactly_once")
    assign(w, 0)
    setattr(w._producer, call, failing(KafkaError(KafkaError._FENCED, "producer fenced", fatal=True)))
    with pytest.raises(WorkerError, match="transaction failed: .*producer fenced"):
        w.process_batch([event(0, 0, "alice")])
    assert w.stores[0].get("alice") is None and w._consumer.commits == []


def test_transactions_not_ready_at_start_are_waited_for_then_a_typed_error(make_worker, monkeypatch):
    monkeypatch.setattr(worker.time, "sleep", lambda s: None)
    w = make_worker("exactly_once")
    answers = [KafkaError(KafkaError._TIMED_OUT, "retry call to resume", retriable=True)] * 2 + [None]

    def init_transactions(timeout=None):
        if (error := answers.pop(0)) is not None:
            raise KafkaException(error)

    w._producer.init_transactions = init_transactions
    w._init_transactions()
    assert answers == []
    w.settings.restore_timeout_s = 0
    w._producer.init_transactions = failing(KafkaError(KafkaError._TIMED_OUT, "retry call to resume", retriable=True))
    with pytest.raises(WorkerError, match="cannot start the worker's transactions"):
        w._init_transactions()
