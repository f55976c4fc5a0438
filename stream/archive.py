"""The training store: consumed events archived as Parquet files, one folder per UTC day.

Layout: `<root>/date=YYYY-MM-DD/<topic>[+t<topic id>]+p<partition>+<first>-<last>+<k>of<n>.parquet`,
columns in Amazon Personalize's names: USER_ID, ITEM_ID, TIMESTAMP (epoch seconds, int64),
EVENT_TYPE, and EVENT_VALUE / SESSION_ID when an event of the file has one. The day is the
event's own timestamp, so a late event lands in its day's folder. Files are written under a
dot-name, synced to disk and renamed into place, so readers never see half a file, not even
after a power loss.

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
Readers take each file on its own: one that is not a regular file, cannot be read as Parquet or
does not hold the archive's columns (types, no nulls where required, TIMESTAMP in epoch seconds of
the event contract's years) is skipped with a warning naming it and why, and the window is read
without it. A name of a batch part that cannot be (k of n with k > n) is ignored and logged too.
Only valid events are archived (the worker sends the others to the dead-letter topic). An event
dated after tomorrow (UTC; a wrong client clock) is archived in its day's folder too, but counted
and logged, and the training window ignores such folders until their day comes: one of them must
not make every window end in the future.
"""
from __future__ import annotations

import contextlib
import errno
import logging
import os
import re
import stat
import threading
import uuid
from collections import defaultdict
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from datetime import date, datetime, timedelta, timezone
from pathlib import Path
from typing import BinaryIO

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from model.errors import HRNNError
from model.events import MAX_EVENT_MS, MIN_EVENT_MS, Event
from model.interactions import Interactions

log = logging.getLogger(__name__)

DAY_PREFIX = "date="
_DAY_NAME = re.compile(r"\d{4}-\d{2}-\d{2}")
_TOPIC_ID = re.compile(r"[0-9a-f]{32}")
_FILE = re.compile(rf"^(?P<topic>[^+]+)(?:\+t(?P<topic_id>{_TOPIC_ID.pattern}))?\+p(?P<partition>\d+)"
                   r"\+(?P<first>\d+)-(?P<last>\d+)\+(?P<k>\d+)of(?P<n>\d+)\.parquet$")


class ArchiveError(HRNNError):
    """The archive cannot be written or holds no usable events."""


class UnusableFile(ArchiveError):
    """One archive file that readers skip: it cannot be read, or does not hold the archive's events."""

    def __init__(self, path: Path, problem: str) -> None:
        self.path, self.problem = path, problem
        super().__init__(f"{path}: {problem} (move it out of the archive, or replace it with the archive's file)")


# The columns the writer makes (see _table) and their types; TIMESTAMP is whole epoch seconds.
_REQUIRED = {"USER_ID": pa.string(), "ITEM_ID": pa.string(), "TIMESTAMP": pa.int64(), "EVENT_TYPE": pa.string()}
_OPTIONAL = {"EVENT_VALUE": pa.float64(), "SESSION_ID": pa.string()}
# The event contract's years (1990..2200, model/events.py) in the seconds the archive writes: epoch
# milliseconds (another tool's file) lie far above it, so such a file is refused rather than dated in year 50000.
_MIN_S, _MAX_S = MIN_EVENT_MS // 1000, MAX_EVENT_MS // 1000


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
    """The archive's day folders, oldest first. A `date=` folder named after no day (date=2026-02-30) is logged:
    the writer never makes one, so its files are never read, and whoever put them there should know."""
    out = []
    r = Path(root)
    if not r.is_dir():
        return out
    for d in r.iterdir():
        if not (d.name.startswith(DAY_PREFIX) and d.is_dir()):
            continue
        day = _day_named(d)
        if day is None:
            log.warning("ignoring folder %s: its name is not date=YYYY-MM-DD of a real day, so no file in it is "
                        "read", d, extra={"folder": str(d)})
        else:
            out.append((day, d))
    return sorted(out)


def _day_named(folder: Path) -> date | None:
    """The day a `date=YYYY-MM-DD` folder names; None for any other name (fromisoformat alone would also take
    20260203 or 2026-W05-1)."""
    text = folder.name[len(DAY_PREFIX):]
    if not _DAY_NAME.fullmatch(text):
        return None
    try:
        return date.fromisoformat(text)
    except ValueError:  # 2026-02-30
        return None


BatchKey = tuple[str, str, int, int, int]  # topic, topic id ("" for none), partition, first and last offset


def _log_name(topic: str, topic_id: str | None) -> str:
    return f"{topic}+t{topic_id}" if topic_id else topic


def _complete_batches(root: Path) -> dict[BatchKey, list[Path]]:
    """Files of every batch whose parts 1..n all exist, each once. Only names count here (a part that turns out
    unreadable is skipped when read, see _events_in): the writer's marks and the readers agree on the batches."""
    parts: dict[BatchKey, dict[int, list[Path]]] = defaultdict(lambda: defaultdict(list))
    sizes: dict[BatchKey, set[int]] = defaultdict(set)
    for _, d in day_dirs(root):
        for f in d.iterdir():
            m = _FILE.match(f.name)
            if not m:
                continue
            k, n = int(m["k"]), int(m["n"])
            if not 1 <= k <= n:  # the writer never names one: counted, it would make a batch complete twice over
                log.warning("ignoring archive file %s: part %d of %d cannot be (parts are 1..n)", f, k, n,
                            extra={"file": str(f)})
                continue
            key = (m["topic"], m["topic_id"] or "", int(m["partition"]), int(m["first"]), int(m["last"]))
            parts[key][k].append(f)
            sizes[key].add(n)
    out = {}
    for key, by_part in parts.items():
        problem = _batch_problem(by_part, sizes[key])
        if problem is None:
            out[key] = [by_part[k][0] for k in sorted(by_part)]
        else:
            log.warning("ignoring an archive batch: %s", problem,
                        extra={"batch": _batch_name(key),
                               "files": sorted(str(f) for files in by_part.values() for f in files)})
    return _without_covered(out)


def _batch_name(key: BatchKey) -> str:
    return "%s p%d %d-%d" % (_log_name(*key[:2]), *key[2:])


def _without_covered(batches: dict[BatchKey, list[Path]]) -> dict[BatchKey, list[Path]]:
    """The batches less those whose offsets another complete batch of the same log and partition covers: two
    instances archived the same records (one retried a write after the other took the partition over), and both
    read would count each event twice. A partial overlap cannot be told apart by row: it is logged and read."""
    out = dict(batches)
    by_partition: dict[tuple[str, str, int], list[BatchKey]] = defaultdict(list)
    for key in batches:
        by_partition[key[:3]].append(key)
    for keys in by_partition.values():
        widest: BatchKey | None = None
        for key in sorted(keys, key=lambda k: (k[3], -k[4])):  # by first offset, the widest first
            if widest is not None and key[4] <= widest[4]:
                log.warning("ignoring an archive batch: another batch holds its records too",
                            extra={"batch": _batch_name(key), "covered_by": _batch_name(widest)})
                del out[key]
                continue
            if widest is not None and key[3] <= widest[4]:
                log.warning("archive batches overlap: the records of both ranges are read, those of the overlap "
                            "twice", extra={"batch": _batch_name(key), "overlaps": _batch_name(widest)})
            widest = key
    return out


def _batch_problem(by_part: dict[int, list[Path]], sizes: set[int]) -> str | None:
    """Why the parts found (each in 1..n) are not one complete batch; None when they are."""
    if len(sizes) > 1:
        return f"its files disagree on how many parts it has ({', '.join(map(str, sorted(sizes)))})"
    n = next(iter(sizes))
    if twice := sorted(k for k, files in by_part.items() if len(files) > 1):
        return f"part(s) {', '.join(map(str, twice))} of {n} lie in more than one day folder (copied?)"
    if len(by_part) < n:
        return (f"incomplete archive batch, {len(by_part)} of its {n} files (its events are archived again on "
                "replay)")
    return None


@contextlib.contextmanager
def _open_regular(path: Path) -> Iterator[BinaryIO]:
    """The file, opened for reading, when it is a regular one (else UnusableFile). Opened without blocking and
    checked on the open descriptor: a FIFO of an archive file's name would block a plain open forever, and a name
    checked before opening it may be another file by then."""
    try:
        fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK)
    except OSError as exc:  # a dangling link, no permission
        raise UnusableFile(path, f"cannot be opened: {exc.strerror or exc}") from None
    try:
        mode = os.fstat(fd).st_mode
    except OSError as exc:
        os.close(fd)
        raise UnusableFile(path, f"cannot be opened: {exc.strerror or exc}") from None
    if not stat.S_ISREG(mode):
        os.close(fd)
        raise UnusableFile(path, f"not a regular file ({_file_kind(mode)})")
    with os.fdopen(fd, "rb") as f:
        yield f


def _file_kind(mode: int) -> str:
    kinds = ((stat.S_ISDIR, "a directory"), (stat.S_ISFIFO, "a FIFO"), (stat.S_ISSOCK, "a socket"),
             (stat.S_ISCHR, "a character device"), (stat.S_ISBLK, "a block device"))
    return next((name for test, name in kinds if test(mode)), "not a plain file")


def _events_in(path: Path) -> int:
    """How many events a file holds, from its footer (its columns are read only where the footer has no
    statistics); UnusableFile when it cannot be read, or is not an archive file (another tool's, or garbled)."""
    try:
        with _open_regular(path) as f:
            pf = pq.ParquetFile(f)
            problem = _schema_problem(pf.schema_arrow) or _values_problem(pf)
            rows = pf.metadata.num_rows
    except UnusableFile:
        raise
    except Exception as exc:  # noqa: BLE001 (whatever one file's bytes make the reader raise is that file's problem)
        raise UnusableFile(path, f"cannot be read as Parquet: {type(exc).__name__}: {exc}") from None
    if problem is not None:
        raise UnusableFile(path, problem)
    return rows


def _schema_problem(schema: pa.Schema) -> str | None:
    """Why the columns are not the archive's (names and types); None when they are. Other columns are ignored."""
    for name, kind in (_REQUIRED | _OPTIONAL).items():
        i = schema.get_field_index(name)
        if i < 0:
            if name in _REQUIRED:
                return f"no {name} column (columns: {', '.join(schema.names)}; the archive's: {', '.join(_REQUIRED)})"
        elif schema.field(i).type != kind:
            return f"column {name} is {schema.field(i).type}, the archive writes {kind}"
    return None


def _values_problem(pf: pq.ParquetFile) -> str | None:
    """Nulls in a required column, or a TIMESTAMP outside the event contract's years in epoch seconds; None when
    the values are the archive's. Taken from the row groups' statistics where the writer left them."""
    md = pf.metadata
    chunk_of = {md.schema.column(i).path: i for i in range(md.num_columns)}
    for g in range(md.num_row_groups):
        if md.row_group(g).num_rows == 0:
            continue
        for name in _REQUIRED:
            nulls, low, high = _column_facts(pf, g, chunk_of[name], name, need_range=name == "TIMESTAMP")
            if nulls:
                return f"{nulls} null {name} value(s)"
            if name == "TIMESTAMP" and not (_MIN_S <= low and high < _MAX_S):
                return (f"TIMESTAMP {low}..{high} is not epoch seconds between 1990 and 2200 (the archive writes "
                        "seconds; milliseconds are 1000 times larger)")
    return None


def _column_facts(pf: pq.ParquetFile, group: int, chunk: int, name: str, *, need_range: bool
                  ) -> tuple[int, object, object]:
    """Null count, min and max (None where not needed) of one column in one row group: from its statistics,
    else read."""
    stats = pf.metadata.row_group(group).column(chunk).statistics
    if (stats is not None and stats.has_null_count
            and (stats.null_count or stats.has_min_max or not need_range)):
        return stats.null_count, stats.min if stats.has_min_max else None, stats.max if stats.has_min_max else None
    col = pf.read_row_group(group, columns=[name]).column(0)
    low_high = pc.min_max(col)
    return col.null_count, low_high["min"].as_py(), low_high["max"].as_py()


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
            _write_synced(tmp, _table([a.event for a in rows]))
            os.replace(tmp, final)
            _sync_folder(d)
        except OSError as exc:
            with contextlib.suppress(OSError):  # e.g. no folder to hold it (a file of the day's name)
                tmp.unlink(missing_ok=True)
            raise ArchiveError(f"cannot write {final}: {exc}") from None
        return final


def _write_synced(path: Path, table: pa.Table) -> None:
    """Write the file and sync it to disk: renamed before its bytes are, a power loss could leave an empty file
    under a complete batch's name, whose offsets are committed by then."""
    with open(path, "wb") as f:
        pq.write_table(table, f)
        f.flush()
        os.fsync(f.fileno())


def _sync_folder(d: Path) -> None:
    """Sync the folder, so the rename itself survives a power loss (the batch's offsets are committed next).
    A file system that cannot sync a folder is left as it is."""
    fd = os.open(d, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    except OSError as exc:
        if exc.errno not in (errno.EINVAL, errno.ENOTSUP, errno.EBADF):
            raise
    finally:
        os.close(fd)


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


@dataclass(frozen=True, slots=True)
class Window:
    """The archive's files a training window reads, and those it leaves out (the log names each)."""

    days: list[Path]  # the day folders of the files read, oldest first
    files: list[Path]  # in name order (offset order per partition)
    events: int  # rows of those files, from their footers
    skipped: dict[Path, str]  # file -> why it is not read
    future_files: int  # files of folders dated after tomorrow, left out until their day (without an explicit end)

    def note(self) -> str:
        """What the window left out, for a run's outcome ("" when nothing)."""
        parts = []
        if self.skipped:
            parts.append(f"{len(self.skipped)} archive file(s) skipped as unreadable or not the archive's "
                         "(the log names each)")
        if self.future_files:
            parts.append(f"{self.future_files} archive file(s) dated after tomorrow left out until their day")
        return "".join(f"; {p}" for p in parts)


def scan_window(root: str | Path, days: int, *, end: date | None = None) -> Window:
    """The window of the `days` most recent days ending at `end` (default: the newest day, not after tomorrow
    UTC, with a readable file of a complete batch), every file checked on its own.

    The window follows the data rather than the wall clock, so replayed or historical logs train too; but not
    into the future, where one event of a wrong clock would leave every window holding that day only, and not to
    a day of no usable file (an empty folder, an incomplete batch's), which would shrink the window silently."""
    if days < 1:
        raise ArchiveError(f"the window must be at least one day, got {days}")
    by_day: dict[date, list[Path]] = defaultdict(list)
    for files in _complete_batches(Path(root)).values():
        for f in files:
            by_day[_day_named(f.parent)].append(f)  # type: ignore[index] (day_dirs listed only named days)
    rows: dict[Path, int] = {}
    skipped: dict[Path, str] = {}

    def usable(f: Path) -> bool:
        if f not in rows and f not in skipped:
            try:
                rows[f] = _events_in(f)
            except UnusableFile as exc:
                skipped[f] = exc.problem
                _log_skip(exc)
        return f in rows

    future = 0
    if end is None:
        latest = latest_window_day()
        future = sum(len(files) for day, files in by_day.items() if day > latest)
        if future:
            log.warning("leaving archive files dated after tomorrow (a wrong clock?) out of the window until their "
                        "day", extra={"files": future, "newest_day": str(max(by_day))})
        end = next((day for day in sorted((d for d in by_day if d <= latest), reverse=True)
                    if any(usable(f) for f in by_day[day])), None)
    window: list[Path] = []
    if end is not None:
        # a window reaching before year 1 is all of the archive (a timedelta that far raises OverflowError)
        first = end - timedelta(days=days - 1) if days - 1 <= (end - date.min).days else date.min
        window = sorted((f for day, files in by_day.items() if first <= day <= end for f in files),
                        key=lambda f: (f.parent.name, f.name))
    read = [f for f in window if usable(f)]
    if skipped:
        log.warning("%d archive file(s) skipped; the window is read without them", len(skipped),
                    extra={"skipped": len(skipped)})
    return Window(days=sorted({f.parent for f in read}, key=lambda d: d.name), files=read,
                  events=sum(rows[f] for f in read), skipped=skipped, future_files=future)


def window_days(root: str | Path, days: int, *, end: date | None = None) -> list[Path]:
    """Day folders of the window's files (see scan_window)."""
    return scan_window(root, days, end=end).days


def count_events(root: str | Path, days: int, *, end: date | None = None) -> int:
    """Events in the window, from Parquet footers (cheap: columns are read only where a footer has no
    statistics)."""
    return scan_window(root, days, end=end).events


def read_window(root: str | Path, days: int, *, end: date | None = None, window: Window | None = None
                ) -> Interactions:
    """The window's events as Interactions (sorted by user, time; file order breaks ties). `window`: the
    scan_window(root, days, end=end) the caller already made, so its files are not checked (and warned of) twice."""
    window = window or scan_window(root, days, end=end)
    tables, skipped = [], len(window.skipped)
    for f in window.files:
        try:
            tables.append(_read_table(f))
        except UnusableFile as exc:  # its footer read, its pages not (a file damaged inside)
            skipped += 1
            _log_skip(exc)
    left_out = f" ({skipped} unreadable archive file(s) skipped, see the log)" if skipped else ""
    if not tables:
        raise ArchiveError(f"archive {root} has no events in a {days}-day window{left_out}")
    n = sum(t.num_rows for t in tables)

    def column(name: str, kind: pa.DataType) -> pa.ChunkedArray:
        parts = [t.column(name).combine_chunks() if name in t.column_names else pa.nulls(t.num_rows, kind)
                 for t in tables]
        return pa.chunked_array(parts, kind)

    values = column("EVENT_VALUE", pa.float64())
    sessions = column("SESSION_ID", pa.string())
    # events without a session id keep None: they are sessionized by their time gap, as the worker does
    session_ids = sessions.to_numpy(zero_copy_only=False) if sessions.null_count < n else None
    dirs = window.days
    return Interactions.from_columns(
        column("USER_ID", pa.string()).to_numpy(zero_copy_only=False),
        column("ITEM_ID", pa.string()).to_numpy(zero_copy_only=False),
        column("TIMESTAMP", pa.int64()).to_numpy().astype(np.int64) * 1000,
        event_types=column("EVENT_TYPE", pa.string()).to_numpy(zero_copy_only=False),
        values=None if values.null_count == n else values.fill_null(np.nan).to_numpy(),
        session_ids=session_ids,
        source=f"archive {root} ({dirs[0].name[len(DAY_PREFIX):]}..{dirs[-1].name[len(DAY_PREFIX):]}){left_out}")


def _log_skip(exc: UnusableFile) -> None:
    log.warning("skipping archive file %s", exc, extra={"file": str(exc.path), "why": exc.problem})


def _read_table(path: Path) -> pa.Table:
    """The file's archive columns (checked again: the file may have changed since its footer was)."""
    try:
        with _open_regular(path) as f:
            pf = pq.ParquetFile(f)
            table = pf.read(columns=[c for c in (_REQUIRED | _OPTIONAL) if c in pf.schema_arrow.names])
    except UnusableFile:
        raise
    except Exception as exc:  # noqa: BLE001 (whatever one file's bytes make the reader raise is that file's problem)
        raise UnusableFile(path, f"cannot be read as Parquet: {type(exc).__name__}: {exc}") from None
    if problem := _schema_problem(table.schema):
        raise UnusableFile(path, problem)
    return table
