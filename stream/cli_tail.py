"""`hrnn tail`: print recommendations as they arrive (see stream/tail.py)."""
from __future__ import annotations

import argparse
import os
import sys

from model.errors import ConfigError
from stream.cli_common import add_client_flags, kafka_settings, positive


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_client_flags(parser)
    parser.add_argument("--topic", default="hrnn.recommendations", help="topic (default hrnn.recommendations)")
    parser.add_argument("--count", type=int, help="stop after N records")
    parser.add_argument("--from-beginning", action="store_true", help="start at the oldest record, not new ones")
    parser.add_argument("--timeout", type=float, help="stop after S seconds")
    parser.add_argument("--top", type=int, default=5, help="items shown per record (default 5)")


def run(args: argparse.Namespace) -> int:
    from stream.tail import tail
    from stream.topics import check_topic_name

    if args.count is not None and args.count < 1:
        raise ConfigError(f"--count must be >= 1, got {args.count}")
    if args.timeout is not None and not positive(args.timeout):
        raise ConfigError(f"--timeout must be > 0 seconds, got {args.timeout}")
    if args.top < 1:
        raise ConfigError(f"--top must be >= 1, got {args.top}")
    check_topic_name("--topic", args.topic)  # an illegal name can never exist: tail would wait for it forever
    try:
        printed = tail(args.bootstrap_servers, args.topic, count=args.count, from_beginning=args.from_beginning,
                       timeout_s=args.timeout, extra=kafka_settings(args), top=args.top)
    except BrokenPipeError:  # `hrnn tail | head`: the reader took what it wanted and left
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # Python's exit flush then goes nowhere
        return 0
    if args.count is not None and printed < args.count:
        print(f"hrnn tail: {printed} of {args.count} records arrived within {args.timeout:g} s", file=sys.stderr)
        return 1
    return 0
