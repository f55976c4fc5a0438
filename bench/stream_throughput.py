"""Streaming worker throughput and latency on this machine; prints ONE JSON object.

    python bench/stream_throughput.py [--events 30000] [--users 3000] [--items 20000] [--hidden 64] [--device cpu]

Measured in one run, against the local broker (Tansu) and real RocksDB files:
  model_only_events_per_s          Recommender.recommend alone, in-memory states, fed the same
                                   sequence of batch sizes the end-to-end run consumed
  end_to_end_events_per_s          the worker (own process), input pre-loaded: first batch consumed
                                   to last batch's recommendations delivered and committed
  ratio                            end-to-end / model-only
  p50_ms, p99_ms                   event produced -> its recommendation received by a consumer,
                                   at about half the end-to-end rate
  event_to_emit_p50_ms, _p99_ms    the first part of it: event produced -> recommendation produced by
                                   the worker (its emitted_at): the hop in, the wait for a batch, the step
  broker_only_hop_p50_ms, _p99_ms  the same producer and consumer with no worker: one broker hop
                                   at the same rate (the worker path has two hops)
  per_event_baseline_events_per_s  the same worker with batch_size 1: a store get/put, one model
                                   step, a produce, a flush and a commit per event
  peak_rss_mb                      the largest worker process's peak resident memory
The model version has random weights of the right shape (serving cost does not depend on
what the weights learned).
"""
from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import resource
import sys
import tempfile
import threading
import time
import uuid
from pathlib import Path

import msgspec
import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from stream.cli_common import exit_on_sigterm  # noqa: E402
from model.errors import exit_status  # noqa: E402
from model.events import Event, encode_event  # noqa: E402

# Tansu answers an empty fetch only after the consumer's fetch.wait.max.ms (librdkafka default 500 ms)
# even when records arrive meanwhile; Apache Kafka answers as soon as data is there. The group join
# takes about session.timeout.ms / 2 on Tansu.
def consumer_settings(fetch_wait_ms: int) -> dict[str, str]:
    return {"session.timeout.ms": "6000", "heartbeat.interval.ms": "500", "fetch.wait.max.ms": str(fetch_wait_ms)}


def make_model(registry: Path, n_items: int, hidden: int) -> str:
    import torch

    from model.artifact import save_version
    from model.config import DataConfig, HRNNConfig
    from model.network import HRNN

    torch.manual_seed(0)
    cfg = HRNNConfig(hidden_dimension=hidden)
    items = [f"item-{i}" for i in range(n_items)]
    return save_version(registry, HRNN(n_items, cfg).eval(), cfg, DataConfig(), items, ["click", "purchase"]).name


def check_hidden(ap: argparse.ArgumentParser, hidden: int) -> None:
    """A --hidden outside HRNNConfig's range is a usage error, said before the broker starts: the version
    would be written, and then refused by the worker process that loads it ("worker process died")."""
    from model.config import HRNNConfig
    from model.errors import ConfigError

    try:
        HRNNConfig(hidden_dimension=hidden).validate()
    except ConfigError as exc:
        ap.error(f"--hidden: {exc}")


def check_counts(ap: argparse.ArgumentParser, args: argparse.Namespace, *flags: str) -> None:
    """A count below 1 (no user, no item, batches of nothing) is a usage error, said before anything starts:
    it crashed mid-run, after the broker had started."""
    for flag in flags:
        if getattr(args, flag) < 1:
            ap.error(f"--{flag.replace('_', '-')} must be >= 1, got {getattr(args, flag)}")


def make_events(n: int, n_users: int, n_items: int, seed: int, start_ms: int) -> list[Event]:
    rng = np.random.default_rng(seed)
    users = rng.integers(0, n_users, n)
    items = (rng.zipf(1.2, n) - 1) % n_items
    purchase = rng.random(n) < 0.05
    gaps = np.where(rng.random(n) < 0.1, 3_600_000, rng.integers(1_000, 60_000, n))
    ts = start_ms + np.cumsum(gaps // 50)
    return [Event(f"user-{u}", f"item-{i}", "purchase" if p else "click", int(t), event_id=f"e{j}")
            for j, (u, i, p, t) in enumerate(zip(users, items, purchase, ts))]


def settings(bootstrap: str, registry: Path, state_dir: Path, args, batch_size: int | None = None):
    from stream.settings import WorkerSettings

    name = uuid.uuid4().hex[:8]
    return WorkerSettings(bootstrap_servers=bootstrap, registry=str(registry), state_dir=str(state_dir),
                          input_topic=f"ev-{name}", output_topic=f"rec-{name}", group=f"grp-{name}",
                          partitions=args.partitions, batch_size=batch_size or args.batch_size,
                          batch_timeout_s=args.batch_timeout, k=25, device=args.device, follow_updates=False,
                          torch_threads=args.torch_threads,
                          kafka_consumer=consumer_settings(args.fetch_wait_ms))


def produce_records(bootstrap: str, topic: str, records: list[tuple[bytes, bytes]]) -> float:
    """Write pre-encoded (key, value) records as fast as the producer goes; returns records/s, from the first
    record produced, the producer ready, to the last acknowledged."""
    from stream.kafka_clients import produce_waiting

    p = ready_producer(bootstrap, topic, {"linger.ms": 20, "batch.num.messages": 10000})
    start = time.perf_counter()
    for key, value in records:
        produce_waiting(p, topic, value, key)
        p.poll(0)
    assert p.flush(60) == 0
    return len(records) / (time.perf_counter() - start)


def ready_producer(bootstrap: str, topic: str, extra: dict, timeout_s: float = 30.0):
    """A producer that knows `topic`'s partitions and holds its producer id. librdkafka asks for the id (the
    producer is idempotent) on a timer, up to ~0.5 s after the start, and holds every record until then: a
    rate timed from the producer's creation was mostly that wait (2,000 records "written at 3,944/s")."""
    from confluent_kafka import Producer

    from stream.kafka_clients import producer_config

    ready = threading.Event()

    def on_stats(stats: str) -> None:  # librdkafka's statistics are the one place that tells the id is there
        if not ready.is_set() and json.loads(stats).get("eos", {}).get("idemp_state") == "Assigned":
            ready.set()

    p = Producer(producer_config(bootstrap, {**extra, "statistics.interval.ms": 20, "stats_cb": on_stats}))
    p.list_topics(topic, timeout=timeout_s)
    deadline = time.monotonic() + timeout_s
    while not ready.is_set():
        if time.monotonic() > deadline:
            raise RuntimeError(f"the producer got no producer id from {bootstrap} within {timeout_s:.0f} s")
        p.poll(0.01)
    return p


def produce_all(bootstrap: str, topic: str, events: list[Event]) -> None:
    produce_records(bootstrap, topic, [(e.user_id.encode(), encode_event(e)) for e in events])


# ---- the worker process -----------------------------------------------------------------------

def timed_worker(s):
    """A Worker that records when its first batch began and its last ended, each batch's size and step time."""
    from stream.worker import Worker

    class Timed(Worker):
        first = last = None

        def process_batch(self, msgs):
            start = time.perf_counter()
            if self.first is None:
                self.first = start
            result = super().process_batch(msgs)
            self.last = time.perf_counter()
            self.sizes.append(len(msgs))
            self.steps.append(self.last - start)
            return result

    w = Timed(s)
    w.sizes, w.steps = [], []
    return w


def worker_main(s, target: int, stop, ready, out) -> None:
    """Run a worker until it has recommended `target` events (0: until `stop`); report timings."""
    from stream.worker import gc_threshold_for, tune_process_gc

    w = timed_worker(s)
    tune_process_gc(gc_threshold_for(s))  # what `hrnn serve` does
    w.start()
    while not w.assigned.is_set():
        w.poll_once()
    ready.set()
    while not stop.is_set() and not (target and w.totals.recommendations >= target):
        w.poll_once()
    w.close()
    out.put({"first": w.first, "last": w.last, "sizes": w.sizes, "steps": w.steps, "recommendations": w.totals.recommendations,
             "batches": w.totals.batches, "peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024})


def run_worker(s, target: int, before_start=None, while_running=None) -> dict:
    ctx = mp.get_context("spawn")
    stop, ready, out = ctx.Event(), ctx.Event(), ctx.Queue()
    if before_start:
        before_start()
    proc = ctx.Process(target=worker_main, args=(s, target, stop, ready, out))
    proc.start()
    try:
        deadline = time.monotonic() + 120
        while not ready.wait(0.2):
            if not proc.is_alive() or time.monotonic() > deadline:
                raise RuntimeError(f"worker process {'died' if not proc.is_alive() else 'got no partitions'}")
        if while_running:
            while_running()
            stop.set()
        return out.get(timeout=600)
    finally:
        stop.set()
        proc.join(60)
        if proc.is_alive():
            proc.kill()


# ---- the phases --------------------------------------------------------------------------------

def model_only(registry: Path, events: list[Event], sizes: list[int], torch_threads: int, device: str) -> float:
    import torch

    from model.artifact import latest_version_dir
    from model.inference import Filters, Recommender, StepInput

    if torch_threads:
        torch.set_num_threads(torch_threads)
    rec = Recommender.load(latest_version_dir(registry), device)
    states: dict = {}
    steps = [StepInput(e.user_id, e.item_id, e.event_type, e.timestamp_ms, e.session_id) for e in events]
    start, i = time.perf_counter(), 0
    for size in sizes:
        batch = steps[i:i + size]
        i += size
        out = rec.recommend({e.user_id: states.get(e.user_id) for e in batch}, batch, k=25, filters=Filters())
        states.update(out.states)
    return i / (time.perf_counter() - start)


def end_to_end(bootstrap: str, registry: Path, root: Path, events: list[Event], args) -> dict:
    s = settings(bootstrap, registry, root / "e2e", args)
    report = run_worker(s, len(events), before_start=lambda: _create_and_fill(s, events))
    report["events_per_s"] = report["recommendations"] / (report["last"] - report["first"])
    return report


def create_topics(s) -> None:
    """The worker's topics for settings `s`, with s.partitions partitions."""
    from stream.kafka_clients import admin_client
    from stream.topics import ensure_topics, standard_topics

    ensure_topics(admin_client(s.bootstrap_servers),
                  standard_topics(s.input_topic, s.output_topic, s.group, s.partitions))


def _create_and_fill(s, events: list[Event]) -> None:
    create_topics(s)
    produce_all(s.bootstrap_servers, s.input_topic, events)


class _Stamp(msgspec.Struct):
    event_timestamp: int  # the only fields the latency reader needs; the rest is skipped unparsed
    emitted_at: int  # when the worker produced the recommendation: splits the latency in two


class _EventStamp(msgspec.Struct):
    timestamp: int


def drive(bootstrap: str, args, rate: float, in_topic: str, out_topic: str, stamp_type: type
          ) -> tuple[list[float], list[float]]:
    """Produce events at `rate`/s into in_topic with the wall clock as event time, and return, for
    each record read back from out_topic, receive time - event time (ms), in arrival order, and
    (records with emitted_at) emitted_at - event time.

    It shares the CPU with the worker and the broker, so it stays lean: it produces the events
    that are due every few milliseconds and decodes only the timestamp of what it reads."""
    from confluent_kafka import Consumer, Producer, TopicPartition

    from stream.kafka_clients import consumer_config, producer_config

    n = int(rate * args.latency_seconds)
    template = make_events(n, args.users, args.items, seed=2, start_ms=0)
    lat: list[float] = []
    to_emit: list[float] = []
    decode = msgspec.json.Decoder(stamp_type).decode
    field = next(iter(stamp_type.__struct_fields__))
    tail = Consumer(consumer_config(bootstrap, f"tail-{uuid.uuid4().hex[:6]}",
                                    {"fetch.wait.max.ms": args.fetch_wait_ms}))
    tail.assign([TopicPartition(out_topic, p, 0) for p in range(args.partitions)])

    def read() -> None:
        # consume(n, t) returns only when n records are there or t has passed, which would add up to
        # t to every latency: take what is fetched, else wait for the first record only.
        deadline = time.monotonic() + args.latency_seconds + 60
        while len(lat) < n and time.monotonic() < deadline:
            for m in tail.consume(1000, 0) or tail.consume(1, 0.05):
                if m.error() is None:
                    stamp = decode(m.value())
                    lat.append(time.time() * 1000 - getattr(stamp, field))
                    if hasattr(stamp, "emitted_at"):
                        to_emit.append(stamp.emitted_at - stamp.event_timestamp)

    reader = threading.Thread(target=read, daemon=True)
    reader.start()
    p = Producer(producer_config(bootstrap, {"linger.ms": 1}))
    start, sent = time.monotonic(), 0
    while sent < n:
        due = min(n, int((time.monotonic() - start) * rate) + 1)
        now_ms = int(time.time() * 1000)
        for e in template[sent:due]:
            p.produce(in_topic, encode_event(Event(e.user_id, e.item_id, e.event_type, now_ms)), e.user_id.encode())
        sent = due
        p.poll(0)
        time.sleep(0.002)
    p.flush(30)
    reader.join(args.latency_seconds + 60)
    tail.close()
    return lat, to_emit


def percentiles(lat: list[float]) -> dict:
    arr = np.array(lat[len(lat) // 10:])  # skip the warm-up tenth
    return {"p50_ms": float(np.percentile(arr, 50)), "p99_ms": float(np.percentile(arr, 99)), "received": len(lat)}


def latency(bootstrap: str, registry: Path, root: Path, args, rate: float) -> dict:
    """Event produced -> its recommendation read back, with the worker in between."""
    s = settings(bootstrap, registry, root / "lat", args)
    got: list[tuple[list[float], list[float]]] = []
    report = run_worker(s, 0, before_start=lambda: _create_and_fill(s, []),
                        while_running=lambda: got.append(drive(bootstrap, args, rate, s.input_topic,
                                                               s.output_topic, _Stamp)))
    lat, to_emit = got[0] if got else ([], [])
    report.update(percentiles(lat), latencies_ms=lat, to_emit=percentiles(to_emit) if to_emit else None)
    return report


def broker_hop(bootstrap: str, args, rate: float) -> dict:
    """The same driver with no worker: event produced -> the same event read back (one broker hop;
    the worker path has two)."""
    from stream.kafka_clients import admin_client
    from stream.topics import TopicSpec, ensure_topics

    topic = f"hop-{uuid.uuid4().hex[:8]}"
    ensure_topics(admin_client(bootstrap), [TopicSpec(topic, args.partitions)])
    return percentiles(drive(bootstrap, args, rate, topic, topic, _EventStamp)[0])


def per_event(bootstrap: str, registry: Path, root: Path, events: list[Event], args) -> dict:
    s = settings(bootstrap, registry, root / "one", args, batch_size=1)
    report = run_worker(s, len(events), before_start=lambda: _create_and_fill(s, events))
    report["events_per_s"] = report["recommendations"] / (report["last"] - report["first"])
    return report


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--events", type=int, default=30_000)
    ap.add_argument("--users", type=int, default=3_000)
    ap.add_argument("--items", type=int, default=20_000)
    ap.add_argument("--hidden", type=int, default=64)
    ap.add_argument("--batch-size", type=int, default=500)
    ap.add_argument("--device", default="cpu", help="where the worker (and the model-only run) scores: cpu, cuda, auto")
    ap.add_argument("--partitions", type=int, default=3)
    ap.add_argument("--batch-timeout", type=float, default=0.01, help="the worker's batch_timeout_s")
    ap.add_argument("--torch-threads", type=int, default=1,
                    help="model CPU threads, the same for model-only and the worker (0: torch's default)")
    ap.add_argument("--fetch-wait-ms", type=int, default=10, help="consumers' fetch.wait.max.ms (see above)")
    ap.add_argument("--latency-seconds", type=float, default=10.0)
    ap.add_argument("--baseline-events", type=int, default=1_500)
    args = ap.parse_args(argv)
    if args.events < 1 or args.baseline_events < 1:  # a worker's target of 0 means "until stopped": it never ends
        ap.error("--events and --baseline-events must be >= 1")
    check_counts(ap, args, "users", "items", "batch_size", "partitions")
    check_hidden(ap, args.hidden)

    from model.network import device_label, resolve_device
    from stream.broker import LocalBroker

    resolve_device(args.device)  # an unusable device: exit 2 before the broker and the worker start
    load_before = os.getloadavg()[0]
    with tempfile.TemporaryDirectory() as tmp, LocalBroker() as broker:
        root = Path(tmp)
        version = make_model(root / "registry", args.items, args.hidden)
        events = make_events(args.events, args.users, args.items, seed=1, start_ms=1_767_225_600_000)
        e2e = end_to_end(broker.bootstrap, root / "registry", root, events, args)
        model_rate = model_only(root / "registry", events, e2e["sizes"], args.torch_threads, args.device)
        lat = latency(broker.bootstrap, root / "registry", root, args, e2e["events_per_s"] / 2)
        hop = broker_hop(broker.bootstrap, args, e2e["events_per_s"] / 2)
        one = per_event(broker.bootstrap, root / "registry", root, events[:args.baseline_events], args)
    result = {
        "model_only_events_per_s": round(model_rate, 1),
        "end_to_end_events_per_s": round(e2e["events_per_s"], 1),
        "ratio": round(e2e["events_per_s"] / model_rate, 3),
        "p50_ms": round(lat["p50_ms"], 1),
        "p99_ms": round(lat["p99_ms"], 1),
        "latency_rate_events_per_s": round(e2e["events_per_s"] / 2, 1),
        "latency_events_received": lat["received"],
        # Its first part: event produced -> the worker produced the recommendation (hop in, waiting for
        # the batch, the step); the rest is the flush, the commit and the hop out.
        "event_to_emit_p50_ms": round(lat["to_emit"]["p50_ms"], 1) if lat["to_emit"] else None,
        "event_to_emit_p99_ms": round(lat["to_emit"]["p99_ms"], 1) if lat["to_emit"] else None,
        # The broker alone at the same rate, one hop (the worker path has two: in and out).
        "broker_only_hop_p50_ms": round(hop["p50_ms"], 1), "broker_only_hop_p99_ms": round(hop["p99_ms"], 1),
        "per_event_baseline_events_per_s": round(one["events_per_s"], 1),
        "end_to_end_over_baseline": round(e2e["events_per_s"] / one["events_per_s"], 1),
        "peak_rss_mb": round(max(e2e["peak_rss_mb"], lat["peak_rss_mb"], one["peak_rss_mb"]), 1),
        "mean_batch_size": round(float(np.mean(e2e["sizes"])), 1),
        "events": args.events, "users": args.users, "items": args.items, "hidden": args.hidden, "k": 25,
        "batch_size": args.batch_size, "batch_timeout_s": args.batch_timeout, "partitions": args.partitions,
        "consumer_fetch_wait_max_ms": args.fetch_wait_ms, "torch_threads": args.torch_threads, "model_version": version,
        "step_ms_p50_e2e": round(float(np.percentile(e2e["steps"], 50)) * 1000, 1),
        "step_ms_p50_at_half_load": round(float(np.percentile(lat["steps"], 50)) * 1000, 1),
        "mean_batch_at_half_load": round(float(np.mean(lat["sizes"])), 1),
        "model": "random weights of the right shape (serving cost does not depend on training)",
        "broker": "Tansu (local, in memory)", "device": device_label(args.device), "cpu_cores": os.cpu_count(),
        # Other work on the machine shows here; every figure above moves with it.
        "loadavg_1m_before": round(load_before, 2), "loadavg_1m_after": round(os.getloadavg()[0], 2),
    }
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    exit_on_sigterm()
    sys.exit(exit_status(main, Path(__file__).name))
