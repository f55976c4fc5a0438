"""Reading a deployment's input topic and the topics that answer it, whole or over a recent window:
what `hrnn audit` and `hrnn quality` share.

A window (`since_ms`) keeps a periodic check's cost to what came in lately rather than to the whole
retention: the input records of that time on (by their Kafka timestamps), and the answers from shortly
before it, since an answer is written after its input record.
"""
from __future__ import annotations

from typing import Callable, Mapping

from stream.kafka_clients import ClientSettings, KafkaClientError, Record, scan, watermarks, window_offsets

# An answer is written after its input record was read; a window's answers are looked for from this much
# before the window's start, for the clocks of the events' producers and of the workers to disagree.
ANSWER_SKEW_MS = 15 * 60_000

Bounds = dict[int, tuple[int, int]]  # partition -> (first offset to read, end offset)

# The longest wait for a topic's offsets; a command's own timeout, where shorter, shortens it (an unreachable
# broker then fails the command within its --timeout-s).
OFFSETS_WAIT_S = 10.0


def earlier(since_ms: int | None, ms: int) -> int | None:
    """`ms` before `since_ms`; None (the whole log) stays None."""
    return None if since_ms is None else since_ms - ms


def window_bounds(bootstrap: str, starts: Mapping[str, int | None], extra: ClientSettings | None = None, *,
                  timeout_s: float = OFFSETS_WAIT_S) -> dict[str, Bounds]:
    """Each topic's (first, end) offsets per partition, ends as they are now: from the first record of its
    start time on (epoch ms; None: the whole log). Callers start a window's answers ANSWER_SKEW_MS before its
    input (`earlier`). `timeout_s`: the command's timeout; the offsets are waited for OFFSETS_WAIT_S at most."""
    wait_s = min(timeout_s, OFFSETS_WAIT_S)
    return {t: window_offsets(bootstrap, t, since, watermarks(bootstrap, t, extra, wait_s), extra)
            for t, since in starts.items()}


def read_window(bootstrap: str, topic: str, bounds: Bounds, visit: Callable[[Record], None], *, idle_s: float,
                timeout_s: float, extra: ClientSettings | None = None,
                progress: Callable[[str], None] = lambda _: None) -> int:
    """Hand each record of `topic` within `bounds` to `visit`; returns how many were read. Raises
    KafkaClientError if the topic was still delivering at `timeout_s`."""
    n = 0

    def counted(r: Record) -> None:
        nonlocal n
        n += 1
        visit(r)

    if not scan(bootstrap, topic, counted, until={p: end for p, (_, end) in bounds.items()},
                start={p: first for p, (first, _) in bounds.items()}, idle_s=idle_s, timeout_s=timeout_s,
                extra=extra):
        raise KafkaClientError(f"reading {topic!r} took longer than {timeout_s:g} s ({n} records read): give "
                               "it a longer --timeout-s")
    progress(f"read {n} records of {topic!r}")
    return n
