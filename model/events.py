"""The event contract shared by file loaders and the stream decoder.

An event is one user interaction. Timestamps are carried as epoch milliseconds everywhere
inside the project; files and messages may give seconds, milliseconds or ISO-8601.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any, Literal

import msgspec

from model.errors import EventError

TimeUnit = Literal["s", "ms", "iso"]
# Timestamps outside [1990, 2200) in epoch-ms are almost always a unit mix-up (seconds sent as ms).
MIN_EVENT_MS, MAX_EVENT_MS = 631_152_000_000, 7_258_118_400_000
# An event is a few hundred bytes. These bounds keep a recommendation far below Kafka's 1 MB record limit: a record
# the worker writes past it failed its batch on every restart, and the partition stopped for good. The other records
# are bounded where they are made: a dead letter is clipped (stream/records.py), a re-keyed copy that would not fit
# (the producer's headers are carried) is dead-lettered instead, and the user's state on the changelog, which
# grows with history_length, stays below ~900 KB because model/config.py caps it (MAX_HISTORY_LENGTH).
MAX_EVENT_BYTES = 65_536
MAX_ID_CHARS = 256  # user_id, item_id, event_type, session_id, event_id


@dataclass(frozen=True, slots=True)
class Event:
    user_id: str
    item_id: str
    event_type: str
    timestamp_ms: int
    session_id: str | None = None
    event_id: str | None = None
    event_value: float | None = None


def parse_timestamp(value: Any, unit: TimeUnit = "ms") -> int:
    """Return epoch milliseconds. Numbers are read in `unit`; strings may also be ISO-8601."""
    if isinstance(value, bool):
        raise EventError("bad_timestamp", f"timestamp must be a number or ISO-8601 string, got {value!r}")
    if isinstance(value, int):  # exact at any size (math.isfinite would overflow past a float's range)
        return value * 1000 if unit == "s" else value
    if isinstance(value, float):
        ms = value * 1000 if unit == "s" else value
        if not math.isfinite(ms):
            raise EventError("bad_timestamp", f"timestamp is not finite in epoch-ms: {value!r}")
        return int(round(ms)) if unit == "s" else int(ms)
    if isinstance(value, str):
        text = value.strip()
        if unit != "iso":
            try:
                return parse_timestamp(float(text) if "." in text else int(text), unit)
            except ValueError:
                pass
        try:
            dt = datetime.fromisoformat(text.replace("Z", "+00:00"))
        except ValueError:
            raise EventError("bad_timestamp",
                             f"cannot parse timestamp {_brief(value)} (epoch number or ISO-8601)") from None
        if dt.tzinfo is None:
            dt = dt.replace(tzinfo=timezone.utc)
        return int(dt.timestamp() * 1000)
    raise EventError("bad_timestamp", f"timestamp must be a number or ISO-8601 string, got {type(value).__name__}")


def _brief(value: Any, limit: int = 60) -> str:
    """The value's repr, cut short: a dead letter's reason names the bad value, it does not repeat 4 KB of it."""
    text = repr(value)
    return text if len(text) <= limit else f"{text[:limit - 20]}... ({len(text)} characters)"


def _required_str(obj: dict, key: str) -> str:
    if key not in obj or obj[key] is None:
        raise EventError("missing_field", f"field {key!r} is required")
    text = _id_text(key, obj[key])
    if not text:
        raise EventError("bad_field", f"field {key!r} is empty")
    return text


def _optional_str(obj: dict, key: str) -> str | None:
    value = obj.get(key)
    return None if value is None or value == "" else _id_text(key, value)


def _id_text(key: str, value: Any) -> str:
    """An id field's text: a string or an integer ({"a": 1} would become the text "{'a': 1}"), not too long."""
    if isinstance(value, bool) or not isinstance(value, (str, int)):
        raise EventError("bad_field", f"field {key!r} must be a string, got {type(value).__name__}")
    text = str(value)
    if len(text) > MAX_ID_CHARS:
        raise EventError("bad_field", f"field {key!r} has {len(text)} characters, more than the {MAX_ID_CHARS} "
                                      "an id may have")
    return text


def _event_value(value: Any) -> float | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise EventError("bad_field", f"field 'event_value' must be a finite number, got {value!r}")
    try:
        number = float(value)
    except OverflowError:  # an int past a float's range; its hundreds of digits would swamp the reason
        raise EventError("bad_field", f"field 'event_value' must be a finite number, got an integer of "
                                      f"{len(str(abs(value)))} digits") from None
    if not math.isfinite(number):
        raise EventError("bad_field", f"field 'event_value' must be a finite number, got {value!r}")
    return number


def event_from_mapping(obj: Any, *, check_range: bool = True) -> Event:
    """Validate one decoded JSON object against the contract in DESIGN.md."""
    if not isinstance(obj, dict):
        raise EventError("not_an_object", f"event must be a JSON object, got {type(obj).__name__}")
    if "timestamp" not in obj:
        raise EventError("missing_field", "field 'timestamp' is required")
    ts = parse_timestamp(obj["timestamp"], "ms")
    if check_range and not (MIN_EVENT_MS <= ts < MAX_EVENT_MS):
        raise EventError("bad_timestamp", f"timestamp {_brief(obj['timestamp'])} is not epoch-ms between 1990 and 2200")
    value = _event_value(obj.get("event_value"))
    return Event(
        user_id=_required_str(obj, "user_id"),
        item_id=_required_str(obj, "item_id"),
        event_type=_required_str(obj, "event_type"),
        timestamp_ms=ts,
        session_id=_optional_str(obj, "session_id"),
        event_id=_optional_str(obj, "event_id"),
        event_value=value,
    )


_decoder = msgspec.json.Decoder()


class _PlainEvent(msgspec.Struct):
    """The usual shape of a valid message: integer epoch-ms timestamp, string ids, type-checked in C."""

    user_id: str
    item_id: str
    event_type: str
    timestamp: int
    session_id: str | None = None
    event_id: str | None = None
    event_value: float | None = None


_plain_decoder = msgspec.json.Decoder(_PlainEvent)


def decode_event(raw: bytes | None) -> Event:
    """Decode and validate one UTF-8 JSON message value.

    Messages of the usual shape take a typed msgspec decoder (about ten times faster: this is the
    worker's hot path); anything else (ISO timestamps, numeric ids, missing or bad fields)
    takes the general decoder, which also names the reason of a rejection. Tests check both agree."""
    if raw is not None and len(raw) <= MAX_EVENT_BYTES:  # a larger one: the general decoder refuses it
        try:
            e = _plain_decoder.decode(raw)
        except (msgspec.ValidationError, msgspec.DecodeError, RecursionError):
            e = None  # the general decoder names the reason
        if (e is not None and e.user_id and e.item_id and e.event_type and MIN_EVENT_MS <= e.timestamp < MAX_EVENT_MS
                and (e.event_value is None or math.isfinite(e.event_value)) and _ids_fit(e)):
            return Event(e.user_id, e.item_id, e.event_type, e.timestamp, e.session_id or None, e.event_id or None,
                         e.event_value)
    return _decode_general(raw)


def _ids_fit(e: _PlainEvent) -> bool:
    return max(len(e.user_id), len(e.item_id), len(e.event_type), len(e.session_id or ""),
               len(e.event_id or "")) <= MAX_ID_CHARS


def _decode_general(raw: bytes | None) -> Event:
    if raw is None:
        raise EventError("empty_value", "message has no value")
    if len(raw) > MAX_EVENT_BYTES:
        raise EventError("too_large", f"{len(raw)} bytes, more than the {MAX_EVENT_BYTES} an event may have")
    if not raw.strip():
        raise EventError("empty_value", f"message value is empty ({len(raw)} bytes of nothing or whitespace)")
    try:
        obj = _decoder.decode(raw)
    except msgspec.DecodeError as exc:
        obj = _event_fields(raw) if "out of range" in str(exc) else None
        if obj is None:
            raise EventError("bad_json", str(exc)) from None
    except RecursionError:  # msgspec's own limit: a few KB of brackets, never an event
        raise EventError("bad_json", "JSON nested too deeply to decode (an event is one flat object)") from None
    return event_from_mapping(obj)


_fields_decoder = msgspec.json.Decoder(dict[str, msgspec.Raw])
_EVENT_FIELDS = _PlainEvent.__struct_fields__  # an event message's fields, as the typed decoder has them


def _event_fields(raw: bytes) -> dict[str, Any] | None:
    """The event's fields of a JSON object msgspec refused as a whole for a number beyond a float's range (1e400),
    which its error names only as `$[...]`: such a number in a field the event does not use is ignored, as the
    typed decoder ignores it; in one of its fields it is refused naming the field. None: not such an object."""
    try:
        fields = _fields_decoder.decode(raw)
    except (msgspec.DecodeError, RecursionError):
        return None
    obj = {}
    for name in _EVENT_FIELDS:
        if name in fields:
            try:
                obj[name] = _decoder.decode(fields[name])
            except RecursionError:
                raise EventError("bad_json", f"field {name!r} nests too deeply to decode") from None
            except msgspec.DecodeError as exc:
                if "out of range" not in str(exc):  # another fault of the field (invalid UTF-8...): msgspec's words
                    raise EventError("bad_json", f"field {name!r}: {exc}") from None
                reason = "bad_timestamp" if name == "timestamp" else "bad_field"
                raise EventError(reason, f"field {name!r} holds a number beyond a float's range: "
                                         f"{_brief(bytes(fields[name]).decode(errors='replace'))}") from None
    return obj


def encode_event(event: Event) -> bytes:
    """The JSON form producers send; fields that are None are left out."""
    obj = {"user_id": event.user_id, "item_id": event.item_id, "event_type": event.event_type,
           "timestamp": event.timestamp_ms}
    for key in ("session_id", "event_id", "event_value"):
        value = getattr(event, key)
        if value is not None:
            obj[key] = value
    return msgspec.json.encode(obj)
