"""Printing recommendation records readably as they arrive (`hrnn tail`).

Reads without a consumer group (assign, no commits) so tailing never steals partitions from
a downstream consumer group or leaves offsets behind.
"""
from __future__ import annotations

import sys
import time
from typing import TextIO

import msgspec
from confluent_kafka import OFFSET_BEGINNING, OFFSET_END, TopicPartition

from stream.kafka_clients import (ClientSettings, KafkaClientError, raise_if_fatal, reader_consumer,
                                  wait_for_partitions, watermarks, window_offsets)
from stream.records import Recommendation, decode_recommendation

_DAY_MS = 86_400_000


def _latency(rec: Recommendation) -> str:
    ms = rec.emitted_at - rec.event_timestamp
    # A replayed historical file has event times long past: that is the event's age, not a latency.
    if abs(ms) >= _DAY_MS:
        return f"event age {ms / _DAY_MS:.1f} d"
    return f"latency {ms} ms"


def format_recommendation(value: bytes | None, *, top: int = 5) -> str:
    """One line: user, source partition@offset, model version, latency, the top items with scores.
    A value that is not a recommendation record comes back as a warning line with its raw bytes."""
    try:
        rec = decode_recommendation(value if value is not None else b"")
    except (msgspec.DecodeError, msgspec.ValidationError, RecursionError) as exc:  # deep nesting: RecursionError
        raw = repr(value[:200] + (b"..." if len(value) > 200 else b"")) if value is not None else "None"
        return f"WARNING not a recommendation record ({exc}): {raw}"
    items = ", ".join(f"{it.item_id} ({it.score:.3f})" for it in rec.items[:top])
    more = f", +{len(rec.items) - top} more" if len(rec.items) > top else ""
    session = f" session {rec.session_id}" if rec.session_id else ""
    return (f"user {rec.user_id}  src p{rec.source_partition}@{rec.source_offset}  model {rec.model_version}"
            f"{session}  {_latency(rec)}  items: {items or '(none)'}{more}")


def _ends(bootstrap: str, topic: str, extra: ClientSettings | None) -> dict[int, int]:
    """Each partition's end as tail starts: the offset of the first record written after. Read from the
    records, not the high watermark alone (Tansu's is the base offset of the last batch + 1, inside a batch
    written before), and not from timestamps, which a writer's clock behind ours would put before our start."""
    return {p: end for p, (_, end) in window_offsets(bootstrap, topic, None, watermarks(bootstrap, topic, extra),
                                                     extra).items()}


def tail(bootstrap: str, topic: str, *, count: int | None = None, from_beginning: bool = False,
         timeout_s: float | None = None, extra: ClientSettings | None = None, out: TextIO | None = None,
         top: int = 5, err: TextIO | None = None) -> int:
    """Print records of `topic` to `out` until `count` were printed or `timeout_s` passed
    (None: until interrupted). Returns how many were printed; KafkaClientError if the topic
    still does not exist at the timeout. A broker not reached is waited for, said once on `err` (stderr)."""
    out = out or sys.stdout

    def waiting(_: KafkaClientError) -> None:
        # tail is meant to wait (for a worker to create its topic, a broker to start), but not in silence
        print(f"waiting for Kafka at {bootstrap} (is the broker reachable? check --bootstrap-servers)",
              file=err or sys.stderr, flush=True)

    deadline = None if timeout_s is None else time.monotonic() + timeout_s
    consumer = reader_consumer(bootstrap, extra)
    printed = 0
    try:
        # the worker may not have created the output topic yet
        partitions = wait_for_partitions(consumer, topic, deadline, unreachable=waiting)
        if not partitions:  # a misspelt --topic, most often: printing nothing and exit 0 would hide it
            raise KafkaClientError(f"topic {topic!r} does not exist on {bootstrap} (waited {timeout_s:g} s): "
                                   "check --topic")
        starts = dict.fromkeys(partitions, OFFSET_BEGINNING) if from_beginning else _ends(bootstrap, topic, extra)
        consumer.assign([TopicPartition(topic, p, starts.get(p, OFFSET_END)) for p in partitions])
        while count is None or printed < count:
            wait = 0.5 if deadline is None else min(0.5, deadline - time.monotonic())
            if wait <= 0:
                break
            msg = consumer.poll(wait)
            if msg is None:
                continue
            err = msg.error()
            if err is not None:
                raise_if_fatal(topic, err)
                continue
            line = format_recommendation(msg.value(), top=top)
            if line.startswith("WARNING"):
                line = f"{line}  [p{msg.partition()}@{msg.offset()} key={msg.key()!r}]"
            print(line, file=out, flush=True)
            printed += 1
    finally:
        consumer.close()
    return printed
