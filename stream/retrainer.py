"""The retraining service (control plane), a Faust app.

- An agent archives the events topic in batches (`stream.take_events`) into the training
  store (stream/archive.py). Faust acks a batch only after the agent has written it, so offsets
  are committed after the files exist; the archive's offset-named files absorb replays. A write
  that fails (disk full, permissions) is retried, with a capped backoff, until it succeeds or the
  service stops: the batch is never acked unwritten, and /health says 503 meanwhile. The
  files also name the topic id, read on every assignment and whenever a batch holds offsets
  archived before: a recreated events topic is archived again from its start. No batch is written
  before this process has read the id once (until then the batch waits, as a failed write does).
  Re-keyed copies the worker writes back onto the events topic (header hrnn-repartitioned-from)
  are not archived: their mis-keyed originals are, by their own offsets.
- A timer or crontab (`--cron`) with `on_leader=True` starts a retraining run on the group's leader
  only: Faust elects as leader the member that is assigned partition 0 of its
  `<app id>-__assignor-__leader` topic, so with N instances exactly one runs the schedule.
  `--interval-s` counts from the start of the last scheduled run, which the registry records
  (`.last-run`), so failover and restarts keep it; the leader looks every min(interval, 60) s,
  and runs at its first look when no run is recorded.
- A run is a child process (`python -m stream.retrain_job`), so the event loop keeps
  heartbeating and archiving while torch trains; a published version is announced on
  hrnn.model-updates with reason "retrain" (with --canary-share: "canary", for that share of the users),
  under the registry's pointer lock as `hrnn models promote` announces, and not when a promote or
  rollback has moved CURRENT since the run published it (the operator's choice stands).
  On Linux the child dies with the service, however the service dies (SIGKILL, OOM kill).

Kafka client settings (`--kafka-config`, as the workers take them) reach the librdkafka clients (the topic
id, the announcements) as given and the Faust app as stream/faust_credentials.py maps them.

Against Tansu a consumer-group join takes about session.timeout.ms / 2; Faust's default
session timeout (60 s) made the first assignment take ~33 s, so the service sets 10 s by default.
"""
from __future__ import annotations

import asyncio
import functools
import json
import logging
import math
import os
import secrets
import shutil
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from confluent_kafka.admin import AdminClient
from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from model.artifact import current_version, version_settings
from model.config import DataConfig, HRNNConfig, load_config
from model.errors import ConfigError, EventError, HRNNError
from model.events import decode_event
from stream.archive import ArchivedEvent, ArchiveWriter, Window, scan_window
from stream.cli_common import directory_flag, positive
from stream.faust_credentials import faust_credentials, librdkafka_only
from stream.kafka_clients import KafkaClientError, admin_client, topic_id
from stream.observability import Health, MetricsServer
from stream.records import repartitioned_from
from stream.retrain_job import GATE_METRICS, RetrainOutcome, RetrainSpec
from stream.topics import (DEFAULT_PARTITIONS, EVENTS_TOPIC, MODEL_UPDATES_TOPIC, TopicError, check_topic_name,
                          ensure_input_topic, partition_counts)

log = logging.getLogger(__name__)

LAST_RUN_NAME = ".last-run"  # in the registry: when the schedule last started a run there, for every instance
SCHEDULE_TICK_S = 60.0  # how often the leader looks whether a run is due (--interval-s when that is shorter)


@dataclass
class RetrainerSettings:
    bootstrap_servers: str
    registry: str
    archive: str
    events_topic: str = EVENTS_TOPIC
    updates_topic: str = MODEL_UPDATES_TOPIC
    app_id: str = "hrnn-retrainer"  # also the consumer group of the archive
    interval_s: float | None = 3600.0
    cron: str | None = None  # crontab expression; wins over interval_s
    window_days: int = 7
    margin: float = 0.05
    metric: str = "mrr@20"
    warm_start: bool = False
    min_events: int = 1000
    keep_versions: int = 0
    canary_share: float = 0.0  # above 0: a published version serves this share of the users until promoted
    device: str = "cpu"
    hrnn: dict[str, Any] = field(default_factory=dict)
    data: dict[str, Any] = field(default_factory=dict)
    archive_batch: int = 1000
    archive_within_s: float = 2.0
    session_timeout_s: float = 10.0
    job_timeout_s: float = 6 * 3600.0
    registry_id: str | None = None
    metrics_port: int = 0
    archive_retry_first_s: float = 0.5  # backoff of a failed archive write: doubles up to archive_retry_max_s
    archive_retry_max_s: float = 30.0
    kafka: dict[str, str] = field(default_factory=dict)  # librdkafka client settings, mapped for Faust too

    def validate(self) -> None:
        """The service's settings: those of a run (validate_run), the broker's and the schedule's."""
        if not self.bootstrap_servers:
            raise ConfigError("the retrainer needs --bootstrap-servers")
        self.validate_run()
        check_topic_name("--events-topic", self.events_topic)
        check_topic_name("--app-id (Faust names its own topics after it)", self.app_id)
        # Not finite: NaN is never due (every comparison is False), so the schedule would never run.
        if self.cron is None and (self.interval_s is None or not positive(self.interval_s)):
            raise ConfigError(f"give --interval-s N (a finite number > 0, got {self.interval_s}) or --cron EXPR")
        if self.cron is not None:
            from croniter import croniter

            if not croniter.is_valid(self.cron):
                raise ConfigError(f"--cron {self.cron!r} is not a crontab expression (e.g. '0 3 * * *')")
        if not (math.isfinite(self.session_timeout_s) and self.session_timeout_s >= 3):  # NaN too
            raise ConfigError(f"--group-session-timeout-s must be a finite number of at least 3 (seconds), "
                              f"got {self.session_timeout_s}")
        if not 0 <= self.metrics_port <= 65535:
            raise ConfigError(f"--metrics-port {self.metrics_port} is not a TCP port (0..65535; 0: no endpoint)")

    def validate_run(self) -> None:
        """The settings one retraining run uses (all that `--once` needs: no broker, schedule or group)."""
        if not self.registry or not self.archive:
            raise ConfigError("the retrainer needs --registry DIR and --archive DIR")
        directory_flag("--registry", self.registry)
        directory_flag("--archive", self.archive)
        check_topic_name("--updates-topic", self.updates_topic)
        if self.window_days < 1:
            raise ConfigError(f"--window-days must be at least 1, got {self.window_days}")
        if not -1.0 <= self.margin <= 1.0:
            raise ConfigError(f"--margin must be in [-1, 1] (a share of the serving metric), got {self.margin}")
        if not 0.0 <= self.canary_share < 1.0:
            raise ConfigError(f"--canary-share must be in [0, 1) (0: publish as the current version), "
                              f"got {self.canary_share}")
        if self.keep_versions < 0:
            raise ConfigError(f"--keep-versions must be at least 0 (0: keep every version), "
                              f"got {self.keep_versions}")
        if self.min_events < 0:
            raise ConfigError(f"--min-events must be at least 0, got {self.min_events}")
        if not self.job_timeout_s > 0:  # NaN too
            raise ConfigError(f"--job-timeout-s must be above 0, got {self.job_timeout_s}")
        if self.metric not in GATE_METRICS:  # else found only after a full training
            raise ConfigError(f"--metric {self.metric!r} is not one the comparison computes "
                              f"(known: {', '.join(sorted(GATE_METRICS))})")
        self._check_overrides()
        from model.network import resolve_device  # torch: the training runs need it anyway

        resolve_device(self.device)

    def _check_overrides(self) -> None:
        """The hyperparameter overrides, read as a run starting now reads them (over the CURRENT version's settings,
        or the defaults without one), so a value of the wrong type or out of range stops the start, not each run."""
        base_h, base_d = _serving_settings(self.registry)
        try:
            load_config(HRNNConfig, file_values=base_h, overrides=self.hrnn)
            load_config(DataConfig, file_values=base_d, overrides=self.data)
        except ConfigError as exc:
            raise ConfigError(f"hyperparameter flags (or --config): {exc}") from None

    def spec(self) -> RetrainSpec:
        return RetrainSpec(registry=self.registry, archive=self.archive, window_days=self.window_days,
                           margin=self.margin, metric=self.metric, warm_start=self.warm_start,
                           min_events=self.min_events, device=self.device, keep_versions=self.keep_versions,
                           canary=self.canary_share > 0, hrnn=dict(self.hrnn), data=dict(self.data))


def _serving_settings(registry: str) -> tuple[dict[str, Any], dict[str, Any]]:
    """The HRNN and data settings of the registry's CURRENT version, read from its config.json (the weights are
    not needed); empty when there is none or it cannot be read, as a run then starts from the defaults."""
    try:
        cur = current_version(registry)
        return ({}, {}) if cur is None else version_settings(Path(registry) / cur)
    except (HRNNError, OSError, ValueError, KeyError, TypeError):
        return {}, {}


def last_run_started(registry: str | Path) -> float | None:
    """When the schedule last started a run on this registry (epoch seconds, any instance's); None when it never
    did or the record cannot be read (the schedule then runs, as on a first start)."""
    path = Path(registry) / LAST_RUN_NAME
    try:
        started = float(json.loads(path.read_text())["started_at"])
    except FileNotFoundError:
        return None
    except (OSError, ValueError, KeyError, TypeError) as exc:
        log.warning("cannot read when the last run started: the schedule runs as if none had",
                    extra={"path": str(path), "error": f"{type(exc).__name__}: {exc}"})
        return None
    return started if math.isfinite(started) else None


def record_run_start(registry: str | Path, started_at: float) -> None:
    """Record a run's start for every instance (OSError when the registry cannot take it). Replaced whole, so an
    instance reading it meanwhile sees the old record or the new one, never a part."""
    reg = Path(registry)
    reg.mkdir(parents=True, exist_ok=True)
    tmp = reg / f"{LAST_RUN_NAME}.{secrets.token_hex(8)}"
    try:
        tmp.write_text(json.dumps({"started_at": started_at}))
        os.replace(tmp, reg / LAST_RUN_NAME)
    except OSError:
        tmp.unlink(missing_ok=True)
        raise


def run_is_due(last_started: float | None, now: float, interval_s: float) -> bool:
    """Whether the interval schedule starts a run now: at once when none is recorded, else once the interval has
    passed since the last start. A start recorded more than an interval ahead of this clock (a clock stepped back,
    or another host's clock ahead) is not waited for: that wait could last any time."""
    if last_started is None:
        return True
    return now - last_started >= interval_s or last_started - now > interval_s


class RetrainerMetrics:
    """The service's Prometheus metrics (own registry, `hrnn_retrainer_` prefix)."""

    def __init__(self) -> None:
        self.registry = r = CollectorRegistry()
        ns = "hrnn_retrainer"
        self.archived_events = Counter("archived_events", "Events written to the archive", namespace=ns, registry=r)
        self.invalid_events = Counter("invalid_events", "Events not archived (invalid), by reason", ["reason"],
                                      namespace=ns, registry=r)
        self.duplicate_events = Counter("duplicate_events", "Replayed events already archived", namespace=ns,
                                        registry=r)
        self.new_logs = Counter("events_topic_new_logs", "Times the events topic turned out to be another log "
                                "(another topic id: recreated, or another cluster) than the one archived so far",
                                namespace=ns, registry=r)
        self.runs = Counter("runs", "Retraining runs, by outcome", ["status"], namespace=ns, registry=r)
        self.run_seconds = Histogram("run_seconds", "Wall time of a retraining run", namespace=ns, registry=r,
                                     buckets=(1, 5, 15, 60, 300, 900, 3600, 4 * 3600, 12 * 3600))
        self.leader = Gauge("leader", "1 while this instance runs the schedule", namespace=ns, registry=r)
        self.last_published = Gauge("last_published_timestamp_seconds", "When a version was last published",
                                    namespace=ns, registry=r)
        self.future_events = Counter("future_events", "Events archived dated after tomorrow (UTC; a wrong clock): "
                                     "training windows leave them out until their day", namespace=ns, registry=r)
        self.archive_write_failures = Counter("archive_write_failures", "Failed attempts to write a batch to the "
                                              "archive (each is retried; the batch stays unacked)", namespace=ns,
                                              registry=r)
        self.archive_failing = Gauge("archive_failing", "1 while the archive cannot be written (archiving waits)",
                                     namespace=ns, registry=r)

    def exposition(self) -> bytes:
        return generate_latest(self.registry)


def announce_published(settings: RetrainerSettings, out: RetrainOutcome) -> bool:
    """Announce a published version as the settings published it: with a canary share, as a canary for that share
    of the users (CURRENT, unchanged, serves the rest), else to everyone. True when announced (only then does the
    last-published gauge move: it tells that retraining reaches the workers).

    Under the registry's pointer lock, as `hrnn models promote|canary` announce, and only while CURRENT still names
    what it named when the run published (out.current: the version, or the one a canary serves beside). A promote
    or rollback since then superseded the version: announced after it, workers would serve a version CURRENT does
    not name (or a canary judged against a version that no longer serves). That is False, with why added to
    out.reason; so is a failure to announce, with the command that announces it again in the log. Either way the
    version stays published."""
    from model.registry import current_lock
    from stream.announce import announce

    s = settings
    try:
        with current_lock(s.registry):
            now = current_version(s.registry)
            if now != (out.current if s.canary_share else out.version):
                _superseded(s, out, now)
                return False
            announce(s.bootstrap_servers, s.updates_topic, out.version, out.path, registry_id=s.registry_id,
                     reason="canary" if s.canary_share else "retrain", share=s.canary_share or 1.0, extra=s.kafka)
        return True
    except Exception as exc:  # noqa: BLE001 (the version is published; announcing is retried by promote)
        out.reason += f"; announcing failed: {exc}"
        log.error("published %s but could not announce it: %s (run `hrnn models %s --bootstrap-servers "
                  "...`)", out.version, exc, _announce_command(s, out.version))
        return False


def _superseded(s: RetrainerSettings, out: RetrainOutcome, now: str | None) -> None:
    out.reason += f"; not announced: CURRENT moved to {now or 'none'} after publishing (a promote or rollback)"
    if now == out.version:  # a canary promoted before its announcement: it serves everyone already
        log.warning("published %s as a canary but did not announce it as one: it was promoted since", out.version)
        return
    log.warning("published %s but did not announce it: CURRENT names %s since (a promote or rollback), which "
                "stands; to serve %s anyway: `hrnn models %s --bootstrap-servers ...`", out.version,
                now or "no version", out.version, _announce_command(s, out.version))


def _announce_command(s: RetrainerSettings, version: str) -> str:
    """The `hrnn models` action that announces a published version as the settings would have."""
    return (f"canary {s.registry} {version} --share {s.canary_share:g}" if s.canary_share
            else f"promote {s.registry} {version}")


def canary_skip(settings: RetrainerSettings, window_events: int = 0) -> RetrainOutcome | None:
    """With --canary-share (and a broker to read): a skipped outcome while the registry's latest announcement
    names a canary, as a new canary would replace it before its comparison could say anything; else None."""
    s = settings
    if not s.canary_share or not s.bootstrap_servers:
        return None
    from stream.announce import latest_canary, registry_id

    ann = latest_canary(s.bootstrap_servers, s.updates_topic, s.registry_id or registry_id(s.registry),
                        extra=s.kafka)
    if ann is None:
        return None
    return RetrainOutcome("skipped", f"the canary {ann.version} still serves; decide it first (`hrnn quality "
                                     "--decide-canary`, or `hrnn models promote`)", window_events=window_events)


# The child's entry (`python -c`, then stream.retrain_job as `-m` runs it): an orphaned child would keep the
# registry lock, then publish and move CURRENT with nobody to announce it. PR_SET_PDEATHSIG has the kernel SIGKILL
# the child when the thread that started it (the event loop's, which lives as long as the service) ends, however
# the service dies. It is set after exec, not in a preexec_fn: that would run Python between fork and exec in a
# process with librdkafka's and the executor's threads. The service may die before it is set: hence the getppid
# check. Without prctl (not Linux) the child runs as before, untied.
_CHILD_MAIN = """\
import os, runpy, signal, sys
parent = int(sys.argv.pop(1))
try:
    import ctypes
    ctypes.CDLL(None, use_errno=True).prctl(1, ctypes.c_ulong(signal.SIGKILL))  # 1: PR_SET_PDEATHSIG
except (ImportError, OSError, AttributeError):
    pass
if os.getppid() != parent:
    sys.exit("the retraining service exited before its run started")
runpy.run_module("stream.retrain_job", run_name="__main__", alter_sys=True)
"""


async def run_job(spec: RetrainSpec, timeout_s: float) -> RetrainOutcome:
    """Run one retraining in a child process without blocking the event loop."""
    with tempfile.TemporaryDirectory(prefix="hrnn-retrain-") as tmp:
        spec_path, out_path = Path(tmp, "spec.json"), Path(tmp, "outcome.json")
        spec_path.write_text(json.dumps(asdict(spec)))
        proc = await asyncio.create_subprocess_exec(sys.executable, "-c", _CHILD_MAIN, str(os.getpid()),
                                                    str(spec_path), str(out_path), stdin=asyncio.subprocess.DEVNULL)
        try:
            await asyncio.wait_for(proc.wait(), timeout_s)
        except (asyncio.TimeoutError, asyncio.CancelledError) as exc:
            proc.kill()
            await proc.wait()
            if isinstance(exc, asyncio.CancelledError):
                raise
            return RetrainOutcome("failed", f"the retraining process ran past {timeout_s:g} s and was killed")
        if not out_path.exists():
            return RetrainOutcome("failed", f"the retraining process exited with code {proc.returncode} "
                                            "without an outcome (see its log above)")
        return RetrainOutcome(**json.loads(out_path.read_text()))


class RetrainerService:
    """Builds the Faust app; `run()` serves it until SIGTERM/SIGINT."""

    def __init__(self, settings: RetrainerSettings) -> None:
        settings.validate()
        self.settings = settings
        self.metrics = RetrainerMetrics()
        self.health = Health(details={"state": "starting"})
        self.writer = ArchiveWriter(settings.archive, settings.events_topic)
        self._followed = False  # whether the writer follows the events topic's log (by an id read in this process)
        self._archive_error: str | None = None  # why the batch in hand cannot be written, while it cannot
        self._agent_crash: str | None = None  # why the archive agent stopped (its batch was acked unwritten)
        self.runs: list[RetrainOutcome] = []
        # this instance's last scheduled start: the schedule keeps to it should the registry's record not be written
        self._last_run_start: float | None = None
        # built now, so a client setting librdkafka refuses stops the start (later it would only be logged)
        self._admin  # noqa: B018
        self.app = self._build_app()

    def _build_app(self):
        import faust

        s = self.settings
        credentials = faust_credentials(s.kafka)  # refused settings: before anything is made
        # named now, made by Faust only when it starts, removed by run(): a service built and never run (a
        # test, a refused start) leaves nothing in the temp folder
        self._datadir = Path(tempfile.gettempdir()) / f"hrnn-retrainer-faust-{secrets.token_hex(8)}"
        app = faust.App(
            s.app_id,
            broker=[f"kafka://{h.strip()}" for h in s.bootstrap_servers.split(",") if h.strip()],
            datadir=self._datadir, store="memory://", web_enabled=False,
            topic_partitions=1, consumer_auto_offset_reset="earliest",
            broker_session_timeout=s.session_timeout_s,
            broker_heartbeat_interval=max(0.5, s.session_timeout_s / 5),
            broker_rebalance_timeout=max(s.session_timeout_s, 10.0),
            broker_credentials=credentials,
        )
        if others := librdkafka_only(s.kafka):
            log.info("Kafka client settings the archive consumer (Faust) has no counterpart for apply to the "
                     "librdkafka clients only", extra={"settings": others})
        events = app.topic(s.events_topic, key_serializer="raw", value_serializer="raw")

        @app.agent(events, name="archive")
        async def archive(stream) -> None:
            await self._archive_stream(stream)

        @app.on_partitions_assigned.connect
        async def on_assigned(sender, assigned, **kwargs) -> None:  # noqa: ARG001 (signal signature)
            # another instance may have archived these partitions up to a later offset
            try:
                await asyncio.get_running_loop().run_in_executor(None, self._follow_events_log)
            except KafkaClientError as exc:  # no id read yet: the first batch reads it before it is written
                log.warning("cannot read the events topic's id; archiving waits until it can",
                            extra={"error": str(exc)})
            self.metrics.leader.set(1 if app.is_leader() else 0)
            self.health.update(state="running")
            self._report_health()
            log.info("partitions assigned", extra={"partitions": sorted(f"{tp.topic}/{tp.partition}"
                                                                      for tp in assigned),
                                                     "leader": app.is_leader()})

        async def scheduled(app_) -> None:  # noqa: ARG001 (Faust passes the app)
            await self.retrain_now()

        async def ticked(app_) -> None:  # noqa: ARG001 (Faust passes the app)
            await self.retrain_if_due()

        if s.cron:
            app.crontab(s.cron, on_leader=True)(scheduled)
        else:
            # a timer of the interval itself would count from this process's start, not from the last run
            app.timer(min(s.interval_s, SCHEDULE_TICK_S), on_leader=True, name="hrnn-retrain")(ticked)
        return app

    async def _archive_stream(self, stream) -> None:
        """The archive agent: Faust's take_events acks a batch when the loop asks for the next one, or when an
        exception leaves the loop; so `_archive` returns only once the batch is written, and an exception that
        still escapes is reported (the batch it held is lost to the archive)."""
        s = self.settings
        try:
            async for batch in stream.take_events(s.archive_batch, within=s.archive_within_s):
                await self._archive(batch)
        except Exception as exc:
            self._agent_crash = f"{type(exc).__name__}: {exc}"
            self._report_health()
            log.error("the archive agent crashed: events are no longer archived", exc_info=True)
            raise

    async def _archive(self, batch) -> None:
        good: list[ArchivedEvent] = []
        copies = invalid = 0
        for ev in batch:
            msg = ev.message
            if repartitioned_from(ev.headers.items(), self.settings.events_topic, self.writer.topic_id,
                                  msg.partition, msg.offset) is not None:
                # the worker's re-keyed copy of a mis-keyed event: the original is archived by its own offset
                # (archived again, the event would train twice, more after a worker's crash copied it again); a
                # record carrying the header that the worker did not give it (see repartitioned_from) is an event
                copies += 1
                continue
            try:
                good.append(ArchivedEvent(msg.partition, msg.offset, decode_event(ev.value)))
            except EventError as exc:
                invalid += 1
                self.metrics.invalid_events.labels(reason=exc.reason).inc()
        before, future_before = self.writer.events_written, self.writer.future_events
        files = await self._write_until_done(good, batch)
        if files is None:
            return
        # counted over every attempt: a partition written before a later one failed is no replay
        fresh = self.writer.events_written - before
        dup = len(good) - fresh
        self.metrics.archived_events.inc(fresh)
        self.metrics.duplicate_events.inc(dup)
        self.metrics.future_events.inc(self.writer.future_events - future_before)
        log.info("archived events", extra={"events": fresh, "invalid": invalid, "repartitioned_copies": copies,
                                           "duplicates": dup, "files": [f.name for f in files]})

    async def _write_until_done(self, good: list[ArchivedEvent], batch) -> list[Path] | None:
        """Write the batch, retrying with a capped backoff until it is written (its files), or the service stops
        (None: the batch is released unacked). An error escaping the agent would have Faust ack the batch
        unwritten, and its offsets would be committed."""
        delay = self.settings.archive_retry_first_s
        retried = False
        while True:
            try:
                files = await asyncio.get_running_loop().run_in_executor(None, self._write_batch, good, retried)
            except Exception as exc:  # noqa: BLE001 (any failure: giving up would lose the batch)
                self._archive_write_failed(exc, len(good), delay)
                if not await self._backoff(delay):
                    self._release_unwritten(batch)
                    return None
                delay, retried = min(delay * 2, self.settings.archive_retry_max_s), True
                continue
            if self._archive_error is not None:
                log.warning("the archive is written again", extra={"after_error": self._archive_error})
                self._archive_error = None
                self.metrics.archive_failing.set(0)
                self._report_health()
            return files

    async def _backoff(self, delay_s: float) -> bool:
        """Wait before the next attempt; False as soon as the service stops (Faust's stop waits for the batch)."""
        deadline = time.monotonic() + delay_s
        while not self.app.should_stop:
            left = deadline - time.monotonic()
            if left <= 0:
                return True
            await asyncio.sleep(min(left, 0.2))
        return False

    @staticmethod
    def _release_unwritten(batch) -> None:
        """Let Faust's stop go on without the batch: its messages count as done, so the stop stops waiting for
        them, yet they are never acked to the consumer, so their offsets stay uncommitted and the next start
        reads them again (take_events' own ack after this is a no-op)."""
        for ev in batch:
            ev.message.acked = True
        log.warning("stopping with a batch not archived: it is read again on the next start",
                    extra={"events": len(batch)})

    def _write_batch(self, good: list[ArchivedEvent], retried: bool = False) -> list[Path]:
        """One attempt (on an executor thread)."""
        if retried or not self._followed or any(self.writer.archived(a) for a in good):
            # the first batch may come before the assignment's follow has run, or after it failed (its files would
            # name no log); replays, or a new log of the same name whose offsets start again at 0; and while this
            # instance retried, a rebalance may have handed the partition to another that archived the records
            self._follow_events_log()
        return self.writer.write(good)

    def _archive_write_failed(self, exc: Exception, events: int, retry_in_s: float) -> None:
        self._archive_error = f"{type(exc).__name__}: {exc}"
        self.metrics.archive_write_failures.inc()
        self.metrics.archive_failing.set(1)
        self._report_health()
        log.error("cannot write a batch to the archive; it stays unacked and is retried",
                  extra={"error": self._archive_error, "events": events, "retry_in_s": retry_in_s})

    def _report_health(self) -> None:
        """/health: 503 while the archive cannot be written or after the archive agent crashed (a crash is not
        undone by a restarted agent: a batch was lost to the archive)."""
        self.health.update(alive=self._archive_error is None and self._agent_crash is None,
                           archive_error=self._archive_error, agent_crash=self._agent_crash)

    @functools.cached_property
    def _admin(self) -> AdminClient:
        return admin_client(self.settings.bootstrap_servers, self.settings.kafka)

    def _follow_events_log(self) -> None:
        """Point the archive writer at the events topic's current log (by topic id) and re-read its marks.
        KafkaClientError when the id cannot be read and this process has read none yet: the writer then follows
        no log, and _write_batch raises it, so the batch waits unacked and is retried."""
        topic, tid = self.settings.events_topic, self.writer.topic_id
        try:
            tid = topic_id(self._admin, topic)
        except KafkaClientError as exc:
            if not self._followed:
                # The id-less log is no fallback: where the archive names ids its marks are empty, so a replayed
                # batch (archived before a crash under the id) would be written again, as a "new log". Only the
                # id of this log, once read, is one to go on by.
                raise
            log.warning("cannot read the events topic's id; archiving goes on by the offsets of the log followed "
                        "so far", extra={"error": str(exc)})
        self._followed = True
        if self.writer.refresh(tid):
            log.warning("the archive holds only other logs of the events topic (deleted and created again, or "
                        "another cluster): this one is archived from its start beside them",
                        extra={"topic": topic, "topic_id": tid})
            self.metrics.new_logs.inc()

    async def retrain_if_due(self) -> RetrainOutcome | None:
        """The interval schedule's look (on the leader): a run when --interval-s has passed since the start of the
        last run that any instance's schedule started on this registry (None: not due). Its start is recorded
        before it runs, so an instance that takes the schedule over mid-run counts from it too."""
        s = self.settings
        loop = asyncio.get_running_loop()
        now = time.time()  # wall clock: the record is compared across processes and hosts
        recorded = await loop.run_in_executor(None, last_run_started, s.registry)
        last = max((t for t in (recorded, self._last_run_start) if t is not None), default=None)
        if not run_is_due(last, now, s.interval_s):
            return None
        self._last_run_start = now
        try:
            await loop.run_in_executor(None, record_run_start, s.registry, now)
        except OSError as exc:
            log.error("cannot record the run's start in the registry: an instance taking the schedule over may run "
                      "again before --interval-s has passed", extra={"registry": s.registry, "error": str(exc)})
        return await self.retrain_now()

    async def retrain_now(self) -> RetrainOutcome:
        """One retraining run (the schedule calls this on the leader), then announce what was published. Never
        raises: an exception escaping the schedule's task would crash the Faust app, and stop archiving with it,
        at every start again; it becomes a failed run, with the reason, instead."""
        try:
            out = await self._retrain()
        except Exception as exc:  # noqa: BLE001 (see above; the traceback goes to the log)
            log.error("the retraining run failed", exc_info=True)
            out = RetrainOutcome("failed", f"{type(exc).__name__}: {exc}")
        self.metrics.runs.labels(status=out.status).inc()
        self.runs.append(out)
        log.info("retraining run finished", extra={"outcome": asdict(out)})
        return out

    async def _retrain(self) -> RetrainOutcome:
        s = self.settings
        try:
            window = await asyncio.get_running_loop().run_in_executor(None, scan_window, s.archive, s.window_days)
        except Exception as exc:  # noqa: BLE001 (the archive's folder itself: unreadable, gone)
            log.error("cannot count the events of the archive's window", exc_info=True)
            return RetrainOutcome("failed", f"cannot count the events of the {s.window_days}-day window of "
                                            f"{s.archive}: {type(exc).__name__}: {exc}")
        return await self._retrain_on(window)

    async def _retrain_on(self, window: Window) -> RetrainOutcome:
        s = self.settings
        n = window.events
        log.info("retraining run starts", extra={"window_days": s.window_days, "window_events": n,
                                                 "skipped_files": len(window.skipped), "registry": s.registry})
        skip = await asyncio.get_running_loop().run_in_executor(None, canary_skip, s, n)
        if skip is not None:
            out = skip
        elif n < s.min_events:
            # decided here, so an empty archive costs no child process
            out = RetrainOutcome("skipped", f"{n} events in the {s.window_days}-day window, {s.min_events} needed",
                                 window_events=n)
        else:
            t0 = time.monotonic()
            out = await run_job(s.spec(), s.job_timeout_s)
            self.metrics.run_seconds.observe(time.monotonic() - t0)
        # What the window left out, once: a job that read it said so; one killed, crashed or locked out did not.
        if not out.reason.endswith(window.note()):
            out.reason += window.note()
        if out.status == "published" and out.version and out.path:
            if await asyncio.get_running_loop().run_in_executor(None, announce_published, s, out):
                self.metrics.last_published.set_to_current_time()
        return out

    def run(self) -> int:
        """Serve until SIGTERM/SIGINT (Faust installs the handlers)."""
        import faust

        server = None
        try:
            server = self._serve_metrics()
            self.create_events_topic()
            worker = faust.Worker(self.app, quiet=True, override_logging=False, redirect_stdouts=False,
                                  loglevel=logging.getLevelName(logging.getLogger().level))
            worker.execute_from_commandline()
        except SystemExit as exc:
            return int(exc.code or 0)
        finally:
            if server is not None:
                server.shutdown()
            shutil.rmtree(self._datadir, ignore_errors=True)
            # the app keeps this service reachable after the run: its client would go on dialling the broker
            self.__dict__.pop("_admin", None)
        return 0

    def create_events_topic(self) -> None:
        """The events topic at a worker's default partition count, where none exists yet. Faust's consumer asks
        for its metadata with auto-creation on: a broker would make it with its own num.partitions (1 on Apache
        Kafka by default), and its partitions bound how many workers of the group have work. A broker that cannot
        be reached ends the service (TopicError naming the servers, exit 2): Faust would give up on it too, after
        15 s and with a traceback. Else best effort."""
        topic = self.settings.events_topic
        partition_counts(self._admin)  # the broker first, within that call's timeout
        try:
            if ensure_input_topic(self._admin, topic):
                log.info("events topic created", extra={"topic": topic, "partitions": DEFAULT_PARTITIONS})
        except (KafkaClientError, TopicError) as exc:  # a mismatch: made meanwhile by a worker, at its own count
            log.warning("the events topic was not created by the retrainer", extra={"topic": topic,
                                                                                    "error": str(exc)})

    def _serve_metrics(self) -> MetricsServer | None:
        """/metrics and /health on --metrics-port (None when 0)."""
        from stream.observability import start_http_server

        port = self.settings.metrics_port
        if not port:
            return None
        try:
            return start_http_server(self.metrics, port, self.health)  # type: ignore[arg-type]
        except (OSError, HRNNError) as exc:  # taken by another process, or not ours to bind
            raise ConfigError(f"--metrics-port {port} cannot be served: {exc}") from None

