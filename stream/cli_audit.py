"""`hrnn audit`: check that every committed input record was answered (see stream/audit.py).

The worker group's topics, group, guarantee and client settings resolve as for `hrnn serve`: its
--config FILE (the workers' own settings file), HRNN_* environment variables, then these flags.

Exit status: 0 when the promise held, 1 when it did not (unanswered records; with
--processing-guarantee exactly_once also records answered twice), 2 on bad input.
"""
from __future__ import annotations

import argparse
import json
import sys
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, TextIO

from model.cli_common import output_file
from stream.cli_common import add_deployment_flags, deployment_settings
from stream.settings import GUARANTEES, WorkerSettings

if TYPE_CHECKING:
    from stream.audit import AuditReport


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_deployment_flags(parser, "audit")
    parser.add_argument("--group", help=f"the workers' consumer group (default {WorkerSettings.group})")
    parser.add_argument("--processing-guarantee", choices=GUARANTEES,
                        help="the workers' guarantee: exactly_once also fails on records answered twice")


def _log_of(report: AuditReport) -> str:
    return f"{report.input_topic!r}{f' (topic id {report.input_log})' if report.input_log else ''}"


def _since(report: AuditReport) -> str:
    if report.since_ms is None:
        return ""
    return f" since {datetime.fromtimestamp(report.since_ms / 1000, timezone.utc):%Y-%m-%d %H:%M:%S} UTC"


def _print(report: AuditReport, out: TextIO | None = None) -> None:
    out = out or sys.stdout  # looked up at call time: a caller may have redirected it
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
          f"{report.total('unanswered')} unanswered, {report.total('duplicated')} answered more than once "
          f"({'not allowed' if report.exactly_once else 'allowed'} under {guarantee}): "
          f"promise {'kept' if report.kept else 'BROKEN'}", file=out)


def run(args: argparse.Namespace) -> int:
    from stream.audit import audit_worker

    output_file(args.json, "--json")
    settings, since_ms = deployment_settings(args)
    report = audit_worker(settings, since_ms=since_ms, idle_s=args.idle_s, timeout_s=args.timeout_s,
                          progress=lambda line: print(f"hrnn audit: {line}", file=sys.stderr))
    _print(report)
    if args.json:
        Path(args.json).write_text(json.dumps(report.to_dict(), indent=2) + "\n")
    return 0 if report.kept else 1
