"""The streaming worker against the real local broker and real RocksDB files.

One module-scoped run streams a mixed input (valid events, invalid records, mis-keyed records)
through a worker; the tests below each check one promise about what came out of it.
"""
from __future__ import annotations

import json
from collections import Counter, defaultdict

import pytest

from model.artifact import latest_version_dir
from model.events import Event, decode_event, encode_event
from model.inference import Filters
from stream import records
from stream.audit import audit_worker
from stream.kafka_clients import admin_client, partition_for, topic_id
from worker_testkit import (make_events, make_registry, offline, produce, records_of, recommendations, running,
                            same_state, settings_for, stored_states, wait_until)

pytestmark = pytest.mark.broker

N_VALID = 600
N_USERS = 40
PARTITIONS = 3
INVALID = [  # (key, value, reason)
    (b"user-1", b"{not json", "bad_json"),
    (b"user-2", b'{"user_id": "user-2", "event_type": "click", "timestamp": 1767225600000}', "missing_field"),
    (b"user-3", b'{"user_id": "user-3", "item_id": "item-1", "event_type": "click", "timestamp": 12}',
     "bad_timestamp"),
    (b"user-4", b"[1, 2, 3]", "not_an_object"),
    (b"user-5", None, "empty_value"),
    # past Kafka's 1 MB record limit: its dead letter failed the batch on every restart, stopping the partition
    (b"user-6", b"x" * 1_100_000, "too_large"),
    (b"user-7", b'{"user_id": "user-7", "item_id": "' + b"i" * 300 + b'", "event_type": "click", '
                b'"timestamp": 1767225600000}', "bad_field"),  # ids are bounded, so states and outputs are
    (b"user-8", b'{"user_id": "user-8", "item_id": "item-1", "event_type": "click", "timestamp": 1767225600000, '
                b'"session_id": {"a": 1}}', "bad_field"),  # not the text "{'a': 1}"
    # far ahead of the record's time: the user's sessions would never time out again
    (b"user-9", b'{"user_id": "user-9", "item_id": "item-1", "event_type": "click", "timestamp": 7258000000000}',
     "bad_timestamp"),
]
TRACE = [("traceparent", b"00-4bf92f3577b34da6a3ce929d0e0e4736-00f067aa0ba902b7-01")]


@pytest.fixture(scope="module")
def registry(tmp_path_factory):
    return make_registry(tmp_path_factory.mktemp("registry"))


@pytest.fixture(scope="module")
def streamed(broker, registry, tmp_path_factory):
    """Stream the mixed input through one worker and collect everything it wrote."""
    settings = settings_for(broker.bootstrap, registry, tmp_path_factory.mktemp("state"), partitions=PARTITIONS,
                            batch_size=64)
    events = make_events(N_VALID, N_USERS, unknown_every=37, session_ids=True)  # the worker follows the clients
    keyed, miskeyed = events[:-8], events[-8:]
    wrong_keys = [None, b"someone-else"] * 4
    with running(settings) as worker:
        produce(broker.bootstrap, settings.input_topic, keyed)
        produce(broker.bootstrap, settings.input_topic, [(k, v) for k, v, _ in INVALID], partition=0, headers=TRACE,
                config={"message.max.bytes": 2_000_000})
        produce(broker.bootstrap, settings.input_topic,
                [(k, encode_event(e)) for k, e in zip(wrong_keys, miskeyed)], partition=1, headers=TRACE)
        recs = recommendations(broker.bootstrap, settings.output_topic, N_VALID)
        totals = worker.totals
        metrics = worker.metrics
    inputs = records_of(broker.bootstrap, settings.input_topic)
    return dict(settings=settings, version=latest_version_dir(registry).name, events=events, miskeyed=miskeyed,
                recs=recs, totals=totals, metrics=metrics, stopped=worker,
                inputs=inputs, dlq=records_of(broker.bootstrap, settings.dlq_topic),
                states=stored_states(settings, range(PARTITIONS)))


def test_a_stopped_worker_holds_no_kafka_client(streamed):
    """A client kept alive goes on trying the bootstrap servers (logging each failure once the broker is gone)."""
    w = streamed["stopped"]
    assert (w._admin, w._producer, w._consumer, w._restorer, w.availability) == (None,) * 5


def processed_inputs(streamed) -> list[tuple[int, int, Event]]:
    """(partition, offset, event) of every input record the worker should have recommended for."""
    out = []
    for r in streamed["inputs"]:
        try:
            e = decode_event(r.value)
        except Exception:
            continue
        if e.timestamp_ms > r.timestamp_ms + streamed["settings"].max_event_lead_s * 1000:
            continue  # dead-lettered: far ahead of its record
        if r.key == e.user_id.encode():
            out.append((r.partition, r.offset, e))
    return sorted(out, key=lambda t: (t[0], t[1]))


def test_every_valid_event_gets_exactly_one_recommendation_naming_its_source_offset(streamed):
    expected = {(p, o): e for p, o, e in processed_inputs(streamed)}
    got = Counter((r["source_partition"], r["source_offset"]) for r in streamed["recs"])
    assert len(expected) == N_VALID
    assert set(got) == set(expected) and max(got.values()) == 1
    for r in streamed["recs"]:
        e = expected[(r["source_partition"], r["source_offset"])]
        assert (r["user_id"], r["event_id"], r["event_timestamp"]) == (e.user_id, e.event_id, e.timestamp_ms)
        assert len(r["items"]) == 25 and r["emitted_at"] > 0 and r["session_id"]
        assert r["model_version"] == streamed["version"]


def test_the_audit_finds_every_committed_input_record_answered_by_its_kind(streamed):
    report = audit_worker(streamed["settings"], idle_s=1.5)
    assert report.kept and report.foreign_records == 0
    assert report.to_dict()["totals"] == {  # the drained worker committed every input record
        "records": len(streamed["inputs"]), "recommended": N_VALID, "dead_letters": len(INVALID),
        "rekeyed": len(streamed["miskeyed"]), "copies_again": 0, "unanswered": 0, "duplicated": 0, "lag": 0}


@pytest.fixture(scope="module")
def input_log(broker, streamed) -> str:
    """The input topic's id, as the broker gives it."""
    return topic_id(admin_client(broker.bootstrap), streamed["settings"].input_topic)


def test_recommendation_values_follow_the_output_contract(streamed, input_log):
    keys = {"user_id", "items", "model_version", "session_id", "event_id", "source_partition", "source_offset",
            "event_timestamp", "emitted_at", "source_topic", "source_log"}
    for r in streamed["recs"][:50]:
        assert set(r) == keys
        assert (r["source_topic"], r["source_log"]) == (streamed["settings"].input_topic, input_log)
        assert all(set(i) == {"item_id", "score"} for i in r["items"])
        scores = [i["score"] for i in r["items"]]
        assert scores == sorted(scores, reverse=True)


def test_invalid_records_go_to_the_dead_letter_topic_with_reason_and_source(streamed, input_log):
    dlq = streamed["dlq"]
    assert len(dlq) == len(INVALID)
    inputs = {(r.partition, r.offset): r for r in streamed["inputs"]}
    for rec, (key, value, reason) in zip(sorted(dlq, key=lambda r: r.offset), INVALID):
        clipped = value is not None and len(value) > records.DLQ_MAX_PART_BYTES
        assert (rec.key, rec.value) == (key, value[:records.DLQ_MAX_PART_BYTES] if clipped else value)
        assert (records.header(rec.headers, records.H_CLIPPED) is not None) == clipped
        assert records.header(rec.headers, records.H_REASON) == reason
        assert records.header(rec.headers, "traceparent") == TRACE[0][1].decode()  # the producer's headers stay
        assert records.header(rec.headers, records.H_DETAIL)
        src = (int(records.header(rec.headers, records.H_SOURCE_PARTITION)),
               int(records.header(rec.headers, records.H_SOURCE_OFFSET)))
        assert inputs[src].value == value and src[0] == 0
        assert records.header(rec.headers, records.H_SOURCE_TOPIC) == streamed["settings"].input_topic
        assert records.header(rec.headers, records.H_SOURCE_LOG) == input_log
    assert streamed["totals"].dead_lettered == len(INVALID)


def test_mis_keyed_records_are_repartitioned_and_land_with_their_users_state(streamed):
    rekeyed = [r for r in streamed["inputs"] if records.header(r.headers, records.H_REPARTITIONED_FROM)]
    inputs = {(r.partition, r.offset): r for r in streamed["inputs"]}
    assert len(rekeyed) == len(streamed["miskeyed"]) == streamed["totals"].repartitioned
    home = {}  # user -> the partition its correctly keyed events use
    for p, _, e in processed_inputs(streamed):
        if e.event_id not in {m.event_id for m in streamed["miskeyed"]}:
            home.setdefault(e.user_id, p)
    recs = {(r["source_partition"], r["source_offset"]): r for r in streamed["recs"]}
    for r in rekeyed:
        e = decode_event(r.value)
        assert r.key == e.user_id.encode()
        assert r.partition == home.get(e.user_id, r.partition)
        assert records.header(r.headers, records.H_REPARTITIONED_FROM).startswith(
            f"{streamed['settings'].input_topic}/1/")
        assert recs[(r.partition, r.offset)]["event_id"] == e.event_id
        source = inputs[tuple(int(x) for x in records.header(r.headers, records.H_REPARTITIONED_FROM).split("/")[1:])]
        assert r.timestamp_ms == source.timestamp_ms  # latency counts from the event, not from the re-key
        assert records.header(r.headers, "traceparent") == TRACE[0][1].decode()
    per_user = Counter(e.user_id for e in streamed["events"])
    assert {u: s.n_events for u, s in streamed["states"].items()} == dict(per_user)


def test_streamed_recommendations_equal_the_offline_inference_apis(streamed, registry):
    ordered = processed_inputs(streamed)
    items, states = offline(registry, [e for _, _, e in ordered])
    recs = {(r["source_partition"], r["source_offset"]): r for r in streamed["recs"]}
    differing = 0
    for (p, o, _), want in zip(ordered, items):
        got = recs[(p, o)]["items"]
        assert [g["score"] for g in got] == pytest.approx([s for _, s in want], abs=1e-5)
        differing += [g["item_id"] for g in got] != [i for i, _ in want]
    assert differing <= len(ordered) // 100  # only exact score ties may swap places
    assert set(states) == set(streamed["states"])
    assert all(same_state(streamed["states"][u], s) for u, s in states.items())


def test_recommendations_leave_out_items_the_user_purchased(streamed, registry):
    ordered = processed_inputs(streamed)
    unfiltered, _ = offline(registry, [e for _, _, e in ordered], filters=Filters(exclude_purchased=False))
    recs = {(r["source_partition"], r["source_offset"]): r for r in streamed["recs"]}
    purchased: dict[str, set[str]] = defaultdict(set)
    would_have_shown = 0
    for (p, o, e), plain in zip(ordered, unfiltered):
        if e.event_type == "purchase":
            purchased[e.user_id].add(e.item_id)
        shown = {i["item_id"] for i in recs[(p, o)]["items"]}
        assert not shown & purchased[e.user_id]
        would_have_shown += bool({i for i, _ in plain} & purchased[e.user_id])
    assert would_have_shown > 0  # the filter had something to do


def test_unknown_items_advance_bookkeeping_and_are_counted(streamed):
    unknown = sum(1 for e in streamed["events"] if e.item_id.startswith("new-item-"))
    assert unknown > 0 and streamed["totals"].unknown_items == unknown
    assert streamed["metrics"].value("hrnn_unknown_items_total") == unknown


def test_metrics_count_records_recommendations_and_dead_letters(streamed):
    m, t = streamed["metrics"], streamed["totals"]
    assert m.value("hrnn_events_in_total") == t.records == N_VALID + len(INVALID) + len(streamed["miskeyed"])
    assert m.value("hrnn_recommendations_out_total") == N_VALID
    assert m.value("hrnn_repartitioned_total") == len(streamed["miskeyed"])
    for reason, n in Counter(reason for _, _, reason in INVALID).items():
        assert m.value("hrnn_dlq_total", {"reason": reason}) == n
    assert m.value("hrnn_batch_size_count") == t.batches > 1


def test_the_changelog_holds_one_record_per_touched_user_per_batch_on_the_source_partition(streamed, broker):
    settings = streamed["settings"]
    log = records_of(broker.bootstrap, settings.changelog_topic)
    assert len(log) == streamed["totals"].users
    home = {e.user_id: p for p, _, e in processed_inputs(streamed)}
    last = {}
    for r in log:
        user = r.key.decode()
        assert r.partition == home[user]
        last[user] = r
    assert all(records.source_offset_of(r.headers) == streamed["states"][u].source_offset for u, r in last.items())
    assert json.dumps(sorted(last)) == json.dumps(sorted(streamed["states"]))


def test_re_keyed_copies_follow_the_producers_partitioner_when_the_worker_is_given_it(broker, registry, tmp_path):
    """Producers on librdkafka's default partitioner (CRC32) put a user's keyed events elsewhere than murmur2
    would; with the same partitioner in the worker's kafka_producer table, a mis-keyed event's copy joins them."""
    crc32 = {"partitioner": "consistent_random"}
    settings = settings_for(broker.bootstrap, registry, tmp_path, kafka_producer=crc32)
    events = make_events(60, 6, purchase_every=0)
    keyed = [e for e in events if e.event_id != "e59"]
    last = events[-1]
    with running(settings):
        produce(broker.bootstrap, settings.input_topic, keyed, config=crc32)
        recommendations(broker.bootstrap, settings.output_topic, len(keyed))
        produce(broker.bootstrap, settings.input_topic, [(None, encode_event(last))], partition=1)
        recommendations(broker.bootstrap, settings.output_topic, len(events))
    inputs = records_of(broker.bootstrap, settings.input_topic)
    home = {decode_event(r.value).user_id: r.partition for r in inputs if r.key is not None
            and not records.header(r.headers, records.H_REPARTITIONED_FROM)}
    murmur2_elsewhere = {u for u, p in home.items() if partition_for(u.encode(), settings.partitions) != p}
    assert murmur2_elsewhere  # the two partitioners disagree on some of these users
    [copy] = [r for r in inputs if records.header(r.headers, records.H_REPARTITIONED_FROM)]
    assert copy.partition == home[last.user_id]
    per_user = Counter(e.user_id for e in events)
    assert {u: s.n_events for u, s in stored_states(settings, range(settings.partitions)).items()} == dict(per_user)


def test_records_whose_dead_letter_or_re_keyed_copy_would_pass_the_record_limit_by_their_headers_are_dead_lettered(
        broker, registry, tmp_path):
    """A record near the broker's limit (accepted) with large producer headers: carried whole, its dead letter or
    re-keyed copy was refused by produce() and failed its batch on every restart, stopping the partition."""
    settings = settings_for(broker.bootstrap, registry, tmp_path, partitions=1)
    good = make_events(2, 2, purchase_every=0)
    miskeyed = Event("user-9", "item-3", "click", good[0].timestamp_ms, event_id="mis")
    big = [("traceparent", TRACE[0][1]), ("trace", b"t" * 1_010_000)]
    with running(settings) as worker:
        produce(broker.bootstrap, settings.input_topic, good[:1])
        produce(broker.bootstrap, settings.input_topic,
                [(b"user-2", b"{not json"), (b"wrong", encode_event(miskeyed))], headers=big,
                config={"message.max.bytes": 2_000_000})
        produce(broker.bootstrap, settings.input_topic, good[1:])
        recs = recommendations(broker.bootstrap, settings.output_topic, 2)
    assert [r["source_offset"] for r in recs] == [0, 3]  # the partition went on past both
    assert worker.totals.dead_lettered == 2 and worker.totals.repartitioned == 0
    dlq = sorted(records_of(broker.bootstrap, settings.dlq_topic), key=lambda r: r.offset)
    assert [(records.header(r.headers, records.H_REASON), records.header(r.headers, records.H_SOURCE_OFFSET))
            for r in dlq] == [("bad_json", "1"), ("too_large", "2")]
    for r in dlq:
        assert records.header(r.headers, "trace") is None and records.header(r.headers, "traceparent") is None
        assert "the producer's headers (1010" in records.header(r.headers, records.H_CLIPPED)
    assert "re-keyed copy would have" in records.header(dlq[1].headers, records.H_DETAIL)
    assert dlq[1].value == encode_event(miskeyed)


def test_every_assigned_partition_reports_its_lag_even_before_a_record_arrives_on_it(broker, tmp_path):
    """An idle partition, never committed or caught up before a restart, reports 0, not nothing: a missing series
    reads as a missing worker to an alert on absent lag."""
    registry = make_registry(tmp_path / "registry", seed=3)
    settings = settings_for(broker.bootstrap, registry, tmp_path / "state", partitions=2, batch_size=20)
    events = make_events(40, 8, seed=4)

    def lags(worker) -> list:
        return [worker.metrics.value("hrnn_consumer_lag", {"partition": str(p)}) for p in range(2)]

    with running(settings) as worker:  # nothing produced yet: both partitions never committed
        wait_until(lambda: lags(worker) == [0, 0], 30, message="a lag of 0 on both idle partitions")
        produce(broker.bootstrap, settings.input_topic, events)
        recommendations(broker.bootstrap, settings.output_topic, len(events))
    with running(settings) as worker:  # restarted caught up: no record to read, the committed offset is the end
        wait_until(lambda: lags(worker) == [0, 0], 30, message="a lag of 0 on both caught-up partitions")
