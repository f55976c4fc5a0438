"""Reading a small compacted table topic whole, then following it, on a background thread.

Model announcements and item availability are both tables kept as one-partition compacted
topics: every process that needs one reads it from the beginning (no consumer group, nothing
committed), is "caught up" once it holds what was there when it started, then applies each new
record as it comes. Subclasses say what a record means (`_take`) and what to do after each poll
(`_polled`).

"Caught up" needs care on Tansu: its high watermark is the base offset of the last record
batch + 1, not the log end. A reader is caught up once it holds a record at or past
(high watermark - 1) and a consume then comes back with fewer records than it asked for: a fetch
brings a record batch whole, so the rest of that last batch was taken with it. Not "comes back
empty": a topic written to a few times a second (a catalogue service's availability feed) never
gives an empty consume, and the worker waiting for the reader would never start. Also caught up when
the topic holds no records (high watermark <= low watermark: never written, or every record removed
by compaction or retention).

No single record can stop a reader: one whose `_take` raises is logged, counted (`malformed`) and
skipped, since every reader reads every record again on each start and one bad producer would
otherwise stop them all.
"""
from __future__ import annotations

import logging
import threading
import time

from confluent_kafka import OFFSET_BEGINNING, Consumer, KafkaError, KafkaException, TopicPartition

from stream.kafka_clients import ClientSettings, admin_client, raise_if_fatal, reader_consumer
from stream.topics import ensure_topics, table_topic

log = logging.getLogger(__name__)

CATCH_UP_IDLE_S = 10.0  # fetches empty this long below the watermark: the watermark's record is gone
_WATERMARK_RETRY_MAX_S = 5.0  # between two tries to read the offsets: a topic just created, or a broker restarting
_WATERMARK_LOG_S = 30.0  # how often a reader still waiting for the offsets says so
_POLL_RECORDS = 100  # records asked of one consume


def ensure_table_topic(bootstrap: str, topic: str, *, extra: ClientSettings | None = None,
                       timeout_s: float = 30.0) -> None:
    """Create a table topic (one partition, compacted) if it is missing; an existing one is checked."""
    ensure_topics(admin_client(bootstrap, extra), [table_topic(topic)], timeout_s=timeout_s)


class CompactedTopicReader:
    """Reads partition 0 of `topic` from its start on a thread; `error` holds what stopped it.

    `extra` configures the consumer and the admin client that creates the topic."""

    thread_name = "hrnn-compacted-reader"

    def __init__(self, bootstrap: str, topic: str, *, extra: ClientSettings | None = None,
                 poll_timeout_s: float = 0.5, create_topic: bool = True) -> None:
        self.bootstrap, self.topic, self.extra = bootstrap, topic, extra
        self.poll_timeout_s, self.create_topic = poll_timeout_s, create_topic
        self.error: BaseException | None = None
        self.malformed = 0  # records skipped: not what the topic holds, or their `_take` failed
        self._caught_up = threading.Event()
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None

    # --- what a subclass defines ---

    def _take(self, key: bytes | None, value: bytes | None, offset: int) -> None:
        raise NotImplementedError

    def _polled(self, caught_up_now: bool) -> None:
        """After each poll's records were taken; `caught_up_now` the first time the reader is caught up
        (`caught_up` turns true only after this call returns)."""

    # --- lifecycle ---

    @property
    def caught_up(self) -> bool:
        return self._caught_up.is_set()

    def start(self) -> "CompactedTopicReader":
        if self.create_topic:
            ensure_table_topic(self.bootstrap, self.topic, extra=self.extra)
        self._thread = threading.Thread(target=self._run, name=self.thread_name, daemon=True)
        self._thread.start()
        return self

    def wait_caught_up(self, timeout_s: float) -> bool:
        """True once caught up; False at the deadline, or as soon as the reader has failed (see `error`).
        A timeout that is not a number >= 0 (NaN) waits for nothing: a NaN deadline is never reached."""
        deadline = time.monotonic() + (timeout_s if timeout_s >= 0 else 0.0)
        while not self._caught_up.wait(min(0.2, max(0.0, deadline - time.monotonic()))):
            if self.error is not None or time.monotonic() >= deadline:
                return False
        return True

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)

    def __enter__(self) -> "CompactedTopicReader":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _run(self) -> None:
        consumer = reader_consumer(self.bootstrap, self.extra)
        try:
            consumer.assign([TopicPartition(self.topic, 0, OFFSET_BEGINNING)])
            watermarks = self._watermarks(consumer)
            if watermarks is None:
                return  # stopped before the topic answered
            low, high = watermarks
            # no records: never written, or all removed (low == high > 0); max: a low not known (< 0) says nothing
            reached_end = high <= max(low, 0)
            last_progress = time.monotonic()
            while not self._stop.is_set():
                msgs = consumer.consume(num_messages=_POLL_RECORDS, timeout=self.poll_timeout_s)
                if msgs:
                    last_progress = time.monotonic()
                elif not reached_end and time.monotonic() - last_progress > CATCH_UP_IDLE_S:
                    # the record below the watermark is gone (e.g. a tombstone deleted by compaction)
                    log.warning("no record at the high watermark; assuming caught up",
                                extra={"topic": self.topic, "high_watermark": high})
                    reached_end = True
                for msg in msgs:
                    err = msg.error()
                    if err is not None:
                        raise_if_fatal(self.topic, err)
                        if err.code() != KafkaError._PARTITION_EOF:
                            log.warning("reading %s: %s", self.topic, err.str(), extra={"topic": self.topic})
                        continue
                    reached_end = reached_end or msg.offset() >= high - 1
                    self._take_guarded(msg.key(), msg.value(), msg.offset())
                caught_up_now = not self.caught_up and reached_end and len(msgs) < _POLL_RECORDS
                self._polled(caught_up_now)  # first: whoever waits for caught_up reads what it published
                if caught_up_now:
                    self._caught_up.set()
                    log.info("table topic read up to its end", extra={"topic": self.topic})
        except BaseException as exc:  # noqa: BLE001 (recorded for the owner; the thread must not die silently)
            self.error = exc
            log.error("reader of %s stopped: %s", self.topic, exc, extra={"topic": self.topic})
        finally:
            consumer.close()

    def _take_guarded(self, key: bytes | None, value: bytes | None, offset: int) -> None:
        """`_take`, but a record it fails on is skipped: the record is read again on every start, so letting
        it end the thread would stop every reader of the topic for good."""
        try:
            self._take(key, value, offset)
        except Exception as exc:  # noqa: BLE001 (any fault of one record; stop requests are not Exceptions)
            self.malformed += 1
            error = f"{type(exc).__name__}: {str(exc)[:200]}"  # never the value: it may be huge
            log.error("skipping a record that could not be taken: %s", error,
                      extra={"topic": self.topic, "offset": offset, "error": error})

    def _watermarks(self, consumer: Consumer) -> tuple[int, int] | None:
        """(low, high) of partition 0; None once stopped. A topic not there yet (created later by its first writer,
        where readers may not create it) or a broker not answering is waited for however long it takes: a reader
        that gave up would leave its owner on what it knew at start for good, with nothing telling it."""
        delay, waiting_since, said_at = 0.2, time.monotonic(), float("-inf")
        while not self._stop.is_set():
            try:
                low, high = consumer.get_watermark_offsets(TopicPartition(self.topic, 0), timeout=5.0, cached=False)
                return int(low), int(high)
            except KafkaException as exc:
                if time.monotonic() - said_at >= _WATERMARK_LOG_S:
                    said_at = time.monotonic()
                    log.warning("cannot read the offsets of %s for %.0f s; retrying: %s", self.topic,
                                said_at - waiting_since, exc, extra={"topic": self.topic})
                self._stop.wait(delay)
                delay = min(delay * 2, _WATERMARK_RETRY_MAX_S)
        return None
