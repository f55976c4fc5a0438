"""Items taken off sale: the availability topic's records, following it, `hrnn items`, and the
worker leaving those items out from the next batch on, also after a restart."""
from __future__ import annotations

import json
import subprocess
import sys
import time
import uuid
from collections import Counter
from pathlib import Path

import pytest

from model.events import MAX_ID_CHARS
from stream.availability import AvailabilityError, AvailabilityReader, decode_status, set_availability
from stream.kafka_clients import KafkaClientError, create_producer, produce_acknowledged
from stream.worker import WorkerError
from worker_testkit import (make_events, make_registry, produce, recommendations, records_of, running, settings_for,
                            wait_until)

HRNN = str(Path(sys.executable).with_name("hrnn"))
# valid JSON nested past any decoder's recursion limit: what one careless (or hostile) producer can write
DEEP = b'{"available": false, "x": ' + b"[" * 100_000 + b"]" * 100_000 + b"}"


def test_a_status_decodes_and_a_tombstone_puts_the_item_back():
    item, status = decode_status(b"sku-1", b'{"available": false, "reason": "out of stock", "updated_at": 5}')
    assert (item, status.available, status.reason, status.updated_at) == ("sku-1", False, "out of stock", 5)
    assert decode_status(b"sku-1", None)[1].available
    assert decode_status(b"sku-1", b'{"available": true, "warehouse": "b"}')[1].available  # unknown fields pass


@pytest.mark.parametrize("key, value, says", [
    (None, b'{"available": false}', "item id as its key"),
    (b"\xff\xfe", b'{"available": false}', "not UTF-8"),
    (b"sku-1", b"off", "is not"),
    (b"sku-1", b'{"reason": "gone"}', "available"),
    (b"sku-1", b'{"available": "no"}', "available"),
    (b"sku-1", DEEP, "RecursionError"),
])
def test_a_record_that_is_not_a_status_is_a_typed_error_naming_the_fault(key, value, says):
    with pytest.raises(AvailabilityError, match=says):
        decode_status(key, value)


def test_writing_no_or_empty_item_ids_is_refused_before_the_broker_is_asked():
    for items in ([], ["sku-1", ""]):
        with pytest.raises(AvailabilityError, match="at least one item id"):
            set_availability("127.0.0.1:1", items, available=False)


def test_an_item_id_no_event_could_carry_is_refused_before_the_broker_is_asked():
    with pytest.raises(AvailabilityError, match=f"more than the {MAX_ID_CHARS}"):
        set_availability("127.0.0.1:1", ["sku-1", "x" * (MAX_ID_CHARS + 1)], available=False)


@pytest.mark.parametrize("items, reason, says", [
    (["sku-1"], "recalled \udcff batch", r"reason b'recalled \\xff batch' is not UTF-8"),
    (["sku-1", "sku-\udcff"], None, r"item id b'sku-\\xff' is not UTF-8"),
])
def test_text_that_is_not_utf8_is_refused_before_the_topic_is_made_or_anything_produced(monkeypatch, items, reason,
                                                                                        says):
    """A --reason typed in a Latin-1 terminal arrives as lone surrogates: a typed error, not a UnicodeEncodeError."""
    import stream.availability as av

    touched = []
    monkeypatch.setattr(av, "ensure_table_topic", lambda *a, **k: touched.append("topic"))
    monkeypatch.setattr(av, "create_producer", lambda *a, **k: touched.append("producer"))
    with pytest.raises(AvailabilityError, match=says):
        set_availability("127.0.0.1:1", items, available=False, reason=reason)
    assert touched == []


def test_waiting_for_a_reader_that_failed_ends_at_once_not_at_the_deadline():
    reader = AvailabilityReader("127.0.0.1:1", "never-read")  # not started: only its failure is set
    reader.error = KafkaClientError("reading 'never-read' failed: gone")
    t0 = time.monotonic()
    assert reader.wait_caught_up(30) is False and time.monotonic() - t0 < 2


@pytest.mark.broker
def test_a_reader_holds_what_was_on_the_topic_then_follows_changes_and_skips_bad_records(broker):
    topic = f"avail-{uuid.uuid4().hex[:8]}"
    set_availability(broker.bootstrap, ["a", "b", "c"], available=False, reason="recalled", topic=topic)
    set_availability(broker.bootstrap, ["c"], available=True, topic=topic)
    with AvailabilityReader(broker.bootstrap, topic, poll_timeout_s=0.1) as reader:
        assert reader.wait_caught_up(30)
        assert reader.unavailable == {"a", "b"} and reader.reasons() == {"a": "recalled", "b": "recalled"}
        held = reader.unavailable
        producer = create_producer(broker.bootstrap)
        producer.produce(topic, key=b"a", value=b"not json", partition=0)  # a's status stays as it was
        producer.flush(10)
        set_availability(broker.bootstrap, ["a"], available=True, topic=topic)
        set_availability(broker.bootstrap, ["d"], available=False, topic=topic)
        wait_until(lambda: reader.unavailable == {"b", "d"}, 30, message="the reader following the changes")
        assert reader.malformed == 1 and reader.reasons()["d"] is None
        assert held == {"a", "b"}  # a set handed out is never changed afterwards
        assert reader.error is None


@pytest.mark.broker
def test_a_deeply_nested_record_is_skipped_and_the_reader_goes_on(broker):
    topic = f"avail-{uuid.uuid4().hex[:8]}"
    set_availability(broker.bootstrap, ["before"], available=False, topic=topic)
    assert produce_acknowledged(create_producer(broker.bootstrap), topic, [(b"deep", DEEP)]) is None
    set_availability(broker.bootstrap, ["after"], available=False, topic=topic)
    with AvailabilityReader(broker.bootstrap, topic, poll_timeout_s=0.1) as reader:
        assert reader.wait_caught_up(30), reader.error
        assert reader.unavailable == {"before", "after"} and reader.malformed == 1 and reader.error is None


@pytest.mark.broker
def test_items_cli_takes_items_off_sale_lists_them_and_puts_them_back(broker, tmp_path):
    topic = f"avail-{uuid.uuid4().hex[:8]}"
    base = ["--bootstrap-servers", broker.bootstrap, "--topic", topic]

    def hrnn(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([HRNN, "items", *args, *base], capture_output=True, text=True, timeout=90)

    listing = tmp_path / "items.txt"
    listing.write_bytes("\ufeffsku-2\n\nsku-3\n".encode())  # a byte-order mark, as Excel and Notepad write
    off = hrnn("unavailable", "sku-1", "--from-file", str(listing), "--reason", "out of stock")
    assert off.returncode == 0 and "3 item(s) taken off sale" in off.stdout, off.stderr
    assert hrnn("available", "sku-2").returncode == 0
    shown = hrnn("list", "--json")
    assert shown.returncode == 0, shown.stderr
    assert json.loads(shown.stdout) == {"sku-1": "out of stock", "sku-3": "out of stock"}
    missing = hrnn("unavailable", "--from-file", str(tmp_path / "none.txt"))
    assert missing.returncode != 0 and "no such file" in missing.stderr
    (tmp_path / "latin1.txt").write_bytes("sku-\xe9\n".encode("latin-1"))
    binary = hrnn("unavailable", "--from-file", str(tmp_path / "latin1.txt"))
    assert binary.returncode == 2 and "not UTF-8 text" in binary.stderr and "Traceback" not in binary.stderr


@pytest.mark.broker
def test_a_worker_leaves_out_items_off_sale_from_the_next_batch_and_after_a_restart(broker, tmp_path):
    settings = settings_for(broker.bootstrap, make_registry(tmp_path / "reg"), tmp_path / "state", partitions=2,
                            exclude_purchased=False)
    events = make_events(160, 12, seed=5, purchase_every=0)
    batches = [events[i:i + 40] for i in range(0, 160, 40)]
    served = 0

    def serve(batch: list) -> list[set[str]]:
        """The item lists recommended for `batch`'s events (found by event id: partitions interleave)."""
        nonlocal served
        produce(broker.bootstrap, settings.input_topic, batch)
        served += len(batch)
        ids = {e.event_id for e in batch}
        lists = [{i["item_id"] for i in r["items"]}
                 for r in recommendations(broker.bootstrap, settings.output_topic, served) if r["event_id"] in ids]
        assert len(lists) == len(batch)
        return lists

    with running(settings) as worker:
        shown = Counter(i for items in serve(batches[0]) for i in items)
        off = [i for i, _ in shown.most_common(3)]  # the items this model recommends most
        set_availability(broker.bootstrap, off, available=False, topic=settings.availability_topic)
        wait_until(lambda: worker.availability.unavailable == set(off), 30, message="the worker's reader")
        assert all(not items & set(off) for items in serve(batches[1]))
        assert worker.metrics.value("hrnn_unavailable_items") == 3
    with running(settings) as worker:  # a restarted worker reads the topic whole before its first batch
        assert all(not items & set(off) for items in serve(batches[2]))
        set_availability(broker.bootstrap, off[:1], available=True, topic=settings.availability_topic)
        wait_until(lambda: worker.availability.unavailable == set(off[1:]), 30, message="the worker's reader")
        lists = serve(batches[3])
        assert any(off[0] in items for items in lists)  # back on sale: recommended again
        assert all(not items & set(off[1:]) for items in lists)


@pytest.mark.broker
def test_a_worker_whose_availability_reader_failed_stops_with_the_reason_instead_of_serving(broker, tmp_path):
    settings = settings_for(broker.bootstrap, make_registry(tmp_path / "reg"), tmp_path / "state", partitions=1)
    with pytest.raises(WorkerError, match="following the availability topic"):
        with running(settings) as worker:
            worker.availability.error = KafkaClientError("reading failed: gone")  # as its thread records one
            produce(broker.bootstrap, settings.input_topic, make_events(3, 2))
            wait_until(lambda: not worker.health.alive, 30, message="the worker stopping")
    assert records_of(broker.bootstrap, settings.output_topic) == []  # nothing served with a stale list
