"""`hrnn synth`: write a synthetic Personalize-schema interactions file (see model/synth.py)."""
from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np

from model.errors import ConfigError
from model.sessions import session_starts
from model.synth import MAX_EVENTS, MAX_ITEMS, generate, measured_repeat_share, write

_SUFFIXES = (".csv", ".tsv", ".parquet", ".pq")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--out", required=True, type=Path, help="output file: .csv, .tsv or .parquet")
    parser.add_argument("--users", type=int, default=2000, help="number of users (default 2000)")
    parser.add_argument("--items", type=int, default=1000, help="number of items (default 1000)")
    parser.add_argument("--seed", type=int, default=0, help="random seed (default 0)")
    parser.add_argument("--events-per-user", type=float, default=25.0, help="mean events per user (default 25)")
    parser.add_argument("--repeat-share", type=float, default=0.0,
                        help="target share of events revisiting an item of the user's earlier sessions (default 0)")
    parser.add_argument("--categories", type=int, default=20, help="number of item categories (default 20)")


def run(args: argparse.Namespace) -> int:
    out: Path = args.out
    if out.suffix.lower() not in _SUFFIXES:
        raise ConfigError(f"--out {out}: unknown extension {out.suffix!r} (expected one of {', '.join(_SUFFIXES)})")
    if out.exists() and out.is_dir():
        raise ConfigError(f"--out {out} is a directory (expected a file name)")
    if args.seed < 0:  # numpy's generators take no negative seed
        raise ConfigError(f"--seed {args.seed}: the seed must be 0 or more")
    if args.items > MAX_ITEMS:  # checked here too, to name the flag
        raise ConfigError(f"--items {args.items}: at most {MAX_ITEMS:,} items")
    if args.users * args.events_per_user > MAX_EVENTS:  # checked here too, to name the flags
        raise ConfigError(f"--users {args.users} x --events-per-user {args.events_per_user:.10g} asks for about "
                          f"{args.users * args.events_per_user:.3g} events, more than the {MAX_EVENTS:.0e} "
                          "hrnn synth writes")
    started = time.perf_counter()
    data = generate(args.users, args.items, seed=args.seed, n_categories=args.categories,
                    repeat_share=args.repeat_share, events_per_user=args.events_per_user)
    try:
        write(data, out)
    except OSError as exc:
        raise ConfigError(f"--out {out}: cannot write ({exc.strerror or exc})") from None
    sessions = int(np.count_nonzero(session_starts(data, 1800.0)))
    took = time.perf_counter() - started
    print(f"wrote {out}: {len(data)} events, {data.n_users} users, {data.n_items} items, {sessions} sessions, "
          f"repeat share {measured_repeat_share(data):.2f}, {took:.2f} s")
    return 0
