"""The per-partition RocksDB state stores (real RocksDB files, no broker)."""
from __future__ import annotations

from dataclasses import replace

import numpy as np
import pytest
from rocksdict import Options, Rdict

from model.state import HistoryEvent, UserState, encode_state
from stream import store as store_module
from stream.store import ChangelogRecord, PartitionStore, StateStores, StoreError


def make_state(seed: int, source_offset: int = 0) -> UserState:
    rng = np.random.default_rng(seed)
    return UserState(
        model_version="v1", session_hidden=rng.standard_normal(8).astype(np.float32),
        user_hidden=rng.standard_normal(8).astype(np.float32), session_id=f"s{seed}",
        last_event_ms=1_700_000_000_000 + seed, session_length=seed % 5 + 1,
        history=[HistoryEvent(f"i{seed}", 1_700_000_000_000 + seed, "click", True)],
        source_offset=source_offset, n_events=seed + 1)


def same_state(a: UserState, b: UserState) -> bool:
    return encode_state(a) == encode_state(b)


@pytest.fixture
def stores(tmp_path):
    s = StateStores(tmp_path, "group", "events")
    yield s
    s.close_all()


def test_states_written_with_an_offset_survive_closing_and_reopening(stores):
    states = {f"user-{i}": make_state(i, source_offset=10 + i) for i in range(20)}
    stores.open(3).put_states(states, changelog_offset=41)
    stores.close(3)
    reopened = stores.open(3)
    got = reopened.get_many(states)
    assert all(same_state(got[u], s) for u, s in states.items())
    assert reopened.changelog_offset == 41
    assert sorted(reopened.user_ids()) == sorted(states)


def test_multi_get_answers_none_for_users_without_state(stores):
    store = stores.open(0)
    store.put_states({"known": make_state(1)})
    got = store.get_many(["nobody", "known", "else"])
    assert list(got) == ["nobody", "known", "else"]
    assert got["nobody"] is None and got["else"] is None
    assert same_state(got["known"], make_state(1))


def test_a_fresh_store_has_no_changelog_offset_and_writes_without_one_keep_it(stores):
    store = stores.open(0)
    assert store.changelog_offset == -1
    store.put_states({"a": make_state(1)}, changelog_offset=5)
    store.put_states({"b": make_state(2)})
    assert store.changelog_offset == 5


def test_partitions_are_separate_databases(stores):
    stores.open(0).put_states({"a": make_state(1)})
    assert stores.open(1).get("a") is None
    assert stores.path(0) != stores.path(1) and stores.path(0).exists() and stores.path(1).exists()
    assert stores.partitions == [0, 1]


def test_an_unreadable_state_is_treated_as_a_new_user_and_counted(stores):
    store = stores.open(0)
    store.write({"broken": b"\x63garbage", "fine": encode_state(make_state(3))}, changelog_offset=None)
    got = store.get_many(["broken", "fine"])
    assert got["broken"] is None and got["fine"] is not None
    assert store.corrupt_states == 1


def test_restore_applies_committed_records_and_skips_those_of_uncommitted_batches(stores):
    store = stores.open(0)
    committed = 100  # the next input offset the group will consume
    records = [
        ChangelogRecord("a", encode_state(make_state(1, 50)), offset=0, source_offset=50),
        ChangelogRecord("b", encode_state(make_state(2, 99)), offset=1, source_offset=99),
        ChangelogRecord("a", encode_state(make_state(3, 100)), offset=2, source_offset=100),  # not committed
        ChangelogRecord("c", encode_state(make_state(4, 130)), offset=3, source_offset=130),  # not committed
    ]
    result = store.restore(records, committed)
    assert (result.applied, result.skipped, result.changelog_offset) == (2, 2, 3)
    assert same_state(store.get("a"), make_state(1, 50))
    assert same_state(store.get("b"), make_state(2, 99))
    assert store.get("c") is None
    assert store.changelog_offset == 3


def test_restore_ignores_records_the_store_already_reflects(stores):
    store = stores.open(0)
    store.put_states({"a": make_state(7, 10)}, changelog_offset=4)
    old = ChangelogRecord("a", encode_state(make_state(1, 3)), offset=4, source_offset=3)
    new = ChangelogRecord("b", encode_state(make_state(2, 11)), offset=5, source_offset=11)
    result = store.restore([old, new], committed_offset=20)
    assert result.applied == 1
    assert same_state(store.get("a"), make_state(7, 10))
    assert store.get("b") is not None


def test_a_late_record_of_a_former_owner_is_superseded_by_the_newer_state_restored_before_it(stores):
    """A worker that stalled in a batch past max.poll.interval.ms wrote its states after the new owner's newer ones:
    the newest by source offset is the user's state, not the last written."""
    store = stores.open(0)
    newer = ChangelogRecord("a", encode_state(make_state(2, 180)), offset=0, source_offset=180)
    late = ChangelogRecord("a", encode_state(make_state(1, 140)), offset=1, source_offset=140)
    other = ChangelogRecord("b", encode_state(make_state(3, 150)), offset=2, source_offset=150)
    result = store.restore([newer, late, other], committed_offset=200)
    assert (result.applied, result.superseded, result.changelog_offset) == (2, 1, 2)
    assert same_state(store.get("a"), make_state(2, 180)) and same_state(store.get("b"), make_state(3, 150))


def test_a_late_record_is_superseded_by_a_newer_state_restored_in_an_earlier_chunk(stores, monkeypatch):
    monkeypatch.setattr(store_module, "_RESTORE_CHUNK", 2)
    store = stores.open(0)
    newer = ChangelogRecord("a", encode_state(make_state(2, 180)), offset=0, source_offset=180)
    fillers = [ChangelogRecord(f"f{i}", encode_state(make_state(i, 150 + i)), offset=1 + i, source_offset=150 + i)
               for i in range(3)]
    late = ChangelogRecord("a", encode_state(make_state(1, 140)), offset=4, source_offset=140)
    result = store.restore([newer, *fillers, late], committed_offset=200)
    assert (result.applied, result.superseded) == (4, 1)
    assert same_state(store.get("a"), make_state(2, 180))


def test_a_restore_holds_the_source_offsets_of_one_chunk_of_users_not_of_all(stores, monkeypatch):
    """A partition of millions of users restores in memory bounded by the chunk, not by its users."""
    monkeypatch.setattr(store_module, "_RESTORE_CHUNK", 100)
    store = stores.open(0)
    value = encode_state(make_state(1, 0))
    held: list[int] = []
    applied_source = PartitionStore._applied_source

    def watched(self, user_id, sources):
        held.append(len(sources))
        return applied_source(self, user_id, sources)

    monkeypatch.setattr(PartitionStore, "_applied_source", watched)
    result = store.restore((ChangelogRecord(f"u{i}", value, i, i) for i in range(5000)), committed_offset=5000)
    assert result.applied == 5000 and max(held) < 100


def test_catching_up_skips_a_late_record_older_than_the_state_the_store_holds(stores):
    store = stores.open(0)
    store.put_states({"a": make_state(2, 180)}, changelog_offset=4)
    late = ChangelogRecord("a", encode_state(make_state(1, 140)), offset=5, source_offset=140)
    newer = ChangelogRecord("a", encode_state(make_state(3, 190)), offset=6, source_offset=190)
    assert store.restore([late], committed_offset=200).superseded == 1
    assert same_state(store.get("a"), make_state(2, 180))
    assert store.restore([newer], committed_offset=200).applied == 1
    assert same_state(store.get("a"), make_state(3, 190))


def test_a_tombstone_without_a_source_offset_deletes_the_state_it_follows(stores):
    """An operator's null value on a user's key (any Kafka tool: no source header, source offset -1)."""
    store = stores.open(0)
    state = ChangelogRecord("a", encode_state(make_state(2, 180)), offset=0, source_offset=180)
    result = store.restore([state, ChangelogRecord("a", None, offset=1, source_offset=-1)], committed_offset=200)
    assert (result.applied, result.superseded) == (2, 0) and store.get("a") is None


def test_restore_with_nothing_committed_applies_nothing(stores):
    store = stores.open(0)
    rec = ChangelogRecord("a", encode_state(make_state(1, 0)), offset=0, source_offset=0)
    result = store.restore([rec], committed_offset=-1001)
    assert result.applied == 0 and store.get("a") is None


def test_restore_applies_tombstones_as_deletes(stores):
    store = stores.open(0)
    store.put_states({"a": make_state(1)})
    store.restore([ChangelogRecord("a", None, offset=0, source_offset=1)], committed_offset=5)
    assert store.get("a") is None


def test_a_long_restore_is_written_in_chunks_and_ends_at_the_last_offset(stores):
    store = stores.open(0)
    n = 12_000
    value = encode_state(make_state(1, 0))
    result = store.restore((ChangelogRecord(f"u{i % 3000}", value, i, i) for i in range(n)), committed_offset=n)
    assert result.applied == n and store.changelog_offset == n - 1
    assert len(store.user_ids()) == 3000


def test_opening_a_store_held_by_another_handle_is_a_clear_error(tmp_path):
    first = PartitionStore(tmp_path / "p0", 0)
    try:
        with pytest.raises(StoreError, match="state-dir"):
            PartitionStore(tmp_path / "p0", 0)
    finally:
        first.close()


def test_wiping_a_partition_removes_its_local_copy(stores):
    stores.open(2).put_states({"a": make_state(1)}, changelog_offset=9)
    stores.wipe(2)
    assert not stores.path(2).exists()
    fresh = stores.open(2)
    assert fresh.get("a") is None and fresh.changelog_offset == -1


def test_a_scan_yields_every_state_of_every_open_store_in_chunks(stores):
    stores.open(0).put_states({f"a-{i}": make_state(i) for i in range(25)}, changelog_offset=3)
    stores.open(1).put_states({f"b-{i}": make_state(i) for i in range(7)})
    chunks = list(stores.scan_states(chunk=10))
    assert [len(c) for c in chunks] == [10, 10, 5, 7]
    got = {u: s for c in chunks for u, s in c.items()}
    assert len(got) == 32 and same_state(got["a-4"], make_state(4)) and same_state(got["b-6"], make_state(6))


def test_a_store_closed_during_a_scan_ends_the_scan_quietly(stores):
    stores.open(0).put_states({f"a-{i}": make_state(i) for i in range(25)})
    scan = stores.scan_states(chunk=10)
    first = next(scan)
    stores.close(0)  # a revocation on the worker thread while the loader thread scans
    assert len(first) == 10 and list(scan) == []


OLD_LOG, NEW_LOG = "0a" * 16, "0b" * 16


def test_states_of_another_input_log_keep_their_histories_and_forget_their_offsets(stores):
    store = stores.open(0)
    assert store.input_log is None and store.follow_input_log(OLD_LOG) == 0  # a new store: nothing to forget
    store.put_states({"a": replace(make_state(1, 50), origins={2: 40}), "b": make_state(2, 99)}, changelog_offset=7)
    assert store.follow_input_log(OLD_LOG) == 0 and store.follow_input_log(None) == 0  # None: id unknown
    assert store.get("a").source_offset == 50 and store.input_log == OLD_LOG
    assert store.follow_input_log(NEW_LOG) == 2  # the input topic was deleted and created again
    a, b = store.get("a"), store.get("b")
    assert (a.source_offset, b.source_offset, a.origins) == (-1, -1, {}) and store.input_log == NEW_LOG
    a.source_offset, b.source_offset = 50, 99
    assert same_state(a, make_state(1, 50)) and same_state(b, make_state(2, 99))  # all else kept
    assert store.changelog_offset == 7
    stores.close(0)
    assert stores.open(0).input_log == NEW_LOG  # recorded in the store


def test_a_store_writes_the_state_format_it_is_given_also_when_it_forgets_offsets(tmp_path):
    stores = StateStores(tmp_path, "group", "events", state_format=1)
    store = stores.open(0)
    store.put_states({"a": make_state(1, 50)})
    store.follow_input_log(OLD_LOG)
    assert store.follow_input_log(NEW_LOG) == 1  # rewritten without its source offset
    path = store.path
    stores.close(0)
    db = Rdict(str(path), options=Options(raw_mode=True))
    try:
        assert db[b"ua"][0] == 1  # the key layout of stream/store.py's docstring
    finally:
        db.close()


def test_restore_applies_records_of_another_input_log_with_their_offsets_forgotten(stores):
    store = stores.open(0)
    records = [
        ChangelogRecord("a", encode_state(make_state(1, 500)), offset=0, source_offset=500, source_log=OLD_LOG),
        ChangelogRecord("b", encode_state(make_state(2, 600)), offset=1, source_offset=600, source_log=OLD_LOG),
        ChangelogRecord("b", encode_state(make_state(3, 4)), offset=2, source_offset=4, source_log=NEW_LOG),
        ChangelogRecord("c", None, offset=3, source_offset=650, source_log=OLD_LOG),  # a deletion stays one
    ]
    store.put_states({"c": make_state(9)})
    # the new log's group has committed nothing yet: its record is of an uncommitted batch, the old log's are not
    result = store.restore(records, committed_offset=-1001, input_log=NEW_LOG)
    assert (result.applied, result.skipped) == (3, 1)
    a, b = store.get("a"), store.get("b")
    assert a.source_offset == -1 and b.source_offset == -1 and b.session_id == "s2"
    assert store.get("c") is None
    # without an id to compare (a broker that gives none), the old rule alone
    other = stores.open(1)
    assert other.restore(records[:2], committed_offset=-1001).applied == 0


def test_a_store_path_under_a_file_is_a_store_error_naming_it(tmp_path):
    a_file = tmp_path / "a-file"
    a_file.touch()
    with pytest.raises(StoreError, match="cannot open state store"):
        StateStores(a_file, "g", "t").open(0)


def test_a_store_records_the_changelog_topic_id_it_catches_up_from(stores):
    store = stores.open(0)
    assert store.changelog_log is None
    store.follow_changelog_log(None)  # a broker that gives no ids: nothing recorded
    assert store.changelog_log is None
    store.follow_changelog_log(OLD_LOG)
    stores.close(0)
    assert stores.open(0).changelog_log == OLD_LOG


def _damage(stores: StateStores, partition: int) -> None:
    """Truncate the store's MANIFEST, as a crash on a full disk can leave it."""
    stores.open(partition).put_states({"a": make_state(1)}, changelog_offset=3)
    stores.close(partition)
    manifest = next(stores.path(partition).glob("MANIFEST-*"))
    manifest.write_bytes(manifest.read_bytes()[:20])


def test_a_damaged_store_is_a_corrupt_store_error_that_blames_no_other_worker(stores):
    from stream.store import StoreCorrupt

    _damage(stores, 0)
    with pytest.raises(StoreCorrupt, match="is damaged: Corruption") as raised:
        stores.open(0)
    assert "state-dir" not in str(raised.value)
    stores.wipe(0)  # a copy of the changelog: wiped, it opens empty
    assert stores.open(0).changelog_offset == -1


@pytest.mark.parametrize("loss", ["manifest deleted", "current names a manifest that is not there"])
def test_a_store_missing_a_file_its_current_names_is_a_corrupt_store_error(stores, loss):
    from stream.store import StoreCorrupt

    stores.open(0).put_states({"a": make_state(1)}, changelog_offset=3)
    stores.close(0)
    if loss == "manifest deleted":
        next(stores.path(0).glob("MANIFEST-*")).unlink()
    else:
        (stores.path(0) / "CURRENT").write_text("MANIFEST-000099\n")
    with pytest.raises(StoreCorrupt, match="is damaged: IO error: No such file or directory"):
        stores.open(0)
    stores.wipe(0)  # rebuilt from the changelog as any damaged store
    assert stores.open(0).changelog_offset == -1


def test_a_store_whose_close_fails_is_closed_all_the_same_and_says_so(tmp_path, caplog):
    store = PartitionStore(tmp_path / "p0", 0)

    class FailingClose:
        def close(self):
            raise Exception("IO error: File too large; IO error: Writer has previous error.")

    real, store._db = store._db, FailingClose()
    try:
        with caplog.at_level("WARNING", logger="stream.store"):
            store.close()  # a full disk failed a write, then fails the close: the write's error is the one reported
        assert store._db is None and "state store close failed" in caplog.text
    finally:
        real.close()


def test_a_store_held_by_another_handle_is_not_taken_for_a_damaged_one(tmp_path):
    from stream.store import StoreCorrupt

    first = PartitionStore(tmp_path / "p0", 0)
    try:
        with pytest.raises(StoreError, match="state-dir") as raised:
            PartitionStore(tmp_path / "p0", 0)
        assert not isinstance(raised.value, StoreCorrupt)
    finally:
        first.close()


def _with_a_damaged_data_block(stores: StateStores, users: list[str]) -> PartitionStore:
    """The partition-0 store holding `users`, a data block a third into its table overwritten (bit rot, a torn
    write), opened again."""
    store = stores.open(0)
    store.put_states({u: make_state(i) for i, u in enumerate(users)}, changelog_offset=5)
    stores.close(0)  # opened again, it flushes its log into a table
    stores.open(0)
    stores.close(0)
    [table] = stores.path(0).glob("*.sst")
    data = bytearray(table.read_bytes())
    data[len(data) // 3:len(data) // 3 + 64] = b"\xff" * 64
    table.write_bytes(bytes(data))
    return stores.open(0)


def test_a_damaged_data_block_opens_and_its_first_read_is_a_corrupt_store_error(stores):
    """RocksDB checks a data block's checksum when a read first needs it, not on open: a read that finds one damaged
    says so as opening a damaged store does, and the store is rebuilt from the changelog like one."""
    from stream.store import StoreCorrupt

    users = [f"user-{i}" for i in range(2000)]
    store = _with_a_damaged_data_block(stores, users)
    assert store.changelog_offset == 5  # a block of states, not the one of the offsets
    with pytest.raises(StoreCorrupt, match="is damaged: Corruption: block checksum mismatch"):
        store.get_many(users)
    stores.wipe(0)
    assert stores.open(0).get_many(users[:1]) == {users[0]: None}


@pytest.mark.parametrize("scan", ["scan_states", "user_ids"])
def test_a_scan_that_meets_a_damaged_data_block_is_a_corrupt_store_error_not_a_short_scan(stores, scan):
    """rocksdict's iteration just ends at a damaged block: a scan would take the users before it for all there are
    (a prebuild, or forgetting the input offsets of a recreated input topic, would silently miss the rest)."""
    from stream.store import StoreCorrupt

    store = _with_a_damaged_data_block(stores, [f"user-{i}" for i in range(2000)])
    with pytest.raises(StoreCorrupt, match="is damaged: Corruption: block checksum mismatch"):
        list(store.scan_states(chunk=64)) if scan == "scan_states" else store.user_ids()
