"""The table-topic reader's own rules, against a fake consumer: when a topic counts as read to its end,
and that no single record can stop a reader."""
from __future__ import annotations

import logging
import time

import pytest
from confluent_kafka import KafkaError, KafkaException

import stream.compacted
from stream.compacted import CATCH_UP_IDLE_S, CompactedTopicReader


class _Msg:
    def __init__(self, offset: int, value: bytes) -> None:
        self._offset, self._value = offset, value

    def error(self):
        return None

    def key(self) -> bytes:
        return b"k"

    def value(self) -> bytes:
        return self._value

    def offset(self) -> int:
        return self._offset


class _FakeConsumer:
    """Answers the watermarks given and hands out `records` in one consume, then nothing."""

    def __init__(self, low: int, high: int, records: list[_Msg]) -> None:
        self.watermarks, self.pending = (low, high), list(records)

    def assign(self, partitions) -> None:
        pass

    def get_watermark_offsets(self, partition, timeout: float, cached: bool) -> tuple[int, int]:
        return self.watermarks

    def consume(self, num_messages: int, timeout: float) -> list[_Msg]:
        batch, self.pending = self.pending, []
        if not batch:
            time.sleep(0.01)  # as a real consume would wait; keeps the reader's loop from spinning
        return batch

    def close(self) -> None:
        pass


class _Recorder(CompactedTopicReader):
    """Keeps the offsets it took; a value of b"poison" fails as a decoder would on deeply nested JSON."""

    def __init__(self) -> None:
        super().__init__("fake:9092", "table", poll_timeout_s=0.01, create_topic=False)
        self.taken: list[int] = []

    def _take(self, key, value, offset) -> None:
        if value == b"poison":
            raise RecursionError("maximum recursion depth exceeded while deserializing an object")
        self.taken.append(offset)


def _reading(monkeypatch, consumer: _FakeConsumer) -> _Recorder:
    monkeypatch.setattr(stream.compacted, "reader_consumer", lambda bootstrap, extra=None: consumer)
    return _Recorder()


def test_a_topic_whose_records_were_all_removed_is_caught_up_at_once(monkeypatch):
    # compaction or retention removed every record: low == high > 0, and no fetch will ever return one
    with _reading(monkeypatch, _FakeConsumer(7, 7, [])) as reader:
        assert reader.wait_caught_up(CATCH_UP_IDLE_S / 3)  # not after the idle wait meant for a lost record
        assert reader.taken == [] and reader.error is None


def test_a_record_whose_take_fails_is_counted_logged_and_skipped_and_the_reader_goes_on(monkeypatch, caplog):
    records = [_Msg(0, b"good"), _Msg(1, b"poison"), _Msg(2, b"good")]
    with caplog.at_level(logging.ERROR, logger="stream.compacted"):
        with _reading(monkeypatch, _FakeConsumer(0, 3, records)) as reader:
            assert reader.wait_caught_up(5)
            assert reader.taken == [0, 2] and reader.malformed == 1 and reader.error is None
    (logged,) = [r for r in caplog.records if "could not be taken" in r.getMessage()]
    assert "RecursionError" in logged.getMessage() and (logged.topic, logged.offset) == ("table", 1)


@pytest.mark.parametrize("low, high", [(0, 0), (-1001, 0)])  # -1001: a low watermark the client does not know
def test_a_topic_never_written_is_caught_up_at_once(monkeypatch, low, high):
    with _reading(monkeypatch, _FakeConsumer(low, high, [])) as reader:
        assert reader.wait_caught_up(CATCH_UP_IDLE_S / 3)


class _UnansweredConsumer(_FakeConsumer):
    """Cannot read the offsets (a topic not created yet, a broker restarting) for the first `failures` tries."""

    def __init__(self, failures: int) -> None:
        super().__init__(0, 1, [_Msg(0, b"good")])
        self.failures = failures

    def get_watermark_offsets(self, partition, timeout: float, cached: bool) -> tuple[int, int]:
        if self.failures > 0:
            self.failures -= 1
            raise KafkaException(KafkaError(KafkaError._UNKNOWN_PARTITION))
        return self.watermarks


def test_a_reader_that_cannot_read_the_offsets_keeps_trying_says_so_and_then_reads_the_topic(monkeypatch, caplog):
    monkeypatch.setattr(stream.compacted, "_WATERMARK_WAIT_S", 0.3, raising=False)  # where a reader gave up
    monkeypatch.setattr(stream.compacted, "_WATERMARK_RETRY_MAX_S", 0.2, raising=False)
    with caplog.at_level(logging.WARNING, logger="stream.compacted"):
        with _reading(monkeypatch, _UnansweredConsumer(failures=8)) as reader:
            assert reader.wait_caught_up(10), reader.error
            assert reader.taken == [0] and reader.error is None
    assert any("cannot read the offsets of table" in r.getMessage() for r in caplog.records)


def test_a_reader_stopped_while_waiting_for_the_offsets_ends_without_an_error(monkeypatch):
    reader = _reading(monkeypatch, _UnansweredConsumer(failures=10**9)).start()
    time.sleep(0.5)
    reader.stop()
    assert not reader._thread.is_alive() and reader.error is None and not reader.caught_up


class _FeedConsumer(_FakeConsumer):
    """Hands out `batches` one per consume, then one new record on every consume (a topic written to steadily)."""

    def __init__(self, high: int, batches: list[list[_Msg]]) -> None:
        super().__init__(0, high, [])
        self.batches, self.next_offset = list(batches), sum(len(b) for b in batches)

    def consume(self, num_messages: int, timeout: float) -> list[_Msg]:
        assert num_messages == getattr(stream.compacted, "_POLL_RECORDS", 100)
        if self.batches:
            return self.batches.pop(0)
        time.sleep(0.01)
        self.next_offset += 1
        return [_Msg(self.next_offset - 1, b"good")]


def test_a_topic_written_to_on_every_poll_is_caught_up_once_what_was_there_at_start_is_held(monkeypatch):
    """An availability feed writing a few statuses a second never lets a consume come back empty."""
    with _reading(monkeypatch, _FeedConsumer(5, [[_Msg(k, b"good") for k in range(5)]])) as reader:
        assert reader.wait_caught_up(CATCH_UP_IDLE_S / 3)
        assert reader.taken[:5] == [0, 1, 2, 3, 4]


def test_a_full_consume_reaching_the_watermark_is_not_the_end_of_its_record_batch(monkeypatch):
    """Tansu's watermark is the last batch's base offset + 1: a consume that filled up there may have left the
    rest of that batch for the next consume."""
    full = getattr(stream.compacted, "_POLL_RECORDS", 100)
    consumer = _FeedConsumer(full, [[_Msg(k, b"good") for k in range(full)],
                                    [_Msg(k, b"good") for k in range(full, full + 20)]])
    seen_at_catch_up: list[int] = []

    class _Watching(_Recorder):
        def _polled(self, caught_up_now: bool) -> None:
            if caught_up_now:
                seen_at_catch_up.append(len(self.taken))

    monkeypatch.setattr(stream.compacted, "reader_consumer", lambda bootstrap, extra=None: consumer)
    with _Watching() as reader:
        assert reader.wait_caught_up(CATCH_UP_IDLE_S / 3)
    assert seen_at_catch_up == [full + 20]
