"""A canary under load, end to end: version B serves a share of the users beside A, then is promoted;
prints ONE JSON object.

    python bench/canary_swap.py [--share 0.1] [--users 2000] [--items 20000] [--hidden 64] [--rate 0]
                                [--base-s 15] [--canary-s 15] [--promote-s 15] [--after-s 10]

The setup is bench/swap.py's (its pieces are imported: random-weight versions A and B of one catalogue,
--users users with a stored state of H=100 events written by A, the local broker, the real `Worker` in a
thread, its batches timed by the same probe, a steady rate of half the measured capacity). Phases:
  base      --base-s seconds on A
  canary    B announced with --share (what `hrnn models canary` sends): the worker loads and validates
            B, rebuilds its users' stored states with it in the background, then scores each batch in
            two parts; --canary-s seconds from the announcement
  promote   B announced for everyone (`hrnn models promote`): no second load; the loader rebuilds the
            other users' states with B in the background, then B serves all; --promote-s seconds
  after     --after-s seconds on B alone
Keys:
  dropped                   input records with no recommendation (null if the input was not read back whole)
  wrong_side_records        records of the batches scored by both versions whose version is not the one
                            their user's side (stream.canary.in_canary) names
  flip_flops                users whose records go back from B to A (a user moves at most once: A -> B)
  canary_users_share        of the users served, those the hash puts on B (in_canary)
  batch_ms_{base,canary,promote,after}_{max,p50,p99}, batches_<window>
  max_ratio_{canary,promote}_to_base   largest batch of the window over the largest of the base and after
                            windows (the broker's round trips grow over a run: the two bracket it)
  slowest_batches           the 3 slowest of the canary and promote windows (bench/swap.py's describe:
                            seconds after the announcement, ms, events, rebuilds, model / other / cpu / gc ms)
  announce_to_{canary,promotion}_s     announcement -> the first batch B scored (canary: any of it;
                            promotion: all of it)
  prebuilt_{canary,promotion}, prebuild_s_{canary,promotion}  states the loader rebuilt ahead, and its time
  rebuild_users_{canary,promote}       states rebuilt in the batches instead (users the prebuild missed)
  targets_met               dropped == 0, wrong_side_records == 0, flip_flops == 0, and the largest batch
                            of the canary and promote windows at most twice that of base and after
  plot                      PNG (--out-dir) of every batch's time, the announcements and swaps marked
"""
from __future__ import annotations

import argparse
import gc
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from stream.cli_common import exit_on_sigterm  # noqa: E402
from bench.swap import (H, Harness, Traffic, describe, log, pct, plot, refuse_bad_flags, scan,  # noqa: E402
                        seed_states, two_versions)
from model.errors import exit_status  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--share", type=float, default=0.1)
    p.add_argument("--items", type=int, default=20000)
    p.add_argument("--hidden", type=int, default=64)
    p.add_argument("--users", type=int, default=2000)
    p.add_argument("--partitions", type=int, default=3)
    p.add_argument("--batch-size", type=int, default=500)
    p.add_argument("--torch-threads", type=int, default=1)
    p.add_argument("--rate", type=float, default=0.0, help="events/s; 0: half the capacity, at most --max-rate")
    p.add_argument("--max-rate", type=float, default=1000.0)
    p.add_argument("--calib-events", type=int, default=3000)
    p.add_argument("--settle-s", type=float, default=3.0)
    p.add_argument("--base-s", type=float, default=15.0)
    p.add_argument("--canary-s", type=float, default=15.0)
    p.add_argument("--promote-s", type=float, default=15.0)
    p.add_argument("--after-s", type=float, default=10.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out-dir", default="/tmp/canary_swap_bench")
    args = p.parse_args()
    if not 0 < args.share < 1:
        p.error(f"--share must lie strictly between 0 and 1, got {args.share:g}")
    refuse_bad_flags(p, args, counts=("items", "hidden", "users", "partitions", "batch_size", "calib_events"),
                     windows=("base_s", "canary_s", "promote_s", "after_s", "max_rate"),
                     at_least_zero=("settle_s", "rate"))
    print(json.dumps(run(args)), flush=True)


def run(args) -> dict:
    import torch

    from model.inference import Recommender
    from stream.announce import announce
    from stream.records import decode_recommendation
    from stream.settings import WorkerSettings

    t_start = time.perf_counter()
    torch.set_num_threads(max(1, args.torch_threads))
    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(args.seed)
    with tempfile.TemporaryDirectory(prefix="canary-bench-") as tmp:
        ver_a, ver_b, kw = two_versions(Path(tmp), args)
        log(f"seeding {args.users} users x {H} events (version A)")
        seed_settings = WorkerSettings(bootstrap_servers="127.0.0.1:1", **kw)
        users, _, _ = seed_states(Recommender.load(ver_a, "cpu"), seed_settings, args.users, args.items,
                                  args.partitions, rng, int(time.time() * 1000) - 3_600_000)
        gc.collect()
        gc.freeze()  # the seeding's objects are bench baggage: keep them out of the worker's GC passes (as swap.py)
        harness = Harness(out_dir)
        t: dict[str, float] = {}
        stats: dict = {}
        try:
            settings = harness.start(kw)
            broker, worker = harness.broker, harness.worker
            traffic = harness.traffic = Traffic(broker.bootstrap, settings.input_topic, users, args.items,
                                                args.partitions, args.seed + 1)
            capacity, rate = harness.calibrate(args.calib_events, args.rate, args.max_rate)
            traffic.run(args.settle_s, rate)
            t["base"] = time.perf_counter()
            traffic.run(args.base_s, rate)
            t["canary"] = time.perf_counter()
            announce(broker.bootstrap, settings.updates_topic, ver_b.name, ver_b, reason="canary", share=args.share)
            log(f"announced B as a canary for {args.share:.0%}")
            traffic.run(args.canary_s, rate)
            stats["canary"] = worker.models.stats()
            t["promote"] = time.perf_counter()
            announce(broker.bootstrap, settings.updates_topic, ver_b.name, ver_b, reason="promote")
            log("announced B for everyone")
            traffic.run(args.promote_s, rate)
            stats["promote"] = worker.models.stats()
            t["after"] = time.perf_counter()
            traffic.run(args.after_s, rate)
            t["end"] = time.perf_counter()
            all_answered = harness.answered(60)
            inputs: set = set()
            scan(broker.bootstrap, settings.input_topic, lambda m: inputs.add((m.partition(), m.offset())),
                 expected=traffic.delivered)
            outs: dict = {}  # (partition, offset) -> (user, version)

            def on_out(m) -> None:
                r = decode_recommendation(m.value())
                outs[(r.source_partition, r.source_offset)] = (r.user_id, r.model_version)

            scan(broker.bootstrap, settings.output_topic, on_out, expected=len(inputs))
        finally:
            harness.close()
    return summarize(args, harness.probe.batches, outs, inputs, traffic.delivered, all_answered, t, stats,
                     capacity, rate, ver_a.name, ver_b.name, out_dir, time.perf_counter() - t_start)


def summarize(args, batches, outs, inputs, delivered, all_answered, t, stats, capacity, rate, a, b, out_dir,
              wall_s) -> dict:
    from stream.canary import in_canary

    both = [x for x in batches if x.versions == {a, b}]
    scored = [outs[key] for x in both for key in x.keys if key in outs]  # (user, version)
    wrong = sum(version != (b if in_canary(user, b, args.share) else a) for user, version in scored)
    # The hash's split of every user served, not of those in two-version batches: B's few users land in those
    # far more often than A's many, which put 19% on B at a 10% share in a small run.
    users = {user for user, _ in outs.values()}
    on_b = sum(in_canary(user, b, args.share) for user in users)
    flips = _flip_flops(outs, a, b)
    windows = {"base": (t["base"], t["canary"]), "canary": (t["canary"], t["promote"]),
               "promote": (t["promote"], t["after"]), "after": (t["after"], t["end"])}
    ms = {w: [x.ms for x in batches if lo <= x.t0 < hi] for w, (lo, hi) in windows.items()}
    rebuilt = {w: sum(x.rebuild_users for x in batches if lo <= x.t0 < hi) for w, (lo, hi) in windows.items()}
    first_canary = next((x.t0 for x in batches if b in x.versions), None)
    first_all_b = next((x.t0 for x in batches if x.versions == {b} and x.t0 >= t["promote"]), None)
    dropped = len(inputs - set(outs)) if len(inputs) == delivered else None
    top = lambda w: max(ms[w]) if ms[w] else None  # noqa: E731
    # The broker's round trips grow with what it holds (Tansu keeps it all in memory), so the base is the
    # windows before and after, bracketing the canary and the promotion.
    base_max = max(ms["base"] + ms["after"], default=None)
    ratio = lambda w: round(top(w) / base_max, 2) if top(w) and base_max else None  # noqa: E731
    slowest = {w: [describe(x, t[w]) for x in sorted((x for x in batches if lo <= x.t0 < hi), key=lambda x: -x.ms)[:3]]
               for w, (lo, hi) in windows.items() if w in ("canary", "promote")}
    marks = [(t["canary"], "announce canary", "tab:red"), (t["promote"], "announce promotion", "tab:purple")]
    marks += [(x, label, "tab:orange") for x, label in ((first_canary, "canary serves"), (first_all_b, "B serves all"))
              if x is not None]
    png = out_dir / "canary_batch_latency.png"
    plot(batches, batches[0].t0 if batches else t["base"], marks,
         [((lo, hi), f"{w} window", color) for (w, (lo, hi)), color in
          zip(windows.items(), ("tab:blue", "tab:red", "tab:purple", "tab:cyan"))], png,
         title="Worker batch latency: a canary, then its promotion (bench/canary_swap.py)")
    targets = {"dropped": dropped == 0 and all_answered, "wrong_side_records": wrong == 0, "flip_flops": flips == 0,
               "latency": all(r is not None and r <= 2 for r in (ratio("canary"), ratio("promote")))}
    targets["all"] = all(targets.values())
    return {
        "dropped": dropped, "wrong_side_records": wrong, "flip_flops": flips,
        "records_in_two_version_batches": sum(len(x.keys) for x in both), "two_version_batches": len(both),
        "canary_users_share": round(on_b / len(users), 4) if users else None, "share": args.share,
        **{f"batch_ms_{w}_{q}": (round(top(w), 1) if q == "max" and top(w) else pct(ms[w], int(q[1:])) if q != "max"
                                 else None) for w in windows for q in ("max", "p50", "p99")},
        **{f"batches_{w}": len(ms[w]) for w in windows},
        "max_ratio_canary_to_base": ratio("canary"), "max_ratio_promote_to_base": ratio("promote"),
        "slowest_batches": slowest,
        "announce_to_canary_s": None if first_canary is None else round(first_canary - t["canary"], 3),
        "announce_to_promotion_s": None if first_all_b is None else round(first_all_b - t["promote"], 3),
        **{f"prebuilt_{k}": s.last_prebuilt for k, s in (("canary", stats["canary"]), ("promotion", stats["promote"]))},
        **{f"prebuild_s_{k}": None if s.last_prebuild_s is None else round(s.last_prebuild_s, 3)
           for k, s in (("canary", stats["canary"]), ("promotion", stats["promote"]))},
        **{f"rebuild_users_{w}": rebuilt[w] for w in ("canary", "promote", "after")},
        "targets_met": targets, "plot": str(png),
        "users": args.users, "items": args.items, "hidden": args.hidden, "history_length": H,
        "capacity_events_per_s": round(capacity), "rate_events_per_s": round(rate), "events_delivered": delivered,
        "all_answered_within_60s": all_answered, "wall_s": round(wall_s, 1),
    }


def _flip_flops(outs: dict, a: str, b: str) -> int:
    """Users whose records, in input order per partition, go back from B to A."""
    on_b, flips = set(), set()
    for (_, _), (user, version) in sorted(outs.items()):
        if version == b:
            on_b.add(user)
        elif version == a and user in on_b:
            flips.add(user)
    return len(flips)


if __name__ == "__main__":
    exit_on_sigterm()
    sys.exit(exit_status(main, Path(__file__).name))
