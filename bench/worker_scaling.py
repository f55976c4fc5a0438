"""Worker processes on one host: how the stream's throughput grows with them; prints ONE JSON object and a PNG.

    python bench/worker_scaling.py [--workers 1,2,4] [--device cpu] [--events 40000] [--partitions 8]
                                   [--users 20000] [--items 20000] [--hidden 64] [--png /tmp/worker_scaling.png]

One worker process is bound by its own Python work per event (bench/serving_scale.py), so a host with
more cores, or a GPU that one process leaves idle, serves more with several `hrnn serve` processes in
one group, each with its own state directory. For each count N: N workers (own processes, --device,
one torch thread each) join a fresh group on a fresh input topic of --partitions partitions; once
every one holds partitions and the assignment is settled, --events events are produced as fast as
the producer goes, and the run ends when all are recommended.
  events_per_s        recommendations / (the first batch begun .. the last batch done), over all workers
  speedup             events_per_s / the first count's figure of this run
  per_worker          each worker's partitions, recommendations and mean batch size
  produce_events_per_s  how fast the input was written (from the first record, the producer connected and
                      holding its producer id, to the last acknowledged): throughput near it means the
                      producer bound it
  peak_rss_mb         the largest worker's peak resident memory; on CUDA also its peak reserved GPU memory
Against the local broker (Tansu, in memory), which shares the host's cores with the workers; the
model version has random weights of the right shape (as in bench/stream_throughput.py).
"""
from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import resource
import sys
import tempfile
import time
from dataclasses import replace
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from stream.cli_common import exit_on_sigterm  # noqa: E402
from model.errors import exit_status  # noqa: E402
from model.events import encode_event  # noqa: E402
from stream_throughput import (check_hidden, create_topics, make_events, make_model, produce_records,  # noqa: E402
                               settings, timed_worker)

SETTLED_S = 3.0  # the assignment unchanged this long counts as settled (a Tansu rebalance takes ~3 s)


def log(*args) -> None:
    print(*args, file=sys.stderr, flush=True)


def _ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x.strip()]


def worker_proc(s, slot: int, held, done, stop, out) -> None:
    """One worker: publishes how many partitions it holds and how many events it recommended."""
    import torch

    from stream.worker import gc_threshold_for, tune_process_gc

    w = timed_worker(s)
    tune_process_gc(gc_threshold_for(s))  # what `hrnn serve` does
    w.start()
    while not stop.is_set():
        w.poll_once()
        held[slot], done[slot] = len(w.stores.partitions), w.totals.recommendations
    w.close()
    gpu = torch.cuda.max_memory_reserved() / 2**20 if torch.cuda.is_initialized() else None
    out.put({"slot": slot, "first": w.first, "last": w.last, "recommendations": w.totals.recommendations,
             "partitions": held[slot], "mean_batch": float(np.mean(w.sizes)) if w.sizes else 0.0,
             "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, "gpu_reserved_mb": gpu})


def wait_settled(held, n: int, partitions: int, procs, deadline_s: float = 180) -> float:
    """Seconds until every worker holds partitions, together all of them, unchanged for SETTLED_S."""
    start = last_change = time.monotonic()
    seen = None
    while True:
        now, view = time.monotonic(), list(held[:n])
        if view != seen:
            seen, last_change = view, now
        if sum(view) == partitions and min(view) > 0 and now - last_change >= SETTLED_S:
            return now - start
        if not all(p.is_alive() for p in procs) or now - start > deadline_s:
            raise RuntimeError(f"{n} workers did not settle on {partitions} partitions (held {view})")
        time.sleep(0.1)


def run(n: int, bootstrap: str, registry: Path, root: Path, records, args) -> dict:
    base = settings(bootstrap, registry, root, args)  # a fresh topic and group for this count
    create_topics(base)
    ctx = mp.get_context("spawn")
    held, done = ctx.Array("i", n), ctx.Array("l", n)
    stop, out = ctx.Event(), ctx.Queue()
    procs = [ctx.Process(target=worker_proc, args=(replace(base, state_dir=str(root / f"n{n}-w{i}")), i, held, done,
                                                   stop, out)) for i in range(n)]
    for p in procs:
        p.start()
    try:
        settle_s = wait_settled(held, n, args.partitions, procs)
        produce_rate = produce_records(bootstrap, base.input_topic, records)
        deadline = time.monotonic() + 600
        while sum(done[:n]) < len(records):
            if time.monotonic() > deadline or not all(p.is_alive() for p in procs):
                raise RuntimeError(f"{n} workers recommended {sum(done[:n])} of {len(records)} events")
            time.sleep(0.05)
        stop.set()
        reports = sorted((out.get(timeout=120) for _ in procs), key=lambda r: r["slot"])
    finally:
        stop.set()
        for p in procs:
            p.join(60)
            if p.is_alive():
                p.kill()
    span = max(r["last"] for r in reports if r["last"]) - min(r["first"] for r in reports if r["first"])
    gpu = [r["gpu_reserved_mb"] for r in reports if r["gpu_reserved_mb"] is not None]
    return {"workers": n, "events_per_s": round(sum(r["recommendations"] for r in reports) / span, 1),
            "produce_events_per_s": round(produce_rate, 1), "settle_s": round(settle_s, 1),
            "per_worker": [{"partitions": r["partitions"], "recommendations": r["recommendations"],
                            "mean_batch": round(r["mean_batch"], 1)} for r in reports],
            "peak_rss_mb": round(max(r["peak_rss_mb"] for r in reports), 1),
            "gpu_reserved_mb": round(max(gpu), 1) if gpu else None}


def plot(rows: list[dict], device: str, path: Path) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from model.plots import save_figure

    n = [r["workers"] for r in rows]
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    ax.plot(n, [r["events_per_s"] for r in rows], marker="o", label="measured")
    ax.plot(n, [rows[0]["events_per_s"] * k / rows[0]["workers"] for k in n], ls="--", color="grey",
            label="linear from the first")
    ax.set_xticks(n)
    ax.set_xlabel("worker processes")
    ax.set_ylabel("events / s (end to end)")
    ax.set_title(f"Worker processes on one host ({device}, {os.cpu_count()} cores)", fontsize=10)
    ax.grid(True, alpha=0.3)
    ax.legend()
    return save_figure(fig, path, dpi=120)


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--workers", type=_ints, default=[1, 2], help="worker counts, comma list")
    ap.add_argument("--device", default="cpu", help="where every worker scores: cpu, cuda, auto")
    ap.add_argument("--events", type=int, default=40_000)
    ap.add_argument("--users", type=int, default=20_000)
    ap.add_argument("--items", type=int, default=20_000)
    ap.add_argument("--hidden", type=int, default=64)
    ap.add_argument("--partitions", type=int, default=8)
    ap.add_argument("--batch-size", type=int, default=500)
    ap.add_argument("--batch-timeout", type=float, default=0.01, help="the workers' batch_timeout_s")
    ap.add_argument("--fetch-wait-ms", type=int, default=10, help="consumers' fetch.wait.max.ms")
    ap.add_argument("--png", default="/tmp/worker_scaling.png")
    args = ap.parse_args(argv)
    if args.events < 1:  # no events: no batch to time, and nothing for the workers to end on
        ap.error("--events must be >= 1")
    check_hidden(ap, args.hidden)
    args.torch_threads = 1  # one per process: the processes are the parallelism here

    from model.errors import ConfigError
    from model.network import device_label, resolve_device
    from stream.broker import LocalBroker

    dev = resolve_device(args.device)  # an unusable device: exit 2 before the broker and the workers start
    if not args.workers or min(args.workers) < 1 or max(args.workers) > args.partitions:
        raise ConfigError(f"--workers {args.workers}: each count must lie in [1, --partitions = {args.partitions}]")
    events = make_events(args.events, args.users, args.items, seed=1, start_ms=1_767_225_600_000)
    records = [(e.user_id.encode(), encode_event(e)) for e in events]
    rows: list[dict] = []
    load_before = os.getloadavg()[0]
    with tempfile.TemporaryDirectory() as tmp, LocalBroker() as broker:
        registry = Path(tmp) / "registry"
        version = make_model(registry, args.items, args.hidden)
        for n in args.workers:
            rows.append(run(n, broker.bootstrap, registry, Path(tmp), records, args))
            rows[-1]["speedup"] = round(rows[-1]["events_per_s"] / rows[0]["events_per_s"], 2)
            log(f"{n} workers: {rows[-1]['events_per_s']:,.0f} events/s (x{rows[-1]['speedup']}), "
                f"input written at {rows[-1]['produce_events_per_s']:,.0f}/s")
    device = device_label(dev) if dev.type == "cuda" else "cpu, 1 thread per worker"
    chart = plot(rows, device, Path(args.png))
    print(json.dumps({"rows": rows, "device": device, "events": args.events, "users": args.users,
                      "items": args.items, "hidden": args.hidden, "partitions": args.partitions,
                      "batch_size": args.batch_size, "torch_threads_per_worker": 1, "model_version": version,
                      "broker": "Tansu (local, in memory)", "cpu_cores": os.cpu_count(), "chart": str(chart),
                      "loadavg_1m_before": round(load_before, 2), "loadavg_1m_after": round(os.getloadavg()[0], 2)}))
    return 0


if __name__ == "__main__":
    exit_on_sigterm()
    sys.exit(exit_status(main, Path(__file__).name))
