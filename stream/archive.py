"""The training store: consumed events archived as Parquet files, one folder per UTC day.

Layout: `<root>/date=YYYY-MM-DD/<topic>[+t<topic id>]+p<partition>+<first>-<last>+<k>of<n>.parquet`,
columns in Amazon Personalize's names: USER_ID, ITEM_ID, TIMESTAMP (epoch seconds, int64),
EVENT_TYPE, and EVENT_VALUE / SESSION_ID when an event of the file has one. The day is the
event's own timestamp, so a late event lands in its day's folder. Files are written under a
dot-name and renamed into place, so readers never see half a file.

One consumed batch of one partition (offsets first..last) becomes n files, one per day it
touches, named k of n. Archiving is at least once upstream (offsets are committed after the
write); the names make it effectively once: a batch counts only when all n files exist (the
reader ignores an incomplete one, e.g. of a crash mid-batch, which the replay rewrites), and on
start and on every partition assignment the writer reads the highest archived offset per
partition from the complete batches and skips records at or below it.

Offsets name records of one log only. A topic deleted and created again (or the same name on
another cluster) starts again at offset 0, and its events would all be skipped as replays of the
old log's; the topic id in the names (Kafka's, see kafka_clients.topic_id) keeps the two logs'
batches apart, so the new one is archived from its start and both are read for training.
Files without an id (a broker that gives none, or archives written before ids were named) are
one more log of their own.
Only valid events are archived (the worker sends the others to the dead-letter topic). An event
dated after tomorrow (UTC; a wrong client clock) is archived in its day's folder too, but counted
and logged, and the training window ignores such folders until their day comes: one of them must
not make every window end in the future.
"""
from __future__ import annotations

import contextlib
import logging
import os
import re
import threading
import uuid
from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import date, datetime, timedelta, timezone
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from model.errors import HRNNError
from model.events import Event
from model.interactions import Interactions

log = logging.getLogger(__name__)

DAY_PREFIX = "date="
_TOPIC_ID = re.compile(r"[0-9a-f]{32}")
_FILE = re.compile(rf"^(?P<topic>[^+]+)(?:\+t(?P<topic_id>{_TOPIC_ID.pattern}))?\+p(?P<partition>\d+)"
                   r"\+(?P<first>\d+)-(?P<last>\d+)\+(?P<k>\d+)of(?P<n>\d+)\.parquet$")


class ArchiveError(HRNNError):
    """The archive cannot be written or holds no usable events."""


@dataclass(frozen=True, slots=True)
class ArchivedEvent:
    """A valid event and its position in the events topic."""

    partition: int
    offset: int
    event: Event


def _day_of(ts_ms: int) -> date:
    return datetime.fromtimestamp(ts_ms / 1000, tz=timezone.utc).date()


def latest_window_day() -> date:
    """The newest day a window may end on: tomorrow (UTC), which tolerates clocks a day ahead."""
    return datetime.now(timezone.utc).date() + timedelta(days=1)


def day_dirs(root: str | Path) -> list[tuple[date, Path]]:
    """The archive's day folders, oldest first."""
    out = []
    r = Path(root)
    if not r.is_dir():
        return out
    for d in r.iterdir():
        if d.is_dir() and d.name.startswith(DAY_PREFIX):
            try:
                out.append((date.fromisoformat(d.name[len(DAY_PREFIX):]), d))
            except ValueError:
                continue  # not ours
    return sorted(out)


BatchKey = tuple[str, str, int, int, int]  # topic, topic id ("" for none), partition, first and last offset


def _log_name(topic: str, topic_id: str | None) -> str:
    return f"{topic}+t{topic_id}" if topic_id else topic


def _complete_batches(root: Path) -> dict[BatchKey, list[Path]]:
    """Files of every batch whose n files all exist."""
    found: dict[BatchKey, dict[int, Path]] = defaultdict(dict)
    size: dict[BatchKey, int] = {}
    for _, d in day_dirs(root):
        for f in d.iterdir():
            m = _FILE.match(f.name)
            if m:
                key = (m["topic"], m["topic_id"] or "", int(m["partition"]), int(m["first"]), int(m["last"]))
                found[key][int(m["k"])] = f
                size[key] = int(m["n"])
    out = {}
    for key, parts in found.items():
        if len(parts) == size[key]:
            out[key] = [parts[k] for k in sorted(parts)]
        else:
            log.warning("ignoring an incomplete archive batch (its events are archived again on replay)",
                        extra={"batch": "%s p%d %d-%d" % (_log_name(*key[:2]), *key[2:]), "files": len(parts), "expected": size[key]})
    return out


def _files(root: Path, dirs: list[Path]) -> list[Path]:
    """Files of complete batches in the given day folders, in name order (offset order per partition)."""
    wanted = set(dirs)
    return sorted((f for files in _complete_batches(root).values() for f in files if f.parent in wanted),
                  key=lambda f: (f.parent.name, f.name))


class ArchiveWriter:
    """Appends batches of events of one topic to the archive (see the module docstring)."""

    def __init__(self, root: str | Path, topic: str, topic_id: str | None = None) -> None:
        if "+" in topic or "/" in topic:
            raise ArchiveError(f"topic name {topic!r} cannot name archive files")
        self.root, self.topic = Path(root), topic
        try:
            self.root.mkdir(parents=True, exist_ok=True)
        except OSError as exc:  # an existing file of that name, or a parent that is one
            raise ArchiveError(f"archive {root} cannot be a directory: {exc}") from None
        self.topic_id: str | None = None
        self.high: dict[int, int] = {}  # partition -> highest archived offset of this topic id's log
        self.events_written = 0
        self.duplicates_skipped = 0
        self.future_events = 0  # written, dated after tomorrow: the window ignores them until their day
        # refresh (on an assignment) and write (the agent's batch) run on executor threads: a batch must be
        # named and marked for one log, never half for each
        self._lock = threading.Lock()
        self.refresh(topic_id)

    def refresh(self, topic_id: str | None) -> bool:
        """Follow the log with this topic id and re-read its highest archived offset per partition
        (another instance may have written since). True when the log is new to the archive: it
        holds batches of this topic from other logs only."""
        if topic_id is not None and not _TOPIC_ID.fullmatch(topic_id):
            raise ArchiveError(f"topic id {topic_id!r} is not 32 lowercase hex digits")
        with self._lock:
            return self._refresh(topic_id)

    def _refresh(self, topic_id: str | None) -> bool:
        high: dict[int, int] = {}
        other_logs = False
        for (topic, tid, partition, _, last), _files_of_batch in _complete_batches(self.root).items():
            if topic != self.topic:
                continue
            if tid == (topic_id or ""):
                high[partition] = max(high.get(partition, -1), last)
            else:
                other_logs = True
        self.topic_id, self.high = topic_id, high
        return other_logs and not high

    def archived(self, a: ArchivedEvent) -> bool:
        """Whether the event's offset is archived already (for the log being followed)."""
        return a.offset <= self.high.get(a.partition, -1)

    def write(self, batch: Iterable[ArchivedEvent]) -> list[Path]:
        """Archive the events not archived before; returns the files written."""
        with self._lock:
            return self._write(batch)

    def _write(self, batch: Iterable[ArchivedEvent]) -> list[Path]:
        fresh: list[ArchivedEvent] = []
        for a in batch:
            if self.archived(a):
                self.duplicates_skipped += 1
            else:
                fresh.append(a)
        by_partition: dict[int, list[ArchivedEvent]] = defaultdict(list)
        for a in fresh:
            by_partition[a.partition].append(a)
        written = []
        for partition, rows in sorted(by_partition.items()):
            by_day: dict[date, list[ArchivedEvent]] = defaultdict(list)
            for a in sorted(rows, key=lambda a: a.offset):
                by_day[_day_of(a.event.timestamp_ms)].append(a)
            first, last = min(a.offset for a in rows), max(a.offset for a in rows)
            n = len(by_day)
            for k, (day, day_rows) in enumerate(sorted(by_day.items()), start=1):
                name = f"{_log_name(self.topic, self.topic_id)}+p{partition}+{first:012d}-{last:012d}+{k}of{n}.parquet"
                written.append(self._write_file(day, name, day_rows))
            # only now is the batch complete, and its offsets count as archived
            self.high[partition] = max(self.high.get(partition, -1), last)
            self.events_written += len(rows)
            self._count_future(by_day)
        return written

    def _count_future(self, by_day: dict[date, list[ArchivedEvent]]) -> None:
        """Count and log the events written dated after tomorrow (once written: a retried batch is not counted
        twice)."""
        latest = latest_window_day()
        future = {day: rows for day, rows in by_day.items() if day > latest}
        if future:
            n = sum(len(rows) for rows in future.values())
            self.future_events += n
            newest = max(future)
            log.warning("archiving events dated after tomorrow (a wrong clock?): training windows leave them out "
                        "until their day", extra={"events": n, "newest_day": str(newest),
                                                  "partition": future[newest][0].partition,
                                                  "offset": future[newest][0].offset})

    def _write_file(self, day: date, name: str, rows: list[ArchivedEvent]) -> Path:
        d = self.root / f"{DAY_PREFIX}{day.isoformat()}"
        final = d / name
        tmp = d / f".{name}.{uuid.uuid4().hex[:8]}"
        try:
            d.mkdir(parents=True, exist_ok=True)
            pq.write_table(_table([a.event for a in rows]), tmp)
            os.replace(tmp, final)
        except OSError as exc:
            with contextlib.suppress(OSError):  # e.g. no folder to hold it (a file of the day's name)
                tmp.unlink(missing_ok=True)
            raise ArchiveError(f"cannot write {final}: {exc}") from None
        return final


def _table(events: list[Event]) -> pa.Table:
    cols: dict[str, pa.Array] = {
        "USER_ID": pa.array([e.user_id for e in events], pa.string()),
        "ITEM_ID": pa.array([e.item_id for e in events], pa.string()),
        # Personalize's TIMESTAMP is whole epoch seconds; order within a second survives as row order
        "TIMESTAMP": pa.array([e.timestamp_ms // 1000 for e in events], pa.int64()),
        "EVENT_TYPE": pa.array([e.event_type for e in events], pa.string()),
    }
    if any(e.event_value is not None for e in events):
        cols["EVENT_VALUE"] = pa.array([e.event_value for e in events], pa.float64())
    if any(e.session_id is not None for e in events):
        cols["SESSION_ID"] = pa.array([e.session_id for e in events], pa.string())
    return pa.table(cols)


def window_days(root: str | Path, days: int, *, end: date | None = None) -> list[Path]:
    """Day folders of the `days` most recent days, ending at `end` (default: the newest archived day that is
    not after tomorrow, UTC).

    The window follows the data rather than the wall clock, so replayed or historical logs train too; but
    not into the future, where one event of a wrong clock would leave every window holding that day only."""
    if days < 1:
        raise ArchiveError(f"the window must be at least one day, got {days}")
    if end is None:
        latest = latest_window_day()
        dirs = [(day, d) for day, d in day_dirs(root) if day <= latest]
    else:
        dirs = day_dirs(root)
    if not dirs:
        return []
    last = end or dirs[-1][0]
    first = last - timedelta(days=days - 1)
    return [d for day, d in dirs if first <= day <= last]


def count_events(root: str | Path, days: int, *, end: date | None = None) -> int:
    """Events in the window, from Parquet footers only (cheap: no column is read)."""
    return sum(pq.ParquetFile(f).metadata.num_rows for f in _files(Path(root), window_days(root, days, end=end)))


def read_window(root: str | Path, days: int, *, end: date | None = None) -> Interactions:
    """The window's events as Interactions (sorted by user, time; file order breaks ties)."""
    dirs = window_days(root, days, end=end)
    files = _files(Path(root), dirs)
    if not files:
        raise ArchiveError(f"archive {root} has no events in a {days}-day window")
    tables = [pq.read_table(f) for f in files]
    n = sum(t.num_rows for t in tables)

    def column(name: str, kind: pa.DataType) -> pa.ChunkedArray:
        parts = [t.column(name).combine_chunks() if name in t.column_names else pa.nulls(t.num_rows, kind)
                 for t in tables]
        return pa.chunked_array(parts, kind)

    values = column("EVENT_VALUE", pa.float64())
    sessions = column("SESSION_ID", pa.string())
    session_ids = None
    if sessions.null_count < n:
        # events without a session id get an empty one: a change to or from it still starts a session
        session_ids = np.asarray(sessions.fill_null("").to_numpy(zero_copy_only=False))
    return Interactions.from_columns(
        column("USER_ID", pa.string()).to_numpy(zero_copy_only=False),
        column("ITEM_ID", pa.string()).to_numpy(zero_copy_only=False),
        column("TIMESTAMP", pa.int64()).to_numpy().astype(np.int64) * 1000,
        event_types=column("EVENT_TYPE", pa.string()).to_numpy(zero_copy_only=False),
        values=None if values.null_count == n else values.fill_null(np.nan).to_numpy(),
        session_ids=session_ids,
        source=f"archive {root} ({dirs[0].name[len(DAY_PREFIX):]}..{dirs[-1].name[len(DAY_PREFIX):]})")
