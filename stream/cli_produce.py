"""`hrnn produce`: replay an interactions file into the events topic (see stream/replay.py).

The last stdout line is the number of events delivered, so scripts can read it with `tail -1`.
"""
from __future__ import annotations

import argparse

from model.config import path_arg
from model.errors import ConfigError
from model.loaders import add_loader_arguments, load_interactions, loader_options
from stream.cli_common import add_client_flags, kafka_settings
from stream.topics import DEFAULT_PARTITIONS, check_topic_name


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_client_flags(parser)
    parser.add_argument("--data", required=True, type=path_arg,
                        help="interactions file: CSV, TSV or Parquet (Personalize columns)")
    parser.add_argument("--topic", default="hrnn.events", help="events topic (default hrnn.events)")
    pace = parser.add_mutually_exclusive_group()
    pace.add_argument("--rate", type=float, help="at most this many events per second")
    pace.add_argument("--speedup", type=float, help="replay event time this many times faster than real time")
    parser.add_argument("--retime", action="store_true",
                        help="stamp events with the time they are sent (for latency measurements); "
                             "with --speedup, gaps between events keep their scaled length")
    parser.add_argument("--limit", type=int, help="send only the first N events (in time order)")
    parser.add_argument("--partitions", type=int,
                        help=f"partitions when the topic is created (default {DEFAULT_PARTITIONS}); "
                             "an existing topic with fewer is an error")
    parser.add_argument("--quiet", action="store_true", help="no progress bar")
    add_loader_arguments(parser)  # --columns, --time-unit, --delimiter, --base-epoch, as train reads the file


def run(args: argparse.Namespace) -> int:
    # Read the file before touching the broker: a bad file should fail fast and say why.
    if args.limit is not None and args.limit < 0:
        raise ConfigError(f"--limit must be >= 0, got {args.limit}")
    if args.partitions is not None and args.partitions < 1:
        raise ConfigError(f"--partitions must be >= 1, got {args.partitions}")
    check_topic_name("--topic", args.topic)
    data = load_interactions(args.data, **loader_options(args))

    from stream.kafka_clients import admin_client, create_producer
    from stream.replay import check_event_times, replay
    from stream.topics import ensure_input_topic

    extra = kafka_settings(args)
    if not args.retime:  # retimed events carry the send time, whatever the file says
        check_event_times(data, limit=args.limit)
    admin = admin_client(args.bootstrap_servers, extra)
    ensure_input_topic(admin, args.topic, args.partitions or 0)
    producer = create_producer(args.bootstrap_servers, extra)
    sent = replay(data, producer, args.topic, rate=args.rate, speedup=args.speedup, limit=args.limit,
                  progress=not args.quiet, retime=args.retime)
    print(sent, flush=True)
    return 0
