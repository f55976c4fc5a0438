"""Flags the client commands (`hrnn produce`, `tail`, `items`) share."""
from __future__ import annotations

import argparse
import os


def add_client_flags(parser: argparse.ArgumentParser) -> None:
    """--bootstrap-servers (default $HRNN_BOOTSTRAP_SERVERS, else the local broker) and --kafka-config."""
    parser.add_argument("--bootstrap-servers", default=os.environ.get("HRNN_BOOTSTRAP_SERVERS", "127.0.0.1:9092"),
                        help="Kafka bootstrap servers (default $HRNN_BOOTSTRAP_SERVERS or 127.0.0.1:9092)")
    parser.add_argument("--kafka-config", action="append", default=[], metavar="KEY=VALUE",
                        help="librdkafka client setting, repeatable (security.protocol, sasl.*, ssl.*)")
