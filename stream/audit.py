"""Checking the delivery promise on a running deployment (`hrnn audit`).

The promise: every input record below the worker group's committed offset has been answered, by a
recommendation naming its partition and offset, a dead letter naming it, or (a mis-keyed record) a
re-keyed copy on the input topic, which is itself an input record to answer. Workers flush their
outputs before they commit, so reading the committed offsets first and the topics after leaves nothing
in flight inside the audited range. At least once allows an offset more than one answer (a batch read
again after a crash: two recommendations, or two re-keyed copies); exactly once does not.

An answer counts for the input log it names: recommendations and dead letters carry the input topic and
its id (where the broker gives one), so an output topic shared with another input topic, or kept while
the input topic was deleted and created again (offsets from 0 again, another id), answers nothing of
this log. Answers written by builds before those fields name only partition and offset and are taken
to be this log's.

A window (`since_ms`, `stream/topic_window.py`) audits the committed input records of that time on.

An answer naming a record the input log cannot hold (a partition it does not have, a negative offset, an
offset at or past the partition's end) answers nothing and is counted with the other stray records: it
does not break the promise (nothing committed went unanswered for it), but it says a writer is wrong.
The input's ends are read after the answers' ends, so every true answer read names an offset below them.

The input records past the committed offsets (the group's lag) are not audited; they are counted, so a
kept promise is not mistaken for a caught-up group. A group that committed nothing on the input topic (a
misspelt group, most often) while the input holds records is refused rather than audited: nothing audited
would read as a kept promise.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Callable

import msgspec
import numpy as np
from confluent_kafka import KafkaException, TopicPartition

from model.errors import ConfigError
from stream import records
from stream.kafka_clients import (ClientSettings, KafkaClientError, Record, admin_client, create_consumer,
                                  error_detail, topic_id, topic_partitions, watermarks)
from stream.settings import WorkerSettings
from stream.topic_window import ANSWER_SKEW_MS, earlier, read_window, window_bounds

SHOWN = 20  # unanswered offsets listed per partition; the count is always complete
# One byte of flags per audited offset, so a log of any length costs a byte per record, not a record.
SEEN, RECOMMENDED, TWICE, DEAD, REKEYED, COPY_AGAIN = 1, 2, 4, 8, 16, 32
ANSWERED = RECOMMENDED | DEAD | REKEYED | COPY_AGAIN
MAX_OFFSET = 2**63 - 1  # Kafka offsets are signed 64-bit: an answer naming one past this names no record


class NothingCommitted(ConfigError):
    """The group has no committed offset on any partition of the input topic: there is nothing to audit,
    and a report of 0 records would read as a kept promise. Most often the group's name is wrong."""

    def __init__(self, group: str, topic: str) -> None:
        self.group, self.topic = group, topic
        super().__init__(f"group {group!r} has committed no offsets on topic {topic!r}: check --group (or the "
                         "group the workers' --config names)")


class MissingOutputTopic(ConfigError):
    """The output topic the answers are read from does not exist: a misspelt --output-topic, most often."""

    def __init__(self, topic: str, bootstrap: str) -> None:
        self.topic = topic
        super().__init__(f"output topic {topic!r} does not exist on {bootstrap}: check --output-topic (or the "
                         "output_topic the workers' --config names)")


@dataclass
class PartitionAudit:
    partition: int
    start: int  # the first offset audited: the log's start
    committed: int | None  # the group's committed offset; None: nothing committed, nothing audited
    records: int = 0  # input records in [start, committed)
    recommended: int = 0
    dead_letters: int = 0
    rekeyed: int = 0
    copies_again: int = 0  # re-keyed copies of a record copied before (a crash before the commit), answered by that
    unanswered: int = 0
    first_unanswered: list[int] = field(default_factory=list)
    duplicated: int = 0  # records answered more than once
    lag: int = 0  # input records at or past `committed` (all of them where None), up to the end: not audited


@dataclass
class AuditReport:
    input_topic: str
    output_topic: str
    group: str
    exactly_once: bool
    partitions: list[PartitionAudit]
    input_log: str | None = None  # the input topic's id, where the broker gives one
    since_ms: int | None = None  # only input records of this time on (their Kafka timestamps) were audited
    foreign_records: int = 0  # output and dead-letter records that name no record of the input log

    def total(self, name: str) -> int:
        return sum(getattr(p, name) for p in self.partitions)

    @property
    def kept(self) -> bool:
        """Whether the promise held: nothing unanswered, and no duplicate where exactly once was asked."""
        return self.total("unanswered") == 0 and not (self.exactly_once and self.total("duplicated"))

    def to_dict(self) -> dict:
        totals = {k: self.total(k) for k in ("records", "recommended", "dead_letters", "rekeyed", "copies_again",
                                               "unanswered",
                                               "duplicated", "lag")}
        return {**{k: v for k, v in asdict(self).items() if k != "partitions"}, "kept": self.kept,
                "totals": totals, "partitions": [asdict(p) for p in self.partitions]}


class Ledger:
    """The flags of every audited offset of one input log: partition -> offsets [start, committed). `ranges`
    names every partition of the log; `ends` (partition -> end offset), where known, bounds the offsets an
    answer may name."""

    def __init__(self, ranges: dict[int, tuple[int, int | None]], topic: str, log: str | None = None,
                 ends: dict[int, int] | None = None) -> None:
        self.ranges, self.topic, self.log, self.ends = ranges, topic, log, ends or {}
        self.flags = {p: np.zeros(max(0, (c or s) - s), np.uint8) for p, (s, c) in ranges.items()}
        self.lag = dict.fromkeys(ranges, 0)
        self.copied: set[tuple[int, int]] = set()  # originals outside the audited range a copy of was read

    def copied_before(self, partition: int, offset: int) -> bool:
        """Note a re-keyed copy of the record at the offset; whether one was read before in this read of the
        input. An original outside the audited range (older than a window's start, or in flight) has no flags,
        yet its copies may lie inside it: those are remembered apart, one entry per such original."""
        start, committed = self.ranges.get(partition, (0, None))
        if committed is not None and start <= offset < committed:
            return bool(self.flags_of(partition, offset) & REKEYED)
        before = (partition, offset) in self.copied
        self.copied.add((partition, offset))
        return before

    def can_hold(self, partition: int, offset: int) -> bool:
        """Whether the log can hold a record at the offset: answers naming one it cannot are strays."""
        if partition not in self.ranges or not 0 <= offset <= MAX_OFFSET:
            return False
        end = self.ends.get(partition)
        return end is None or offset < end

    def mark(self, partition: int, offset: int, flag: int) -> bool:
        """Note `flag` for the offset; offsets outside the audited range (in flight, or before the log's
        start) are not this audit's. False where the log cannot hold the offset at all."""
        if not self.can_hold(partition, offset):
            return False
        start, committed = self.ranges[partition]
        if committed is None or not start <= offset < committed:
            return True
        f, i = self.flags[partition], offset - start
        if flag & ANSWERED and f[i] & ANSWERED:
            flag |= TWICE  # a second answer of any kind: two recommendations, two dead letters, one of each
        f[i] |= flag
        return True

    def flags_of(self, partition: int, offset: int) -> int:
        """The flags noted for the offset so far; 0 outside the audited range."""
        start, committed = self.ranges.get(partition, (0, None))
        return int(self.flags[partition][offset - start]) if committed is not None and start <= offset < committed \
            else 0

    def see(self, partition: int, offset: int) -> None:
        """An input record read: audited below the committed offset, counted as lag at or past it."""
        if partition not in self.ranges:
            return  # a partition added after the ends were read: past this audit
        committed = self.ranges[partition][1]
        if committed is None or offset >= committed:
            self.lag[partition] += 1
        else:
            self.mark(partition, offset, SEEN)

    def names_this_log(self, topic: str | None, log: str | None) -> bool:
        """Whether an answer naming (topic, log) answers this log; None: not named (older records)."""
        return records.names_log(self.topic, self.log, topic, log)

    def partition(self, p: int) -> PartitionAudit:
        start, committed = self.ranges[p]
        f = self.flags[p]
        seen = (f & SEEN) > 0  # offsets that hold a record (transaction markers hold none)
        has = lambda bit: int(np.count_nonzero(seen & ((f & bit) > 0)))  # noqa: E731
        missing = np.flatnonzero(seen & ((f & ANSWERED) == 0))
        return PartitionAudit(p, start, committed, int(seen.sum()), has(RECOMMENDED), has(DEAD), has(REKEYED),
                              has(COPY_AGAIN),
                              len(missing), [int(o) + start for o in missing[:SHOWN]], has(TWICE), self.lag[p])


def _int(value: str | None) -> int | None:
    try:
        return None if value is None else int(value)
    except ValueError:
        return None


def note_input(ledger: Ledger, r: Record) -> None:
    ledger.see(r.partition, r.offset)
    # The workers' own test: a header they would not take for their copy's (another log's, or naming a record
    # not before the copy in its partition) answers nothing, and its record is an event to answer as any other.
    origin = records.repartitioned_from(r.headers, ledger.topic, ledger.log, r.partition, r.offset)
    if origin is None:
        return
    if ledger.copied_before(*origin):
        # A second copy of one record (the original's batch read again after a crash before its commit) lies
        # after the first in the user's partition: workers apply the first and skip this one as a replay.
        ledger.mark(r.partition, r.offset, COPY_AGAIN)
    ledger.mark(*origin, REKEYED)


def note_recommendation(ledger: Ledger, r: Record) -> bool:
    """False for a record that is not a recommendation, one of another input log, or one naming a record the
    log cannot hold."""
    try:
        rec = records.decode_recommendation(r.value or b"")
    except (msgspec.DecodeError, msgspec.ValidationError):
        return False
    if not ledger.names_this_log(rec.source_topic, rec.source_log):
        return False
    return ledger.mark(rec.source_partition, rec.source_offset, RECOMMENDED)


def note_dead_letter(ledger: Ledger, r: Record) -> bool:
    """False for a dead letter of another input log, without its source headers, or naming a record the log
    cannot hold."""
    topic, log = (records.header(r.headers, h) for h in (records.H_SOURCE_TOPIC, records.H_SOURCE_LOG))
    p, o = _int(records.header(r.headers, records.H_SOURCE_PARTITION)), records.source_offset_of(r.headers)
    if topic is None or not ledger.names_this_log(topic, log) or p is None or o is None:
        return False
    return ledger.mark(p, o, DEAD)


def holds_records(bootstrap: str, topic: str, extra: ClientSettings | None = None) -> bool:
    """Whether any partition of the whole log holds a record, whatever window is audited: a misspelt group is
    as wrong on an input quiet lately. The local broker's end (the last batch's base offset + 1) is past its
    start wherever a record is, as a true high watermark is."""
    return any(end > start for start, end in watermarks(bootstrap, topic, extra).values())


COMMITTED_WAIT_S = 30.0  # the longest wait for a group's committed offsets


def committed_offsets(bootstrap: str, group: str, topic: str, extra: ClientSettings | None = None,
                      timeout_s: float = COMMITTED_WAIT_S) -> dict[int, int | None]:
    """The group's committed offset per partition of `topic` (None where it has none). Reading them does
    not join the group: a consumer that never subscribes takes no partition from the workers, so it has
    none to commit, whatever `extra` says of auto-commit. A client setting librdkafka refuses is the
    user's to fix (ClientSettingError, exit 2), not a broken promise (exit 1)."""
    consumer = create_consumer(bootstrap, group, extra)
    try:
        parts = topic_partitions(consumer, topic, timeout_s)
        if not parts:
            raise KafkaClientError(f"topic {topic!r} does not exist on {bootstrap}")
        got = consumer.committed([TopicPartition(topic, p) for p in parts], timeout=timeout_s)
    except KafkaException as exc:
        raise KafkaClientError(f"cannot read the offsets of group {group!r} on {topic!r}: "
                               f"{error_detail(exc)}") from None
    finally:
        consumer.close()
    return {tp.partition: tp.offset if tp.offset >= 0 else None for tp in got}


def audit(bootstrap: str, *, input_topic: str, output_topic: str, dlq_topic: str, group: str,
          exactly_once: bool = False, extra: ClientSettings | None = None, since_ms: int | None = None,
          idle_s: float = 2.0,
          timeout_s: float = 600.0, progress: Callable[[str], None] = lambda _: None) -> AuditReport:
    """Audit the group's committed input against the output, dead-letter and input topics; with
    `since_ms`, only the input records of that time on (Kafka timestamps, epoch ms). `extra` configures
    the clients."""
    # first: see the module docstring; within the command's timeout where shorter than the usual 30 s
    committed = committed_offsets(bootstrap, group, input_topic, extra, timeout_s=min(timeout_s, COMMITTED_WAIT_S))
    # Answers to committed records were written before the commit: they lie below the ends read now
    # (a re-keyed copy too, which may lie past its own partition's committed offset). The input's ends are
    # read after the answers': every answer read was written after its input record, so names one below them.
    answers_since = earlier(since_ms, ANSWER_SKEW_MS)
    bounds = window_bounds(bootstrap, {output_topic: answers_since, dlq_topic: answers_since}, extra,
                           timeout_s=timeout_s)
    if not bounds[output_topic]:
        raise MissingOutputTopic(output_topic, bootstrap)
    bounds |= window_bounds(bootstrap, {input_topic: since_ms}, extra, timeout_s=timeout_s)
    if all(c is None for c in committed.values()) and holds_records(bootstrap, input_topic, extra):
        raise NothingCommitted(group, input_topic)  # an empty input, though, has nothing to answer: audited
    # Every partition of the input, also one added since the offsets were read (nothing committed there).
    ranges = {p: (bounds[input_topic].get(p, (0, 0))[0], committed.get(p))
              for p in sorted(committed.keys() | bounds[input_topic].keys())}
    progress("audited offsets [start, committed) per partition: "
             + ", ".join(f"{p}: [{s}, {'-' if c is None else c})" for p, (s, c) in sorted(ranges.items())))
    admin = admin_client(bootstrap, extra)
    ends = {p: end for p, (_, end) in bounds[input_topic].items()}
    ledger, foreign = Ledger(ranges, input_topic, topic_id(admin, input_topic), ends), 0

    def read(topic: str, note: Callable[[Record], bool | None]) -> None:
        def visit(r: Record) -> None:
            nonlocal foreign
            foreign += note(r) is False

        read_window(bootstrap, topic, bounds[topic], visit, idle_s=idle_s, timeout_s=timeout_s, extra=extra,
                    progress=progress)

    read(input_topic, lambda r: note_input(ledger, r))
    read(output_topic, lambda r: note_recommendation(ledger, r))
    read(dlq_topic, lambda r: note_dead_letter(ledger, r))
    parts = [ledger.partition(p) for p in sorted(ranges)]
    return AuditReport(input_topic, output_topic, group, exactly_once, parts, input_log=ledger.log,
                       since_ms=since_ms, foreign_records=foreign)


def audit_worker(settings: WorkerSettings, **kwargs) -> AuditReport:
    """`audit` of the worker group `settings` configure: its topics, group, guarantee and client settings."""
    return audit(settings.bootstrap_servers, input_topic=settings.input_topic, output_topic=settings.output_topic,
                 dlq_topic=settings.dlq_topic, group=settings.group, exactly_once=settings.exactly_once,
                 extra=settings.consumer_kafka, **kwargs)
