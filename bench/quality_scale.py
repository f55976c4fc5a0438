"""`hrnn quality` on a long log: how fast it judges, what memory it takes; prints ONE JSON object.

    python bench/quality_scale.py [--events 200000] [--users 20000] [--partitions 4] [--k 20]

Everything on 127.0.0.1 (the local broker, `LocalBroker`), stopping by itself. The bench writes --events
input events of --users users (each user's events in one partition, in time order) and one
recommendation record of --k items for each, placing the user's next item at a known rank (the event's
position in the user's sequence modulo k + 5, past the list for the last 5 of every cycle), so the
figures `stream.quality.quality` must find are known; then runs it in this process, as `hrnn quality` does.

  seconds            wall seconds of the judgement (the bounds, the two topic scans, the verdicts)
  events_per_s       input events / seconds (each event is read twice: the event and its recommendation)
  judged, pending    what it found; pending must be --users (each user's last event awaits a next one)
  recall@1, recall@<k>, expected_*: the figures found and the ones written; `correct` is whether all agree
  peak_traced_mb     the peak of the Python and numpy allocations during a second judgement, traced
                     (tracemalloc; not timed, tracing slows every allocation): per input offset a few
                     arrays (about 40 bytes), per user the reference list
  peak_rss_mb_before / peak_rss_mb_after
                     this process's peak RSS before and after (resource.getrusage)
Writing the topics is not timed.
"""
from __future__ import annotations

import argparse
import json
import resource
import sys
import time
import tracemalloc
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from confluent_kafka import Producer  # noqa: E402

from stream.cli_common import exit_on_sigterm  # noqa: E402
from model.errors import exit_status  # noqa: E402
from model.events import Event, encode_event  # noqa: E402
from stream.broker import LocalBroker  # noqa: E402
from stream.kafka_clients import admin_client, produce_waiting, producer_config, topic_id  # noqa: E402
from stream.quality import QualityReport, quality  # noqa: E402
from stream.records import Recommendation, ScoredItem, encode_recommendation  # noqa: E402
from stream.topics import TopicSpec, ensure_topics  # noqa: E402

CONSUMER = {"fetch.wait.max.ms": "10"}
T0 = 1_700_000_000_000


def _rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _item(user: int, step: int) -> str:
    return f"item-{(user * 31 + step * 7) % 5000}"


def _write(bootstrap: str, name: str, users: int, steps: int, partitions: int, k: int) -> list[int]:
    """Writes the topics; returns the rank (0: not in the list) each judged recommendation must get."""
    producer = Producer(producer_config(bootstrap, {"linger.ms": 20}))
    admin = admin_client(bootstrap)
    ensure_topics(admin, [TopicSpec(f"ev-{name}", partitions)])
    log, offsets, ranks = topic_id(admin, f"ev-{name}"), [0] * partitions, []
    for step in range(steps):  # in time order, as a live topic is written
        for u in range(users):
            p, user = u % partitions, f"user-{u}"
            event = Event(user, _item(u, step), "click", T0 + step * 60_000 + u)
            produce_waiting(producer, f"ev-{name}", encode_event(event), user.encode(), partition=p)
            rank = (step + u) % (k + 5) + 1  # the next item's place in this list; past k: not in it
            filler = [f"other-{j}" for j in range(k)]
            if rank <= k and step + 1 < steps:
                filler[rank - 1] = _item(u, step + 1)
                ranks.append(rank)
            elif step + 1 < steps:
                ranks.append(0)
            rec = Recommendation(user, [ScoredItem(i, 1.0) for i in filler], "v1", f"{user}-s", None, p, offsets[p],
                                 event.timestamp_ms, T0, f"ev-{name}", log)
            produce_waiting(producer, f"rec-{name}", encode_recommendation(rec), user.encode())
            offsets[p] += 1
    assert producer.flush(120) == 0
    return ranks


def _judge(bootstrap: str, name: str, k: int) -> QualityReport:
    return quality(bootstrap, input_topic=f"ev-{name}", output_topic=f"rec-{name}", ks=[1, k], extra=CONSUMER,
                   progress=lambda line: print(line, file=sys.stderr))


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--events", type=int, default=200_000)
    ap.add_argument("--users", type=int, default=20_000)
    ap.add_argument("--partitions", type=int, default=4)
    ap.add_argument("--k", type=int, default=20)
    args = ap.parse_args()
    if (args.partitions < 1 or args.events < 2 * args.users or args.users < args.partitions
            or not 1 <= args.k <= 500):
        ap.error("need --partitions >= 1, --events >= 2 x --users, --users >= --partitions and 1 <= --k <= 500")
    name, steps = uuid.uuid4().hex[:8], args.events // args.users
    with LocalBroker() as broker:
        t0 = time.perf_counter()
        ranks = _write(broker.bootstrap, name, args.users, steps, args.partitions, args.k)
        written_s = time.perf_counter() - t0
        before = _rss_mb()
        t0 = time.perf_counter()
        report = _judge(broker.bootstrap, name, args.k)
        seconds = time.perf_counter() - t0
        peak = _rss_mb()
        tracemalloc.start()  # a second judgement, traced: tracing slows every allocation, so it is not timed
        _judge(broker.bootstrap, name, args.k)
        traced = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
    row = next(r for r in report.rows() if r["name"] == "v1" and r["kind"] == "all")
    expected = {"recall@1": sum(r == 1 for r in ranks) / len(ranks),
                f"recall@{args.k}": sum(r > 0 for r in ranks) / len(ranks)}
    events = steps * args.users
    print(json.dumps({
        "events": events, "users": args.users, "partitions": args.partitions, "seconds": round(seconds, 2),
        "events_per_s": round(events / seconds), "write_seconds": round(written_s, 1),
        "judged": row["judged"], "pending": report.pending,
        **{k: round(row[k], 4) for k in expected}, **{f"expected_{k}": round(v, 4) for k, v in expected.items()},
        "peak_traced_mb": round(traced / 2**20, 1),
        "peak_rss_mb_before": round(before, 1), "peak_rss_mb_after": round(peak, 1),
        "correct": row["judged"] == len(ranks) and report.pending == args.users
        and all(abs(row[k] - v) < 1e-9 for k, v in expected.items()),
    }))
    return 0


if __name__ == "__main__":
    exit_on_sigterm()
    sys.exit(exit_status(main, Path(__file__).name))
