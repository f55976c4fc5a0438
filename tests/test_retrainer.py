"""The training store, one retraining run, and the retraining service against the real broker."""
from __future__ import annotations

import asyncio
import fcntl
import json
import logging
import os
import signal
import subprocess
import sys
import threading
import time
import uuid
from datetime import date
from pathlib import Path

import numpy as np
import pytest
import torch

from model.artifact import current_version, list_versions, load_version, save_version
from model.config import DataConfig, HRNNConfig
from model.errors import ConfigError
from model.events import Event
from model.loaders import load_interactions
from model.network import HRNN
from model.synth import generate
from stream.archive import ArchivedEvent, ArchiveError, ArchiveWriter, count_events, read_window
from stream.replay import events_from_interactions
from stream.retrain_job import RetrainSpec, passes_gate, retrain, warm_start_state
from worker_testkit import health_of, http_get

TINY = {"hidden_dimension": 32, "epochs": 1, "n_sample": 32, "batch_size": 32}
DAY_MS = 86_400_000
T0 = 1_767_225_600_000  # 2026-01-01


def _archived(data, partitions: int = 2) -> list[ArchivedEvent]:
    return [ArchivedEvent(i % partitions, i, e) for i, e in enumerate(events_from_interactions(data))]


@pytest.fixture(scope="module")
def synth():
    return generate(300, 120, seed=3, events_per_user=12, start_spread_days=2)


# --- the archive ---

def test_archive_writes_parquet_by_day_with_personalize_columns(tmp_path):
    evs = [ArchivedEvent(0, 0, Event("u1", "i1", "click", T0 + 1_500)),
           ArchivedEvent(0, 1, Event("u1", "i2", "purchase", T0 + DAY_MS, session_id="s1", event_value=2.5)),
           ArchivedEvent(0, 2, Event("u2", "i1", "click", T0 + 5_000)),  # late: back to day one
           ArchivedEvent(1, 0, Event("u3", "i3", "click", T0 + 9_000))]
    files = ArchiveWriter(tmp_path, "ev").write(evs)
    assert sorted(f.parent.name for f in files) == ["date=2026-01-01", "date=2026-01-01", "date=2026-01-02"]
    day2 = next(f for f in files if f.parent.name == "date=2026-01-02")
    loaded = load_interactions(day2)  # a plain interactions file for `hrnn train`, too
    assert len(loaded) == 1 and loaded.event_types == ("purchase",) and loaded.session_key is not None
    data = read_window(tmp_path, 7)
    assert len(data) == 4 and set(data.user_ids) == {"u1", "u2", "u3"}
    assert int(data.ts_ms.min()) == T0 + 1_000  # whole epoch seconds, as Personalize stores them


def test_archive_skips_replayed_offsets_and_ignores_incomplete_batches(tmp_path, synth):
    evs = _archived(synth)
    w = ArchiveWriter(tmp_path, "ev")
    w.write(evs[:2000])
    w2 = ArchiveWriter(tmp_path, "ev")  # a restart: the high-water marks come from the file names
    w2.write(evs[1500:])  # the last 500 were archived before the crash
    assert w2.duplicates_skipped == 500
    assert count_events(tmp_path, 30) == len(synth)
    data = read_window(tmp_path, 30)
    assert np.array_equal(data.ts_ms, synth.ts_ms // 1000 * 1000)
    assert list(data.item_ids[data.item]) == list(synth.item_ids[synth.item])
    # a crash between the files of one batch leaves it incomplete: it does not count, and is rewritten
    files = ArchiveWriter(tmp_path / "b", "ev").write(
        [ArchivedEvent(0, 0, Event("u", "i", "click", T0)), ArchivedEvent(0, 1, Event("u", "j", "click", T0 + DAY_MS))])
    files[1].unlink()
    assert count_events(tmp_path / "b", 30) == 0 and ArchiveWriter(tmp_path / "b", "ev").high == {}


def test_a_new_log_of_the_topic_is_archived_from_its_start_beside_the_old_ones(tmp_path, synth):
    """A topic deleted and created again starts at offset 0: its events are not replays of the old log's."""
    old_log, new_log = "01" * 16, "02" * 16
    evs = _archived(synth)
    legacy = ArchiveWriter(tmp_path, "ev")  # no topic id: file names without one, as before ids were named
    assert all("+t" not in f.name for f in legacy.write(evs[:300]))
    old = ArchiveWriter(tmp_path, "ev", old_log)  # a log of its own, although its first 300 events are the same
    assert old.high == {} and old.refresh(old_log) is True  # only another log's batches so far
    old.write(evs[:1000])
    new = ArchiveWriter(tmp_path, "ev", new_log)
    assert new.refresh(new_log) is True
    files = new.write([ArchivedEvent(k % 2, k, a.event) for k, a in enumerate(evs[1000:1600])])  # offsets 0..
    assert new.duplicates_skipped == 0 and all(f"ev+t{new_log}+p" in f.name for f in files)
    assert count_events(tmp_path, 30) == len(read_window(tmp_path, 30)) == 300 + 1000 + 600
    assert new.refresh(new_log) is False and new.high == {0: 598, 1: 599}
    replayed = ArchiveWriter(tmp_path, "ev", old_log)
    replayed.write(evs[900:1000])
    assert replayed.duplicates_skipped == 100 and replayed.refresh(old_log) is False
    with pytest.raises(ArchiveError, match="not 32 lowercase hex digits"):
        ArchiveWriter(tmp_path, "ev", "AB")


def test_the_service_rereads_the_topic_id_when_a_batch_holds_archived_offsets(tmp_path, monkeypatch, caplog):
    """Kafka resets a consumer whose topic was recreated under it to the new log's start: the offsets
    it then reads look archived, so the service asks for the topic id before skipping them."""
    from types import SimpleNamespace

    import stream.retrainer as retrainer
    from model.events import encode_event

    ids = iter(["01" * 16, "02" * 16, "03" * 16])
    monkeypatch.setattr(retrainer, "topic_id", lambda admin, topic: next(ids))
    monkeypatch.setattr(retrainer.RetrainerService, "_admin", None)  # no broker here
    svc = retrainer.RetrainerService(retrainer.RetrainerSettings(
        bootstrap_servers="127.0.0.1:9", registry=str(tmp_path / "r"), archive=str(tmp_path / "a")))

    def batch(offsets):
        return [SimpleNamespace(message=SimpleNamespace(partition=0, offset=k), headers={},
                                value=encode_event(Event(f"u{k}", "i", "click", T0 + k))) for k in offsets]

    def _new_logs(svc) -> float:
        return svc.metrics.registry.get_sample_value("hrnn_retrainer_events_topic_new_logs_total")

    svc._follow_events_log()  # as on assignment: the first id
    asyncio.run(svc._archive(batch(range(10))))  # fresh offsets: the id is not read again
    assert svc.writer.topic_id == "01" * 16 and _new_logs(svc) == 0
    asyncio.run(svc._archive(batch(range(5))))  # offsets 0..4 again, but of the log with the next id
    assert svc.writer.topic_id == "02" * 16 and _new_logs(svc) == 1
    assert svc.writer.duplicates_skipped == 0 and count_events(tmp_path / "a", 30) == 15
    assert "this one is archived from its start" in caplog.text


@pytest.mark.broker
def test_with_a_canary_share_the_service_announces_what_it_publishes_as_a_canary(broker, tmp_path, monkeypatch):
    import stream.retrainer as retrainer
    from stream.announce import AnnouncementWatcher
    from stream.retrain_job import RetrainOutcome

    topic = f"upd-{uuid.uuid4().hex[:8]}"
    settings = retrainer.RetrainerSettings(bootstrap_servers=broker.bootstrap, registry=str(tmp_path / "r"),
                                           archive=str(tmp_path / "a"), updates_topic=topic, canary_share=0.25)
    assert settings.spec().canary
    monkeypatch.setattr(retrainer.RetrainerService, "_admin", None)
    svc = retrainer.RetrainerService(settings)
    (tmp_path / "r").mkdir()  # announced under the registry's pointer lock, which lives in it
    assert retrainer.announce_published(settings, RetrainOutcome("published", "", version="v9",
                                                                 path=str(tmp_path / "r" / "v9")))
    with AnnouncementWatcher(broker.bootstrap, topic) as w:
        ann = w.wait_for("v9", 20)
    assert ann is not None and (ann.reason, ann.share) == ("canary", 0.25)
    skipped = asyncio.run(svc.retrain_now())  # a new canary would replace this one before it could be judged
    assert skipped.status == "skipped" and "the canary v9 still serves" in skipped.reason
    for bad in (1.0, -0.1):
        with pytest.raises(ConfigError, match="canary-share"):
            retrainer.RetrainerSettings(bootstrap_servers="h:1", registry="r", archive="a",
                                        canary_share=bad).validate()


@pytest.mark.broker
@pytest.mark.parametrize("existing", [None, 2])
def test_the_service_creates_a_missing_events_topic_at_the_workers_count_before_faust_subscribes(
        broker, tmp_path, monkeypatch, existing):
    """Faust's consumer asks for the topic's metadata with auto-creation on: the broker's own num.partitions (1 on
    Apache Kafka) would bound how many workers have work. An existing topic keeps its count."""
    import faust

    import stream.retrainer as retrainer
    from stream.kafka_clients import admin_client
    from stream.topics import DEFAULT_PARTITIONS, TopicSpec, ensure_topics, partition_counts

    topic, admin = f"ev-{uuid.uuid4().hex[:8]}", admin_client(broker.bootstrap, {})
    if existing:
        ensure_topics(admin, [TopicSpec(topic, existing)])
    seen: list[int | None] = []

    class Subscribing:
        def __init__(self, *args, **kwargs) -> None:
            seen.append(partition_counts(admin).get(topic))

        def execute_from_commandline(self) -> None:
            raise SystemExit(0)

    monkeypatch.setattr(faust, "Worker", Subscribing)
    svc = retrainer.RetrainerService(retrainer.RetrainerSettings(
        bootstrap_servers=broker.bootstrap, registry=str(tmp_path / "r"), archive=str(tmp_path / "a"),
        events_topic=topic, metrics_port=0))
    assert svc.run() == 0
    assert seen == [existing or DEFAULT_PARTITIONS]


def test_a_first_batch_before_the_assignments_follow_is_archived_under_the_topics_log(tmp_path, monkeypatch):
    """Faust can hand the agent a batch before the assignment signal's follow has run: the batch must
    still be named for the topic's log (unnamed files of two logs would share names and overwrite)."""
    from types import SimpleNamespace

    import stream.retrainer as retrainer
    from model.events import encode_event

    monkeypatch.setattr(retrainer, "topic_id", lambda admin, topic: "0a" * 16)
    monkeypatch.setattr(retrainer.RetrainerService, "_admin", None)  # no broker here
    svc = retrainer.RetrainerService(retrainer.RetrainerSettings(
        bootstrap_servers="127.0.0.1:9", registry=str(tmp_path / "r"), archive=str(tmp_path / "a")))
    batch = [SimpleNamespace(message=SimpleNamespace(partition=0, offset=k), headers={},
                             value=encode_event(Event(f"u{k}", "i", "click", T0 + k))) for k in range(4)]
    asyncio.run(svc._archive(batch))
    names = [p.name for p in (tmp_path / "a").rglob("*.parquet")]
    assert names and all(n.startswith(f"{svc.settings.events_topic}+t{'0a' * 16}+") for n in names)


def test_window_follows_the_newest_archived_day(tmp_path):
    w = ArchiveWriter(tmp_path, "ev")
    w.write([ArchivedEvent(0, k, Event(f"u{k}", "i", "click", T0 + k * DAY_MS)) for k in range(10)])
    assert count_events(tmp_path, 3) == 3 and count_events(tmp_path, 30) == 10


def _today_ms() -> int:
    return int(time.time() * 1000)


def test_one_event_dated_in_the_future_does_not_move_the_window_off_todays_events(tmp_path, caplog):
    """The window ends at the newest day folder no later than tomorrow (UTC): a wrong clock's event of 2199 is
    archived (and counted) but trains nobody until its day, while a clock one day ahead still counts."""
    from stream.archive import window_days

    now = _today_ms()
    w = ArchiveWriter(tmp_path, "ev")
    w.write([ArchivedEvent(0, k, Event(f"u{k}", "i", "click", now - (k % 3) * DAY_MS)) for k in range(30)])
    w.write([ArchivedEvent(0, 30, Event("u", "i", "click", 7_226_582_400_000))])  # 2199-01-01
    assert w.future_events == 1 and "dated after tomorrow" in caplog.text
    assert count_events(tmp_path, 7) == 30 and len(read_window(tmp_path, 7)) == 30
    assert "date=2199-01-01" not in [d.name for d in window_days(tmp_path, 7)]
    w.write([ArchivedEvent(0, 31, Event("u", "i", "click", now + DAY_MS))])  # tomorrow: a clock a day ahead
    assert w.future_events == 1 and count_events(tmp_path, 7) == 31
    assert count_events(tmp_path, 1, end=date(2199, 1, 1)) == 1  # an explicit end still wins


def test_a_historical_archive_keeps_its_window_at_its_newest_day(tmp_path):
    w = ArchiveWriter(tmp_path, "ev")
    w.write([ArchivedEvent(0, k, Event(f"u{k}", "i", "click", T0 - k * DAY_MS)) for k in range(10)])  # 2025
    assert count_events(tmp_path, 3) == 3 and w.future_events == 0


def test_the_service_counts_events_dated_after_tomorrow(tmp_path, monkeypatch):
    svc = _offline_service(tmp_path, monkeypatch)
    asyncio.run(svc._archive(_batch([(0, 0, T0), (0, 1, 7_226_582_400_000)])))
    assert svc.metrics.registry.get_sample_value("hrnn_retrainer_future_events_total") == 1
    assert svc.metrics.registry.get_sample_value("hrnn_retrainer_archived_events_total") == 2


def test_a_service_built_and_never_run_leaves_nothing_in_the_temp_folder(tmp_path, monkeypatch):
    import tempfile

    tmp = tmp_path / "tmp"
    tmp.mkdir()
    monkeypatch.setattr(tempfile, "tempdir", str(tmp))
    svc = _offline_service(tmp_path, monkeypatch)
    assert svc.app.conf.datadir.parent == tmp
    assert not list(tmp.iterdir())


# --- a failing archive: retried, never acked unwritten, reported on /health ---

def _offline_service(tmp_path: Path, monkeypatch, **settings):
    """A RetrainerService with no broker behind it (the agent's methods are driven directly)."""
    import stream.retrainer as retrainer

    monkeypatch.setattr(retrainer, "topic_id", lambda admin, topic: "0a" * 16)
    monkeypatch.setattr(retrainer.RetrainerService, "_admin", None)
    return retrainer.RetrainerService(retrainer.RetrainerSettings(
        bootstrap_servers="127.0.0.1:9", registry=str(tmp_path / "r"), archive=str(tmp_path / "a"), **settings))


def _batch(rows: list[tuple[int, int, int]], headers: dict[str, bytes] | None = None) -> list:
    """Faust events of (partition, offset, timestamp) as the agent gets them (each with these headers)."""
    from types import SimpleNamespace

    from model.events import encode_event

    return [SimpleNamespace(message=SimpleNamespace(partition=p, offset=k, acked=False), headers=dict(headers or {}),
                            value=encode_event(Event(f"u{p}-{k}", "i", "click", ts))) for p, k, ts in rows]


def test_the_workers_rekeyed_copies_of_mis_keyed_events_are_not_archived_again(tmp_path, monkeypatch):
    """The worker writes a re-keyed copy of each mis-keyed event back onto the events topic (header
    hrnn-repartitioned-from; a crash before its commit copies it again): the original is archived by its
    own offset, so every event is archived once, and the copies are neither written nor counted."""
    from types import SimpleNamespace

    from stream import records

    svc = _offline_service(tmp_path, monkeypatch)
    well_keyed = _batch([(0, k, T0 + k) for k in range(10)])
    mis_keyed = _batch([(1, k, T0 + 10 + k) for k in range(10)])
    # the same events at other offsets of their users' partition, two copies each (the worker crashed once
    # between producing them and committing)
    copies = [SimpleNamespace(message=SimpleNamespace(partition=0, offset=10 + 2 * k + c, acked=False),
                              headers=dict(records.repartition_headers(svc.settings.events_topic, 1, k)),
                              value=ev.value) for k, ev in enumerate(mis_keyed) for c in range(2)]
    asyncio.run(svc._archive(well_keyed + mis_keyed + copies))
    data = read_window(tmp_path / "a", 30)
    assert sorted(data.user_ids[data.user]) == sorted([f"u0-{k}" for k in range(10)] + [f"u1-{k}" for k in range(10)])
    value = svc.metrics.registry.get_sample_value
    assert value("hrnn_retrainer_archived_events_total") == 20 and value("hrnn_retrainer_duplicate_events_total") == 0


def test_a_restart_that_cannot_read_the_topic_id_yet_does_not_archive_the_replayed_batch_again(tmp_path, monkeypatch):
    """A process killed after archiving a batch, before its offsets were committed, reads it again after the
    restart. Should the topic id not be readable then (a broker timing out), the batch waits, unacked and retried,
    until it is: the id-less log, with no marks of its own, would have it archived twice as a "new log"."""
    import contextlib

    import stream.retrainer as retrainer
    from stream.kafka_clients import KafkaClientError

    batch = _batch([(0, k, T0 + k) for k in range(10)])
    first = _offline_service(tmp_path, monkeypatch)
    first._follow_events_log()
    asyncio.run(first._archive(batch))  # then SIGKILLed, before Faust commits the batch
    lookups = []

    def times_out_twice(admin, topic):
        lookups.append(topic)
        if len(lookups) <= 2:  # the assignment's lookup and the first write's
            raise KafkaClientError(f"cannot describe topic {topic!r}: timed out")
        return "0a" * 16

    restarted = _offline_service(tmp_path, monkeypatch, archive_retry_first_s=0.01)
    monkeypatch.setattr(retrainer, "topic_id", times_out_twice)
    with contextlib.suppress(KafkaClientError):  # as the assignment's handler does
        restarted._follow_events_log()
    asyncio.run(restarted._archive(_batch([(0, k, T0 + k) for k in range(10)])))  # the batch read again
    assert count_events(tmp_path / "a", 30) == 10 and len(lookups) == 3
    names = {p.name for p in (tmp_path / "a").rglob("*.parquet")}
    assert all(f"+t{'0a' * 16}+" in n for n in names)
    value = restarted.metrics.registry.get_sample_value
    assert value("hrnn_retrainer_duplicate_events_total") == 10 and value("hrnn_retrainer_archived_events_total") == 0
    assert value("hrnn_retrainer_events_topic_new_logs_total") == 0
    assert value("hrnn_retrainer_archive_write_failures_total") == 1 and value("hrnn_retrainer_archive_failing") == 0


def test_a_failed_archive_write_is_retried_and_every_event_archived_exactly_once(tmp_path, monkeypatch):
    """A write failing after one partition's files (disk full) is retried: the agent returns, and so lets
    Faust ack the batch, only once all of it is written; meanwhile /health says 503 and the metrics say why."""
    from stream.archive import ArchiveError
    from stream.observability import start_http_server

    svc = _offline_service(tmp_path, monkeypatch, archive_retry_first_s=0.01)
    real_write_file, calls, seen = svc.writer._write_file, [], []

    def disk_full_once(day, name, rows):
        calls.append(name)
        if len(calls) == 2:  # the second partition's file, after the first partition's was written
            raise ArchiveError(f"cannot write {name}: [Errno 28] No space left on device")
        if len(calls) == 3:  # the retry: the service reports the failure while it lasts
            seen.append(health_of(server.port))
        return real_write_file(day, name, rows)

    monkeypatch.setattr(svc.writer, "_write_file", disk_full_once)
    batch = _batch([(k % 2, k // 2, T0 + k) for k in range(20)])
    with start_http_server(svc.metrics, 0, svc.health) as server:
        asyncio.run(svc._archive(batch))
        after = health_of(server.port)
    data = read_window(tmp_path / "a", 30)
    assert sorted(data.user_ids[data.user]) == sorted(f"u{k % 2}-{k // 2}" for k in range(20))  # each once
    value = svc.metrics.registry.get_sample_value
    assert value("hrnn_retrainer_archive_write_failures_total") == 1
    assert value("hrnn_retrainer_archived_events_total") == 20 and value("hrnn_retrainer_duplicate_events_total") == 0
    assert value("hrnn_retrainer_archive_failing") == 0
    assert seen[0][0] == 503 and "No space left on device" in seen[0][1]["archive_error"]
    assert after[0] == 200 and after[1]["archive_error"] is None


def test_a_crashed_archive_agent_turns_health_unavailable(tmp_path, monkeypatch):
    """An exception that still leaves the agent (Faust then acks its batch and restarts the agent) is reported
    for good: /health says 503 with the reason, even once a restarted agent archives again."""
    from stream.observability import start_http_server

    svc = _offline_service(tmp_path, monkeypatch)

    class Stream:
        async def take_events(self, n, within):
            yield _batch([(0, 0, T0)])

    async def broken(batch):
        raise RuntimeError("a bug in the agent")

    archive = svc._archive
    monkeypatch.setattr(svc, "_archive", broken)
    with start_http_server(svc.metrics, 0, svc.health) as server:
        assert health_of(server.port)[0] == 200
        with pytest.raises(RuntimeError):
            asyncio.run(svc._archive_stream(Stream()))
        asyncio.run(archive(_batch([(0, 1, T0)])))  # as Faust's restarted agent would
        code, body = health_of(server.port)
    assert code == 503 and body["agent_crash"] == "RuntimeError: a bug in the agent"


# --- an archive holding a bad file: the file is skipped, a run never crashes the service ---

def _archive_with_a_zero_byte_file(root: Path, events: int = 20) -> Path:
    """`events` valid events, and an empty file under the name of a complete batch: the bad file."""
    ArchiveWriter(root, "ev").write([ArchivedEvent(0, k, Event(f"u{k}", "i", "click", T0 + k)) for k in range(events)])
    bad = root / "date=2026-01-01" / "ev+p1+000000000000-000000000009+1of1.parquet"
    bad.touch()
    return bad


def test_a_scheduled_run_skips_an_unreadable_archive_file_and_says_so_in_its_outcome(tmp_path, monkeypatch, caplog):
    svc = _offline_service(tmp_path, monkeypatch)
    bad = _archive_with_a_zero_byte_file(tmp_path / "a")
    out = asyncio.run(svc.retrain_now())
    assert out.status == "skipped" and out.window_events == 20
    assert out.reason == ("20 events in the 7-day window, 1000 needed; 1 archive file(s) skipped as unreadable or "
                          "not the archive's (the log names each)")
    assert f"skipping archive file {bad}" in caplog.text


def test_a_scheduled_run_whose_window_cannot_be_counted_fails_instead_of_crashing_the_app(tmp_path, monkeypatch):
    """An exception out of the schedule's task would crash the Faust app, archiving with it, at every start."""
    import stream.archive as archive

    svc = _offline_service(tmp_path, monkeypatch)

    def disk_error(root):
        raise OSError(5, "Input/output error")

    monkeypatch.setattr(archive, "_complete_batches", disk_error)
    out = asyncio.run(svc.retrain_now())
    assert out.status == "failed" and "Input/output error" in out.reason
    assert svc.metrics.registry.get_sample_value("hrnn_retrainer_runs_total", {"status": "failed"}) == 1


def test_a_scheduled_run_over_future_events_only_says_they_were_left_out(tmp_path, monkeypatch):
    svc = _offline_service(tmp_path, monkeypatch)
    ArchiveWriter(tmp_path / "a", "ev").write([ArchivedEvent(0, 0, Event("u", "i", "click", 7_226_582_400_000))])
    out = asyncio.run(svc.retrain_now())
    assert out.status == "skipped" and "1 archive file(s) dated after tomorrow left out until their day" in out.reason


SKIPPED_NOTE = "; 1 archive file(s) skipped as unreadable or not the archive's (the log names each)"


def test_a_run_over_an_archive_with_an_unreadable_file_reads_the_window_without_it(tmp_path):
    """`hrnn retrainer --once`: one bad file is no traceback, and the window's other events still count."""
    _archive_with_a_zero_byte_file(tmp_path / "archive")
    out = retrain(RetrainSpec(registry=str(tmp_path / "r"), archive=str(tmp_path / "archive"), window_days=30,
                              min_events=1000))
    assert out.status == "skipped" and out.window_events == 20
    assert out.reason.endswith(SKIPPED_NOTE)


def test_a_run_that_fails_after_reading_its_window_still_says_what_the_window_left_out(tmp_path, monkeypatch):
    import stream.retrain_job
    from stream.archive import ArchiveError

    _archive_with_a_zero_byte_file(tmp_path / "archive")

    def unreadable(*args, **kwargs):
        raise ArchiveError("the window's files cannot be read")

    monkeypatch.setattr(stream.retrain_job, "read_window", unreadable)
    out = retrain(RetrainSpec(registry=str(tmp_path / "r"), archive=str(tmp_path / "archive"), window_days=30,
                              min_events=1))
    assert out.status == "failed" and out.reason == "the window's files cannot be read" + SKIPPED_NOTE


@pytest.mark.parametrize("job_says", ["the retraining process ran past 0.3 s and was killed",
                                      "mrr@20 not better" + SKIPPED_NOTE])
def test_the_service_says_once_what_the_window_left_out_whether_or_not_its_job_got_to_say_it(
        tmp_path, monkeypatch, job_says):
    """A job killed at --job-timeout-s, or crashed, writes no outcome of its own: the service's scan speaks for it."""
    import stream.retrainer as retrainer
    from stream.archive import scan_window
    from stream.retrain_job import RetrainOutcome

    _archive_with_a_zero_byte_file(tmp_path / "archive")

    async def job(spec, timeout_s):
        return RetrainOutcome("failed" if "killed" in job_says else "rejected", job_says)

    monkeypatch.setattr(retrainer, "run_job", job)
    svc = _offline_service(tmp_path, monkeypatch, min_events=1)
    out = asyncio.run(svc._retrain_on(scan_window(tmp_path / "archive", 30)))
    assert out.reason.count(SKIPPED_NOTE) == 1 and out.reason.endswith(SKIPPED_NOTE)


def test_a_run_that_reads_its_window_checks_each_file_once(tmp_path, caplog):
    """Counting the window and reading it share one scan: the bad file is warned of once, not twice."""
    bad = _archive_with_a_zero_byte_file(tmp_path / "archive")
    with caplog.at_level(logging.WARNING, logger="stream.archive"):
        retrain(RetrainSpec(registry=str(tmp_path / "r"), archive=str(tmp_path / "archive"), window_days=30,
                            min_events=1, hrnn=dict(TINY)))
    assert [r.file for r in caplog.records if r.getMessage().startswith("skipping archive file")] == [str(bad)]


# --- announcing a published version: under the registry's pointer lock, never over a promote since ---

def _published(tmp_path: Path, names: list[str], current: str) -> Path:
    """A registry holding `names`, CURRENT at `current` (as a run's publish left it)."""
    reg, cfg, items = tmp_path / "r", HRNNConfig(hidden_dimension=32), [f"i{k}" for k in range(10)]
    for name in names:
        save_version(reg, HRNN(len(items), cfg), cfg, DataConfig(), items, ["click"], version=name, make_current=False)
    from model.registry import promote

    promote(reg, current)
    return reg


def _recorded_announcements(monkeypatch) -> list[tuple[str, str, float]]:
    import stream.announce

    sent = []
    monkeypatch.setattr(stream.announce, "announce",
                        lambda bootstrap, topic, version, path, **k: sent.append((version, k["reason"], k["share"])))
    return sent


def test_a_version_promoted_over_before_the_service_announces_it_is_not_announced(tmp_path, monkeypatch, caplog):
    """The run (a child process) publishes; an operator's promote lands before the service announces: announced
    after it, workers would serve a version CURRENT does not name. The operator's choice stands."""
    import stream.retrainer as retrainer
    from model.registry import promote
    from stream.archive import Window
    from stream.retrain_job import RetrainOutcome

    reg = _published(tmp_path, ["v-old", "v-new"], current="v-new")
    sent = _recorded_announcements(monkeypatch)

    async def publish_then_an_operator_promotes(spec, timeout_s):
        promote(reg, "v-old")  # `hrnn models promote`, between the child's publish and the announcement
        return RetrainOutcome("published", "mrr@20 better", version="v-new", path=str(reg / "v-new"))

    monkeypatch.setattr(retrainer, "run_job", publish_then_an_operator_promotes)
    svc = _offline_service(tmp_path, monkeypatch, min_events=1)
    out = asyncio.run(svc._retrain_on(Window([], [], 5000, {}, 0)))
    assert out.status == "published" and sent == [] and current_version(reg) == "v-old"
    assert out.reason == "mrr@20 better; not announced: CURRENT moved to v-old after publishing (a promote or rollback)"
    assert "published v-new but did not announce it: CURRENT names v-old since" in caplog.text
    # the gauge says when retraining last reached the workers: this version never did
    assert svc.metrics.registry.get_sample_value("hrnn_retrainer_last_published_timestamp_seconds") == 0


def test_the_service_announces_a_published_version_under_the_registrys_pointer_lock(tmp_path, monkeypatch):
    """Announcing takes the lock `hrnn models promote` holds from its move of CURRENT to its announcement: a
    promote in progress is waited for (here, too long: nothing is announced, and the run says why)."""
    import model.registry
    import stream.retrainer as retrainer
    from stream.retrain_job import RetrainOutcome

    reg = _published(tmp_path, ["v-old", "v-new"], current="v-new")
    sent = _recorded_announcements(monkeypatch)
    settings = retrainer.RetrainerSettings(bootstrap_servers="127.0.0.1:9", registry=str(reg), archive="a")
    published = RetrainOutcome("published", "", version="v-new", path=str(reg / "v-new"))
    monkeypatch.setattr(model.registry, "CURRENT_LOCK_WAIT_S", 0.2)
    with open(reg / model.registry.CURRENT_LOCK, "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)  # a promote is announcing
        assert not retrainer.announce_published(settings, published)
    assert sent == [] and "has held its lock" in published.reason
    assert retrainer.announce_published(settings, published)  # once it is free
    assert sent == [("v-new", "retrain", 1.0)]


def test_a_canary_is_announced_only_beside_the_version_current_when_it_was_published(tmp_path, monkeypatch):
    """A canary is not CURRENT: it is announced while CURRENT still names the version it was compared with. Once
    a promote moved CURRENT (to another version, or to the canary itself, which then serves everyone already),
    announcing it would start a canary the operator's choice came after, judged against a version that no longer
    serves."""
    import stream.retrainer as retrainer
    from model.registry import promote
    from stream.retrain_job import RetrainOutcome

    reg = _published(tmp_path, ["v-old", "v-cur", "v-canary"], current="v-cur")
    sent = _recorded_announcements(monkeypatch)
    settings = retrainer.RetrainerSettings(bootstrap_servers="127.0.0.1:9", registry=str(reg), archive="a",
                                           canary_share=0.25)

    def canary() -> RetrainOutcome:
        out = RetrainOutcome("published", "", version="v-canary", path=str(reg / "v-canary"))
        out.current = "v-cur"  # as the run published it: beside v-cur
        return out

    assert retrainer.announce_published(settings, canary()) and sent == [("v-canary", "canary", 0.25)]
    for moved_to in ("v-old", "v-canary"):
        promote(reg, moved_to)
        out = canary()
        assert not retrainer.announce_published(settings, out), moved_to
        assert f"not announced: CURRENT moved to {moved_to}" in out.reason and len(sent) == 1


# --- one retraining run ---

def test_gate():
    assert passes_gate(0.10, None, 0.05)
    assert passes_gate(0.096, 0.10, 0.05) and not passes_gate(0.094, 0.10, 0.05)
    assert not passes_gate(0.10, 0.10, -0.01)  # a negative margin demands an improvement


def test_warm_start_carries_item_rows_by_id(tmp_path):
    cfg = HRNNConfig(hidden_dimension=32)
    old_items = ["a", "b", "c"]
    serving = HRNN(len(old_items), cfg)
    loaded = load_version(save_version(tmp_path, serving, cfg, DataConfig(), old_items, ["click"]))
    state, info = warm_start_state(loaded, ["c", "d"], cfg)
    assert info == {"from": loaded.version, "items_shared": 1, "items_new": 1}
    old = serving.state_dict()
    assert torch.equal(state["item_emb.weight"][0], old["item_emb.weight"][2])
    assert torch.equal(state["session_gru.weight_hh"], old["session_gru.weight_hh"])
    model = HRNN(2, cfg)
    model.load_state_dict(state)  # fits the new catalogue
    none, why = warm_start_state(loaded, ["x", "y"], cfg)
    assert none is None and "no item" in why["reason"]
    none, why = warm_start_state(loaded, ["a"], HRNNConfig(hidden_dimension=48))
    assert none is None and "shape" in why["reason"]


def test_retrain_publishes_compares_and_rejects(tmp_path, synth):
    ArchiveWriter(tmp_path / "archive", "ev").write(_archived(synth))
    reg = tmp_path / "registry"
    spec = RetrainSpec(registry=str(reg), archive=str(tmp_path / "archive"), window_days=30, min_events=100,
                       hrnn=dict(TINY))
    first = retrain(spec)
    assert first.status == "published" and first.serving_version is None
    assert current_version(reg) == first.version and first.candidate["mrr@20"] > 0
    from stream.retrainer import GATE_METRICS  # what the service's --metric check accepts at start

    assert set(first.candidate) == GATE_METRICS

    spec.warm_start, spec.margin = True, 1.0  # anything not worse than 100 % passes
    second = retrain(spec)
    assert second.status == "published" and second.serving_version == first.version
    assert second.warm_start["from"] == first.version and second.warm_start["items_shared"] > 0
    metrics = json.loads((reg / second.version / "metrics.json").read_text())
    cmp_ = metrics["comparison"]
    assert cmp_["serving_version"] == first.version and cmp_["accepted"] and cmp_["metric"] == "mrr@20"
    assert cmp_["serving"]["mrr@20"] == pytest.approx(second.serving["mrr@20"])
    assert metrics["retrain"]["warm_start"]["from"] == first.version

    spec.margin = -10.0  # must beat the serving version elevenfold: rejected
    third = retrain(spec)
    assert third.status == "rejected" and "worse" in third.reason
    assert current_version(reg) == second.version and len(list_versions(reg)) == 2
    assert not [p for p in reg.iterdir() if p.name.startswith(".staging")]

    spec.margin, spec.canary = 1.0, True  # a canary is published beside the current version, not over it
    fourth = retrain(spec)
    assert fourth.status == "published" and fourth.serving_version == second.version
    assert current_version(reg) == second.version and len(list_versions(reg)) == 3


def test_a_failed_prune_after_publishing_still_reports_the_version_published(tmp_path, synth, monkeypatch):
    import stream.retrain_job as retrain_job

    def prune_fails(registry, keep, protect=()):
        raise OSError("registry volume went read-only")

    monkeypatch.setattr(retrain_job, "prune", prune_fails)
    ArchiveWriter(tmp_path / "archive", "ev").write(_archived(synth))
    reg = tmp_path / "registry"
    out = retrain(RetrainSpec(registry=str(reg), archive=str(tmp_path / "archive"), window_days=30, min_events=100,
                              keep_versions=1, hrnn=dict(TINY)))
    assert out.status == "published" and out.version == current_version(reg) and Path(out.path) == reg / out.version
    assert "pruning failed: OSError: registry volume went read-only" in out.reason


def _once(monkeypatch, tmp_path: Path, *extra: str, canary=None) -> tuple[int, list[tuple[str, str, float]]]:
    """`hrnn retrainer --once` with a broker address, its announcements recorded instead of sent; `canary`: the
    announcement of a canary serving now."""
    import stream.announce

    sent = []
    monkeypatch.setattr(stream.announce, "announce",
                        lambda bootstrap, topic, version, path, **k: sent.append((version, k["reason"], k["share"])))
    monkeypatch.setattr(stream.announce, "latest_canary", lambda *a, **k: canary)
    return _hrnn_once(monkeypatch, tmp_path, *extra), sent


def _hrnn_once(monkeypatch, tmp_path: Path, *extra: str) -> int:
    """`hrnn retrainer --once` on a tiny network, with a broker address (its clients replaced by the caller)."""
    import stream.observability
    from stream.cli import main as hrnn

    monkeypatch.setattr(stream.observability, "setup_json_logging", lambda level: None)  # keep pytest's logging
    return hrnn(["retrainer", "--once", "--registry", str(tmp_path / "registry"), "--archive", str(tmp_path / "archive"),
                 "--window-days", "30", "--min-events", "100", "--margin", "1.0", "--bootstrap-servers", "127.0.0.1:9",
                 "--hidden-dimension", "32", "--epochs", "1", "--n-sample", "32", "--batch-size", "32", *extra])


def test_once_hands_the_kafka_client_settings_to_the_clients_that_read_and_announce(tmp_path, synth, monkeypatch):
    """The file's lines, then the flags (which win), reach the canary lookup and the announcement."""
    import stream.announce

    ArchiveWriter(tmp_path / "archive", "ev").write(_archived(synth))
    props = tmp_path / "client.properties"
    props.write_text("# managed kafka\nclient.id=from-file\nsocket.keepalive.enable=true\n")
    seen = []
    monkeypatch.setattr(stream.announce, "latest_canary", lambda *a, **k: seen.append(("lookup", k["extra"])))
    monkeypatch.setattr(stream.announce, "announce", lambda *a, **k: seen.append(("announce", k["extra"])))
    rc = _hrnn_once(monkeypatch, tmp_path, "--canary-share", "0.25", "--kafka-config-file", str(props),
                    "--kafka-config", "client.id=from-flag")
    given = {"client.id": "from-flag", "socket.keepalive.enable": "true"}
    assert rc == 0 and seen == [("lookup", given), ("announce", given)]


def test_once_with_a_canary_share_announces_a_canary_and_leaves_current_alone(tmp_path, synth, monkeypatch, capsys):
    ArchiveWriter(tmp_path / "archive", "ev").write(_archived(synth))
    rc, sent = _once(monkeypatch, tmp_path)
    first = current_version(tmp_path / "registry")
    assert rc == 0 and sent == [(first, "retrain", 1.0)]
    capsys.readouterr()
    rc, sent = _once(monkeypatch, tmp_path, "--canary-share", "0.25")
    out = json.loads(capsys.readouterr().out)  # the run's outcome
    assert rc == 0 and out["status"] == "published" and current_version(tmp_path / "registry") == first
    assert sent == [(out["version"], "canary", 0.25)]


def test_once_with_a_canary_share_skips_while_a_canary_serves(tmp_path, synth, monkeypatch, capsys):
    from stream.announce import Announcement

    ArchiveWriter(tmp_path / "archive", "ev").write(_archived(synth))
    serving = Announcement("v9", str(tmp_path / "registry" / "v9"), "", "canary", "", 0.25)
    rc, sent = _once(monkeypatch, tmp_path, "--canary-share", "0.25", canary=serving)
    out = json.loads(capsys.readouterr().out)
    assert rc == 0 and out["status"] == "skipped" and "the canary v9 still serves" in out["reason"]
    assert sent == [] and not (tmp_path / "registry").exists()  # nothing trained, nothing announced
    rc, sent = _once(monkeypatch, tmp_path, canary=serving)  # a full rollout ends any canary: it runs
    assert rc == 0 and [reason for _, reason, _ in sent] == ["retrain"]


@pytest.mark.parametrize("flag, value", [("--canary-share", "1.5"), ("--keep-versions", "-1"), ("--window-days", "0"),
                                         ("--kafka-config", "no.such.setting=1")])
def test_once_refuses_bad_settings_before_training(tmp_path, monkeypatch, capsys, flag, value):
    rc, sent = _once(monkeypatch, tmp_path, flag, value)
    assert rc == 2 and flag in capsys.readouterr().err
    assert sent == [] and not (tmp_path / "registry").exists()


@pytest.fixture
def busy_port():
    """A port another process listens on."""
    import socket

    with socket.socket() as s:
        s.bind(("0.0.0.0", 0))
        s.listen()
        yield s.getsockname()[1]


@pytest.mark.parametrize("case, flag", [
    ("metrics port out of range", "--metrics-port"),
    ("metrics port taken", "--metrics-port"),
    ("archive is a file", "--archive"),
    ("archive under a file", "--archive"),
    ("once: registry is a file", "--registry"),
    ("once: archive is a file", "--archive"),
    ("a security setting Faust cannot apply", "ssl.keystore.location"),
    ("a setting librdkafka refuses", "no.such.setting"),
    ("a client properties file that is missing", "client.properties"),
    ("an events topic Kafka would refuse", "--events-topic"),
    ("an app id Faust would name illegal topics after", "--app-id"),
    ("once: an updates topic Kafka would refuse", "--updates-topic"),
    ("once: a config key that is no setting", "unknown setting 'hidden_dimensions'"),
])
def test_bad_flags_exit_2_with_what_to_fix(tmp_path, monkeypatch, capsys, busy_port, case, flag):
    """Bad input is said plainly (exit 2, the flag named), never a traceback; no broker is reached."""
    import stream.observability
    from stream.cli import main as hrnn

    monkeypatch.setattr(stream.observability, "setup_json_logging", lambda level: None)
    a_file = tmp_path / "a-file"
    a_file.touch()
    registry, archive, extra = tmp_path / "registry", tmp_path / "archive", []
    if case == "metrics port out of range":
        extra = ["--metrics-port", "70000"]
    elif case == "metrics port taken":
        extra = ["--metrics-port", str(busy_port)]
    elif case.endswith("archive is a file"):
        archive = a_file
    elif case == "archive under a file":
        archive = a_file / "archive"
    elif case == "once: registry is a file":
        registry = a_file
    elif case == "a security setting Faust cannot apply":
        extra = ["--kafka-config", "security.protocol=SSL", "--kafka-config", "ssl.keystore.location=/k.p12"]
    elif case == "a setting librdkafka refuses":
        extra = ["--kafka-config", "no.such.setting=1"]
    elif case == "a client properties file that is missing":
        extra = ["--kafka-config-file", str(tmp_path / "client.properties")]
    elif case == "an events topic Kafka would refuse":
        extra = ["--events-topic", "../events"]
    elif case == "an app id Faust would name illegal topics after":
        extra = ["--app-id", "retrainer/eu"]
    elif case == "once: an updates topic Kafka would refuse":
        extra = ["--updates-topic", "model updates"]
    elif case == "once: a config key that is no setting":  # as `hrnn train` refuses it, not trained without it
        (tmp_path / "typo.json").write_text('{"hidden_dimensions": 64}')
        extra = ["--config", str(tmp_path / "typo.json")]
    service = [] if case.startswith("once") else ["--bootstrap-servers", "127.0.0.1:9"]
    once = ["--once"] if case.startswith("once") else []
    rc = hrnn(["retrainer", *once, *service, "--registry", str(registry), "--archive", str(archive), *extra])
    err = capsys.readouterr().err
    assert rc == 2 and err.startswith("hrnn retrainer: error: ") and flag in err and "Traceback" not in err
    assert not registry.exists() or registry == a_file


def test_a_service_refused_at_start_leaves_no_kafka_client_dialling(tmp_path, monkeypatch, busy_port):
    """A start refused after the service was built (its metrics port taken) drops the admin client it built,
    which otherwise went on dialling the broker until the process ended."""
    import gc

    import stream.observability
    from confluent_kafka.admin import AdminClient
    from stream.cli import main as hrnn

    def admins() -> int:
        gc.collect()
        return sum(isinstance(o, AdminClient) for o in gc.get_objects())

    monkeypatch.setattr(stream.observability, "setup_json_logging", lambda level: None)
    before = admins()
    assert hrnn(["retrainer", "--bootstrap-servers", "127.0.0.1:9", "--registry", str(tmp_path / "r"),
                 "--archive", str(tmp_path / "a"), "--metrics-port", str(busy_port)]) == 2
    assert admins() == before


def test_a_registry_that_cannot_be_one_fails_the_run_instead_of_raising(tmp_path):
    a_file = tmp_path / "a-file"
    a_file.touch()
    out = retrain(RetrainSpec(registry=str(a_file), archive=str(tmp_path / "a")))
    assert out.status == "failed" and f"registry {a_file} cannot hold model versions" in out.reason


def test_an_archive_writer_refuses_a_file_with_a_typed_error(tmp_path):
    (tmp_path / "a-file").touch()
    with pytest.raises(ArchiveError, match="cannot be a directory"):
        ArchiveWriter(tmp_path / "a-file", "ev")


def test_a_single_run_needs_no_broker_and_refuses_a_negative_keep_versions():
    from stream.retrainer import RetrainerSettings

    settings = RetrainerSettings(bootstrap_servers="", registry="r", archive="a", keep_versions=0)
    settings.validate_run()  # what --once checks
    with pytest.raises(ConfigError, match="--bootstrap-servers"):
        settings.validate()  # the service's
    settings.keep_versions = -1
    with pytest.raises(ConfigError, match="--keep-versions must be at least 0"):
        settings.validate_run()


@pytest.mark.parametrize("flag, value, says", [
    ("--interval-s", "nan", "give --interval-s N (a finite number > 0, got nan)"),  # never due: never runs
    ("--interval-s", "inf", "give --interval-s N (a finite number > 0, got inf)"),
    ("--group-session-timeout-s", "nan", "--group-session-timeout-s must be a finite number of at least 3"),
    ("--group-session-timeout-s", "2", "--group-session-timeout-s must be a finite number of at least 3"),
])
def test_the_service_refuses_a_schedule_or_group_session_that_is_not_a_finite_number_in_range(tmp_path, flag, value,
                                                                                              says):
    proc = subprocess.run([sys.executable, "-m", "stream.cli", "retrainer", "--bootstrap-servers", "127.0.0.1:9",
                           "--registry", str(tmp_path / "r"), "--archive", str(tmp_path / "a"), flag, value],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and says in proc.stderr and "Traceback" not in proc.stderr


def test_a_too_short_group_session_names_the_flag_that_sets_it_not_the_models_session_gap():
    from stream.retrainer import RetrainerSettings

    settings = RetrainerSettings(bootstrap_servers="127.0.0.1:9", registry="r", archive="a", session_timeout_s=2)
    with pytest.raises(ConfigError, match="^--group-session-timeout-s must"):
        settings.validate()


def test_retrain_skips_a_thin_window(tmp_path):
    ArchiveWriter(tmp_path / "a", "ev").write([ArchivedEvent(0, 0, Event("u", "i", "click", T0))])
    out = retrain(RetrainSpec(registry=str(tmp_path / "r"), archive=str(tmp_path / "a"), min_events=10))
    assert out.status == "skipped" and "1 events" in out.reason


# --- the service against the broker ---

class Service:
    """`hrnn retrainer` in a subprocess, its JSON log lines collected as they come."""

    def __init__(self, name: str, args: list[str], tmpdir: Path | None = None) -> None:
        self.name, self.lines = name, []
        self._lock = threading.Lock()
        env = {**os.environ, "TMPDIR": str(tmpdir)} if tmpdir else None
        self.proc = subprocess.Popen([sys.executable, "-m", "stream.cli", "retrainer", *args],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env)
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        for line in self.proc.stderr:
            try:
                rec = json.loads(line)
            except ValueError:
                rec = {"msg": line.rstrip()}
            rec["_t"] = time.monotonic()
            with self._lock:
                self.lines.append(rec)

    def logs(self, msg: str, since: float = 0.0) -> list[dict]:
        with self._lock:
            return [r for r in self.lines if r.get("msg") == msg and r["_t"] >= since]

    def stop(self) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            return self.proc.wait(30)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            return self.proc.wait()
        finally:
            self._reader.join(5)


def _until(cond, timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if cond():
            return
        time.sleep(0.1)
    raise AssertionError(f"timed out after {timeout_s:g} s waiting for {what}")


def _service_args(broker, tmp_path: Path, topic: str, app_id: str, *extra: str) -> list[str]:
    return ["--bootstrap-servers", broker.bootstrap, "--registry", str(tmp_path / "registry"),
            "--archive", str(tmp_path / "archive"), "--events-topic", topic, "--app-id", app_id,
            "--updates-topic", f"{topic}.updates", "--group-session-timeout-s", "6", *extra]


@pytest.mark.broker
def test_two_instances_run_the_schedule_on_the_leader_only_and_fail_over(broker, tmp_path):
    from stream.kafka_clients import admin_client
    from stream.topics import TopicSpec, ensure_topics

    topic, app_id = f"ev-{uuid.uuid4().hex[:8]}", f"retrainer-{uuid.uuid4().hex[:8]}"
    ensure_topics(admin_client(broker.bootstrap), [TopicSpec(topic, 2)])
    args = _service_args(broker, tmp_path, topic, app_id, "--interval-s", "0.5", "--min-events", "1000000000")
    services = [Service("a", args), Service("b", args)]
    try:
        # stable group: both members assigned, exactly one leader, no rebalance for a while
        def stable() -> bool:
            last = [s.logs("partitions assigned") for s in services]
            return all(last) and sum(bool(x[-1]["leader"]) for x in last) == 1 \
                and time.monotonic() - max(x[-1]["_t"] for x in last) > 1.5
        _until(stable, 120, "both instances to be assigned")
        since = time.monotonic()
        time.sleep(4)
        assert not any(s.logs("partitions assigned", since) for s in services), "rebalanced while observing"
        runs = {s.name: len(s.logs("retraining run starts", since)) for s in services}
        leader = next(s.name for s in services if s.logs("partitions assigned")[-1]["leader"])
        assert runs[leader] >= 3, runs
        assert sum(runs.values()) == runs[leader], f"a non-leader ran the schedule: {runs}"
        # the leader goes away: the other instance takes the schedule over
        codes = [s.stop() for s in services if s.name == leader]
        other = next(s for s in services if s.name != leader)
        since = time.monotonic()
        _until(lambda: any(r["leader"] for r in other.logs("partitions assigned", since))
               and other.logs("retraining run starts", since), 60, "the other instance to take over")
    finally:
        codes = [s.stop() for s in services]
    assert codes == [0, 0]


@pytest.mark.broker
def test_the_service_archives_retrains_publishes_and_announces(broker, tmp_path, synth):
    from confluent_kafka import Producer

    from stream.announce import AnnouncementWatcher
    from stream.kafka_clients import admin_client, create_producer
    from stream.replay import replay
    from stream.topics import TopicSpec, ensure_topics

    topic, app_id = f"ev-{uuid.uuid4().hex[:8]}", f"retrainer-{uuid.uuid4().hex[:8]}"
    ensure_topics(admin_client(broker.bootstrap), [TopicSpec(topic, 2)])
    assert replay(synth, create_producer(broker.bootstrap), topic, progress=False) == len(synth)
    bad = Producer({"bootstrap.servers": broker.bootstrap})
    bad.produce(topic, key=b"u", value=b"{not json")
    bad.flush(10)
    tiny = [f"--{k.replace('_', '-')}={v}" for k, v in TINY.items()]
    # Kafka client settings as a managed cluster's would come, here for the plaintext broker: every client takes them
    kafka = ["--kafka-config", "security.protocol=PLAINTEXT", "--kafka-config", "client.id=hrnn-retrainer-e2e"]
    tmp = tmp_path / "tmp"
    tmp.mkdir()
    svc = Service("a", _service_args(broker, tmp_path, topic, app_id, "--interval-s", "2", "--min-events",
                                     str(len(synth)), "--window-days", "30", "--keep-versions", "2", *tiny, *kafka),
                  tmpdir=tmp)
    try:
        with AnnouncementWatcher(broker.bootstrap, f"{topic}.updates") as watcher:
            _until(lambda: count_events(tmp_path / "archive", 30) == len(synth), 120, "the archive to fill")
            data = read_window(tmp_path / "archive", 30)
            assert sorted(map(tuple, np.c_[data.user_ids[data.user], data.item_ids[data.item]])) == \
                sorted(map(tuple, np.c_[synth.user_ids[synth.user], synth.item_ids[synth.item]]))
            assert sum(r["invalid"] for r in svc.logs("archived events")) == 1
            # 37 s quiet, 58 s on a loaded machine: the wait returns once announced, so a wide limit costs nothing
            _until(lambda: watcher.latest is not None, 240, "a retrained version to be announced")
            ann = watcher.latest
            assert ann.reason == "retrain" and current_version(tmp_path / "registry") == ann.version
            metrics = json.loads((Path(ann.path) / "metrics.json").read_text())
            assert metrics["comparison"]["accepted"] and metrics["retrain"]["window_events"] == len(synth)
            finished = [r["outcome"] for r in svc.logs("retraining run finished")]
            assert any(o["status"] == "published" and o["version"] == ann.version for o in finished)
            (told,) = [r["settings"] for r in svc.lines if "apply to the librdkafka clients only" in r["msg"]]
            assert told == ["client.id"]
            assert list(tmp.glob("hrnn-retrainer-faust-*")), "Faust's data folder is not in the temp folder"
    finally:
        assert svc.stop() == 0
    assert not list(tmp.glob("hrnn-*")), "the stopped service left its folders in the temp folder"


def _free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.mark.broker
def test_a_batch_the_archive_cannot_take_is_never_committed_and_is_archived_after_a_restart(broker, tmp_path, synth):
    """Disk trouble (here: a file where the day's folder must go) makes every write fail: the service retries,
    says so on /health and /metrics, stops promptly on SIGTERM without committing the batch, and the next start
    archives every event exactly once."""
    from stream.kafka_clients import admin_client, create_producer
    from stream.replay import replay
    from stream.topics import TopicSpec, ensure_topics

    topic, app_id = f"ev-{uuid.uuid4().hex[:8]}", f"retrainer-{uuid.uuid4().hex[:8]}"
    data = synth.subset(np.arange(len(synth)) < 500)
    ensure_topics(admin_client(broker.bootstrap), [TopicSpec(topic, 1)])
    assert replay(data, create_producer(broker.bootstrap), topic, progress=False) == len(data)
    days = sorted({time.strftime("%Y-%m-%d", time.gmtime(int(t) // 1000)) for t in data.ts_ms})
    (tmp_path / "archive").mkdir()
    blocker = tmp_path / "archive" / f"date={days[0]}"
    blocker.touch()
    port = _free_port()
    args = _service_args(broker, tmp_path, topic, app_id, "--min-events", "1000000000", "--metrics-port", str(port))
    svc = Service("a", args)
    try:
        _until(lambda: len(svc.logs("cannot write a batch to the archive; it stays unacked and is retried")) >= 2,
               60, "failed archive writes")
        code, body = health_of(port)
        assert code == 503 and body["archive_error"]
        assert "hrnn_retrainer_archive_failing 1.0" in http_get(port, "/metrics")[2].decode()
        t0 = time.monotonic()
    finally:
        assert svc.stop() == 0
    assert time.monotonic() - t0 < 20, "the stop waited for the unwritable batch"
    assert count_events(tmp_path / "archive", 30) == 0
    blocker.unlink()
    svc = Service("b", args)
    try:
        _until(lambda: count_events(tmp_path / "archive", 30) == len(data), 120, "the archive to fill")
        assert health_of(port)[0] == 200
    finally:
        assert svc.stop() == 0
    got = read_window(tmp_path / "archive", 30)
    assert sorted(zip(got.user_ids[got.user], got.item_ids[got.item], got.ts_ms // 1000)) == \
        sorted(zip(data.user_ids[data.user], data.item_ids[data.item], data.ts_ms // 1000))


@pytest.mark.broker
def test_the_service_archives_a_recreated_events_topic_from_its_start(broker, tmp_path, synth):
    """The same topic name and archive on a broker that never had the topic (as after deleting and
    creating it again): the new log's offsets start at 0 and all its events are archived."""
    from stream.broker import LocalBroker
    from stream.kafka_clients import admin_client, create_producer
    from stream.replay import replay
    from stream.topics import TopicSpec, ensure_topics

    topic, app_id = f"ev-{uuid.uuid4().hex[:8]}", f"retrainer-{uuid.uuid4().hex[:8]}"
    first, second = synth.subset(np.arange(len(synth)) < 1500), synth.subset(np.arange(len(synth)) >= 1500)

    def archive_on(cluster, data, expected: int) -> "Service":
        ensure_topics(admin_client(cluster.bootstrap), [TopicSpec(topic, 2)])
        assert replay(data, create_producer(cluster.bootstrap), topic, progress=False) == len(data)
        svc = Service("a", _service_args(cluster, tmp_path, topic, app_id, "--min-events", "1000000000"))
        try:
            _until(lambda: count_events(tmp_path / "archive", 30) == expected, 120, f"{expected} archived events")
        except AssertionError as exc:  # say how far it got and what the service said last
            raise AssertionError(f"{exc}; {count_events(tmp_path / 'archive', 30)} archived; the service's last "
                                 f"lines: {svc.lines[-6:]}") from None
        finally:
            assert svc.stop() == 0
        return svc

    with LocalBroker() as old_cluster:
        archive_on(old_cluster, first, len(first))
    svc = archive_on(broker, second, len(synth))
    assert sum(r["duplicates"] for r in svc.logs("archived events")) == 0
    assert svc.logs("the archive holds only other logs of the events topic (deleted and created again, or "
                    "another cluster): this one is archived from its start beside them")
    data = read_window(tmp_path / "archive", 30)
    assert sorted(zip(data.user_ids[data.user], data.item_ids[data.item], data.ts_ms // 1000)) == \
        sorted(zip(synth.user_ids[synth.user], synth.item_ids[synth.item], synth.ts_ms // 1000))


def test_a_retried_archive_write_skips_the_records_another_instance_archived_meanwhile(tmp_path, monkeypatch):
    """While this instance retried a failing write, a rebalance handed the partition to another instance, which
    archived the same records from the committed offset: the retry reads the archive's marks again first."""
    from stream.archive import ArchiveError, ArchivedEvent, ArchiveWriter

    svc = _offline_service(tmp_path, monkeypatch, archive_retry_first_s=0.01)
    real_write_file, calls = svc.writer._write_file, []

    def failing_once_while_the_other_writes(day, name, rows):
        calls.append(name)
        if len(calls) == 1:
            other = ArchiveWriter(tmp_path / "a", svc.settings.events_topic, "0a" * 16)
            other.write([ArchivedEvent(0, k, Event(f"u0-{k}", "i", "click", T0 + k)) for k in range(15)])
            raise ArchiveError(f"cannot write {name}: [Errno 5] Input/output error")
        return real_write_file(day, name, rows)

    svc._follow_events_log()
    monkeypatch.setattr(svc.writer, "_write_file", failing_once_while_the_other_writes)
    asyncio.run(svc._archive(_batch([(0, k, T0 + k) for k in range(10)])))
    assert count_events(tmp_path / "a", 30) == 15
    assert svc.metrics.registry.get_sample_value("hrnn_retrainer_duplicate_events_total") == 10


def test_an_event_carrying_a_copys_header_that_is_not_the_workers_is_archived(tmp_path, monkeypatch):
    from stream import records
    svc = _offline_service(tmp_path, monkeypatch)
    svc._follow_events_log()
    batch = _batch([(0, k, T0 + k) for k in range(5)])
    topic = svc.settings.events_topic
    batch[2].headers = {records.H_REPARTITIONED_FROM: f"{topic}/0/9".encode()}  # names a later record
    batch[3].headers = {records.H_REPARTITIONED_FROM: f"{topic}/0/3".encode()}  # names itself
    asyncio.run(svc._archive(batch))
    assert len(read_window(tmp_path / "a", 30).user) == 5
