"""Item availability: the `hrnn.item-availability` topic, writing to it, and following it.

A shop takes items off sale (out of stock, withdrawn, recalled) faster than any retraining: the
workers must stop recommending them within a moment. The topic is compacted with one partition;
the key is the item id (UTF-8), the value JSON `{"available": false, "reason": "...",
"updated_at": <ms>}`; a tombstone (null value) or `"available": true` puts the item back. Every
worker reads the whole (small) topic before its first batch and follows it after, so a worker
that starts or restarts never serves an item taken off sale earlier; no consumer group is
involved.

A record that is not such a status is logged, counted (`malformed`) and skipped: the item keeps
the availability it had. Such records are not sent to a dead-letter topic, because every worker
reads every record and each would send it again; `hrnn items` writes only valid statuses.
"""
from __future__ import annotations

import logging
import threading
import time
from collections.abc import Sequence

import msgspec

from model.config import is_utf8
from model.errors import HRNNError
from model.events import MAX_ID_CHARS
from stream.compacted import CompactedTopicReader, ensure_table_topic
from stream.kafka_clients import ClientSettings, create_producer, produce_acknowledged
from stream.topics import AVAILABILITY_TOPIC

log = logging.getLogger(__name__)


class AvailabilityError(HRNNError):
    """A status could not be written, or a record on the topic is not an item status."""


class ItemStatus(msgspec.Struct, frozen=True, forbid_unknown_fields=False):
    """The value of one record on the availability topic (key: item_id)."""

    available: bool
    reason: str | None = None
    updated_at: int | None = None  # ms, when the writer set it


_encoder = msgspec.json.Encoder()
_decoder = msgspec.json.Decoder(ItemStatus)


def decode_status(key: bytes | None, value: bytes | None) -> tuple[str, ItemStatus]:
    """The item id and its status; a tombstone is `available`. Raises AvailabilityError naming the fault."""
    if not key:
        raise AvailabilityError("an item status needs the item id as its key; this record has none")
    try:
        item = key.decode("utf-8")
    except UnicodeDecodeError:
        raise AvailabilityError(f"the key {key[:40]!r} is not UTF-8 text") from None
    if value is None:
        return item, ItemStatus(True)
    try:
        return item, _decoder.decode(value)
    except (msgspec.DecodeError, msgspec.ValidationError) as exc:
        raise AvailabilityError(f"the status of {item!r} is not "
                                f'{{"available": true|false, "reason": "..."}}: {exc}') from None
    except Exception as exc:  # noqa: BLE001 (e.g. RecursionError on deeply nested JSON: a bad record all the same)
        raise AvailabilityError(f"the status of {item!r} cannot be decoded: "
                                f"{type(exc).__name__}: {str(exc)[:200]}") from None


def set_availability(bootstrap: str, items: Sequence[str], *, available: bool, reason: str | None = None,
                     topic: str = AVAILABILITY_TOPIC, extra: ClientSettings | None = None,
                     timeout_s: float = 30.0) -> None:
    """Take `items` off sale (available=False) or put them back; returns once the broker acknowledged all."""
    if not items or not all(items):
        raise AvailabilityError("give at least one item id, none of them empty")
    too_long = next((i for i in items if len(i) > MAX_ID_CHARS), None)
    if too_long is not None:  # no event can name it: taking it off sale would change nothing
        raise AvailabilityError(f"item id {too_long[:40]!r}... has {len(too_long)} characters, more than the "
                                f"{MAX_ID_CHARS} an event's item_id may have")
    # Text in a terminal's bytes that are not UTF-8 reaches Python as lone surrogates, which neither a Kafka key nor
    # the JSON value can carry: refuse it before the topic is created or anything produced.
    for what, text in [*(("item id", i) for i in items), ("reason", reason or "")]:
        if not is_utf8(text):
            raise AvailabilityError(f"{what} {text.encode('utf-8', 'surrogateescape')!r} is not UTF-8 text")
    ensure_table_topic(bootstrap, topic, extra=extra, timeout_s=timeout_s)
    # Putting an item back writes a tombstone: compaction then forgets the item altogether.
    value = None if available else _encoder.encode(ItemStatus(False, reason, int(time.time() * 1000)))
    failure = produce_acknowledged(create_producer(bootstrap, extra), topic,
                                   [(item.encode(), value) for item in items], timeout_s=timeout_s)
    if failure:
        raise AvailabilityError(f"writing the availability of {len(items)} item(s) to {topic!r} failed: {failure}")
    log.info("item availability written", extra={"items": len(items), "available": available, "topic": topic})


class AvailabilityReader(CompactedTopicReader):
    """Follows the availability topic; `unavailable` is the set of items off sale now.

    `unavailable` is replaced (never changed in place) when a poll changes it, so a reader of it
    holds a consistent set and can tell a change by identity."""

    thread_name = "hrnn-availability-reader"

    def __init__(self, bootstrap: str, topic: str = AVAILABILITY_TOPIC, *, extra: ClientSettings | None = None,
                 poll_timeout_s: float = 0.5, create_topic: bool = True) -> None:
        super().__init__(bootstrap, topic, extra=extra, poll_timeout_s=poll_timeout_s, create_topic=create_topic)
        self.unavailable: frozenset[str] = frozenset()
        self._reasons: dict[str, str | None] = {}  # item -> reason, written by the reader thread only
        self._changed = False
        self._lock = threading.Lock()

    def reasons(self) -> dict[str, str | None]:
        """Each item off sale and the reason it was given."""
        with self._lock:
            return dict(self._reasons)

    def _take(self, key: bytes | None, value: bytes | None, offset: int) -> None:
        try:
            item, status = decode_status(key, value)
        except AvailabilityError as exc:
            self.malformed += 1
            log.warning("skipping a record that is not an item status: %s", exc,
                        extra={"topic": self.topic, "offset": offset})
            return
        with self._lock:
            self._changed |= (item in self._reasons) == status.available
            if status.available:
                self._reasons.pop(item, None)
            else:
                self._reasons[item] = status.reason

    def _polled(self, caught_up_now: bool) -> None:
        if self._changed and (caught_up_now or self.caught_up):  # no one reads the set before: build it once
            self._changed = False
            with self._lock:
                self.unavailable = frozenset(self._reasons)
