"""`hrnn audit` on a long log: how fast it reads, what memory it takes; prints ONE JSON object.

    python bench/audit_scale.py [--records 200000] [--partitions 4] [--missing 7]

Everything on 127.0.0.1 (the local broker, `LocalBroker`), stopping by itself. The bench writes
--records input records over --partitions partitions, one recommendation record for each of them
except --missing (spread over the partitions), and commits the group's offsets at each partition's
end, as a drained worker would; then runs `stream.audit.audit` in this process, as `hrnn audit` does.

  seconds            wall seconds of the audit (the committed offsets, three topic scans, the count)
  records_per_s      audited input records / seconds (each one is read twice: the input record
                     and its recommendation)
  peak_rss_mb_before / peak_rss_mb_after
                     this process's peak RSS before and after the audit (resource.getrusage). The
                     audit keeps one byte per audited offset, not the records it reads; most of the
                     rise is librdkafka's fetch buffers (a second audit in the same process does not
                     raise the peak again)
  found_unanswered   what the audit reported; `correct` is whether it equals --missing
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

from confluent_kafka import Consumer, Producer, TopicPartition  # noqa: E402

from stream.audit import audit  # noqa: E402
from stream.broker import LocalBroker  # noqa: E402
from stream.kafka_clients import admin_client, consumer_config, producer_config, topic_id  # noqa: E402
from stream.topics import TopicSpec, ensure_topics  # noqa: E402
from stream.records import Recommendation, encode_recommendation  # noqa: E402

CONSUMER = {"session.timeout.ms": "6000", "fetch.wait.max.ms": "10"}


def _rss_mb() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _send(producer: Producer, topic: str, value: bytes, partition: int | None = None) -> None:
    while True:
        try:
            producer.produce(topic, value, b"u", **({} if partition is None else {"partition": partition}))
            return
        except BufferError:  # the local queue is full: let deliveries drain it
            producer.poll(0.1)


def _write(bootstrap: str, name: str, n: int, partitions: int, missing: int) -> None:
    producer = Producer(producer_config(bootstrap, {"linger.ms": 20}))
    admin = admin_client(bootstrap)
    ensure_topics(admin, [TopicSpec(f"ev-{name}", partitions)])
    log, per = topic_id(admin, f"ev-{name}"), n // partitions  # recommendations name their log, as the worker's
    skip: set[tuple[int, int]] = set()
    i = 0
    while len(skip) < missing:  # distinct (partition, offset) pairs, spread
        skip.add((i % partitions, (i * 7919 + 13) % per))
        i += 1
    for p in range(partitions):
        for o in range(per):
            _send(producer, f"ev-{name}", b'{"user_id": "u"}', p)
            if (p, o) not in skip:
                rec = Recommendation(user_id="u", items=[], model_version="v", session_id="s", event_id=str(o),
                                     source_partition=p, source_offset=o, event_timestamp=0, emitted_at=0,
                                     source_topic=f"ev-{name}", source_log=log)
                _send(producer, f"rec-{name}", encode_recommendation(rec))
    assert producer.flush(120) == 0
    committer = Consumer(consumer_config(bootstrap, f"grp-{name}", CONSUMER))
    committer.commit(offsets=[TopicPartition(f"ev-{name}", p, per) for p in range(partitions)], asynchronous=False)
    committer.close()


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--records", type=int, default=200_000)
    ap.add_argument("--partitions", type=int, default=4)
    ap.add_argument("--missing", type=int, default=7)
    args = ap.parse_args()
    if args.records < args.partitions or not 0 <= args.missing <= args.records // args.partitions:
        ap.error("need --records >= --partitions and 0 <= --missing <= --records / --partitions")
    name = uuid.uuid4().hex[:8]
    with LocalBroker() as broker:
        t0 = time.perf_counter()
        _write(broker.bootstrap, name, args.records, args.partitions, args.missing)
        written_s = time.perf_counter() - t0
        before = _rss_mb()
        t0 = time.perf_counter()
        report = audit(broker.bootstrap, input_topic=f"ev-{name}", output_topic=f"rec-{name}",
                       dlq_topic=f"ev-{name}.dlq", group=f"grp-{name}", extra=CONSUMER, idle_s=2.0,
                       progress=lambda line: print(line, file=sys.stderr))
        seconds = time.perf_counter() - t0
    audited = report.total("records")
    print(json.dumps({
        "records": audited, "partitions": args.partitions, "seconds": round(seconds, 2),
        "records_per_s": round(audited / seconds), "write_seconds": round(written_s, 1),
        "peak_rss_mb_before": round(before, 1), "peak_rss_mb_after": round(_rss_mb(), 1),
        "found_unanswered": report.total("unanswered"), "correct": report.total("unanswered") == args.missing,
    }))
    return 0


if __name__ == "__main__":
    sys.exit(main())
