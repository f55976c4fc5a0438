"""What serving a canary costs the worker's scoring step; prints ONE JSON object.

    python bench/canary.py [--events 30000] [--users 3000] [--items 20000] [--hidden 64] [--batch-size 500]

A worker with a canary scores each batch in two parts (the stable version's users, the canary's), as
`Worker._step_round` does through `Serving.split`: two smaller model calls instead of one, plus a hash
per event. Measured in one run, in memory (no broker, no store), on the same events in the same batches:
  events_per_s        per setting: one version alone, and a canary at each --shares
  ratio               each setting's rate over the one-version rate
  users_on_canary     share of the users the canary served (the hash's split)
Every user's state is first built by the version that serves it (an unmeasured pass), so the timed pass
scores warm states, as a canary that has served a while does. Random weights of the right shape: scoring
cost does not depend on what the weights learned. The order of settings rotates over --repeats passes and
the best pass of each is kept (this machine is shared).
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from stream.cli_common import exit_on_sigterm  # noqa: E402
from bench.stream_throughput import check_counts, check_hidden, make_events, make_model  # noqa: E402
from model.errors import exit_status  # noqa: E402
from model.inference import Filters, Recommender, StepInput  # noqa: E402
from stream.canary import Serving, ShareError, check_share, in_canary  # noqa: E402


def _shares(text: str) -> list[float]:
    try:
        shares = [check_share(float(x)) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a comma list of numbers, got {text!r}") from None
    except ShareError as exc:  # 1.5 put every user on the canary and was measured as a canary
        raise argparse.ArgumentTypeError(str(exc)) from None
    if not shares:
        raise argparse.ArgumentTypeError(f"expected at least one share, got {text!r}")
    return shares


def score_all(serving: Serving, steps: list[StepInput], batch: int, states: dict) -> float:
    """Events per second over `steps` in batches of `batch`, scoring each part with its version."""
    start = time.perf_counter()
    for i in range(0, len(steps), batch):
        for model, part in serving.split(steps[i:i + batch], lambda s: s.user_id):
            out = model.recommend({s.user_id: states.get(s.user_id) for s in part}, part, k=25, filters=Filters())
            states.update(out.states)
    return len(steps) / (time.perf_counter() - start)


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--events", type=int, default=30_000)
    ap.add_argument("--users", type=int, default=3_000)
    ap.add_argument("--items", type=int, default=20_000)
    ap.add_argument("--hidden", type=int, default=64)
    ap.add_argument("--batch-size", type=int, default=500)
    ap.add_argument("--shares", type=_shares, default=[0.1, 0.5], help="canary shares, comma list in (0, 1)")
    ap.add_argument("--repeats", type=int, default=3)
    args = ap.parse_args()
    if args.repeats < 1:  # no pass: no rate to report
        ap.error("--repeats must be >= 1")
    check_counts(ap, args, "events", "users", "items", "batch_size")
    check_hidden(ap, args.hidden)
    import torch

    torch.set_num_threads(1)  # the worker's default (torch_threads = 1)
    events = make_events(args.events, args.users, args.items, seed=1, start_ms=1_767_225_600_000)
    steps = [StepInput(e.user_id, e.item_id, e.event_type, e.timestamp_ms, e.session_id) for e in events]
    with tempfile.TemporaryDirectory() as tmp:
        stable = Recommender.load(Path(tmp) / make_model(Path(tmp), args.items, args.hidden), "cpu")
        time.sleep(0.01)  # another version name
        canary = Recommender.load(Path(tmp) / make_model(Path(tmp), args.items, args.hidden), "cpu")
        settings = {"one version": Serving(stable)}
        settings |= {f"canary at {s:g}": Serving(stable, canary, s) for s in args.shares}
        warm = {}
        for name, serving in settings.items():
            warm[name] = {}
            score_all(serving, steps, args.batch_size, warm[name])
        best = {name: 0.0 for name in settings}
        names = list(settings)
        for r in range(args.repeats):
            for name in names[r % len(names):] + names[:r % len(names)]:
                states = dict(warm[name])
                best[name] = max(best[name], score_all(settings[name], steps, args.batch_size, states))
    users = {s.user_id for s in steps}
    print(json.dumps({
        "events": len(steps), "users": len(users), "items": args.items, "hidden": args.hidden,
        "batch_size": args.batch_size,
        "events_per_s": {n: round(v) for n, v in best.items()},
        "ratio": {n: round(v / best["one version"], 3) for n, v in best.items()},
        "users_on_canary": {n: round(sum(in_canary(u, canary.version, s.share) for u in users) / len(users), 3)
                            for n, s in settings.items() if s.canary is not None},
    }))
    return 0


if __name__ == "__main__":
    exit_on_sigterm()
    sys.exit(exit_status(main, Path(__file__).name))
