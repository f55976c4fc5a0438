"""The streaming worker's settings: one typed object, filled (in rising priority) from defaults,
a JSON/TOML file, environment variables HRNN_<FIELD> and command-line flags.

A settings file may hold the worker's keys at its top level or in a `[serve]` table (so one
file can also carry other commands' sections, the only other top-level keys it then accepts).
Kafka client settings (`security.protocol`, `sasl.*`, `ssl.*`, ...) go in a `kafka` table, in
HRNN_KAFKA as `key=value,key=value` or JSON, or in repeatable `--kafka-config KEY=VALUE` flags;
they are passed to librdkafka unchanged.
`kafka_consumer` / `kafka_producer` tables (HRNN_KAFKA_CONSUMER, HRNN_KAFKA_PRODUCER) add
settings for one kind of client only, e.g. session.timeout.ms, which a producer would warn about.
These tables merge key by key, file < environment < flags: a higher layer adds or replaces single keys, and
its key for every client (`kafka`, `--kafka-config`) also wins over a lower layer's key for one kind. An empty
variable adds nothing (a layer cannot remove a lower one's key).
"""
from __future__ import annotations

import difflib
import hashlib
import json
import logging
import math
import os
import socket
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from model.config import DataConfig, HRNNConfig, field_names, json_kind, load_config, read_config_file
from model.errors import ConfigError
from model.state import FORMAT_VERSION, FORMATS
from stream import topics
from stream.cli_common import directory_flag
from stream.records import DEFAULT_MESSAGE_MAX_BYTES

log = logging.getLogger(__name__)

ENV_PREFIX = "HRNN_"
# HRNN_* variables read outside any settings object (stream.worker.FAULT_ENV, imported with torch), and the
# test suite's (HRNN_TEST_*): no typo of a setting.
_READ_DIRECTLY = ("FAULT_INJECT",)
_TEST_VARIABLES = "TEST_"
GUARANTEES = ("at_least_once", "exactly_once")
MAX_K = 500
MESSAGE_MAX_BYTES_RANGE = (1000, 1_000_000_000)  # what librdkafka accepts
_TABLE_SETTINGS = ("kafka", "kafka_consumer", "kafka_producer")  # the worker's settings that are tables


def _parse_kafka(value: Any, name: str) -> dict[str, str]:
    """The Kafka table `name` (kafka, kafka_consumer or kafka_producer) from a file's table, or from a variable's
    or flag's text: `key=value,key=value` or JSON."""
    if value is None:
        return {}
    if isinstance(value, str):
        text = value.strip()
        if not text:
            return {}
        if text.startswith("{"):
            try:
                value = json.loads(text)
            except ValueError as exc:
                raise ConfigError(f"setting {name}: not valid JSON: {exc}") from None
        else:
            pairs = [kv.split("=", 1) for kv in text.split(",") if kv.strip()]
            if any(len(p) != 2 for p in pairs):
                raise ConfigError(f"setting {name}: {value!r} must look like key=value,key=value")
            value = dict(pairs)
    if not isinstance(value, Mapping):
        raise ConfigError(f"setting {name} must be a table of librdkafka settings, got {type(value).__name__}")
    return {k: _kafka_value(name, k, v) for k, v in _flat(value, name).items()}


def _kafka_value(table: str, key: str, value: Any) -> str:
    """librdkafka takes every setting as text: a number or boolean of a file becomes its text (booleans as
    librdkafka spells them, true/false). Anything else has no text librdkafka would read as meant: str(null) was
    the client.id "None", str of an array "['a', 'b']"."""
    if isinstance(value, bool):
        return str(value).lower()
    if isinstance(value, (str, int, float)):
        return str(value).strip()
    shown = "null is not" if value is None else f"{json.dumps(value, default=repr)} is {json_kind(value)}, not"
    raise ConfigError(f"setting {table}: {key!r} = {shown} a string, number or boolean (librdkafka takes one "
                      "value per key)")


def _flat(table: Mapping, name: str, prefix: str = "") -> dict[str, Any]:
    """librdkafka's names as keys: TOML reads a bare dotted key (security.protocol = ...) as nested tables,
    which are joined back into the dotted name a quoted key ("security.protocol" = ...) gives."""
    out: dict[str, Any] = {}
    for key, value in table.items():
        dotted = prefix + str(key).strip()
        for k, v in (_flat(value, name, dotted + ".") if isinstance(value, Mapping) else {dotted: value}).items():
            if k in out:
                raise ConfigError(f"setting {name}: {k!r} is given twice (as a dotted and as a quoted key)")
            out[k] = v
    return out


@dataclass
class WorkerSettings:
    """Everything `hrnn serve` can be told; field names are the file keys and HRNN_<NAME> variables."""

    bootstrap_servers: str = "127.0.0.1:9092"
    registry: str = ""  # model registry directory (required)
    state_dir: str = ""  # where the per-partition RocksDB stores live (required)
    input_topic: str = "hrnn.events"
    output_topic: str = "hrnn.recommendations"
    group: str = "hrnn-worker"
    partitions: int = 0  # partitions for topics this worker creates; 0: the input topic's count, else 6
    batch_size: int = 500  # most records per batch (one Recommender call)
    batch_timeout_s: float = 0.01  # after a batch's first record, how long to wait for more (0: take what is there)
    k: int = 25
    exclude_purchased: bool = True
    purchase_types: tuple[str, ...] = ("purchase",)
    exclude_session_items: bool = False  # opt-in: in repeat-heavy domains these are the best recommendations
    exclude_event_types: tuple[str, ...] = ()
    processing_guarantee: str = "at_least_once"
    transactional_id: str = ""  # exactly_once only; empty: <group>-<host>-<hash of state_dir>
    device: str = "auto"
    torch_threads: int = 0  # CPU threads for the model (process-wide); 0: torch's default (one per core)
    follow_updates: bool = True  # swap to versions announced on updates_topic for this registry
    # States a new version rebuilds in the background before it swaps in (0: all rebuild on their
    # user's next event). Each costs 8 x hidden_dimension bytes until that event.
    prebuild_max_users: int = 200_000
    updates_topic: str = "hrnn.model-updates"
    # The key of the announcements followed: the one `hrnn models promote|canary --registry-id` and the retrainer
    # announce under. Empty: the registry's absolute path here, which differs where hosts mount it elsewhere.
    registry_id: str = ""
    # Items taken off sale (stream/availability.py): read whole before the first batch, then followed.
    follow_availability: bool = True
    availability_topic: str = "hrnn.item-availability"
    metrics_port: int = 0  # 0: no metrics/health endpoint
    # Format of the states this worker writes (RocksDB, changelog); it reads formats 1 and 2. Keep 1 while
    # a rolling upgrade from a build that reads only format 1 is under way (they would start those users afresh).
    state_format: int = FORMAT_VERSION
    gc_threshold: int = 0  # the serving process's gen-0 GC threshold; 0: sized to batch_size (worker.gc_threshold_for)
    log_level: str = "INFO"
    restore_timeout_s: float = 120.0  # longest catch-up from the changelog for one assignment
    # An event stamped further ahead of its record's Kafka timestamp is dead-lettered (bad_timestamp): the user's
    # sessions never time out again after it, their clock having moved to its time. 0: no check.
    max_event_lead_s: float = 3600.0
    create_topics: bool = True
    # librdkafka pass-through for every client. Typed Mapping so the generic loader hands it over
    # untouched (it would coerce a dict's values to float); __post_init__ reads it.
    kafka: Mapping[str, str] = field(default_factory=dict)
    kafka_consumer: Mapping[str, str] = field(default_factory=dict)  # consumers only (session.timeout.ms, ...)
    kafka_producer: Mapping[str, str] = field(default_factory=dict)  # producers only (linger.ms, ...)

    def __post_init__(self) -> None:
        self.kafka = _parse_kafka(self.kafka, "kafka")
        self.kafka_consumer = _parse_kafka(self.kafka_consumer, "kafka_consumer")
        self.kafka_producer = _parse_kafka(self.kafka_producer, "kafka_producer")

    def validate(self) -> None:
        if not self.registry:
            raise ConfigError("no model registry given: pass --registry DIR (or set HRNN_REGISTRY)")
        if not self.state_dir:
            raise ConfigError("no state directory given: pass --state-dir DIR (or set HRNN_STATE_DIR)")
        directory_flag("--state-dir", self.state_dir)  # now, not in the first rebalance callback
        self.validate_kafka()
        _check_log_level(self.log_level)
        from model.network import resolve_device  # torch loads only once a worker is being set up

        resolve_device(self.device)
        if not 1 <= self.k <= MAX_K:
            raise ConfigError(f"k = {self.k} is outside its range [1, {MAX_K}]")
        if not 1 <= self.batch_size <= 100_000:
            raise ConfigError(f"batch_size = {self.batch_size} is outside its range [1, 100000]")
        if not (math.isfinite(self.restore_timeout_s) and self.restore_timeout_s > 0):
            raise ConfigError(f"restore_timeout_s = {self.restore_timeout_s} must be a number of seconds > 0 "
                              "(the longest wait for a partition's changelog or the availability topic)")
        if not 0.0 <= self.batch_timeout_s <= 60.0:
            raise ConfigError(f"batch_timeout_s = {self.batch_timeout_s} is outside its range [0, 60]")
        if not 0 <= self.partitions <= 10_000:
            raise ConfigError(f"partitions = {self.partitions} is outside its range [0, 10000]")
        if not 0 <= self.torch_threads <= 1024:
            raise ConfigError(f"torch_threads = {self.torch_threads} is outside its range [0, 1024] (0: torch's default)")
        if self.state_format not in FORMATS:
            raise ConfigError(f"state_format = {self.state_format} is not one of {', '.join(map(str, FORMATS))} "
                              "(1 while builds that read only format 1 still serve)")
        if not 0 <= self.gc_threshold <= 10_000_000:
            raise ConfigError(f"gc_threshold = {self.gc_threshold} is outside its range [0, 10000000] (0: sized to batch_size)")
        if not (math.isfinite(self.max_event_lead_s) and self.max_event_lead_s >= 0):
            raise ConfigError(f"max_event_lead_s = {self.max_event_lead_s} must be a number of seconds >= 0 "
                              "(0 turns the check off)")
        if self.prebuild_max_users < 0:
            raise ConfigError(f"prebuild_max_users = {self.prebuild_max_users} must be >= 0 (0 turns it off)")
        if not 0 <= self.metrics_port <= 65535:
            raise ConfigError(f"metrics_port = {self.metrics_port} is not a TCP port (0 turns the endpoint off)")
        message_max_bytes(self.producer_kafka)  # one librdkafka refuses is named here, as a setting

    def validate_kafka(self) -> None:
        """The settings that say where the worker group's topics are and how it reads them: all that
        `hrnn audit` takes from a worker's settings."""
        if not self.bootstrap_servers:
            raise ConfigError("no Kafka bootstrap servers given: pass --bootstrap-servers HOST:PORT")
        if self.processing_guarantee not in GUARANTEES:
            raise ConfigError(f"processing_guarantee = {self.processing_guarantee!r} is not one of "
                              f"{', '.join(GUARANTEES)}")
        self._validate_topic_roles()
        for table in ("kafka", "kafka_consumer", "kafka_producer"):
            for key in ("bootstrap.servers", "group.id", "transactional.id"):
                if key in getattr(self, table):
                    raise ConfigError(f"{table} setting {key!r} is set by the worker; use the matching worker setting")

    def _validate_topic_roles(self) -> None:
        """One topic, one role: recommendations written to the DLQ or the changelog would be taken for dead
        letters or states (a restore decodes the changelog), and model announcements sent to the input topic
        would be read as events. Each name is one Apache Kafka accepts."""
        given = [("input_topic", self.input_topic), ("output_topic", self.output_topic),
                 ("updates_topic", self.updates_topic), ("availability_topic", self.availability_topic)]
        derived = [("the dead-letter topic (input_topic + '.dlq')", self.dlq_topic),
                   ("the changelog topic (group + '.state-changelog')", self.changelog_topic)]
        if self.group in ("", ".", ".."):  # its changelog's name is legal, but the stores' folder is not its own
            raise ConfigError(f"group {self.group!r} cannot name the worker group: its state stores live in "
                              "<state_dir>/<group>")
        for role, topic in given + derived:  # a bad name: the setting given is named first
            topics.check_topic_name(role, topic)
        seen: dict[str, str] = {}
        for role, topic in derived + given:  # a clash: the setting given is named, not what it clashes with
            if topic in seen:
                raise ConfigError(f"{role} {topic!r} must differ from {seen[topic]}: each topic has one role")
            seen[topic] = role

    @property
    def consumer_kafka(self) -> dict[str, str]:
        return {**self.kafka, **self.kafka_consumer}

    @property
    def producer_kafka(self) -> dict[str, str]:
        return {**self.kafka, **self.kafka_producer}

    @property
    def message_max_bytes(self) -> int:
        """The worker producer's effective message.max.bytes: the largest record its produce() accepts."""
        return message_max_bytes(self.producer_kafka)

    @property
    def dlq_topic(self) -> str:
        return topics.dlq_topic(self.input_topic)

    @property
    def changelog_topic(self) -> str:
        return topics.changelog_topic(self.group)

    @property
    def exactly_once(self) -> bool:
        return self.processing_guarantee == "exactly_once"

    def effective_transactional_id(self) -> str:
        """Stable across restarts of the same worker (so a restart fences its predecessor's open
        transaction instead of waiting for it to time out) and unique per worker: one state
        directory belongs to one running worker (RocksDB locks it)."""
        if self.transactional_id:
            return self.transactional_id
        where = hashlib.sha1(str(Path(self.state_dir).resolve()).encode()).hexdigest()[:10]
        return f"{self.group}-{socket.gethostname()}-{where}"


def message_max_bytes(producer: Mapping[str, str]) -> int:
    """message.max.bytes of a producer's librdkafka settings; librdkafka's default where they leave it unset."""
    text = producer.get("message.max.bytes")
    if text is None:
        return DEFAULT_MESSAGE_MAX_BYTES
    low, high = MESSAGE_MAX_BYTES_RANGE
    value = int(text) if text.isascii() and text.isdigit() else 0
    if not low <= value <= high:
        raise ConfigError(f"kafka_producer setting 'message.max.bytes' = {text!r} is not a whole number of bytes in "
                          f"librdkafka's range [{low}, {high}]")
    return value


def _check_log_level(level: str) -> None:
    # Here, with the other settings, so the message names the setting wherever it came from; the logging setup
    # would name only the flag.
    from stream.observability import check_log_level

    check_log_level(level, f"log_level = {level!r}",
                    " (from --log-level, HRNN_LOG_LEVEL or the settings file's log_level)")


def _file_settings(path: str | Path, raw: dict[str, Any]) -> dict[str, Any]:
    """The worker's keys of a settings file: its `serve` table if it has one, else its top level. Beside a
    `serve` table only other commands' tables may sit: a setting there (a value, or a `kafka*` table) would be
    ignored without a word, and the worker would run under a guarantee, batch size or group nobody chose."""
    serve = raw.get("serve")
    if not isinstance(serve, Mapping):
        return raw
    stray = [k for k, v in raw.items() if k != "serve" and (not isinstance(v, Mapping) or k in _TABLE_SETTINGS)]
    if stray:
        raise ConfigError(f"config file {path}: {', '.join(map(repr, stray))} beside its 'serve' table would be "
                          "ignored (the worker reads only that table when there is one): move them into it")
    return dict(serve)


def load_settings(config_file: str | Path | None = None, overrides: Mapping[str, Any] | None = None,
                  *, env_prefix: str | None = ENV_PREFIX, serving: bool = True) -> WorkerSettings:
    """Defaults < file (top level or its [serve] table) < HRNN_* env < overrides (None: not given); the Kafka
    tables key by key (`_kafka_tables`).
    serving=False (`hrnn audit`): only `validate_kafka`'s settings are checked, no registry or state needed."""
    file_values: dict[str, Any] = {}
    if config_file:
        file_values = _file_settings(config_file, read_config_file(config_file))
    rest = {k: v for k, v in (overrides or {}).items() if k not in _TABLE_SETTINGS}
    settings = load_config(WorkerSettings, file_values=file_values, env_prefix=env_prefix, overrides=rest,
                           strict_file=True, validate=False)
    env_values = {t: os.environ.get(env_prefix + t.upper()) for t in _TABLE_SETTINGS} if env_prefix else {}
    for table, values in _kafka_tables([file_values, env_values, overrides or {}]).items():
        setattr(settings, table, values)
    if serving:
        settings.validate()
    else:
        settings.validate_kafka()
    return settings


def _kafka_tables(layers: list[Mapping[str, Any]]) -> dict[str, dict[str, str]]:
    """The Kafka tables from layers in rising priority, merged key by key. A layer that replaced a lower one's
    whole table dropped its security.protocol and sasl.* without a word (HRNN_KAFKA=client.id=x, and the worker
    connected without TLS); and a layer's setting for every client must reach the consumers and producers even
    when a lower layer's table for one kind names the same key (--kafka-config session.timeout.ms=10000 over the
    file's kafka_consumer)."""
    tables: dict[str, dict[str, str]] = {t: {} for t in _TABLE_SETTINGS}
    for layer in layers:
        given = {t: _parse_kafka(layer.get(t), t) for t in _TABLE_SETTINGS}
        for table in ("kafka_consumer", "kafka_producer"):
            tables[table] = {k: v for k, v in tables[table].items() if k not in given["kafka"]}
        for table in _TABLE_SETTINGS:
            tables[table].update(given[table])
    return tables


def warn_unknown_env(prefix: str = ENV_PREFIX) -> None:
    """Say which <prefix>* variables no command reads: a misspelt one (HRNN_PROCESSING_GUARANTE) would leave its
    setting at the default without a word, where a misspelt file key is refused. Only a warning, and only for
    names no settings object has: one environment serves the worker, training and the client commands. `hrnn`
    warns as any command starts."""
    known = {prefix + name.upper() for cls in (WorkerSettings, HRNNConfig, DataConfig) for name in field_names(cls)}
    known |= {prefix + name for name in _READ_DIRECTLY}
    for var in sorted(os.environ):
        if var.startswith(prefix) and var not in known and not var.startswith(prefix + _TEST_VARIABLES):
            close = difflib.get_close_matches(var, known, n=1)
            log.warning("ignoring environment variable %s: no hrnn setting has that name%s", var,
                        f" (did you mean {close[0]}?)" if close else "")
