"""Hot swap under load, model level (no broker yet); prints ONE JSON object.

    python bench/swap.py [--items 20000] [--hidden 64] [--users 3000] [--batch-size 500] [--batches 60]

On the shared 2-core dev machine step times swing with other processes' load; compare runs
taken back to back.

A worker-like loop scores batches with `ModelHolder.current()` and calls `swap_if_ready()`
between batches, with user states kept in memory; a second version is requested at batch
`--request-at`. Reported:
  validate_s                 load + checksum + smoke inference of one version, alone
  step_ms_before_p50         batch step time before the request
  step_ms_loading_p50/max    batch step time while the new version loads in the background
  batches_until_ready        batches scored by the old version after the request
  swap_wait_batches          batches between "ready" and the swap (the contract: at most 1)
  first_batch_after_swap_ms  the batch that rebuilds the stale states of its users
  rebuilt_users_first_batch  how many users that batch rebuilt
  step_ms_after_p50          steady state on the new version
  mixed_batches              batches whose recommendations name two versions (must be 0)

TODO (lead, once the worker calls the holder): the same against `hrnn serve` and the local
broker — produce at a fixed rate, promote with `hrnn models promote --bootstrap-servers`, and
report event->recommendation latency p50/p99 around the swap and the time from announcement
to the first recommendation of the new version.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def make_version(registry: Path, n_items: int, hidden: int, seed: int) -> Path:
    import torch

    from model.artifact import save_version
    from model.config import DataConfig, HRNNConfig
    from model.network import HRNN

    torch.manual_seed(seed)
    cfg = HRNNConfig(hidden_dimension=hidden)
    items = [f"item-{i}" for i in range(n_items)]
    return save_version(registry, HRNN(n_items, cfg).eval(), cfg, DataConfig(), items, ["click", "purchase"],
                        make_current=False)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--items", type=int, default=20000)
    p.add_argument("--hidden", type=int, default=64)
    p.add_argument("--users", type=int, default=3000)
    p.add_argument("--batch-size", type=int, default=500)
    p.add_argument("--batches", type=int, default=60)
    p.add_argument("--warmup", type=int, default=10, help="batches scored before measuring (not reported)")
    p.add_argument("--request-at", type=int, default=20, help="batch (after warm-up) at which the new version is requested")
    p.add_argument("--device", default="cpu")
    p.add_argument("--steps", action="store_true", help="also print every batch step time")
    args = p.parse_args()

    from model.artifact import set_current
    from model.inference import StepInput
    from stream.hotswap import ModelHolder, validate_version

    with tempfile.TemporaryDirectory() as tmp:
        reg = Path(tmp)
        old, new = make_version(reg, args.items, args.hidden, 0), make_version(reg, args.items, args.hidden, 1)
        set_current(reg, old.name)
        t0 = time.perf_counter()
        validate_version(new, device=args.device)
        validate_s = time.perf_counter() - t0

        rng = np.random.default_rng(0)
        states: dict = {}
        clock = 1_767_225_600_000
        steps, phase, rebuilt_first = [], [], 0
        requested_at = ready_at = swapped_at = None
        mixed = 0
        with ModelHolder.open(reg, device=args.device) as holder:
            for b in range(-args.warmup, args.batches):
                if holder.swap_if_ready() is not None:
                    swapped_at = b
                if b == args.request_at:
                    holder.request(new, new.name)
                    requested_at = b
                rec = holder.current()
                users = rng.integers(0, args.users, args.batch_size)
                items = (rng.zipf(1.2, args.batch_size) - 1) % args.items
                events = [StepInput(f"u{u}", f"item-{i}", "click", clock + k * 1000)
                          for k, (u, i) in enumerate(zip(users, items))]
                clock += args.batch_size * 1000
                t = time.perf_counter()
                out = rec.recommend(states, events, k=25)
                states.update(out.states)
                if b < 0:
                    continue  # warm-up: first batches of new users and a cold allocator
                steps.append((time.perf_counter() - t) * 1000)
                mixed += len({s.model_version for s in out.states.values()}) > 1
                if swapped_at == b:
                    rebuilt_first = out.rebuilt_users
                st = holder.stats()
                if ready_at is None and requested_at is not None and st.pending == new.name:
                    ready_at = b
                phase.append("before" if requested_at is None else
                             "loading" if ready_at is None and swapped_at is None else
                             "waiting" if swapped_at is None else "after")
            last_load_s = holder.stats().last_load_s

    def pick(name: str) -> list[float]:
        return [s for s, ph in zip(steps, phase) if ph == name]

    after = pick("after")
    result = {
        "items": args.items, "hidden": args.hidden, "batch_size": args.batch_size, "device": args.device,
        "validate_s": round(validate_s, 3), "background_load_s": round(last_load_s or 0.0, 3),
        "step_ms_before_p50": round(statistics.median(pick("before")), 2),
        "step_ms_loading_p50": round(statistics.median(pick("loading")), 2) if pick("loading") else None,
        "step_ms_loading_max": round(max(pick("loading")), 2) if pick("loading") else None,
        "batches_until_ready": None if ready_at is None else ready_at - requested_at + 1,
        "swap_wait_batches": None if swapped_at is None or ready_at is None else swapped_at - ready_at - 1,
        "first_batch_after_swap_ms": round(after[0], 2) if after else None,
        "rebuilt_users_first_batch": rebuilt_first,
        "step_ms_after_p50": round(statistics.median(after[1:]), 2) if len(after) > 1 else None,
        "mixed_batches": mixed,
    }
    if "--steps" in sys.argv[1:]:
        result["steps_ms"] = [round(s, 1) for s in steps]
    print(json.dumps(result))


if __name__ == "__main__":
    main()
