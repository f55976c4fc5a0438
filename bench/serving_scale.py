"""Model-only serving cost by device, catalogue size and batch size; prints ONE JSON object and a PNG.

    python bench/serving_scale.py [--devices auto] [--items 20000,200000] [--batches 1,16,128,1024]
                                  [--hidden 128] [--seconds 2] [--threads 0] [--stored]
                                  [--unavailable 0,0.05] [--png /tmp/serving_scale.png]

What the worker's scoring step costs: `Recommender.recommend` over a batch of events of distinct
users (as the worker batches them), each user with a stored state whose last-H window is full
(H = 100, the repeat head on, as the network of the reddit figures serves), top 25 out, purchases
filtered. So the catalogue-wide work (scores for every item, the window's rescoring, top-k) grows with the
batch and the catalogue, which is where a GPU can pay. Random weights of the right shape: the
cost does not depend on what they learned. No broker, no RocksDB: bench/stream_throughput.py
measures the whole worker (`--device cuda` there too).

Per device ("auto": the CPU, and CUDA where present), catalogue size and batch size:
  events_per_s   batch / median seconds per call
  ms_p50, ms_p99 seconds per call (recommend returns lists, so a GPU call is synchronised)
  peak_rss_mb    this process's peak resident memory so far (resource.getrusage): it only grows over the
                 run, so it is one point's own peak in a run of one catalogue and one batch size
The process's cycle collector is tuned as `hrnn serve` tunes it (stream.worker.tune_process_gc).
With --stored, each call also decodes the users' stored states and encodes the new ones, as a worker
batch does around RocksDB. Every batch size starts from the same warm states. --unavailable takes shares
of the catalogue to take off sale (random items, left out of every list as the worker leaves out the items
of the availability topic); each share is timed at every point, one after the other.
Calls repeat for --seconds (at least 5) after one untimed warm-up call. A catalogue's version is
built once and moved to each device; its parameters' size is reported (model_mb).
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from model.errors import exit_status  # noqa: E402

HISTORY = 100
BASE_MS = 1_767_225_600_000


def log(*args) -> None:
    print(*args, file=sys.stderr, flush=True)


def _ints(text: str) -> list[int]:
    values = [int(x) for x in text.split(",") if x.strip()]
    if not values or not all(x >= 1 for x in values):  # a batch or catalogue of 0 measures nothing
        raise argparse.ArgumentTypeError(f"counts must be integers >= 1, got {text!r}")
    return values


def _shares(text: str) -> list[float]:
    shares = [float(x) for x in text.split(",") if x.strip()]
    if not shares or not all(0 <= x < 1 for x in shares):
        raise argparse.ArgumentTypeError(f"shares must lie in [0, 1), got {text!r}")
    return shares


def recommender(n_items: int, hidden: int, device: str):
    import torch

    from model.artifact import LoadedModel
    from model.config import DataConfig, HRNNConfig
    from model.inference import Recommender
    from model.network import HRNN

    torch.manual_seed(0)
    cfg = HRNNConfig(hidden_dimension=hidden, repeat_head=True, history_length=HISTORY)
    model = HRNN(n_items, cfg).eval().to(device)
    items = [f"item-{i}" for i in range(n_items)]
    return Recommender(LoadedModel("bench", Path("."), model, cfg, DataConfig(), items, ["click", "purchase"], {}))


def warm_states(rec, users: list[str], rng: np.random.Generator) -> dict:
    """Each user's state after HISTORY events (a full window): the histories are written, then the
    hidden states rebuilt from them in one batch (no scoring, so no users x catalogue matrix)."""
    from dataclasses import replace

    from model.state import HistoryEvent

    n, last = len(rec.item_ids), BASE_MS + (HISTORY - 1) * 60_000
    states = {}
    for u in users:
        events = [HistoryEvent(rec.item_ids[int(rng.integers(n))], BASE_MS + j * 60_000,
                               "purchase" if j % 10 == 0 else "click", j == 0) for j in range(HISTORY)]
        states[u] = replace(rec.blank_state(), history=events, session_id=f"{u}-s", last_event_ms=last,
                            session_length=HISTORY, n_events=HISTORY)
    return dict(zip(users, rec.rebuild(list(states.values()))))


def time_batches(rec, states: dict, batch: int, seconds: float, rng: np.random.Generator,
                 stored: bool = False, off_sale: frozenset[str] = frozenset()) -> list[float]:
    """Seconds per recommend call; with `stored`, each call also decodes its users' states from their
    stored bytes and encodes the new ones, as a worker batch does around RocksDB."""
    from model.inference import Filters, StepInput
    from model.state import decode_state, encode_state

    users, n, clock = list(states)[:batch], len(rec.item_ids), BASE_MS + HISTORY * 60_000
    held = {u: encode_state(states[u]) if stored else states[u] for u in users}
    times: list[float] = []
    filters = Filters(unavailable_items=off_sale)
    for call in range(10_000):
        clock += 60_000
        events = [StepInput(u, rec.item_ids[int(rng.integers(n))], "click", clock) for u in users]
        t0 = time.perf_counter()
        out = rec.recommend({u: decode_state(held[u]) if stored else held[u] for u in users}, events, k=25,
                            filters=filters)
        held = {u: encode_state(s) if stored else s for u, s in out.states.items()}
        dt = time.perf_counter() - t0
        if call:  # the first call is a warm-up (allocator, kernels)
            times.append(dt)
        if len(times) >= 5 and sum(times) >= seconds:
            break
    return times


def plot(rows: list[dict], path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from model.plots import save_figure

    fig, ax = plt.subplots(figsize=(8, 4.8))
    for (device, items, off), group in _groups(rows).items():
        ax.plot([r["batch"] for r in group], [r["events_per_s"] for r in group], marker="o",
                ls="-" if device.startswith("cuda") else "--",
                label=f"{device}, {items:,} items" + (f", {off:.0%} off sale" if off else ""))
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("events per batch (distinct users)")
    ax.set_ylabel("events / s (model only)")
    ax.set_title("Serving step by device and catalogue (repeat head, H=100, top 25)")
    ax.grid(True, which="both", alpha=0.3)
    ax.legend(fontsize=8)
    return save_figure(fig, path, dpi=120)


def _groups(rows: list[dict]) -> dict[tuple[str, int, float], list[dict]]:
    out: dict[tuple[str, int, float], list[dict]] = {}
    for r in rows:
        out.setdefault((r["device"], r["items"], r["unavailable"]), []).append(r)
    return out


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--devices", default="auto", help="comma list of cpu, cuda; auto: cpu and cuda if present")
    ap.add_argument("--items", type=_ints, default=[20_000, 200_000], help="catalogue sizes, comma list")
    ap.add_argument("--batches", type=_ints, default=[1, 16, 128, 1024], help="events per call, comma list")
    ap.add_argument("--hidden", type=int, default=128)
    ap.add_argument("--seconds", type=float, default=2.0, help="timed seconds per point (at least 5 calls)")
    ap.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    ap.add_argument("--stored", action="store_true",
                    help="each call also decodes and encodes its users' states (a worker batch less RocksDB, Kafka)")
    ap.add_argument("--unavailable", type=_shares, default=[0.0],
                    help="shares of the catalogue off sale, comma list in [0, 1) (default 0)")
    ap.add_argument("--png", default="/tmp/serving_scale.png")
    args = ap.parse_args(argv)
    if args.threads < 0:
        ap.error("--threads must be >= 0 (0: torch's default)")

    import torch

    from model.network import available_devices, device_label, resolve_device
    from stream.settings import WorkerSettings
    from stream.worker import gc_threshold_for, tune_process_gc

    if args.threads:
        torch.set_num_threads(args.threads)
    devices = available_devices() if args.devices == "auto" \
        else [str(resolve_device(d.strip())) for d in args.devices.split(",")]  # an unusable one: exit 2
    rng = np.random.default_rng(0)
    users = [f"user-{u}" for u in range(max(args.batches))]
    gc_threshold = gc_threshold_for(WorkerSettings(batch_size=max(args.batches)))  # as `hrnn serve` sizes it
    rows: list[dict] = []
    for n_items in args.items:
        for device in devices:
            rec = recommender(n_items, args.hidden, device)
            model_mb = sum(p.numel() * p.element_size() for p in rec.model.parameters()) / 2**20
            states = warm_states(rec, users, rng)
            tune_process_gc(gc_threshold)  # freezes the version and states built so far
            label = device_label(device)
            for batch in args.batches:
                for share in args.unavailable:
                    off_sale = frozenset(rng.choice(rec.item_ids, int(share * n_items), replace=False).tolist())
                    times = time_batches(rec, states, batch, args.seconds, rng, args.stored, off_sale)
                    med = float(np.median(times))
                    rows.append({"device": label, "items": n_items, "batch": batch, "unavailable": share,
                                 "calls": len(times), "events_per_s": round(batch / med, 1),
                                 "ms_p50": round(med * 1000, 2),
                                 "ms_p99": round(float(np.percentile(times, 99)) * 1000, 2),
                                 "model_mb": round(model_mb, 1),
                                 "peak_rss_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)})
                    log(f"{label:>28} {n_items:>9,} items  batch {batch:>5}, {share:.0%} off sale: "
                        f"{batch / med:>11,.0f} events/s ({med * 1000:.2f} ms per call)")
            del rec, states
            if device.startswith("cuda"):
                torch.cuda.empty_cache()
    chart = plot(rows, Path(args.png))
    print(json.dumps({"rows": rows, "hidden": args.hidden, "history_length": HISTORY, "k": 25,
                      "repeat_head": True, "stored": args.stored, "torch_version": torch.__version__,
                      "torch_threads": torch.get_num_threads(), "cpu_cores": os.cpu_count(), "chart": str(chart),
                      "loadavg_1m": round(os.getloadavg()[0], 2)}))
    return 0


if __name__ == "__main__":
    sys.exit(exit_status(main, Path(__file__).name))
