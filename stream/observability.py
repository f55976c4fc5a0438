"""Worker metrics (Prometheus), the /metrics + /health endpoint, and JSON-lines logging.

Each WorkerMetrics owns its registry instead of using the process-global one, so several
workers in one process (tests, the demo) do not collide on metric names.
"""
from __future__ import annotations

import json
import logging
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import datetime, timezone
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any, Protocol

from prometheus_client import CONTENT_TYPE_LATEST, CollectorRegistry, Counter, Gauge, Histogram, generate_latest

from model.errors import ConfigError

NAMESPACE = "hrnn"
LATENCY_BUCKETS = (0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0)
STEP_BUCKETS = (0.0005,) + LATENCY_BUCKETS
BATCH_BUCKETS = tuple(float(2**i) for i in range(14))  # 1 .. 8192 events


class WorkerMetrics:
    """The worker's counters, histograms and gauges, exposed with the `hrnn_` prefix."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        r, ns = self.registry, NAMESPACE
        self.events_in_total = Counter("events_in", "Input records consumed", namespace=ns, registry=r)
        self.recommendations_out_total = Counter("recommendations_out", "Recommendation records produced",
                                                 namespace=ns, registry=r)
        self.dlq_total = Counter("dlq", "Records sent to the dead-letter topic, by reason", ["reason"],
                                 namespace=ns, registry=r)
        self.unknown_items_total = Counter("unknown_items", "Events whose item the model does not know",
                                           namespace=ns, registry=r)
        self.repartitioned_total = Counter("repartitioned", "Records re-keyed to the user's partition",
                                           namespace=ns, registry=r)
        self.rebuilt_states_total = Counter("rebuilt_states", "User states rebuilt after a model swap",
                                            namespace=ns, registry=r)
        self.prebuilt_states_total = Counter("prebuilt_states", "User states rebuilt in the background before "
                                             "a swap (their next events only catch up)", namespace=ns, registry=r)
        self.stores_discarded_total = Counter("stores_discarded", "Partition stores discarded and rebuilt from the "
                                              "changelog: built from another changelog (topics recreated, another "
                                              "cluster) or damaged", namespace=ns, registry=r)
        self.input_new_logs_total = Counter("input_new_logs", "Partition stores whose states were built from "
                                            "another log of the input topic (another topic id: deleted and "
                                            "created again) and forgot their input offsets", namespace=ns,
                                            registry=r)
        self.model_swaps_total = Counter("model_swaps", "Model versions switched to", namespace=ns, registry=r)
        self.model_refused_total = Counter("model_refused", "Model versions refused, by reason", ["reason"],
                                           namespace=ns, registry=r)
        self.batch_size = Histogram("batch_size", "Events per worker batch", namespace=ns, registry=r,
                                    buckets=BATCH_BUCKETS)
        self.step_seconds = Histogram("step_seconds", "Wall time of one batch step", namespace=ns, registry=r,
                                      buckets=STEP_BUCKETS)
        self.event_to_recommendation_seconds = Histogram(
            "event_to_recommendation_seconds", "Input record's Kafka timestamp (its producer's create time) to "
            "recommendation emit time",
            namespace=ns, registry=r, buckets=LATENCY_BUCKETS)
        self.consumer_lag = Gauge("consumer_lag", "Records behind the end, per assigned input partition "
                                  "(approximate on Tansu)", ["partition"], namespace=ns, registry=r)
        self.model_version_info = Gauge("model_version_info", "Share of the users a model version serves now "
                                        "(1 for the only one; below 1 while a canary serves)",
                                        ["version"], namespace=ns, registry=r)
        # RocksDB's estimate: an exact count would cost a read per state written, or a scan per open.
        self.states_stored = Gauge("states_stored", "RocksDB's estimate of the user-state entries in the local "
                                   "stores (approximate: states overwritten and not yet compacted can count again)",
                                   namespace=ns, registry=r)
        self.unavailable_items = Gauge("unavailable_items", "Items off sale on the availability topic, left out "
                                       "of every recommendation", namespace=ns, registry=r)
        self._versions: set[str] = set()
        self._lock = threading.Lock()

    def set_model_versions(self, shares: dict[str, float]) -> None:
        """Report exactly the versions serving now, each with its share of users (retired ones disappear)."""
        with self._lock:
            for gone in self._versions - shares.keys():
                self.model_version_info.remove(gone)
            self._versions = set(shares)
            for version, share in shares.items():
                self.model_version_info.labels(version=version).set(share)

    def set_lag(self, partition: int, lag: int) -> None:
        self.consumer_lag.labels(partition=str(partition)).set(max(0, lag))

    def forget_partitions(self, partitions: list[int]) -> None:
        """Drop lag series of revoked partitions, so another worker's partitions are not reported twice."""
        for p in partitions:
            try:
                self.consumer_lag.remove(str(p))
            except KeyError:
                pass

    def exposition(self) -> bytes:
        return generate_latest(self.registry)

    def value(self, name: str, labels: dict[str, str] | None = None) -> float | None:
        """A sample's current value by its exposed name (e.g. "hrnn_events_in_total"), for tests and summaries."""
        return self.registry.get_sample_value(name, labels or {})


class HealthSource(Protocol):
    def report(self) -> tuple[bool, dict[str, Any]]: ...


@dataclass
class Health:
    """What /health reports. `alive` is off once the worker failed or stopped; while it is on, a worker that
    expects heartbeats (expect_beats) is still reported dead when its loop has not beaten for `stale_after_s`:
    stuck somewhere, which only a restart mends (the liveness probe's job)."""

    alive: bool = True
    details: dict[str, Any] = field(default_factory=dict)
    stale_after_s: float | None = None  # None: no heartbeats expected (a process without a loop to watch)
    last_beat: float = 0.0  # clock() at the loop's last heartbeat
    clock: Callable[[], float] = time.monotonic

    def update(self, alive: bool | None = None, **details: Any) -> None:
        if alive is not None:
            self.alive = alive
        self.details.update(details)

    def expect_beats(self, stale_after_s: float) -> None:
        """From now on, beat() at least every `stale_after_s` or be reported stuck."""
        self.beat()
        self.stale_after_s = stale_after_s

    def beat(self) -> None:
        # One attribute write per loop iteration, no lock: the HTTP thread reading a float a beat late
        # changes nothing, and the hot path stays free of contention.
        self.last_beat = self.clock()

    def report(self) -> tuple[bool, dict[str, Any]]:
        """(alive, the details /health shows), judged now."""
        details = dict(self.details)
        if self.stale_after_s is None:
            return self.alive, details
        silent = self.clock() - self.last_beat
        details["heartbeat_age_s"] = round(silent, 3)
        if self.alive and silent > self.stale_after_s:
            details["error"] = (f"the worker loop has not gone round for {silent:.0f} s (longer than "
                                f"{self.stale_after_s:g} s): stuck")
            return False, details
        return self.alive, details


class MetricsServer:
    """A running /metrics + /health endpoint on a background thread."""

    def __init__(self, httpd: ThreadingHTTPServer, thread: threading.Thread) -> None:
        self._httpd, self._thread = httpd, thread

    @property
    def port(self) -> int:
        return int(self._httpd.server_address[1])

    @property
    def host(self) -> str:
        return str(self._httpd.server_address[0])

    def shutdown(self) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()
        self._thread.join(timeout=5)

    def __enter__(self) -> "MetricsServer":
        return self

    def __exit__(self, *exc: object) -> None:
        self.shutdown()


def start_http_server(metrics: WorkerMetrics, port: int, health: HealthSource, *,
                      host: str = "0.0.0.0") -> MetricsServer:
    """Serve GET /metrics (Prometheus text) and GET /health (JSON; 200 while alive, 503 otherwise).
    Port 0 picks a free port; read it from the returned server's `.port`. A port that cannot be bound
    (taken, privileged) raises a ConfigError naming it."""

    class Handler(BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
            path = self.path.split("?", 1)[0]
            if path == "/metrics":
                self._send(200, CONTENT_TYPE_LATEST, metrics.exposition())
            elif path in ("/health", "/healthz"):
                alive, details = health.report()
                body = {"status": "ok" if alive else "unavailable", **details}
                self._send(200 if alive else 503, "application/json",
                           json.dumps(body, default=str).encode())
            else:
                self._send(404, "text/plain; charset=utf-8", b"not found: try /metrics or /health\n")

        def _send(self, code: int, ctype: str, body: bytes) -> None:
            self.send_response(code)
            self.send_header("Content-Type", ctype)
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: Any) -> None:  # scrapes every few seconds: keep out of the log
            logging.getLogger(__name__).debug(format % args)

    try:
        httpd = ThreadingHTTPServer((host, port), Handler)
    except OSError as exc:
        raise ConfigError(f"cannot serve /metrics and /health on {host}:{port}: {exc.strerror or exc}; pick "
                          "another metrics port (0 turns the endpoint off)") from None
    httpd.daemon_threads = True
    thread = threading.Thread(target=httpd.serve_forever, name="hrnn-metrics-http", daemon=True)
    thread.start()
    return MetricsServer(httpd, thread)


# Attributes every LogRecord has; anything else on a record came from `extra=` and is logged as a field.
_STANDARD_ATTRS = frozenset(vars(logging.LogRecord("", 0, "", 0, "", (), None))) | {"message", "asctime", "taskName"}


class JsonFormatter(logging.Formatter):
    """One JSON object per line: ts, level, logger, msg, the `extra` fields, and exc when there is one."""

    def format(self, record: logging.LogRecord) -> str:
        out: dict[str, Any] = {
            "ts": datetime.fromtimestamp(record.created, tz=timezone.utc).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "msg": record.getMessage(),
        }
        for key, value in record.__dict__.items():
            if key not in _STANDARD_ATTRS and key not in out and not key.startswith("_"):
                out[key] = value
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return json.dumps(out, default=str, ensure_ascii=False)


def check_log_level(level: str, named: str, where: str = "") -> None:
    """ConfigError unless `level` names a log level; `named` is how the message shows it, `where` what follows."""
    if level.upper() not in logging.getLevelNamesMapping():
        raise ConfigError(f"{named} is not a log level: DEBUG, INFO, WARNING, ERROR or CRITICAL{where}")


def setup_json_logging(level: int | str = "INFO", stream: Any = None) -> logging.Handler:
    """Route the root logger to JSON lines on stderr (or `stream`), replacing earlier handlers."""
    if isinstance(level, str):
        check_log_level(level, f"--log-level {level}")
    handler = logging.StreamHandler(stream or sys.stderr)
    handler.setFormatter(JsonFormatter())
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level.upper() if isinstance(level, str) else level)
    return handler
