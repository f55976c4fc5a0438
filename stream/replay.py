"""Replaying an interactions file into the events topic, as a live shop would send it.

Events go out in global event-time order (what a real stream looks like), keyed by user_id
so a user's events stay on one partition in order. Each event's id is its row index in the
Interactions (sorted by user, time), so a replay of the same file always yields the same ids
and a downstream check can match recommendations to source rows.
"""
from __future__ import annotations

import dataclasses
import math
import sys
import time
from collections.abc import Iterator
from datetime import datetime, timezone
from typing import Protocol

import numpy as np
from tqdm import tqdm

from model.errors import ConfigError, DataError, HRNNError
from model.events import MAX_EVENT_MS, MIN_EVENT_MS, Event, encode_event
from model.interactions import Interactions
from stream.kafka_clients import produce_waiting, servers_of, unreachable_hint


class ReplayError(HRNNError):
    """Events could not be delivered to the broker."""


class ProducerLike(Protocol):
    def produce(self, topic: str, value: bytes | None = ..., key: bytes | None = ..., **kwargs) -> None: ...
    def poll(self, timeout: float = ...) -> int: ...
    def flush(self, timeout: float = ...) -> int: ...


def event_order(data: Interactions) -> np.ndarray:
    """Row indices in global time order; ties keep the (user, time) row order, so per-user order holds."""
    return np.argsort(data.ts_ms, kind="stable")


def check_event_times(data: Interactions, *, limit: int | None = None) -> None:
    """Refuse to send events that every worker dead-letters as bad_timestamp (outside 1990..2200 in epoch ms): the
    replay would end with exit 0 and the whole stream would reach the DLQ. A research log that counts seconds from
    its own start is the usual case."""
    order = event_order(data)[:limit]
    ts = data.ts_ms[order]
    outside = (ts < MIN_EVENT_MS) | (ts >= MAX_EVENT_MS)
    if not outside.any():
        return
    row = int(order[int(np.argmax(outside))])
    first = (f"user {str(data.user_ids[data.user[row]])!r}, item {str(data.item_ids[data.item[row]])!r} "
             f"at {_when(int(data.ts_ms[row]))}")
    raise DataError(data.source, f"{int(outside.sum())} of the {len(order)} events to send have a timestamp outside "
                                 f"1990..2200, which every worker dead-letters (bad_timestamp); the first: {first}",
                    expected="epoch times between 1990 and 2200: --base-epoch SECONDS for a log that counts from "
                             "its own start, --time-unit for a unit read wrongly, or --retime to stamp each event "
                             "with the time it is sent")


def _when(ts_ms: int) -> str:
    """Epoch ms with its UTC date where it has one, so a log counting from 0 is seen to be in 1970."""
    try:
        date = datetime.fromtimestamp(ts_ms / 1000, tz=timezone.utc).strftime("%Y-%m-%d %H:%M:%S UTC")
    except (OverflowError, OSError, ValueError):
        return f"epoch ms {ts_ms}"
    return f"epoch ms {ts_ms} ({date})"


def events_from_interactions(data: Interactions, *, limit: int | None = None) -> Iterator[Event]:
    """The rows as Events in global time order, event_id = row index, session_id the file's own SESSION_ID."""
    order = event_order(data)
    if limit is not None:
        order = order[:limit]
    user_ids, item_ids, types = data.user_ids, data.item_ids, data.event_types
    for row in order.tolist():
        value = float(data.value[row])
        yield Event(
            user_id=str(user_ids[data.user[row]]),
            item_id=str(item_ids[data.item[row]]),
            event_type=types[data.event_type[row]],
            timestamp_ms=int(data.ts_ms[row]),
            session_id=_session_id(data, row),
            event_id=str(row),
            event_value=None if math.isnan(value) else value,
        )


def _session_id(data: Interactions, row: int) -> str | None:
    """The event's SESSION_ID as the file wrote it: a per-file code would give the sessions of two files replayed
    one after the other the same id, and the worker would join them. Only codes are known of data built without
    the vocabulary; equal codes still mean one session there."""
    keys = data.session_key
    if keys is None or keys[row] < 0:  # -1: the event has none
        return None
    code = int(keys[row])
    return str(code) if data.session_ids is None else str(data.session_ids[code])


class _Pacer:
    """Holds the replay back to `rate` events/s, or to event time divided by `speedup`."""

    def __init__(self, rate: float | None, speedup: float | None, first_ts_ms: int) -> None:
        self.rate, self.speedup, self.first_ts_ms = rate, speedup, first_ts_ms
        self.started = time.monotonic()

    def due(self, index: int, ts_ms: int) -> float:
        if self.rate:
            return self.started + index / self.rate
        if self.speedup:
            return self.started + (ts_ms - self.first_ts_ms) / 1000.0 / self.speedup
        return 0.0


def replay(interactions: Interactions, producer: ProducerLike, topic: str, *, rate: float | None = None,
           speedup: float | None = None, limit: int | None = None, progress: bool = True,
           retime: bool = False) -> int:
    """Produce the events (key user_id, value the event JSON) and wait until all are delivered.
    Returns how many were delivered; raises ReplayError if the broker rejected any. The replay stops sending
    at the first rejection it hears of: the events after it would reach the topic with a gap before them, and
    a paced replay would go on for its whole length to no purpose.

    retime: stamp each event with the wall clock at sending instead of its file time, so that
    emit time - event time is a real latency (file times of a historical log are years old)."""
    if rate is not None and speedup is not None:
        raise ConfigError("give either a rate (events/s) or a speedup of event time, not both")
    if rate is not None and not (math.isfinite(rate) and rate > 0):
        raise ConfigError(f"rate must be a number of events/s > 0, got {rate}")
    if speedup is not None and not (math.isfinite(speedup) and speedup > 0):
        raise ConfigError(f"speedup must be a number > 0, got {speedup}")
    if limit is not None and limit < 0:
        raise ConfigError(f"limit must be >= 0, got {limit}")
    total = len(interactions) if limit is None else min(limit, len(interactions))
    delivered, sent, failures = 0, 0, []

    def on_delivery(err, _msg) -> None:
        nonlocal delivered
        if err is None:
            delivered += 1
        elif len(failures) < 5:
            failures.append(err)
        else:
            failures.append(None)  # only counted

    first_ts = int(interactions.ts_ms.min()) if total else 0
    pacer = _Pacer(rate, speedup, first_ts)
    bar = tqdm(total=total, unit="ev", file=sys.stderr, disable=not progress, desc=f"-> {topic}")
    try:
        for i, event in enumerate(events_from_interactions(interactions, limit=limit)):
            due = pacer.due(i, event.timestamp_ms)
            while (wait := due - time.monotonic()) > 0:
                producer.poll(min(wait, 0.1))  # serve delivery reports while pacing instead of idling
            if retime:
                event = dataclasses.replace(event, timestamp_ms=int(time.time() * 1000))
            if failures:
                break
            produce_waiting(producer, topic, encode_event(event), event.user_id.encode(), on_delivery=on_delivery)
            sent += 1
            bar.update(1)
            if i % 1000 == 0 or rate or speedup:  # paced: a replay behind its schedule hears of rejections too
                producer.poll(0)
        remaining = producer.flush(60)
    finally:
        bar.close()
    if remaining:
        raise ReplayError(f"{remaining} events to {topic!r} were still undelivered after 60 s"
                          f"{unreachable_hint(servers_of(producer))}")
    if failures:
        shown = "; ".join(e.str() for e in failures if e is not None)
        stopped = f"; sending stopped at the first rejection, {total - sent} not sent" if sent < total else ""
        raise ReplayError(f"{len(failures)} of the {sent} events sent to {topic!r} were rejected ({delivered} "
                          f"delivered{stopped}): {shown}")
    return delivered

