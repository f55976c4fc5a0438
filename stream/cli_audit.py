"""`hrnn audit`: check that every committed input record was answered (see stream/audit.py).

Exit status: 0 when the promise held, 1 when it did not (unanswered records; with
--processing-guarantee exactly_once also duplicated recommendations), 2 on bad input.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING, TextIO

from model.errors import ConfigError
from stream.settings import GUARANTEES, WorkerSettings

if TYPE_CHECKING:
    from stream.audit import AuditReport


def add_arguments(parser: argparse.ArgumentParser) -> None:
    a = parser.add_argument
    a("--bootstrap-servers", default=os.environ.get("HRNN_BOOTSTRAP_SERVERS", "127.0.0.1:9092"),
      help="Kafka bootstrap servers (default $HRNN_BOOTSTRAP_SERVERS or 127.0.0.1:9092)")
    a("--group", default=WorkerSettings.group, help=f"the workers' consumer group (default {WorkerSettings.group})")
    a("--input-topic", default=WorkerSettings.input_topic, help=f"default {WorkerSettings.input_topic}")
    a("--output-topic", default=WorkerSettings.output_topic, help=f"default {WorkerSettings.output_topic}")
    a("--processing-guarantee", choices=GUARANTEES, default=WorkerSettings.processing_guarantee,
      help="the workers' guarantee: exactly_once also fails on duplicated recommendations")
    a("--idle-s", type=float, default=2.0, help="a topic is read up to its end offsets as the audit starts, or "
      "until no record came for S seconds (default 2)")
    a("--timeout-s", type=float, default=600.0, help="give up reading a topic after S seconds")
    a("--json", help="also write the report as JSON to this file")
    a("--kafka-config", action="append", default=[], metavar="KEY=VALUE",
      help="librdkafka client setting, repeatable (security.protocol, sasl.*, ssl.*)")


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
              f"{report.input_topic!r} (not a recommendation, or another topic's dead letter)", file=out)
    verdict = "kept" if report.kept else "BROKEN"
    print(f"{report.total('records')} committed input records of {report.input_topic!r} (group {report.group!r}):"
          f" {report.total('unanswered')} unanswered, {report.total('duplicated')} with more than one"
          f" recommendation ({'not allowed' if report.exactly_once else 'allowed'} under "
          f"{'exactly_once' if report.exactly_once else 'at_least_once'}): promise {verdict}", file=out)


def run(args: argparse.Namespace) -> int:
    from stream.audit import audit
    from stream.kafka_clients import parse_client_settings
    from stream.topics import dlq_topic

    if args.idle_s <= 0 or args.timeout_s <= 0:
        raise ConfigError(f"--idle-s and --timeout-s must be > 0 seconds, got {args.idle_s:g} and {args.timeout_s:g}")
    report = audit(args.bootstrap_servers, input_topic=args.input_topic, output_topic=args.output_topic,
                   dlq_topic=dlq_topic(args.input_topic), group=args.group,
                   exactly_once=args.processing_guarantee == "exactly_once",
                   extra=parse_client_settings(args.kafka_config), idle_s=args.idle_s, timeout_s=args.timeout_s,
                   progress=lambda line: print(f"hrnn audit: {line}", file=sys.stderr))
    _print(report)
    if args.json:
        Path(args.json).write_text(json.dumps(report.to_dict(), indent=2) + "\n")
    return 0 if report.kept else 1
