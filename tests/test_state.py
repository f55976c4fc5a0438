"""The stored user state: its binary form round-trips, bad bytes are refused, and decoding stays cheap."""
from __future__ import annotations

import gc

import numpy as np
import pytest

from model.state import (FORMAT_VERSION, History, HistoryEvent, StateFormatError, UserState, decode_state,
                         encode_state)


def _state(h: int = 100) -> UserState:
    history = [HistoryEvent(f"item-{j % 7}", 1_700_000_000_000 + j * 60_000, "purchase" if j % 5 == 0 else "click",
                            j % 30 == 0) for j in range(h)]
    rng = np.random.default_rng(0)
    return UserState("v1", rng.standard_normal(8).astype(np.float32), rng.standard_normal(8).astype(np.float32),
                     "u-s3", history[-1].ts_ms, 10, history, source_offset=41, n_events=250)


def test_a_state_round_trips_through_its_stored_form():
    s = _state()
    back = decode_state(encode_state(s))
    assert back.history == s.history and back.history is not s.history
    assert (back.model_version, back.session_id, back.last_event_ms, back.session_length, back.source_offset,
            back.n_events) == ("v1", "u-s3", s.last_event_ms, 10, 41, 250)
    np.testing.assert_array_equal(back.user_hidden, s.user_hidden)
    np.testing.assert_array_equal(back.session_hidden, s.session_hidden)


@pytest.mark.parametrize("raw, says", [(b"", "empty"), (bytes([FORMAT_VERSION + 1]) + b"\x90", "not supported"),
                                       (bytes([FORMAT_VERSION]) + b"\xc1garbage", "corrupt")])
def test_bad_bytes_are_refused_with_what_is_wrong(raw, says):
    with pytest.raises(StateFormatError, match=says):
        decode_state(raw)


def test_decoding_a_state_adds_no_collector_tracked_object_per_stored_event():
    # A worker decodes one state per user per batch; H tracked objects each made collections walk them all.
    raw = encode_state(_state(100))
    gc.collect()
    before = len(gc.get_objects())
    back = decode_state(raw)
    assert len(gc.get_objects()) - before < 20 and len(back.history) == 100


def test_a_history_reads_as_events_and_keeps_only_its_newest():
    h = History.of(_state(5).history)
    h.append("item-x", 1_800_000_000_000, "click", True)
    h.keep_last(3)
    assert len(h) == 3 and h[-1] == HistoryEvent("item-x", 1_800_000_000_000, "click", True)
    assert [e.item_id for e in h] == ["item-3", "item-4", "item-x"] and h[1:] == list(h)[1:]
    with pytest.raises(ValueError, match="differ in length"):
        History(["a"], [1], ["click"], [])
