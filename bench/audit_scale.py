"""`hrnn audit` on a long log: how fast it reads, what memory it takes; prints ONE JSON object.

    python bench/audit_scale.py [--records 200000] [--partitions 4] [--missing 7] [--window-share 0.1]

Everything on 127.0.0.1 (the local broker, `LocalBroker`), stopping by itself. The bench writes
--records input records over --partitions partitions, one recommendation record for each of them
except --missing (drawn at random over the partitions, the same ones every run), and commits the group's
offsets at each partition's end, as a drained worker would; then runs `stream.audit.audit` in this
process, as `hrnn audit` does.
The input records' timestamps are spread evenly over the last 10 hours (each answer 1 ms after its
record); a second audit then takes only the last --window-share of that time (`hrnn audit --since-s`).

  seconds            wall seconds of the audit (the committed offsets, three topic scans, the count)
  records_per_s      audited input records / seconds (each one is read twice: the input record
                     and its recommendation)
  peak_rss_mb_before / peak_rss_mb_after
                     this process's peak RSS before and after the audit (resource.getrusage). The
                     audit keeps one byte per audited offset, not the records it reads; most of the
                     rise is librdkafka's fetch buffers (a second audit in the same process does not
                     raise the peak again)
  found_unanswered   what the audit reported; `correct` is whether it equals --missing
  window             the windowed audit: seconds, records audited, found_unanswered and `correct`
                     (equal to the missing records of the window)
Writing the topics is not timed. The local broker keeps everything in memory, and its reads slow
as it holds more; an Apache Kafka broker is another machine.
"""
from __future__ import annotations

import argparse
import json
import resource
import sys
import time
import uuid
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import numpy as np  # noqa: E402
from confluent_kafka import Consumer, Producer, TopicPartition  # noqa: E402

from stream.cli_common import exit_on_sigterm  # noqa: E402
from model.errors import exit_status  # noqa: E402
from stream.audit import AuditReport, audit  # noqa: E402
from stream.broker import LocalBroker  # noqa: E402
from stream.kafka_clients import (admin_client, consumer_config, produce_waiting, producer_config,  # noqa: E402
                                  topic_id)
from stream.records import Recommendation, encode_recommendation  # noqa: E402
from stream.topics import TopicSpec, ensure_topics  # noqa: E402

CONSUMER = {"session.timeout.ms": "6000", "fetch.wait.max.ms": "10"}
SPAN_MS = 10 * 3_600_000  # the input's timestamps cover this much time, up to the bench's start


def _rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _write(bootstrap: str, name: str, n: int, partitions: int, missing: int, now_ms: int) -> set[tuple[int, int]]:
    """Writes the topics; returns the (partition, offset) of the records left unanswered."""
    producer = Producer(producer_config(bootstrap, {"linger.ms": 20}))
    admin = admin_client(bootstrap)
    ensure_topics(admin, [TopicSpec(f"ev-{name}", partitions)])
    log, per = topic_id(admin, f"ev-{name}"), n // partitions  # recommendations name their log, as the worker's
    skip = unanswered(partitions, per, missing)
    for o in range(per):  # in time order, as a live topic is written
        for p in range(partitions):
            ts = _timestamp(o, per, now_ms)
            produce_waiting(producer, f"ev-{name}", b'{"user_id": "u"}', b"u", timestamp=ts, partition=p)
            if (p, o) not in skip:
                rec = Recommendation(user_id="u", items=[], model_version="v", session_id="s", event_id=str(o),
                                     source_partition=p, source_offset=o, event_timestamp=0, emitted_at=0,
                                     source_topic=f"ev-{name}", source_log=log)
                produce_waiting(producer, f"rec-{name}", encode_recommendation(rec), b"u", timestamp=ts + 1)
    assert producer.flush(120) == 0
    committer = Consumer(consumer_config(bootstrap, f"grp-{name}", CONSUMER))
    committer.commit(offsets=[TopicPartition(f"ev-{name}", p, per) for p in range(partitions)], asynchronous=False)
    committer.close()
    return skip


def unanswered(partitions: int, per: int, missing: int, seed: int = 0) -> set[tuple[int, int]]:
    """`missing` distinct (partition, offset) pairs of `partitions` partitions of `per` records each, drawn
    without replacement (a fixed seed: every run leaves the same records unanswered). A stepped walk over
    the offsets could come back to pairs it had drawn and never reach `missing`."""
    drawn = np.random.default_rng(seed).choice(partitions * per, missing, replace=False)
    return {(int(k) % partitions, int(k) // partitions) for k in drawn}


def _timestamp(offset: int, per: int, now_ms: int) -> int:
    return now_ms - SPAN_MS + offset * SPAN_MS // per


def _audit(bootstrap: str, name: str, since_ms: int | None = None) -> tuple[AuditReport, float]:
    t0 = time.perf_counter()
    report = audit(bootstrap, input_topic=f"ev-{name}", output_topic=f"rec-{name}", dlq_topic=f"ev-{name}.dlq",
                   group=f"grp-{name}", extra=CONSUMER, since_ms=since_ms, idle_s=2.0,
                   progress=lambda line: print(line, file=sys.stderr))
    return report, time.perf_counter() - t0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--records", type=int, default=200_000)
    ap.add_argument("--partitions", type=int, default=4)
    ap.add_argument("--missing", type=int, default=7)
    ap.add_argument("--window-share", type=float, default=0.1)
    args = ap.parse_args()
    if args.partitions < 1:  # checked first: the checks below divide by it
        ap.error("--partitions must be >= 1")
    if args.records < args.partitions or not 0 <= args.missing <= args.records // args.partitions:
        ap.error("need --records >= --partitions and 0 <= --missing <= --records / --partitions")
    if not 0 < args.window_share <= 1:
        ap.error("--window-share must be in (0, 1]")
    name, now_ms, per = uuid.uuid4().hex[:8], int(time.time() * 1000), args.records // args.partitions
    since_ms = now_ms - int(SPAN_MS * args.window_share)
    with LocalBroker() as broker:
        t0 = time.perf_counter()
        skip = _write(broker.bootstrap, name, args.records, args.partitions, args.missing, now_ms)
        written_s = time.perf_counter() - t0
        before = _rss_mb()
        report, seconds = _audit(broker.bootstrap, name)
        peak = _rss_mb()
        window, window_s = _audit(broker.bootstrap, name, since_ms)
    audited = report.total("records")
    missing_in_window = sum(_timestamp(o, per, now_ms) >= since_ms for _, o in skip)
    print(json.dumps({
        "records": audited, "partitions": args.partitions, "seconds": round(seconds, 2),
        "records_per_s": round(audited / seconds), "write_seconds": round(written_s, 1),
        "peak_rss_mb_before": round(before, 1), "peak_rss_mb_after": round(peak, 1),
        "found_unanswered": report.total("unanswered"), "correct": report.total("unanswered") == args.missing,
        "window": {"share": args.window_share, "seconds": round(window_s, 2), "records": window.total("records"),
                   "found_unanswered": window.total("unanswered"),
                   "correct": window.total("unanswered") == missing_in_window},
    }))
    return 0


if __name__ == "__main__":
    exit_on_sigterm()
    sys.exit(exit_status(main, Path(__file__).name))
