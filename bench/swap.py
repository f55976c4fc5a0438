"""Hot swap end to end: broker -> worker -> swap mid-stream; prints ONE JSON object.

    python bench/swap.py [--items 20000] [--hidden 64] [--users 2000] [--rate 0] [--base-s 15] [--swap-s 15]
                         [--torch-threads 1] [--out-dir /tmp/swap_bench]

One run, everything on 127.0.0.1, stopping by itself (70-80 s on the shared 2-core dev
machine; step times swing with other processes' load, so compare runs taken back to back):

  setup     versions A (CURRENT) and B of a random-weight HRNN (--items catalogue, --hidden),
            same catalogue, different weights (serving cost does not depend on what the weights
            learned). --users users get a stored state of exactly H=100 events (the last-H history
            the rebuild replays; HRNNConfig.history_length), written straight into the worker's
            RocksDB stores with hidden states computed by A (Recommender.rebuild over the history),
            so the pre-load costs seconds instead of pushing users x 100 events through Kafka.
            Events are produced with an explicit partition (crc32(user) % --partitions) so the
            seeded store of each user is the one the worker reads.
  broker    `LocalBroker` (Tansu, memory only) on a free loopback port; a `Worker` (the real one:
            RocksDB, changelog, commits, following hrnn.model-updates) runs in a thread of this
            process, with `torch_threads=--torch-threads`.
  calibrate a burst of --calib-events as fast as possible; capacity = events / (first batch
            start -> last batch end), full batches; the steady rate is half of it (or --rate), capped at --max-rate
            (default 1000/s, so a base window on a loaded box is not already running behind).
  base      --base-s seconds at the steady rate on A (after --settle-s s not counted).
  swap      B is announced on hrnn.model-updates (stream.announce.announce, what
            `hrnn models promote` sends) while producing; the worker's ModelHolder loads and
            validates B in the background and swaps between two batches; --swap-s seconds from
            the announcement.
  base after --base-after-s seconds more on B, nothing under way: a second base window. The
            broker's round trips grow with the data it holds (Tansu keeps everything in memory;
            batch times drift up over a run), so a base taken only before the swap would count
            that drift against the swap; bracketing the swap window with two base windows does not.
  new item  a never-seen item NEW_ITEM takes --new-item-share of the events (the demo's 8 %); once
            --new-item-min-events of it were produced (400: 2 % of the retrain window, a trending
            item; with 150, 0.75 %, whether the 1-epoch retrain ranked it in anybody's top 25
            depended on the draw, and an unanswered item kept the traffic going to the
            timeout, which Tansu did not keep up with), a small retrain (model.pipeline.train_version,
            --retrain-epochs epochs, hidden --hidden, no holdout) runs in a child process on the
            newest --retrain-events archived events (seeded histories + everything produced so far,
            the new item included) into the same registry; the version is announced and swapped
            in; producing goes on until a recommendation naming NEW_ITEM was emitted (or
            --new-item-timeout-s).
  drain     production stops; wait until the worker answered every delivered event (or 60 s);
            input and output topics are read back from the beginning.

Instrumentation (bench-only, in this process): the worker instance's `process_batch` is wrapped
to time each batch (poll excluded: route + state load + step + produce + flush + commit + store,
the span WorkerMetrics.step_seconds observes) and to record its input (partition, offset)s;
`Recommender.recommend` and `Recommender.rebuild` are wrapped at class level, counted only on the
worker thread, to split a batch's time into model scoring and stale-state rebuilds and to see
which version scored it.

Keys of the JSON object:
  dropped                      input records (read back from the input topic) with no
                               recommendation on the output topic naming their
                               (source_partition, source_offset); null when the input topic could
                               not be read back whole (input_records != events_delivered)
  mixed_version_outputs        worker batches (the worker's own batch boundaries, observed by the
                               process_batch wrapper) whose output records carry more than one
                               model_version; a record belongs to the batch that consumed its
                               (source_partition, source_offset). Over the whole run (both swaps).
                               Also: mixed_version_outputs_by_run = the same check without batch
                               boundaries: per input partition, maximal runs of consecutive
                               offsets sharing a version must change version at most once per
                               swap (reported: version changes per partition beyond the number of
                               swaps, i.e. flip-flops), and records_not_of_batch_version = records
                               whose model_version differs from the version that scored their batch.
  max_batch_latency_ms_base    largest batch processing time in the two base windows (before the
                               announcement, on A; after the swap window, on B), each also reported
                               (max_batch_latency_ms_base_before / _after)
  max_batch_latency_ms_swap    largest batch processing time in the swap window: from the
                               announcement of B for --swap-s seconds (background load + validation
                               + prebuild of B, the swap, the batches that catch up or rebuild stale
                               states), plus any batch of the after window that still caught up or
                               rebuilt a state (a late user's first event on B)
  batch_ms_{base,swap}_{p50,p99}, batches_{base,swap}, events_per_batch_{base,swap}_mean,
  max_latency_ratio_swap_to_base, top_swap_batches / top_base_batches (the 3 slowest: seconds after
                               the swap to B, ms, events, users rebuilt, rebuild ms, model ms =
                               recommend() incl. rebuild, other ms = Kafka/RocksDB/encoding,
                               cpu ms = the worker thread's CPU time, so ms - cpu_ms is time spent
                               waiting: broker round trips, the GIL, a core taken by another
                               process; gc ms = Python garbage collection): what a slow batch
                               spent its time on
  batch_wait_ms_{base,swap}_max  the largest (wall - worker-thread CPU) of a batch per window
  e2e_latency_ms_{base,swap}_{p50,p99}  event produced -> recommendation emitted (the event's
                               timestamp is its produce time), by emit time in the two windows
  capacity_events_per_s        the calibration burst: events / (first batch start -> last batch
                               end), i.e. full batches, poll included; rate_events_per_s the steady rate
  rebuild_ms_per_user          H=100: by default (rebuild_mode "background before the swap") the
                               worker's loader thread rebuilds every stored state with B before B
                               may swap in: prebuild_s / prebuilt_states, off the batch path; a
                               user's next event then only catches up on the events since the scan
                               (catch_up_users_swap_window, catch_up_ms_per_batch_max). With
                               --prebuild-max-users 0 (rebuild_mode "in the batches"): wall time of
                               the worker's own Recommender.rebuild calls in the swap window / users
                               they rebuilt (users whose stored state names A, rebuilt by B on their
                               next event); rebuild_ms_per_user_in_batches is this figure in either
                               mode, with rebuild_users_swap_window and rebuild_history_len_mean.
  rebuild_ms_per_user_offline  Recommender.rebuild of B timed alone (no broker running) on
                               --rebuild-users seeded states in one call, and on one user
                               (rebuild_ms_single_user): the batched vs unbatched cost
  new_item_recommendable_after_s  the first NEW_ITEM event produced (wall clock) -> the emitted_at of
                               the first recommendation record naming NEW_ITEM; parts:
                               new_item_wait_s (until --new-item-min-events were produced and
                               the retrain started), retrain_s, retrain_announce_to_swap_s,
                               new_item_swap_to_first_rec_s. The demo (`hrnn demo`) reports the
                               same in its summary as new_item_first_recommended_after_s (its
                               new_item_recommendable_after_s there is first event -> swap), with
                               a bigger retrain (all history, 4 epochs); this bench measures it in
                               the same run with the small retrain described above.
  targets_met                  {dropped == 0, mixed_version_outputs == 0,
                               max_batch_latency_ms_swap <= 2 x max_batch_latency_ms_base, all}
  plot                         PNG (--out-dir) of every batch's processing time over time, by
                               serving version, the announcements and swaps marked
"""
from __future__ import annotations

import argparse
import gc
import json
import math
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import uuid
import zlib
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from stream.cli_common import exit_on_sigterm  # noqa: E402
from model.errors import exit_status  # noqa: E402

NEW_ITEM = "new-item-1"
H = 100
# Tansu answers an empty fetch only after fetch.wait.max.ms; a group join takes ~session.timeout.ms / 2.
CONSUMER = {"session.timeout.ms": "6000", "heartbeat.interval.ms": "500", "fetch.wait.max.ms": "10"}
READER = {"fetch.wait.max.ms": "10"}


def log(msg: str) -> None:
    print(f"[swap-bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def make_version(registry: Path, n_items: int, hidden: int, seed: int) -> Path:
    import torch

    from model.artifact import save_version
    from model.config import DataConfig, HRNNConfig
    from model.network import HRNN

    torch.manual_seed(seed)
    cfg = HRNNConfig(hidden_dimension=hidden, seed=seed)
    items = [f"item-{i}" for i in range(n_items)]
    return save_version(registry, HRNN(n_items, cfg).eval(), cfg, DataConfig(), items, ["click", "purchase"],
                        make_current=False)


def two_versions(work: Path, args) -> tuple[Path, Path, dict]:
    """Versions A (CURRENT) and B in `work`/registry, and the worker's settings (fresh topic names) as keywords."""
    from model.artifact import set_current

    reg = work / "registry"
    ver_a, ver_b = make_version(reg, args.items, args.hidden, 0), make_version(reg, args.items, args.hidden, 1)
    set_current(reg, ver_a.name)
    name = uuid.uuid4().hex[:8]
    return ver_a, ver_b, dict(registry=str(reg), state_dir=str(work / "state"), input_topic=f"ev-{name}",
                              output_topic=f"rec-{name}", group=f"grp-{name}", updates_topic=f"upd-{name}",
                              partitions=args.partitions, batch_size=args.batch_size,
                              torch_threads=args.torch_threads, device="cpu", kafka_consumer=dict(CONSUMER),
                              log_level="WARNING")


# ---- instrumentation ---------------------------------------------------------------------------

@dataclass
class Batch:
    t0: float  # perf_counter at start
    t1: float = 0.0
    records: int = 0
    recommendations: int = 0
    rebuilt: int = 0
    versions: set = field(default_factory=set)  # versions whose recommend() scored this batch
    model_ms: float = 0.0  # recommend() wall time, rebuilds included
    rebuild_ms: float = 0.0
    rebuild_users: int = 0
    rebuild_hist: int = 0  # summed history lengths of the rebuilt states
    catch_up_ms: float = 0.0  # prebuilt states advanced over the events since their background rebuild
    catch_up_users: int = 0
    cpu_ms: float = 0.0  # the worker thread's own CPU time in the batch (wall - cpu: waiting for I/O, GIL or a core)
    gc_ms: float = 0.0  # Python garbage collections (any thread) during the batch
    keys: list = field(default_factory=list)  # (partition, offset) consumed

    @property
    def ms(self) -> float:
        return (self.t1 - self.t0) * 1000


class Probe:
    """Times the worker's batches; see the module docstring. install() / uninstall() around the run."""

    def __init__(self) -> None:
        self.batches: list[Batch] = []
        self.cur: Batch | None = None
        self.worker_ident: int | None = None
        self.watch_item: str | None = None
        self.item_recommended_at: float | None = None  # wall time of the first batch naming watch_item
        self._orig: dict = {}
        self._gc_t0 = 0.0

    def _on_gc(self, phase: str, info: dict) -> None:
        if phase == "start":
            self._gc_t0 = time.perf_counter()
        elif self.cur is not None:
            self.cur.gc_ms += (time.perf_counter() - self._gc_t0) * 1000

    def install(self, worker) -> None:
        from model.inference import Recommender

        self._orig = {"recommend": Recommender.recommend, "rebuild": Recommender.rebuild,
                      "catch_up": Recommender.catch_up}
        orig_rec, orig_reb, probe = self._orig["recommend"], self._orig["rebuild"], self
        orig_cu = self._orig["catch_up"]

        def recommend(rec_self, states, events, **kw):
            b = probe.cur
            if b is None or threading.get_ident() != probe.worker_ident:
                return orig_rec(rec_self, states, events, **kw)
            t = time.perf_counter()
            out = orig_rec(rec_self, states, events, **kw)
            b.model_ms += (time.perf_counter() - t) * 1000
            b.versions.add(out.model_version)
            if probe.watch_item and probe.item_recommended_at is None and \
                    any(i == probe.watch_item for row in out.items for i, _ in row):
                probe.item_recommended_at = time.time()
            return out

        def timed(orig, record):
            """Wrap a state-rebuilding method: time it (worker thread only) and let `record` book it."""
            def wrapper(rec_self, items):
                b = probe.cur
                if b is None or threading.get_ident() != probe.worker_ident or not items:
                    return orig(rec_self, items)
                t = time.perf_counter()
                out = orig(rec_self, items)
                record(b, (time.perf_counter() - t) * 1000, items)
                return out
            return wrapper

        def on_rebuild(b: Batch, ms: float, states) -> None:
            b.rebuild_ms += ms
            b.rebuild_users += len(states)
            b.rebuild_hist += sum(len(s.history) for s in states)

        def on_catch_up(b: Batch, ms: float, pairs) -> None:
            b.catch_up_ms += ms
            b.catch_up_users += len(pairs)

        rebuild, catch_up = timed(orig_reb, on_rebuild), timed(orig_cu, on_catch_up)
        Recommender.recommend, Recommender.rebuild, Recommender.catch_up = recommend, rebuild, catch_up
        inner = worker.process_batch  # the bound method; poll_once calls self.process_batch

        def process_batch(msgs):
            probe.worker_ident = threading.get_ident()
            b = probe.cur = Batch(time.perf_counter())
            cpu0 = time.thread_time()
            try:
                result = inner(msgs)
            finally:
                b.t1 = time.perf_counter()
                b.cpu_ms = (time.thread_time() - cpu0) * 1000
                probe.cur = None
            b.records, b.recommendations, b.rebuilt = result.records, result.recommendations, result.rebuilt_states
            b.keys = [(m.partition(), m.offset()) for m in msgs if m.error() is None]
            probe.batches.append(b)
            return result

        worker.process_batch = process_batch
        gc.callbacks.append(self._on_gc)

    def uninstall(self) -> None:
        from model.inference import Recommender

        if self._on_gc in gc.callbacks:
            gc.callbacks.remove(self._on_gc)
        if self._orig:
            Recommender.recommend, Recommender.rebuild = self._orig["recommend"], self._orig["rebuild"]
            Recommender.catch_up = self._orig["catch_up"]


# ---- state seeding and traffic -----------------------------------------------------------------

def partition_of(user: str, partitions: int) -> int:
    return zlib.crc32(user.encode()) % partitions


def seed_states(rec_a, settings, n_users: int, n_items: int, partitions: int, rng, end_ms: int):
    """Every user gets a stored state of exactly H events, hidden states computed by version A.

    Returns the seeded histories as columns (the archive's older part) and a few states for
    the offline rebuild timing."""
    from model.state import HistoryEvent, UserState
    from stream.store import StateStores

    users = [f"user-{u}" for u in range(n_users)]
    items = (rng.zipf(1.2, (n_users, H)) - 1) % n_items
    gaps = np.where(rng.random((n_users, H)) < 0.1, 2 * 3_600_000, rng.integers(10_000, 120_000, (n_users, H)))
    ts = end_ms - np.cumsum(gaps[:, ::-1], axis=1)[:, ::-1]  # rising, the last one at end_ms - gap
    purchase = rng.random((n_users, H)) < 0.05
    timeout_ms = 1_800_000
    cols = {"users": [], "items": [], "ts": [], "types": []}
    stores = StateStores(settings.state_dir, settings.group, settings.input_topic)
    sample = []
    try:
        for lo in range(0, n_users, 256):
            chunk = []
            for r in range(lo, min(lo + 256, n_users)):
                u, hist, start = users[r], [], 0
                for j in range(H):
                    new = j == 0 or ts[r, j] - ts[r, j - 1] > timeout_ms
                    start = j if new else start
                    hist.append(HistoryEvent(f"item-{items[r, j]}", int(ts[r, j]),
                                             "purchase" if purchase[r, j] else "click", bool(new)))
                z = np.zeros(rec_a.model.hidden, np.float32)
                chunk.append(UserState("seed", z, z.copy(), f"{u}-{int(ts[r, start])}", int(ts[r, -1]), H - start,
                                       hist, -1, H))
                cols["users"] += [u] * H
                cols["items"] += [f"item-{i}" for i in items[r]]
                cols["ts"] += [int(t) for t in ts[r]]
                cols["types"] += ["purchase" if p else "click" for p in purchase[r]]
            built = rec_a.rebuild(chunk)  # version A's hidden states for exactly these histories
            by_p: dict[int, dict] = {}
            for s, r in zip(built, range(lo, lo + len(built))):
                by_p.setdefault(partition_of(users[r], partitions), {})[users[r]] = s
            for p, states in by_p.items():
                stores.open(p).put_states(states)
            sample += built[: max(0, 600 - len(sample))]
    finally:
        stores.close_all()
    return users, cols, sample


class Traffic:
    """Paced producer of valid events (explicit partitions), remembering what it sent for the archive."""

    def __init__(self, bootstrap: str, topic: str, users: list[str], n_items: int, partitions: int, seed: int) -> None:
        from stream.kafka_clients import create_producer

        self.producer = create_producer(bootstrap, {"linger.ms": 5})
        self.topic, self.users, self.n_items, self.partitions = topic, users, n_items, partitions
        self.rng = np.random.default_rng(seed)
        self.sent = 0
        self.delivered = 0
        self.failed = 0
        self.new_item_sent = 0
        self.new_item_first_at: float | None = None
        self.cols = {"users": [], "items": [], "ts": [], "types": []}
        self._block: list = []
        self._pos = 0

    def _dr(self, err, msg) -> None:
        if err is None:
            self.delivered += 1
        else:
            self.failed += 1

    def _next(self):
        if self._pos >= len(self._block):
            n = 20_000
            u = self.rng.integers(0, len(self.users), n)
            i = (self.rng.zipf(1.2, n) - 1) % self.n_items
            self._block = list(zip(u.tolist(), i.tolist(), (self.rng.random(n) < 0.05).tolist(),
                                   self.rng.random(n).tolist()))
            self._pos = 0
        self._pos += 1
        return self._block[self._pos - 1]

    def one(self, new_item_share: float = 0.0) -> None:
        from model.events import Event, encode_event
        from stream.kafka_clients import produce_waiting

        u, i, purchase, r = self._next()
        user = self.users[u]
        item = NEW_ITEM if r < new_item_share else f"item-{i}"
        etype = "purchase" if purchase and item != NEW_ITEM else "click"
        ts = int(time.time() * 1000)
        value = encode_event(Event(user, item, etype, ts, event_id=f"e{self.sent}"))
        produce_waiting(self.producer, self.topic, value, user.encode(), partition=partition_of(user, self.partitions),
                        on_delivery=self._dr)
        if item == NEW_ITEM:
            self.new_item_sent += 1
            if self.new_item_first_at is None:
                self.new_item_first_at = time.time()
        self.sent += 1
        c = self.cols
        c["users"].append(user), c["items"].append(item), c["ts"].append(ts), c["types"].append(etype)

    def burst(self, n: int) -> None:
        for _ in range(n):
            self.one()
        self.producer.flush(30)

    def run(self, seconds: float, rate: float, *, new_item_share: float = 0.0, until=None) -> float:
        """Produce at `rate` for `seconds` (or until `until()` is true); returns the seconds spent."""
        t0 = time.monotonic()
        done = 0
        while True:
            now = time.monotonic()
            if now - t0 >= seconds or (until is not None and until()):
                break
            due = int((now - t0) * rate)
            while done < due:
                self.one(new_item_share)
                done += 1
            self.producer.poll(0)
            time.sleep(0.002)
        self.producer.flush(30)
        return time.monotonic() - t0


def scan(bootstrap: str, topic: str, fn, *, expected: int | None = None, idle_s: float = 2.0,
         timeout_s: float = 120.0) -> int:
    """Call fn(msg) on every record of `topic` from the beginning; stop after `idle_s` without
    records once `expected` were seen (or `idle_s` * 3 regardless); returns the count."""
    from confluent_kafka import OFFSET_BEGINNING, TopicPartition

    from stream.kafka_clients import reader_consumer, topic_partitions

    c = reader_consumer(bootstrap, READER)
    n = 0
    try:
        parts = topic_partitions(c, topic)
        c.assign([TopicPartition(topic, p, OFFSET_BEGINNING) for p in parts])
        deadline, last = time.monotonic() + timeout_s, time.monotonic()
        while time.monotonic() < deadline:
            msgs = c.consume(num_messages=2000, timeout=0.2)
            now = time.monotonic()
            for m in msgs:
                if m.error() is None:
                    fn(m)
                    n += 1
            if msgs:
                last = now
            elif now - last > (idle_s if expected is None or n >= expected else idle_s * 3):
                break
    finally:
        c.close()
    return n


# ---- retrain (child process) --------------------------------------------------------------------

def retrain_child(npz: str, registry: str, epochs: int, hidden: int, threads: int) -> None:
    import torch

    from model.config import DataConfig, HRNNConfig
    from model.interactions import Interactions
    from model.pipeline import train_version

    torch.set_num_threads(max(1, threads))
    d = np.load(npz)
    data = Interactions.from_columns(d["users"], d["items"], d["ts"], d["types"])
    run = train_version(data, registry, config=HRNNConfig(hidden_dimension=hidden, epochs=epochs),
                        data_config=DataConfig(), holdout="none", early_stopping=False, device="cpu",
                        progress=False, make_current=False)
    print(run.version_dir, flush=True)


def retrain(archive: dict, n_last: int, work: Path, registry: Path, args) -> Path:
    npz = work / "archive.npz"
    sl = slice(-n_last, None)
    np.savez(npz, users=np.array(archive["users"][sl]), items=np.array(archive["items"][sl]),
             ts=np.array(archive["ts"][sl], dtype=np.int64), types=np.array(archive["types"][sl]))
    proc = subprocess.run([sys.executable, __file__, "--retrain-child", str(npz), str(registry),
                           "--retrain-epochs", str(args.retrain_epochs), "--hidden", str(args.hidden),
                           "--torch-threads", str(args.torch_threads)],
                          capture_output=True, text=True, timeout=args.new_item_timeout_s)
    if proc.returncode != 0:
        raise RuntimeError(f"retrain failed: {proc.stderr[-2000:]}")
    out = Path(proc.stdout.strip().splitlines()[-1])
    known = NEW_ITEM in json.loads((out / "items.json").read_text())["item_ids"]
    log(f"retrained on the newest {len(archive['items'][sl])} events "
        f"({archive['items'][sl].count(NEW_ITEM)} of {NEW_ITEM}); the new version knows it: {known}")
    return out


# ---- report ------------------------------------------------------------------------------------

def pct(xs: list[float], q: float) -> float | None:
    return round(float(np.percentile(xs, q)), 2) if xs else None


def describe(b: Batch, ref: float | None) -> dict:
    return {"t_s": None if ref is None else round(b.t0 - ref, 2), "ms": round(b.ms, 1), "events": b.records,
            "rebuilt": b.rebuild_users, "rebuild_ms": round(b.rebuild_ms, 1), "model_ms": round(b.model_ms, 1),
            "other_ms": round(b.ms - b.model_ms, 1), "cpu_ms": round(b.cpu_ms, 1), "gc_ms": round(b.gc_ms, 1),
            "versions": sorted(b.versions)}


def plot(batches: list[Batch], t_ref: float, marks: list[tuple[float, str, str]], windows, path: Path,
         title: str = "Worker batch latency around a hot swap (bench/swap.py)") -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from model.plots import save_figure

    fig, (a, b) = plt.subplots(2, 1, figsize=(11, 6.5), sharex=True, gridspec_kw={"height_ratios": [3, 1]})
    versions = list(dict.fromkeys(v for bt in batches for v in sorted(bt.versions)))
    letter = {v: chr(65 + k) for k, v in enumerate(versions)}
    for group in dict.fromkeys(frozenset(bt.versions) for bt in batches if bt.versions):
        sel = [bt for bt in batches if bt.versions == group]
        names = sorted(group, key=versions.index)
        label = (f"version {letter[names[0]]} ({names[0]})" if len(names) == 1
                 else f"versions {' + '.join(letter[v] for v in names)} (a canary beside the stable one)")
        a.scatter([bt.t0 - t_ref for bt in sel], [bt.ms for bt in sel], s=7, label=label)
        b.scatter([bt.t0 - t_ref for bt in sel], [bt.records for bt in sel], s=5)
    reb = [bt for bt in batches if bt.rebuild_users]
    a.scatter([bt.t0 - t_ref for bt in reb], [bt.rebuild_ms for bt in reb], s=7, marker="x", color="k",
              label="rebuild part of a batch")
    a.set_yscale("log")
    for (lo, hi), name, color in windows:
        a.axvspan(lo - t_ref, hi - t_ref, color=color, alpha=0.08, label=name)
    for t, label, color in marks:
        for ax in (a, b):
            ax.axvline(t - t_ref, color=color, ls="--", lw=1)
        a.text(t - t_ref, 0.98, " " + label, color=color, va="top", fontsize=8, rotation=90,
               transform=a.get_xaxis_transform())
    a.set(ylabel="batch processing (ms, log)", title=title)
    a.legend(fontsize=7, loc="upper left")
    b.set(xlabel="seconds into the run", ylabel="events / batch")
    save_figure(fig, path, dpi=110)


# ---- the broker and the worker under test -----------------------------------------------------

class Harness:
    """The local broker and a real `Worker` in a thread of this process, its batches timed by a `Probe`;
    `close()` stops both, and re-raises what the worker thread raised."""

    def __init__(self, out_dir: Path) -> None:
        from stream.broker import LocalBroker

        self.probe, self.broker = Probe(), LocalBroker(log_path=out_dir / "broker.log")
        self.stop, self.errors = threading.Event(), []
        self.worker = self.thread = self.traffic = None

    def start(self, settings_kw: dict):
        """Start the broker and the worker; the worker's settings once it holds its partitions."""
        from stream.settings import WorkerSettings
        from stream.worker import Worker

        self.broker.start()
        settings = WorkerSettings(bootstrap_servers=self.broker.bootstrap, **settings_kw)
        self.worker = Worker(settings)
        self.probe.install(self.worker)

        def target() -> None:
            try:
                self.worker.run(self.stop)
            except BaseException as exc:  # re-raised by close()
                self.errors.append(exc)

        self.thread = threading.Thread(target=target, name="worker", daemon=True)
        self.thread.start()
        deadline = time.monotonic() + 60
        while not self.worker.assigned.is_set() and not self.errors and time.monotonic() < deadline:
            time.sleep(0.05)
        if self.errors or not self.worker.assigned.is_set():
            raise RuntimeError(f"worker did not start: {self.errors[0] if self.errors else 'no assignment in 60 s'}")
        return settings

    def answered(self, timeout_s: float) -> bool:
        """Wait until the worker answered every delivered event (or failed); False at the deadline."""
        end = time.monotonic() + timeout_s
        while time.monotonic() < end:
            totals = self.worker.totals
            if totals.recommendations + totals.dead_lettered >= self.traffic.delivered or self.errors:
                return True
            time.sleep(0.05)
        return False

    def calibrate(self, events: int, rate: float, max_rate: float) -> tuple[float, float]:
        """A burst of `events` as fast as possible: capacity = events / (first batch start -> last batch end),
        full batches, poll included; and the steady rate: `rate`, or half the capacity up to `max_rate`."""
        n0 = len(self.probe.batches)
        self.traffic.burst(events)
        self.answered(60)
        cal = self.probe.batches[n0:]
        capacity = sum(b.records for b in cal) / max(1e-9, cal[-1].t1 - cal[0].t0) if cal else 0.0
        rate = rate or min(max_rate, capacity / 2)
        log(f"capacity ~{capacity:.0f} events/s (full batches); steady rate {rate:.0f}/s")
        return capacity, rate

    def close(self) -> None:
        self.stop.set()
        if self.thread is not None:
            self.thread.join(timeout=60)
        self.probe.uninstall()
        if self.traffic is not None:
            self.traffic.producer = None  # closed before the broker goes (else it logs reconnect attempts)
        self.broker.stop()
        if self.errors:
            raise self.errors[0]


# ---- main --------------------------------------------------------------------------------------

def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--items", type=int, default=20000, help="catalogue of versions A and B")
    p.add_argument("--hidden", type=int, default=64)
    p.add_argument("--users", type=int, default=2000, help="users, each with a stored state of H=100 events")
    p.add_argument("--partitions", type=int, default=3)
    p.add_argument("--batch-size", type=int, default=500)
    p.add_argument("--torch-threads", type=int, default=1,
                   help="worker (and retrain) torch threads; on a shared 2-core box more threads make small "
                        "steps slower, not faster")
    p.add_argument("--rate", type=float, default=0.0, help="events/s in the steady phases; 0: half the capacity")
    p.add_argument("--max-rate", type=float, default=1000.0,
                   help="cap for the automatic rate: on the shared 2-core box the measured capacity swings "
                        "2.5-4k/s with the other load, and small steady batches cost more per event")
    p.add_argument("--calib-events", type=int, default=3000)
    p.add_argument("--settle-s", type=float, default=3.0, help="steady seconds before the base window")
    p.add_argument("--base-s", type=float, default=15.0, help="base window (no swap)")
    p.add_argument("--swap-s", type=float, default=15.0, help="swap window, from the announcement")
    p.add_argument("--base-after-s", type=float, default=10.0,
                   help="second base window, right after the swap window (see max_batch_latency_ms_base)")
    p.add_argument("--seconds", type=float, default=None, help="shorthand: base-s = swap-s = SECONDS")
    p.add_argument("--new-item-share", type=float, default=0.08)
    p.add_argument("--new-item-min-events", type=int, default=400,
                   help="new-item events produced before the retrain starts")
    p.add_argument("--retrain-events", type=int, default=20000, help="newest archived events the retrain sees")
    p.add_argument("--retrain-epochs", type=int, default=1)
    p.add_argument("--new-item-timeout-s", type=float, default=60.0)
    p.add_argument("--skip-new-item", action="store_true", help="no retrain phase (new_item_* keys null)")
    p.add_argument("--rebuild-users", type=int, default=256, help="users in the offline rebuild timing")
    p.add_argument("--prebuild-max-users", type=int, default=None,
                   help="the worker's prebuild_max_users (default: the worker's default; 0: rebuild in batches)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out-dir", default="/tmp/swap_bench")
    p.add_argument("--retrain-child", nargs=2, metavar=("NPZ", "REGISTRY"), help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.retrain_child:
        retrain_child(*args.retrain_child, args.retrain_epochs, args.hidden, args.torch_threads)
        return
    refuse_bad_flags(p, args, counts=("items", "hidden", "users", "partitions", "batch_size", "calib_events",
                                      "new_item_min_events", "retrain_events", "retrain_epochs", "rebuild_users"),
                     windows=("base_s", "swap_s", "base_after_s", "new_item_timeout_s", "max_rate",
                              *(("seconds",) if args.seconds is not None else ())),
                     at_least_zero=("settle_s", "rate"))
    if args.seconds:
        args.base_s = args.swap_s = args.seconds
    print(json.dumps(run(args)), flush=True)


def refuse_bad_flags(p: argparse.ArgumentParser, args: argparse.Namespace, *, counts: tuple[str, ...],
                     windows: tuple[str, ...], at_least_zero: tuple[str, ...]) -> None:
    """A usage error (exit 2) before the broker starts: a count of nothing or a window of no time measured nothing
    after minutes, and a negative seed or an out dir that cannot be made crashed part way with a traceback."""
    def flag(name: str) -> str:
        return "--" + name.replace("_", "-")

    for name in counts:
        if getattr(args, name) < 1:
            p.error(f"{flag(name)} must be >= 1, got {getattr(args, name)}")
    for name in windows:
        if not (math.isfinite(getattr(args, name)) and getattr(args, name) > 0):  # NaN fails too
            p.error(f"{flag(name)} must be a number > 0, got {getattr(args, name):g}")
    for name in at_least_zero:
        if not (math.isfinite(getattr(args, name)) and getattr(args, name) >= 0):
            p.error(f"{flag(name)} must be a number >= 0, got {getattr(args, name):g}")
    if args.seed < 0:  # numpy's generators take no negative seed
        p.error(f"--seed must be >= 0, got {args.seed}")
    try:  # last: made only once every other flag is fine
        Path(args.out_dir).mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        p.error(f"--out-dir {args.out_dir}: cannot create it ({exc.strerror or exc})")


def run(args) -> dict:
    import torch

    from model.inference import Recommender
    from stream.announce import announce
    from stream.records import decode_recommendation
    from stream.settings import WorkerSettings

    t_start = time.perf_counter()
    wall_minus_perf = time.time() - t_start  # wall clock = perf_counter + this
    torch.set_num_threads(max(1, args.torch_threads))
    out_dir = Path(args.out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(args.seed)
    with tempfile.TemporaryDirectory(prefix="swap-bench-") as tmp:
        work = Path(tmp)
        reg = work / "registry"
        ver_a, ver_b, settings_kw = two_versions(work, args)
        if args.prebuild_max_users is not None:
            settings_kw["prebuild_max_users"] = args.prebuild_max_users

        # -- seed H=100 states, time the rebuild alone
        rec_a, rec_b = Recommender.load(ver_a, "cpu"), Recommender.load(ver_b, "cpu")
        log(f"seeding {args.users} users x {H} events (version A)")
        seed_settings = WorkerSettings(bootstrap_servers="127.0.0.1:1", **settings_kw)
        users, archive, sample = seed_states(rec_a, seed_settings, args.users, args.items, args.partitions, rng,
                                             int(time.time() * 1000) - 3_600_000)
        rec_b.rebuild(sample[:8])  # warm-up
        t = time.perf_counter()
        rec_b.rebuild(sample[: args.rebuild_users])
        offline_ms = (time.perf_counter() - t) * 1000 / min(len(sample), args.rebuild_users)
        singles = []
        for s in sample[:5]:
            t = time.perf_counter()
            rec_b.rebuild([s])
            singles.append((time.perf_counter() - t) * 1000)
        del rec_a, rec_b

        gc.collect()
        gc.freeze()  # the seeded archive and versions are bench baggage: keep them out of the worker's GC passes
        harness = Harness(out_dir)
        probe, broker = harness.probe, harness.broker
        marks: list[tuple[float, str, str]] = []
        res: dict = {}
        try:
            settings = harness.start(settings_kw)
            worker = harness.worker
            log(f"broker {broker.bootstrap}, worker assigned {worker.stores.partitions}; calibrating")
            traffic = harness.traffic = Traffic(broker.bootstrap, settings.input_topic, users, args.items,
                                                args.partitions, args.seed + 1)
            capacity, rate = harness.calibrate(args.calib_events, args.rate, args.max_rate)  # also the warm-up

            # -- base
            traffic.run(args.settle_s, rate)
            base_lo = time.perf_counter()
            traffic.run(args.base_s, rate)
            base_hi = time.perf_counter()

            # -- swap A -> B
            announce(broker.bootstrap, settings.updates_topic, ver_b.name, ver_b, reason="promote")
            t_ann_b = time.perf_counter()
            log(f"announced B; producing {args.swap_s:.0f} s")
            traffic.run(args.swap_s, rate)
            swap_hi = time.perf_counter()
            stats_b = worker.models.stats()
            load_b_s = stats_b.last_load_s
            marks.append((t_ann_b, "announce B", "tab:red"))
            traffic.run(args.base_after_s, rate)
            after_hi = time.perf_counter()

            # -- new item -> retrain -> swap -> first recommendation naming it
            retrain_info: dict = {}
            if not args.skip_new_item:
                log("new item enters the stream")
                probe.watch_item = NEW_ITEM
                traffic.run(args.new_item_timeout_s, rate, new_item_share=args.new_item_share,
                            until=lambda: traffic.new_item_sent >= args.new_item_min_events)
                t_retrain = time.time()
                holder: dict = {}
                snapshot = archive_all(archive, traffic.cols)  # here: the producer appends to traffic.cols

                def job() -> None:
                    try:
                        holder["dir"] = retrain(snapshot, args.retrain_events, work, reg, args)
                    except BaseException as exc:  # reported in the JSON
                        holder["error"] = exc

                th = threading.Thread(target=job, name="retrain", daemon=True)
                th.start()
                traffic.run(args.new_item_timeout_s, rate, new_item_share=args.new_item_share,
                            until=lambda: not th.is_alive())
                retrain_info["retrain_s"] = round(time.time() - t_retrain, 2)
                if "dir" in holder:
                    ver_c = holder["dir"]
                    announce(broker.bootstrap, settings.updates_topic, ver_c.name, ver_c, reason="retrain")
                    t_ann_c = time.perf_counter()
                    retrain_info["t_ann_c"] = t_ann_c
                    retrain_info["version_c"] = ver_c.name
                    marks.append((t_ann_c, "announce C (retrained)", "tab:purple"))
                    traffic.run(args.new_item_timeout_s, rate, new_item_share=args.new_item_share,
                                until=lambda: probe.item_recommended_at is not None)
                    traffic.run(1.0, rate, new_item_share=args.new_item_share)
                else:
                    retrain_info["error"] = str(holder.get("error"))
                    log(f"retrain failed: {retrain_info['error'][:300]}")
                retrain_info["t_retrain"] = t_retrain

            # -- drain, read back
            answered = harness.answered(60)
            log(f"produced {traffic.sent} (delivered {traffic.delivered}); all answered: {answered}; reading back")
            inputs: set = set()
            scan(broker.bootstrap, settings.input_topic, lambda m: inputs.add((m.partition(), m.offset())),
                 expected=traffic.delivered)
            outs: dict = {}  # (p, o) -> set of versions
            first_new: list = []
            e2e: list = []  # (emitted_at ms, emitted_at - event timestamp ms); events carry their produce time

            def on_out(m) -> None:
                r = decode_recommendation(m.value())
                outs.setdefault((r.source_partition, r.source_offset), set()).add(r.model_version)
                e2e.append((r.emitted_at, r.emitted_at - r.event_timestamp))
                if any(s.item_id == NEW_ITEM for s in r.items):
                    first_new.append(r.emitted_at)

            n_out = scan(broker.bootstrap, settings.output_topic, on_out, expected=len(inputs))
        finally:
            harness.close()

        # -- compute
        batches = probe.batches
        batch_of = {k: i for i, b in enumerate(batches) for k in b.keys}
        per_batch: dict[int, set] = {}
        not_batch_version = 0
        for k, vs in outs.items():
            i = batch_of.get(k)
            if i is None:
                continue
            per_batch.setdefault(i, set()).update(vs)
            not_batch_version += len(vs - batches[i].versions)
        mixed = sum(len(vs) > 1 for vs in per_batch.values())
        mixed_inside = sum(len(b.versions) > 1 for b in batches)
        # without batch boundaries: version changes along each partition's offsets
        by_p: dict[int, list] = {}
        for (p_, o), vs in sorted(outs.items()):
            by_p.setdefault(p_, []).append(vs)
        n_swaps = 1 + (1 if retrain_info.get("version_c") else 0)
        flips = 0
        for seq in by_p.values():
            changes = sum(1 for a_, b_ in zip(seq, seq[1:]) if a_ != b_) + sum(len(v) > 1 for v in seq)
            flips += max(0, changes - n_swaps)
        # Only an input topic read back whole can show that nothing was dropped.
        dropped = len(inputs - set(outs)) if len(inputs) == traffic.delivered else None

        base_before = [b for b in batches if base_lo <= b.t0 < base_hi]
        after = [b for b in batches if swap_hi <= b.t0 < after_hi]
        # a late user's first event on B (catch-up or rebuild) is still the swap's cost, not the base's
        base_after = [b for b in after if not (b.catch_up_users or b.rebuild_users)]
        base = base_before + base_after
        swap = [b for b in batches if t_ann_b <= b.t0 < swap_hi] + [b for b in after if b not in base_after]
        on_b = [b for b in batches if b.versions == {ver_b.name}]
        t_swap_b = on_b[0].t0 if on_b else None
        if t_swap_b is not None:
            marks.append((t_swap_b, "swap to B", "tab:orange"))
        c_name = retrain_info.get("version_c")
        on_c = [b for b in batches if c_name and b.versions == {c_name}]
        t_swap_c = on_c[0].t0 if on_c else None
        if t_swap_c is not None:
            marks.append((t_swap_c, "swap to C", "tab:green"))
        reb = [b for b in swap if b.rebuild_users]
        reb_users = sum(b.rebuild_users for b in reb)
        in_batch_ms_per_user = round(sum(b.rebuild_ms for b in reb) / reb_users, 3) if reb_users else None
        cu = [b for b in swap if b.catch_up_users]
        base_ms, swap_ms = [b.ms for b in base], [b.ms for b in swap]
        wall = lambda t: (t + wall_minus_perf) * 1000  # noqa: E731  (perf_counter -> epoch ms)
        e2e_base = [d for t, d in e2e if wall(base_lo) <= t < wall(base_hi)]
        e2e_swap = [d for t, d in e2e if wall(t_ann_b) <= t < wall(swap_hi)]
        max_base = round(max(base_ms), 2) if base_ms else None
        max_swap = round(max(swap_ms), 2) if swap_ms else None

        new_after = None
        if traffic.new_item_first_at is not None and first_new:
            new_after = round(min(first_new) / 1000 - traffic.new_item_first_at, 2)
        t0_plot = batches[0].t0 if batches else t_start
        png = out_dir / "swap_batch_latency.png"
        plot(batches, t0_plot, marks, [((base_lo, base_hi), "base window", "tab:blue"),
                                       ((t_ann_b, swap_hi), "swap window", "tab:red"),
                                       ((swap_hi, after_hi), "base window (after)", "tab:cyan")], png)

        targets = {"dropped": dropped == 0 and answered, "mixed_version_outputs": mixed == 0,
                   "swap_latency": max_swap is not None and max_base is not None and max_swap <= 2 * max_base}
        targets["all"] = all(targets.values())
        top = lambda bs: [describe(b, t_swap_b) for b in sorted(bs, key=lambda b: -b.ms)[:3]]  # noqa: E731
        res = {
            "dropped": dropped,
            "mixed_version_outputs": mixed,
            "max_batch_latency_ms_base": max_base,
            "max_batch_latency_ms_swap": max_swap,
            "max_batch_latency_ms_base_before": round(max(b.ms for b in base_before), 2) if base_before else None,
            "max_batch_latency_ms_base_after": round(max(b.ms for b in base_after), 2) if base_after else None,
            "rebuild_ms_per_user": round(stats_b.last_prebuild_s * 1000 / stats_b.last_prebuilt, 3)
            if stats_b.last_prebuilt else in_batch_ms_per_user,
            "new_item_recommendable_after_s": new_after,
            "targets_met": targets,
            "plot": str(png),
            # context
            "items": args.items, "hidden": args.hidden, "history_length": H, "users": args.users,
            "partitions": args.partitions, "batch_size": args.batch_size, "torch_threads": args.torch_threads,
            "capacity_events_per_s": round(capacity), "rate_events_per_s": round(rate),
            "load_factor": round(rate / capacity, 2) if capacity else None,
            "all_answered_within_60s": answered, "events_produced": traffic.sent, "events_delivered": traffic.delivered, "input_records": len(inputs),
            "output_records": n_out, "duplicate_outputs": n_out - len(outs),
            "mixed_version_batches_inside": mixed_inside, "records_not_of_batch_version": not_batch_version,
            "mixed_version_outputs_by_run": flips,
            "batches_base": len(base), "batches_swap": len(swap),
            "batch_ms_base_p50": pct(base_ms, 50), "batch_ms_base_p99": pct(base_ms, 99),
            "batch_ms_swap_p50": pct(swap_ms, 50), "batch_ms_swap_p99": pct(swap_ms, 99),
            "e2e_latency_ms_base_p50": pct(e2e_base, 50), "e2e_latency_ms_base_p99": pct(e2e_base, 99),
            "e2e_latency_ms_swap_p50": pct(e2e_swap, 50), "e2e_latency_ms_swap_p99": pct(e2e_swap, 99),
            "events_per_batch_base_mean": round(statistics.mean(b.records for b in base), 1) if base else None,
            "batch_wait_ms_base_max": round(max((b.ms - b.cpu_ms for b in base), default=0.0), 1),
            "batch_wait_ms_swap_max": round(max((b.ms - b.cpu_ms for b in swap), default=0.0), 1),
            "events_per_batch_swap_mean": round(statistics.mean(b.records for b in swap), 1) if swap else None,
            "max_latency_ratio_swap_to_base": round(max_swap / max_base, 2) if max_base and max_swap else None,
            "background_load_s": None if load_b_s is None else round(load_b_s, 3),
            "announce_to_swap_s": None if t_swap_b is None else round(t_swap_b - t_ann_b, 3),
            "first_batch_after_swap": describe(on_b[0], t_swap_b) if on_b else None,
            "top_swap_batches": top(swap), "top_base_batches": top(base),
            "rebuild_mode": "background before the swap" if stats_b.last_prebuilt else "in the batches",
            "prebuilt_states": stats_b.last_prebuilt,
            "prebuild_s": None if stats_b.last_prebuild_s is None else round(stats_b.last_prebuild_s, 3),
            "catch_up_users_swap_window": sum(b.catch_up_users for b in cu),
            "catch_up_ms_per_batch_max": round(max((b.catch_up_ms for b in cu), default=0.0), 1),
            "rebuild_ms_per_user_in_batches": in_batch_ms_per_user,
            "rebuild_users_swap_window": reb_users,
            "rebuild_batches_swap_window": len(reb),
            "rebuild_history_len_mean": round(sum(b.rebuild_hist for b in reb) / reb_users, 1) if reb_users else None,
            "rebuild_ms_per_user_offline": round(offline_ms, 3),
            "rebuild_users_offline": min(len(sample), args.rebuild_users),
            "rebuild_ms_single_user": round(statistics.median(singles), 2) if singles else None,
            "new_item": NEW_ITEM, "new_item_share": args.new_item_share,
            "new_item_events_produced": traffic.new_item_sent,
            "new_item_wait_s": None if "t_retrain" not in retrain_info or traffic.new_item_first_at is None
            else round(retrain_info["t_retrain"] - traffic.new_item_first_at, 2),
            "retrain_s": retrain_info.get("retrain_s"), "retrain_events": args.retrain_events,
            "retrain_epochs": args.retrain_epochs, "retrain_error": retrain_info.get("error"),
            "retrain_announce_to_swap_s": None if t_swap_c is None else round(t_swap_c - retrain_info["t_ann_c"], 3),
            "new_item_swap_to_first_rec_s": None if t_swap_c is None or not first_new
            else round(min(first_new) / 1000 - (t_swap_c + wall_minus_perf), 2),
            "wall_s": round(time.perf_counter() - t_start, 1),
        }
        return res


def archive_all(seeded: dict, live: dict) -> dict:
    """The training store as of now: seeded histories, then every event produced (time order per user holds)."""
    return {k: seeded[k] + live[k] for k in seeded}


if __name__ == "__main__":
    exit_on_sigterm()
    sys.exit(exit_status(main, Path(__file__).name))
