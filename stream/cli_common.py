"""Flags the client commands share: `hrnn produce`, `tail`, `items` (a broker and client settings), and
`audit`, `quality` (a deployment's worker settings and a window of its topics)."""
from __future__ import annotations

import argparse
import math
import os
import signal
import time
from pathlib import Path
from typing import TYPE_CHECKING

from model.config import path_arg
from model.errors import ConfigError, stop_with

if TYPE_CHECKING:
    from stream.settings import WorkerSettings


def add_client_flags(parser: argparse.ArgumentParser) -> None:
    """--bootstrap-servers (default $HRNN_BOOTSTRAP_SERVERS, else the local broker) and the Kafka client flags."""
    parser.add_argument("--bootstrap-servers", default=os.environ.get("HRNN_BOOTSTRAP_SERVERS", "127.0.0.1:9092"),
                        help="Kafka bootstrap servers (default $HRNN_BOOTSTRAP_SERVERS or 127.0.0.1:9092)")
    add_kafka_flags(parser)


def add_kafka_flags(parser: argparse.ArgumentParser) -> None:
    """--kafka-config KEY=VALUE (repeatable) and --kafka-config-file: the Kafka client settings of every command."""
    parser.add_argument("--kafka-config", action="append", default=[], metavar="KEY=VALUE",
                        help="librdkafka client setting, repeatable (security.protocol, sasl.*, ssl.*)")
    parser.add_argument("--kafka-config-file", type=path_arg,
                        help="client.properties file with librdkafka settings (the flags win over its lines)")


def kafka_settings(args: argparse.Namespace) -> dict[str, str]:
    """The settings of add_kafka_flags: the file's, then the flags'."""
    from stream.kafka_clients import load_client_settings, parse_client_settings

    out = load_client_settings(args.kafka_config_file) if getattr(args, "kafka_config_file", None) else {}
    return out | parse_client_settings(getattr(args, "kafka_config", None) or [])


def add_deployment_flags(parser: argparse.ArgumentParser, checks: str) -> None:
    """The worker group's settings, resolved as for `hrnn serve` (--config FILE, the workers' own settings file,
    then HRNN_* variables, then these flags), and the window of its topics to read. `checks`: what the command
    does with the input records, for --since-s's help."""
    from stream.settings import WorkerSettings

    a = parser.add_argument
    a("--config", type=path_arg, help="the workers' settings file (JSON or TOML, as `hrnn serve --config`)")
    a("--bootstrap-servers", help=f"Kafka bootstrap servers (default {WorkerSettings.bootstrap_servers})")
    a("--input-topic", help=f"default {WorkerSettings.input_topic}")
    a("--output-topic", help=f"default {WorkerSettings.output_topic}")
    a("--since-s", type=float, help=f"{checks} only the input records of the last S seconds (by their Kafka "
      "timestamps); default: all the input topic retains")
    a("--idle-s", type=float, default=2.0, help="a topic is read up to its end offsets as the command starts, or "
      "until no record came for S seconds (default 2)")
    a("--timeout-s", type=float, default=600.0, help="give up reading a topic after S seconds")
    a("--json", type=path_arg, help="also write the report as JSON to this file")
    add_kafka_flags(parser)


def directory_flag(flag: str, path: str) -> None:
    """A directory the flag names must be one, or creatable as one (created when first written, so a command
    refused for another reason leaves nothing behind): a file there, or as one of its parents, is refused."""
    for p in (Path(path), *Path(path).parents):
        if p.exists():
            if not p.is_dir():
                where = "" if p == Path(path) else f" ({p} is a file)"
                raise ConfigError(f"{flag} {path} must be a directory, but it is a file{where}: name a directory")
            return


SIGTERM_STATUS = 128 + signal.SIGTERM  # what a shell reports for a process ended by SIGTERM


def exit_on_sigterm() -> None:
    """Make SIGTERM (`kill PID`, `timeout`, a CI job's limit, `docker stop`) raise SystemExit in the main thread,
    so `with LocalBroker()`, temporary directories and `finally` clauses unwind as on Ctrl-C. Python's default
    ends the process without unwinding, and the local broker runs in its own session (stream.broker), so it
    outlived the program that started it."""
    signal.signal(signal.SIGTERM, _exit_143)


def _exit_143(signum: int, _frame) -> None:
    # A second SIGTERM while the first unwinds would cut the clean-up short and leave the broker again;
    # SIGKILL still ends a clean-up that hangs.
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    stop_with(SIGTERM_STATUS)


def positive(value: float) -> bool:
    """Whether a flag's number of seconds (or other amount) is finite and above 0; NaN, which every
    comparison calls False, and infinity are not."""
    return math.isfinite(value) and value > 0


def deployment_settings(args: argparse.Namespace) -> tuple[WorkerSettings, int | None]:
    """The worker settings the flags of `add_deployment_flags` resolve to, and the window's start (epoch ms)."""
    from stream.cli_serve import overrides_from
    from stream.settings import load_settings

    if not (positive(args.idle_s) and positive(args.timeout_s) and (args.since_s is None or positive(args.since_s))):
        raise ConfigError(f"--idle-s, --timeout-s and --since-s must be > 0 seconds, got {args.idle_s:g}, "
                          f"{args.timeout_s:g} and {args.since_s}")
    now_s = time.time()
    # Checked before any topic is read: a window opening before 1970 has no time to print or to look up.
    if args.since_s is not None and args.since_s > now_s:
        raise ConfigError(f"--since-s {args.since_s:g} reaches back before 1970: at most {now_s:.0f} seconds (the "
                          "time since the epoch); leave it out to read all the input topic retains")
    settings = load_settings(args.config, overrides_from(args), serving=False)
    return settings, None if args.since_s is None else int((now_s - args.since_s) * 1000)
