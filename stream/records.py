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
Changelog records (`<group>.state-changelog`, key user_id, value the encoded state) carry
  hrnn-source-offset    the input offset that produced the state (restores skip uncommitted ones)
  hrnn-source-log       the input topic's id (hex) then, when the broker gives one: offsets of a
                        deleted and recreated input topic name other records
Repartitioned events (re-keyed by user_id onto the input topic) carry
  hrnn-repartitioned-from  "<topic>/<partition>/<offset>" of the mis-keyed original.
"""
from __future__ import annotations

from collections.abc import Sequence

import msgspec

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


def scored_items(items: Sequence[tuple[str, float]]) -> list[ScoredItem]:
    return [ScoredItem(i, float(s)) for i, s in items]


H_CLIPPED = "hrnn-dlq-clipped"
DLQ_MAX_PART_BYTES = 65_536  # of a dead letter's key and of its value: far below Kafka's 1 MB record limit


def carried_headers(original: Sequence[tuple[str, bytes | None]] | None, ours: Headers) -> Headers:
    """The producer's headers (tracing, tenant), then ours; one of theirs named like ours is dropped, so a reader
    of ours cannot be misled by a producer's."""
    names = {name for name, _ in ours}
    return [(k, v) for k, v in original or () if k not in names] + ours


def clipped_dead_letter(key: bytes | None, value: bytes | None) -> tuple[bytes | None, bytes | None, Headers]:
    """A dead letter's key and value, each cut to DLQ_MAX_PART_BYTES, with a header giving the sizes cut: an
    input record too large for the dead-letter topic failed its batch on every restart."""
    cut = [f"{name}={len(part)}" for name, part in (("key", key), ("value", value))
           if part is not None and len(part) > DLQ_MAX_PART_BYTES]
    if not cut:
        return key, value, []
    clip = (lambda b: b if b is None else b[:DLQ_MAX_PART_BYTES])
    return clip(key), clip(value), [(H_CLIPPED, f"first {DLQ_MAX_PART_BYTES} bytes of {', '.join(cut)}".encode())]


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
