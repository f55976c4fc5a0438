"""`hrnn demo`: the whole product on one machine, ending by itself.

Local broker -> synthetic log -> train + evaluate v1 against the baselines -> a worker with
embedded RocksDB -> replay the newest events (a few malformed records and a brand-new item
among them) -> live recommendations on screen -> a retrain on the events seen so far and a hot
swap mid-stream -> the most popular item taken off sale mid-stream (`hrnn items unavailable`)
-> summary (events in, recommendations out, DLQ, p50/p99 latency, how long the new item took to
become recommendable, the item off sale in no recommendation of a later event, `hrnn audit`'s verdict,
`hrnn quality`'s online recall per version) and plots under --out.
"""
from __future__ import annotations

import argparse
import json
import math
import shutil
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from model.config import DataConfig, HRNNConfig, path_arg
from model.errors import ConfigError
from model.interactions import Interactions
from stream.cli_common import directory_flag, exit_on_sigterm

NEW_ITEM = "new-item-1"
RETRAIN_AT = 0.25  # share of the live replay after which the retrain starts
NEW_ITEM_SHARE = 0.08  # a trending item: this share of the live events, none of the history
HOLD_AT = 0.6  # the replay waits here for the swap if the retrain is still running
OFF_SALE_AT = 0.4  # share of the live replay after which the most popular item goes off sale


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", default="out/demo", type=path_arg,
                   help="directory for data, registry, state, plots, summary.json")
    p.add_argument("--users", type=int, default=1500, help="synthetic users, at least 10")
    p.add_argument("--items", type=int, default=600, help="synthetic items, at least 20 (one per category)")
    p.add_argument("--seed", type=int, default=0, help="random seed, >= 0")
    p.add_argument("--epochs", type=int, default=8, help="training epochs, 1 to 1000")
    p.add_argument("--rate", type=float, default=250.0, help="replay rate, events/s, > 0")
    p.add_argument("--live-share", type=float, default=0.15,
                   help="newest share of events replayed live, 0.01 to 0.9 (the rest trains the first version)")


def check_arguments(args: argparse.Namespace) -> None:
    """Refuse out-of-range flags before any work: the demo trains for minutes before it uses --rate."""
    from model.synth import MAX_EVENTS, MAX_ITEMS

    # synth's own bounds, checked here to name the flags before the broker starts (25: its events per user)
    checks = [("--users", args.users, 10 <= args.users <= MAX_EVENTS // 25, f"10 to {MAX_EVENTS // 25:,}"),
              ("--items", args.items, 20 <= args.items <= MAX_ITEMS,
               f"20 (one per synthetic category) to {MAX_ITEMS:,}"),
              ("--seed", args.seed, args.seed >= 0, ">= 0"),
              ("--epochs", args.epochs, 1 <= args.epochs <= 1000, "1 to 1000"),
              ("--rate", args.rate, math.isfinite(args.rate) and args.rate > 0, "events/s, a number > 0"),
              ("--live-share", args.live_share, 0.01 <= args.live_share <= 0.9,
               "0.01 to 0.9, so both the history and the live part hold events")]
    for flag, value, ok, allowed in checks:
        if not ok:
            raise ConfigError(f"{flag} {value} is out of range: {allowed}")
    directory_flag("--out", args.out)


@dataclass
class LiveRun:
    produced: int = 0
    bad: int = 0
    swap_at: float | None = None  # wall time the worker switched to v2
    new_item_first_seen: float | None = None  # wall time the new item's first event was produced
    versions: list[str] = field(default_factory=list)
    off_sale_item: str | None = None
    off_sale_at_ms: int | None = None  # wall time the worker's availability reader held it
    retrain_error: str | None = None  # why v2 does not serve: the replay stops waiting for it, the demo fails
    retrain_proc: subprocess.Popen | None = None  # the retraining child, ended with the demo
    stopping: bool = False  # the demo is ending: no retraining child may start
    lock: threading.Lock = field(default_factory=threading.Lock, repr=False)  # retrain_proc and stopping


def _say(msg: str) -> None:
    print(msg, flush=True)


def _split_live(data: Interactions, share: float, seed: int) -> tuple[Interactions, Interactions]:
    """History = all but the newest `share` of events; a new item enters the live part."""
    cut = np.quantile(data.ts_ms, 1 - share)
    hist, live = data.subset(data.ts_ms < cut, reindex=False), data.subset(data.ts_ms >= cut, reindex=False)
    rng = np.random.default_rng(seed)
    items = live.item_ids[live.item].astype(object)
    items[rng.random(len(items)) < NEW_ITEM_SHARE] = NEW_ITEM  # an item the first model has never seen
    live = Interactions.from_columns(live.user_ids[live.user], items, live.ts_ms,
                                     np.array(live.event_types)[live.event_type])
    return hist, live


# The repeat-aware head: synthetic users come back to their items (repeat_share 0.3), as real ones do.
TRAIN_FLAGS = ("--hidden-dimension", "64", "--repeat-head", "true")


def _train(data: Interactions, registry: Path, epochs: int, label: str):
    from model.network import device_label
    from model.pipeline import train_version

    _say(f"\n== training {label} on {len(data):,} events ({device_label('auto')})")
    cfg = HRNNConfig(hidden_dimension=64, epochs=epochs, repeat_head=True)
    return train_version(data, registry, config=cfg, data_config=DataConfig(), progress=True)


def _evaluate(data: Interactions, version_dir: Path, out: Path) -> dict:
    from model.artifact import load_version
    from model.baselines import make_baseline
    from model.evaluate import evaluate, format_table
    from model.inference import HRNNScorer
    from model.pipeline import prepare
    from model.plots import plot_eval_table
    from model.splits import last_session_split

    prep = prepare(data, DataConfig())
    split = last_session_split(prep.data, prep.starts)
    m = load_version(version_dir)
    scorers = {name: make_baseline(name) for name in ("pop", "item-knn", "sknn", "user-repeat+session")}
    scorers["hrnn"] = HRNNScorer.for_version(m, split.train)
    for s in scorers.values():
        s.fit(split.train, split.train_starts)
    result = evaluate(split, scorers, progress=False)
    _say("\n== offline evaluation (last-session protocol, full-catalogue ranking)\n" + format_table(result))
    (out / "evaluation.json").write_text(json.dumps(result.to_json(), indent=2))
    plot_eval_table(result, out / "evaluation.png")
    return result.to_json()


def _produce_bad(producer, topic: str) -> int:
    bad = [b"{not json", b'{"user_id": "u1", "item_id": "i1"}', b'{"user_id": "u1", "item_id": "i1", '
           b'"event_type": "click", "timestamp": "yesterday"}']
    for value in bad:
        producer.produce(topic, key=b"u1", value=value)
    producer.flush(10)
    return len(bad)


def _replay_live(live: Interactions, bootstrap: str, topic: str, rate: float, run: LiveRun, on_retrain,
                 on_off_sale) -> None:
    from model.events import encode_event
    from stream.kafka_clients import create_producer
    from stream.replay import events_from_interactions

    producer = create_producer(bootstrap)
    run.bad = _produce_bad(producer, topic)
    events = list(events_from_interactions(live))
    t0 = time.monotonic()
    for i, ev in enumerate(events):
        if i == int(len(events) * HOLD_AT) and run.swap_at is None:
            t0 += _wait_for_swap(run)
        while time.monotonic() < t0 + i / rate:
            time.sleep(0.002)
        producer.produce(topic, key=ev.user_id.encode(), value=encode_event(ev))
        producer.poll(0)
        if ev.item_id == NEW_ITEM and run.new_item_first_seen is None:
            run.new_item_first_seen = time.time()
        if i == int(len(events) * RETRAIN_AT):
            on_retrain(events[:i])
        if i == int(len(events) * OFF_SALE_AT):
            t0 += _timed(on_off_sale)
        if i % 1000 == 0:
            print(f"\r   replayed {i:,}/{len(events):,} events", end="", file=sys.stderr, flush=True)
    producer.flush(30)
    print(f"\r   replayed {len(events):,}/{len(events):,} events", file=sys.stderr, flush=True)
    run.produced = len(events)


def _retrain_and_swap(hist: Interactions, seen, out: Path, registry: Path, epochs: int, worker,
                      run: LiveRun) -> threading.Thread:
    """Retrain on history + the live events archived so far, in a separate process (training must
    not compete with the worker for the interpreter), then announce the new version on the model
    updates topic, the way the retrainer does: the worker validates it in the background and swaps."""
    from model.synth import write
    from stream.announce import announce

    def job() -> None:
        u = np.concatenate([hist.user_ids[hist.user], [e.user_id for e in seen]])
        i = np.concatenate([hist.item_ids[hist.item], [e.item_id for e in seen]])
        t = np.concatenate([hist.ts_ms, [e.timestamp_ms for e in seen]])
        y = np.concatenate([np.array(hist.event_types)[hist.event_type], [e.event_type for e in seen]])
        archive = write(Interactions.from_columns(u, i, t, y), out / "archive.csv")
        _say(f"\n== retraining v2 in a separate process on {len(u):,} archived events (the new item included)")
        proc = _start_retrain(run, [sys.executable, "-m", "stream.cli", "train", "--data", str(archive), "--registry",
                                    str(registry), "--epochs", str(epochs), *TRAIN_FLAGS, "--quiet"])
        if proc is None:
            return
        stdout, stderr = proc.communicate()
        if proc.returncode != 0:
            run.retrain_error = f"the retraining exited with code {proc.returncode}: {stderr[-2000:]}"
            _say(f"retrain failed: {run.retrain_error}")
            return
        v2 = Path(stdout.strip().splitlines()[-1])
        settings = worker.settings
        announce(settings.bootstrap_servers, settings.updates_topic, v2.name, v2, reason="retrain",
                 extra=settings.producer_kafka)
        _say(f"\n== v2 {v2.name} announced on {settings.updates_topic}; the worker validates it and swaps")
        if _wait_until(lambda: worker.models.version == v2.name, 120, every_s=0.02):
            run.swap_at = time.time()
            run.versions.append(v2.name)
            _say(f"\n== the worker serves {v2.name} from this batch on")
        else:
            run.retrain_error = f"the worker did not swap to {v2.name} within 120 s: {worker.models.stats()}"
            _say(f"\n== {run.retrain_error}")
    th = threading.Thread(target=job, name="retrain", daemon=True)
    th.start()
    return th


def _start_retrain(run: LiveRun, cmd: list[str]) -> subprocess.Popen | None:
    """The retraining child, or None once the demo is ending: started after _ending_retrain looked, it would
    outlive the demo (and ignore SIGTERM, which the unwinding demo ignores, as a child inherits)."""
    with run.lock:
        if run.stopping:
            return None
        run.retrain_proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        return run.retrain_proc


@contextmanager
def _ending_retrain(run: LiveRun) -> Iterator[None]:
    """End the retraining child with the demo (Ctrl-C, SIGTERM, an error): it would go on training and then
    write a version into the registry of a demo that is gone."""
    try:
        yield
    finally:
        with run.lock:
            run.stopping, proc = True, run.retrain_proc
        if proc is not None and proc.poll() is None:
            proc.terminate()
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                proc.kill()


def _wait_for_swap(run: LiveRun, timeout_s: float = 600.0) -> float:
    """Pause the replay until v2 serves, so the swap lands mid-stream even on a slow machine; returns the pause."""
    print("\n   (replay paused until the retrained version is serving)", file=sys.stderr, flush=True)
    return _timed(lambda: _wait_until(lambda: run.swap_at is not None or run.retrain_error is not None, timeout_s,
                                      every_s=0.1))


def _wait_until(condition, timeout_s: float, every_s: float) -> bool:
    """Poll `condition` every `every_s` until it holds (True) or `timeout_s` passed (False)."""
    deadline = time.monotonic() + timeout_s
    while not condition():
        if time.monotonic() >= deadline:
            return False
        time.sleep(every_s)
    return True


def _timed(action) -> float:
    t0 = time.monotonic()
    action()
    return time.monotonic() - t0


def _take_off_sale(item: str, worker, run: LiveRun) -> None:
    """`hrnn items unavailable ITEM`, then note when the worker's reader holds it: every event
    produced after that is served by a batch that leaves the item out."""
    from stream.availability import set_availability

    s = worker.settings
    set_availability(s.bootstrap_servers, [item], available=False, reason="demo: out of stock",
                     topic=s.availability_topic, extra=s.producer_kafka)
    if _wait_until(lambda: item in worker.availability.unavailable, 30, every_s=0.01):
        run.off_sale_item, run.off_sale_at_ms = item, int(time.time() * 1000)
        _say(f"\n== {item} (the most popular item) taken off sale; the worker leaves it out from its next batch")
    else:
        _say(f"\n== the worker did not see {item} go off sale within 30 s")


def _wait_assigned(worker, timeout_s: float = 60.0) -> None:
    _wait_until(lambda: worker.stores.partitions, timeout_s, every_s=0.05)


def _collect(bootstrap: str, settings, n_expected: int):
    from stream.kafka_clients import read_all, wait_for_count
    from stream.records import decode_recommendation

    wait_for_count(bootstrap, settings.output_topic, n_expected, timeout_s=180)
    recs = [decode_recommendation(r.value) for r in read_all(bootstrap, settings.output_topic, idle_s=1.0)]
    inputs = {(r.partition, r.offset): r.timestamp_ms for r in read_all(bootstrap, settings.input_topic, idle_s=1.0)}
    dlq = read_all(bootstrap, settings.dlq_topic, idle_s=1.0)
    return recs, inputs, dlq


def _summarise(recs, inputs, dlq, run: LiveRun, out: Path) -> dict:
    lat = np.array([r.emitted_at - inputs[(r.source_partition, r.source_offset)] for r in recs
                    if (r.source_partition, r.source_offset) in inputs], dtype=float)
    emitted = np.array([r.emitted_at for r in recs], dtype=float)
    first_rec_with_new = min((r.emitted_at for r in recs if any(s.item_id == NEW_ITEM for s in r.items)),
                             default=None)
    summary = {
        "events_in": run.produced + run.bad, "valid_events": run.produced, "recommendations_out": len(recs),
        "dlq": len(dlq), "p50_latency_ms": round(float(np.percentile(lat, 50)), 1),
        "p99_latency_ms": round(float(np.percentile(lat, 99)), 1),
        "model_versions_seen": sorted({r.model_version for r in recs}),
        "new_item_recommendable_after_s": None if run.swap_at is None or run.new_item_first_seen is None
        else round(run.swap_at - run.new_item_first_seen, 2),
        "new_item_first_recommended_after_s": None if first_rec_with_new is None or run.new_item_first_seen is None
        else round(first_rec_with_new / 1000 - run.new_item_first_seen, 2),
        "off_sale": _off_sale_summary(recs, inputs, run),
    }
    _plot_latency(emitted, lat, run, out / "latency.png")
    return summary


def _off_sale_summary(recs, inputs, run: LiveRun) -> dict | None:
    """How often the item off sale was recommended for events produced before and after it went off sale."""
    if run.off_sale_at_ms is None:
        return None
    later = [inputs.get((r.source_partition, r.source_offset), 0) >= run.off_sale_at_ms for r in recs]
    showing = [any(s.item_id == run.off_sale_item for s in r.items) for r in recs]
    return {"item": run.off_sale_item, "events_after": sum(later),
            "recommended_before": sum(s and not a for s, a in zip(showing, later)),
            "recommended_after": sum(s and a for s, a in zip(showing, later))}


def _plot_latency(emitted: np.ndarray, lat: np.ndarray, run: LiveRun, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from model.plots import save_figure

    t = (emitted[: len(lat)] - emitted.min()) / 1000
    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 4))
    a.scatter(t, lat, s=2, alpha=0.4)
    if run.swap_at is not None:
        a.axvline(run.swap_at - emitted.min() / 1000, color="red", ls="--", label="hot swap to v2")
        a.legend()
    a.set(xlabel="seconds into the replay", ylabel="event -> recommendation (ms)", title="Latency over time")
    b.hist(lat, bins=60)
    b.axvline(np.percentile(lat, 50), color="k", ls="--", label="p50")
    b.axvline(np.percentile(lat, 99), color="r", ls="--", label="p99")
    b.set(xlabel="ms", ylabel="recommendations", title="Latency distribution")
    b.legend()
    save_figure(fig, path, dpi=110)


def run(args: argparse.Namespace) -> int:
    check_arguments(args)
    from model.network import device_label
    from model.synth import generate, write
    from stream.audit import audit_worker
    from stream.broker import LocalBroker
    from stream.cli_quality import print_report
    from stream.quality import plot_quality, quality_worker
    from stream.settings import WorkerSettings
    from stream.tail import format_recommendation
    from stream.worker import Worker

    exit_on_sigterm()  # `kill`, `timeout`, `docker stop`: the broker and the retraining child end with the demo
    out = Path(args.out)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as exc:  # a directory the flag check could not foresee (no permission, /proc)
        raise ConfigError(f"--out {out}: cannot create it ({exc.strerror})") from None
    registry, state = out / "registry", out / "state"
    shutil.rmtree(state, ignore_errors=True)  # an earlier run's states belong to a broker that is gone
    data = generate(args.users, args.items, seed=args.seed, repeat_share=0.3)
    write(data, out / "events.csv")
    hist, live = _split_live(data, args.live_share, args.seed)
    _say(f"== synthetic log: {len(data):,} events, {data.n_users:,} users, {data.n_items:,} items "
         f"({len(hist):,} history, {len(live):,} replayed live) -> {out / 'events.csv'}")
    v1 = _train(hist, registry, args.epochs, "v1")
    evaluation = _evaluate(hist, v1.version_dir, out)
    live_run = LiveRun(versions=[v1.version_dir.name])
    with LocalBroker(log_path=out / "broker.log") as broker, _ending_retrain(live_run):
        _say(f"\n== local broker on {broker.bootstrap}; worker state in {state}")
        settings = WorkerSettings(bootstrap_servers=broker.bootstrap, registry=str(registry), state_dir=str(state),
                                  partitions=4,
                                  # Tansu: a small session timeout makes group joins quick; a short fetch wait
                                  # keeps it from holding an empty fetch (and the next batch) for 500 ms.
                                  kafka_consumer={"session.timeout.ms": "6000", "fetch.wait.max.ms": "10"})
        worker = Worker(settings)
        stop = threading.Event()
        wt = threading.Thread(target=worker.run, args=(stop,), name="worker", daemon=True)
        wt.start()
        _wait_assigned(worker)
        _say(f"   the worker scores on {device_label(worker.models.current().device)}")
        retrain: list[threading.Thread] = []
        _say(f"\n== replaying {len(live):,} events at {args.rate:.0f}/s (plus 3 malformed records)")
        popular = str(hist.item_ids[np.bincount(hist.item).argmax()])
        _replay_live(live, broker.bootstrap, settings.input_topic, args.rate, live_run,
                     lambda seen: retrain.append(_retrain_and_swap(hist, seen, out, registry, args.epochs, worker,
                                                                   live_run)),
                     lambda: _take_off_sale(popular, worker, live_run))
        for th in retrain:
            th.join()
        recs, inputs, dlq = _collect(broker.bootstrap, settings, live_run.produced)
        stop.set()
        wt.join(timeout=30)
        checked = audit_worker(settings, idle_s=1.0)  # `hrnn audit`: every committed input record answered
        judged = quality_worker(settings, idle_s=1.0)  # `hrnn quality`: each list judged by the user's next event
    _say("\n== a few live recommendations")
    from stream.records import encode_recommendation
    for r in recs[:: max(1, len(recs) // 6)][:6]:
        _say("   " + format_recommendation(encode_recommendation(r)))
    summary = _summarise(recs, inputs, dlq, live_run, out)
    summary["offline_recall@20"] = {k: round(v["recall@20"], 4) for k, v in evaluation["models"].items()}
    summary["audit"] = {"kept": checked.kept, **{k: checked.total(k) for k in ("records", "unanswered", "duplicated")}}
    summary["online_recall@20"] = {r["name"]: round(r["recall@20"], 4) for r in judged.rows() if r["kind"] == "all"}
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    _say("\n== online quality (`hrnn quality`): each recommendation judged by its user's next live event")
    print_report(judged)
    plot_quality(judged, out / "online_quality.png", 20)
    _say("\n== summary\n" + "\n".join(f"   {k}: {v}" for k, v in summary.items()))
    _say(f"\nplots: {out / 'evaluation.png'}, {out / 'latency.png'}, {out / 'online_quality.png'}, "
         f"{v1.version_dir / 'training_curve.png'}")
    if live_run.retrain_error is not None:
        _say(f"\nno hot swap: {live_run.retrain_error}")
    return 0 if summary["recommendations_out"] >= summary["valid_events"] and checked.kept \
        and live_run.retrain_error is None else 1
