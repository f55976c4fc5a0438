"""`hrnn broker`: the local Kafka-compatible broker (Tansu) in the foreground, for development.

The bootstrap address is the only stdout line, printed once the broker answers. It stays in the
foreground, so `BOOT=$(hrnn broker | head -1)` would wait for it forever; a script starts it in
the background and reads the line once it is there:
    hrnn broker > broker.addr &  BROKER=$!
    until [ -s broker.addr ]; do kill -0 $BROKER || exit 1; sleep 0.2; done
    BOOT=$(head -1 broker.addr)   ...   kill $BROKER
Data lives in memory only and is gone when the broker stops.
"""
from __future__ import annotations

import argparse
import signal
import sys
import threading
from pathlib import Path

from model.errors import ConfigError


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--port", type=int, default=0, help="TCP port on 127.0.0.1 (default: a free one)")
    parser.add_argument("--log", type=Path, help="append the broker's own log to this file")


def run(args: argparse.Namespace) -> int:
    from stream.broker import BrokerError, LocalBroker

    if not 0 <= args.port <= 65535:
        raise ConfigError(f"--port {args.port} is not a TCP port (0 picks a free one)")
    stop = threading.Event()
    previous = {sig: signal.signal(sig, lambda *_: stop.set()) for sig in (signal.SIGINT, signal.SIGTERM)}
    broker = LocalBroker(port=args.port, log_path=args.log)
    try:
        broker.start()
        print(broker.bootstrap, flush=True)
        print(f"hrnn broker: listening on {broker.bootstrap} (in memory only); Ctrl-C stops it",
              file=sys.stderr, flush=True)
        while not stop.wait(0.5):
            if broker.process is not None and broker.process.poll() is not None:
                raise BrokerError(f"the broker exited on its own with code {broker.process.returncode}"
                                  + (f"; see {args.log}" if args.log else "; rerun with --log FILE to see why"))
    finally:
        broker.stop()
        for sig, handler in previous.items():
            signal.signal(sig, handler)
    print("hrnn broker: stopped", file=sys.stderr, flush=True)
    return 0
