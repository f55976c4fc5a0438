"""`hrnn retrainer`: archive the events topic and retrain on a schedule (leader only), or once with --once.

Hyperparameters default to the serving version's; any HRNN/featurization flag (`--epochs 3`)
or `--config FILE` overrides them for the retrained versions. Kafka client settings are the workers'
(`--kafka-config`, `--kafka-config-file`): the librdkafka clients take them as given, the archive's Faust
consumer as stream/faust_credentials.py maps them.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import logging

from model.cli_common import add_config_flags, file_settings
from model.config import DataConfig, HRNNConfig, field_names, path_arg
from model.errors import ConfigError
from stream.cli_common import add_kafka_flags, kafka_settings
from stream.topics import EVENTS_TOPIC, MODEL_UPDATES_TOPIC

log = logging.getLogger(__name__)


def add_arguments(p: argparse.ArgumentParser) -> None:
    a = p.add_argument
    a("--bootstrap-servers", help="Kafka bootstrap servers HOST:PORT[,...] (optional with --once, which then "
                                  "announces what it publishes; --canary-share needs it)")
    a("--registry", required=True, type=path_arg, help="model registry directory")
    a("--archive", required=True, type=path_arg, help="training store: Parquet files by day")
    when = p.add_mutually_exclusive_group()
    when.add_argument("--interval-s", type=float, help="retrain every N seconds (default 3600)")
    when.add_argument("--cron", help="retrain at crontab times, e.g. '0 3 * * *' (UTC)")
    when.add_argument("--once", action="store_true", help="retrain once now from the archive and exit")
    a("--window-days", type=int, default=7, help="train on the newest D days of the archive (default 7)")
    a("--margin", type=float, default=0.05,
      help="publish unless the new version's metric is worse than the serving one's by more than this share")
    a("--metric", default="mrr@20", help="metric of the comparison (default mrr@20)")
    a("--warm-start", action="store_true", help="start from the serving weights (item rows matched by id)")
    a("--min-events", type=int, default=1000, help="skip a run with fewer events in the window")
    a("--keep-versions", type=int, default=0, help="after publishing, keep the newest N versions, and always the "
                                                  "current one and the one a rollback returns to (0: all)")
    a("--canary-share", type=float, default=0.0,
      help="announce a published version as a canary for this share of the users, leaving the registry's "
           "current version serving the rest until `hrnn models promote` (default 0: publish as current)")
    a("--events-topic", default=EVENTS_TOPIC)
    a("--updates-topic", default=MODEL_UPDATES_TOPIC)
    a("--registry-id", help="key of the announcements (default: the registry's absolute path); workers follow "
      "the key of their registry_id setting")
    a("--app-id", default="hrnn-retrainer", help="Faust app id = consumer group of the archive")
    a("--group-session-timeout-s", type=float, default=10.0,
      help="consumer-group session timeout; a join on Tansu takes about half of it")
    a("--job-timeout-s", type=float, default=6 * 3600.0, help="kill a retraining run after this long")
    a("--train-device", default="cpu", help="device of the retraining run (cpu, cuda, auto)")
    a("--metrics-port", type=int, default=0, help="serve /metrics on this port (0: off)")
    a("--log-level", default="INFO")
    add_kafka_flags(p)
    add_config_flags(p, HRNNConfig, DataConfig)


def _overrides(args: argparse.Namespace, cls: type) -> dict:
    names = field_names(cls)
    out = {}
    if args.config:  # read as `hrnn train` reads it: a key that is no setting is refused, not dropped
        out.update({k: v for k, v in file_settings(args.config).items() if k in names})
    out.update({k: getattr(args, k) for k in names if getattr(args, k, None) is not None})
    return out


class _ConnectFailures(logging.Filter):
    """aiokafka logs an ERROR at each failed connect, thousands while a broker is down: let one through at
    most every CONNECTION_FAILURES_EVERY_S, as the librdkafka clients' are."""

    def __init__(self, servers: str) -> None:
        super().__init__()
        self.key = f"aiokafka {servers}"

    def filter(self, record: logging.LogRecord) -> bool:
        from stream.kafka_clients import CONNECTION_FAILURES_EVERY_S, connection_failure_due

        if not str(record.msg).startswith("Unable connect"):
            return True
        return connection_failure_due(self.key, CONNECTION_FAILURES_EVERY_S)


def settings_from(args: argparse.Namespace):
    from stream.retrainer import RetrainerSettings

    return RetrainerSettings(
        bootstrap_servers=args.bootstrap_servers or "", registry=args.registry, archive=args.archive,
        events_topic=args.events_topic, updates_topic=args.updates_topic, app_id=args.app_id,
        interval_s=args.interval_s if args.interval_s is not None else 3600.0, cron=args.cron,
        window_days=args.window_days, margin=args.margin, metric=args.metric, warm_start=args.warm_start,
        min_events=args.min_events, keep_versions=args.keep_versions, canary_share=args.canary_share,
        device=args.train_device,
        hrnn=_overrides(args, HRNNConfig), data=_overrides(args, DataConfig),
        session_timeout_s=args.group_session_timeout_s, job_timeout_s=args.job_timeout_s,
        registry_id=args.registry_id, metrics_port=args.metrics_port, kafka=kafka_settings(args))


def run(args: argparse.Namespace) -> int:
    from stream.observability import setup_json_logging

    setup_json_logging(args.log_level)
    if args.log_level.upper() != "DEBUG":
        for noisy in ("faust", "mode", "aiokafka"):
            logging.getLogger(noisy).setLevel(logging.WARNING)
        aiokafka = logging.getLogger("aiokafka")
        if not any(isinstance(f, _ConnectFailures) for f in aiokafka.filters):  # a test runs commands by the dozen
            aiokafka.addFilter(_ConnectFailures(args.bootstrap_servers or ""))
    settings = settings_from(args)
    if args.once:
        return _once(settings)
    from stream.retrainer import RetrainerService

    return RetrainerService(settings).run()


def _once(settings) -> int:
    """One run now (skipped, as the service's, while its canary serves); a published version is announced as the
    service announces it (with --bootstrap-servers).
    Exit 1 when the run failed or its version could not be announced (the JSON outcome says why)."""
    from stream.retrain_job import retrain
    from stream.retrainer import announce_published, canary_skip

    settings.validate_run()
    if settings.canary_share and not settings.bootstrap_servers:
        # only the announcement makes a version a canary: unannounced, it would be published and serve nobody
        raise ConfigError(f"--canary-share {settings.canary_share:g} needs --bootstrap-servers: a canary serves only "
                          "once announced to the workers. Give --bootstrap-servers, or drop --canary-share (the "
                          "version is then published as the current one)")
    if settings.bootstrap_servers:  # before training, not after it when announcing
        from stream.kafka_clients import check_client_settings

        check_client_settings(settings.bootstrap_servers, settings.kafka)
    out = canary_skip(settings) or retrain(settings.spec())
    announced = True
    if out.status == "published" and settings.bootstrap_servers:
        announced = announce_published(settings, out)
    print(json.dumps(dataclasses.asdict(out), indent=2, default=str))
    return 0 if out.status in ("published", "rejected", "skipped") and announced else 1
