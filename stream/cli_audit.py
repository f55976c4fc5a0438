"""`hrnn audit`: check that every committed input record was answered (see stream/audit.py).

The worker group's topics, group, guarantee and client settings resolve as for `hrnn serve`: its
--config FILE (the workers' own settings file), HRNN_* environment variables, then these flags.

Exit status: 0 when the promise held, 1 when it did not (unanswered records; with
--processing-guarantee exactly_once also records answered twice), 2 on bad input (also a group that
committed nothing on the input topic, or an output topic that does not exist).
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
    """The window's start as a UTC time; as epoch ms where no calendar date has it (the report is printed
    after the whole audit: a start the flags let through must not cost it)."""
    if report.since_ms is None:
        return ""
    try:
        return f" since {datetime.fromtimestamp(report.since_ms / 1000, timezone.utc):%Y-%m-%d %H:%M:%S} UTC"
    except (ValueError, OverflowError, OSError):
        return f" since {report.since_ms} ms after the epoch"


def _print(report: AuditReport, out: TextIO | None = None) -> None:
    out = out or sys.stdout  # looked up at call time: a caller may have redirected it
    row = "{:>9} {:>10} {:>10} {:>8} {:>11} {:>6} {:>8} {:>11} {:>10} {:>10} {:>8}".format
    print(row("partition", "start", "committed", "records", "recommended", "dlq", "re-keyed", "copy again",
              "duplicated", "unanswered", "lag"), file=out)
    for p in report.partitions:
        print(row(p.partition, p.start, "-" if p.committed is None else p.committed, p.records, p.recommended,
                  p.dead_letters, p.rekeyed, p.copies_again, p.duplicated, p.unanswered, p.lag), file=out)
        if p.first_unanswered:
            print(f"          unanswered offsets: {', '.join(map(str, p.first_unanswered))}"
                  f"{' ...' if p.unanswered > len(p.first_unanswered) else ''}", file=out)
    if report.foreign_records:
        n = report.foreign_records
        print(f"{n} record{'s' * (n != 1)} of {report.output_topic!r} or its DLQ name{'s' * (n == 1)} no record of "
              f"{_log_of(report)} (not a recommendation, the answer to another topic or to a deleted log of "
              "this name, or to a partition or offset this log does not hold)", file=out)
    guarantee = "exactly_once" if report.exactly_once else "at_least_once"
    print(f"{report.total('records')} committed input records of {_log_of(report)}{_since(report)} "
          f"(group {report.group!r}): "
          f"{report.total('unanswered')} unanswered, {report.total('duplicated')} answered more than once "
          f"({'not allowed' if report.exactly_once else 'allowed'} under {guarantee}): "
          f"promise {'kept' if report.kept else 'BROKEN'}{_lag(report)}", file=out)


def _lag(report: AuditReport) -> str:
    """Said in the verdict's line: "kept" covers the committed records only, not those the group has yet to do."""
    lag = report.total("lag")
    if not lag:
        return "; no input record past the committed offsets (caught up)"
    return f"; {lag} input record{'s' * (lag != 1)} past the committed offsets (the group's lag) not audited"


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
