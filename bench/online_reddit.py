"""`hrnn quality` on a real log: reddit-jodie streamed through a worker; prints ONE JSON object.

    python bench/online_reddit.py [--data ../shared/data/reddit-jodie/reddit.tsv] [--train-share 0.8]
                                  [--set key=value,...] [--png online_reddit.png]
                                  [--canary-set key=value,... [--canary-share 0.5]]

Everything on 127.0.0.1 (the local broker), stopping by itself. Trains a repeat-aware HRNN (the issue-5
config by default) on the first --train-share of the log by time, as `hrnn train` does; starts a worker
(`stream.worker.Worker`, as `hrnn serve` runs it, embedded RocksDB) on that version; produces the training
part (every user's state is built from it), notes the time, produces the rest; waits until every event is
answered; then runs `stream.quality.quality` as `hrnn quality --since-s <that time> --history-s <all>` does:
the lists of the rest judged by each user's next event, the training part read only for the reference.
With --canary-set, a second version (the same config with those changes, trained on the same part) serves
--canary-share of the users beside the first from the moment the rest is produced (`ModelHolder.request`
with a share, as an announcement from `hrnn models canary` makes it), and the report's comparison of the
two (each on its own users, 95% intervals by user) is printed too: a weaker canary must come out worse, and
the same config with another seed (an A/A test) must show no difference.
The log's timestamps (seconds from its start) are moved to start on 2026-01-01, every gap kept: the worker
dead-letters timestamps before 1990 as a unit mix-up (the first run of this bench sent all 134,489 events to
the DLQ with `bad_timestamp`).

  judged, pending      lists of the rest judged / awaiting their user's next event
  rows                 per version and for the reference: recall@1/5/10/20, MRR@20, for all judged lists,
                       those whose next event continued the session and those where it opened the next one
  comparison           with a canary: recall@20 and MRR@20 of each side and the difference with its 95% interval
  seconds              training, streaming (produce to the last answer), judging
Speeds swing with the machine's load (the producer, the worker and the broker share it).
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402

from stream.cli_common import exit_on_sigterm  # noqa: E402
from bench.quality_reddit import configs_from, setting_pairs  # noqa: E402
from model.config import DataConfig, HRNNConfig  # noqa: E402
from model.errors import exit_status  # noqa: E402
from model.loaders import load_interactions  # noqa: E402
from model.pipeline import train_version  # noqa: E402
from stream.broker import LocalBroker  # noqa: E402
from stream.kafka_clients import create_producer  # noqa: E402
from stream.quality import plot_quality, quality_worker  # noqa: E402
from stream.replay import replay  # noqa: E402
from stream.settings import WorkerSettings  # noqa: E402
from stream.worker import Worker  # noqa: E402

# reddit-jodie's timestamps count seconds from the log's start; the worker takes epoch times (a timestamp
# before 1990 is dead-lettered as a unit mix-up), so the log is moved to start here, every gap kept.
START_MS = 1_767_225_600_000  # 2026-01-01T00:00Z
REDDIT = ROOT.parent / "shared" / "data" / "reddit-jodie" / "reddit.tsv"
# The issue-5 configuration (README's reddit row): repeat head, window profile, a 2-epoch weight average.
CONFIG = ("repeat_head=true,hidden_dimension=82,history_length=63,n_sample=1024,bptt=17,learning_rate=0.0061,"
          "dropout_session=0.43,dropout_user=0.49,dropout_init=0.43,epochs=12,weight_average_epochs=2")


def _say(msg: str) -> None:
    print(f"[online-reddit {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def _train(train, registry: Path, configs: tuple[HRNNConfig, DataConfig], *, current: bool):
    t0 = time.perf_counter()
    config, data_config = configs
    run = train_version(train, registry, config=config, data_config=data_config, progress=False,
                        make_current=current)
    _say(f"trained {run.version_dir.name} on {len(train):,} events in {time.perf_counter() - t0:.0f} s")
    return run


def _serve_canary(worker: Worker, version_dir: Path, share: float, n_answered: int) -> None:
    """Once the worker has answered the training part, have it serve `version_dir` to `share` of the users."""
    while (worker.metrics.value("hrnn_recommendations_out_total") or 0) < n_answered:
        time.sleep(0.5)
    worker.models.request(version_dir, version_dir.name, reason="bench canary", share=share)
    while worker.models.stats().canary != version_dir.name:
        if worker.models.stats().refused:
            raise SystemExit(f"the canary was refused: {worker.models.stats().last_refusal}")
        time.sleep(0.5)
    _say(f"canary {version_dir.name} serving {share:.0%} of the users")


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", default=str(REDDIT))
    ap.add_argument("--train-share", type=float, default=0.8)
    ap.add_argument("--set", type=setting_pairs, default="",
                    help="hyperparameters over the default config, key=value,...")
    ap.add_argument("--png", help="also draw recall@20 / MRR@20 over time to this PNG")
    ap.add_argument("--canary-set", type=setting_pairs,
                    help="a canary: the config with these changes, key=value,... (e.g. seed=7)")
    ap.add_argument("--canary-share", type=float, default=0.5)
    args = ap.parse_args()
    if not 0 < args.train_share < 1:  # nothing to train on, or nothing left to judge
        ap.error(f"--train-share must lie strictly between 0 and 1, got {args.train_share:g}")
    if not 0 < args.canary_share < 1:
        ap.error(f"--canary-share must lie strictly between 0 and 1, got {args.canary_share:g}")
    pairs = {**setting_pairs(CONFIG), **args.set}
    canary_pairs = None if args.canary_set is None else {**pairs, **args.canary_set}
    configs = configs_from({}, pairs, "--set")  # before the log loads: a bad setting is refused at once
    canary_configs = None if canary_pairs is None else configs_from({}, canary_pairs, "--canary-set")
    data = load_interactions(args.data, columns={"USER_ID": "0", "ITEM_ID": "1", "TIMESTAMP": "2"}, time_unit="s")
    data = dataclasses.replace(data, ts_ms=data.ts_ms - data.ts_ms.min() + START_MS)
    cut = np.quantile(data.ts_ms, args.train_share)
    train = data.subset(data.ts_ms < cut, reindex=False)
    with tempfile.TemporaryDirectory() as tmp, LocalBroker() as broker:
        t0 = time.perf_counter()
        run = _train(train, Path(tmp) / "registry", configs, current=True)
        canary = None if canary_configs is None else _train(train, Path(tmp) / "registry", canary_configs,
                                                             current=False)
        train_s = time.perf_counter() - t0
        settings = WorkerSettings(bootstrap_servers=broker.bootstrap, registry=str(Path(tmp) / "registry"),
                                  state_dir=str(Path(tmp) / "state"), partitions=4, k=20,
                                  kafka_consumer={"session.timeout.ms": "6000", "fetch.wait.max.ms": "10"})
        worker, stop = Worker(settings), threading.Event()
        thread = threading.Thread(target=worker.run, args=(stop,), daemon=True)
        thread.start()
        try:  # however this ends (a SIGTERM too), the worker closes its stores before their folder goes
            while not worker.assigned.is_set():
                time.sleep(0.1)
            producer, first, n_events = create_producer(broker.bootstrap, {"linger.ms": 20}), len(train), len(data)
            t0 = time.perf_counter()
            replay(train, producer, settings.input_topic)  # as `hrnn produce` does, in time order, at full speed
            if canary is not None:
                _serve_canary(worker, canary.version_dir, args.canary_share, first)
            since_ms = int(time.time() * 1000)  # Kafka timestamps: every later record is of the part judged
            replay(data.subset(data.ts_ms >= cut, reindex=False), producer, settings.input_topic)
            answered = lambda: worker.metrics.value("hrnn_recommendations_out_total") or 0  # noqa: E731
            deadline = time.monotonic() + 3600
            while answered() < n_events:
                if worker.metrics.value("hrnn_dlq_total", {"reason": "bad_timestamp"}):
                    raise SystemExit("events were dead-lettered: bad_timestamp")
                if not thread.is_alive() or time.monotonic() > deadline:
                    raise SystemExit(f"the worker stopped or took over an hour: {answered():,.0f} of "
                                     f"{n_events:,} answered")
                time.sleep(1)
            stream_s = time.perf_counter() - t0
            _say(f"{n_events:,} events answered in {stream_s:.0f} s")
        finally:
            stop.set()
            thread.join(timeout=60)
        t0 = time.perf_counter()
        report = quality_worker(settings, ks=[1, 5, 10, 20], since_ms=since_ms, history_ms=since_ms,
                                progress=_say)
        judge_s = time.perf_counter() - t0
        if args.png:
            plot_quality(report, args.png, 20)
    print(json.dumps({
        "data": args.data, "events": n_events, "train_events": first, "version": run.version_dir.name,
        "config": pairs, "judged": len(report.verdicts.rank), "pending": report.pending,
        "rows": [{k: round(v, 4) if isinstance(v, float) else v for k, v in r.items()} for r in report.rows()],
        **({} if canary is None else {"canary": {"version": canary.version_dir.name, "config": canary_pairs,
                                                 "share": args.canary_share},
                                      "comparison": [c.to_dict() for c in report.comparisons()]}),
        "seconds": {"train": round(train_s), "stream": round(stream_s), "judge": round(judge_s, 1)},
    }))
    return 0


if __name__ == "__main__":
    exit_on_sigterm()
    sys.exit(exit_status(main, Path(__file__).name))
