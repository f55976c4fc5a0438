"""The producer's record limit (message.max.bytes) against the records the worker writes.

librdkafka's produce() refuses a record past the producer's message.max.bytes before it is sent; a record of the
worker's own refused so failed its batch on every restart, and the partition stopped for good. So the worker
refuses at start a limit below its largest records (a recommendation, a user's changelog state, a dead letter
written bare), and clips or dead-letters the records whose size a producer decides (stream/records.py).
"""
from __future__ import annotations

from collections.abc import Sequence

import numpy as np

from model.config import MAX_HISTORY_LENGTH
from model.errors import ConfigError
from model.events import MAX_ID_CHARS
from model.inference import Recommender
from model.state import _SLACK, History, UserState, encode_state
from stream import records
from stream.canary import Serving
from stream.settings import WorkerSettings

_WIDEST_ID = "\x01" * MAX_ID_CHARS  # an id at its longest in JSON: every character escaped (\u0001)
_LONGEST_ID = "\U0001F600" * MAX_ID_CHARS  # an id at its longest in UTF-8 (a key, a msgpack string)
_ORIGIN_PARTITIONS = 1_000  # input partitions a state remembers re-keyed originals of, at least (model/config.py)


def _distinct_id(tag: str, i: int) -> str:
    return f"{tag}{i:06d}".ljust(MAX_ID_CHARS, "\U0001F600")


def _largest_history(history_length: int, tag: str) -> History:
    """history_length events, each with an item id and an event type of its own at their longest, and the names
    of the events that left the window a history keeps until it compacts."""
    h = History()
    for i in range(history_length + _SLACK):
        h.append(_distinct_id(tag + "i", i), 2**62 + i, _distinct_id(tag + "t", i), True)
    h.keep_last(history_length)
    return h


def _largest_state_record(settings: WorkerSettings, model: Recommender) -> int:
    """A changelog record of one user's state at its largest under `model`: full stepped and skipped histories,
    every input partition's re-keyed original remembered; as record_bytes counts it.

    Of at most MAX_HISTORY_LENGTH events, which new versions cannot pass: versions published before that cap may
    keep more (up to PUBLISHED_MAX_HISTORY_LENGTH) and still load, as they did before this check, whose worst case
    (256-character ids of 4-byte characters throughout) would refuse them under Kafka's 1 MB default."""
    big, hidden = 2**62, np.ones(model.config.hidden_dimension, np.float32)
    length = min(model.history_length, MAX_HISTORY_LENGTH)
    state = UserState(model.version, hidden, hidden, _LONGEST_ID, big, big, _largest_history(length, "h"),
                      big, big, dict.fromkeys(range(max(settings.partitions, _ORIGIN_PARTITIONS)), big), big,
                      _largest_history(length, "s"))
    return records.record_bytes(_LONGEST_ID, encode_state(state, settings.state_format),
                                records.changelog_headers(big, "f" * 32))


def _largest_recommendation(settings: WorkerSettings, version: str) -> int:
    """A recommendation of k items at its largest under `version`, as record_bytes counts it."""
    big = 2**63 - 1
    items = [records.ScoredItem(_WIDEST_ID, -2.2250738585072014e-308)] * settings.k  # the longest float text
    rec = records.Recommendation(_WIDEST_ID, items, version, _WIDEST_ID, _WIDEST_ID, 2**31 - 1, big, big, big,
                                 settings.input_topic, "f" * 32)
    return records.record_bytes(_LONGEST_ID, records.encode_recommendation(rec), None)


def smallest_message_max_bytes(settings: WorkerSettings, models: Sequence[Recommender]) -> int:
    """The least producer message.max.bytes under which every record the worker writes fits: a recommendation and
    a changelog state at their largest under each of `models`, and a dead letter written bare (a larger one is
    clipped, a re-keyed copy too large dead-lettered)."""
    largest = max([records.smallest_dead_letter_bytes(settings.input_topic)]
                  + [_largest_recommendation(settings, m.version) for m in models]
                  + [_largest_state_record(settings, m) for m in models])
    return largest + records.RECORD_FRAMING_BYTES


def too_small_for(settings: WorkerSettings, models: Sequence[Recommender]) -> str | None:
    """Why the producer's message.max.bytes cannot carry the records the worker writes serving `models`; None
    when it can."""
    limit, least = settings.message_max_bytes, smallest_message_max_bytes(settings, models)
    if limit >= least:
        return None
    versions = ", ".join(f"{m.version} (history_length = {m.history_length})" for m in models)
    return (f"kafka_producer setting 'message.max.bytes' = {limit} is too small for the worker's own records: at "
            f"least {least} bytes (a recommendation of k = {settings.k} items, a changelog state of version "
            f"{versions} with ids of {MAX_ID_CHARS} characters, a dead letter); raise message.max.bytes to {least} "
            "or more")


def checked_message_max_bytes(settings: WorkerSettings, serving: Serving) -> int:
    """The producer's message.max.bytes, refused (ConfigError) where too_small_for the versions serving: a record
    of the worker's own refused by produce() failed its batch on every restart, and the partition stopped for
    good. (A version swapped in later is refused by the hot swap instead, ModelHolder.refuse_when.)"""
    why = too_small_for(settings, [serving.stable] + ([serving.canary] if serving.canary is not None else []))
    if why is not None:
        raise ConfigError(why)
    return settings.message_max_bytes
