"""`hrnn audit`: check that every committed input record was answered (see stream/audit.py).

The worker group's topics, group, guarantee and client settings resolve as for `hrnn serve`: its
--config FILE (the workers' own settings file), HRNN_* environment variables, then these flags.

Exit status: 0 when the promise held, 1 when it did not (unanswered records; with
--processing-guarantee exactly_once also duplicated recommendations), 2 on bad input.
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, TextIO

from model.errors import ConfigError
from stream.settings import GUARANTEES, WorkerSettings

if TYPE_CHECKING:
    from stream.audit import AuditReport


def add_arguments(parser: argparse.ArgumentParser) -> None:
    a = parser.add_argument
    a("--config", help="the workers' settings file (JSON or TOML, as `hrnn serve --config`)")
    a("--bootstrap-servers", help=f"Kafka bootstrap servers (default {WorkerSettings.bootstrap_servers})")
    a("--group", help=f"the workers' consumer group (default {WorkerSettings.group})")
    a("--input-topic", help=f"default {WorkerSettings.input_topic}")
    a("--output-topic", help=f"default {WorkerSettings.output_topic}")
    a("--processing-guarantee", choices=GUARANTEES,
      help="the workers' guarantee: exactly_once also fails on duplicated recommendations")
    a("--since-s", type=float, help="audit only the input records of the last S seconds (by their Kafka "
      "timestamps); default: all the input topic retains")
    a("--idle-s", type=float, default=2.0, help="a topic is read up to its end offsets as the audit starts, or "
      "until no record came for S seconds (default 2)")
    a("--timeout-s", type=float, default=600.0, help="give up reading a topic after S seconds")
    a("--json", help="also write the report as JSON to this file")
    a("--kafka-config", action="append", default=[], metavar="KEY=VALUE",
      help="librdkafka client setting, repeatable (security.protocol, sasl.*, ssl.*)")
    a("--kafka-config-file", help="client.properties file with librdkafka settings")


def _log_of(report: AuditReport) -> str:
    return f"{report.input_topic!r}{f' (topic id {report.input_log})' if report.input_log else ''}"


def _since(report: AuditReport) -> str:
    if report.since_ms is None:
        return ""
    return f" since {datetime.fromtimestamp(report.since_ms / 1000, timezone.utc):%Y-%m-%d %H:%M:%S} UTC"


def _print(report: AuditReport, out: TextIO = sys.stdout) -> None:
    row = "{:>9} {:>10} {:>10} {:>8} {:>11} {:>6} {:>8} {:>10} {:>10}".format
    print(row("partition", "start", "committed", "records", "recommended", "dlq", "re-keyed", "duplicated",
              "unanswered"), file=out)
    for p in report.partitions:
        print(row(p.partition, p.start, "-" if p.committed is None else p.committed, p.records, p.recommended,
                  p.dead_letters, p.rekeyed, p.duplicated, p.unanswered), file=out)
        if p.first_unanswered:
            print(f"          unanswered offsets: {', '.join(map(str, p.first_unanswered))}"
                  f"{' ...' if p.unanswered > len(p.first_unanswered) else ''}", file=out)
    if report.foreign_records:
        n = report.foreign_records
        print(f"{n} record{'s' * (n != 1)} of {report.output_topic!r} or its DLQ name{'s' * (n == 1)} no record of "
              f"{_log_of(report)} (not a recommendation, or the answer to another topic or to a deleted log of "
              "this name)", file=out)
    guarantee = "exactly_once" if report.exactly_once else "at_least_once"
    print(f"{report.total('records')} committed input records of {_log_of(report)}{_since(report)} "
          f"(group {report.group!r}): "
          f"{report.total('unanswered')} unanswered, {report.total('duplicated')} with more than one recommendation "
          f"({'not allowed' if report.exactly_once else 'allowed'} under {guarantee}): "
          f"promise {'kept' if report.kept else 'BROKEN'}", file=out)


def run(args: argparse.Namespace) -> int:
    from stream.audit import audit_worker
    from stream.cli_serve import overrides_from
    from stream.settings import load_settings

    if args.idle_s <= 0 or args.timeout_s <= 0 or (args.since_s is not None and args.since_s <= 0):
        raise ConfigError(f"--idle-s, --timeout-s and --since-s must be > 0 seconds, got {args.idle_s:g}, "
                          f"{args.timeout_s:g} and {args.since_s}")
    settings = load_settings(args.config, overrides_from(args), serving=False)
    since_ms = None if args.since_s is None else int((time.time() - args.since_s) * 1000)
    report = audit_worker(settings, since_ms=since_ms, idle_s=args.idle_s, timeout_s=args.timeout_s,
                          progress=lambda line: print(f"hrnn audit: {line}", file=sys.stderr))
    _print(report)
    if args.json:
        Path(args.json).write_text(json.dumps(report.to_dict(), indent=2) + "\n")
    return 0 if report.kept else 1
