"""Creating and checking the system's topics against the real broker."""
from __future__ import annotations

import uuid

import pytest
from confluent_kafka import KafkaError, KafkaException
from confluent_kafka.admin import NewTopic

from model.errors import HRNNError
from stream.kafka_clients import admin_client
from stream.topics import (
    MODEL_UPDATES_TOPIC, TopicCreationError, TopicError, TopicMismatchError, TopicSpec, changelog_topic, cleanup_policy,
    ensure_topics, partition_counts, standard_topics, table_topic,
)


def _name(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


@pytest.fixture(scope="module")
def admin(broker):
    return admin_client(broker.bootstrap)


def test_standard_topics_cover_every_topic_the_worker_group_uses():
    specs = {s.name: s for s in standard_topics("in", "out", "grp", 6)}
    assert set(specs) == {"in", "out", "in.dlq", "grp.state-changelog", "hrnn.model-updates"}
    assert specs["in"].partitions == 6 and specs[changelog_topic("grp")].partitions == 6
    assert specs["grp.state-changelog"].compacted and specs["hrnn.model-updates"].compacted
    assert not specs["in"].compacted and not specs["out"].compacted


@pytest.mark.broker
def test_missing_topics_are_created_with_their_partitions_and_compaction(admin):
    specs = standard_topics(_name("in"), _name("out"), _name("grp"), 3)
    created = ensure_topics(admin, specs)
    own = {s.name for s in specs} - {MODEL_UPDATES_TOPIC}  # the shared one: any worker of the session makes it
    assert own <= set(created) <= own | {MODEL_UPDATES_TOPIC}
    counts = partition_counts(admin)
    for spec in specs:
        assert counts[spec.name] == spec.partitions
        policy = cleanup_policy(admin, spec.name)
        if spec.compacted:
            assert policy == "compact"  # Tansu reports configs given at creation
        else:
            assert policy in (None, "delete")  # Tansu reports nothing for an unset policy


@pytest.mark.broker
def test_ensure_topics_is_idempotent(admin):
    specs = [TopicSpec(_name("t"), 2), TopicSpec(_name("c"), 2, compacted=True)]
    assert len(ensure_topics(admin, specs)) == 2
    assert ensure_topics(admin, specs) == []


@pytest.mark.broker
def test_existing_topic_with_fewer_partitions_is_a_mismatch_naming_the_fix(admin):
    name = _name("small")
    ensure_topics(admin, [TopicSpec(name, 2)])
    with pytest.raises(TopicMismatchError) as info:
        ensure_topics(admin, [TopicSpec(name, 4)])
    msg = str(info.value)
    assert name in msg and "2 partition" in msg and "4" in msg and "--partitions" in msg
    assert isinstance(info.value, HRNNError)
    ensure_topics(admin, [TopicSpec(name, 1)])  # more partitions than needed is fine


@pytest.mark.broker
def test_a_changelog_with_fewer_partitions_than_the_input_names_the_input_and_no_flag_that_would_not_help(admin):
    grp, inp = _name("grp"), _name("in")
    ensure_topics(admin, [TopicSpec(changelog_topic(grp), 3, compacted=True)])
    with pytest.raises(TopicMismatchError) as info:
        ensure_topics(admin, standard_topics(inp, _name("out"), grp, 5))
    msg = str(info.value)
    assert f"has 3 partition(s) but 5 are needed, one per partition of the input topic {inp!r}" in msg
    assert "--partitions 5" in msg and "run with --partitions" not in msg  # --partitions 5: kafka-topics.sh's


@pytest.mark.broker
def test_existing_topic_without_compaction_is_a_mismatch_when_compaction_is_needed(admin):
    name = _name("notcompact")
    admin.create_topics([NewTopic(name, 1, 1, config={"cleanup.policy": "delete"})])[name].result(timeout=10)
    with pytest.raises(TopicMismatchError) as info:
        ensure_topics(admin, [TopicSpec(name, 1, compacted=True)])
    assert name in str(info.value) and "cleanup.policy=compact" in str(info.value)


@pytest.mark.broker
@pytest.mark.parametrize("compacted_spec", [lambda name: TopicSpec(name, 1, compacted=True), table_topic])
def test_compaction_with_delete_is_a_mismatch_since_it_drops_each_keys_latest_value(admin, compacted_spec):
    name = _name("compactdelete")
    admin.create_topics([NewTopic(name, 1, 1, config={"cleanup.policy": "compact,delete",
                                                      "retention.ms": "3600000"})])[name].result(timeout=10)
    with pytest.raises(TopicMismatchError) as info:
        ensure_topics(admin, [compacted_spec(name)])
    msg = str(info.value)
    assert name in msg and "compact,delete" in msg and "retention.ms" in msg
    assert "kafka-configs.sh --alter" in msg and "cleanup.policy=compact" in msg


@pytest.mark.broker
def test_compaction_with_delete_but_unlimited_retention_keeps_every_latest_value_and_passes(admin):
    name = _name("compactkeep")
    admin.create_topics([NewTopic(name, 1, 1, config={"cleanup.policy": "compact,delete",
                                                      "retention.ms": "-1"})])[name].result(timeout=10)
    assert ensure_topics(admin, [TopicSpec(name, 1, compacted=True)]) == []


class _RefusingAdmin:
    """Unit-test fake: lists no topics and refuses every creation the way librdkafka reports it."""

    def list_topics(self, timeout=None):
        return type("Md", (), {"topics": {}})()

    def create_topics(self, topics, **_):
        class Refused:
            def result(self, timeout=None):
                raise KafkaException(KafkaError(KafkaError.POLICY_VIOLATION, "topic creation disabled by policy"))
        return {t.topic: Refused() for t in topics}


def test_broker_refusing_creation_is_an_error_naming_topic_and_reason():
    with pytest.raises(TopicCreationError) as info:
        ensure_topics(_RefusingAdmin(), [TopicSpec("hrnn.events", 3)])
    msg = str(info.value)
    assert "hrnn.events" in msg and "POLICY_VIOLATION" in msg and "disabled by policy" in msg


@pytest.mark.broker
def test_unreported_cleanup_policy_is_a_warning_not_an_error(admin, caplog):
    name = _name("unset")
    admin.create_topics([NewTopic(name, 1, 1)])[name].result(timeout=10)
    if cleanup_policy(admin, name) is not None:
        pytest.skip("this broker reports cleanup.policy for every topic")
    with caplog.at_level("WARNING", logger="stream.topics"):
        assert ensure_topics(admin, [TopicSpec(name, 1, compacted=True)]) == []
    assert any("cannot verify compaction" in r.getMessage() and r.topic == name for r in caplog.records)


def test_standard_topics_use_the_updates_topic_the_settings_name():
    specs = {s.name: s for s in standard_topics("in", "out", "grp", 6, "shop1.model-updates")}
    assert "shop1.model-updates" in specs and MODEL_UPDATES_TOPIC not in specs
    assert specs["shop1.model-updates"] == table_topic("shop1.model-updates")


def _compacted_topic(admin, name: str, partitions: int) -> None:
    # Made the way an operator or a broker's auto-create (num.partitions > 1) would, not by ensure_topics.
    admin.create_topics([NewTopic(name, partitions, 1, config={"cleanup.policy": "compact"})])[name].result(timeout=10)


@pytest.mark.broker
def test_a_table_topic_with_more_than_one_partition_is_a_mismatch_saying_to_recreate_it(admin):
    name = _name("table3")
    _compacted_topic(admin, name, 3)
    with pytest.raises(TopicMismatchError) as info:  # a reader of partition 0 would miss the others' records
        ensure_topics(admin, [table_topic(name)])
    msg = str(info.value)
    assert name in msg and "3 partitions" in msg and "exactly 1" in msg and "Recreate" in msg


@pytest.mark.broker
def test_a_table_topic_with_one_partition_passes(admin):
    name = _name("table1")
    _compacted_topic(admin, name, 1)
    assert ensure_topics(admin, [table_topic(name)]) == []


@pytest.mark.broker
def test_the_availability_and_announcement_readers_refuse_a_table_topic_of_several_partitions(broker, admin):
    from stream.compacted import ensure_table_topic

    name = _name("avail3")
    _compacted_topic(admin, name, 3)
    with pytest.raises(TopicMismatchError, match="exactly 1"):
        ensure_table_topic(broker.bootstrap, name)


def test_a_broker_that_never_answers_a_creation_is_a_typed_error_not_a_bare_timeout(monkeypatch):
    """Python's wait ending first raised a builtin TimeoutError, a traceback for every command."""
    from concurrent.futures import Future
    from types import SimpleNamespace

    import stream.topics

    class Silent:
        def list_topics(self, timeout):
            return SimpleNamespace(topics={})

        def create_topics(self, new, **kwargs):
            return {t.topic: Future() for t in new}  # never resolved

        def describe_configs(self, resources, **kwargs):
            return {r: Future() for r in resources}

    monkeypatch.setattr(stream.topics, "_GRACE_S", 0.05)
    with pytest.raises(TopicCreationError, match="did not answer within 0.1 s"):
        ensure_topics(Silent(), [TopicSpec("t", 1)], timeout_s=0.1)
    with pytest.raises(stream.topics.TopicError, match="no answer within 0.1 s"):
        cleanup_policy(Silent(), "t", timeout_s=0.1)


@pytest.mark.parametrize("name", ["", ".", "..", "../events", "shop events", "é", "t" * 250])
def test_a_name_apache_kafka_would_refuse_is_refused_whatever_the_broker(name):
    from model.errors import ConfigError
    from stream.topics import check_topic_name

    with pytest.raises(ConfigError, match=r"--topic .* is not a Kafka topic name"):
        check_topic_name("--topic", name)
    check_topic_name("--topic", "Shop_EU-1.events." + "t" * 232)  # every legal character, 249 of them


@pytest.mark.parametrize("argv", [
    ["produce", "--data", "events.csv"], ["items", "unavailable", "sku-1"], ["models", "rollback", "reg"],
])
def test_commands_that_create_or_write_a_topic_refuse_an_illegal_name_before_anything_changes(
        tmp_path, monkeypatch, capsys, argv):
    """The local broker (Tansu) would create '../events'; Apache Kafka would not, so neither do we."""
    from stream.cli import main as hrnn

    monkeypatch.chdir(tmp_path)
    (tmp_path / "events.csv").write_text("USER_ID,ITEM_ID,TIMESTAMP\nu,i,1\n")
    assert hrnn([*argv, "--bootstrap-servers", "127.0.0.1:9", "--topic", "../events"]) == 2
    assert "--topic '../events' is not a Kafka topic name" in capsys.readouterr().err
    assert sorted(p.name for p in tmp_path.iterdir()) == ["events.csv"]


def test_listing_the_topics_of_an_unreachable_broker_fails_naming_its_servers_and_the_flag():
    with pytest.raises(TopicError, match=r"cannot list topics on 127\.0\.0\.1:1 \(is the broker reachable\? check "
                                         r"--bootstrap-servers\): _TRANSPORT"):
        partition_counts(admin_client("127.0.0.1:1"), timeout_s=1.0)
