"""Printing recommendation records readably (`hrnn tail`)."""
from __future__ import annotations

import io
import select
import subprocess
import sys
import threading
import time
import uuid
from pathlib import Path

import pytest

from stream.kafka_clients import create_producer
from stream.records import Recommendation, encode_recommendation, scored_items
from stream.tail import format_recommendation, tail

HRNN = str(Path(sys.executable).with_name("hrnn"))


def _rec(user: str = "u1", offset: int = 42, n_items: int = 8, latency_ms: int = 17) -> Recommendation:
    items = scored_items([(f"item{i}", 1.0 / (i + 1)) for i in range(n_items)])
    return Recommendation(user_id=user, items=items, model_version="v7", session_id="s3", event_id=str(offset),
                          source_partition=2, source_offset=offset, event_timestamp=1_700_000_000_000,
                          emitted_at=1_700_000_000_000 + latency_ms)


def test_a_recommendation_prints_as_one_readable_line():
    line = format_recommendation(encode_recommendation(_rec()), top=3)
    assert "\n" not in line
    assert "user u1" in line and "p2@42" in line and "model v7" in line and "latency 17 ms" in line
    assert "item0 (1.000)" in line and "item2 (0.333)" in line and "item3" not in line
    assert "+5 more" in line


def test_an_old_replayed_event_shows_its_age_not_a_latency():
    line = format_recommendation(encode_recommendation(_rec(latency_ms=3 * 86_400_000)))
    assert "event age 3.0 d" in line and "latency" not in line


@pytest.mark.parametrize("value", [b"not json", b"[1, 2]", b'{"user_id": "u1"}', b"", None])
def test_a_record_that_is_not_a_recommendation_prints_a_warning_with_its_bytes(value):
    line = format_recommendation(value)
    assert line.startswith("WARNING not a recommendation record")
    assert (repr(value) if value is not None else "None") in line


def _produce(bootstrap: str, topic: str, values: list[bytes], key: bytes = b"u1", behind_ms: int | None = None) -> None:
    """With `behind_ms`, the records' CreateTime is that far behind this host's clock, as a writer's can be."""
    producer = create_producer(bootstrap)
    for v in values:
        stamp = {} if behind_ms is None else {"timestamp": int(time.time() * 1000) - behind_ms}
        producer.produce(topic, key=key, value=v, **stamp)
    assert producer.flush(15) == 0


def _tail_while_sending_new(bootstrap: str, topic: str, count: int, timeout_s: float,
                            behind_ms: int | None = None) -> tuple[list[int], list[str]]:
    """Tail `count` records without --from-beginning, sending new ones until it has them (or `timeout_s`)."""
    out = io.StringIO()
    result: list[int] = []
    worker = threading.Thread(target=lambda: result.append(tail(bootstrap, topic, count=count, timeout_s=timeout_s,
                                                                out=out)))
    worker.start()
    deadline = time.monotonic() + timeout_s
    sent = 0
    while worker.is_alive() and time.monotonic() < deadline:  # keep sending until tail has seen them
        _produce(bootstrap, topic, [encode_recommendation(_rec("new", offset=1000 + sent))], behind_ms=behind_ms)
        sent += 1
        worker.join(timeout=0.3)
    worker.join(timeout=5)
    return result, out.getvalue().splitlines()


@pytest.mark.broker
def test_tail_from_beginning_prints_n_records_and_survives_junk(broker):
    topic = f"recs-{uuid.uuid4().hex[:8]}"
    values = [encode_recommendation(_rec(f"u{i}", offset=i)) for i in range(4)]
    _produce(broker.bootstrap, topic, values[:2] + [b"\x00garbage"] + values[2:])
    out = io.StringIO()
    assert tail(broker.bootstrap, topic, count=5, from_beginning=True, timeout_s=30, out=out) == 5
    lines = out.getvalue().splitlines()
    assert len(lines) == 5
    assert sum(line.startswith("WARNING") for line in lines) == 1
    assert [line.split()[1] for line in lines if not line.startswith("WARNING")] == ["u0", "u1", "u2", "u3"]


@pytest.mark.broker
def test_tail_without_from_beginning_prints_only_new_records(broker):
    topic = f"recs-{uuid.uuid4().hex[:8]}"
    _produce(broker.bootstrap, topic, [encode_recommendation(_rec("old", offset=i)) for i in range(20)])
    result, lines = _tail_while_sending_new(broker.bootstrap, topic, 3, timeout_s=40)
    assert result == [3]
    assert len(lines) == 3 and all(line.startswith("user new ") for line in lines)


@pytest.mark.broker
def test_tail_prints_new_records_of_a_writer_whose_clock_is_behind_its_own(broker):
    topic = f"recs-{uuid.uuid4().hex[:8]}"
    _produce(broker.bootstrap, topic, [encode_recommendation(_rec("old", offset=i)) for i in range(20)])
    # new by their offsets, though their CreateTime (a minute behind) is before tail started
    result, lines = _tail_while_sending_new(broker.bootstrap, topic, 3, timeout_s=15, behind_ms=60_000)
    assert result == [3]
    assert len(lines) == 3 and all(line.startswith("user new ") for line in lines)


@pytest.mark.broker
def test_tail_cli_prints_count_lines_and_fails_when_fewer_arrive(broker):
    topic = f"recs-{uuid.uuid4().hex[:8]}"
    _produce(broker.bootstrap, topic, [encode_recommendation(_rec(f"u{i}", offset=i)) for i in range(3)])
    ok = subprocess.run([HRNN, "tail", "--bootstrap-servers", broker.bootstrap, "--topic", topic,
                         "--from-beginning", "--count", "3", "--timeout", "30"],
                        capture_output=True, text=True, timeout=60)
    assert ok.returncode == 0, ok.stderr
    assert [line.split()[1] for line in ok.stdout.splitlines()] == ["u0", "u1", "u2"]
    short = subprocess.run([HRNN, "tail", "--bootstrap-servers", broker.bootstrap, "--topic", topic,
                            "--from-beginning", "--count", "4", "--timeout", "3"],
                           capture_output=True, text=True, timeout=60)
    assert short.returncode == 1 and "3 of 4" in short.stderr
    assert len(short.stdout.splitlines()) == 3


def test_a_deeply_nested_value_prints_a_warning_not_a_traceback():
    line = format_recommendation(b'{"x":' + b"[" * 100_000)
    assert line.startswith("WARNING not a recommendation record")


@pytest.mark.broker
def test_tail_piped_into_head_stops_quietly_with_exit_0(broker):
    topic = f"recs-{uuid.uuid4().hex[:8]}"
    # more lines than a pipe's buffer holds (64 KiB), so a write meets the closed pipe
    _produce(broker.bootstrap, topic, [encode_recommendation(_rec(f"u{i}", offset=i)) for i in range(2000)])
    proc = subprocess.run(f"{HRNN} tail --bootstrap-servers {broker.bootstrap} --topic {topic} --from-beginning "
                          "--timeout 30 | head -1; exit ${PIPESTATUS[0]}", shell=True, executable="/bin/bash",
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0 and "Traceback" not in proc.stderr, proc.stderr
    assert len(proc.stdout.splitlines()) == 1


@pytest.mark.parametrize("flag", ["--timeout", "--count"])
def test_tail_refuses_a_limit_that_is_no_number_before_reading(flag, capsys):
    from stream.cli import main as hrnn

    assert hrnn(["tail", "--bootstrap-servers", "127.0.0.1:9", flag, "nan" if flag == "--timeout" else "0"]) == 2
    assert flag in capsys.readouterr().err


def test_tail_refuses_an_illegal_topic_name_before_reading(capsys):
    from stream.cli import main as hrnn

    # --timeout only bounds the test without the check: a name no topic can have would be waited for forever
    assert hrnn(["tail", "--bootstrap-servers", "127.0.0.1:9", "--topic", "hrnn recommendations",
                 "--timeout", "1"]) == 2
    assert "--topic 'hrnn recommendations' is not a Kafka topic name" in capsys.readouterr().err


@pytest.mark.broker
def test_tail_exits_2_saying_so_when_the_topic_still_does_not_exist_at_its_timeout(broker, capsys):
    from stream.cli import main as hrnn

    topic = f"recs-typo-{uuid.uuid4().hex[:8]}"
    assert hrnn(["tail", "--bootstrap-servers", broker.bootstrap, "--topic", topic, "--timeout", "2"]) == 2
    err = capsys.readouterr().err
    assert f"hrnn tail: error: topic {topic!r} does not exist" in err and "waited 2 s" in err


def test_tail_without_a_timeout_says_once_that_it_waits_for_an_unreachable_broker_and_keeps_waiting():
    proc = subprocess.Popen([HRNN, "tail", "--bootstrap-servers", "127.0.0.1:1"], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    try:
        ready, _, _ = select.select([proc.stderr], [], [], 30)
        line = proc.stderr.readline() if ready else ""
        assert line.startswith("waiting for Kafka at 127.0.0.1:1 (is the broker reachable?"), line
        time.sleep(1.0)
        assert proc.poll() is None  # still waiting: a broker may come up
    finally:
        proc.kill()
        proc.wait()
