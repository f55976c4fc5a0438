"""Reading the training store: every archive file is taken on its own, and a window is never lost to one bad file."""
from __future__ import annotations

import logging
import os
import shutil
import threading
from pathlib import Path
from typing import Callable

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from model.events import Event
from stream.archive import ArchivedEvent, ArchiveError, ArchiveWriter, count_events, read_window, window_days

DAY_MS = 86_400_000
T0 = 1_767_225_600_000  # 2026-01-01
DAY = "date=2026-01-01"
# a complete batch (1 of 1) of a partition the writer does not use here
BAD_NAME = "ev+p7+000000000000-000000000049+1of1.parquet"


@pytest.fixture(autouse=True)
def _warnings(caplog):
    caplog.set_level(logging.WARNING, logger="stream.archive")


def _good_archive(root: Path, events: int = 20) -> list[Path]:
    """`events` valid events of 2026-01-01 in one batch of partition 0."""
    return ArchiveWriter(root, "ev").write(
        [ArchivedEvent(0, k, Event(f"u{k % 4}", f"i{k % 5}", "click", T0 + k * 1000)) for k in range(events)])


def _foreign(path: Path, columns: dict[str, pa.Array], **options) -> None:
    pq.write_table(pa.table(columns), path, **options)


N = 50
_STRINGS = pa.array([f"x{k % 3}" for k in range(N)], pa.string())
_SECONDS = pa.array([T0 // 1000 + k for k in range(N)], pa.int64())
_CLICKS = pa.array(["click"] * N, pa.string())


def _zero_bytes(p: Path) -> None:
    p.touch()


def _truncated(p: Path) -> None:
    whole = _good_archive(p.parent.parent.parent / "donor")[0].read_bytes()  # beside the archive
    p.write_bytes(whole[: len(whole) // 2])


def _text(p: Path) -> None:
    p.write_text("USER_ID,ITEM_ID,TIMESTAMP\nu,i,1767225600\n")


def _directory(p: Path) -> None:
    p.mkdir()


def _dangling_link(p: Path) -> None:
    p.symlink_to(p.parent / "gone.parquet")


def _other_columns(p: Path) -> None:
    _foreign(p, {"user": _STRINGS, "item": _STRINGS, "ts": _SECONDS})


def _ids_as_integers(p: Path) -> None:
    _foreign(p, {"USER_ID": pa.array(range(N), pa.int64()), "ITEM_ID": _STRINGS, "TIMESTAMP": _SECONDS,
                 "EVENT_TYPE": _CLICKS})


def _timestamp_as_int32(p: Path) -> None:
    _foreign(p, {"USER_ID": _STRINGS, "ITEM_ID": _STRINGS, "TIMESTAMP": _SECONDS.cast(pa.int32()),
                 "EVENT_TYPE": _CLICKS})


def _value_as_string(p: Path) -> None:
    _foreign(p, {"USER_ID": _STRINGS, "ITEM_ID": _STRINGS, "TIMESTAMP": _SECONDS, "EVENT_TYPE": _CLICKS,
                 "EVENT_VALUE": pa.array(["1.0"] * N, pa.string())})


def _null_users(p: Path) -> None:
    _foreign(p, {"USER_ID": pa.nulls(N, pa.string()), "ITEM_ID": _STRINGS, "TIMESTAMP": _SECONDS,
                 "EVENT_TYPE": _CLICKS})


def _null_timestamps(p: Path) -> None:
    _foreign(p, {"USER_ID": _STRINGS, "ITEM_ID": _STRINGS, "TIMESTAMP": pa.nulls(N, pa.int64()),
                 "EVENT_TYPE": _CLICKS})


def _milliseconds(p: Path) -> None:
    _foreign(p, {"USER_ID": _STRINGS, "ITEM_ID": _STRINGS, "TIMESTAMP": pa.array([T0 + k for k in range(N)]),
                 "EVENT_TYPE": _CLICKS})


def _milliseconds_without_statistics(p: Path) -> None:
    _foreign(p, {"USER_ID": _STRINGS, "ITEM_ID": _STRINGS, "TIMESTAMP": pa.array([T0 + k for k in range(N)]),
                 "EVENT_TYPE": _CLICKS}, write_statistics=False)


UNREADABLE = [_zero_bytes, _truncated, _text, _directory, _dangling_link]
NOT_THE_ARCHIVES = [_other_columns, _ids_as_integers, _timestamp_as_int32, _value_as_string, _null_users,
                    _null_timestamps, _milliseconds, _milliseconds_without_statistics]


@pytest.mark.parametrize("make_bad", UNREADABLE + NOT_THE_ARCHIVES, ids=lambda f: f.__name__.strip("_"))
def test_a_bad_file_under_an_archive_name_is_skipped_with_a_warning_naming_it_and_the_window_read_without_it(
        tmp_path, caplog, make_bad: Callable[[Path], None]):
    root = tmp_path / "archive"
    _good_archive(root)
    bad = root / DAY / BAD_NAME
    make_bad(bad)
    assert count_events(root, 7) == 20
    data = read_window(root, 7)
    assert len(data) == 20 and set(data.user_ids) == {"u0", "u1", "u2", "u3"}
    assert "1 unreadable archive file(s) skipped" in data.source
    skips = [r for r in caplog.records if r.levelno == logging.WARNING and str(bad) in r.getMessage()]
    assert skips and all("skipping archive file" in r.getMessage() for r in skips)


def test_a_window_of_bad_files_only_says_it_has_no_events_and_how_many_files_it_skipped(tmp_path):
    root = tmp_path / "archive"
    (root / DAY).mkdir(parents=True)
    _zero_bytes(root / DAY / BAD_NAME)
    assert count_events(root, 7) == 0
    with pytest.raises(ArchiveError, match=r"no events in a 7-day window \(1 unreadable archive file"):
        read_window(root, 7)


def test_a_file_without_statistics_is_checked_by_its_values(tmp_path):
    """Its footer cannot say whether TIMESTAMP is in seconds: the column is read to tell."""
    root = tmp_path / "archive"
    _good_archive(root)
    _foreign(root / DAY / BAD_NAME, {"USER_ID": _STRINGS, "ITEM_ID": _STRINGS, "TIMESTAMP": _SECONDS,
                                     "EVENT_TYPE": _CLICKS}, write_statistics=False)
    _milliseconds_without_statistics(root / DAY / BAD_NAME.replace("+p7+", "+p8+"))
    assert count_events(root, 7) == 20 + N and len(read_window(root, 7)) == 20 + N


def test_a_fifo_under_an_archive_name_is_skipped_instead_of_blocking_the_count(tmp_path, caplog):
    root = tmp_path / "archive"
    _good_archive(root)
    fifo = root / DAY / BAD_NAME
    os.mkfifo(fifo)
    counted: list[int] = []
    counting = threading.Thread(target=lambda: counted.append(count_events(root, 7)), daemon=True)
    counting.start()
    counting.join(20)
    if counting.is_alive():  # blocked opening the FIFO: a writer end lets it go on, so no thread is left behind
        os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
        counting.join(5)
        pytest.fail("counting the window blocked on a FIFO")
    assert counted == [20] and f"skipping archive file {fifo}: not a regular file (a FIFO)" in caplog.text


# --- which files make a batch ---

def _copy_as(src: Path, name: str) -> Path:
    dst = src.parent / name
    shutil.copy(src, dst)
    return dst


def test_a_part_numbered_above_its_batchs_size_makes_no_batch_and_is_logged(tmp_path, caplog):
    root = tmp_path / "archive"
    good = _good_archive(root)[0]
    odd = _copy_as(good, "ev+p1+000000000000-000000000019+2of1.parquet")
    assert count_events(root, 7) == 20
    assert f"ignoring archive file {odd}: part 2 of 1" in caplog.text
    assert ArchiveWriter(root, "ev").high == {0: 19}  # the writer's marks take no such batch either


def test_a_batch_is_counted_once_beside_a_copy_of_one_of_its_parts_numbered_above_its_size(tmp_path):
    root = tmp_path / "archive"
    good = _good_archive(root)[0]
    _copy_as(good, good.name.replace("+1of1.", "+2of1."))
    assert count_events(root, 7) == 20 and len(read_window(root, 7)) == 20


def test_part_zero_makes_no_batch(tmp_path, caplog):
    root = tmp_path / "archive"
    good = _good_archive(root)[0]
    _copy_as(good, "ev+p1+000000000000-000000000019+0of1.parquet")
    assert count_events(root, 7) == 20 and "part 0 of 1 cannot be" in caplog.text


# --- where the window ends ---

def _ten_days(root: Path) -> None:
    """One event a day, 2026-01-01..2026-01-10."""
    ArchiveWriter(root, "ev").write([ArchivedEvent(0, k, Event(f"u{k}", "i", "click", T0 + k * DAY_MS))
                                     for k in range(10)])


def _days(root: Path, days: int) -> list[str]:
    return [d.name for d in window_days(root, days)]


def test_the_window_ends_at_the_newest_day_holding_a_complete_batch(tmp_path):
    """Newer day folders without one (empty, only a marker file, only an incomplete batch's part) would shrink the
    window silently."""
    root = tmp_path / "archive"
    _ten_days(root)
    (root / "date=2026-01-11").mkdir()
    (root / "date=2026-01-12").mkdir()
    (root / "date=2026-01-12" / "_SUCCESS").touch()
    (root / "date=2026-01-13").mkdir()
    _zero_bytes(root / "date=2026-01-13" / "ev+p0+000000000100-000000000199+1of2.parquet")
    assert count_events(root, 3) == 3
    assert _days(root, 3) == ["date=2026-01-08", "date=2026-01-09", "date=2026-01-10"]


def test_the_window_ends_at_the_newest_day_holding_a_readable_file(tmp_path, caplog):
    root = tmp_path / "archive"
    _ten_days(root)
    (root / "date=2026-01-11").mkdir()
    bad = root / "date=2026-01-11" / BAD_NAME
    _text(bad)
    assert count_events(root, 3) == 3 and _days(root, 3)[-1] == "date=2026-01-10"
    assert f"skipping archive file {bad}" in caplog.text


# --- what the window leaves out is logged ---

@pytest.mark.parametrize("name", ["date=2026-02-30", "date=20260101", "date=hello"])
def test_a_folder_named_after_no_day_is_logged_and_not_read(tmp_path, caplog, name):
    root = tmp_path / "archive"
    good = _good_archive(root)[0]
    (root / name).mkdir()
    shutil.copy(good, root / name / BAD_NAME)
    assert count_events(root, 7) == 20
    assert f"ignoring folder {root / name}: its name is not date=YYYY-MM-DD" in caplog.text


def test_a_window_left_with_future_events_only_logs_them(tmp_path, caplog):
    root = tmp_path / "archive"
    ArchiveWriter(root, "ev").write([ArchivedEvent(0, 0, Event("u", "i", "click", 7_226_582_400_000))])  # 2199
    caplog.clear()  # the writer's own warning
    assert count_events(root, 7) == 0
    assert "leaving archive files dated after tomorrow" in caplog.text


# --- writing ---

def test_a_file_is_synced_to_disk_before_it_is_renamed_to_its_archive_name(tmp_path, monkeypatch):
    """Renamed first, a power loss could leave a zero-length file under a complete batch's name."""
    calls: list[tuple[str, str]] = []
    real_fsync, real_replace = os.fsync, os.replace

    def fsync(fd: int) -> None:
        calls.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
        real_fsync(fd)

    def replace(src, dst) -> None:
        calls.append(("replace", str(src)))
        real_replace(src, dst)

    monkeypatch.setattr(os, "fsync", fsync)
    monkeypatch.setattr(os, "replace", replace)
    written = _good_archive(tmp_path / "archive")
    renamed = [src for op, src in calls if op == "replace"]
    assert len(renamed) == len(written) == 1
    at = calls.index(("replace", renamed[0]))
    assert ("fsync", renamed[0]) in calls[:at]
    assert ("fsync", str(written[0].parent)) in calls[at:]  # and the rename itself


def test_a_window_mixing_events_with_and_without_session_ids_sessionizes_the_ones_without_by_their_time_gap(
        tmp_path):
    """One producer sending session ids must not make the whole window of every other user one session: the
    worker starts a session after the timeout gap for an event without an id, and training does the same."""
    from model.sessions import session_starts

    hours = [0, 1, 10, 11, 20]
    ArchiveWriter(tmp_path, "ev").write(
        [ArchivedEvent(0, k, Event("a", f"i{k}", "click", T0 + h * 3_600_000)) for k, h in enumerate(hours)]
        + [ArchivedEvent(0, 5, Event("b", "i9", "click", T0, session_id="s1"))])
    data = read_window(tmp_path, 7)
    starts = session_starts(data, 1800)
    assert int(starts[data.user == list(data.user_ids).index("a")].sum()) == len(hours)


def _batch(root: Path, first: int, last: int) -> list[Path]:
    return ArchiveWriter(root, "ev").write(
        [ArchivedEvent(0, k, Event(f"u{k % 4}", f"i{k % 5}", "click", T0 + k * 1000)) for k in range(first, last + 1)])


@pytest.mark.parametrize("first, last", [(0, 99), (50, 149), (40, 60)])
def test_a_batch_whose_records_another_batch_holds_too_is_read_once(tmp_path, caplog, first, last):
    """Two instances archived offsets 0..149 and a part of them of one partition (one retried a write after the
    other took the partition over): each event is counted and trained on once."""
    _batch(tmp_path / "b", 0, 149)
    for f in _batch(tmp_path / "a", first, last):
        shutil.copy(f, tmp_path / "b" / DAY / f.name)
    assert count_events(tmp_path / "b", 7) == len(read_window(tmp_path / "b", 7)) == 150
    assert "another batch holds its records too" in caplog.text


def test_a_window_of_more_days_than_the_calendar_holds_reads_the_whole_archive(tmp_path):
    _good_archive(tmp_path)
    assert count_events(tmp_path, 100_000_000) == 20
