"""Kafka client settings and small read helpers shared by the worker, the CLIs, tests and benchmarks.

Every client is built from our defaults plus a pass-through dict of librdkafka settings, so a
managed Kafka (SASL/SSL) needs no code change: give `security.protocol`, `sasl.*`, `ssl.*` in
`extra` (or a properties file, see `load_client_settings`).
"""
from __future__ import annotations

import codecs
import logging
import threading
import time
import uuid
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from confluent_kafka import OFFSET_BEGINNING, Consumer, KafkaError, KafkaException, Message, Producer, TopicPartition
from confluent_kafka.admin import AdminClient

from model.config import is_utf8
from model.errors import ConfigError, HRNNError

ClientSettings = Mapping[str, Any]

log = logging.getLogger(__name__)
# librdkafka's own log lines: handed on by poll(), flush() and consume(), in the caller's thread.
librdkafka_log = logging.getLogger(f"{__name__}.librdkafka")

# Manual commits only: the worker commits offsets after outputs and changelog are flushed
# (DESIGN.md commit order), so neither auto-commit nor auto offset store may run behind its back.
CONSUMER_DEFAULTS: dict[str, Any] = {
    "partition.assignment.strategy": "cooperative-sticky",
    "enable.auto.commit": False,
    "enable.auto.offset.store": False,
    "auto.offset.reset": "earliest",
}

# A short linger batches the per-event recommendations of one worker batch into few requests
# without adding visible latency; idempotence keeps retries from duplicating records. murmur2 is
# the Java client's partitioner: events keyed by user_id land on the same partition whichever
# client (ours, Kafka Connect, a Java shop backend) produced them.
PRODUCER_DEFAULTS: dict[str, Any] = {
    "acks": "all",
    "linger.ms": 5,
    "enable.idempotence": True,
    "partitioner": "murmur2_random",
}


class KafkaClientError(HRNNError):
    """A Kafka client could not be created or a read did not finish."""


# Connection failures are said at most this often per set of servers: librdkafka logs each refused connect and
# each dropped connection (facility FAIL), several a second per client, as long as a broker is down.
CONNECTION_FAILURES_EVERY_S = 30.0
_failing_since: dict[str, float] = {}  # servers -> when a failure to reach them was last said (or first seen)
_failing_lock = threading.Lock()


def connection_failure_due(servers: str, every_s: float) -> bool:
    """Whether a connection failure to `servers` is to be said now: once they have gone on for `every_s`, then
    once per `every_s`. Not at the first: a command that cannot reach the broker says so itself, once."""
    now = time.monotonic()
    with _failing_lock:
        last = _failing_since.setdefault(servers, now)
        if now - last < every_s:
            return False
        _failing_since[servers] = now
        return True


class _LibrdkafkaLog:
    """The `logger` of the clients built here, in place of librdkafka's own lines on stderr: its lines go to
    `librdkafka_log`, its connection failures to `log`, as one WARNING naming the servers at most every
    CONNECTION_FAILURES_EVERY_S. A `logger` among the client settings replaces it."""

    def __init__(self, servers: str) -> None:
        self.servers = servers

    def log(self, level: int, msg: str, *args: Any) -> None:
        """confluent-kafka calls this as it would a logging.Logger's: log(level, "%s [%s] %s", facility, client
        name, text)."""
        if args and args[0] == "FAIL":
            every_s = CONNECTION_FAILURES_EVERY_S
            if connection_failure_due(self.servers, every_s):
                log.warning("cannot reach Kafka at %s (is the broker reachable? check --bootstrap-servers); "
                            "retrying, said again every %g s while it fails: %s", self.servers, every_s, args[-1])
            return
        librdkafka_log.log(level, msg, *args)


# Our clients remember their servers, so a failed request can name them (librdkafka's clients do not say).
class _Consumer(Consumer):
    bootstrap_servers: str


class _Producer(Producer):
    bootstrap_servers: str


class _AdminClient(AdminClient):
    bootstrap_servers: str


def _built(cls: type, cfg: dict[str, Any]) -> Any:
    """A `cls` client of `cfg`, logging through _LibrdkafkaLog unless `cfg` names a logger. Polled once at
    once: librdkafka's warnings on the settings (CONFWARN) wait for a poll, which a client used only for
    metadata never makes."""
    client = cls({**cfg, "logger": cfg.get("logger") or _LibrdkafkaLog(cfg["bootstrap.servers"])})
    client.bootstrap_servers = cfg["bootstrap.servers"]
    client.poll(0)  # nothing is assigned or produced yet: this serves the log lines alone
    return client


def servers_of(client: object) -> str | None:
    """The bootstrap servers a client built here was made for (None for one made elsewhere)."""
    return getattr(client, "bootstrap_servers", None)


def unreachable_hint(servers: str | None, question: str = "is the broker reachable?") -> str:
    """What a failed request adds to its sentence: the servers it asked and the setting that names them."""
    at = f" on {servers}" if servers else ""
    return f"{at} ({question} check --bootstrap-servers)"


def serve_log_lines(client: object) -> None:
    """An admin client's log lines wait for a poll, which nothing else makes: serve them (rate-limited, see
    _LibrdkafkaLog) where it is used, rather than let them pile up while a broker is down."""
    if isinstance(client, AdminClient):
        client.poll(0)


class ClientSettingError(KafkaClientError, ConfigError):
    """A Kafka client refused a pass-through setting: the user's to fix."""


def _refused(kind: str, bootstrap: str, exc: Exception, extra: ClientSettings | None) -> ClientSettingError:
    """librdkafka names the property it refused, sometimes by an alias (linger.ms as queue.buffering.max.ms),
    so the names given stand beside it (not their values: they may be secrets)."""
    names = ", ".join(sorted(extra or {})) or "none"
    return ClientSettingError(f"cannot create a Kafka {kind} for {bootstrap}: {exc} (settings given: {names}; fix "
                              "them where they come from: --kafka-config, a settings file's kafka tables or "
                              "HRNN_KAFKA*)")


class WaitTimeout(KafkaClientError, TimeoutError):
    """Fewer records than expected arrived before the deadline; `records` holds what did arrive."""

    def __init__(self, topic: str, expected: int | None, records: list["Record"], timeout_s: float) -> None:
        self.topic, self.expected, self.records = topic, expected, records
        if expected is None:
            msg = f"topic {topic!r} was still delivering after {timeout_s:g} s ({len(records)} records read)"
        else:
            msg = f"topic {topic!r}: {len(records)} of {expected} records arrived within {timeout_s:g} s"
        super().__init__(msg)


@dataclass(frozen=True, slots=True)
class Record:
    """A consumed message, detached from librdkafka so it can be kept, compared and pickled."""

    topic: str
    partition: int
    offset: int
    key: bytes | None
    value: bytes | None
    timestamp_ms: int | None
    headers: tuple[tuple[str, bytes | None], ...] = ()

    @classmethod
    def from_message(cls, msg: Message) -> "Record":
        ts_type, ts = msg.timestamp()
        return cls(topic=msg.topic(), partition=msg.partition(), offset=msg.offset(), key=msg.key(),
                   value=msg.value(), timestamp_ms=None if ts_type == 0 else ts,
                   headers=tuple(msg.headers() or ()))


def _merge(base: dict[str, Any], extra: ClientSettings | None) -> dict[str, Any]:
    out = dict(base)
    for key, value in (extra or {}).items():
        if not isinstance(key, str) or not key:
            raise ConfigError(f"Kafka client setting names must be non-empty strings, got {key!r}")
        out[key] = value
    return out


def _utf8_checked(cfg: dict[str, Any]) -> dict[str, Any]:
    """`cfg`, once every name and text value encodes as UTF-8. A flag or variable in bytes that are not UTF-8
    reaches Python as lone surrogates, which confluent-kafka cannot encode: it then fails inside the client's
    constructor with a SystemError, not an error naming the setting. The value is not shown: it may be a secret."""
    for key, value in cfg.items():
        for text in (key, value):
            if isinstance(text, str) and not is_utf8(text):
                name = key.encode("utf-8", "surrogateescape").decode("utf-8", "backslashreplace")
                where = ("in --bootstrap-servers (or HRNN_BOOTSTRAP_SERVERS)" if key == "bootstrap.servers" else
                         "where it comes from: --kafka-config, a settings file's kafka tables or HRNN_KAFKA*")
                raise ClientSettingError(f"Kafka client setting '{name}' is not UTF-8 text: fix it {where}")
    return cfg


def consumer_config(bootstrap: str, group: str, extra: ClientSettings | None = None) -> dict[str, Any]:
    """Settings for the worker's group consumer; `extra` overrides defaults, never bootstrap/group."""
    cfg = _merge(CONSUMER_DEFAULTS, extra)
    cfg.update({"bootstrap.servers": bootstrap, "group.id": group})
    return _utf8_checked(cfg)


def producer_config(bootstrap: str, extra: ClientSettings | None = None, *,
                    transactional_id: str | None = None) -> dict[str, Any]:
    """Settings for producers of outputs, changelog and replayed events."""
    cfg = _merge(PRODUCER_DEFAULTS, extra)
    cfg["bootstrap.servers"] = bootstrap
    if transactional_id:
        cfg["transactional.id"] = transactional_id
    return _utf8_checked(cfg)


# librdkafka's consumer-only properties (its CONFIGURATION.md, C/P column "C"). librdkafka builds an admin
# client as a producer and warns about each of them (CONFWARN), so readers pass their consumer settings to
# an admin client as they are and it leaves these out. A property missing here still works: it only warns.
CONSUMER_ONLY = frozenset({
    "group.id", "group.instance.id", "partition.assignment.strategy", "session.timeout.ms",
    "heartbeat.interval.ms", "group.protocol.type", "group.protocol", "group.remote.assignor",
    "coordinator.query.interval.ms", "max.poll.interval.ms", "enable.auto.commit", "auto.commit.interval.ms",
    "enable.auto.offset.store", "queued.min.messages", "queued.max.messages.kbytes", "fetch.wait.max.ms",
    "fetch.queue.backoff.ms", "fetch.message.max.bytes", "max.partition.fetch.bytes", "fetch.max.bytes",
    "fetch.min.bytes", "fetch.error.backoff.ms", "offset.store.method", "isolation.level", "enable.partition.eof",
    "check.crcs", "auto.offset.reset", "auto.commit.enable", "consume.callback.max.messages",
})


def admin_config(bootstrap: str, extra: ClientSettings | None = None) -> dict[str, Any]:
    """Settings for an admin client: `extra` without the consumer-only properties."""
    cfg = {k: v for k, v in _merge({}, extra).items() if k not in CONSUMER_ONLY}
    cfg["bootstrap.servers"] = bootstrap
    return _utf8_checked(cfg)


def admin_client(bootstrap: str, extra: ClientSettings | None = None) -> AdminClient:
    try:
        return _built(_AdminClient, admin_config(bootstrap, extra))
    except (KafkaException, ValueError, TypeError) as exc:
        raise _refused("admin client", bootstrap, exc, extra) from None


def create_producer(bootstrap: str, extra: ClientSettings | None = None, *,
                    transactional_id: str | None = None) -> Producer:
    """A Producer with our defaults; a bad pass-through setting becomes a ClientSettingError naming it."""
    try:
        return _built(_Producer, producer_config(bootstrap, extra, transactional_id=transactional_id))
    except (KafkaException, ValueError, TypeError) as exc:
        raise _refused("producer", bootstrap, exc, extra) from None


def create_consumer(bootstrap: str, group: str, extra: ClientSettings | None = None) -> Consumer:
    """A group Consumer with our defaults; a bad pass-through setting becomes a ClientSettingError naming it."""
    try:
        return _built(_Consumer, consumer_config(bootstrap, group, extra))
    except (KafkaException, ValueError, TypeError) as exc:
        raise _refused("consumer", bootstrap, exc, extra) from None


def check_client_settings(bootstrap: str, extra: ClientSettings | None = None) -> None:
    """librdkafka checks its settings only as a client is built: build one and close it (it may connect, but
    produces nothing), so a command can refuse bad settings (ClientSettingError) before it changes anything.
    Closed, not dropped: a dropped client lives until the collector takes it, retrying the servers meanwhile."""
    create_producer(bootstrap, extra).close()


def parse_client_settings(items: Iterable[str]) -> dict[str, str]:
    """`KEY=VALUE` strings (repeatable `--kafka-config` flags) -> a settings dict."""
    out: dict[str, str] = {}
    for item in items:
        key, sep, value = item.partition("=")
        if not sep or not key.strip():
            raise ConfigError(f"Kafka client setting {item!r} must look like KEY=VALUE, e.g. security.protocol=SASL_SSL")
        if key.strip() == "bootstrap.servers":
            # Every client is built with the command's --bootstrap-servers, whose default (the local broker) would
            # replace this one without a word: the command would dial 127.0.0.1:9092, not the cluster named here.
            raise ConfigError("Kafka client setting 'bootstrap.servers' is not taken from the client settings: name "
                              "the cluster with --bootstrap-servers (or HRNN_BOOTSTRAP_SERVERS) instead")
        out[key.strip()] = value.strip()
    return out


def load_client_settings(path: str | Path) -> dict[str, str]:
    """A Java-style client.properties file (`key=value` lines, `#` comments), as managed Kafka consoles hand out."""
    p = Path(path)
    try:
        raw = p.read_bytes()
    except OSError as exc:
        raise ConfigError(f"cannot read Kafka client properties {p}: {exc.strerror or exc}") from None
    lines = [ln.strip() for ln in _properties_text(p, raw).splitlines()]
    try:
        return parse_client_settings(ln for ln in lines if ln and not ln.startswith(("#", "!")))
    except ConfigError as exc:
        raise ConfigError(f"{p}: {exc}") from None


def _properties_text(path: Path, raw: bytes) -> str:
    # Java writes .properties files in ISO-8859-1 and Windows editors put a BOM first: read either as one
    # encoding would silently change a password (or, the BOM, the first key's name). The byte itself is not
    # shown: it may be part of a secret.
    body = raw.removeprefix(codecs.BOM_UTF8)
    try:
        return body.decode("utf-8")
    except UnicodeDecodeError as exc:
        offset, line = exc.start + len(raw) - len(body), body.count(b"\n", 0, exc.start) + 1
        raise ConfigError(f"Kafka client properties {path} is not UTF-8 text: the byte at offset {offset} (line "
                          f"{line}) cannot be decoded; save the file as UTF-8 (e.g. iconv -f ISO-8859-1 -t UTF-8)"
                          ) from None


def murmur2(data: bytes) -> int:
    """Kafka's murmur2 hash (seed 0x9747b28c) as a signed 32-bit int, as the Java client computes it."""
    m, mask = 0x5BD1E995, 0xFFFFFFFF
    length = len(data)
    h = (0x9747B28C ^ length) & mask
    end = length - length % 4
    for i in range(0, end, 4):
        k = int.from_bytes(data[i:i + 4], "little")
        k = (k * m) & mask
        k ^= k >> 24
        k = (k * m) & mask
        h = ((h * m) & mask) ^ k
    tail = data[end:]
    if tail:
        for i in reversed(range(len(tail))):
            h ^= tail[i] << (8 * i)
        h = (h * m) & mask
    h ^= h >> 13
    h = (h * m) & mask
    h ^= h >> 15
    return h - (1 << 32) if h & 0x80000000 else h


def partition_for(key: bytes, partitions: int) -> int:
    """The partition the default producer (murmur2) puts a keyed record on."""
    return (murmur2(key) & 0x7FFFFFFF) % partitions


def reader_consumer(bootstrap: str, extra: ClientSettings | None = None) -> Consumer:
    """A consumer for assign()-only reading: it never joins a group or commits offsets."""
    # librdkafka insists on a group.id even for assign(); a unique one never joins or commits.
    cfg = _merge({"enable.auto.commit": False, "enable.auto.offset.store": False}, extra)
    cfg.update({"bootstrap.servers": bootstrap, "group.id": f"hrnn-reader-{uuid.uuid4().hex[:12]}"})
    try:
        return _built(_Consumer, _utf8_checked(cfg))
    except (KafkaException, ValueError, TypeError) as exc:
        raise _refused("consumer", bootstrap, exc, extra) from None


def produce_waiting(producer: Producer, topic: str, value: bytes | None, key: bytes | str | None = None,
                    **kwargs: Any) -> None:
    """`producer.produce`, and while librdkafka's local queue is full (100k records by default), let it
    send and try again rather than fail: the caller has more records than the queue holds."""
    while True:
        try:
            producer.produce(topic, value, key, **kwargs)
            return
        except BufferError:
            producer.poll(0.05)


def produce_acknowledged(producer: Producer, topic: str, records: Iterable[tuple[bytes, bytes | None]], *,
                         partition: int = 0, timeout_s: float = 30.0) -> str | None:
    """Produce (key, value) records to one partition and wait for the broker's acknowledgements;
    None when all were acknowledged, else the first error (or the timeout) as a sentence."""
    errors: list[KafkaError] = []

    def delivered(err: KafkaError | None, _msg: Message) -> None:
        if err is not None:
            errors.append(err)

    for key, value in records:
        try:
            produce_waiting(producer, topic, value, key, partition=partition, on_delivery=delivered)
        except KafkaException as exc:  # refused before sending (e.g. larger than message.max.bytes)
            producer.flush(timeout_s)
            return f"record {key[:40]!r} refused: {error_detail(exc)}"
    left = producer.flush(timeout_s)
    if errors:
        return errors[0].str()
    return f"{left} record(s) not acknowledged within {timeout_s:g} s" if left else None


def kafka_error(exc: KafkaException) -> KafkaError | None:
    """The KafkaError a KafkaException carries (its code, retriable, fatal...); None where it carries none."""
    err = exc.args[0] if exc.args else None
    return err if isinstance(err, KafkaError) else None


def error_detail(exc: KafkaException) -> str:
    """The error's name and the broker's or client's sentence inside a KafkaException."""
    err = kafka_error(exc)
    return f"{err.name()}: {err.str()}" if err is not None else str(exc)


def topic_partitions(client: Consumer | AdminClient, topic: str, timeout_s: float = 5.0) -> list[int]:
    """Partition ids of `topic`, or [] while it does not exist."""
    serve_log_lines(client)
    try:
        md = client.list_topics(topic, timeout=max(0.1, timeout_s))
    except KafkaException as exc:
        raise KafkaClientError(f"cannot read metadata of topic {topic!r}{unreachable_hint(servers_of(client))}: "
                               f"{error_detail(exc)}") from None
    meta = md.topics.get(topic)
    if meta is None or meta.error is not None:
        return []
    return sorted(meta.partitions)


_U64 = (1 << 64) - 1


def topic_id(admin: AdminClient, topic: str, timeout_s: float = 5.0) -> str | None:
    """The topic's id (32 hex digits), or None where the broker gives none.

    Kafka (2.8+) gives every topic a random id at creation: a topic deleted and created again
    under the same name, or the same name on another cluster, has another id, where offsets
    alone cannot tell the two logs apart."""
    from confluent_kafka import TopicCollection

    serve_log_lines(admin)
    try:
        desc = admin.describe_topics(TopicCollection([topic]), request_timeout=max(0.1, timeout_s))[topic].result()
    except KafkaException as exc:
        hint = unreachable_hint(servers_of(admin), "does it exist, is the broker reachable?")
        raise KafkaClientError(f"cannot describe topic {topic!r}{hint}: {error_detail(exc)}") from None
    uid = desc.topic_id
    if uid is None:
        return None
    bits = ((uid.get_most_significant_bits() & _U64) << 64) | (uid.get_least_significant_bits() & _U64)
    return f"{bits:032x}" if bits else None


def wait_for_partitions(client: Consumer | AdminClient, topic: str, deadline: float | None, *,
                        unreachable: Callable[[KafkaClientError], None] = lambda _: None) -> list[int]:
    """Partition ids of `topic` once it exists; [] if it still does not at `deadline` (monotonic
    time; None: wait forever). An unreachable broker is retried until the deadline, then raised;
    `unreachable` hears of the first failure retried, so a caller waiting for ever can say why."""
    failed = False
    while True:
        left = 5.0 if deadline is None else min(5.0, deadline - time.monotonic())
        try:
            partitions = topic_partitions(client, topic, timeout_s=left)
        except KafkaClientError as exc:
            if deadline is not None and time.monotonic() >= deadline:
                raise
            if not failed:
                failed = True
                unreachable(exc)
            partitions = []
        if partitions or (deadline is not None and time.monotonic() >= deadline):
            return partitions
        time.sleep(0.1)  # polling the metadata: the topic is created by another process


def _consume(bootstrap: str, topic: str, visit: Callable[[Record], None], *, stop_after: int | None,
             idle_s: float, timeout_s: float, extra: ClientSettings | None,
             until: Mapping[int, int] | None = None, start: Mapping[int, int] | None = None) -> bool:
    """Hand every record of `topic`, from the beginning of every partition (or its offset in `start`), to
    `visit`. Returns whether it finished: the topic went idle for `idle_s` (or `stop_after` records were
    read, or every partition of `until` reached its offset: then only those partitions are read) before
    the deadline."""
    starts = start or {}
    if until is not None and not any(end > starts.get(p, 0) for p, end in until.items()):
        return True  # nothing to read: no need to wait for the topic
    began = time.monotonic()
    deadline = began + timeout_s
    # read_all means "what is there now": a topic still missing after idle_s counts as empty.
    topic_deadline = deadline if stop_after is not None else min(deadline, began + idle_s)
    consumer = reader_consumer(bootstrap, extra)
    try:
        partitions = wait_for_partitions(consumer, topic, topic_deadline)
        if until is not None:
            partitions = [p for p in partitions if until.get(p, 0) > starts.get(p, 0)]
        if not partitions:
            return stop_after is None
        consumer.assign([TopicPartition(topic, p, starts.get(p, OFFSET_BEGINNING)) for p in partitions])
        short = {p: until[p] for p in partitions} if until is not None else {}  # partitions not at their offset
        n = 0

        def take(batch: list[Message]) -> None:
            nonlocal n
            for msg in batch:
                err = msg.error()
                if err is None:
                    visit(Record.from_message(msg))
                    n += 1
                    if msg.partition() in short and short[msg.partition()] <= msg.offset() + 1:
                        del short[msg.partition()]
                else:
                    raise_if_fatal(topic, err)

        last_data = time.monotonic()
        # The high watermark cannot tell us we are caught up on Tansu (it is the base offset of the
        # last batch + 1), so "done" means fetches kept coming back empty for idle_s, or, with `until`,
        # every partition reached its offset and what was fetched with it (the rest of its batch) is taken.
        while True:
            now = time.monotonic()
            if stop_after is not None and n >= stop_after:
                return True
            if until is not None and not short:
                while batch := consumer.consume(num_messages=1000, timeout=0):
                    take(batch)
                return True
            if stop_after is None and now - last_data >= idle_s:
                return True
            if now >= deadline:
                return False
            batch = consumer.consume(num_messages=1000, timeout=min(0.2, max(0.01, deadline - now)))
            take(batch)
            if batch:
                last_data = time.monotonic()
    finally:
        consumer.close()


def read_all(bootstrap: str, topic: str, *, idle_s: float = 1.0, timeout_s: float = 60.0,
             extra: ClientSettings | None = None) -> list[Record]:
    """Every record of `topic` from the beginning, without a consumer group, in per-partition
    offset order. Stops once no record arrived for `idle_s`; raises WaitTimeout if the topic
    was still delivering at `timeout_s`."""
    records: list[Record] = []
    if not scan(bootstrap, topic, records.append, idle_s=idle_s, timeout_s=timeout_s, extra=extra):
        raise WaitTimeout(topic, None, records, timeout_s)
    return records


def scan(bootstrap: str, topic: str, visit: Callable[[Record], None], *, until: Mapping[int, int] | None = None,
         start: Mapping[int, int] | None = None, idle_s: float = 1.0, timeout_s: float = 60.0,
         extra: ClientSettings | None = None) -> bool:
    """read_all for a topic too long to hold: each record goes to `visit`, none is kept. With `until`
    (partition -> offset), only those partitions, each up to that offset: a topic still written to
    ends there, not when it goes idle (which also ends the scan); with `start`, from those offsets.
    Returns False if it was still delivering at `timeout_s`."""
    return _consume(bootstrap, topic, visit, stop_after=None, idle_s=idle_s, timeout_s=timeout_s, extra=extra,
                    until=until, start=start)


def window_offsets(bootstrap: str, topic: str, since_ms: int | None, bounds: Mapping[int, tuple[int, int]],
                   extra: ClientSettings | None = None, wait_s: float = 5.0) -> dict[int, tuple[int, int]]:
    """Per partition of `bounds` (partition -> (first, end) offsets, as `watermarks` gives them): the first
    offset whose record's timestamp is at least `since_ms` (the end where none is; None: the first), and the
    end, read again from the records (the local broker reports the last batch's base offset + 1, short of
    the batch).

    Found by bisection over the records themselves, so it needs only fetches: a broker's lookup by time
    (ListOffsets) is missing on some (the local broker answers offset 0 for every time). Exact where a
    partition's timestamps do not decrease, as a broker's time index is; a record with an earlier timestamp
    among later ones only moves the answer past it."""
    # Each probe re-assigns, which waits out the fetch in flight: keep fetches short (500 ms each otherwise).
    consumer = reader_consumer(bootstrap, {**(extra or {}), "enable.partition.eof": "true", "fetch.wait.max.ms": "10"})
    out = {}
    try:
        for p, (lo, hi) in bounds.items():
            end = _end_from(consumer, topic, p, lo, hi, wait_s)
            out[p] = (lo if since_ms is None else _bisect_time(consumer, topic, p, lo, end, since_ms, wait_s), end)
        return out
    finally:
        consumer.close()


def _end_from(consumer: Consumer, topic: str, partition: int, lo: int, hi: int, wait_s: float) -> int:
    """The partition's end: `hi`, or past it the end of the records read from offset hi - 1 on."""
    end = hi
    msg = _first_record_from(consumer, topic, partition, hi - 1, wait_s) if hi > lo else None
    while msg is not None:
        end = max(end, msg.offset() + 1)
        msg = _next_record(consumer, topic, wait_s)
    return end


def _bisect_time(consumer: Consumer, topic: str, partition: int, lo: int, hi: int, since_ms: int,
                 wait_s: float) -> int:
    while lo < hi:
        mid = (lo + hi) // 2
        msg = _first_record_from(consumer, topic, partition, mid, wait_s)
        if msg is None or msg.offset() >= hi or msg.timestamp()[1] >= since_ms:
            hi = mid  # offsets mid..msg's hold no record: starting at mid is starting at msg
        else:
            lo = msg.offset() + 1
    return lo


def _first_record_from(consumer: Consumer, topic: str, partition: int, offset: int, wait_s: float) -> Message | None:
    """The first record at or after `offset`; None at the partition's end."""
    consumer.assign([TopicPartition(topic, partition, offset)])
    return _next_record(consumer, topic, wait_s)


def _next_record(consumer: Consumer, topic: str, wait_s: float) -> Message | None:
    """The assigned partition's next record; None at its end (or none within `wait_s`: the last offsets
    of a partition can hold transaction markers, no record)."""
    deadline = time.monotonic() + wait_s
    while time.monotonic() < deadline:
        msg = consumer.poll(0.1)
        if msg is None:
            continue
        err = msg.error()
        if err is None:
            return msg
        if err.code() == KafkaError._PARTITION_EOF:
            return None
        raise_if_fatal(topic, err)
    return None


def raise_if_fatal(topic: str, err: KafkaError) -> None:
    """Partition ends and transient errors are librdkafka's to report and retry; a fatal one ends the read."""
    if err.code() != KafkaError._PARTITION_EOF and err.fatal():
        raise KafkaClientError(f"reading {topic!r} failed: {err.str()}")


def watermarks(bootstrap: str, topic: str, extra: ClientSettings | None = None,
               timeout_s: float = 10.0) -> dict[int, tuple[int, int]]:
    """Each partition's (first offset, end offset); the end is the high watermark (for read_committed,
    the end of the committed transactions). {} while the topic does not exist."""
    consumer = reader_consumer(bootstrap, extra)
    try:
        return {p: consumer.get_watermark_offsets(TopicPartition(topic, p), timeout=timeout_s)
                for p in topic_partitions(consumer, topic, timeout_s)}
    except KafkaException as exc:
        raise KafkaClientError(f"cannot read the offsets of {topic!r}: {error_detail(exc)}") from None
    finally:
        consumer.close()


def wait_for_count(bootstrap: str, topic: str, n: int, timeout_s: float = 60.0, *,
                   extra: ClientSettings | None = None) -> list[Record]:
    """Read `topic` from the beginning until at least `n` records arrived (returns all read so
    far, possibly more than n); raises WaitTimeout with the partial list at the deadline."""
    records: list[Record] = []
    if not _consume(bootstrap, topic, records.append, stop_after=n, idle_s=0.0, timeout_s=timeout_s,
                    extra=extra):
        raise WaitTimeout(topic, n, records, timeout_s)
    return records
