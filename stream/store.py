"""Per-partition user-state stores on RocksDB.

One RocksDB database per assigned input partition, so a partition's state moves between
workers as a unit: the new owner opens (or creates) its local copy and catches up from the
changelog. A store holds these keys in its default column family:

  b"u" + user_id (UTF-8)  -> the encoded UserState (model.state.encode_state)
  b"\\x00changelog_offset" -> the changelog offset the stored states correspond to (ASCII int)
  b"\\x00input_log"        -> the input topic's id (hex) whose offsets the states' source offsets are
  b"\\x00changelog_log"    -> the changelog topic's id (hex) the changelog offset is an offset of

States and the changelog offset are always written in one WriteBatch, so after a crash the
store is at some batch boundary and the offset says where catching up has to start.
"""
from __future__ import annotations

import logging
import os
import re
import shutil
import threading
from collections.abc import Iterable, Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

from rocksdict import Options, Rdict, WriteBatch

from model.errors import HRNNError
from model.state import FORMAT_VERSION, StateFormatError, UserState, decode_state, encode_state, source_offset_of

log = logging.getLogger(__name__)

_USER = b"u"
_CHANGELOG_OFFSET = b"\x00changelog_offset"
_INPUT_LOG = b"\x00input_log"
_CHANGELOG_LOG = b"\x00changelog_log"
_RESTORE_CHUNK = 5000  # changelog records per WriteBatch while catching up


class StoreError(HRNNError):
    """A state store cannot be opened or written (path taken by another process, disk full, ...)."""


class StoreCorrupt(StoreError):
    """RocksDB finds a store's files damaged. The store is only a copy of the changelog: rebuild it from there."""


@dataclass(frozen=True, slots=True)
class ChangelogRecord:
    """One record read back from the state changelog."""

    user_id: str
    value: bytes | None  # the encoded state; None is a tombstone (the user's state was deleted)
    offset: int  # offset of this record in the changelog partition
    source_offset: int  # offset of the input record that produced the state
    source_log: str | None = None  # the input topic's id when that record was read (None: not recorded)


@dataclass(frozen=True, slots=True)
class RestoreResult:
    applied: int
    skipped: int  # records of batches whose input offsets were never committed
    changelog_offset: int
    superseded: int = 0  # records older than the user's state already applied (a late write of a former owner)


def _user_key(user_id: str) -> bytes:
    return _USER + user_id.encode()


def _options() -> Options:
    opts = Options(raw_mode=True)
    opts.create_if_missing(True)
    return opts


def _open_error(path: Path, exc: Exception) -> StoreError:
    detail = str(exc)
    # a file of the store that its CURRENT or MANIFEST names is gone (a MANIFEST deleted by hand or by a cleanup):
    # RocksDB calls that an IO error, yet the store is as damaged as a truncated one, and rebuilt the same way
    lost_file = detail.startswith("IO error: No such file or directory") and f"{path}{os.sep}" in detail
    if detail.startswith(("Corruption:", "Invalid argument:")) or lost_file:
        return StoreCorrupt(f"state store {path} is damaged: {detail}")
    if re.search(r"\block\b", detail, re.IGNORECASE):  # RocksDB's LOCK file is held (not a "block" checksum)
        return StoreError(f"cannot open state store {path}: {detail} (is another worker using the same --state-dir?)")
    return StoreError(f"cannot open state store {path}: {detail}")


def _read_error(path: Path, exc: Exception) -> StoreError:
    """What a failed read means: opening reads no data block, so a damaged one is found here."""
    if str(exc).startswith("Corruption:"):
        return StoreCorrupt(f"state store {path} is damaged: {exc}")
    return StoreError(f"cannot read state store {path}: {exc}")


def _forgetting_input_offsets(value: bytes) -> bytes:
    try:
        state = decode_state(value)
    except StateFormatError:
        return value  # unreadable either way: the user starts afresh when it is read
    state.forget_input_offsets()
    return encode_state(state, value[0])  # in the format it had


class PartitionStore:
    """The RocksDB database holding the user states of one input partition."""

    def __init__(self, path: str | Path, partition: int, state_format: int = FORMAT_VERSION) -> None:
        self.path, self.partition, self.state_format = Path(path), partition, state_format
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._db = Rdict(str(self.path), options=_options())
        except Exception as exc:  # rocksdict raises a bare Exception for I/O, lock and corruption errors
            raise _open_error(self.path, exc) from None
        self.corrupt_states = 0
        self._closing = threading.Lock()  # a scan on another thread never reads a closed database

    @property
    def changelog_offset(self) -> int:
        """The last changelog offset reflected in this store; -1 when it has none yet."""
        raw = self._get(_CHANGELOG_OFFSET)
        return -1 if raw is None else int(raw)

    @property
    def input_log(self) -> str | None:
        """The input topic id whose offsets the stored source offsets are; None when not recorded."""
        raw = self._get(_INPUT_LOG)
        return None if raw is None else raw.decode()

    @property
    def changelog_log(self) -> str | None:
        """The changelog topic id the changelog offset refers to; None when not recorded."""
        raw = self._get(_CHANGELOG_LOG)
        return None if raw is None else raw.decode()

    def _get(self, key: bytes | list[bytes]) -> bytes | None | list[bytes | None]:
        """rocksdict's get, its errors typed: StoreCorrupt for a damaged block (a checksum mismatch)."""
        try:
            return self._db.get(key)
        except Exception as exc:  # rocksdict raises a bare Exception, as on open
            raise _read_error(self.path, exc) from None

    def follow_changelog_log(self, changelog_log: str | None) -> None:
        """Record the changelog topic id this store catches up from. A store recorded with another id
        was built from another log: the caller discards it before (its offsets name another log's records)."""
        if changelog_log is None or changelog_log == self.changelog_log:
            return
        batch = WriteBatch(raw_mode=True)
        batch.put(_CHANGELOG_LOG, changelog_log.encode())
        self._write(batch)

    def follow_input_log(self, input_log: str | None) -> int:
        """Record the input topic id the states' source offsets refer to from now on.

        When another id was recorded (the input topic was deleted and created again, its offsets
        start at 0 again), the states keep their histories but forget their source offsets, which
        name records of a log that is gone; otherwise the new log's events would be taken for
        replays. Returns the number of states that forgot theirs. The id is written last, so a
        crash midway forgets again on the next open."""
        recorded = self.input_log
        if input_log is None or input_log == recorded:
            return 0
        forgotten = 0
        if recorded is not None:
            for chunk in self.scan_states():
                for state in chunk.values():
                    state.forget_input_offsets()
                self.put_states(chunk)
                forgotten += len(chunk)
        batch = WriteBatch(raw_mode=True)
        batch.put(_INPUT_LOG, input_log.encode())
        self._write(batch)
        return forgotten

    def get_many(self, user_ids: Iterable[str]) -> dict[str, UserState | None]:
        """Multi-get; a user without a state (or with an unreadable one) maps to None. StoreCorrupt when a data
        block holding one is damaged: the store is a copy of the changelog, rebuilt from there."""
        ids = list(user_ids)
        if not ids:
            return {}
        raws = self._get([_user_key(u) for u in ids])
        return {u: self._decode(u, raw) for u, raw in zip(ids, raws)}

    def get(self, user_id: str) -> UserState | None:
        return self.get_many([user_id])[user_id]

    def _decode(self, user_id: str, raw: bytes | None) -> UserState | None:
        if raw is None:
            return None
        try:
            return decode_state(raw)
        except StateFormatError as exc:
            # A state we cannot read must not stop the partition: the user starts afresh.
            self.corrupt_states += 1
            log.warning("unreadable state, user starts afresh", extra={"user_id": user_id, "error": str(exc)})
            return None

    def write(self, encoded: Mapping[str, bytes], changelog_offset: int | None) -> None:
        """Store encoded states and (when given) the changelog offset they correspond to, atomically."""
        batch = WriteBatch(raw_mode=True)
        for user_id, value in encoded.items():
            batch.put(_user_key(user_id), value)
        if changelog_offset is not None:
            batch.put(_CHANGELOG_OFFSET, str(changelog_offset).encode())
        self._write(batch)

    def put_states(self, states: Mapping[str, UserState], changelog_offset: int | None = None) -> None:
        self.write({u: encode_state(s, self.state_format) for u, s in states.items()}, changelog_offset)

    def _write(self, batch: WriteBatch) -> None:
        try:
            self._db.write(batch)
        except Exception as exc:
            raise StoreError(f"cannot write state store {self.path}: {exc}") from None

    def restore(self, records: Iterable[ChangelogRecord], committed_offset: int,
                input_log: str | None = None) -> RestoreResult:
        """Apply changelog records in offset order.

        `committed_offset` is the group's committed input offset of this partition (the next
        offset to consume; < 0 when nothing was committed). A record whose source offset is at
        or above it comes from a batch that was produced but never committed: that batch will be
        processed again, so its state must not be applied now. A record read from another log
        of the input topic than `input_log` (its id) is applied with its source offset
        forgotten: that log's batches are never read again.

        A record whose source offset is below that of the user's state already applied is superseded, not
        applied: a worker that lost the partition while it stalled in a batch (past max.poll.interval.ms, or
        cut from its group's coordinator) writes its batch's states after the new owner's newer ones.
        """
        applied = skipped = superseded = 0
        last = self.changelog_offset
        batch, pending = WriteBatch(raw_mode=True), 0
        sources: dict[str, int] = {}  # user -> source offset of the state applied in this chunk (-1: none known)
        for rec in records:
            if rec.offset <= last:
                continue
            last = rec.offset
            value = rec.value
            old_log = input_log is not None and rec.source_log not in (None, input_log)
            if old_log and value is not None:
                value = _forgetting_input_offsets(value)
            if not old_log and (committed_offset < 0 or rec.source_offset >= committed_offset):
                skipped += 1
            elif not old_log and value is not None and rec.source_offset < self._applied_source(rec.user_id, sources):
                superseded += 1  # a tombstone (an operator's, without a source offset) deletes whatever it follows
            else:
                applied += 1
                sources[rec.user_id] = -1 if old_log or value is None else rec.source_offset
                if value is None:
                    batch.delete(_user_key(rec.user_id))
                else:
                    batch.put(_user_key(rec.user_id), value)
            pending += 1
            if pending >= _RESTORE_CHUNK:
                batch.put(_CHANGELOG_OFFSET, str(last).encode())
                self._write(batch)
                batch, pending = WriteBatch(raw_mode=True), 0
                sources.clear()  # the store answers for the states written: one chunk's users held, not millions
        if pending:
            batch.put(_CHANGELOG_OFFSET, str(last).encode())
            self._write(batch)
        return RestoreResult(applied, skipped, last, superseded)

    def _applied_source(self, user_id: str, sources: dict[str, int]) -> int:
        """The source offset of the user's state: applied in the chunk not yet written, else stored (read once
        per chunk)."""
        if user_id not in sources:
            raw = self._get(_user_key(user_id))
            try:
                sources[user_id] = -1 if raw is None else source_offset_of(raw)
            except StateFormatError:  # unreadable: its user starts afresh, anything may replace it
                sources[user_id] = -1
        return sources[user_id]

    def user_ids(self) -> list[str]:
        """Every stored user (a full scan: for tests and tools, not the hot path)."""
        out = []
        for key, _ in self._items_from(_USER):
            if not key.startswith(_USER):
                break
            out.append(key[len(_USER):].decode())
        return out

    def _items_from(self, start: bytes) -> Iterator[tuple[bytes, bytes]]:
        """The stored pairs from `start` on. StoreCorrupt where a damaged block ends them: rocksdict's items()
        just stops there, and a scan would take the users before it for all there are."""
        it = self._db.iter()
        it.seek(start)
        while it.valid():
            yield it.key(), it.value()
            it.next()
        try:
            it.status()
        except Exception as exc:  # rocksdict raises a bare Exception, as on open
            raise _read_error(self.path, exc) from None

    def scan_states(self, chunk: int = 256) -> Iterator[dict[str, UserState]]:
        """Every stored state, `chunk` users at a time, safe to run on another thread than the writer's.

        Each chunk is read under the close lock with an iterator of its own, so a close (on
        revocation) waits for at most one chunk and a scan that meets a closed store just ends.
        A state written during the scan may be seen before or after its update. StoreCorrupt at a damaged
        block, as a read there raises it."""
        start = _USER
        while True:
            with self._closing:
                if self._db is None:
                    return
                out: dict[str, UserState] = {}
                last = None
                for key, raw in self._items_from(start):
                    if not key.startswith(_USER) or len(out) >= chunk:
                        break
                    last, user = key, key[len(_USER):].decode()
                    state = self._decode(user, raw)
                    if state is not None:
                        out[user] = state
            if last is None:
                return
            yield out
            start = last + b"\x00"

    def estimate_count(self) -> int:
        """RocksDB's estimate of the stored states, not a count: an overwrite of a state still in a memtable
        or an uncompacted file counts again until compaction (the hrnn_states_stored gauge says so)."""
        # The estimate counts the three meta keys too.
        return max(0, int(self._db.property_int_value("rocksdb.estimate-num-keys") or 0) - 3)

    def close(self) -> None:
        with self._closing:
            if self._db is None:
                return
            try:
                self._db.close()
            except Exception as exc:  # noqa: BLE001 (rocksdict raises a bare Exception)
                # a store that failed a write (a full disk) fails its close too: what it lost is on the changelog,
                # and the failed write's own error is the one to report, not this one raised while unwinding
                log.warning("state store close failed", extra={"path": str(self.path), "error": str(exc)})
            finally:
                self._db = None


class StateStores:
    """The open partition stores of one worker: `<state_dir>/<group>/<topic>-<partition>`."""

    def __init__(self, state_dir: str | Path, group: str, topic: str, state_format: int = FORMAT_VERSION) -> None:
        self.root = Path(state_dir) / group
        self.topic, self.state_format = topic, state_format
        self._open: dict[int, PartitionStore] = {}

    def path(self, partition: int) -> Path:
        return self.root / f"{self.topic}-{partition}"

    def open(self, partition: int) -> PartitionStore:
        store = self._open.get(partition)
        if store is None:
            store = self._open[partition] = PartitionStore(self.path(partition), partition, self.state_format)
        return store

    def get(self, partition: int) -> PartitionStore | None:
        return self._open.get(partition)

    def __getitem__(self, partition: int) -> PartitionStore:
        return self._open[partition]

    @property
    def partitions(self) -> list[int]:
        return sorted(self._open)

    def close(self, partition: int) -> None:
        store = self._open.pop(partition, None)
        if store is not None:
            store.close()

    def close_all(self) -> None:
        for p in list(self._open):
            self.close(p)

    def wipe(self, partition: int) -> None:
        """Delete a partition's local copy (it is rebuilt from the changelog on the next open)."""
        self.close(partition)
        shutil.rmtree(self.path(partition), ignore_errors=True)

    def estimate_count(self) -> int:
        return sum(s.estimate_count() for s in self._open.values())

    def scan_states(self, chunk: int = 256) -> Iterator[dict[str, UserState]]:
        """The states of every store open now, in chunks (see PartitionStore.scan_states)."""
        for store in list(self._open.values()):
            yield from store.scan_states(chunk)
