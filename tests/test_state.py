"""The stored user state: its binary form round-trips, bad bytes are refused, and decoding stays cheap."""
from __future__ import annotations

import gc
from dataclasses import replace

import msgspec
import numpy as np
import pytest

from model.state import (FORMAT_VERSION, FORMATS, History, HistoryEvent, StateFormatError, UserState,
                         decode_state, encode_state, pack, source_offset_of)


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


def test_the_original_offsets_of_applied_re_keyed_copies_round_trip_and_a_state_without_them_is_stored_as_before():
    s = _state()
    assert encode_state(s, 1) == _format_1(s) and decode_state(_format_1(s)).origins == {}
    with_origins = replace(s, origins={0: 17, 3: 2**40})
    for fmt in (1, 2):
        raw = encode_state(with_origins, fmt)
        assert decode_state(raw).origins == {0: 17, 3: 2**40}
        # appended to the array: builds before it read the same fields (and ignore the last)
        assert msgspec.msgpack.decode(raw[1:])[:-1] == msgspec.msgpack.decode(encode_state(s, fmt)[1:])
    copy = with_origins.copy()
    copy.origins[0] = 99
    assert with_origins.origins[0] == 17
    for later in (replace(s, repeat_ms=1_700_000_060_000), replace(with_origins, repeat_ms=1_700_000_060_000)):
        back = decode_state(encode_state(later))  # the repeat clock of collapse_repeats, with or without origins
        assert (back.repeat_ms, back.origins) == (later.repeat_ms, later.origins) and later.copy().repeat_ms


def test_the_events_a_version_does_not_step_for_their_type_round_trip_and_a_state_without_them_is_stored_as_before():
    s = _state()
    assert encode_state(s) == _format_2(s) and encode_state(s, 1) == _format_1(s)
    bought = History(["item-9", "item-3"], [1_700_000_000_000, 1_700_000_060_000], ["purchase"] * 2, [False] * 2)
    for base in (s, replace(s, origins={0: 17}), replace(s, origins={0: 17}, repeat_ms=1_700_000_060_000)):
        for fmt in (1, 2):
            raw, before = encode_state(replace(base, skipped=bought), fmt), encode_state(base, fmt)
            back = decode_state(raw)
            assert back.skipped == bought and decode_state(before).skipped == History()
            assert (back.history, back.origins, back.repeat_ms, back.n_events) == \
                (s.history, base.origins, base.repeat_ms, 250)
            # appended to the array (optional fields before it unset): builds before it read the same fields
            fields, old = msgspec.msgpack.decode(raw[1:]), msgspec.msgpack.decode(before[1:])
            assert fields[:len(old)] == old and fields[len(old):-1] == [None] * (len(fields) - len(old) - 1)
    copy = replace(s, skipped=bought).copy()
    copy.skipped.append("item-5", 1_700_000_120_000, "purchase", False)
    assert len(bought) == 2
    bad = replace(s, skipped=bought.copy())
    bad.skipped.item_codes[0] = 99
    with pytest.raises(StateFormatError, match="past its names"):
        decode_state(encode_state(bad))


@pytest.mark.parametrize("fmt", [1, 2])
@pytest.mark.parametrize("bad", [np.nan, np.inf])
def test_a_state_whose_hidden_vector_is_not_finite_is_a_corrupt_state_the_user_starts_afresh_from(fmt, bad):
    """The network never writes one; a damaged or foreign value would give the user NaN scores (JSON null, which
    the recommendation contract and `hrnn audit` refuse) from then on."""
    s = _state()
    s.user_hidden[3] = bad
    with pytest.raises(StateFormatError, match="not finite"):
        decode_state(encode_state(s, fmt))


def test_a_format_1_time_past_64_bits_is_a_corrupt_state_not_a_crash():
    s = _state(3)
    raw = _format_1(s)
    fields = msgspec.msgpack.decode(raw[1:])
    fields[8][0] = 2**64 - 1  # hist_ts
    with pytest.raises(StateFormatError, match="corrupt"):
        decode_state(bytes([1]) + msgspec.msgpack.encode(fields))


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


def _format_1(s: UserState) -> bytes:
    """The bytes a format-1 build wrote (one msgpack array; the history as four per-event lists)."""
    h = s.history
    return bytes([1]) + msgspec.msgpack.encode([
        s.model_version, 8, s.session_hidden.tobytes(), s.user_hidden.tobytes(), s.session_id, s.last_event_ms,
        s.session_length, h.items, h.ts_ms, h.types, [e.new_session for e in h], s.source_offset, s.n_events])


def _format_2(s: UserState) -> bytes:
    """The bytes a format-2 build before the optional fields wrote (the history as format-2 columns)."""
    h = s.history
    return bytes([2]) + msgspec.msgpack.encode([
        s.model_version, 8, s.session_hidden.tobytes(), s.user_hidden.tobytes(), s.session_id, s.last_event_ms,
        s.session_length, h.names, np.array(h.item_codes, "<u2").tobytes(), h.type_names,
        np.array(h.type_codes, "<u2").tobytes(), np.array(h.ts, "<i8").tobytes(), bytes(h.opens), s.source_offset,
        s.n_events])


def test_states_stored_by_a_format_1_build_are_still_read_and_are_written_back_as_format_2():
    s = _state()
    old = decode_state(_format_1(s))
    assert old.history == s.history and (old.n_events, old.source_offset, old.session_id) == (250, 41, "u-s3")
    np.testing.assert_array_equal(old.user_hidden, s.user_hidden)
    new = encode_state(old)
    assert new[0] == FORMAT_VERSION == 2 and decode_state(new).history == s.history
    assert new.count(b"item-3") == 1 and _format_1(s).count(b"item-3") == 14  # each distinct item once
    assert len(new) < 0.7 * len(_format_1(s))


def test_format_1_is_written_on_request_as_a_format_1_build_wrote_it_and_other_formats_are_refused():
    s = _state()
    assert encode_state(s, 1) == _format_1(s)
    with pytest.raises(StateFormatError, match="format 3 cannot be written"):
        encode_state(s, 3)


def test_a_stored_history_holds_each_distinct_item_once_and_drops_names_that_left_the_window():
    h = History()
    for j in range(1_000):  # a user who never repeats an item
        h.append(f"item-{j}", j, "click", j % 10 == 0)
        h.keep_last(10)
    assert [e.item_id for e in h] == [f"item-{j}" for j in range(990, 1_000)]
    assert len(h.names) <= 10 + 16 and h.type_names == ["click"]
    back = decode_state(encode_state(replace(_state(), history=h))).history
    assert back == h and len(back.names) == len(h.names)


@pytest.mark.parametrize("column, value, says", [("item_codes", 99, "past its names"),
                                                  ("type_codes", 2, "past its names"),
                                                  ("opens", 2, "neither 0 nor 1")])
def test_a_stored_history_with_a_code_past_its_names_or_a_bad_session_flag_is_refused(column, value, says):
    s = _state(3)
    getattr(s.history, column)[1] = value
    with pytest.raises(StateFormatError, match=says):
        decode_state(encode_state(s))


def test_a_format_1_history_with_more_distinct_items_than_codes_can_number_is_refused():
    n = 70_000
    hidden = np.zeros(2, np.float32).tobytes()
    raw = bytes([1]) + msgspec.msgpack.encode(["v", 2, hidden, hidden, None, 0, 0, [f"i{j}" for j in range(n)],
                                               [0] * n, ["click"] * n, [False] * n, -1, n])
    with pytest.raises(StateFormatError, match="70,000 distinct names"):
        decode_state(raw)


def test_a_history_finds_the_items_of_event_types_and_of_its_newest_session():
    h = History(["a", "b", "a", "c", "d", "c"], [1, 2, 3, 4, 5, 6],
                ["purchase", "click", "click", "purchase", "click", "click"], [True, False, False, True, False, False])
    assert sorted(h.items_of_types({"purchase"})) == ["a", "c"]
    assert h.items_of_types({"view"}) == []
    assert sorted(h.session_items()) == ["c", "d"]
    assert sorted(History(["x", "y"], [1, 2], ["click"] * 2, [False, False]).session_items()) == ["x", "y"]


def test_packed_histories_index_one_list_of_names_across_rows():
    a = History(["x", "y", "x"], [1, 2, 3], ["click"] * 3, [True, False, False])
    b = History(["y"], [9], ["purchase"], [True])
    cols = pack([a, History(), b])
    assert [cols.names[c] for c in cols.item_codes] == ["x", "y", "x", "y"]
    assert [cols.type_names[c] for c in cols.type_codes] == ["click"] * 3 + ["purchase"]
    assert cols.ts_ms.tolist() == [1, 2, 3, 9] and cols.opens.tolist() == [True, False, False, True]
    assert [x.tolist() for x in cols.split(cols.ts_ms)] == [[1, 2, 3], [], [9]]


@pytest.mark.parametrize("fmt", FORMATS)
def test_the_source_offset_read_alone_is_the_decoded_states(fmt):
    raw = encode_state(replace(_state(), source_offset=1234, origins={3: 99}), fmt)
    assert source_offset_of(raw) == decode_state(raw).source_offset == 1234
    with pytest.raises(StateFormatError):
        source_offset_of(raw[:5])
