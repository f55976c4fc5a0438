"""Client settings factories and the group-less read helpers."""
from __future__ import annotations

import threading
import time
import uuid

import pytest
from confluent_kafka import Producer

from model.errors import ConfigError
from stream.kafka_clients import (
    WaitTimeout, admin_config, consumer_config, create_producer, load_client_settings, parse_client_settings, produce_acknowledged,
    producer_config, read_all, scan, wait_for_count, watermarks,
)


def test_consumer_defaults_commit_manually_and_use_cooperative_assignment():
    cfg = consumer_config("h:1", "g", {"session.timeout.ms": 6000, "security.protocol": "SASL_SSL"})
    assert cfg["enable.auto.commit"] is False and cfg["enable.auto.offset.store"] is False
    assert cfg["partition.assignment.strategy"] == "cooperative-sticky"
    assert cfg["auto.offset.reset"] == "earliest"
    assert (cfg["bootstrap.servers"], cfg["group.id"]) == ("h:1", "g")
    assert cfg["session.timeout.ms"] == 6000 and cfg["security.protocol"] == "SASL_SSL"


def test_extra_settings_cannot_redirect_bootstrap_or_group():
    cfg = consumer_config("h:1", "g", {"bootstrap.servers": "other:2", "group.id": "x"})
    assert (cfg["bootstrap.servers"], cfg["group.id"]) == ("h:1", "g")


def test_producer_defaults_are_durable_and_idempotent():
    cfg = producer_config("h:1", {"linger.ms": 50}, transactional_id="w-0")
    assert cfg["acks"] == "all" and cfg["enable.idempotence"] is True
    assert cfg["linger.ms"] == 50 and cfg["transactional.id"] == "w-0"


# A valid value for each consumer-only property, so librdkafka takes it and only warns.
CONSUMER_SETTINGS = {
    "group.id": "g", "group.instance.id": "i", "partition.assignment.strategy": "range", "session.timeout.ms": "6000",
    "heartbeat.interval.ms": "500", "group.protocol.type": "consumer", "group.protocol": "classic",
    "group.remote.assignor": "uniform", "coordinator.query.interval.ms": "600000", "max.poll.interval.ms": "300000",
    "enable.auto.commit": "false", "auto.commit.interval.ms": "5000", "enable.auto.offset.store": "false",
    "queued.min.messages": "1000", "queued.max.messages.kbytes": "1024", "fetch.wait.max.ms": "10",
    "fetch.queue.backoff.ms": "100", "fetch.message.max.bytes": "1048576", "max.partition.fetch.bytes": "1048576",
    "fetch.max.bytes": "52428800", "fetch.min.bytes": "1", "fetch.error.backoff.ms": "500",
    "offset.store.method": "broker", "isolation.level": "read_committed", "enable.partition.eof": "true",
    "check.crcs": "false", "auto.offset.reset": "earliest", "auto.commit.enable": "true",
    "consume.callback.max.messages": "0",
}


def _capturing_logger():
    """A logger of its own for a client's `logger` setting, and the lines it receives."""
    import logging

    lines: list[str] = []
    handler = logging.Handler()
    handler.emit = lambda record: lines.append(record.getMessage())
    logger = logging.getLogger(f"rdkafka-{uuid.uuid4().hex}")
    logger.addHandler(handler)
    logger.setLevel(logging.DEBUG)
    return logger, lines


def _client_warnings(make_admin) -> list[str]:
    """librdkafka's log lines while an admin client is made with the consumer settings above (no broker needed)."""
    logger, lines = _capturing_logger()
    make_admin({**CONSUMER_SETTINGS, "logger": logger}).poll(0.5)  # log lines arrive on poll
    return [line for line in lines if "CONFWARN" in line]


def test_an_admin_client_given_consumer_settings_leaves_out_each_property_librdkafka_calls_consumer_only():
    from confluent_kafka.admin import AdminClient

    from stream.kafka_clients import CONSUMER_ONLY, admin_client, admin_config
    assert set(CONSUMER_SETTINGS) == CONSUMER_ONLY
    raw = _client_warnings(lambda extra: AdminClient({"bootstrap.servers": "127.0.0.1:1", **extra}))
    # the installed librdkafka warns about each (an alias under its own name's warning) or calls it deprecated
    named = {p for p in CONSUMER_ONLY if any(f"property {p} is" in line for line in raw)}
    assert CONSUMER_ONLY - named == {"max.partition.fetch.bytes"}  # an alias of fetch.message.max.bytes
    assert _client_warnings(lambda extra: admin_client("127.0.0.1:1", extra)) == []
    assert admin_config("h:1", {"security.protocol": "SSL", "session.timeout.ms": "6000"}) == {
        "security.protocol": "SSL", "bootstrap.servers": "h:1"}  # common settings pass


def test_client_settings_come_from_key_value_flags_and_properties_files(tmp_path):
    assert parse_client_settings(["sasl.mechanism=PLAIN", " sasl.username = u "]) == \
        {"sasl.mechanism": "PLAIN", "sasl.username": "u"}
    with pytest.raises(ConfigError, match="KEY=VALUE"):
        parse_client_settings(["security.protocol"])
    props = tmp_path / "client.properties"
    props.write_text("# managed kafka\nsecurity.protocol=SASL_SSL\n\nsasl.password=a=b\n")
    assert load_client_settings(props) == {"security.protocol": "SASL_SSL", "sasl.password": "a=b"}
    with pytest.raises(ConfigError, match="cannot read"):
        load_client_settings(tmp_path / "missing.properties")


def test_a_properties_file_saved_with_a_utf8_byte_order_mark_keeps_its_first_keys_name(tmp_path):
    props = tmp_path / "client.properties"
    props.write_bytes(b"\xef\xbb\xbfsecurity.protocol=SASL_SSL\nsasl.password=p\xc3\xa4ss\n")
    assert load_client_settings(props) == {"security.protocol": "SASL_SSL", "sasl.password": "p\u00e4ss"}


def test_a_properties_file_that_is_not_utf8_is_refused_naming_the_file_the_offset_and_the_fix(tmp_path):
    props = tmp_path / "client.properties"
    props.write_bytes(b"\xef\xbb\xbfsecurity.protocol=SASL_SSL\nsasl.password=p\xe4ss\n")  # Java's ISO-8859-1
    with pytest.raises(ConfigError, match=rf"{props} is not UTF-8 text: the byte at offset 45 \(line 2\).*save the "
                                          "file as UTF-8") as refused:
        load_client_settings(props)
    assert "p\u00e4ss" not in str(refused.value)  # nor any other part of the secret


def test_bootstrap_servers_among_the_client_settings_is_refused_naming_the_flag_that_sets_it(tmp_path):
    with pytest.raises(ConfigError, match="'bootstrap.servers' .* --bootstrap-servers \\(or HRNN_BOOTSTRAP_SERVERS"):
        parse_client_settings(["bootstrap.servers=kafka:9092"])
    props = tmp_path / "client.properties"
    props.write_text("bootstrap.servers=kafka.example.com:9092\nsecurity.protocol=SASL_SSL\n")
    with pytest.raises(ConfigError, match=f"{props}: .*'bootstrap.servers'"):
        load_client_settings(props)


@pytest.mark.broker
def test_read_all_returns_every_record_even_when_produced_as_one_batch(broker):
    topic = f"readall-{uuid.uuid4().hex[:8]}"
    producer = Producer(producer_config(broker.bootstrap, {"linger.ms": 50}))
    for i in range(60):
        producer.produce(topic, key=str(i % 3).encode(), value=str(i).encode())
    assert producer.flush(15) == 0
    records = read_all(broker.bootstrap, topic, idle_s=1.0, timeout_s=30)
    assert sorted(int(r.value) for r in records) == list(range(60))
    assert all(r.topic == topic and r.timestamp_ms for r in records)
    assert wait_for_count(broker.bootstrap, topic, 60, timeout_s=30)[:1]
    with pytest.raises(WaitTimeout) as info:
        wait_for_count(broker.bootstrap, topic, 61, timeout_s=2)
    assert len(info.value.records) == 60 and "60 of 61" in str(info.value)


@pytest.mark.broker
def test_producing_more_records_than_the_local_queue_holds_waits_for_room_and_loses_none(broker):
    topic = f"acked-{uuid.uuid4().hex[:8]}"
    producer = create_producer(broker.bootstrap, {"queue.buffering.max.messages": "10"})
    with pytest.raises(BufferError):  # what a plain produce loop meets
        for i in range(11):
            producer.produce(topic, value=b"x", partition=0)
    assert producer.flush(15) == 0
    records = [(str(i).encode(), str(i).encode()) for i in range(200)]
    assert produce_acknowledged(producer, topic, records, timeout_s=30) is None
    got = read_all(broker.bootstrap, topic, idle_s=1.0, timeout_s=30)
    assert [r.key for r in got[10:]] == [k for k, _ in records]


def test_a_record_the_client_refuses_before_sending_is_reported_as_a_failure_not_raised():
    producer = create_producer("127.0.0.1:9", {"message.max.bytes": "1000"})
    failure = produce_acknowledged(producer, "t", [(b"sku-1", b"x" * 5000)], timeout_s=1)
    assert failure is not None and "MSG_SIZE_TOO_LARGE" in failure and "sku-1" in failure


@pytest.mark.broker
def test_a_scan_up_to_the_end_offsets_stops_there_while_the_topic_is_still_written(broker):
    topic = f"scan-{uuid.uuid4().hex[:8]}"
    producer = Producer(producer_config(broker.bootstrap, {"linger.ms": 50}))
    for i in range(60):  # one partition, batched as a producer batches
        producer.produce(topic, key=b"k", value=str(i).encode(), partition=0)
    assert producer.flush(15) == 0
    ends = {p: end for p, (_, end) in watermarks(broker.bootstrap, topic).items()}
    stop = threading.Event()

    def keep_writing() -> None:
        while not stop.is_set():
            producer.produce(topic, key=b"k", value=b"later", partition=0)
            producer.poll(0.02)

    writer = threading.Thread(target=keep_writing, daemon=True)
    writer.start()
    seen: list[int] = []
    try:  # idle_s longer than timeout_s: only reaching the end offsets can finish it
        assert scan(broker.bootstrap, topic, lambda r: seen.append(r.offset), until=ends, idle_s=60, timeout_s=30)
    finally:
        stop.set()
        writer.join()
    assert seen[:60] == list(range(60))


@pytest.mark.broker
def test_read_all_of_a_missing_topic_is_empty(broker):
    assert read_all(broker.bootstrap, f"never-{uuid.uuid4().hex[:8]}", idle_s=0.5, timeout_s=5) == []


@pytest.mark.broker
def test_partition_for_predicts_where_the_default_producer_puts_a_key(broker):
    from confluent_kafka.admin import NewTopic

    from stream.kafka_clients import admin_client, partition_for
    topic = f"part-{uuid.uuid4().hex[:8]}"
    admin = admin_client(broker.bootstrap)
    admin.create_topics([NewTopic(topic, 5, 1)])[topic].result(timeout=10)
    producer = Producer(producer_config(broker.bootstrap))
    keys = [f"user-{i}".encode() for i in range(40)] + [b"", b"a", b"ab", b"abc", "\u00e9t\u00e9".encode()]
    for key in keys:
        producer.produce(topic, key=key, value=b"x")
    assert producer.flush(15) == 0
    records = wait_for_count(broker.bootstrap, topic, len(keys), timeout_s=30)
    assert {(r.key, r.partition) for r in records} == {(k, partition_for(k, 5)) for k in keys}


@pytest.mark.broker
def test_a_topic_created_again_under_its_name_has_another_id(broker):
    from confluent_kafka.admin import NewTopic

    from stream.kafka_clients import KafkaClientError, admin_client, topic_id
    topic = f"tid-{uuid.uuid4().hex[:8]}"
    admin = admin_client(broker.bootstrap)
    admin.create_topics([NewTopic(topic, 2, 1)])[topic].result(timeout=10)
    first = topic_id(admin, topic)
    assert first is not None and len(first) == 32 and int(first, 16) > 0
    assert topic_id(admin, topic) == first  # the same log, read again
    admin.delete_topics([topic])[topic].result(timeout=10)
    admin.create_topics([NewTopic(topic, 2, 1)])[topic].result(timeout=10)
    again = topic_id(admin, topic)
    assert again is not None and again != first
    with pytest.raises(KafkaClientError, match=f"cannot describe topic 'never-{topic}'"):
        topic_id(admin, f"never-{topic}")


@pytest.mark.broker
def test_the_first_offset_since_a_time_is_found_by_its_records_timestamps(broker):
    from stream.kafka_clients import window_offsets
    topic, base = f"since-{uuid.uuid4().hex[:8]}", 1_700_000_000_000
    p = Producer({"bootstrap.servers": broker.bootstrap})
    for i in range(20):  # one second apart, in four batches
        p.produce(topic, b"x", partition=0, timestamp=base + i * 1000)
        if i % 5 == 4:
            p.flush(10)

    def first(since_ms: int, bounds: tuple[int, int] = (0, 20)) -> int:
        return window_offsets(broker.bootstrap, topic, since_ms, {0: bounds})[0][0]

    assert [first(base + t) for t in (-1, 0, 1, 4_500, 5_000, 19_000, 30_000)] == [0, 0, 1, 5, 5, 19, 20]
    assert first(base, (3, 20)) == 3  # not before the first offset given
    assert first(base, (0, 0)) == 0  # an empty partition
    # The local broker reports a partition's end as its last batch's base offset + 1 (16 here): the end is
    # read again from the records, and the window's first offset can lie past the reported end.
    assert window_offsets(broker.bootstrap, topic, base + 17_000, {0: (0, 16)})[0] == (17, 20)
    assert window_offsets(broker.bootstrap, topic, None, {0: (2, 16)})[0] == (2, 20)  # no time: all of it


@pytest.mark.parametrize("content, complaint", [
    pytest.param(None, "cannot read Kafka client properties", id="missing"),
    # a managed-Kafka console's file names its cluster: the --bootstrap-servers default silently replaced it
    pytest.param(b"bootstrap.servers=kafka.example.com:9092\n",
                 "'bootstrap.servers' is not taken from the client settings", id="bootstrap.servers"),
    pytest.param(b"sasl.password=p\xe4ss\n", "is not UTF-8 text: the byte at offset 15", id="iso-8859-1"),  # Java's
])
@pytest.mark.parametrize("argv", [
    ["produce", "--data", "../events.csv"], ["tail", "--timeout", "5"], ["items", "list", "--timeout-s", "5"],
    ["models", "list", "reg", "--bootstrap-servers", "h:1"],
    ["retrainer", "--once", "--registry", "reg", "--archive", "arc", "--bootstrap-servers", "h:1"],
    ["audit", "--timeout-s", "5"], ["quality", "--timeout-s", "5"], ["serve", "--registry", "reg", "--state-dir", "st"],
])
@pytest.mark.timeout(30)  # a command that took the file would dial a broker: fail, not hang
def test_every_kafka_command_refuses_a_client_properties_file_it_cannot_apply_as_written(tmp_path, capsys,
                                                                                        monkeypatch, argv, content,
                                                                                        complaint):
    """One flag, one reading: exit 2 naming the file, before any broker is reached or anything written."""
    from stream import cli

    (tmp_path / "events.csv").write_text("USER_ID,ITEM_ID,TIMESTAMP\nu,i,1\n")
    (tmp_path / "run").mkdir()
    monkeypatch.chdir(tmp_path / "run")
    monkeypatch.setattr("stream.observability.setup_json_logging", lambda level: None)
    props = tmp_path / "client.properties"
    if content is not None:
        props.write_bytes(content)
    assert cli.main([*argv, "--kafka-config-file", str(props)]) == 2
    err = capsys.readouterr().err
    assert str(props) in err and complaint in err and "Traceback" not in err
    assert list((tmp_path / "run").iterdir()) == []


def test_the_client_built_to_check_settings_is_closed_not_left_retrying_the_servers(monkeypatch):
    """Dropped, it would live until the collector took it: through a whole `--once` training, retrying the servers."""
    import stream.kafka_clients as kc

    built = []

    class Recorded:
        closed = False

        def close(self) -> bool:
            self.closed = True
            return True

    monkeypatch.setattr(kc, "create_producer", lambda bootstrap, extra=None: built.append(Recorded()) or built[-1])
    kc.check_client_settings("127.0.0.1:9", {"linger.ms": "5"})
    assert [c.closed for c in built] == [True]


@pytest.mark.parametrize("argv, env, setting", [
    (["--bootstrap-servers", "\udcff"], {}, "'bootstrap.servers'"),
    ([], {"HRNN_BOOTSTRAP_SERVERS": "h\udcff:1"}, "'bootstrap.servers'"),
    (["--bootstrap-servers", "127.0.0.1:9", "--kafka-config", "client.id=\udcffsecret"], {}, "'client.id'"),
    (["--bootstrap-servers", "127.0.0.1:9", "--kafka-config", "\udcff=1"], {}, "'\\xff'"),
])
@pytest.mark.timeout(30)
def test_kafka_settings_in_bytes_that_are_not_utf8_are_refused_naming_the_setting_not_its_value(
        capsys, monkeypatch, argv, env, setting):
    """A terminal in Latin-1 hands Python lone surrogates, which the client cannot encode: exit 2, no SystemError."""
    from stream import cli

    for name, value in env.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setattr("stream.observability.setup_json_logging", lambda level: None)
    assert cli.main(["items", "list", *argv]) == 2
    err = capsys.readouterr().err
    assert setting in err and "not UTF-8" in err and "secret" not in err and "Traceback" not in err


@pytest.mark.parametrize("build", [
    lambda extra: consumer_config("h:1", "g", extra), lambda extra: producer_config("h:1", extra),
    lambda extra: admin_config("h:1", extra),
])
def test_every_client_config_refuses_a_value_that_is_not_utf8_as_a_config_error(build):
    with pytest.raises(ConfigError, match="'sasl.password' is not UTF-8") as caught:
        build({"sasl.password": "se\udcffcret"})
    assert "cret" not in str(caught.value)


# --- a broker that cannot be reached: said once, by the command, naming the servers ---

UNREACHABLE = "127.0.0.1:1"  # nothing listens there: every connect is refused at once


def _poll_for(client, seconds: float) -> None:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        client.poll(0.2)


def test_clients_that_cannot_reach_their_broker_print_no_librdkafka_lines_but_keep_setting_warnings(capfd, caplog):
    import logging

    from stream.kafka_clients import reader_consumer

    caplog.set_level(logging.WARNING)
    producer = create_producer(UNREACHABLE, {"fetch.wait.max.ms": "10"})  # a consumer property: a CONFWARN
    consumer = reader_consumer(UNREACHABLE)
    try:
        _poll_for(producer, 1.0)
        _poll_for(consumer, 1.0)
    finally:
        consumer.close()
    err = capfd.readouterr().err
    assert "FAIL" not in err and "Connection refused" not in err  # librdkafka's ~20 lines a second, before
    assert any("CONFWARN" in r.getMessage() and "fetch.wait.max.ms" in r.getMessage() for r in caplog.records)


def test_connection_failures_that_go_on_are_logged_as_one_warning_per_interval_naming_the_servers(monkeypatch,
                                                                                               caplog):
    import logging

    import stream.kafka_clients as kafka_clients

    monkeypatch.setattr(kafka_clients, "CONNECTION_FAILURES_EVERY_S", 0.5)
    servers = f"{UNREACHABLE},{UNREACHABLE}"  # this test's own: the interval runs per servers
    caplog.set_level(logging.WARNING, logger="stream.kafka_clients")
    consumer = kafka_clients.reader_consumer(servers)
    try:
        _poll_for(consumer, 2.6)
    finally:
        consumer.close()
    said = [r.getMessage() for r in caplog.records if r.name == "stream.kafka_clients"]
    # not at the first failure, then at most every 0.5 s: not each of the ~50 refused connects (a loaded machine
    # may see fewer of them, so only one warning is sure)
    assert 1 <= len(said) <= 6, said
    assert all(f"cannot reach Kafka at {servers}" in line for line in said)


def test_a_logger_among_the_client_settings_still_gets_librdkafkas_lines():
    logger, lines = _capturing_logger()
    producer = create_producer(UNREACHABLE, {"logger": logger})
    refused = lambda: any("FAIL" in line and "Connection refused" in line for line in lines)  # noqa: E731
    deadline = time.monotonic() + 10.0  # the first refused connect comes within ms; a loaded machine may delay it
    while not refused() and time.monotonic() < deadline:
        producer.poll(0.2)
    assert refused()


def test_requests_to_an_unreachable_broker_fail_naming_its_servers_and_the_flag():
    from stream.kafka_clients import KafkaClientError, admin_client, reader_consumer, topic_id, topic_partitions

    consumer = reader_consumer(UNREACHABLE)
    try:
        with pytest.raises(KafkaClientError, match=r"cannot read metadata of topic 't' on 127\.0\.0\.1:1 \(is the "
                                                   r"broker reachable\? check --bootstrap-servers\): _TRANSPORT"):
            topic_partitions(consumer, "t", timeout_s=1.0)
    finally:
        consumer.close()
    with pytest.raises(KafkaClientError, match=r"cannot describe topic 't' on 127\.0\.0\.1:1 .*--bootstrap-servers"):
        topic_id(admin_client(UNREACHABLE), "t", timeout_s=1.0)


@pytest.mark.parametrize("command", ["audit", "quality"])
def test_audit_and_quality_give_up_on_an_unreachable_broker_within_their_timeout(command, capsys):
    from stream.cli import main as hrnn

    started = time.monotonic()
    rc = hrnn([command, "--bootstrap-servers", UNREACHABLE, "--timeout-s", "3"])
    took = time.monotonic() - started
    assert took < 8, took  # 30 s (audit) and 10 s (quality) before, whatever --timeout-s said
    assert rc == 2 and f"on {UNREACHABLE} (is the broker reachable?" in capsys.readouterr().err
