"""Model announcements: the `hrnn.model-updates` topic, announcing a version, and following it.

The topic is compacted with one partition; the key is the registry id, the value JSON
`{"version", "path", "announced_at", "reason"}`. Compaction keeps the latest announcement of
every registry, so a process starting later reads the whole (small) topic from the beginning
and knows which version to serve; no consumer group is involved.

"Caught up" needs care on Tansu: its high watermark is the base offset of the last record
batch + 1, not the log end. A reader is caught up once it holds a record at or past
(high watermark - 1) and a consume then comes back empty, or when the topic has no records.
"""
from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from datetime import datetime, timezone
from pathlib import Path

from confluent_kafka import OFFSET_BEGINNING, KafkaError, KafkaException, TopicPartition

from model.errors import HRNNError
from stream.kafka_clients import ClientSettings, admin_client, create_producer, reader_consumer
from stream.topics import MODEL_UPDATES_TOPIC, TopicSpec, ensure_topics

log = logging.getLogger(__name__)

REASONS = ("retrain", "promote")
CATCH_UP_IDLE_S = 10.0  # fetches empty this long below the watermark: the watermark's record is gone


class AnnouncementError(HRNNError):
    """An announcement could not be sent, or a record on the topic is not an announcement."""


@dataclass(frozen=True)
class Announcement:
    version: str
    path: str  # the version directory as the announcer saw it
    announced_at: str  # ISO-8601 UTC
    reason: str  # "retrain" | "promote"
    registry_id: str = ""  # the record key

    def value(self) -> bytes:
        obj = {k: v for k, v in asdict(self).items() if k != "registry_id"}
        return json.dumps(obj, sort_keys=True).encode()

    @classmethod
    def decode(cls, key: bytes | None, value: bytes | None) -> "Announcement":
        if value is None:
            raise AnnouncementError("announcement has no value (a tombstone)")
        try:
            obj = json.loads(value)
        except (ValueError, UnicodeDecodeError) as exc:
            raise AnnouncementError(f"announcement is not JSON: {exc}") from None
        if not isinstance(obj, dict):
            raise AnnouncementError("announcement must be a JSON object")
        missing = [f for f in ("version", "path") if not isinstance(obj.get(f), str) or not obj.get(f)]
        if missing:
            raise AnnouncementError(f"announcement lacks {', '.join(missing)}")
        return cls(obj["version"], obj["path"], str(obj.get("announced_at", "")), str(obj.get("reason", "")),
                   key.decode("utf-8", "replace") if key else "")


def registry_id_for(version_path: str | Path) -> str:
    """Default key: the absolute registry directory (the version directory's parent)."""
    return str(Path(version_path).resolve().parent)


def updates_topic_spec(topic: str = MODEL_UPDATES_TOPIC) -> TopicSpec:
    return TopicSpec(topic, 1, compacted=True)


def ensure_updates_topic(bootstrap: str, topic: str = MODEL_UPDATES_TOPIC, *,
                         extra: ClientSettings | None = None, timeout_s: float = 30.0) -> None:
    ensure_topics(admin_client(bootstrap, extra), [updates_topic_spec(topic)], timeout_s=timeout_s)


def announce(bootstrap: str, topic: str, version: str, path: str | Path, *, reason: str = "promote",
             registry_id: str | None = None, extra: ClientSettings | None = None,
             timeout_s: float = 30.0) -> Announcement:
    """Publish that `version` (at `path`) is the one to serve; returns what was sent once it is acknowledged."""
    if reason not in REASONS:
        raise AnnouncementError(f"reason must be one of {', '.join(REASONS)}, got {reason!r}")
    ensure_updates_topic(bootstrap, topic, extra=extra, timeout_s=timeout_s)
    ann = Announcement(version, str(Path(path).resolve()), datetime.now(timezone.utc).isoformat(), reason,
                       registry_id or registry_id_for(path))
    errors: list[KafkaError] = []
    producer = create_producer(bootstrap, extra)
    producer.produce(topic, key=ann.registry_id.encode(), value=ann.value(), partition=0,
                     on_delivery=lambda err, _msg: errors.append(err) if err is not None else None)
    left = producer.flush(timeout_s)
    if left or errors:
        detail = errors[0].str() if errors else f"not acknowledged within {timeout_s:g} s"
        raise AnnouncementError(f"announcing {version} on {topic!r} failed: {detail}")
    log.info("model version announced", extra={"version": version, "path": ann.path, "reason": reason,
                                                "registry_id": ann.registry_id, "topic": topic})
    return ann


Callback = Callable[[Announcement], None]


class AnnouncementWatcher:
    """Follows the announcements topic on a background thread.

    `on_announcement` gets, once caught up, the latest announcement present at start (if any),
    then every new one in order; history older than the latest is never replayed, so a
    starting worker does not walk through old versions. With `registry_id`, other keys are ignored.
    """

    def __init__(self, bootstrap: str, topic: str = MODEL_UPDATES_TOPIC, *, registry_id: str | None = None,
                 on_announcement: Callback | None = None, extra: ClientSettings | None = None,
                 poll_timeout_s: float = 0.5, create_topic: bool = True) -> None:
        self.bootstrap, self.topic, self.registry_id = bootstrap, topic, registry_id
        self.on_announcement, self.extra = on_announcement, extra
        self.poll_timeout_s, self.create_topic = poll_timeout_s, create_topic
        self.received = 0  # valid announcements read (matching registry_id)
        self.malformed = 0
        self.error: BaseException | None = None
        self._latest: Announcement | None = None
        self._caught_up = threading.Event()
        self._stop = threading.Event()
        self._changed = threading.Condition()
        self._thread: threading.Thread | None = None

    @property
    def latest(self) -> Announcement | None:
        return self._latest

    @property
    def caught_up(self) -> bool:
        return self._caught_up.is_set()

    def start(self) -> "AnnouncementWatcher":
        if self.create_topic:
            ensure_updates_topic(self.bootstrap, self.topic, extra=self.extra)
        self._thread = threading.Thread(target=self._run, name="hrnn-announcement-watcher", daemon=True)
        self._thread.start()
        return self

    def wait_caught_up(self, timeout_s: float) -> bool:
        return self._caught_up.wait(timeout_s)

    def wait_for(self, version: str, timeout_s: float) -> Announcement | None:
        """Block until the latest announcement names `version`; None at the deadline."""
        deadline = time.monotonic() + timeout_s
        with self._changed:
            while self._latest is None or self._latest.version != version:
                left = deadline - time.monotonic()
                if left <= 0 or self.error is not None:
                    return None
                self._changed.wait(min(left, 0.5))
            return self._latest

    def stop(self) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=10)

    def __enter__(self) -> "AnnouncementWatcher":
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def _run(self) -> None:
        consumer = reader_consumer(self.bootstrap, self.extra)
        try:
            consumer.assign([TopicPartition(self.topic, 0, OFFSET_BEGINNING)])
            high = self._high_watermark(consumer)
            reached_end = high <= 0  # an empty topic: nothing to catch up on
            last_progress = time.monotonic()
            while not self._stop.is_set():
                msgs = consumer.consume(num_messages=100, timeout=self.poll_timeout_s)
                if msgs:
                    last_progress = time.monotonic()
                elif not reached_end and time.monotonic() - last_progress > CATCH_UP_IDLE_S:
                    # the record below the watermark is gone (e.g. a tombstone deleted by compaction)
                    log.warning("announcement watcher: no record at the high watermark; assuming caught up",
                                extra={"topic": self.topic, "high_watermark": high})
                    reached_end = True
                news = []
                for msg in msgs:
                    err = msg.error()
                    if err is not None:
                        if err.fatal():
                            raise KafkaException(err)
                        if err.code() != KafkaError._PARTITION_EOF:
                            log.warning("announcement watcher: %s", err.str(), extra={"topic": self.topic})
                        continue
                    reached_end = reached_end or msg.offset() >= high - 1
                    ann = self._decode(msg.key(), msg.value(), msg.offset())
                    if ann is not None:
                        news.append(ann)
                if news:
                    self._set_latest(news[-1])
                if not self.caught_up:
                    if not msgs and reached_end:
                        self._caught_up.set()
                        log.info("announcement watcher caught up", extra={
                            "topic": self.topic, "latest_version": self._latest.version if self._latest else None})
                        if self._latest is not None:
                            self._deliver(self._latest)
                    continue
                for ann in news:
                    self._deliver(ann)
        except BaseException as exc:  # noqa: BLE001 (recorded for the owner; the thread must not die silently)
            self.error = exc
            log.error("announcement watcher stopped: %s", exc, extra={"topic": self.topic})
        finally:
            consumer.close()

    def _high_watermark(self, consumer) -> int:
        deadline = time.monotonic() + 30.0
        while True:
            try:
                return int(consumer.get_watermark_offsets(TopicPartition(self.topic, 0), timeout=5.0, cached=False)[1])
            except KafkaException:
                if self._stop.is_set() or time.monotonic() > deadline:
                    raise
                time.sleep(0.2)  # the topic may be a moment from visible after creation

    def _decode(self, key: bytes | None, value: bytes | None, offset: int) -> Announcement | None:
        if value is None:
            return None  # a tombstone retires a registry's key; nothing to serve from it
        try:
            ann = Announcement.decode(key, value)
        except AnnouncementError as exc:
            self.malformed += 1
            log.warning("skipping a malformed announcement: %s", exc, extra={"topic": self.topic, "offset": offset})
            return None
        if self.registry_id is not None and ann.registry_id != self.registry_id:
            return None
        self.received += 1
        return ann

    def _set_latest(self, ann: Announcement) -> None:
        with self._changed:
            self._latest = ann
            self._changed.notify_all()

    def _deliver(self, ann: Announcement) -> None:
        if self.on_announcement is None:
            return
        try:
            self.on_announcement(ann)
        except Exception:  # a faulty callback must not stop the watcher
            log.exception("announcement callback failed", extra={"version": ann.version})
