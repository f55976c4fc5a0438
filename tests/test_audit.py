"""`hrnn audit`: every committed input record answered, counted from what the topics hold."""
from __future__ import annotations

import io
import json
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest

from stream import records
from stream.audit import (SHOWN, AuditReport, Ledger, audit_worker, note_dead_letter, note_input,
                          note_recommendation)
from stream.cli_audit import _print
from stream.kafka_clients import Record, admin_client, create_producer, topic_id
from stream.records import Recommendation, encode_recommendation
from stream.topics import TopicSpec, ensure_topics
from worker_testkit import commit_offsets, settings_for

HRNN = str(Path(sys.executable).with_name("hrnn"))
NO_DIR = Path("-")  # settings for a group no worker runs: no registry, no state


LOG, OTHER_LOG = "01" * 16, "02" * 16  # input topic ids: the audited log, a deleted one of the same name


def _rec(partition: int, offset: int, topic: str | None = None, log: str | None = None) -> bytes:
    """A recommendation answering `partition`@`offset`; without topic and log, as builds before them wrote."""
    return encode_recommendation(Recommendation(user_id="u", items=[], model_version="v", session_id="s",
                                                event_id="", source_partition=partition, source_offset=offset,
                                                event_timestamp=0, emitted_at=0, source_topic=topic,
                                                source_log=log))


def _record(topic: str, partition: int, offset: int, value: bytes | None = b"{}", headers=()) -> Record:
    return Record(topic, partition, offset, b"u", value, None, tuple(headers))


def _ledger(ranges: dict[int, tuple[int, int | None]], inputs: list[Record], recs=(), dlq=(),
            log: str | None = LOG, **ends: dict[int, int]) -> tuple[Ledger, int]:
    ledger, foreign = Ledger(ranges, "ev", log, **ends), 0
    for r in inputs:
        note_input(ledger, r)
    foreign += sum(not note_recommendation(ledger, r) for r in recs)
    foreign += sum(not note_dead_letter(ledger, r) for r in dlq)
    return ledger, foreign


def test_each_kind_of_answer_counts_and_a_record_without_one_is_listed():
    inputs = [_record("ev", 0, o) for o in range(8)]
    inputs.append(_record("ev", 1, 0, headers=records.repartition_headers("ev", 0, 3)))  # 0@3, re-keyed
    recs = [_record("rec", 0, i, _rec(0, o)) for i, o in enumerate([0, 1, 1, 1, 6, 7])]  # 6, 7: in flight
    dlq = [_record("dlq", 0, 0, b"x", records.dlq_headers("bad_json", "d", "ev", 0, 2))]
    ledger, foreign = _ledger({0: (0, 6), 1: (0, None)}, inputs, recs, dlq)
    got = ledger.partition(0)
    assert (got.records, got.recommended, got.duplicated, got.dead_letters, got.rekeyed) == (6, 2, 1, 1, 1)
    assert (got.unanswered, got.first_unanswered, foreign) == (2, [4, 5], 0)
    assert ledger.partition(1).records == 0  # a partition the group never committed is not audited


def test_a_record_answered_twice_in_any_two_ways_counts_as_duplicated():
    inputs = [_record("ev", 0, o) for o in range(4)]
    inputs += [_record("ev", 1, o, headers=records.repartition_headers("ev", 0, 2)) for o in (0, 1)]  # 0@2, twice
    dead = lambda o: _record("dlq", 0, o, b"x", records.dlq_headers("bad_json", "d", "ev", 0, o))  # noqa: E731
    recs = [_record("rec", 0, 0, _rec(0, 0)), _record("rec", 0, 1, _rec(0, 3))]
    ledger, _ = _ledger({0: (0, 4), 1: (0, None)}, inputs, recs, [dead(0), dead(1), dead(1)])
    got = ledger.partition(0)  # 0: recommended and dead-lettered; 1: dead-lettered twice; 2: re-keyed twice
    assert (got.records, got.unanswered, got.duplicated) == (4, 0, 3)


def test_offsets_before_the_log_start_and_gaps_without_a_record_are_not_audited():
    inputs = [_record("ev", 0, o) for o in (100, 101, 103)]  # 102: a transaction marker, never delivered
    ledger, _ = _ledger({0: (100, 104)}, inputs, [_record("rec", 0, 0, _rec(0, 50))])
    got = ledger.partition(0)
    assert (got.start, got.records, got.unanswered, got.first_unanswered) == (100, 3, 3, [100, 101, 103])


def test_a_second_re_keyed_copy_of_one_record_is_answered_by_the_first_and_the_record_counts_twice():
    """A crash between re-keying a batch and committing it copies its records again; workers apply the first
    copy only (answered by its recommendation) and skip the second as a replay."""
    inputs = [_record("ev", 0, 0)]  # the mis-keyed original
    inputs += [_record("ev", 1, o, headers=records.repartition_headers("ev", 0, 0)) for o in (0, 1)]
    ledger, _ = _ledger({0: (0, 1), 1: (0, 2)}, inputs, [_record("rec", 0, 0, _rec(1, 0))])
    copies, original = ledger.partition(1), ledger.partition(0)
    assert (copies.recommended, copies.copies_again, copies.unanswered) == (1, 1, 0)
    assert (original.rekeyed, original.duplicated, original.unanswered) == (1, 1, 0)  # twice: not exactly once


def test_a_second_re_keyed_copy_is_answered_by_the_first_also_when_the_original_is_older_than_the_window():
    """A window's start can leave the mis-keyed original out (its timestamp is older) and hold both its copies:
    the audited range of the original's partition is empty, and the second copy is still a skipped replay."""
    inputs = [_record("ev", 1, o, headers=records.repartition_headers("ev", 0, 0)) for o in (0, 1)]
    ledger, _ = _ledger({0: (1, 1), 1: (0, 2)}, inputs, [_record("rec", 0, 0, _rec(1, 0))])
    copies = ledger.partition(1)
    assert (copies.records, copies.recommended, copies.copies_again, copies.unanswered) == (2, 1, 1, 0)


def test_every_unanswered_record_is_counted_but_only_the_first_are_listed():
    ledger, _ = _ledger({0: (0, 1000)}, [_record("ev", 0, o) for o in range(1000)])
    got = ledger.partition(0)
    assert got.unanswered == 1000 and got.first_unanswered == list(range(SHOWN))


def test_answers_of_other_topics_and_records_that_are_not_answers_are_counted_apart():
    inputs = [_record("ev", 1, o) for o in range(8)]
    inputs += [_record("ev", 0, 0, headers=records.repartition_headers("other", 1, 5)),
               _record("ev", 0, 1, headers=[(records.H_REPARTITIONED_FROM, b"garbage")])]
    recs = [_record("rec", 0, 0, b"junk")]
    dlq = [_record("dlq", 0, 0, b"x", records.dlq_headers("bad_json", "d", "other", 1, 7)),
           _record("dlq", 0, 1, b"x", [(records.H_SOURCE_TOPIC, b"ev")])]
    ledger, foreign = _ledger({0: (0, 2), 1: (0, 8)}, inputs, recs, dlq)
    assert foreign == 3  # the junk recommendation, the other topic's dead letter, one without its offset
    assert ledger.partition(1).unanswered == 8 and ledger.partition(1).rekeyed == 0


def test_answers_naming_another_topic_or_a_deleted_log_of_the_same_name_answer_nothing():
    inputs = [_record("ev", 0, o) for o in range(6)]
    recs = [_record("rec", 0, 0, _rec(0, 0, "ev", LOG)), _record("rec", 0, 1, _rec(0, 1, "ev", OTHER_LOG)),
            _record("rec", 0, 2, _rec(0, 2, "other", LOG)), _record("rec", 0, 3, _rec(0, 3))]  # 3: older build
    dlq = [_record("dlq", 0, 0, b"x", records.dlq_headers("bad_json", "d", "ev", 0, 4, LOG)),
           _record("dlq", 0, 1, b"x", records.dlq_headers("bad_json", "d", "ev", 0, 5, OTHER_LOG))]
    ledger, foreign = _ledger({0: (0, 6)}, inputs, recs, dlq)
    got = ledger.partition(0)
    assert (got.recommended, got.dead_letters, got.first_unanswered, foreign) == (2, 1, [1, 2, 5], 3)
    ledger, foreign = _ledger({0: (0, 6)}, inputs, recs, dlq, log=None)  # a broker that gives no topic ids
    assert (ledger.partition(0).first_unanswered, foreign) == ([2], 1)  # the topic still counts


def _spoofed_sequence() -> list[Record]:
    """The reviewer's partition: 67 and 69 mis-keyed, and between them an event whose producer gave it a re-keyed
    copy's header naming 69 (a mirrored topic, an app re-producing consumed records with their headers)."""
    spoof = [(records.H_REPARTITIONED_FROM, b"ev/0/69")]
    return [_record("ev", 0, 67), _record("ev", 0, 68, headers=spoof), _record("ev", 0, 69)]


def test_a_header_naming_a_later_record_of_its_own_partition_answers_nothing():
    """A copy is written after its original: the header of 68 names no copy, so 69 is not answered by it."""
    recs = [_record("rec", 0, 0, _rec(0, 68, "ev", LOG))]
    ledger, _ = _ledger({0: (67, 70)}, _spoofed_sequence(), recs)
    got = ledger.partition(0)
    assert (got.recommended, got.rekeyed, got.unanswered, got.first_unanswered) == (1, 0, 2, [67, 69])


def test_the_copies_of_records_a_spoofed_header_named_are_first_copies_to_answer():
    """The workers' copies of 67 and 69 (at 70 and 71) are events to answer: the copy of 69 is no second copy."""
    copies = [_record("ev", 0, 70, headers=records.repartition_headers("ev", 0, 67, LOG)),
              _record("ev", 0, 71, headers=records.repartition_headers("ev", 0, 69, LOG))]
    inputs = _spoofed_sequence() + copies
    only_68 = [_record("rec", 0, 0, _rec(0, 68, "ev", LOG))]
    got = _ledger({0: (67, 72)}, inputs, only_68)[0].partition(0)
    assert (got.rekeyed, got.copies_again, got.first_unanswered) == (2, 0, [70, 71])
    answered = only_68 + [_record("rec", 0, i, _rec(0, o, "ev", LOG)) for i, o in ((1, 70), (2, 71))]
    got = _ledger({0: (67, 72)}, inputs, answered)[0].partition(0)
    assert (got.recommended, got.rekeyed, got.unanswered, got.duplicated) == (3, 2, 0, 0)


def test_a_copys_header_naming_another_log_answers_nothing_and_one_of_an_older_build_still_answers():
    inputs = [_record("ev", 0, o) for o in range(3)]
    inputs += [_record("ev", 1, 0, headers=records.repartition_headers("ev", 0, 0, OTHER_LOG)),  # a mirror's
               _record("ev", 1, 1, headers=records.repartition_headers("ev", 0, 1, LOG)),
               _record("ev", 1, 2, headers=[(records.H_REPARTITIONED_FROM, b"ev/0/2")])]  # no log: older build
    ledger, _ = _ledger({0: (0, 3), 1: (0, None)}, inputs)
    got = ledger.partition(0)
    assert (got.rekeyed, got.first_unanswered) == (2, [0])
    ledger, _ = _ledger({0: (0, 3), 1: (0, None)}, inputs, log=None)  # a broker that gives no topic ids
    assert ledger.partition(0).rekeyed == 3


def test_answers_naming_a_partition_or_offset_the_log_cannot_hold_are_counted_as_strays():
    inputs = [_record("ev", 0, o) for o in range(4)]
    named = [(0, 0), (0, 3), (0, -5), (7, 0), (0, 10**9), (0, 2**62)]  # 3: in flight, past the committed offset
    recs = [_record("rec", 0, i, _rec(p, o, "ev", LOG)) for i, (p, o) in enumerate(named)]
    dlq = [_record("dlq", 0, 0, b"x", records.dlq_headers("bad_json", "d", "ev", 0, 10**23, LOG)),
           _record("dlq", 0, 1, b"x", records.dlq_headers("bad_json", "d", "ev", 0, 1, LOG))]
    ranges = {0: (0, 3), 1: (0, None)}
    ledger, foreign = _ledger(ranges, inputs, recs, dlq)  # the ends unknown: past Kafka's offsets, no partition 7
    assert foreign == 3 and (ledger.partition(0).recommended, ledger.partition(0).dead_letters) == (1, 1)
    ledger, foreign = _ledger(ranges, inputs, recs, dlq, ends={0: 4, 1: 0})  # and past the partition's end
    assert foreign == 5 and ledger.partition(0).first_unanswered == [2]


def test_input_records_past_the_committed_offset_are_counted_as_the_groups_lag_not_audited():
    inputs = [_record("ev", 0, o) for o in range(5)] + [_record("ev", 1, o) for o in range(3)]
    ledger, _ = _ledger({0: (0, 2), 1: (0, None)}, inputs, [_record("rec", 0, 0, _rec(0, 0))])
    got = [ledger.partition(p) for p in (0, 1)]
    assert [(p.records, p.unanswered, p.lag) for p in got] == [(2, 1, 3), (0, 0, 3)]


def _printed(report: AuditReport) -> str:
    out = io.StringIO()
    _print(report, out)
    return out.getvalue()


@pytest.mark.parametrize("since_ms", [10**18, -10**18])
def test_a_window_start_no_calendar_date_has_is_printed_as_epoch_ms_not_a_crash(since_ms):
    report = AuditReport("ev", "rec", "g", False, [], since_ms=since_ms)
    assert f"since {since_ms} ms after the epoch" in _printed(report)


@pytest.mark.parametrize("since_s", ["1e12", "1e300"])
def test_a_window_reaching_back_before_1970_is_refused_before_the_broker_is_asked(since_s):
    proc = subprocess.run([HRNN, "audit", "--bootstrap-servers", "127.0.0.1:9", "--since-s", since_s],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and "reaches back before 1970" in proc.stderr and "Traceback" not in proc.stderr


@pytest.mark.broker
def test_the_command_fails_on_an_unanswered_record_and_on_a_duplicate_only_under_exactly_once(broker, tmp_path):
    settings = settings_for(broker.bootstrap, NO_DIR, NO_DIR)  # fresh topics and group; no worker runs
    producer = create_producer(broker.bootstrap)
    for i in range(5):
        producer.produce(settings.input_topic, b"{}", b"u", partition=0)
    for offset in (0, 1, 1):  # offset 1 answered twice, as a crash replay under at-least-once does
        producer.produce(settings.output_topic, _rec(0, offset), b"u", partition=0)
    producer.produce(settings.output_topic, b"not a recommendation", b"u", partition=0)
    producer.produce(settings.dlq_topic, b"{", b"u", partition=0,
                     headers=records.dlq_headers("bad_json", "d", settings.input_topic, 0, 2))
    assert producer.flush(15) == 0

    def audit(*where: str) -> tuple[int, str, dict]:
        out = tmp_path / f"{uuid.uuid4().hex}.json"
        proc = subprocess.run([HRNN, "audit", "--bootstrap-servers", broker.bootstrap, "--idle-s", "1.5",
                               "--json", str(out), *where], capture_output=True, text=True, timeout=120)
        return proc.returncode, proc.stdout, json.loads(out.read_text())

    workers_file = tmp_path / "worker.toml"  # the group and topics as the workers' own settings file names them
    workers_file.write_text(f'[serve]\ngroup = "{settings.group}"\ninput_topic = "{settings.input_topic}"\n'
                            f'output_topic = "{settings.output_topic}"\nbatch_size = 100\n')
    commit_offsets(settings, {0: 4})  # offsets 0..3 claimed done; 3 has no answer
    code, stdout, report = audit("--group", settings.group, "--input-topic", settings.input_topic,
                                 "--output-topic", settings.output_topic)
    assert code == 1 and "unanswered offsets: 3" in stdout and "promise BROKEN" in stdout
    assert report["foreign_records"] == 1 and "1 record of" in stdout  # reported, not an answer
    assert report["totals"] == {"records": 4, "recommended": 2, "dead_letters": 1, "rekeyed": 0, "copies_again": 0, "unanswered": 1,
                                "duplicated": 1, "lag": 1}
    commit_offsets(settings, {0: 3})
    code, stdout, report = audit("--config", str(workers_file))
    assert code == 0 and report["kept"] and "promise kept" in stdout
    code, _, report = audit("--config", str(workers_file), "--processing-guarantee", "exactly_once")
    assert code == 1 and not report["kept"] and report["totals"]["duplicated"] == 1


@pytest.mark.parametrize("flags", [["--idle-s", "0"], ["--since-s", "nan"], ["--timeout-s", "inf"]])
def test_the_command_refuses_a_time_that_is_not_a_positive_number(flags):
    proc = subprocess.run([HRNN, "audit", *flags], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and "--idle-s, --timeout-s and --since-s must be > 0" in proc.stderr


def test_a_json_path_that_cannot_be_written_is_refused_before_the_audit_not_after(tmp_path):
    (tmp_path / "file").write_text("")
    proc = subprocess.run([HRNN, "audit", "--bootstrap-servers", "127.0.0.1:9", "--json",
                           str(tmp_path / "file" / "a.json")], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and "cannot create its folder" in proc.stderr and "Traceback" not in proc.stderr


def test_a_client_setting_librdkafka_refuses_is_a_settings_error_not_a_broken_promise():
    proc = subprocess.run([HRNN, "audit", "--bootstrap-servers", "127.0.0.1:9", "--kafka-config",
                           "security.protocol=SASL_SSLX"], capture_output=True, text=True, timeout=60)
    assert proc.returncode == 2 and "Traceback" not in proc.stderr
    assert "cannot create a Kafka consumer" in proc.stderr and "security.protocol" in proc.stderr


@pytest.mark.broker
def test_the_command_names_an_input_topic_that_does_not_exist(broker):
    topic = f"absent-{uuid.uuid4().hex[:8]}"
    proc = subprocess.run([HRNN, "audit", "--bootstrap-servers", broker.bootstrap, "--input-topic", topic],
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2 and f"topic '{topic}' does not exist" in proc.stderr


@pytest.mark.broker
def test_a_rekeyed_copy_past_its_partitions_committed_offset_still_answers_its_original(broker):
    settings = settings_for(broker.bootstrap, NO_DIR, NO_DIR)
    ev = settings.input_topic
    ensure_topics(admin_client(broker.bootstrap), [TopicSpec(ev, 2), TopicSpec(settings.output_topic, 1)])
    producer = create_producer(broker.bootstrap)
    producer.produce(ev, b"{}", b"wrong-key", partition=0)
    producer.produce(ev, b"{}", b"u", partition=1, headers=records.repartition_headers(ev, 0, 0))
    assert producer.flush(15) == 0
    commit_offsets(settings, {0: 1})  # the original is committed, its copy not yet
    report = audit_worker(settings, idle_s=1.5)
    assert report.kept and [(p.records, p.rekeyed) for p in report.partitions] == [(1, 1), (0, 0)]


@pytest.mark.broker
def test_the_answers_of_a_deleted_input_topic_do_not_answer_the_topic_created_again_under_its_name(broker):
    settings = settings_for(broker.bootstrap, NO_DIR, NO_DIR)
    ev, admin = settings.input_topic, admin_client(broker.bootstrap)
    ensure_topics(admin, [TopicSpec(ev, 1)])
    first = topic_id(admin, ev)
    producer = create_producer(broker.bootstrap)
    for offset in range(3):  # three records, each answered
        producer.produce(ev, b"{}", b"u", partition=0)
        producer.produce(settings.output_topic, _rec(0, offset, ev, first), b"u", partition=0)
    assert producer.flush(15) == 0
    # Deleted while no consumer reads it (librdkafka 2.16 crashes on a live deletion on the local broker).
    admin.delete_topics([ev])[ev].result(timeout=10)
    ensure_topics(admin, [TopicSpec(ev, 1)])
    for _ in range(3):  # three new records at the same offsets, none answered
        producer.produce(ev, b"{}", b"u", partition=0)
    assert producer.flush(15) == 0
    commit_offsets(settings, {0: 3})
    report = audit_worker(settings, idle_s=1.5)
    assert report.input_log not in (None, first)
    assert not report.kept and report.partitions[0].first_unanswered == [0, 1, 2] and report.foreign_records == 3


@pytest.mark.broker
def test_a_window_audits_only_the_input_records_of_its_time(broker, tmp_path):
    settings = settings_for(broker.bootstrap, NO_DIR, NO_DIR)
    ev, now_ms = settings.input_topic, int(time.time() * 1000)
    producer = create_producer(broker.bootstrap)
    for _ in range(4):  # three hours old and never answered
        producer.produce(ev, b"{}", b"u", partition=0, timestamp=now_ms - 3 * 3_600_000)
    assert producer.flush(15) == 0
    for offset in range(4, 8):  # recent, each answered
        producer.produce(ev, b"{}", b"u", partition=0)
        producer.produce(settings.output_topic, _rec(0, offset), b"u", partition=0)
    assert producer.flush(15) == 0
    commit_offsets(settings, {0: 8})
    whole = audit_worker(settings, idle_s=1.5)
    assert not whole.kept and whole.partitions[0].first_unanswered == [0, 1, 2, 3]
    out = tmp_path / "report.json"
    proc = subprocess.run([HRNN, "audit", "--bootstrap-servers", broker.bootstrap, "--group", settings.group,
                           "--input-topic", ev, "--output-topic", settings.output_topic, "--since-s", "3600",
                           "--idle-s", "1.5", "--json", str(out)], capture_output=True, text=True, timeout=120)
    report = json.loads(out.read_text())
    assert proc.returncode == 0 and "since" in proc.stdout and "promise kept" in proc.stdout
    assert (report["partitions"][0]["start"], report["totals"]["records"], report["totals"]["recommended"]) == (4, 4, 4)
    assert now_ms - 3_700_000 < report["since_ms"] < time.time() * 1000 - 3_500_000


def _audit(bootstrap: str, settings, out: Path, *flags: str) -> subprocess.CompletedProcess:
    return subprocess.run([HRNN, "audit", "--bootstrap-servers", bootstrap, "--group", settings.group, "--input-topic",
                           settings.input_topic, "--output-topic", settings.output_topic, "--idle-s", "1",
                           "--json", str(out), *flags], capture_output=True, text=True, timeout=120)


@pytest.mark.broker
def test_a_group_that_committed_nothing_and_an_output_topic_that_does_not_exist_are_refused_not_audited(
        broker, tmp_path):
    settings = settings_for(broker.bootstrap, NO_DIR, NO_DIR)
    ensure_topics(admin_client(broker.bootstrap), [TopicSpec(settings.input_topic, 1),
                                                   TopicSpec(settings.output_topic, 1)])
    out, empty = tmp_path / "report.json", tmp_path / "empty.json"
    # an input with no record yet (a fresh deployment) has nothing to answer: kept, not refused
    assert _audit(broker.bootstrap, settings, empty).returncode == 0 and json.loads(empty.read_text())["kept"]
    producer = create_producer(broker.bootstrap)
    for offset in range(3):
        producer.produce(settings.input_topic, b"{}", b"u", partition=0)
        producer.produce(settings.output_topic, _rec(0, offset), b"u", partition=0)
    assert producer.flush(15) == 0
    proc = _audit(broker.bootstrap, settings, out)  # as a misspelt --group reads: no offset committed anywhere
    assert proc.returncode == 2 and not out.exists() and "Traceback" not in proc.stderr
    assert (f"group {settings.group!r} has committed no offsets on topic {settings.input_topic!r}: check --group"
            in proc.stderr)
    commit_offsets(settings, {0: 3})
    proc = _audit(broker.bootstrap, settings, out, "--output-topic", "no-such-recs")
    assert proc.returncode == 2 and "output topic 'no-such-recs' does not exist" in proc.stderr


@pytest.mark.broker
def test_a_group_that_committed_nothing_is_refused_also_when_the_window_holds_no_input_record(broker, tmp_path):
    settings = settings_for(broker.bootstrap, NO_DIR, NO_DIR)
    ensure_topics(admin_client(broker.bootstrap), [TopicSpec(settings.input_topic, 1),
                                                   TopicSpec(settings.output_topic, 1)])
    producer, old_ms = create_producer(broker.bootstrap), int(time.time() * 1000) - 3 * 3_600_000
    for offset in range(3):  # three hours old, answered: the last hour holds no input record
        producer.produce(settings.input_topic, b"{}", b"u", partition=0, timestamp=old_ms)
        producer.produce(settings.output_topic, _rec(0, offset), b"u", partition=0)
    assert producer.flush(15) == 0
    out = tmp_path / "report.json"
    proc = _audit(broker.bootstrap, settings, out, "--since-s", "3600")  # a misspelt --group, audited lately
    assert proc.returncode == 2 and not out.exists() and "Traceback" not in proc.stderr
    assert f"group {settings.group!r} has committed no offsets" in proc.stderr


@pytest.mark.broker
def test_a_kept_promise_says_the_groups_lag_and_counts_answers_naming_records_the_log_cannot_hold(broker, tmp_path):
    settings = settings_for(broker.bootstrap, NO_DIR, NO_DIR)
    ev = settings.input_topic
    ensure_topics(admin_client(broker.bootstrap), [TopicSpec(ev, 1), TopicSpec(settings.output_topic, 1)])
    producer = create_producer(broker.bootstrap)
    for offset in range(5):
        producer.produce(ev, b"{}", b"u", partition=0)
    for partition, offset in ((0, 0), (0, 1), (0, 10**9), (0, -5), (0, 2**62), (7, 0)):  # the last 4: no such record
        producer.produce(settings.output_topic, _rec(partition, offset, ev), b"u", partition=0)
    producer.produce(settings.dlq_topic, b"{", b"u", headers=records.dlq_headers("bad_json", "d", ev, 0, 10**23))
    assert producer.flush(15) == 0
    out = tmp_path / "report.json"
    commit_offsets(settings, {0: 2})
    proc = _audit(broker.bootstrap, settings, out)
    report = json.loads(out.read_text())
    assert proc.returncode == 0 and "promise kept" in proc.stdout, proc.stderr
    assert report["foreign_records"] == 5 and "5 records of" in proc.stdout  # reported, as other strays are
    assert report["totals"]["lag"] == 3 and "3 input records past the committed offsets" in proc.stdout
    commit_offsets(settings, {0: 0})  # a group stuck at its first record
    proc = _audit(broker.bootstrap, settings, out)
    report = json.loads(out.read_text())
    assert (report["totals"]["records"], report["totals"]["lag"]) == (0, 5)
    assert "5 input records past the committed offsets (the group's lag) not audited" in proc.stdout
