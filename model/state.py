"""The per-user state record and its versioned binary form (the RocksDB value).

Layout: one format byte, then a msgpack array. Format 2 stores the last-H events as each distinct
item id and event type once plus packed little-endian columns (a code per event into those names, the
time, the session flag), so decoding a state makes no object per stored event. Format 1 (one string per
event) is still read and, while builds that read nothing else still serve, written (`encode_state`'s
`fmt`, the worker's `state_format`); format 2 otherwise. Readers refuse formats they do not know
with StateFormatError instead of guessing.
"""
from __future__ import annotations

import sys
from array import array
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from itertools import compress

import msgspec
import numpy as np

from model.errors import HRNNError

FORMAT_VERSION = 2
FORMATS = (1, 2)  # read and written; FORMAT_VERSION is written unless another is asked for
_CODE = "H"  # a code per event into a history's names: at most history_length + _SLACK + 1 <= 10,017 of them
_MAX_NAMES = 1 << 16  # what a code can number
_SLACK = 16  # names of events that left the window a history may hold before it drops them (History.keep_last)
_BIG_ENDIAN = sys.byteorder == "big"


class StateFormatError(HRNNError):
    """A stored state cannot be decoded (unknown format version or corrupt bytes)."""


class HistoryEvent(msgspec.Struct, gc=False):
    """One stored event, as a History hands it out (indexing, iterating). A struct: cheap to make, and
    not tracked by the cycle collector (it holds no containers)."""

    item_id: str
    ts_ms: int
    event_type: str
    new_session: bool  # kept so a rebuild replays the same session boundaries


def _coded(values: Sequence[str]) -> tuple[list[str], array]:
    names = list(dict.fromkeys(values))
    if len(names) > _MAX_NAMES:
        raise ValueError(f"a history of {len(names):,} distinct names (codes number at most {_MAX_NAMES:,})")
    code = {n: i for i, n in enumerate(names)}
    return names, array(_CODE, map(code.__getitem__, values))


def _code_of(names: list[str], name: str) -> int:
    try:
        return names.index(name)
    except ValueError:
        names.append(name)
        return len(names) - 1


def _compacted(names: list[str], codes: array) -> tuple[list[str], array]:
    """Only the names the codes still use (events that left the window leave theirs behind)."""
    return _coded([names[c] for c in codes])


class History:
    """A user's last H events, oldest first, held as they are stored: each distinct item id and event
    type once (`names`, `type_names`; append-only, replaced when compacted) and per event a code into
    them, the time and the session flag as packed arrays. The worker decodes, extends and encodes one
    per user per batch and the repeat head's window, the filters and rebuilds read whole columns
    (`pack`), so no object per stored event is made on the serving path. Indexing gives a HistoryEvent
    (an int) or a History (a slice, sharing the name lists); iterating gives HistoryEvents."""

    __slots__ = ("names", "item_codes", "type_names", "type_codes", "ts", "opens")

    def __init__(self, items: Sequence[str] = (), ts_ms: Sequence[int] = (), types: Sequence[str] = (),
                 opens: Sequence[bool] = ()) -> None:
        if not len(items) == len(ts_ms) == len(types) == len(opens):
            raise ValueError("history columns differ in length")
        self.names, self.item_codes = _coded(items)
        self.type_names, self.type_codes = _coded(types)
        self.ts = array("q", map(int, ts_ms))  # numpy scalars become ints
        self.opens = bytearray(map(bool, opens))

    @classmethod
    def _of(cls, names: list[str], item_codes: array, type_names: list[str], type_codes: array, ts: array,
            opens: bytearray) -> "History":
        h = cls.__new__(cls)
        h.names, h.item_codes, h.type_names, h.type_codes, h.ts, h.opens = \
            names, item_codes, type_names, type_codes, ts, opens
        return h

    @classmethod
    def of(cls, events: Iterable[HistoryEvent]) -> "History":
        h = cls()
        for e in events:
            h.append(e.item_id, e.ts_ms, e.event_type, e.new_session)
        return h

    def append(self, item_id: str, ts_ms: int, event_type: str, new_session: bool) -> None:
        self.item_codes.append(_code_of(self.names, item_id))
        self.type_codes.append(_code_of(self.type_names, event_type))
        self.ts.append(int(ts_ms))
        self.opens.append(bool(new_session))

    def keep_last(self, n: int) -> None:
        if len(self.item_codes) > n:
            for col in (self.item_codes, self.type_codes, self.ts, self.opens):
                del col[:-n]
        # Names left behind by events that left the window are dropped in bulk: a user who never repeats
        # an item compacts once every _SLACK events, and stores at most _SLACK names it no longer uses.
        if len(self.names) > len(self.item_codes) + _SLACK:
            self.names, self.item_codes = _compacted(self.names, self.item_codes)
        if len(self.type_names) > len(self.type_codes) + _SLACK:
            self.type_names, self.type_codes = _compacted(self.type_names, self.type_codes)

    def copy(self) -> "History":
        return History._of(self.names[:], self.item_codes[:], self.type_names[:], self.type_codes[:],
                           self.ts[:], self.opens[:])

    @property
    def items(self) -> list[str]:
        return list(map(self.names.__getitem__, self.item_codes))

    @property
    def types(self) -> list[str]:
        return list(map(self.type_names.__getitem__, self.type_codes))

    @property
    def ts_ms(self) -> list[int]:
        return self.ts.tolist()

    def items_of_types(self, types: set[str] | frozenset[str]) -> list[str]:
        """The distinct items of events of these types."""
        want = {c for c, t in enumerate(self.type_names) if t in types}
        if not want:
            return []
        return [self.names[c] for c in set(compress(self.item_codes, map(want.__contains__, self.type_codes)))]

    def session_items(self) -> list[str]:
        """The distinct items since the newest session opening (all of them without one)."""
        start = max(self.opens.rfind(1), 0)
        return [self.names[c] for c in set(self.item_codes[start:])]

    def __len__(self) -> int:
        return len(self.item_codes)

    def __getitem__(self, key: int | slice) -> "HistoryEvent | History":
        if isinstance(key, slice):
            return History._of(self.names, self.item_codes[key], self.type_names, self.type_codes[key],
                               self.ts[key], self.opens[key])
        return HistoryEvent(self.names[self.item_codes[key]], self.ts[key], self.type_names[self.type_codes[key]],
                            bool(self.opens[key]))

    def __iter__(self) -> Iterator[HistoryEvent]:
        return map(HistoryEvent, self.items, self.ts, self.types, map(bool, self.opens))

    def __eq__(self, other: object) -> bool:
        if isinstance(other, list):
            other = History.of(other)
        return isinstance(other, History) and (self.items, self.ts, self.types, self.opens) == \
            (other.items, other.ts, other.types, other.opens)

    def __repr__(self) -> str:
        return f"History({list(self)!r})"


@dataclass(frozen=True)
class Packed:
    """Several histories' columns end to end (row r's events are the r-th `lengths` run): codes index
    the concatenated name lists, so a reader maps each distinct name once, not each event."""

    names: list[str]
    item_codes: np.ndarray  # int64, into names
    type_names: list[str]
    type_codes: np.ndarray  # int64, into type_names
    ts_ms: np.ndarray  # int64
    opens: np.ndarray  # bool
    lengths: np.ndarray  # int64, events per history

    def split(self, column: np.ndarray) -> list[np.ndarray]:
        """A per-event column cut back into one array per history."""
        return np.split(column, np.cumsum(self.lengths)[:-1]) if len(self.lengths) else []


def _joined_codes(name_lists: list[list[str]], codes: Iterable[array], lengths: np.ndarray) -> np.ndarray:
    joined = np.frombuffer(b"".join(codes), dtype=_CODE).astype(np.int64)
    sizes = np.fromiter(map(len, name_lists), np.int64, len(name_lists))
    return joined + np.repeat(np.cumsum(sizes) - sizes, lengths)


def pack(histories: Sequence[History]) -> Packed:
    lengths = np.fromiter(map(len, histories), np.int64, len(histories))
    names = [h.names for h in histories]
    type_names = [h.type_names for h in histories]
    return Packed(
        [n for ns in names for n in ns], _joined_codes(names, (h.item_codes for h in histories), lengths),
        [n for ns in type_names for n in ns],
        _joined_codes(type_names, (h.type_codes for h in histories), lengths),
        np.frombuffer(b"".join(h.ts for h in histories), dtype=np.int64),
        np.frombuffer(b"".join(h.opens for h in histories), dtype=bool), lengths)


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
    # Of the re-keyed copies applied (events a producer keyed wrongly, copied onto the user's partition): the
    # highest offset of the original record per input partition. A second copy of one record (made when the
    # original's batch was read again) has an offset of its own, above source_offset; this tells it apart.
    origins: dict[int, int] = field(default_factory=dict)
    # With collapse_repeats: the time of the newest event merged into the one before it (not stepped, not stored).
    # Featurization counts a repeat's session gap from the repeat before it, not from the last event kept.
    repeat_ms: int = 0
    # The last H events of types outside the version's event_types (not stepped, not in `history`, so never in
    # a rebuild or the repeat head's window), kept only for the serving filters: a purchase stays excluded
    # whatever types the version steps. Their session flags are all False (they open no session).
    skipped: History = field(default_factory=History)

    def __post_init__(self) -> None:
        if not isinstance(self.history, History):  # a list of HistoryEvents, as tests and tools write them
            self.history = History.of(self.history)
        if not isinstance(self.skipped, History):
            self.skipped = History.of(self.skipped)

    def forget_input_offsets(self) -> None:
        """Forget which input records it applied (they name a log that is gone: offsets start again at 0)."""
        self.source_offset, self.origins = -1, {}

    def copy(self) -> "UserState":
        """A state to advance without touching this one (advancing replaces the hidden vectors, and
        extends the history in place)."""
        return UserState(self.model_version, self.session_hidden, self.user_hidden, self.session_id,
                         self.last_event_ms, self.session_length, self.history.copy(), self.source_offset,
                         self.n_events, dict(self.origins), self.repeat_ms, self.skipped.copy())


class _Head(msgspec.Struct, array_like=True):
    """The fields both formats begin with; each format's history fields, then source_offset, n_events and the
    optional fields (origins, repeat_ms, skipped: added later, written only up to the last one set), follow them
    in the array. A value without an optional field reads as having none, and builds before it read (and ignore)
    it."""

    model_version: str
    hidden_dim: int
    session_hidden: bytes
    user_hidden: bytes
    session_id: str | None
    last_event_ms: int
    session_length: int


class _Columns(msgspec.Struct, array_like=True):
    """A History as format 2 stores it, as one array: UserState.skipped in either format."""

    hist_names: list[str]
    hist_item_codes: bytes
    hist_type_names: list[str]
    hist_type_codes: bytes
    hist_ts: bytes
    hist_new: bytes


class _Wire(_Head, array_like=True):  # format 2
    hist_names: list[str]
    hist_item_codes: bytes  # uint16 little-endian, one per event
    hist_type_names: list[str]
    hist_type_codes: bytes  # uint16 little-endian, one per event
    hist_ts: bytes  # int64 little-endian, one per event
    hist_new: bytes  # one byte (0 or 1) per event
    source_offset: int
    n_events: int
    origins: dict[int, int] | None = None
    repeat_ms: int | None = None
    skipped: _Columns | None = None


class _WireV1(_Head, array_like=True):
    hist_items: list[str]
    hist_ts: list[int]
    hist_types: list[str]
    hist_new: list[bool]
    source_offset: int
    n_events: int
    origins: dict[int, int] | None = None
    repeat_ms: int | None = None
    skipped: _Columns | None = None


_enc = msgspec.msgpack.Encoder()
_dec = {1: msgspec.msgpack.Decoder(_WireV1), 2: msgspec.msgpack.Decoder(_Wire)}


def _source_only(wire: type) -> msgspec.msgpack.Decoder:
    """A decoder of a format's fields up to source_offset, the others left undecoded (trailing ones ignored)."""
    before = wire.__struct_fields__[:wire.__struct_fields__.index("source_offset")]
    return msgspec.msgpack.Decoder(msgspec.defstruct(
        f"_SourceOf{wire.__name__}", [(f, msgspec.Raw) for f in before] + [("source_offset", int)], array_like=True))


_source_dec = {1: _source_only(_WireV1), 2: _source_only(_Wire)}


def source_offset_of(raw: bytes) -> int:
    """The state's source_offset alone, about 15 times faster than decode_state (a restore reads it per user)."""
    if not raw or raw[0] not in FORMATS:
        raise StateFormatError("not a state value of a format this build reads")
    try:
        return _source_dec[raw[0]].decode(raw[1:]).source_offset
    except (msgspec.DecodeError, ValueError) as exc:
        raise StateFormatError(f"corrupt state value: {exc}") from None


def _le(a: array) -> bytes:
    if _BIG_ENDIAN:
        a = a[:]
        a.byteswap()
    return a.tobytes()


def _from_le(typecode: str, raw: bytes) -> array:
    a = array(typecode)
    a.frombytes(raw)
    if _BIG_ENDIAN:
        a.byteswap()
    return a


def _columns(h: History) -> tuple[list[str], bytes, list[str], bytes, bytes, bytes]:
    return h.names, _le(h.item_codes), h.type_names, _le(h.type_codes), _le(h.ts), bytes(h.opens)


def encode_state(s: UserState, fmt: int = FORMAT_VERSION) -> bytes:
    """The stored form, in format `fmt` (1 only while builds that read nothing else still serve)."""
    h = s.history
    head = (s.model_version, int(s.session_hidden.shape[0]),
            np.ascontiguousarray(s.session_hidden, dtype=np.float32).tobytes(),
            np.ascontiguousarray(s.user_hidden, dtype=np.float32).tobytes(),
            s.session_id, int(s.last_event_ms), int(s.session_length))
    tail = (int(s.source_offset), int(s.n_events), s.origins or None, int(s.repeat_ms) or None,
            _Columns(*_columns(s.skipped)) if len(s.skipped) else None)
    if fmt == 2:
        wire = _Wire(*head, *_columns(h), *tail)
    elif fmt == 1:
        wire = _WireV1(*head, h.items, h.ts_ms, h.types, [bool(o) for o in h.opens], *tail)
    else:
        raise StateFormatError(f"state format {fmt} cannot be written (this build writes formats "
                               f"{', '.join(map(str, FORMATS))})")
    fields = msgspec.structs.astuple(wire)
    n = len(fields)
    while fields[n - 1] is None:  # optional fields not set are left out: the value is as builds before them wrote it
        n -= 1
    return bytes([fmt]) + _enc.encode(fields[:n])


def _history_v2(w: _Wire | _Columns) -> History:
    n = len(w.hist_new)
    if (len(w.hist_item_codes), len(w.hist_type_codes), len(w.hist_ts)) != (2 * n, 2 * n, 8 * n):
        raise ValueError("history columns differ in length")
    if w.hist_new.translate(None, b"\x00\x01"):
        raise ValueError("a history session flag is neither 0 nor 1")
    h = History._of(w.hist_names, _from_le(_CODE, w.hist_item_codes), w.hist_type_names,
                    _from_le(_CODE, w.hist_type_codes), _from_le("q", w.hist_ts), bytearray(w.hist_new))
    if n and (max(h.item_codes) >= len(h.names) or max(h.type_codes) >= len(h.type_names)):
        raise ValueError("a history code points past its names")
    return h


def decode_state(raw: bytes) -> UserState:
    if not raw:
        raise StateFormatError("empty state value")
    if raw[0] not in FORMATS:
        raise StateFormatError(f"state format {raw[0]} is not supported (this build reads formats "
                               f"{', '.join(map(str, FORMATS))})")
    try:
        w = _dec[raw[0]].decode(raw[1:])
        sess = np.frombuffer(w.session_hidden, dtype=np.float32).copy()
        user = np.frombuffer(w.user_hidden, dtype=np.float32).copy()
    except (msgspec.DecodeError, ValueError) as exc:
        raise StateFormatError(f"corrupt state value: {exc}") from None
    if sess.shape[0] != w.hidden_dim or user.shape[0] != w.hidden_dim:
        raise StateFormatError("corrupt state value: hidden vectors do not match hidden_dim")
    if not (np.isfinite(sess).all() and np.isfinite(user).all()):  # the network never writes one: NaN scores follow
        raise StateFormatError("corrupt state value: a hidden vector is not finite")
    try:
        history = _history_v2(w) if isinstance(w, _Wire) else \
            History(w.hist_items, w.hist_ts, w.hist_types, w.hist_new)
        skipped = History() if w.skipped is None else _history_v2(w.skipped)
    except (ValueError, OverflowError) as exc:  # OverflowError: a format-1 time past int64
        raise StateFormatError(f"corrupt state value: {exc}") from None
    return UserState(w.model_version, sess, user, w.session_id, w.last_event_ms, w.session_length,
                     history, w.source_offset, w.n_events, w.origins or {}, w.repeat_ms or 0, skipped)
