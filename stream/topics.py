"""The topics the system uses, and creating/checking them before anything reads or writes.

A worker keeps one state store per input partition and mirrors it to the same partition of
its changelog, so partition counts matter: a topic with fewer partitions than asked is an
error the operator must fix, never something to work around silently. A table topic (model
announcements, item availability) is read on partition 0 only, so it must have exactly one:
records a producer's partitioner puts on any other partition would never be read.
"""
from __future__ import annotations

import logging
import re
import time
from dataclasses import dataclass

from confluent_kafka import KafkaError, KafkaException
from confluent_kafka.admin import AdminClient, ConfigResource, NewTopic, ResourceType

from model.errors import ConfigError, HRNNError
from stream.kafka_clients import error_detail, kafka_error, serve_log_lines, servers_of, unreachable_hint

log = logging.getLogger(__name__)

EVENTS_TOPIC = "hrnn.events"
RECOMMENDATIONS_TOPIC = "hrnn.recommendations"
MODEL_UPDATES_TOPIC = "hrnn.model-updates"
AVAILABILITY_TOPIC = "hrnn.item-availability"
DEFAULT_PARTITIONS = 6  # of an input topic a worker or `hrnn produce` creates, without --partitions
_GRACE_S = 5.0  # waits outlast librdkafka's request timeout by this, so its error (which says why) comes first


_TOPIC_NAME = re.compile(r"[A-Za-z0-9._-]{1,249}")


def check_topic_name(role: str, name: str) -> None:
    """Apache Kafka's rule for topic names, checked before anything starts: some Kafka-compatible brokers
    (Tansu) accept any name, and a name with '/' or '..' would place a partition's state store or an archive
    file outside its folder."""
    if not _TOPIC_NAME.fullmatch(name) or name in (".", ".."):
        raise ConfigError(f"{role} {name!r} is not a Kafka topic name: give 1 to 249 of the characters "
                          "a-z A-Z 0-9 . _ - (and not '.' or '..')")


def dlq_topic(input_topic: str) -> str:
    return f"{input_topic}.dlq"


def changelog_topic(group: str) -> str:
    return f"{group}.state-changelog"


@dataclass(frozen=True)
class TopicSpec:
    name: str
    partitions: int
    compacted: bool = False
    replication: int = -1  # -1: the broker's default.replication.factor
    # True: exactly `partitions`, more is a mismatch too (a table topic is read on partition 0 only).
    exact_partitions: bool = False
    # Where the count comes from another topic's, which no flag changes: what a mismatch then says.
    partitions_of: str | None = None


def table_topic(name: str) -> TopicSpec:
    """A table topic: one compacted partition, read whole by every process that needs it."""
    return TopicSpec(name, 1, compacted=True, exact_partitions=True)


class TopicError(HRNNError):
    """A topic is missing, cannot be created, or does not have the shape the system needs."""


class TopicMismatchError(TopicError):
    """An existing topic has fewer partitions than needed (or more, where exactly so many are needed), or lacks
    compaction where it is needed (or adds delete to it, which drops a key's latest value)."""


class TopicCreationError(TopicError):
    """The broker refused to create a topic; the message carries the broker's reason."""


def standard_topics(input_topic: str = EVENTS_TOPIC, output_topic: str = RECOMMENDATIONS_TOPIC,
                    group: str = "hrnn-worker", partitions: int = 1,
                    updates_topic: str = MODEL_UPDATES_TOPIC) -> list[TopicSpec]:
    """Every topic a worker group touches. `partitions` must be the input topic's real count:
    the changelog needs a partition for every input partition. `updates_topic` is the settings'
    announcements topic (a deployment may name its own)."""
    return [
        TopicSpec(input_topic, partitions),
        TopicSpec(output_topic, partitions, partitions_of=input_topic),
        TopicSpec(dlq_topic(input_topic), 1),  # low volume; order across users does not matter
        TopicSpec(changelog_topic(group), partitions, compacted=True, partitions_of=input_topic),
        table_topic(updates_topic),  # one announcement stream, read whole
    ]


def partition_counts(admin: AdminClient, timeout_s: float = 10.0) -> dict[str, int]:
    """Partition count of every topic the broker lists."""
    serve_log_lines(admin)
    try:
        md = admin.list_topics(timeout=timeout_s)
    except KafkaException as exc:
        raise TopicError(f"cannot list topics{unreachable_hint(servers_of(admin))}: {error_detail(exc)}") from None
    return {name: len(t.partitions) for name, t in md.topics.items() if t.error is None}


def ensure_input_topic(admin: AdminClient, name: str, partitions: int = 0) -> bool:
    """An input (events) topic: a missing one is created with `partitions`, else DEFAULT_PARTITIONS; an existing
    one keeps its count unless `partitions` asks for more (TopicMismatchError). True when it was created."""
    n = partitions or partition_counts(admin).get(name, DEFAULT_PARTITIONS)
    return bool(ensure_topics(admin, [TopicSpec(name, n)]))


def ensure_topics(admin: AdminClient, specs: list[TopicSpec], *, timeout_s: float = 30.0) -> list[str]:
    """Create the missing topics and check the existing ones; returns the names created.

    Raises TopicMismatchError for an existing topic that has too few partitions (or too many,
    with `exact_partitions`) or no compaction where `compacted` is asked (or compaction with delete, unless
    retention.ms is -1), TopicCreationError when the broker refuses."""
    existing = partition_counts(admin, timeout_s)
    missing = [s for s in specs if s.name not in existing]
    created: list[str] = []
    if missing:
        futures = admin.create_topics(
            [NewTopic(s.name, s.partitions, s.replication, config=_topic_config(s)) for s in missing],
            request_timeout=timeout_s, operation_timeout=timeout_s)
        for spec in missing:
            try:
                futures[spec.name].result(timeout=timeout_s + _GRACE_S)
                created.append(spec.name)
            except TimeoutError:
                raise TopicCreationError(f"creating topic {spec.name!r}: the broker did not answer within "
                                         f"{timeout_s:g} s") from None
            except KafkaException as exc:
                # Another worker of the group may have created it a moment ago: check it like any other.
                err = kafka_error(exc)
                if err is not None and err.code() == KafkaError.TOPIC_ALREADY_EXISTS:
                    continue
                raise TopicCreationError(
                    f"the broker refused to create topic {spec.name!r} ({spec.partitions} partitions"
                    f"{', compacted' if spec.compacted else ''}): {error_detail(exc)}") from None
        _wait_visible(admin, [s.name for s in missing], timeout_s)
        existing = partition_counts(admin, timeout_s)
    for spec in specs:
        if spec.name not in created:
            _check_existing(admin, spec, existing.get(spec.name, 0), timeout_s)
    if created:
        log.info("created topics", extra={"topics": created})
    return created


def _topic_config(spec: TopicSpec) -> dict[str, str]:
    return {"cleanup.policy": "compact"} if spec.compacted else {}


def _check_existing(admin: AdminClient, spec: TopicSpec, partitions: int, timeout_s: float) -> None:
    if partitions < spec.partitions:
        # --partitions sets only a topic's own count, not one that follows the input topic's
        why, flag = ((f", one per partition of the input topic {spec.partitions_of!r}", "") if spec.partitions_of
                     else ("", f"or run with --partitions {partitions}, "))
        raise TopicMismatchError(
            f"topic {spec.name!r} has {partitions} partition(s) but {spec.partitions} are needed{why}: "
            f"add partitions (kafka-topics.sh --alter --topic {spec.name} --partitions {spec.partitions}), "
            f"{flag}or delete the topic so it is re-created")
    if spec.exact_partitions and partitions > spec.partitions:
        # Kafka cannot remove partitions: the only fix is a new topic.
        compact = " --config cleanup.policy=compact" if spec.compacted else ""
        raise TopicMismatchError(
            f"topic {spec.name!r} has {partitions} partitions but must have exactly {spec.partitions}: it is read "
            f"as a table on partition 0 only, so records on the others would never be read. Recreate it with "
            f"{spec.partitions} partition(s) (kafka-topics.sh --delete --topic {spec.name}, then kafka-topics.sh "
            f"--create --topic {spec.name} --partitions {spec.partitions}{compact}, or let it be re-created) "
            f"and publish its records again")
    if not spec.compacted:
        return
    configs = _topic_configs(admin, spec.name, timeout_s)
    policy = configs.get("cleanup.policy")
    if policy is None:
        # Tansu only reports the configs a topic was created with; an unreported policy cannot be checked.
        log.warning("broker does not report cleanup.policy; cannot verify compaction",
                    extra={"topic": spec.name})
        return
    policies = {p.strip() for p in policy.split(",")}
    fix = (f"set it with kafka-configs.sh --alter --entity-type topics --entity-name {spec.name} "
           f"--add-config cleanup.policy=compact, or delete the topic so it is re-created")
    if "compact" not in policies:
        raise TopicMismatchError(f"topic {spec.name!r} has cleanup.policy={policy} but needs compaction: {fix}")
    # With delete beside compact, Kafka drops a key's latest value too once it is older than retention.ms:
    # a restore loses the state of users idle that long, and an item taken off sale comes back on sale.
    if "delete" in policies and configs.get("retention.ms") != "-1":
        raise TopicMismatchError(
            f"topic {spec.name!r} has cleanup.policy={policy} (retention.ms="
            f"{configs.get('retention.ms') or 'unreported'}): Kafka would delete each key's latest value "
            f"after retention.ms, losing the table it keeps; it needs compaction alone: {fix}")


def cleanup_policy(admin: AdminClient, topic: str, timeout_s: float = 10.0) -> str | None:
    """The topic's cleanup.policy, or None when the broker does not report it."""
    return _topic_configs(admin, topic, timeout_s).get("cleanup.policy")


def _topic_configs(admin: AdminClient, topic: str, timeout_s: float) -> dict[str, str]:
    """The configs the broker reports for the topic (Tansu: only those it was created with)."""
    resource = ConfigResource(ResourceType.TOPIC, topic)
    try:
        configs = admin.describe_configs([resource], request_timeout=timeout_s)[resource].result(
            timeout=timeout_s + _GRACE_S)
    except TimeoutError:
        raise TopicError(f"cannot read the configuration of topic {topic!r}: no answer within {timeout_s:g} s") \
            from None
    except KafkaException as exc:
        raise TopicError(f"cannot read the configuration of topic {topic!r}: {error_detail(exc)}") from None
    return {name: str(entry.value) for name, entry in configs.items() if entry.value is not None}


def _wait_visible(admin: AdminClient, names: list[str], timeout_s: float) -> None:
    # Creation is acknowledged by the controller before every broker's metadata shows the topic.
    deadline = time.monotonic() + timeout_s
    pending = set(names)
    while pending:
        pending -= set(partition_counts(admin, timeout_s))
        if not pending:
            return
        if time.monotonic() >= deadline:
            raise TopicError(f"topics {sorted(pending)} were created but not visible within {timeout_s:g} s")
        time.sleep(0.1)
