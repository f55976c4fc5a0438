"""The streaming inference worker: events in, one recommendation per valid event out.

One batch, start to end (the DESIGN.md commit order):

  poll      consumer.consume(batch_size, ...): what is fetched, as soon as one record is there
  route     decode + validate; invalid -> DLQ, mis-keyed -> re-keyed onto the input topic
  load      RocksDB multi-get of the batch's users, from the store of their partition
  step      ONE Recommender.recommend call for all events (two while a canary serves: one per
            version, each with its users; events at or below a user's stored source offset were
            applied before and are left out: replays are idempotent); items
            off sale (stream/availability.py, read before the batch) are left out of every list
  produce   recommendations, one changelog record per touched user (changelog partition =
            input partition), DLQ and re-keyed records
  flush     every record delivered (or, exactly_once: send offsets + commit the transaction)
  commit    the consumer offsets, synchronously
  store     one WriteBatch per partition: the new states + the changelog offset they match

A crash before the commit replays the batch from the old states (outputs may repeat); a crash
after it loses only the store write, which the changelog catch-up on the next assignment
restores. Rebalance callbacks run inside consume(): between the processing of two batches, but
possibly between the consume() calls that poll one. Revocation closes the partition's store and
the poll drops the records of it already taken (their new owner reads them again from the
committed offset), so a batch only touches the stores of partitions assigned when it was polled.
A store built from another changelog than the broker's (the topics were recreated, or the worker
now talks to another cluster: the store's recorded changelog topic id differs; where the broker
gives no ids, its changelog offset lies past the changelog's end) is discarded and rebuilt from
the changelog: the input offsets its states remember belong to another log, and trusting them
would skip new events as replays. So is a store RocksDB finds damaged: on opening it, or on a read (it
checks a data block when a read first needs it), at assignment or in a batch, which then reads the rebuilt
store's states (those of committed batches: what the changelog restore applies). When only the input topic
was recreated, the store's recorded input topic id differs from the broker's: the states keep
their histories and forget their input offsets (PartitionStore.follow_input_log), and a restore
does the same for changelog records of the old log (their hrnn-source-log header).
"""
from __future__ import annotations

import gc
import logging
import os
import signal
import threading
import time
import uuid
from collections import defaultdict
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field, fields, replace
from typing import TypeVar

import torch
from confluent_kafka import Consumer, KafkaError, KafkaException, Message, Producer, TopicPartition
from confluent_kafka.admin import AdminClient

from model.errors import EventError, HRNNError
from model.events import Event, decode_event
from model.inference import Filters, Recommendations, Recommender, StepInput
from model.state import StateFormatError, UserState, decode_state, encode_state
from stream import records
from stream.announce import registry_id
from stream.availability import AvailabilityReader
from stream.canary import Serving
from stream.hotswap import ModelHolder
from stream.kafka_clients import (KafkaClientError, admin_client, create_consumer, create_producer, error_detail,
                                  kafka_error, produce_waiting, topic_id)
from stream.observability import Health, WorkerMetrics
from stream.record_limits import checked_message_max_bytes, too_small_for
from stream.settings import WorkerSettings
from stream.store import ChangelogRecord, PartitionStore, StateStores, StoreCorrupt
from stream.topics import DEFAULT_PARTITIONS, ensure_topics, partition_counts, standard_topics

log = logging.getLogger(__name__)

_CLIENT_TIMEOUT_S = 30.0
_LAG_EVERY_S = 5.0
_IDLE_POLL_S = 0.1  # longest wait for a first record: how soon an idle worker notices a stop
_RESTORE_IDLE_S = 5.0  # a changelog partition silent this long mid-restore: read its end again, warn
_PROBE_TIMEOUT_S = 5.0  # how long a fetch at a store's changelog offset may stay silent before "not there"
_BEAT_EVERY_RESTORED = 1000  # changelog records restored between two heartbeats: a long restore is not stuck
# Room beside the bounded waits for RocksDB and model work between two heartbeats (liveness_timeout_s).
_LIVENESS_SLACK_S = 60.0
# Test-only fault injection (the SIGKILL tests): "<phase>:<batch number>" makes the process kill
# itself with SIGKILL at that point of that batch. Phases: after_produce, after_flush, after_commit.
FAULT_ENV = "HRNN_FAULT_INJECT"


class WorkerError(HRNNError):
    """The worker cannot go on: records were not delivered, a commit or restore failed for good, or the
    availability topic cannot be read."""


T = TypeVar("T")
_Stepped = tuple[list["Incoming"], Recommendations]  # the events one version stepped, and what it made of them


_MAX_POLL_INTERVAL_MS = 300_000
# Commit errors that say the group's generation has moved on without this member: its partitions may be another's.
_NOT_A_MEMBER = frozenset({KafkaError.UNKNOWN_MEMBER_ID, KafkaError.ILLEGAL_GENERATION,
                           KafkaError.REBALANCE_IN_PROGRESS, KafkaError.FENCED_INSTANCE_ID})


def liveness_timeout_s(settings: WorkerSettings) -> float:
    """How long the worker loop may go without a heartbeat before /health reports it stuck (503: the
    liveness probe restarts it). The loop beats every iteration (an empty poll too: idle is not stuck)
    and after each wait bounded by restore_timeout_s (a partition's changelog restore, the first batch's
    wait for the announced version, then for the availability topic), so the longest legitimate gap is
    one of those waits plus the client calls around it (a restore's watermarks, probe and committed
    offset; an exactly_once commit and abort: at most 4 of _CLIENT_TIMEOUT_S), a batch's wait for more
    records, and _LIVENESS_SLACK_S for store and model work. Defaults: 120 + 120 + 0.01 + 60, about 300 s."""
    return (settings.restore_timeout_s + 4 * _CLIENT_TIMEOUT_S + settings.batch_timeout_s
            + _LIVENESS_SLACK_S)


def _beating(items: Iterator[T], beat: Callable[[], None], every: int = _BEAT_EVERY_RESTORED) -> Iterator[T]:
    """The items unchanged, with a heartbeat every `every` of them."""
    for i, item in enumerate(items, 1):
        if i % every == 0:
            beat()
        yield item


@dataclass(frozen=True, slots=True)
class Incoming:
    """A valid event and where it came from."""

    partition: int
    offset: int
    event: Event
    kafka_ts_ms: int | None  # the record's timestamp (producer create time), for the latency metric
    origin: tuple[int, int] | None = None  # a re-keyed copy's original record: (partition, offset) of the input


@dataclass
class Routed:
    events: list[Incoming]
    dead: list[tuple[Message, EventError]]
    rekey: list[tuple[Message, Event]]
    next_offsets: dict[int, int]  # partition -> offset after the batch's last record of it
    first_offsets: dict[int, int]  # partition -> the batch's first offset of it (to rewind an aborted batch)


@dataclass
class BatchResult:
    records: int = 0
    recommendations: int = 0
    dead_lettered: int = 0
    repartitioned: int = 0
    replayed: int = 0  # events at or below their user's stored source offset: not applied again
    unknown_items: int = 0
    rebuilt_states: int = 0
    users: int = 0
    batches: int = 0
    aborted: int = 0  # exactly_once batches whose transaction was aborted and will be re-read
    # Metrics of the batch, applied once it is durable: an aborted one counts nothing, its re-read counts them.
    dead_reasons: dict[str, int] = field(default_factory=dict)  # dead letters per reason
    latencies_s: list[float] = field(default_factory=list)  # event_to_recommendation_seconds samples

    def add(self, other: "BatchResult") -> None:
        """Sum the counts; the samples of one batch are not kept in totals."""
        for f in fields(self):
            mine = getattr(self, f.name)
            if isinstance(mine, int):
                setattr(self, f.name, mine + getattr(other, f.name))

    def counts(self) -> dict[str, int]:
        """The counts alone (what the worker logs when it stops)."""
        return {k: v for k, v in vars(self).items() if isinstance(v, int)}


def route(msgs: Sequence[Message], max_lead_s: float = 0.0, input_log: str | None = None,
          message_max_bytes: int = records.DEFAULT_MESSAGE_MAX_BYTES) -> Routed:
    """Split consumed records into valid events, dead letters and records to re-key. An event stamped more than
    `max_lead_s` (> 0) ahead of its record's Kafka timestamp is a dead letter, and so is a mis-keyed record whose
    re-keyed copy would be too large a record for the producer's `message_max_bytes`. `input_log`: the input
    topic's id (None: unknown), which the re-keyed copies name, and which tells them from records carrying a copy's
    header they were not given by us."""
    out = Routed([], [], [], {}, {})
    for msg in msgs:
        err = msg.error()
        if err is not None:
            if err.fatal():
                raise WorkerError(f"consumer failed: {err.str()}")
            log.warning("consumer error", extra={"error": err.str(), "code": err.code()})
            continue
        p, o = msg.partition(), msg.offset()
        out.next_offsets[p] = max(out.next_offsets.get(p, 0), o + 1)
        out.first_offsets[p] = min(out.first_offsets.get(p, o), o)
        try:
            event = decode_event(msg.value())
        except EventError as exc:
            out.dead.append((msg, exc))
            continue
        except Exception as exc:  # noqa: BLE001 (a decoder bug on one record must not crash-loop the group on it)
            out.dead.append((msg, _undecodable(msg, exc)))
            continue
        ts_type, ts = msg.timestamp()
        invalid = records.invalid_event(event, ts if ts_type else None, max_lead_s)
        if invalid is not None:
            out.dead.append((msg, invalid))
            continue
        key = msg.key()
        if key is None or key != event.user_id.encode():
            too_large = _copy_too_large(msg, event, input_log, message_max_bytes)
            if too_large is None:
                out.rekey.append((msg, event))
            else:
                out.dead.append((msg, too_large))
            continue
        headers = msg.headers()
        # most records carry no headers: the header scan is skipped for them
        origin = records.repartitioned_from(headers, msg.topic(), input_log, p, o) if headers else None
        out.events.append(Incoming(p, o, event, ts if ts_type else None, origin))
    out.events.sort(key=lambda e: (e.partition, e.offset))
    return out


def _rekeyed_headers(msg: Message, input_log: str | None) -> records.Headers:
    """The headers of a mis-keyed record's re-keyed copy: the producer's, then ours naming the original and its
    log (the input topic's id)."""
    return records.carried_headers(msg.headers(), records.repartition_headers(msg.topic(), msg.partition(),
                                                                              msg.offset(), input_log))


def _copy_too_large(msg: Message, event: Event, input_log: str | None,
                    message_max_bytes: int) -> EventError | None:
    """Why a mis-keyed record cannot be re-keyed: its copy, the producer's headers carried, would be refused by
    produce() under `message_max_bytes` (a record near the broker's limit with large headers, a producer limit
    below the input topic's) and fail its batch on every restart."""
    size = records.record_bytes(event.user_id, msg.value(), _rekeyed_headers(msg, input_log))
    bound = records.max_record_bytes(message_max_bytes)
    if size <= bound:
        return None
    return EventError("too_large", f"mis-keyed, and its re-keyed copy would have {size} bytes with the producer's "
                                   f"headers, more than the {bound} a record the worker writes may have (its "
                                   f"producer's message.max.bytes = {message_max_bytes})")


def _undecodable(msg: Message, exc: Exception) -> EventError:
    """The dead-letter reason of a record the decoder failed on with something other than an EventError."""
    detail = f"{type(exc).__name__}: {exc}"[:500]
    log.error("the event decoder failed on a record; dead-lettered as undecodable", exc_info=exc,
              extra={"partition": msg.partition(), "offset": msg.offset(), "error": detail})
    return EventError("undecodable", detail)


def split_by_owner(events: list[Incoming]) -> tuple[list[Incoming], list[Incoming]]:
    """Events whose user already appeared in another partition of this batch wait for a second round.

    With keys equal to user ids this never happens; it guards against producers that use a
    different partitioner, so a user's events are never stepped against two stores at once.
    """
    owner: dict[str, int] = {}
    now, later = [], []
    for e in events:
        (now if owner.setdefault(e.event.user_id, e.partition) == e.partition else later).append(e)
    return now, later


def applied_before(state: UserState | None, offset: int) -> bool:
    return state is not None and offset <= state.source_offset


def fresh_events(events: list[Incoming], stored: Mapping[str, UserState | None]) -> list[Incoming]:
    """The events not applied to their user's state before: a record at or below the state's source offset
    (its batch read again), or a re-keyed copy of a record whose copy was applied already (the original's batch
    read again after a crash between the copy and its commit: the second copy lies at an offset of its own)."""
    origins: dict[str, dict[int, int]] = {}
    out = []
    for e in events:
        state = stored[e.event.user_id]
        if applied_before(state, e.offset):
            continue
        if e.origin is not None:
            seen = origins.setdefault(e.event.user_id, dict(state.origins) if state else {})
            p, o = e.origin
            if o <= seen.get(p, -1):
                continue
            seen[p] = o
        out.append(e)
    return out


def filters_of(settings: WorkerSettings) -> Filters:
    return Filters(exclude_purchased=settings.exclude_purchased, purchase_types=tuple(settings.purchase_types),
                   exclude_session_items=settings.exclude_session_items,
                   exclude_event_types=tuple(settings.exclude_event_types))


class _Deliveries:
    """Delivery reports of one batch: failures, and the highest changelog offset per partition."""

    def __init__(self, changelog_topic: str) -> None:
        self.changelog_topic = changelog_topic
        self.reset()

    def reset(self) -> None:
        self.errors: list[str] = []
        self.changelog_offsets: dict[int, int] = {}

    def __call__(self, err: KafkaError | None, msg: Message) -> None:
        if err is not None:
            self.errors.append(f"{msg.topic()}: {err.str()}")
        elif msg.topic() == self.changelog_topic:
            p, o = msg.partition(), msg.offset()
            if o > self.changelog_offsets.get(p, -1):
                self.changelog_offsets[p] = o


# Tracked objects a batch holds at its peak per event with full histories: the decoded state, its working
# copy, the event's history view, the output list (25-30 measured; tests/test_worker_units.py checks it).
TRACKED_PER_EVENT = 64


def gc_threshold_for(settings: WorkerSettings) -> int:
    """The serving process's gen-0 GC threshold: the configured one, else one that a batch of
    `batch_size` events does not reach, so collections follow growth that outlives batches instead of
    walking every large batch's states (a fixed 20,000 cost a sixth of a batch of 1,024 full histories)."""
    return settings.gc_threshold or max(20_000, TRACKED_PER_EVENT * settings.batch_size)


def tune_process_gc(threshold: int) -> None:
    """Keep Python's cycle collector off the latency path of a serving process.

    A batch allocates thousands of short-lived objects, so with the default gen-0 threshold (700)
    collections run several times a batch, and every full one walks the model, the item index
    and the rest of what was loaded at start. Freezing what exists now takes those out of every
    later collection; a higher threshold makes collections rare. On the stream bench's latency
    phase this took the p99 from 149/271/442 ms to 112/125/175 ms in three paired runs.
    Call once, after the worker is built; 0 leaves the thresholds alone (freezing still applies)."""
    gc.collect()
    gc.freeze()
    if threshold:
        gc.set_threshold(threshold, *gc.get_threshold()[1:])


def _too_large(exc: KafkaException) -> bool:
    err = kafka_error(exc)
    return err is not None and err.code() == KafkaError.MSG_SIZE_TOO_LARGE


def _maybe_crash(phase: str, batch_no: int) -> None:
    spec = os.environ.get(FAULT_ENV)
    if spec and spec == f"{phase}:{batch_no}":
        os.kill(os.getpid(), signal.SIGKILL)


class Worker:
    """One member of the worker group. Use run(stop_event), or start() + poll_once() + close()."""

    def __init__(self, settings: WorkerSettings, *, recommender: Recommender | None = None,
                 models: ModelHolder | None = None, metrics: WorkerMetrics | None = None,
                 health: Health | None = None) -> None:
        """The serving model comes from `models` (owned by the caller), else `recommender`, else the
        registry's CURRENT version (validated; a broken one raises ModelRefused)."""
        settings.validate()
        if settings.torch_threads:
            torch.set_num_threads(settings.torch_threads)
        self.settings = settings
        self.filters = filters_of(settings)
        self.metrics = metrics or WorkerMetrics()
        self.health = health or Health()
        self._own_models = models is None
        if models is not None:
            self.models = models
        elif recommender is not None:
            self.models = ModelHolder(recommender, registry=settings.registry, device=settings.device,
                                      metrics=self.metrics)
        else:
            self.models = ModelHolder.open(settings.registry, device=settings.device, metrics=self.metrics)
        self._message_max_bytes = checked_message_max_bytes(settings, self.models.serving())
        self.models.refuse_when(lambda rec: too_small_for(settings, [rec]))
        self.stores = StateStores(settings.state_dir, settings.group, settings.input_topic, settings.state_format)
        self.models.prebuild_from(lambda: self.stores.scan_states(chunk=64), settings.prebuild_max_users)
        self.totals = BatchResult()
        self._deliveries = _Deliveries(settings.changelog_topic)
        self._consumer: Consumer | None = None
        self._producer: Producer | None = None
        self._restorer: Consumer | None = None
        self._admin: AdminClient | None = None
        self.availability: AvailabilityReader | None = None  # the items off sale, followed from start()
        self._input_log: str | None = None  # the input topic's id, read on every assignment
        self._changelog_log: str | None = None  # the changelog topic's id, read on every assignment (None: unknown)
        self._last_lag = 0.0
        # partition -> where the consumer reads from while it has no position (none until a record is read after an
        # assignment or a seek): the committed offset at the assignment, the offset of the last rewind
        self._reads_from: dict[int, int] = {}
        self._announced_read = False  # whether the first batch waited for the announced version
        self._consume_calls = 0  # consume() calls of the input consumer so far
        self._consumed_at = time.monotonic()  # when the last consume() call returned
        self._max_poll_s = _MAX_POLL_INTERVAL_MS / 1000  # the consumer's max.poll.interval.ms, read in start()
        self._revoked_in: dict[int, int] = {}  # partition -> the consume() call of this poll that revoked it
        self._assigned_in: dict[int, int] = {}  # partition -> the consume() call of this poll that assigned it
        self.assigned = threading.Event()  # set once the first partitions are assigned and restored

    # ---- lifecycle -------------------------------------------------------------------------

    def start(self) -> None:
        s = self.settings
        self._admin = admin_client(s.bootstrap_servers, s.kafka)
        if s.create_topics:
            self._ensure_topics(self._admin)
        txn_id = s.effective_transactional_id() if s.exactly_once else None
        self._producer = create_producer(s.bootstrap_servers, s.producer_kafka, transactional_id=txn_id)
        if s.exactly_once:
            self._init_transactions()
        if s.follow_availability:  # read while the group forms; the first batch waits for its end
            self.availability = AvailabilityReader(s.bootstrap_servers, s.availability_topic, extra=s.consumer_kafka,
                                                   create_topic=s.create_topics).start()
        restore_extra = {**s.consumer_kafka, "enable.partition.eof": False}
        self._restorer = create_consumer(s.bootstrap_servers, f"{s.group}-restore-{uuid.uuid4().hex[:8]}",
                                         restore_extra)
        extra = {**s.consumer_kafka, **({"isolation.level": "read_committed"} if s.exactly_once else {})}
        self._consumer = create_consumer(s.bootstrap_servers, s.group, extra)
        self._max_poll_s = int(extra.get("max.poll.interval.ms", _MAX_POLL_INTERVAL_MS)) / 1000  # accepted: an int
        self._consumer.subscribe([s.input_topic], on_assign=self._on_assign, on_revoke=self._on_revoke,
                                 on_lost=self._on_lost)
        if s.follow_updates and self._own_models:
            key = s.registry_id or registry_id(s.registry)
            self.models.follow(s.bootstrap_servers, s.updates_topic, registry_id=key, extra=s.consumer_kafka,
                               create_topic=s.create_topics)
        self.health.update(alive=True, state="running", group=s.group, model_version=self.models.version)
        log.info("worker started", extra={"group": s.group, "input_topic": s.input_topic,
                                          "model_version": self.models.version,
                                          "guarantee": s.processing_guarantee})

    def _init_transactions(self) -> None:
        """Fence an earlier producer of this transactional id; a coordinator not up yet is waited for (librdkafka
        says retry) up to restore_timeout_s, as an at-least-once worker waits for its broker."""
        deadline = time.monotonic() + self.settings.restore_timeout_s
        while True:
            try:
                self._producer.init_transactions(_CLIENT_TIMEOUT_S)
                return
            except KafkaException as exc:
                err = kafka_error(exc)
                if not (err is not None and err.retriable()) or time.monotonic() >= deadline:
                    raise WorkerError(f"cannot start the worker's transactions: {exc}") from None
                log.warning("transactions not ready yet; retrying", extra={"error": err.str()})
                time.sleep(1.0)  # librdkafka's own wait is the call's timeout; not every retriable error waits

    def _ensure_topics(self, admin: AdminClient) -> None:
        s = self.settings
        n = partition_counts(admin).get(s.input_topic) or s.partitions or DEFAULT_PARTITIONS
        ensure_topics(admin, standard_topics(s.input_topic, s.output_topic, s.group, n, s.updates_topic))
        actual = partition_counts(admin).get(s.input_topic, n)
        if actual != n:  # someone (a producer's auto-create) made the input topic meanwhile
            ensure_topics(admin, standard_topics(s.input_topic, s.output_topic, s.group, actual, s.updates_topic))

    def run(self, stop: threading.Event) -> BatchResult:
        """Process batches until `stop` is set, then finish the batch in hand and close. /health reports
        the worker dead once the loop has not gone round for liveness_timeout_s."""
        if self._consumer is None:
            self.start()
        self.health.expect_beats(liveness_timeout_s(self.settings))
        try:
            while not stop.is_set():
                self.poll_once()
        except BaseException as exc:
            self.health.update(alive=False, state="failed", error=str(exc))
            raise
        finally:
            self.close()
        return self.totals

    def poll_once(self) -> BatchResult | None:
        self.health.beat()
        msgs = self.poll_batch()
        if msgs:
            result = self.process_batch(msgs)
        else:  # idle: a validated version still takes over now, so /health and metrics name it
            result = None
            self._serving_now()
            self._report_unavailable()
        self._maybe_report_lag()
        return result

    def poll_batch(self) -> list[Message]:
        """Up to batch_size records, as soon as there is one.

        consume(n, t) waits until n records or t, so a fixed timeout would hold every batch at low
        load. Instead: take what is already fetched; if nothing, wait for the first record, then
        take what came with it (waiting at most batch_timeout_s for more). Under load the fetch
        queue is full and batches are full; at low load a record waits for nothing. Records of a
        partition revoked by a later of these calls are left out (_still_owned)."""
        n = self.settings.batch_size
        self._revoked_in.clear()
        self._assigned_in.clear()
        calls = [self._consume(n, 0)]
        if not calls[0][1]:
            calls.append(self._consume(1, _IDLE_POLL_S))
            if calls[-1][1] and n > 1:
                calls.append(self._consume(n - 1, self.settings.batch_timeout_s))
        if self._revoked_in:
            return self._still_owned(calls)
        return [m for _, msgs in calls for m in msgs]

    def _consume(self, n: int, timeout_s: float) -> tuple[int, list[Message]]:
        """One consume() call and its number: _on_revoke notes the number of the call it ran in."""
        self._consume_calls += 1
        msgs = self._consumer.consume(num_messages=n, timeout=timeout_s)
        self._consumed_at = time.monotonic()
        return self._consume_calls, msgs

    def _still_owned(self, calls: list[tuple[int, list[Message]]]) -> list[Message]:
        """The polled records less those of partitions revoked in or after the consume() call that returned them.

        A cooperative rebalance can revoke a partition inside a later consume() of the same poll (its store is
        then closed): processing its records would restore the store for a partition another worker now owns,
        and produce and commit beside it. Nothing of them is committed, so their new owner reads them again from
        the committed offset, in both guarantees. A partition assigned again later in the poll keeps the records
        of the calls after its revocation (they are of the new assignment); one revoked and assigned again in the
        same call cannot tell which records are of which assignment: all of its records are dropped and it is
        rewound to where the new assignment started, so none is skipped."""
        again = {p for p, call in self._revoked_in.items()
                 if self._assigned_in.get(p) == call and self.stores.get(p) is not None}
        kept: list[Message] = []
        lowest: dict[int, int] = {}  # partition -> its lowest dropped offset
        for call, msgs in calls:
            for m in msgs:
                p = m.partition()
                if m.error() is None and (p in again or self._revoked_in.get(p, -1) >= call
                                          or self.stores.get(p) is None):
                    lowest[p] = min(lowest.get(p, m.offset()), m.offset())
                else:
                    kept.append(m)
        if lowest:
            n_dropped = sum(len(msgs) for _, msgs in calls) - len(kept)
            log.info("dropped the records of partitions revoked while the batch was read; their owner reads them "
                     "again from the committed offset", extra={"partitions": sorted(lowest), "records": n_dropped})
        self._rewind({p: self._start_of_assignment(p, lowest[p]) for p in again if p in lowest})
        return kept

    def _start_of_assignment(self, partition: int, lowest_dropped: int) -> int:
        committed = self._committed_offset(partition)
        # Never committed: the assignment began at or before the lowest record dropped (auto.offset.reset).
        return committed if committed >= 0 else lowest_dropped

    def close(self) -> None:
        if self._consumer is not None:
            try:
                self._consumer.close()  # runs the revocation callback: stores close there
            except (KafkaException, RuntimeError) as exc:
                log.warning("consumer close failed", extra={"error": str(exc)})
            self._consumer = None
        if self._producer is not None:
            self._producer.flush(_CLIENT_TIMEOUT_S)
            self._producer = None
        if self._restorer is not None:
            self._restorer.close()
            self._restorer = None
        if self.availability is not None:
            self.availability.stop()
            self.availability = None
        self._admin = None  # kept, it would try the bootstrap servers every second for as long as the object lives
        self.stores.close_all()
        if self._own_models:
            self.models.close()
        if self.health.alive:  # a failure keeps its state and error
            self.health.update(alive=False, state="stopped")
        log.info("worker stopped", extra=self.totals.counts())

    def _serving_now(self) -> Serving:
        before = self.models.serving()
        self.models.swap_if_ready()
        serving = self.models.serving()
        if serving != before:
            self.health.update(model_version=serving.stable.version,
                               canary=serving.canary and {"version": serving.canary.version, "share": serving.share})
        return serving

    def _await_announced(self) -> None:
        """Before the first batch: the version the announcements name is loaded, so a restarted worker serves
        each user what the group serves them (a canary's users their canary from their first event on, not
        the registry's current version until the canary has loaded again). Past restore_timeout_s the batch
        goes on with the current version, a valid one; the announced one swaps in once loaded."""
        self._announced_read = True
        if not self.models.wait_announced(self.settings.restore_timeout_s):
            log.warning("the announced model version was not loaded within restore_timeout_s; serving the "
                        "registry's current version until it is", extra={"version": self.models.version,
                                                                          "swap": str(self.models.stats())})

    def _follow_availability(self) -> None:
        """Leave out the items off sale as the reader has them now; before the first batch, it reads
        the whole availability topic (a restarted worker never serves an item taken off sale earlier)."""
        reader = self.availability
        if reader is None:
            return
        timeout_s = self.settings.restore_timeout_s
        if not reader.caught_up and not reader.wait_caught_up(timeout_s) and reader.error is None:
            raise WorkerError(f"the availability topic {reader.topic!r} was not read to its end within {timeout_s:g} s "
                              "(restore_timeout_s)")
        if reader.error is not None:
            raise WorkerError(f"following the availability topic {reader.topic!r} failed: {reader.error}")
        if reader.unavailable is not self.filters.unavailable_items:
            self.filters = replace(self.filters, unavailable_items=reader.unavailable)
            self._report_unavailable()

    def _report_unavailable(self) -> None:
        """The gauge of items off sale, as the reader has them: set as a batch takes the reader's set and while idle
        too, or a worker without events (one restarted on a topic that lists items) reported 0."""
        reader = self.availability
        if reader is not None:
            self.metrics.unavailable_items.set(len(reader.unavailable))

    # ---- rebalancing and restore -------------------------------------------------------------

    def _on_assign(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        self._input_log = self._read_input_log()
        self._changelog_log = self._read_changelog_log()
        for tp in partitions:
            self._assigned_in[tp.partition] = self._consume_calls
            self.open_partition(tp.partition)
            self.health.beat()  # each restore may take restore_timeout_s; several in a row are not stuck
        self.health.update(partitions=self.stores.partitions)
        if partitions:
            self.assigned.set()

    def _on_revoke(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        # Callbacks run inside consume(), so the previous batch is already committed and stored; records of
        # these partitions the current poll already took are dropped by poll_batch.
        for tp in partitions:
            self._revoked_in[tp.partition] = self._consume_calls
            self.stores.close(tp.partition)
        self.metrics.forget_partitions([tp.partition for tp in partitions])
        self.health.update(partitions=self.stores.partitions)
        log.info("partitions revoked", extra={"partitions": [tp.partition for tp in partitions]})

    def _on_lost(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        log.warning("partitions lost (session timed out)", extra={"partitions": [tp.partition for tp in partitions]})
        self._on_revoke(consumer, partitions)

    def open_partition(self, partition: int) -> None:
        """Open the partition's store and catch it up from the changelog."""
        try:
            self._catch_up(partition, self._open_store(partition))
        except StoreCorrupt as exc:  # a damaged block opening did not read (it reads none): found by a read
            self._catch_up(partition, self._rebuilt_store(partition, "is damaged", error=str(exc)))

    def _catch_up(self, partition: int, store: PartitionStore) -> None:
        """Discard a store of another changelog, then catch the store up from the changelog."""
        s = self.settings
        t0 = time.perf_counter()
        stale = self._stale_store(store)
        if stale:
            store = self._rebuilt_store(partition, f"{stale} (topics recreated, or another cluster)",
                                        changelog_offset=store.changelog_offset, changelog_log=self._changelog_log)
        store.follow_changelog_log(self._changelog_log)
        forgotten = store.follow_input_log(self._input_log)
        if forgotten:
            log.warning("the input topic is another log than the one the partition's states were built from "
                        "(deleted and created again): the states keep their histories and forget their input "
                        "offsets", extra={"partition": partition, "states": forgotten, "input_log": self._input_log})
            self.metrics.input_new_logs_total.inc()
        committed = self._reads_from[partition] = self._committed_offset(partition)
        start = store.changelog_offset + 1
        changelog = read_changelog(self._restorer, s.changelog_topic, partition, start, s.restore_timeout_s)
        result = store.restore(_beating(changelog, self.health.beat), committed, self._input_log)
        log.info("partition assigned", extra={
            "partition": partition, "committed_offset": committed, "restored": result.applied,
            "skipped_uncommitted": result.skipped, "superseded": result.superseded,
            "changelog_offset": result.changelog_offset,
            "seconds": round(time.perf_counter() - t0, 3)})

    def _open_store(self, partition: int) -> PartitionStore:
        """The partition's store; a damaged local copy is wiped and opened empty (the changelog refills it)."""
        try:
            return self.stores.open(partition)
        except StoreCorrupt as exc:
            return self._rebuilt_store(partition, "is damaged", error=str(exc))

    def _rebuilt_store(self, partition: int, why: str, **extra: object) -> PartitionStore:
        """The partition's store wiped and opened empty: the changelog restore that follows refills it."""
        log.warning(f"partition store {why}: discarded, rebuilt from the changelog",
                    extra={"partition": partition, **extra})
        self.metrics.stores_discarded_total.inc()
        self.stores.wipe(partition)
        return self.stores.open(partition)

    def _stale_store(self, store: PartitionStore) -> str | None:
        """Why the store cannot be caught up from the broker's changelog; None when it can.

        Topic ids tell two logs apart whatever their lengths. Without them (a broker that gives none, a store
        of a build that recorded none), only a store past the changelog's end is known to be of another log."""
        recorded, current = store.changelog_log, self._changelog_log
        if recorded is not None and current is not None:
            return None if recorded == current else "was built from another changelog topic than the broker's"
        if not changelog_reaches(self._restorer, self.settings.changelog_topic, store.partition,
                                 store.changelog_offset, _PROBE_TIMEOUT_S):
            return "is past its changelog's end"
        return None

    def _read_changelog_log(self) -> str | None:
        """The changelog topic's id; None when it cannot be read now (stores are then checked by their offsets)."""
        if self._admin is None:  # clients set up without start(): nothing to ask
            return None
        try:
            return topic_id(self._admin, self.settings.changelog_topic)
        except KafkaClientError as exc:
            log.warning("cannot read the changelog topic's id; stores are checked against its end offset",
                        extra={"error": str(exc)})
            return None

    def _read_input_log(self) -> str | None:
        """The input topic's id; the last one known when it cannot be read now."""
        try:
            return topic_id(self._admin, self.settings.input_topic)
        except KafkaClientError as exc:
            log.warning("cannot read the input topic's id; its offsets are taken to name the log read before",
                        extra={"error": str(exc)})
            return self._input_log

    def _committed_offset(self, partition: int) -> int:
        tps = self._consumer.committed([TopicPartition(self.settings.input_topic, partition)],
                                       timeout=_CLIENT_TIMEOUT_S)
        tp = tps[0]
        if tp.error is not None:
            raise WorkerError(f"cannot read the committed offset of partition {partition}: {tp.error.str()}")
        return tp.offset  # negative (OFFSET_INVALID) when the group never committed this partition

    # ---- one batch -------------------------------------------------------------------------

    def process_batch(self, msgs: Sequence[Message]) -> BatchResult:
        t0 = time.perf_counter()
        self.health.beat()  # the waits below may take restore_timeout_s each
        if not self._announced_read:
            self._await_announced()
            self.health.beat()
        serving = self._serving_now()  # one stable version, one canary, one share for the whole batch
        self._follow_availability()
        self.health.beat()
        routed = route(msgs, self.settings.max_event_lead_s, self._input_log, self._message_max_bytes)
        result = BatchResult(records=len(msgs), batches=1)
        steps = self._step(serving, routed.events, result)
        # Checked after the model's work, before anything is produced: a stall there too (a throttled pod, a
        # slow device) must not put this batch's states after those of a worker that took the partitions over.
        if self._left_group():
            self._rewind(routed.first_offsets)  # ours again after the rejoin, or read by their new owner
            return BatchResult(records=len(msgs), batches=1, aborted=1)
        self._deliveries.reset()
        try:
            encoded = self._produce_batch(routed, steps, result)
        except KafkaException as exc:
            if not self.settings.exactly_once:
                raise
            self._end_failed_transaction(exc)  # a fenced producer or a failed abort raise WorkerError
            self._rewind(routed.first_offsets)
            encoded = None
        _maybe_crash("after_produce", self.totals.batches + 1)
        if encoded is None or self._finish(routed, encoded):  # aborted: nothing of it counts, it is read again
            result = BatchResult(records=len(msgs), batches=1, aborted=1)
        self.totals.add(result)
        self._observe(result, len(msgs), time.perf_counter() - t0)
        return result

    def _produce_batch(self, routed: Routed, steps: list[_Stepped], result: BatchResult) -> dict[int, dict[str, bytes]]:
        """Produce everything the batch writes (in its transaction under exactly_once); the states encoded."""
        if self.settings.exactly_once:
            self._producer.begin_transaction()
        self._produce_dead(routed.dead, result)
        self._produce_rekeyed(routed.rekey, result)
        return self._produce_steps(steps, result)

    def _step(self, serving: Serving, events: list[Incoming], result: BatchResult) -> list[_Stepped]:
        """Apply the events to their users' states; nothing is produced yet."""
        steps: list[_Stepped] = []
        pending = events
        while pending:
            now, pending = split_by_owner(pending)
            steps.extend(self._step_round(serving, now, result))
        return steps

    def _step_round(self, serving: Serving, events: list[Incoming], result: BatchResult) -> list[_Stepped]:
        stored = self._load_states(events)
        fresh = fresh_events(events, stored)
        result.replayed += len(events) - len(fresh)
        steps = []
        for model, mine in serving.split(fresh, lambda e: e.event.user_id):
            users = {e.event.user_id for e in mine}
            steps.append((mine, model.recommend(
                {u: stored[u] for u in users},
                [StepInput(e.event.user_id, e.event.item_id, e.event.event_type, e.event.timestamp_ms,
                           e.event.session_id) for e in mine],
                k=self.settings.k, filters=self.filters)))
        return steps

    def _produce_steps(self, steps: list[_Stepped], result: BatchResult) -> dict[int, dict[str, bytes]]:
        """Produce the stepped states and recommendations; returns the encoded new states per partition."""
        encoded: dict[int, dict[str, bytes]] = defaultdict(dict)
        for mine, recs in steps:
            self._produce_changelog(mine, recs, encoded)
            self._produce_recommendations(mine, recs, result)
            result.recommendations += len(mine)
            result.users += len(recs.states)
            result.unknown_items += recs.known.count(False)
            result.rebuilt_states += recs.rebuilt_users
        return encoded

    def _load_states(self, events: list[Incoming]) -> dict[str, UserState | None]:
        by_partition: dict[int, set[str]] = defaultdict(set)
        for e in events:
            by_partition[e.partition].add(e.event.user_id)
        states: dict[str, UserState | None] = {}
        for p, users in by_partition.items():
            store = self.stores.get(p)
            if store is None:  # poll_batch drops records of partitions not assigned (anymore): a bug if reached
                raise WorkerError(f"records of partition {p} reached a batch while it is not assigned to this "
                                  "worker; nothing of the batch is committed")
            try:
                states.update(store.get_many(users))
            except StoreCorrupt as exc:  # a damaged block under these users: the changelog holds their states
                self._catch_up(p, self._rebuilt_store(p, "is damaged", error=str(exc)))
                states.update(self.stores[p].get_many(users))
        return states

    # ---- produce ----------------------------------------------------------------------------

    def _produce(self, topic: str, value: bytes | None, key: bytes | str | None, *, partition: int | None = None,
                 headers: list | None = None, timestamp: int | None = None) -> None:
        kwargs: dict[str, int] = {"partition": partition} if partition is not None else {}
        if timestamp is not None:  # a re-keyed copy keeps the original's time: latency counts from the event
            kwargs["timestamp"] = timestamp
        produce_waiting(self._producer, topic, value, key, headers=headers, on_delivery=self._deliveries, **kwargs)

    def _produce_changelog(self, fresh: list[Incoming], recs: Recommendations,
                           encoded: dict[int, dict[str, bytes]]) -> None:
        last: dict[str, Incoming] = {}
        copied: dict[str, list[tuple[int, int]]] = defaultdict(list)
        for e in fresh:  # sorted by (partition, offset): the last one wins
            last[e.event.user_id] = e
            if e.origin is not None:
                copied[e.event.user_id].append(e.origin)
        for user, state in recs.states.items():
            src = last[user]
            state.source_offset = src.offset
            for p, o in copied.get(user, ()):
                state.origins[p] = max(o, state.origins.get(p, -1))
            value = encode_state(state, self.settings.state_format)
            encoded[src.partition][user] = value
            self._produce(self.settings.changelog_topic, value, user, partition=src.partition,
                          headers=records.changelog_headers(src.offset, self._input_log))

    def _produce_recommendations(self, fresh: list[Incoming], recs: Recommendations, result: BatchResult) -> None:
        # The hot loop of the worker: one record per event, so no helper calls in it.
        topic, version = self.settings.output_topic, recs.model_version
        source_topic, source_log = self.settings.input_topic, self._input_log
        produce, on_delivery = self._producer.produce, self._deliveries
        encode, Rec, Item = records.encode_recommendation, records.Recommendation, records.ScoredItem
        sample = result.latencies_s.append  # observed once the batch is durable (_observe)
        emitted = int(time.time() * 1000)
        for e, items, session_id in zip(fresh, recs.items, recs.session_ids):
            ev = e.event
            value = encode(Rec(ev.user_id, [Item(i, s) for i, s in items], version, session_id or ev.session_id,
                               ev.event_id, e.partition, e.offset, ev.timestamp_ms, emitted, source_topic,
                               source_log))
            try:
                produce(topic, value, ev.user_id, on_delivery=on_delivery)
            except BufferError:
                self._produce(topic, value, ev.user_id)
            if e.kafka_ts_ms is not None:
                sample(max(0, emitted - e.kafka_ts_ms) / 1000)

    def _produce_dead(self, dead: list[tuple[Message, EventError]], result: BatchResult) -> None:
        for msg, exc in dead:
            ours = records.dlq_headers(exc.reason, exc.detail, msg.topic(), msg.partition(), msg.offset(),
                                       self._input_log)
            self._produce_dead_letter(msg, ours)
            result.dead_reasons[exc.reason] = result.dead_reasons.get(exc.reason, 0) + 1
        result.dead_lettered += len(dead)

    def _produce_dead_letter(self, msg: Message, ours: records.Headers) -> None:
        """The dead letter clipped to the producer's limit; one still refused as too large goes again without its
        key, value and producer's headers (a crash here failed the batch on every restart)."""
        key, value, headers = records.clipped_dead_letter(msg.key(), msg.value(), msg.headers(), ours,
                                                          self._message_max_bytes)
        try:
            self._produce(self.settings.dlq_topic, value, key, headers=headers)
        except KafkaException as exc:
            if not _too_large(exc):
                raise
            log.warning("dead letter refused as too large even clipped; written without key, value and the "
                        "producer's headers", extra={"partition": msg.partition(), "offset": msg.offset(),
                                                     "error": error_detail(exc)})
            bare = records.bare_dead_letter(ours, len(msg.key() or b""), len(msg.value() or b""),
                                            records.headers_bytes(msg.headers()))
            self._produce(self.settings.dlq_topic, None, None, headers=bare)

    def _produce_rekeyed(self, rekey: list[tuple[Message, Event]], result: BatchResult) -> None:
        for msg, event in rekey:  # each fits a record (route dead-letters the others)
            ts_type, ts = msg.timestamp()
            self._produce(self.settings.input_topic, msg.value(), event.user_id,
                          headers=_rekeyed_headers(msg, self._input_log), timestamp=ts if ts_type else None)
        result.repartitioned += len(rekey)

    # ---- commit -----------------------------------------------------------------------------

    def _finish(self, routed: Routed, encoded: dict[int, dict[str, bytes]]) -> bool:
        """Make the batch durable in the DESIGN.md order; True when an exactly_once batch was aborted."""
        batch_no = self.totals.batches + 1
        offsets = [TopicPartition(self.settings.input_topic, p, o) for p, o in sorted(routed.next_offsets.items())]
        self._flush()
        _maybe_crash("after_flush", batch_no)
        if self.settings.exactly_once:
            if not self._commit_transaction(offsets):
                self._rewind(routed.first_offsets)
                return True
        elif not self._commit_offsets(offsets):
            # The states are stored (so the batch, read again, is replays: a batch slower than max.poll.interval.ms
            # would otherwise be redone and refused forever), but not the changelog offset: a later catch-up then
            # reads the changelog from before this batch, and the newer states another owner wrote since win.
            self._write_stores(encoded, changelog=False)
            self._rewind(routed.first_offsets)
            return False  # delivered all the same, and counted; read again, the batch is replays (states stored)
        _maybe_crash("after_commit", batch_no)
        self._write_stores(encoded)
        return False

    def _flush(self) -> None:
        remaining = self._producer.flush(_CLIENT_TIMEOUT_S)
        while remaining:  # librdkafka gives up by itself after delivery.timeout.ms; wait for its verdict
            self.health.beat()  # a bounded wait, not a stuck loop
            log.warning("records still in flight after flush", extra={"remaining": remaining})
            remaining = self._producer.flush(_CLIENT_TIMEOUT_S)
        if self._deliveries.errors:
            raise WorkerError(f"{len(self._deliveries.errors)} records were not delivered, first: "
                              f"{self._deliveries.errors[0]}; offsets not committed, the batch will be re-read")

    def _left_group(self) -> bool:
        """Whether the batch in hand was held past max.poll.interval.ms since its poll (a stall, or the first
        batch's waits): librdkafka has then left the group, and a worker that took its partitions may already
        have written newer states, which this batch's would follow in the changelog. Not processed: read again."""
        held = time.monotonic() - self._consumed_at
        if held <= self._max_poll_s:
            return False
        log.warning("batch held past max.poll.interval.ms: the group has moved on without this worker; the batch "
                    "is not processed and is read again", extra={"held_s": round(held, 1),
                                                                  "max_poll_interval_s": self._max_poll_s})
        return True

    def _commit_offsets(self, offsets: list[TopicPartition]) -> bool:
        """Commit; False when the group has moved on without this worker, whose states must then not be stored."""
        if not offsets:
            return True
        try:
            done = self._consumer.commit(offsets=offsets, asynchronous=False)
            failed = [tp for tp in done or () if tp.error is not None]
            if failed:
                raise KafkaException(failed[0].error)
        except KafkaException as exc:
            if exc.args[0].code() in _NOT_A_MEMBER:
                # Another worker may own these partitions and have stored newer states: the store's changelog
                # offset must not move past that worker's records, which a later catch-up would then miss.
                log.warning("offset commit refused: the group moved on without this worker; the batch is read "
                            "again", extra={"error": str(exc)})
                return False
            # Still the owner (a timeout, the coordinator moving): the states are stored, and their source
            # offsets keep a later re-read of these records from applying them twice.
            log.warning("offset commit failed; the batch may be re-read", extra={"error": str(exc)})
        return True

    def _commit_transaction(self, offsets: list[TopicPartition], attempts: int = 3) -> bool:
        """Add the offsets to the transaction, then commit it; False when it was aborted (the batch is read again).
        Each step is retried on its own: a commit that timed out is still in progress in librdkafka, which resumes
        it when called again and refuses to add offsets meanwhile."""
        group = self._consumer.consumer_group_metadata()
        steps = (lambda: self._producer.send_offsets_to_transaction(offsets, group, _CLIENT_TIMEOUT_S),
                 lambda: self._producer.commit_transaction(_CLIENT_TIMEOUT_S))
        return all(self._transaction_step(step, attempts) for step in steps)

    def _transaction_step(self, step: Callable[[], None], attempts: int) -> bool:
        for attempt in range(1, attempts + 1):
            self.health.beat()
            try:
                step()
                return True
            except KafkaException as exc:
                err = kafka_error(exc)
                if err is None:
                    raise WorkerError(f"transaction failed: {exc}") from None
                if err.retriable() and attempt < attempts:
                    continue
                if err.txn_requires_abort():  # e.g. the group moved on: someone else owns these offsets now
                    log.warning("transaction aborted; re-reading the batch", extra={"error": err.str()})
                    self._abort_transaction(err)
                    return False
                raise WorkerError(f"transaction failed: {err.str()}") from None
        return False

    def _end_failed_transaction(self, exc: KafkaException) -> None:
        """After begin or a produce failed: abort (the batch is then read again). librdkafka refuses produce() in
        an abortable state with _STATE, flagged or not, so any error short of fatal is aborted; a fatal one (a
        fenced producer) or a failed abort stop the worker with a WorkerError."""
        err = kafka_error(exc)
        if err is None or err.fatal():
            raise WorkerError(f"transaction failed: {exc}") from None
        log.warning("transaction aborted after a failed produce; re-reading the batch", extra={"error": err.str()})
        self._abort_transaction(err)

    def _abort_transaction(self, cause: KafkaError) -> None:
        try:
            self._producer.abort_transaction(_CLIENT_TIMEOUT_S)
        except KafkaException as exc:  # the worker stops as for any failed transaction: a typed error, exit 2
            raise WorkerError(f"transaction failed: {cause.str()}; aborting it failed too: {exc}") from None

    def _rewind(self, first_offsets: dict[int, int]) -> None:
        for p, o in first_offsets.items():
            try:
                self._consumer.seek(TopicPartition(self.settings.input_topic, p, o))
                self._reads_from[p] = o
            except KafkaException as exc:  # no longer ours: the new owner reads from the committed offset
                log.info("not rewinding a partition we no longer own", extra={"partition": p, "error": str(exc)})

    def _write_stores(self, encoded: dict[int, dict[str, bytes]], changelog: bool = True) -> None:
        for p, states in encoded.items():
            self.stores[p].write(states, self._deliveries.changelog_offsets.get(p) if changelog else None)

    # ---- metrics ----------------------------------------------------------------------------

    def _observe(self, result: BatchResult, n_records: int, seconds: float) -> None:
        m = self.metrics
        m.events_in_total.inc(n_records)
        m.recommendations_out_total.inc(result.recommendations)
        m.unknown_items_total.inc(result.unknown_items)
        m.repartitioned_total.inc(result.repartitioned)
        m.rebuilt_states_total.inc(result.rebuilt_states)
        for reason, n in result.dead_reasons.items():
            m.dlq_total.labels(reason=reason).inc(n)
        observe = m.event_to_recommendation_seconds.observe
        for seconds_late in result.latencies_s:
            observe(seconds_late)
        m.batch_size.observe(n_records)
        m.step_seconds.observe(seconds)

    def _maybe_report_lag(self) -> None:
        now = time.monotonic()
        if now - self._last_lag < _LAG_EVERY_S or self._consumer is None:
            return
        self._last_lag = now
        topic = self.settings.input_topic
        tps = [TopicPartition(topic, p) for p in self.stores.partitions]
        try:
            for tp in self._consumer.position(tps):
                low, high = self._consumer.get_watermark_offsets(tp, cached=True)
                # No position until a record is read after an assignment or a seek: an idle partition reports
                # from where it reads (never committed, or committed below what retention kept: the log's start).
                at = tp.offset if tp.offset >= 0 else max(self._reads_from.get(tp.partition, -1), low)
                if at >= 0 and high >= 0:
                    self.metrics.set_lag(tp.partition, high - at)
        except KafkaException as exc:
            log.debug("lag not available", extra={"error": str(exc)})
        self.metrics.states_stored.set(self.stores.estimate_count())
        self.health.update(batches=self.totals.batches, recommendations=self.totals.recommendations,
                           last_report=time.time())


# ---- changelog catch-up ---------------------------------------------------------------------

def _changelog_record(msg: Message) -> ChangelogRecord | None:
    """The record as the restore applies it; None for one no user of ours can have written (no key, a key that
    is not UTF-8, a value that is no state record)."""
    key, value = msg.key(), msg.value()
    if key is None:
        return None
    try:
        user = key.decode()
    except UnicodeDecodeError:
        return None
    headers = msg.headers()
    source = records.source_offset_of(headers)
    if source is None and value is not None:
        try:  # a record without the header (written by another tool): the state itself says
            source = decode_state(value).source_offset
        except StateFormatError:
            return None
    return ChangelogRecord(user, value, msg.offset(), -1 if source is None else source,
                           records.header(headers, records.H_SOURCE_LOG))


def read_changelog(consumer: Consumer, topic: str, partition: int, start: int,
                   timeout_s: float) -> Iterator[ChangelogRecord]:
    """Changelog records of one partition from `start` to the end, in offset order.

    "The end" is an empty fetch once the consumer's position has reached the high watermark:
    on Tansu the watermark is only the base offset of the last batch + 1, so the watermark alone
    would stop inside the last batch. librdkafka's position moves past transaction markers, so
    silence short of the watermark is a slow or absent leader, not the end, before the first answer
    and after it: ending there would drop the states of the records not read, and the next batch's
    changelog offset would hide them for good. When a partition stays silent for _RESTORE_IDLE_S,
    its end is read again (a log cut back below the position is read to its end); otherwise the
    rest is waited for up to `timeout_s`, then a WorkerError names the partition and the offsets.
    """
    tp = TopicPartition(topic, partition)
    low, high = _watermarks(consumer, tp)
    if start >= high:
        return
    consumer.assign([TopicPartition(topic, partition, max(start, low))])
    deadline = time.monotonic() + timeout_s
    last_data = time.monotonic()
    answered = False  # a fetch came back: a record read, or a position (it also moves past transaction markers)
    warned = False
    try:
        while True:
            msgs = consumer.consume(num_messages=2000, timeout=0.1)
            read = 0
            for msg in msgs:
                if msg.error() is not None:
                    if msg.error().fatal():
                        raise WorkerError(f"reading changelog {topic}[{partition}] failed: {msg.error().str()}")
                    continue
                read += 1
                rec = _changelog_record(msg)
                if rec is not None:
                    yield rec
            now = time.monotonic()
            if read:  # errors alone (a broker that is down) are no progress: the deadline still counts
                answered, last_data = True, now
                continue
            position = consumer.position([tp])[0].offset
            answered = answered or position >= 0
            if position >= high:
                return
            if answered and now - last_data > _RESTORE_IDLE_S:
                if position >= _end_now(consumer, tp, high, deadline - now):
                    return
                if not warned:
                    log.warning("changelog silent short of its end; waiting for the rest up to restore_timeout_s",
                                extra={"changelog": topic, "partition": partition, "position": position, "end": high})
                warned, last_data = True, now  # the next look at its end in _RESTORE_IDLE_S
            if now > deadline:
                raise WorkerError(_restore_late(topic, partition, timeout_s, position if answered else None, high))
    finally:
        consumer.unassign()


def _end_now(consumer: Consumer, tp: TopicPartition, high: int, timeout_s: float) -> int:
    """The partition's high watermark read again, never above `high` (records written after the restore
    began are not waited for); `high` when it cannot be read now (a broker that stalls may not answer)."""
    try:
        return min(high, consumer.get_watermark_offsets(tp, timeout=max(0.1, min(_CLIENT_TIMEOUT_S, timeout_s)))[1])
    except KafkaException:
        return high


def _restore_late(topic: str, partition: int, timeout_s: float, position: int | None, high: int) -> str:
    where = f"changelog {topic}[{partition}]"
    if position is None:
        return (f"{where} did not answer a fetch within {timeout_s:g} s (its records end ~{high}); is its leader "
                f"up? raise restore_timeout_s if the broker is just slow")
    return f"{where} not caught up within {timeout_s:g} s (at {position}, end ~{high}); raise restore_timeout_s"


def changelog_reaches(consumer: Consumer, topic: str, partition: int, offset: int, timeout_s: float) -> bool:
    """Whether the changelog partition holds (or held, before compaction) a record at `offset`.

    Below the high watermark it does. At or past it Kafka's log has ended, but Tansu's watermark
    stops at the last batch's base offset, so the record is fetched: the log reaches `offset` when
    the fetch returns it or a later record, not when the consumer is reset to an earlier offset
    (auto.offset.reset after "out of range") or the partition stays silent.
    """
    tp = TopicPartition(topic, partition)
    high = _watermarks(consumer, tp)[1]
    if offset < high:
        return True
    if high == 0:  # an empty changelog holds nothing
        return False
    consumer.assign([TopicPartition(topic, partition, offset)])
    deadline = time.monotonic() + timeout_s
    try:
        while time.monotonic() < deadline:
            for msg in consumer.consume(num_messages=1, timeout=0.1):
                if msg.error() is None:
                    return msg.offset() >= offset
        return False
    finally:
        consumer.unassign()


def _watermarks(consumer: Consumer, tp: TopicPartition) -> tuple[int, int]:
    try:
        return consumer.get_watermark_offsets(tp, timeout=_CLIENT_TIMEOUT_S)
    except KafkaException as exc:
        raise WorkerError(f"cannot read changelog {tp.topic}[{tp.partition}] (does it have as many partitions as "
                          f"the input topic?): {error_detail(exc)}") from None


__all__ = ["Worker", "WorkerError", "BatchResult", "route", "read_changelog", "changelog_reaches", "FAULT_ENV"]
