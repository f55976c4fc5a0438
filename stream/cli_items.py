"""`hrnn items unavailable|available|list`: take items off sale, put them back, show which are off
(the availability topic every worker follows; see stream/availability.py)."""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from model.config import path_arg, shown_path
from model.errors import ConfigError
from stream.availability import AvailabilityReader, set_availability
from stream.cli_common import add_client_flags, kafka_settings, positive
from stream.kafka_clients import KafkaClientError, reader_consumer, topic_partitions
from stream.topics import AVAILABILITY_TOPIC, check_topic_name


def add_arguments(parser: argparse.ArgumentParser) -> None:
    sub = parser.add_subparsers(dest="action", required=True)
    off = sub.add_parser("unavailable", help="take items off sale: no worker recommends them from now on")
    off.add_argument("--reason", help="why, kept with the status (e.g. 'out of stock')")
    on = sub.add_parser("available", help="put items back on sale")
    for p in (off, on):
        p.add_argument("items", nargs="*", metavar="ITEM", help="item ids")
        p.add_argument("--from-file", type=path_arg, help="also the item ids in this file, one per line")
    show = sub.add_parser("list", help="the items off sale now, with their reasons")
    show.add_argument("--json", action="store_true", help="one JSON object {item: reason}")
    for p in (off, on, show):
        add_client_flags(p)
        p.add_argument("--topic", default=AVAILABILITY_TOPIC, help=f"availability topic (default {AVAILABILITY_TOPIC})")
        p.add_argument("--timeout-s", type=float, default=30.0, help="longest wait for the broker (default 30)")


def run(args: argparse.Namespace) -> int:
    if not positive(args.timeout_s):
        raise ConfigError(f"--timeout-s must be > 0 seconds, got {args.timeout_s}")
    check_topic_name("--topic", args.topic)
    extra = kafka_settings(args)
    if args.action == "list":  # reads only: a misspelt --topic must not be created and listed as empty
        _check_exists(args.bootstrap_servers, args.topic, extra, args.timeout_s)
        return _list(AvailabilityReader(args.bootstrap_servers, args.topic, extra=extra, poll_timeout_s=0.2,
                                        create_topic=False), args)
    items, back = _item_ids(args), args.action == "available"
    set_availability(args.bootstrap_servers, items, available=back, reason=getattr(args, "reason", None),
                     topic=args.topic, extra=extra, timeout_s=args.timeout_s)
    print(f"{len(items)} item(s) {'back on sale' if back else 'taken off sale'} on {args.topic}")
    return 0


def _item_ids(args: argparse.Namespace) -> list[str]:
    items = list(args.items)
    if args.from_file:
        path = Path(args.from_file)
        try:
            if not path.is_file():
                raise ConfigError(f"--from-file {path}: no such file")
            text = path.read_text(encoding="utf-8-sig")  # a byte-order mark (Excel, Notepad) is not part of an id
        except UnicodeDecodeError as exc:
            raise ConfigError(f"--from-file {path}: not UTF-8 text (byte {exc.start}): one item id per line") from None
        except OSError as exc:  # a name too long, a file not readable: is_file() raises rather than say False
            raise ConfigError(f"--from-file {shown_path(path)}: cannot be read ({exc.strerror or exc})") from None
        items += [line.strip() for line in text.splitlines() if line.strip()]
    if not items:
        raise ConfigError("no item ids given: name them, or pass --from-file FILE")
    return list(dict.fromkeys(items))  # once each, in the order given


def _check_exists(bootstrap: str, topic: str, extra: dict[str, str], timeout_s: float) -> None:
    consumer = reader_consumer(bootstrap, extra)  # a consumer's metadata request never creates the topic
    try:
        if not topic_partitions(consumer, topic, timeout_s=timeout_s):
            raise KafkaClientError(f"topic {topic!r} does not exist on {bootstrap}: check --topic (it is created "
                                   "when an item is first taken off sale or a worker starts)")
    finally:
        consumer.close()


def _list(reader: AvailabilityReader, args: argparse.Namespace) -> int:
    with reader:
        if not reader.wait_caught_up(args.timeout_s):
            why = f"failed: {reader.error}" if reader.error else f"not read to its end within {args.timeout_s:g} s"
            print(f"hrnn items: {args.topic} {why}", file=sys.stderr)
            return 1
        reasons = reader.reasons()
    if args.json:
        print(json.dumps(reasons, sort_keys=True))
    else:
        for item, reason in sorted(reasons.items()):
            print(f"{item}\t{reason or ''}")
        print(f"{len(reasons)} item(s) off sale", file=sys.stderr)
    return 0
