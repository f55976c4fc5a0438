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
  hrnn-dlq-clipped      what was cut to keep the record below the producer's message.max.bytes, when something
                        was: the key or value past 64 KiB (their first 64 KiB kept; less, a third of the room
                        each, under a limit below ~200 KB), the producer's headers past that together (dropped);
                        a dead letter still refused as too large is written without key, value and the
                        producer's headers, and says so here
Changelog records (`<group>.state-changelog`, key user_id, value the encoded state) carry
  hrnn-source-offset    the input offset that produced the state (restores skip uncommitted ones)
  hrnn-source-log       the input topic's id (hex) then, when the broker gives one: offsets of a
                        deleted and recreated input topic name other records
Repartitioned events (re-keyed by user_id onto the input topic) carry the producer's headers, then
  hrnn-repartitioned-from  "<topic>/<partition>/<offset>" of the mis-keyed original;
  hrnn-repartitioned-log   the input topic's id (hex) then, empty when the broker gives none; readers take
                           the header for the worker's only where it names their topic and log and, on the
                           copy's own partition, an offset below the copy's (copies of older builds name no log);
a mis-keyed record whose copy would be past max_record_bytes (what the worker's producer's message.max.bytes
admits) is dead-lettered (too_large) instead.
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
H_REPARTITIONED_LOG = "hrnn-repartitioned-log"

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
DEFAULT_MESSAGE_MAX_BYTES = 1_000_000  # librdkafka's message.max.bytes where the producer's settings leave it unset
# What produce() adds to a record's key, value and headers before comparing it with message.max.bytes: librdkafka's
# largest v2 framing (rd_kafka_msg_max_wire_size: length, attributes, timestamp and offset deltas, key and value
# lengths and header count as varints, 5 + 1 + 10 + 5 + 5 + 5 + 5). A record past it is refused before it is sent,
# and failed its batch on every restart. tests/test_worker_units.py holds it against the client.
RECORD_FRAMING_BYTES = 36
# Of a dead letter's key, of its value and of the producer's headers it carries, at most (dlq_part_bytes: less
# under a producer limit too small for three of them).
DLQ_MAX_PART_BYTES = 65_536
_DROPPED_ALL = "key, value and the producer's headers dropped"
_BARE_DETAIL_BYTES = 512  # of hrnn-dlq-detail in a dead letter written bare: the minimal dead letter is bounded


def max_record_bytes(message_max_bytes: int = DEFAULT_MESSAGE_MAX_BYTES) -> int:
    """The most a record the worker writes may have as record_bytes counts it: produce() refuses a larger one."""
    return message_max_bytes - RECORD_FRAMING_BYTES


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


def _clip_note(part: int, cut: Sequence[str], dropped: int | None) -> str:
    said = [f"first {part} bytes of {', '.join(cut)}"] if cut else []
    return "; ".join(said + ([f"the producer's headers ({dropped} bytes) dropped"] if dropped is not None else []))


# The longest note a clipped dead letter carries: sizes of a Kafka record have at most 10 digits.
_LONGEST_NOTE = [(H_CLIPPED, _clip_note(2**31, ["key=2147483648", "value=2147483648"], 2**31).encode())]


def dlq_part_bytes(ours: Headers, message_max_bytes: int = DEFAULT_MESSAGE_MAX_BYTES) -> int:
    """The most a dead letter keeps of its key, of its value and of the producer's headers: DLQ_MAX_PART_BYTES, or
    a third of the room our headers and the note of what was cut leave below the producer's message.max.bytes."""
    room = max_record_bytes(message_max_bytes) - headers_bytes(ours) - headers_bytes(_LONGEST_NOTE)
    return max(0, min(DLQ_MAX_PART_BYTES, room // 3))


def clipped_dead_letter(key: bytes | None, value: bytes | None, original: Sequence[tuple[str, bytes | None]] | None,
                        ours: Headers, message_max_bytes: int = DEFAULT_MESSAGE_MAX_BYTES
                        ) -> tuple[bytes | None, bytes | None, Headers]:
    """A dead letter's key, value and headers (the producer's, then `ours`): key and value each cut to
    dlq_part_bytes, the producer's headers dropped when they are larger than that together, and a header saying
    what was cut. An input record too large for the dead-letter topic failed its batch on every restart."""
    part = dlq_part_bytes(ours, message_max_bytes)
    cut = [f"{name}={len(b)}" for name, b in (("key", key), ("value", value)) if b is not None and len(b) > part]
    theirs = headers_bytes(original)
    dropped = theirs if theirs > part else None
    if cut or dropped is not None:
        clip = (lambda b: b if b is None else b[:part])
        key, value, ours = clip(key), clip(value), ours + [(H_CLIPPED, _clip_note(part, cut, dropped).encode())]
    return key, value, carried_headers(None if dropped is not None else original, ours)


def bare_dead_letter(ours: Headers, key_bytes: int, value_bytes: int, theirs_bytes: int) -> Headers:
    """The headers of a dead letter written without its key, value and producer's headers (of these sizes): a
    produce() still refused as too large stopped the worker on every restart. Our detail is cut to
    _BARE_DETAIL_BYTES, so the largest of these is known (smallest_dead_letter_bytes)."""
    sizes = f"key={key_bytes}, value={value_bytes}, headers={theirs_bytes} bytes"
    kept = [(k, v[:_BARE_DETAIL_BYTES] if k == H_DETAIL else v) for k, v in ours if k != H_CLIPPED]
    return kept + [(H_CLIPPED, f"{_DROPPED_ALL} ({sizes}): the record was too large".encode())]


def smallest_dead_letter_bytes(topic: str) -> int:
    """The largest dead letter of input topic `topic` written bare, as record_bytes counts it: what the producer's
    message.max.bytes must admit at least, beside the framing (a reason tag has far fewer than 32 characters)."""
    ours = dlq_headers("x" * 32, "x" * _BARE_DETAIL_BYTES, topic, 2**31 - 1, 2**63 - 1, "f" * 32)
    return record_bytes(None, None, bare_dead_letter(ours, 2**31, 2**31, 2**31))


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


def repartition_headers(topic: str, partition: int, offset: int, log: str | None = None) -> Headers:
    """The headers naming a re-keyed copy's original on input topic `topic` whose id is `log`. The log header is
    written even when the id is unknown (empty), so that a producer's header of that name is never carried on."""
    return [(H_REPARTITIONED_FROM, f"{topic}/{partition}/{offset}".encode()),
            (H_REPARTITIONED_LOG, (log or "").encode())]


def header(headers: Sequence[tuple[str, bytes | None]] | None, name: str) -> str | None:
    """The last value of header `name`, decoded, or None."""
    found = None
    for key, value in headers or ():
        if key == name:
            found = None if value is None else value.decode("utf-8", "replace")
    return found


def repartitioned_from(headers: Sequence[tuple[str, bytes | None]] | None, topic: str, log: str | None,
                       partition: int, offset: int) -> tuple[int, int] | None:
    """(partition, offset) of the original that the record at `partition`/`offset` of input topic `topic` (id
    `log`; None: unknown) is the worker's re-keyed copy of; None for any other record.

    Any producer may write the header (a topic mirrored with other offsets keeps it, so does an app re-producing
    consumed records with their headers), and a header taken for the worker's makes a real event a replay. So it
    is not the worker's where it names another topic or log, or a record of the copy's own partition at or past
    the copy (the worker writes a copy after reading its original). Copies of builds before the log header name
    no log: the offset rule alone judges them."""
    parts = (header(headers, H_REPARTITIONED_FROM) or "").rsplit("/", 2)  # topic names hold no "/"
    try:
        named, p, o = parts[0], int(parts[1]), int(parts[2])
    except (IndexError, ValueError):
        return None
    if not names_log(topic, log, named, header(headers, H_REPARTITIONED_LOG) or None) or min(p, o) < 0:
        return None
    return None if p == partition and o >= offset else (p, o)


def source_offset_of(headers: Sequence[tuple[str, bytes | None]] | None) -> int | None:
    value = header(headers, H_SOURCE_OFFSET)
    try:
        return None if value is None else int(value)
    except ValueError:
        return None
