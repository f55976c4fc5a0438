"""The per-user state record and its versioned binary form (the RocksDB value).

Layout: one format byte, then a msgpack map. Readers refuse formats they do not know
with StateFormatError instead of guessing.
"""
from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field

import msgspec
import numpy as np

from model.errors import HRNNError

FORMAT_VERSION = 1


class StateFormatError(HRNNError):
    """A stored state cannot be decoded (unknown format version or corrupt bytes)."""


class HistoryEvent(msgspec.Struct, gc=False):
    """One stored event, as a History hands it out (indexing, iterating). A struct: cheap to make, and
    not tracked by the cycle collector (it holds no containers)."""

    item_id: str
    ts_ms: int
    event_type: str
    new_session: bool  # kept so a rebuild replays the same session boundaries


class History:
    """A user's last H events, oldest first, held column by column as they are stored: the worker
    decodes, extends and encodes one per user per batch, and the repeat head's window, the filters
    and a rebuild read whole columns, so no per-event objects are made on the serving path.
    Indexing gives a HistoryEvent (an int) or a History (a slice); iterating gives HistoryEvents."""

    __slots__ = ("items", "ts_ms", "types", "opens")

    def __init__(self, items: list[str] | None = None, ts_ms: list[int] | None = None,
                 types: list[str] | None = None, opens: list[bool] | None = None) -> None:
        self.items, self.ts_ms, self.types, self.opens = items or [], ts_ms or [], types or [], opens or []
        if not len(self.items) == len(self.ts_ms) == len(self.types) == len(self.opens):
            raise ValueError("history columns differ in length")

    @classmethod
    def of(cls, events: Iterable[HistoryEvent]) -> "History":
        h = cls()
        for e in events:
            h.append(e.item_id, e.ts_ms, e.event_type, e.new_session)
        return h

    def append(self, item_id: str, ts_ms: int, event_type: str, new_session: bool) -> None:
        self.items.append(item_id)
        self.ts_ms.append(int(ts_ms))  # numpy scalars would not encode
        self.types.append(event_type)
        self.opens.append(bool(new_session))

    def keep_last(self, n: int) -> None:
        if len(self.items) > n:
            for col in (self.items, self.ts_ms, self.types, self.opens):
                del col[:-n]

    def copy(self) -> "History":
        return self[:]

    def __len__(self) -> int:
        return len(self.items)

    def __getitem__(self, key: int | slice) -> "HistoryEvent | History":
        if isinstance(key, slice):
            return History(self.items[key], self.ts_ms[key], self.types[key], self.opens[key])
        return HistoryEvent(self.items[key], self.ts_ms[key], self.types[key], self.opens[key])

    def __iter__(self) -> Iterator[HistoryEvent]:
        return map(HistoryEvent, self.items, self.ts_ms, self.types, self.opens)

    def __eq__(self, other: object) -> bool:
        if isinstance(other, list):
            other = History.of(other)
        return isinstance(other, History) and (self.items, self.ts_ms, self.types, self.opens) == \
            (other.items, other.ts_ms, other.types, other.opens)

    def __repr__(self) -> str:
        return f"History({list(self)!r})"


@dataclass(slots=True)
class UserState:
    model_version: str
    session_hidden: np.ndarray  # float32 (hidden_dimension,)
    user_hidden: np.ndarray  # float32 (hidden_dimension,)
    session_id: str | None
    last_event_ms: int
    session_length: int
    history: History = field(default_factory=History)  # the last H events, oldest first
    source_offset: int = -1  # offset of the input record that produced this state
    n_events: int = 0

    def __post_init__(self) -> None:
        if not isinstance(self.history, History):  # a list of HistoryEvents, as tests and tools write them
            self.history = History.of(self.history)


class _Wire(msgspec.Struct, array_like=True):
    model_version: str
    hidden_dim: int
    session_hidden: bytes
    user_hidden: bytes
    session_id: str | None
    last_event_ms: int
    session_length: int
    hist_items: list[str]
    hist_ts: list[int]
    hist_types: list[str]
    hist_new: list[bool]
    source_offset: int
    n_events: int


_enc = msgspec.msgpack.Encoder()
_dec = msgspec.msgpack.Decoder(_Wire)


def encode_state(s: UserState) -> bytes:
    h = s.history
    wire = _Wire(
        s.model_version, int(s.session_hidden.shape[0]),
        np.ascontiguousarray(s.session_hidden, dtype=np.float32).tobytes(),
        np.ascontiguousarray(s.user_hidden, dtype=np.float32).tobytes(),
        s.session_id, int(s.last_event_ms), int(s.session_length),
        h.items, h.ts_ms, h.types, h.opens,
        int(s.source_offset), int(s.n_events))
    return bytes([FORMAT_VERSION]) + _enc.encode(wire)


def decode_state(raw: bytes) -> UserState:
    if not raw:
        raise StateFormatError("empty state value")
    if raw[0] != FORMAT_VERSION:
        raise StateFormatError(f"state format {raw[0]} is not supported (this build reads format {FORMAT_VERSION})")
    try:
        w = _dec.decode(raw[1:])
        sess = np.frombuffer(w.session_hidden, dtype=np.float32).copy()
        user = np.frombuffer(w.user_hidden, dtype=np.float32).copy()
    except (msgspec.DecodeError, ValueError) as exc:
        raise StateFormatError(f"corrupt state value: {exc}") from None
    if sess.shape[0] != w.hidden_dim or user.shape[0] != w.hidden_dim:
        raise StateFormatError("corrupt state value: hidden vectors do not match hidden_dim")
    try:
        history = History(w.hist_items, w.hist_ts, w.hist_types, w.hist_new)
    except ValueError as exc:
        raise StateFormatError(f"corrupt state value: {exc}") from None
    return UserState(w.model_version, sess, user, w.session_id, w.last_event_ms, w.session_length,
                     history, w.source_offset, w.n_events)
