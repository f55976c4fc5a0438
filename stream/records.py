"""What the worker writes to Kafka, besides the states themselves: recommendation values,
dead-letter and changelog headers. Readers (tests, `hrnn tail`, downstream services) decode
with the same definitions.

Dead-letter records (`<input-topic>.dlq`) keep the original key and value bytes untouched and
carry these headers (values UTF-8):
  hrnn-dlq-reason       short machine-readable tag: bad_json, missing_field, bad_field,
                        bad_timestamp, not_an_object, empty_value, ...
  hrnn-dlq-detail       a sentence for a human
  hrnn-source-topic     where the record was read
  hrnn-source-partition
  hrnn-source-offset
  hrnn-source-log       the input topic's id (hex), when the broker gives one
  hrnn-dlq-clipped      what was cut to keep the record below Kafka's limit, when something was: the key or
                        value past 64 KiB (their first 64 KiB kept), the producer's headers past 64 KiB
                        together (dropped)
Changelog records (`<group>.state-changelog`, key user_id, value the encoded state) carry
  hrnn-source-offset    the input offset that produced the state (restores skip uncommitted ones)
  hrnn-source-log       the input topic's id (hex) then, when the broker gives one: offsets of a
                        deleted and recreated input topic name other records
Repartitioned events (re-keyed by user_id onto the input topic) carry the producer's headers, then
  hrnn-repartitioned-from  "<topic>/<partition>/<offset>" of the mis-keyed original;
a mis-keyed record whose copy would be past MAX_RECORD_BYTES is dead-lettered (too_large) instead.
"""
from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import msgspec

from model.errors import EventError

if TYPE_CHECKING:
    from model.events import Event

H_REASON = "hrnn-dlq-reason"
H_DETAIL = "hrnn-dlq-detail"
H_SOURCE_TOPIC = "hrnn-source-topic"
H_SOURCE_PARTITION = "hrnn-source-partition"
H_SOURCE_OFFSET = "hrnn-source-offset"
H_SOURCE_LOG = "hrnn-source-log"
H_REPARTITIONED_FROM = "hrnn-repartitioned-from"

Headers = list[tuple[str, bytes]]


class ScoredItem(msgspec.Struct, frozen=True):
    item_id: str
    score: float


class Recommendation(msgspec.Struct, frozen=True):
    """The value of one record on the output topic (key: user_id)."""

    user_id: str
    items: list[ScoredItem]
    model_version: str
    session_id: str | None
    event_id: str | None
    source_partition: int
    source_offset: int
    event_timestamp: int  # ms, the event's own timestamp
    emitted_at: int  # ms, wall clock when the worker produced it
    # Which log the source offset is of: the input topic, and its id where the broker gives one (a topic
    # deleted and created again numbers other records from 0). None in records of builds before them.
    source_topic: str | None = None
    source_log: str | None = None


_encoder = msgspec.json.Encoder()
_decoder = msgspec.json.Decoder(Recommendation)


def encode_recommendation(rec: Recommendation) -> bytes:
    return _encoder.encode(rec)


def decode_recommendation(raw: bytes) -> Recommendation:
    return _decoder.decode(raw)


def names_log(topic: str, log: str | None, named_topic: str | None, named_log: str | None) -> bool:
    """Whether a record naming (named_topic, named_log) as its source answers input topic `topic` whose id
    is `log`: None where a record does not name them (builds before these fields) or the broker gives no id."""
    return named_topic in (None, topic) and (log is None or named_log in (None, log))


def invalid_event(event: Event, record_timestamp_ms: int | None, max_lead_s: float) -> EventError | None:
    """Why the worker dead-letters the decoded `event` of a record with Kafka timestamp `record_timestamp_ms`
    (None: the record has none), or None. One test for the worker and for `hrnn quality`: a recommendation is
    judged by its user's next event the worker took, never by one it dead-lettered. An event stamped more than
    `max_lead_s` (> 0, else no check) ahead of its record is one (see WorkerSettings.max_event_lead_s)."""
    ts, at = record_timestamp_ms, event.timestamp_ms
    if max_lead_s and ts is not None and at > ts + max_lead_s * 1000:
        return EventError("bad_timestamp", f"timestamp {at} is {(at - ts) / 1000:.0f} s ahead of the record's Kafka "
                                           f"timestamp {ts}, more than max_event_lead_s = {max_lead_s:g}")
    return None


def scored_items(items: Sequence[tuple[str, float]]) -> list[ScoredItem]:
    return [ScoredItem(i, float(s)) for i, s in items]


H_CLIPPED = "hrnn-dlq-clipped"
# Of a dead letter's key, of its value and of the producer's headers it carries: together far below Kafka's 1 MB
# record limit (the broker's default accepts a little more than librdkafka's 1,000,000 bytes do).
DLQ_MAX_PART_BYTES = 65_536
# A record the worker writes is refused by produce() past librdkafka's message.max.bytes (1,000,000 by default); a
# record a producer wrote near the broker's limit and copied with our headers would be, and fail its batch on every
# restart. Below this bound (key, value and headers with their framing) there is room for Kafka's own.
MAX_RECORD_BYTES = 900_000


def headers_bytes(headers: Sequence[tuple[str, bytes | None]] | None) -> int:
    """What headers add to a record at most: names, values, and a length of each (a varint, up to 5 bytes)."""
    return sum(len(k.encode()) + len(v or b"") + 10 for k, v in headers or ())


def record_bytes(key: bytes | str | None, value: bytes | None,
                 headers: Sequence[tuple[str, bytes | None]] | None) -> int:
    """A record's size as produce() counts it against message.max.bytes, less Kafka's fixed framing."""
    key_bytes = key.encode() if isinstance(key, str) else key or b""
    return len(key_bytes) + len(value or b"") + headers_bytes(headers)


def carried_headers(original: Sequence[tuple[str, bytes | None]] | None, ours: Headers) -> Headers:
    """The producer's headers (tracing, tenant), then ours; one of theirs named like ours is dropped, so a reader
    of ours cannot be misled by a producer's."""
    names = {name for name, _ in ours}
    return [(k, v) for k, v in original or () if k not in names] + ours


def clipped_dead_letter(key: bytes | None, value: bytes | None, original: Sequence[tuple[str, bytes | None]] | None,
                        ours: Headers) -> tuple[bytes | None, bytes | None, Headers]:
    """A dead letter's key, value and headers (the producer's, then `ours`): key and value each cut to
    DLQ_MAX_PART_BYTES, the producer's headers dropped when they are larger than that together, and a header
    saying what was cut. An input record too large for the dead-letter topic failed its batch on every restart."""
    cut = [f"{name}={len(part)}" for name, part in (("key", key), ("value", value))
           if part is not None and len(part) > DLQ_MAX_PART_BYTES]
    said = [f"first {DLQ_MAX_PART_BYTES} bytes of {', '.join(cut)}"] if cut else []
    theirs = headers_bytes(original)
    if theirs > DLQ_MAX_PART_BYTES:
        said.append(f"the producer's headers ({theirs} bytes) dropped")
        original = None
    if said:
        clip = (lambda b: b if b is None else b[:DLQ_MAX_PART_BYTES])
        key, value, ours = clip(key), clip(value), ours + [(H_CLIPPED, "; ".join(said).encode())]
    return key, value, carried_headers(original, ours)


def dlq_headers(reason: str, detail: str, topic: str, partition: int, offset: int,
                source_log: str | None = None) -> Headers:
    headers = [(H_REASON, reason.encode()), (H_DETAIL, detail.encode()), (H_SOURCE_TOPIC, topic.encode()),
               (H_SOURCE_PARTITION, str(partition).encode()), (H_SOURCE_OFFSET, str(offset).encode())]
    if source_log:
        headers.append((H_SOURCE_LOG, source_log.encode()))
    return headers


def changelog_headers(source_offset: int, source_log: str | None = None) -> Headers:
    headers = [(H_SOURCE_OFFSET, str(source_offset).encode())]
    if source_log:
        headers.append((H_SOURCE_LOG, source_log.encode()))
    return headers


def repartition_headers(topic: str, partition: int, offset: int) -> Headers:
    return [(H_REPARTITIONED_FROM, f"{topic}/{partition}/{offset}".encode())]


def header(headers: Sequence[tuple[str, bytes | None]] | None, name: str) -> str | None:
    """The last value of header `name`, decoded, or None."""
    found = None
    for key, value in headers or ():
        if key == name:
            found = None if value is None else value.decode("utf-8", "replace")
    return found


def repartitioned_from(headers: Sequence[tuple[str, bytes | None]] | None) -> tuple[str, int, int] | None:
    """(topic, partition, offset) a re-keyed copy was made from, from its header; None for other records (or a
    header naming no record)."""
    parts = (header(headers, H_REPARTITIONED_FROM) or "").rsplit("/", 2)  # topic names hold no "/"
    try:
        return (parts[0], int(parts[1]), int(parts[2])) if len(parts) == 3 else None
    except ValueError:
        return None


def source_offset_of(headers: Sequence[tuple[str, bytes | None]] | None) -> int | None:
    value = header(headers, H_SOURCE_OFFSET)
    try:
        return None if value is None else int(value)
    except ValueError:
        return None
