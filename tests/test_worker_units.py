"""The worker's pure parts: routing consumed records, ownership rounds, replay detection, filters, client
settings librdkafka refuses. No broker: records are real confluent_kafka.Message objects built in memory."""
from __future__ import annotations

import gc
import time
from pathlib import Path

import numpy as np
import pytest
from confluent_kafka import KafkaError, KafkaException, Message, TopicPartition

from model.artifact import latest_version_dir
from model.errors import ConfigError, EventError
from model.events import Event, _decode_general, decode_event, encode_event, parse_timestamp
from model.config import MAX_HISTORY_LENGTH
from model.inference import Recommender, StepInput
from model.state import UserState
from stream import record_limits, records, worker
from stream.kafka_clients import create_producer
from stream.settings import MAX_K, WorkerSettings
from stream.worker import (TRACKED_PER_EVENT, Incoming, Worker, applied_before, filters_of, fresh_events,
                           gc_threshold_for, route, split_by_owner, tune_process_gc)
from worker_testkit import make_registry

TS = 1_767_225_600_000


def message(partition: int, offset: int, value: bytes | None, key: bytes | None) -> Message:
    return Message(topic="ev", partition=partition, offset=offset, key=key, value=value, timestamp=(1, TS))


def event_bytes(user: str, item: str = "i1") -> bytes:
    return encode_event(Event(user, item, "click", TS))


def test_valid_records_keyed_by_their_user_become_events_in_partition_and_offset_order():
    msgs = [message(1, 7, event_bytes("b"), b"b"), message(0, 3, event_bytes("a"), b"a"),
            message(1, 6, event_bytes("c"), b"c")]
    routed = route(msgs)
    assert [(e.partition, e.offset, e.event.user_id) for e in routed.events] == \
        [(0, 3, "a"), (1, 6, "c"), (1, 7, "b")]
    assert routed.events[0].kafka_ts_ms == TS
    assert not routed.dead and not routed.rekey


def test_invalid_records_are_set_aside_with_their_reason():
    msgs = [message(0, 0, b"{oops", b"a"), message(0, 1, None, b"a"),
            message(0, 2, b'{"user_id": "a", "item_id": "x", "event_type": "click"}', b"a")]
    routed = route(msgs)
    assert [exc.reason for _, exc in routed.dead] == ["bad_json", "empty_value", "missing_field"]
    assert [m.offset() for m, _ in routed.dead] == [0, 1, 2]
    assert not routed.events


def test_records_whose_key_is_not_their_user_id_are_set_aside_for_re_keying():
    msgs = [message(0, 0, event_bytes("alice"), None), message(0, 1, event_bytes("alice"), b"bob"),
            message(0, 2, event_bytes("alice"), b"alice")]
    routed = route(msgs)
    assert [(m.offset(), e.user_id) for m, e in routed.rekey] == [(0, "alice"), (1, "alice")]
    assert [e.offset for e in routed.events] == [2]


def test_the_offsets_to_commit_cover_every_record_including_set_aside_ones():
    msgs = [message(0, 4, b"bad", b"a"), message(0, 5, event_bytes("a"), b"x"), message(2, 9, event_bytes("z"), b"z")]
    routed = route(msgs)
    assert routed.next_offsets == {0: 6, 2: 10}
    assert routed.first_offsets == {0: 4, 2: 9}


def test_consumer_errors_that_are_not_fatal_are_skipped():
    err = Message(topic="ev", partition=0, offset=-1, error=KafkaError(KafkaError._TRANSPORT))
    routed = route([err, message(0, 1, event_bytes("a"), b"a")])
    assert len(routed.events) == 1 and routed.next_offsets == {0: 2}


def incoming(user: str, partition: int, offset: int) -> Incoming:
    return Incoming(partition, offset, Event(user, "i", "click", TS), None)


def test_a_user_seen_in_two_partitions_of_one_batch_is_stepped_in_two_rounds():
    events = [incoming("a", 0, 1), incoming("b", 1, 1), incoming("a", 1, 2), incoming("a", 0, 3)]
    now, later = split_by_owner(events)
    assert [(e.event.user_id, e.partition, e.offset) for e in now] == [("a", 0, 1), ("b", 1, 1), ("a", 0, 3)]
    assert [(e.event.user_id, e.partition) for e in later] == [("a", 1)]
    assert split_by_owner(later) == (later, [])


def test_an_event_at_or_below_the_stored_source_offset_counts_as_applied():
    z = np.zeros(4, dtype=np.float32)
    state = UserState("v", z, z, "s", TS, 1, [], source_offset=10)
    assert applied_before(state, 10) and applied_before(state, 3)
    assert not applied_before(state, 11)
    assert not applied_before(None, 0)


def test_a_re_keyed_copy_names_its_original_record_only_when_copied_from_this_topic():
    copy = lambda origin: Message(topic="ev", partition=1, offset=5, key=b"a", value=event_bytes("a"),  # noqa: E731
                                  timestamp=(1, TS), headers=records.repartition_headers(origin, 0, 9))
    assert [e.origin for e in route([copy("ev")]).events] == [(0, 9)]
    assert [e.origin for e in route([copy("other")]).events] == [None]  # not a copy this worker made
    assert [e.origin for e in route([message(1, 6, event_bytes("a"), b"a")]).events] == [None]


def test_a_second_re_keyed_copy_of_one_record_counts_as_applied_in_the_batch_and_after_it():
    """A crash between re-keying a batch and committing it copies its records again, at offsets of their own."""
    z = np.zeros(4, dtype=np.float32)
    ev = lambda user, offset, origin=None: Incoming(1, offset, Event(user, "i", "click", TS), TS, origin)  # noqa: E731
    stored = {"a": UserState("v", z, z, "s", TS, 1, [], source_offset=3, origins={0: 7}), "b": None}
    batch = [ev("a", 4, (0, 6)), ev("a", 5, (0, 8)), ev("b", 6, (0, 9)), ev("a", 7, (2, 1)), ev("a", 8),
             ev("a", 9, (0, 8)), ev("b", 10, (0, 9)), ev("a", 11, (0, 10)), ev("a", 2)]
    assert [e.offset for e in fresh_events(batch, stored)] == [5, 6, 7, 8, 11]


def test_the_serving_process_freezes_what_it_loaded_and_collects_rarely():
    before = gc.get_threshold()
    try:
        tune_process_gc(12_345)
        assert gc.get_threshold() == (12_345, *before[1:]) and gc.get_freeze_count() > 0
    finally:
        gc.unfreeze()
        gc.set_threshold(*before)


def test_the_serving_gc_threshold_grows_with_the_batch_unless_configured():
    assert gc_threshold_for(WorkerSettings(batch_size=10)) == 20_000
    assert gc_threshold_for(WorkerSettings(batch_size=4_000)) == 4_000 * TRACKED_PER_EVENT
    assert gc_threshold_for(WorkerSettings(batch_size=4_000, gc_threshold=700)) == 700


def _full_history_batch(n_users: int, history: int = 100):
    """A small repeat-head version and n_users stored states with full last-H histories."""
    import torch

    from model.artifact import LoadedModel
    from model.config import DataConfig, HRNNConfig
    from model.inference import Recommender
    from model.network import HRNN
    from model.state import HistoryEvent, encode_state

    torch.manual_seed(0)
    cfg = HRNNConfig(hidden_dimension=8, repeat_head=True, history_length=history)
    items = [f"item-{i}" for i in range(50)]
    rec = Recommender(LoadedModel("v", Path("."), HRNN(50, cfg).eval(), cfg, DataConfig(), items,
                                  ["click", "purchase"], {}))
    z = np.zeros(8, dtype=np.float32)
    stored = {f"u{u}": encode_state(UserState("v", z, z, f"u{u}-s", TS + history * 60_000, history, [
        HistoryEvent(items[(u + j) % 50], TS + j * 60_000, "purchase" if j % 10 == 0 else "click", j == 0)
        for j in range(history)], n_events=history)) for u in range(n_users)}
    events = [StepInput(u, items[i % 50], "click", TS + (history + 1) * 60_000) for i, u in enumerate(stored)]
    return rec, stored, events


@pytest.mark.parametrize("per_event, collects", [(TRACKED_PER_EVENT, False), (5, True)])
def test_a_batch_of_full_histories_stays_under_the_threshold_the_worker_sizes(per_event, collects):
    # What the worker does per batch between RocksDB and Kafka: decode every state, recommend. A gen-0
    # collection inside it walks all the batch's states; the sized threshold must keep it out.
    from model.state import decode_state

    rec, stored, events = _full_history_batch(1_024)
    before, started = gc.get_threshold(), []
    note = lambda phase, info: started.append(info["generation"]) if phase == "start" else None  # noqa: E731
    gc.collect()
    gc.set_threshold(per_event * len(events), *before[1:])
    gc.callbacks.append(note)
    try:
        out = rec.recommend({u: decode_state(raw) for u, raw in stored.items()}, events, k=10)
    finally:
        gc.callbacks.remove(note)
        gc.set_threshold(*before)
    assert len(out.items) == len(events)
    assert bool(started) is collects


def test_filters_come_from_the_settings():
    f = filters_of(WorkerSettings(registry="r", state_dir="s", exclude_purchased=False,
                                  purchase_types=("buy", "order"), exclude_session_items=True,
                                  exclude_event_types=("dislike",)))
    assert (f.exclude_purchased, f.purchase_types, f.exclude_session_items, f.exclude_event_types) == \
        (False, ("buy", "order"), True, ("dislike",))


RAW_EVENTS = [
    b'{"user_id": "u", "item_id": "i", "event_type": "click", "timestamp": 1767225600000}',
    b'{"user_id": "u", "item_id": "i", "event_type": "click", "timestamp": 1767225600000, "session_id": "s",'
    b' "event_id": "e", "event_value": 2.5, "extra": [1]}',
    b'{"user_id": "u", "item_id": "i", "event_type": "click", "timestamp": 1767225600000, "session_id": "",'
    b' "event_id": null, "event_value": 3}',
    b'{"user_id": 17, "item_id": 4, "event_type": "click", "timestamp": 1767225600000}',
    b'{"user_id": "u", "item_id": "i", "event_type": "click", "timestamp": "2026-01-01T00:00:00Z"}',
    b'{"user_id": "u", "item_id": "i", "event_type": "click", "timestamp": 1767225600000.7}',
    b'{"user_id": "u", "item_id": "i", "event_type": "click", "timestamp": "1767225600000"}',
    b'{"user_id": "u", "item_id": "i", "event_type": "click", "timestamp": 1767225600}',
    b'{"user_id": "", "item_id": "i", "event_type": "click", "timestamp": 1767225600000}',
    b'{"user_id": "u", "event_type": "click", "timestamp": 1767225600000}',
    b'{"user_id": "u", "item_id": "i", "event_type": "click"}',
    b'{"user_id": "u", "item_id": "i", "event_type": "click", "timestamp": true}',
    b'{"user_id": "u", "item_id": "i", "event_type": "click", "timestamp": 1767225600000, "event_value": true}',
    b'{"user_id": "u", "item_id": "i", "event_type": "click", "timestamp": 1767225600000, "event_value": "x"}',
    b'{"user_id": null, "item_id": "i", "event_type": "click", "timestamp": 1767225600000}',
    b'["u", "i"]', b'{not json', b'', None,
    b'{"user_id": "' + b"u" * 257 + b'", "item_id": "i", "event_type": "click", "timestamp": 1767225600000}',
    b'{"user_id": "' + b"u" * 256 + b'", "item_id": "i", "event_type": "click", "timestamp": 1767225600000}',
    b'{"user_id": "u", "item_id": "i", "event_type": "click", "timestamp": 1767225600000, "session_id": {"a": 1}}',
    b'{"user_id": "u", "item_id": "i", "event_type": "click", "timestamp": 1767225600000, "session_id": true}',
    b'{"user_id": "u", "item_id": "i", "event_type": "click", "timestamp": 1767225600000, "event_id": [1, 2]}',
    b'{"user_id": "u", "item_id": "i", "event_type": "click", "timestamp": 1767225600000, "event_id": 7}',
    b'{"user_id": "u", "item_id": "i", "event_type": "click", "timestamp": 1767225600000, "pad": "'
    + b"x" * 70_000 + b'"}',
]


@pytest.mark.parametrize("raw", RAW_EVENTS)
def test_the_fast_event_decoder_agrees_with_the_contract_decoder(raw):
    def outcome(decode):
        try:
            return decode(raw)
        except EventError as exc:
            return exc.reason

    assert outcome(decode_event) == outcome(_decode_general)


def poison(**fields) -> bytes:
    """An event whose other fields are valid, with `fields` given as raw JSON text."""
    obj = {"user_id": '"a"', "item_id": '"i"', "event_type": '"click"', "timestamp": str(TS), **fields}
    return ("{" + ",".join(f'"{k}":{v}' for k, v in obj.items()) + "}").encode()


# Values that once escaped the decoders as OverflowError or RecursionError: the worker crashed on the record,
# restarted, read it again and crashed again, never reaching the dead-letter topic.
POISON_EVENTS = [
    pytest.param(poison(event_value="1" + "0" * 400), "bad_field", "integer of 401 digits", id="event_value-1e400"),
    pytest.param(poison(event_value="-1" + "0" * 400), "bad_field", "integer of 401 digits", id="event_value--1e400"),
    pytest.param(poison(timestamp="1" + "0" * 400), "bad_timestamp", "not epoch-ms between 1990 and 2200",
                 id="timestamp-int-1e400"),
    pytest.param(poison(timestamp='"1' + "0" * 400 + '"'), "bad_timestamp", "not epoch-ms between 1990 and 2200",
                 id="timestamp-string-1e400"),
    pytest.param(b"[" * 1000 + b"]" * 1000, "bad_json", "nested too deeply", id="nested-brackets"),
    pytest.param(poison(extra="[" * 2000 + "]" * 2000), "bad_json", "nested too deeply", id="nested-extra-field"),
    pytest.param(poison(user_id='{"a":' * 2000 + "1" + "}" * 2000), "bad_json", "nested too deeply",
                 id="nested-user-id"),
    # beyond a float's range msgspec names no field (`$[...]`): the reason and the detail name it
    pytest.param(poison(timestamp="1e400"), "bad_timestamp", "field 'timestamp' holds a number beyond a float's range",
                 id="timestamp-float-1e400"),
    pytest.param(poison(event_value="[-1e999]"), "bad_field", "field 'event_value' holds a number beyond",
                 id="event_value-float-1e999"),
    pytest.param(poison(user_id='"a~"').replace(b"a~", b"a\xff"), "bad_json", "Invalid UTF-8",
                 id="invalid-utf8-user-id"),
    pytest.param(poison(user_id='"a~"', extra="1e400").replace(b"a~", b"a\xff"), "bad_json", "Invalid UTF-8",
                 id="invalid-utf8-and-out-of-range"),
    pytest.param(b"", "empty_value", "message value is empty (0 bytes", id="empty-bytes"),
    pytest.param(b" \n", "empty_value", "message value is empty (2 bytes", id="whitespace-only"),
]


@pytest.mark.parametrize("raw, reason, complaint", POISON_EVENTS)
def test_poison_values_are_refused_by_both_decoders_with_their_reason(raw, reason, complaint):
    for decode in (decode_event, _decode_general):
        with pytest.raises(EventError) as refused:
            decode(raw)
        assert refused.value.reason == reason and complaint in refused.value.detail
        assert len(refused.value.detail) < 200  # names the bad value, does not repeat its 400 digits


@pytest.mark.parametrize("raw, reason, complaint", [
    (poison(item_id='"' + "i" * 257 + '"'), "bad_field", "'item_id' has 257 characters, more than the 256"),
    (poison(session_id='{"a": 1}'), "bad_field", "'session_id' must be a string, got dict"),
    (poison(event_id="false"), "bad_field", "'event_id' must be a string, got bool"),
    (poison(pad='"' + "x" * 70_000 + '"'), "too_large", "70"),
])
def test_ids_and_records_are_bounded_so_no_output_of_one_event_can_pass_kafkas_record_limit(raw, reason, complaint):
    for decode in (decode_event, _decode_general):
        with pytest.raises(EventError) as refused:
            decode(raw)
        assert refused.value.reason == reason and complaint in refused.value.detail


def test_an_event_stamped_far_ahead_of_its_record_is_set_aside_as_a_bad_timestamp():
    """Once a user's clock moved to 2199, none of their sessions would time out again."""
    hour = 3_600_000
    ahead = [encode_event(Event("a", "i1", "click", TS + lead)) for lead in (hour // 2, hour + 1, 100 * hour)]
    msgs = [message(0, k, raw, b"a") for k, raw in enumerate(ahead)]
    routed = route(msgs, max_lead_s=3600)
    assert [e.offset for e in routed.events] == [0]
    assert [(m.offset(), exc.reason) for m, exc in routed.dead] == [(1, "bad_timestamp"), (2, "bad_timestamp")]
    assert "ahead of the record's Kafka timestamp" in routed.dead[0][1].detail
    assert len(route(msgs, max_lead_s=0).events) == 3  # 0 turns the check off


def test_a_dead_letter_keeps_the_producers_headers_and_is_clipped_below_kafkas_record_limit():
    ours = records.dlq_headers("too_large", "big", "ev", 0, 5)
    carried = records.carried_headers([("traceparent", b"t"), (records.H_REASON, b"forged")], ours)
    assert carried[0] == ("traceparent", b"t") and records.header(carried, records.H_REASON) == "too_large"
    assert [k for k, _ in carried].count(records.H_REASON) == 1
    key, value, headers = records.clipped_dead_letter(b"k" * 10, b"v" * 2_000_000, [("traceparent", b"t")], ours)
    assert key == b"k" * 10 and len(value) == records.DLQ_MAX_PART_BYTES
    assert headers == [("traceparent", b"t")] + ours + [(records.H_CLIPPED, b"first 65536 bytes of value=2000000")]
    assert records.clipped_dead_letter(b"k", b"v", [("traceparent", b"t")], ours) == \
        (b"k", b"v", [("traceparent", b"t")] + ours)


def test_a_dead_letter_drops_the_producers_headers_when_together_they_pass_the_bound_and_says_so():
    ours = records.dlq_headers("bad_json", "not JSON", "ev", 0, 5)
    big = [("traceparent", b"t"), ("trace", b"t" * 1_010_000)]
    key, value, headers = records.clipped_dead_letter(b"k", b"v" * 70_000, big, ours)
    assert (key, value[:1], len(value)) == (b"k", b"v", records.DLQ_MAX_PART_BYTES)
    assert headers[:-1] == ours and headers[-1][0] == records.H_CLIPPED
    assert records.header(headers, records.H_CLIPPED) == \
        f"first 65536 bytes of value=70000; the producer's headers ({records.headers_bytes(big)} bytes) dropped"
    assert records.record_bytes(key, value, headers) < 3 * records.DLQ_MAX_PART_BYTES


def test_a_mis_keyed_record_whose_copy_would_pass_the_record_limit_is_set_aside_as_too_large_not_re_keyed():
    fits = Message(topic="ev", partition=0, offset=0, key=b"x", value=event_bytes("a"), timestamp=(1, TS),
                   headers=[("trace", b"t" * 500_000)])
    too_large = Message(topic="ev", partition=0, offset=1, key=b"x", value=event_bytes("b"), timestamp=(1, TS),
                        headers=[("trace", b"t" * 1_010_000)])
    routed = route([fits, too_large])
    assert [(m.offset(), e.user_id) for m, e in routed.rekey] == [(0, "a")]
    assert [(m.offset(), exc.reason) for m, exc in routed.dead] == [(1, "too_large")]
    assert "re-keyed copy would have 1010" in routed.dead[0][1].detail and "999964" in routed.dead[0][1].detail
    assert routed.next_offsets == {0: 2}


def test_a_record_as_large_as_max_record_bytes_says_is_accepted_by_produce_and_one_byte_more_is_refused():
    """The framing is librdkafka's to the byte; headers are counted at their largest (a varint of 5 bytes)."""
    producer = create_producer("127.0.0.1:9", {"message.max.bytes": "150000"})
    headers = [("trace", b"t" * 1000)]
    producer.produce("t", b"v" * (records.max_record_bytes(150_000) - 1000 - 15), b"k", headers=headers)
    room = records.max_record_bytes(150_000) - records.record_bytes(b"k", None, None)
    producer.produce("t", b"v" * room, b"k")
    with pytest.raises(KafkaException, match="MSG_SIZE_TOO_LARGE"):
        producer.produce("t", b"v" * (room + 1), b"k")
    producer.purge()


def test_a_dead_letter_is_clipped_to_fit_a_producer_limit_below_three_times_64_kib():
    """The reviewer's record under message.max.bytes = 150000: 200 KB key and value, a 60 KB header."""
    ours = records.dlq_headers("too_large", "big", "ev", 0, 5, "f" * 32)
    key, value, headers = records.clipped_dead_letter(b"k" * 200_000, b"v" * 200_000, [("h", b"x" * 60_000)], ours,
                                                      150_000)
    part = records.dlq_part_bytes(ours, 150_000)
    assert 40_000 < part < records.DLQ_MAX_PART_BYTES and len(key) == len(value) == part
    assert records.header(headers, records.H_CLIPPED) == \
        f"first {part} bytes of key=200000, value=200000; the producer's headers (60011 bytes) dropped"
    producer = create_producer("127.0.0.1:9", {"message.max.bytes": "150000"})
    producer.produce("t", value, key, headers=headers)  # refused with MSG_SIZE_TOO_LARGE before
    producer.purge()


def test_a_dead_letter_written_bare_keeps_our_headers_and_says_what_was_dropped():
    ours = records.dlq_headers("bad_json", "d" * 5000, "ev", 0, 5)
    bare = records.bare_dead_letter(ours, 200_000, 7, 60_010)
    assert records.header(bare, records.H_REASON) == "bad_json" and len(records.header(bare, records.H_DETAIL)) == 512
    assert records.header(bare, records.H_CLIPPED) == \
        "key, value and the producer's headers dropped (key=200000, value=7, headers=60010 bytes): the record was too large"
    assert records.record_bytes(None, None, bare) <= records.smallest_dead_letter_bytes("ev")


def _worker(registry: Path, tmp_path: Path, **settings) -> Worker:
    s = WorkerSettings(registry=str(registry), state_dir=str(tmp_path / "state"), input_topic="ev", output_topic="rec",
                       group="g", device="cpu", follow_updates=False, follow_availability=False, **settings)
    return Worker(s, recommender=Recommender.load(latest_version_dir(registry), "cpu"))


def test_a_producer_limit_too_small_for_the_workers_own_records_is_refused_at_start_naming_the_least(tmp_path):
    registry = make_registry(tmp_path / "reg")
    model = Recommender.load(latest_version_dir(registry), "cpu")
    least = record_limits.smallest_message_max_bytes(WorkerSettings(input_topic="ev"), [model])
    assert 100_000 < least < 1_000_000  # a state of history_length events of 256-character ids, both kinds
    with pytest.raises(ConfigError, match=rf"'message.max.bytes' = {least - 1} is too small .* at least {least} bytes"):
        _worker(registry, tmp_path, kafka_producer={"message.max.bytes": str(least - 1)})
    w = _worker(registry, tmp_path, kafka={"message.max.bytes": str(least)})
    w.stores.close_all()


def test_a_version_whose_records_the_producer_limit_cannot_carry_is_refused_by_the_hot_swap(tmp_path):
    import torch

    from model.artifact import save_version
    from model.config import DataConfig, HRNNConfig
    from model.network import HRNN

    registry = make_registry(tmp_path / "reg")
    least = record_limits.smallest_message_max_bytes(
        WorkerSettings(input_topic="ev"), [Recommender.load(latest_version_dir(registry), "cpu")])
    w = _worker(registry, tmp_path, kafka_producer={"message.max.bytes": str(least)})
    cfg = HRNNConfig(hidden_dimension=32, history_length=400)  # a longer history: a larger state record
    torch.manual_seed(0)
    longer = save_version(tmp_path / "reg", HRNN(20, cfg), cfg, DataConfig(), [f"i{k}" for k in range(20)],
                          ["click"], make_current=False)
    try:
        serving = w.models.current()
        assert w.models.request(longer, longer.name) and w.models.wait_idle(60)
        assert w.models.swap_if_ready() is None and w.models.current() is serving
        stats = w.models.stats()
        assert stats.refused == {"unfit": 1} and "'message.max.bytes' = " in stats.last_refusal
        assert f"{longer.name} (history_length = 400)" in stats.last_refusal
    finally:
        w.models.close()
        w.stores.close_all()


def test_a_version_published_with_a_history_length_past_todays_cap_still_starts_under_the_default_limit(tmp_path):
    model = Recommender.load(latest_version_dir(make_registry(tmp_path / "reg")), "cpu")
    model.history_length = 10 * MAX_HISTORY_LENGTH  # loadable (PUBLISHED_MAX_HISTORY_LENGTH), as it was before
    assert record_limits.too_small_for(WorkerSettings(k=MAX_K), [model]) is None


def test_the_default_producer_limit_admits_the_largest_k_and_history_length(tmp_path):
    model = Recommender.load(latest_version_dir(make_registry(tmp_path / "reg")), "cpu")
    model.history_length = MAX_HISTORY_LENGTH
    for fmt in (1, 2):
        settings = WorkerSettings(k=MAX_K, state_format=fmt, partitions=1000)
        assert record_limits.smallest_message_max_bytes(settings, [model]) <= records.DEFAULT_MESSAGE_MAX_BYTES


def test_a_dead_letter_still_refused_as_too_large_is_written_bare_and_the_batch_goes_on(tmp_path):
    from test_worker_fakes import EmptyChangelog, FakeConsumer, FakeProducer

    class TooLargeForDeadLetters(FakeProducer):
        def produce(self, topic, value=None, key=None, **kwargs):
            if topic == "ev.dlq" and value is not None:  # as a broker-side or mis-sized limit would refuse it
                raise KafkaException(KafkaError(KafkaError.MSG_SIZE_TOO_LARGE))
            super().produce(topic, value, key, **kwargs)

    w = _worker(make_registry(tmp_path / "reg"), tmp_path)
    w._producer, w._consumer, w._restorer = TooLargeForDeadLetters(), FakeConsumer(), EmptyChangelog()
    w._read_input_log = lambda: None
    w._on_assign(w._consumer, [TopicPartition("ev", 0)])
    bad = Message(topic="ev", partition=0, offset=1, key=b"k" * 200_000, value=b"{" * 200_000, timestamp=(1, TS),
                  headers=[("h", b"x" * 60_000)])
    result = w.process_batch([message(0, 0, event_bytes("a"), b"a"), bad, message(0, 2, event_bytes("b"), b"b")])
    [(_, _, key, value, headers)] = w._producer.to("ev.dlq")
    assert (key, value, records.header(headers, records.H_REASON)) == (None, None, "too_large")
    assert records.header(headers, records.H_CLIPPED).startswith("key, value and the producer's headers dropped "
                                                                 "(key=200000, value=200000, headers=60011 bytes)")
    assert [k for _, _, k, _, _ in w._producer.to("rec")] == ["a", "b"] and w._consumer.commits == [[(0, 3)]]
    assert result.dead_lettered == 1
    w.stores.close_all()


def test_a_timestamp_in_seconds_past_the_float_range_is_a_bad_timestamp():
    with pytest.raises(EventError, match="bad_timestamp: timestamp is not finite"):
        parse_timestamp(1e308, "s")
    assert parse_timestamp(10**400, "s") == 10**403  # ints stay exact; the range check rejects them


@pytest.mark.parametrize("extra", ["1e400", "[-1e999]", '{"a": 1e400}'])
def test_a_number_beyond_a_floats_range_in_a_field_the_event_does_not_use_is_ignored_by_both_decoders(extra):
    iso = poison(timestamp='"2026-01-01T00:00:00Z"', extra=extra)  # not the typed decoder's shape
    for raw in (poison(extra=extra), iso):
        for decode in (decode_event, _decode_general):
            assert decode(raw).user_id == "a"


def test_poison_records_are_set_aside_with_their_reason_and_the_rest_of_the_batch_routes():
    msgs = [message(0, 0, event_bytes("a"), b"a")] + [message(0, 1 + i, p.values[0], b"a")
                                                      for i, p in enumerate(POISON_EVENTS)]
    msgs.append(message(0, len(msgs), event_bytes("b"), b"b"))
    routed = route(msgs)
    assert [exc.reason for _, exc in routed.dead] == [p.values[1] for p in POISON_EVENTS]
    assert [e.event.user_id for e in routed.events] == ["a", "b"]
    assert routed.next_offsets == {0: len(msgs)}


def test_a_record_the_decoder_fails_on_unexpectedly_is_dead_lettered_as_undecodable(monkeypatch, caplog):
    def decode(raw):
        if raw == b"trips a bug":
            raise ValueError("boom")
        return decode_event(raw)

    monkeypatch.setattr(worker, "decode_event", decode)
    routed = route([message(0, 0, b"trips a bug", b"a"), message(0, 1, event_bytes("a"), b"a")])
    assert [(m.offset(), exc.reason, exc.detail) for m, exc in routed.dead] == [(0, "undecodable", "ValueError: boom")]
    assert [e.offset for e in routed.events] == [1] and routed.next_offsets == {0: 2}
    assert "undecodable" in caplog.text


@pytest.mark.parametrize("settings, names", [
    ({"kafka_producer": {"linger.ms": "abc"}}, ["producer", "linger.ms", "queue.buffering.max.ms"]),
    ({"kafka_consumer": {"session.timeout.ms": "abc"}}, ["consumer", "session.timeout.ms"]),
])
def test_a_client_setting_librdkafka_refuses_stops_the_worker_start_with_a_config_error_naming_it(
        tmp_path, settings, names):
    registry = make_registry(tmp_path / "reg")
    s = WorkerSettings(bootstrap_servers="127.0.0.1:1", registry=str(registry), state_dir=str(tmp_path / "state"),
                       device="cpu", create_topics=False, follow_updates=False, follow_availability=False, **settings)
    w = Worker(s, recommender=Recommender.load(latest_version_dir(registry), "cpu"))
    try:
        with pytest.raises(ConfigError) as refused:  # `hrnn serve` exits 2 with this message, not a traceback
            w.start()
        assert all(name in str(refused.value) for name in names), str(refused.value)
        assert "abc" not in str(refused.value).split("settings given")[1]  # values may be secrets: names only
    finally:
        w.close()


class _RecordingWatcher:
    """Stands in for AnnouncementWatcher: keeps the arguments it was built with, reads nothing."""

    def __init__(self, built: list[dict]) -> None:
        self.built = built

    def __call__(self, bootstrap, topic, **kwargs) -> "_RecordingWatcher":
        self.built.append({"topic": topic, **kwargs})
        return self

    def start(self) -> "_RecordingWatcher":
        return self

    def stop(self) -> None:
        pass


def _start_and_close(tmp_path: Path, monkeypatch, **settings) -> list[dict]:
    """Start a worker (no broker: clients only connect lazily) and close it; the watchers it built."""
    import stream.announce

    built: list[dict] = []
    monkeypatch.setattr(stream.announce, "AnnouncementWatcher", _RecordingWatcher(built))
    registry = make_registry(tmp_path / "reg")
    s = WorkerSettings(bootstrap_servers="127.0.0.1:1", registry=str(registry), state_dir=str(tmp_path / "state"),
                       device="cpu", follow_availability=False, updates_topic="shop1.model-updates", **settings)
    w = Worker(s, recommender=Recommender.load(latest_version_dir(registry), "cpu"))
    try:
        w.start()
    finally:
        w.close()
    return built


def test_a_worker_that_may_not_create_topics_follows_announcements_without_creating_or_checking_them(
        tmp_path, monkeypatch):
    built = _start_and_close(tmp_path, monkeypatch, create_topics=False)
    assert [(b["topic"], b.get("create_topic", True)) for b in built] == [("shop1.model-updates", False)]


@pytest.mark.parametrize("registry_id", ["", "team-a"])
def test_a_worker_follows_the_announcements_of_the_registry_id_its_settings_name_else_of_its_registrys_path(
        tmp_path, monkeypatch, registry_id):
    """`hrnn models promote --registry-id team-a` (or a retrainer's) reaches workers set to the same key; without
    one, the key is the registry's absolute path, which hosts mounting it elsewhere must then share."""
    built = _start_and_close(tmp_path, monkeypatch, create_topics=False, registry_id=registry_id)
    assert [b["registry_id"] for b in built] == [registry_id or str((tmp_path / "reg").resolve())]


def test_serve_and_quality_take_the_registry_id_flag_into_the_workers_settings(tmp_path):
    import argparse

    from stream import cli_quality, cli_serve
    from stream.settings import load_settings

    for module in (cli_serve, cli_quality):
        parser = argparse.ArgumentParser()
        module.add_arguments(parser)
        args, _ = parser.parse_known_args(["--registry", str(tmp_path), "--state-dir", str(tmp_path),
                                           "--registry-id", "team-a"])
        assert load_settings(None, cli_serve.overrides_from(args), serving=False).registry_id == "team-a"


def test_a_worker_creates_and_checks_the_updates_topic_its_settings_name(tmp_path, monkeypatch):
    asked: list[str] = []
    monkeypatch.setattr(worker, "partition_counts", lambda admin: {})
    monkeypatch.setattr(worker, "ensure_topics", lambda admin, specs: asked.extend(s.name for s in specs))
    _start_and_close(tmp_path, monkeypatch, create_topics=True)
    assert "shop1.model-updates" in asked and "hrnn.model-updates" not in asked


# ---- reading the changelog back (a stub stands in for a broker that stalls mid-restore) --------------------------

class StallingChangelog:
    """Offsets 0..high-1 hold records. The first `first` come at once, then the fetches stay silent for `stall_s`
    (None: for good), then the rest comes. `ends_at` is the high watermark read again after the first read."""

    def __init__(self, high: int = 10, first: int = 3, stall_s: float | None = None, ends_at: int | None = None):
        self.high, self.first, self.stall_s, self.ends_at = high, first, stall_s, ends_at
        self.at, self.watermark_reads, self.stalled_at = -1001, 0, None

    def get_watermark_offsets(self, tp, timeout=None, cached=False):
        self.watermark_reads += 1
        return 0, self.high if self.watermark_reads == 1 or self.ends_at is None else self.ends_at

    def assign(self, tps):
        pass

    def unassign(self):
        pass

    def consume(self, num_messages=1, timeout=-1):
        time.sleep(timeout)
        if self.at < 0:
            self.at = self.first
            return [self._record(o) for o in range(self.first)]
        self.stalled_at = self.stalled_at or time.monotonic()
        if self.at >= self.high or self.stall_s is None or time.monotonic() - self.stalled_at < self.stall_s:
            return []
        rest, self.at = range(self.at, self.high), self.high
        return [self._record(o) for o in rest]

    def position(self, tps):
        return [TopicPartition("cl", 0, self.at)]

    @staticmethod
    def _record(offset: int) -> Message:
        return Message(topic="cl", partition=0, offset=offset, key=f"user-{offset}".encode(), value=b"state",
                       headers=records.changelog_headers(offset))


def read_back(changelog: StallingChangelog, timeout_s: float) -> list[int]:
    return [r.offset for r in worker.read_changelog(changelog, "cl", 0, 0, timeout_s)]


def test_a_restore_reads_every_record_through_a_stall_longer_than_the_idle_period(monkeypatch):
    monkeypatch.setattr(worker, "_RESTORE_IDLE_S", 0.2)
    assert read_back(StallingChangelog(stall_s=1.0), timeout_s=30) == list(range(10))


def test_a_restore_that_stays_silent_short_of_the_watermark_fails_at_its_deadline_naming_partition_and_offsets(
        monkeypatch):
    monkeypatch.setattr(worker, "_RESTORE_IDLE_S", 0.2)
    t0 = time.monotonic()
    with pytest.raises(worker.WorkerError, match=r"changelog cl\[0\] not caught up within 1 s \(at 3, end ~10\)"):
        read_back(StallingChangelog(stall_s=None), timeout_s=1)
    assert time.monotonic() - t0 < 5


def test_a_restore_silent_at_the_end_its_changelog_was_cut_back_to_ends_there(monkeypatch):
    monkeypatch.setattr(worker, "_RESTORE_IDLE_S", 0.2)
    t0 = time.monotonic()
    assert read_back(StallingChangelog(stall_s=None, ends_at=3), timeout_s=30) == [0, 1, 2]
    assert time.monotonic() - t0 < 5


INPUT_LOG, OTHER_INPUT_LOG = "01" * 16, "02" * 16  # the input topic's id, and another log's (a mirrored topic)


def test_an_event_with_a_copys_header_naming_a_later_record_of_its_partition_is_answered_and_copies_are_no_replays():
    """The reviewer's partition: 67 and 69 mis-keyed (key zz, user u10), 68 an event of u10 whose producer gave it
    the header of a copy of 69. A copy is written after its original, so 68 is an ordinary event, and the
    worker's copies of 67 and 69 are first copies, applied and answered."""
    spoof = [(records.H_REPARTITIONED_FROM, b"ev/0/69")]
    first = route([message(0, 67, event_bytes("u10"), b"zz"),
                   Message(topic="ev", partition=0, offset=68, key=b"u10", value=event_bytes("u10"),
                           timestamp=(1, TS), headers=spoof),
                   message(0, 69, event_bytes("u10"), b"zz")])  # the offset rule holds without a topic id too
    assert [(e.offset, e.origin) for e in first.events] == [(68, None)]
    assert [m.offset() for m, _ in first.rekey] == [67, 69]
    origins = {e.origin[0]: e.origin[1] for e in first.events if e.origin is not None}  # what the state records
    copies = [Message(topic="ev", partition=0, offset=70 + i, key=b"u10", value=m.value(), timestamp=(1, TS),
                      headers=worker._rekeyed_headers(m, INPUT_LOG)) for i, (m, _) in enumerate(first.rekey)]
    second = route(copies, input_log=INPUT_LOG)
    assert [e.origin for e in second.events] == [(0, 67), (0, 69)]
    z = np.zeros(4, dtype=np.float32)
    stored = {"u10": UserState("v", z, z, "s", TS, 1, [], source_offset=68, origins=origins)}
    assert [e.offset for e in fresh_events(second.events, stored)] == [70, 71]


def test_a_copys_header_is_the_workers_only_for_this_input_log_and_an_earlier_record_of_its_own_partition():
    def origin(headers, partition: int = 1, offset: int = 5) -> tuple[int, int] | None:
        msg = Message(topic="ev", partition=partition, offset=offset, key=b"a", value=event_bytes("a"),
                      timestamp=(1, TS), headers=headers)
        return route([msg], input_log=INPUT_LOG).events[0].origin
    assert origin(records.repartition_headers("ev", 0, 9, INPUT_LOG)) == (0, 9)
    assert origin(records.repartition_headers("ev", 0, 9, OTHER_INPUT_LOG)) is None  # a mirrored topic's copy
    assert origin(records.repartition_headers("ev", 1, 4, INPUT_LOG)) == (1, 4)
    assert origin(records.repartition_headers("ev", 1, 5, INPUT_LOG)) is None  # itself
    assert origin(records.repartition_headers("ev", 1, 6, INPUT_LOG)) is None  # a later record
    old_build = lambda p, o: [(records.H_REPARTITIONED_FROM, f"ev/{p}/{o}".encode())]  # noqa: E731 (no log header)
    assert (origin(old_build(0, 9)), origin(old_build(1, 4)), origin(old_build(1, 6))) == ((0, 9), (1, 4), None)


def test_a_re_keyed_copy_names_the_input_log_and_drops_a_producers_headers_of_those_names():
    forged = [("traceparent", b"t"), (records.H_REPARTITIONED_FROM, b"ev/3/1"),
              (records.H_REPARTITIONED_LOG, OTHER_INPUT_LOG.encode())]
    msg = Message(topic="ev", partition=0, offset=7, key=b"zz", value=event_bytes("a"), timestamp=(1, TS),
                  headers=forged)
    for log, named in ((INPUT_LOG, INPUT_LOG), (None, None)):
        headers = worker._rekeyed_headers(msg, log)
        assert records.header(headers, "traceparent") == "t"
        assert records.header(headers, records.H_REPARTITIONED_FROM) == "ev/0/7"
        assert (records.header(headers, records.H_REPARTITIONED_LOG) or None) == named
        assert [k for k, _ in headers].count(records.H_REPARTITIONED_LOG) == 1
