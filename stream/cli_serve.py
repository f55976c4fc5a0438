"""`hrnn serve`: run one streaming inference worker until SIGTERM/SIGINT, then drain and exit 0.

Every setting can also come from --config FILE (JSON/TOML, top level or a [serve] table) or
HRNN_<SETTING> environment variables; flags win. See stream/settings.py for the full list.
"""
from __future__ import annotations

import argparse
import logging
import signal
import threading
from typing import Any

from model.config import path_arg
from stream.cli_common import add_kafka_flags, kafka_settings
from stream.settings import GUARANTEES, MAX_K, load_settings

log = logging.getLogger(__name__)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    a = parser.add_argument
    a("--bootstrap-servers", help="Kafka bootstrap servers, HOST:PORT[,HOST:PORT]")
    a("--registry", type=path_arg, help="model registry directory (the CURRENT version is served)")
    a("--state-dir", type=path_arg, help="directory for the per-partition RocksDB state stores")
    a("--input-topic", help="events topic (default hrnn.events)")
    a("--output-topic", help="recommendations topic (default hrnn.recommendations)")
    a("--group", help="consumer group; also names the state changelog <group>.state-changelog")
    a("--partitions", type=int, help="partitions for topics this worker creates (default: the input topic's)")
    a("--metrics-port", type=int, help="serve /metrics and /health on this port (0: off)")
    a("--config", type=path_arg, help="settings file (JSON or TOML)")
    a("--batch-size", type=int, help="most records per batch (default 500)")
    a("--batch-timeout", dest="batch_timeout_s", type=float,
      help="seconds to wait for more records after a batch's first one (default 0.01)")
    a("-k", "--k", type=int, help=f"recommendations per event (default 25, at most {MAX_K})")
    a("--exclude-purchased", action=argparse.BooleanOptionalAction, default=None,
      help="leave out items the user purchased recently (default on)")
    a("--purchase-types", help="comma-separated event types that count as purchases (default purchase)")
    a("--exclude-session-items", action=argparse.BooleanOptionalAction, default=None,
      help="leave out items of the current session (default off)")
    a("--exclude-event-types", help="comma-separated event types whose items are left out")
    a("--processing-guarantee", choices=GUARANTEES, help="at_least_once (default) or exactly_once")
    a("--device", help="auto (CUDA if present), cpu or cuda")
    a("--torch-threads", type=int, help="CPU threads for the model (0: one per core); on a host shared with "
      "the broker or other workers, fewer threads are often faster")
    a("--follow-updates", action=argparse.BooleanOptionalAction, default=None,
      help="swap to model versions announced for this registry (default on)")
    a("--updates-topic", help="model announcements topic (default hrnn.model-updates)")
    a("--registry-id", help="key of the announcements to follow: the --registry-id the announcers give (default: "
      "the registry's absolute path here, which must then be the announcers' path too)")
    a("--follow-availability", action=argparse.BooleanOptionalAction, default=None,
      help="leave out items taken off sale on the availability topic (default on; see `hrnn items`)")
    a("--availability-topic", help="item availability topic (default hrnn.item-availability)")
    a("--prebuild-max-users", type=int, help="stored states a new version rebuilds in the background before "
      "it swaps in (default 200000; 0: rebuild each on its user's next event)")
    a("--state-format", type=int, help="format of the states written (default 2; 1 while a rolling upgrade "
      "from a build that reads only format 1 is under way)")
    a("--gc-threshold", type=int, help="the process's gen-0 garbage-collection threshold (default 0: "
      "sized to --batch-size, 64 per event, at least 20000)")
    add_kafka_flags(parser)
    a("--log-level", help="DEBUG, INFO (default), WARNING, ERROR")


_FIELDS = ("bootstrap_servers", "registry", "state_dir", "input_topic", "output_topic", "group", "partitions",
           "metrics_port", "batch_size", "batch_timeout_s", "k", "exclude_purchased", "purchase_types",
           "exclude_session_items", "exclude_event_types", "processing_guarantee", "device", "log_level",
           "follow_updates", "updates_topic", "registry_id", "torch_threads", "prebuild_max_users", "gc_threshold",
           "state_format", "follow_availability", "availability_topic")


def overrides_from(args: argparse.Namespace) -> dict[str, Any]:
    out: dict[str, Any] = {name: getattr(args, name, None) for name in _FIELDS}
    out["kafka"] = kafka_settings(args)
    return out


def run(args: argparse.Namespace) -> int:
    from stream.observability import Health, WorkerMetrics, setup_json_logging, start_http_server
    from stream.worker import Worker, gc_threshold_for, tune_process_gc  # torch and librdkafka load only when serving

    settings = load_settings(args.config, overrides_from(args))
    setup_json_logging(settings.log_level)
    stop = threading.Event()

    def on_signal(signum: int, _frame: Any) -> None:
        log.info("stopping: draining the batch in hand", extra={"signal": signal.Signals(signum).name})
        stop.set()

    signal.signal(signal.SIGTERM, on_signal)
    signal.signal(signal.SIGINT, on_signal)
    metrics, health = WorkerMetrics(), Health(alive=False, details={"state": "starting"})
    server = start_http_server(metrics, settings.metrics_port, health) if settings.metrics_port else None
    try:
        worker = Worker(settings, metrics=metrics, health=health)
        tune_process_gc(gc_threshold_for(settings))
        worker.run(stop)
    finally:
        if server is not None:
            server.shutdown()
    return 0
