"""Items off sale at scale: how long a worker's availability reader takes to read the topic whole
(what a starting worker's first batch waits for); prints ONE JSON object.

    python bench/availability_scale.py [--statuses 10000,100000]

Everything on 127.0.0.1 (the local broker, `LocalBroker`, a fresh one per size), stopping by itself.
For each size, `set_availability` takes that many item ids off sale in one call (as `hrnn items
unavailable --from-file` does), then an `AvailabilityReader` reads the topic from its start.

  write_s      seconds until the broker acknowledged every status
  catch_up_s   seconds from the reader's start until it is caught up (its set published); includes
               creating the consumer and one empty poll (0.5 s) that tells it has reached the end
  held         items off sale the reader holds then; `correct` is whether that is every one written
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from stream.cli_common import exit_on_sigterm  # noqa: E402
from model.errors import exit_status  # noqa: E402


def _sizes(text: str) -> list[int]:
    sizes = [int(x) for x in text.split(",") if x.strip()]
    if not sizes or min(sizes) < 1:
        raise argparse.ArgumentTypeError(f"sizes must be positive integers, got {text!r}")
    return sizes


def measure(n: int) -> dict:
    from stream.availability import AvailabilityReader, set_availability
    from stream.broker import LocalBroker

    items = [f"sku-{i}" for i in range(n)]
    with LocalBroker() as broker:
        t0 = time.perf_counter()
        set_availability(broker.bootstrap, items, available=False, reason="out of stock", topic="avail",
                         timeout_s=300)
        write_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        with AvailabilityReader(broker.bootstrap, "avail") as reader:
            caught_up = reader.wait_caught_up(600)
            catch_up_s = time.perf_counter() - t0
            held = len(reader.unavailable)
    return {"statuses": n, "write_s": round(write_s, 2), "catch_up_s": round(catch_up_s, 2),
            "statuses_per_s": round(n / catch_up_s), "held": held, "correct": caught_up and held == n}


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--statuses", type=_sizes, default=[10_000, 100_000], help="item ids off sale, comma list")
    args = ap.parse_args(argv)
    rows = []
    for n in args.statuses:
        rows.append(measure(n))
        print(f"{n:>9,} statuses: written in {rows[-1]['write_s']} s, read whole in {rows[-1]['catch_up_s']} s",
              file=sys.stderr, flush=True)
    print(json.dumps({"rows": rows}))
    return 0 if all(r["correct"] for r in rows) else 1


if __name__ == "__main__":
    exit_on_sigterm()
    sys.exit(exit_status(main, Path(__file__).name))
