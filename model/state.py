"""The per-user state record and its versioned binary form (the RocksDB value).

Layout: one format byte, then a msgpack map. Readers refuse formats they do not know
with StateFormatError instead of guessing.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import msgspec
import numpy as np

from model.errors import HRNNError

FORMAT_VERSION = 1


class StateFormatError(HRNNError):
    """A stored state cannot be decoded (unknown format version or corrupt bytes)."""


class HistoryEvent(msgspec.Struct, gc=False):
    """One stored event. A struct the cycle collector does not track (it holds no containers): a
    state holds up to H of these and the worker decodes one state per user per batch."""

    item_id: str
    ts_ms: int
    event_type: str
    new_session: bool  # kept so a rebuild replays the same session boundaries


@dataclass(slots=True)
class UserState:
    model_version: str
    session_hidden: np.ndarray  # float32 (hidden_dimension,)
    user_hidden: np.ndarray  # float32 (hidden_dimension,)
    session_id: str | None
    last_event_ms: int
    session_length: int
    history: list[HistoryEvent] = field(default_factory=list)  # the last H events, oldest first
    source_offset: int = -1  # offset of the input record that produced this state
    n_events: int = 0


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
        [e.item_id for e in h], [int(e.ts_ms) for e in h], [e.event_type for e in h], [bool(e.new_session) for e in h],
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
    history = list(map(HistoryEvent, w.hist_items, w.hist_ts, w.hist_types, w.hist_new))
    return UserState(w.model_version, sess, user, w.session_id, w.last_event_ms, w.session_length,
                     history, w.source_offset, w.n_events)
