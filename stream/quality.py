"""Online recommendation quality (`hrnn quality`): how often a user's next event hit the list the
worker sent for the event before it, per model version, read from the topics a deployment already has.

A recommendation answers an input record (its partition and offset); it is judged against the item of
the same user's next valid event on the input topic. Events are keyed by user, so that one lies later in
the same partition (a mis-keyed event's re-keyed copy too: the worker scores the copy, not the original).
The figures are the offline next-item ones on live traffic: recall@k (the next item among the first k of
the list) and MRR@k, also split by whether the next event continued the session (its recommendation names
the same session) or opened the user's next one: the cross-session step the hierarchical model is for.

Beside every version, on the same judged events, a reference list: the user's own distinct items of the
events read, newest first (a plain repeat heuristic). It knows only the events read while the worker's state
holds the user's whole history, so on a short window it is handicapped unless `history_ms` of events before
the window are read for it too (they are not judged).

A recommendation whose user had no later event among those read is `pending`, not judged; one read twice
(at least once: a batch replayed after a crash) is judged once. What the worker left out of a list (items
off sale, purchases) was not shown, so a next event on it is a miss: the figures are what users saw. So is
a next item ranked past the largest cutoff: no figure reads a rank beyond it, and a list may be of any length.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from functools import cached_property
from pathlib import Path
from typing import Callable, Iterable, Mapping, Sequence

import msgspec
import numpy as np

from model.errors import ConfigError, EventError
from model.events import decode_event
from stream import records
from stream.audit import MissingOutputTopic
from stream.kafka_clients import ClientSettings, KafkaClientError, Record, admin_client, topic_id, window_offsets
from stream.settings import MAX_K, WorkerSettings
from stream.topic_window import ANSWER_SKEW_MS, Bounds, earlier, read_window, window_bounds

REFERENCE = "recent items (reference)"
DEFAULT_KS = (1, 5, 10, 20)
Z95 = 1.959964  # two-sided 95% quantile of the normal distribution


@dataclass
class Ranks:
    """Judged recommendations counted by the rank of the next item in the list (index 0: not in it)."""

    counts: np.ndarray

    @property
    def judged(self) -> int:
        return int(self.counts.sum())

    def recall(self, k: int) -> float:
        return float(self.counts[1:k + 1].sum() / self.judged) if self.judged else float("nan")

    def mrr(self, k: int) -> float:
        hits = self.counts[1:k + 1]
        return float((hits / np.arange(1, len(hits) + 1)).sum() / self.judged) if self.judged else float("nan")


SAME, NEXT = 1, 2  # kinds of judged recommendation; 0: the next event's recommendation was not read


@dataclass
class Verdicts:
    """The judged recommendations, one entry each: ranks are 1-based, 0 where the next item was not in the list."""

    versions: list[str]  # names of the version codes, in the order they first served
    version: np.ndarray  # code into `versions`
    emitted_at: np.ndarray  # ms
    rank: np.ndarray
    reference_rank: np.ndarray
    kind: np.ndarray  # SAME, NEXT or 0
    user: np.ndarray  # a code per user
    user_names: Sequence[str] = ()  # by code, where known

    def ranks(self, mask: np.ndarray, reference: bool = False) -> Ranks:
        ranks = (self.reference_rank if reference else self.rank)[mask]
        return Ranks(np.bincount(ranks, minlength=MAX_K + 1).astype(np.int64))

    def estimate(self, mask: np.ndarray, k: int, metric: str) -> Estimate:
        """recall@k or MRR@k of the masked lists, with a 95% interval that counts users, not lists, as the
        independent draws (a user's lists are alike; a canary assigns users): the ratio estimator's
        cluster-robust standard error."""
        rank = self.rank[mask]
        gain = (rank >= 1) & (rank <= k)
        value = gain.astype(float) if metric == "recall" else np.where(gain, 1.0 / np.maximum(rank, 1), 0.0)
        _, user = np.unique(self.user[mask], return_inverse=True)
        got, lists = np.bincount(user, value), np.bincount(user).astype(float)
        m, total = len(lists), lists.sum()
        if m == 0:
            return Estimate(float("nan"), float("nan"), 0, 0)
        mean = got.sum() / total
        se = np.sqrt(m / (m - 1) * ((got - mean * lists) ** 2).sum()) / total if m > 1 else float("nan")
        return Estimate(float(mean), float(se), int(total), m)


@dataclass(frozen=True)
class Estimate:
    value: float
    se: float  # standard error, users as the independent draws
    lists: int
    users: int

    @property
    def half_width(self) -> float:
        """of the 95% interval"""
        return Z95 * self.se

    def to_dict(self) -> dict:
        return {**vars(self), "half_width": self.half_width}


@dataclass(frozen=True)
class Comparison:
    """Two versions served at the same time to different users (a canary beside the stable version)."""

    baseline: str
    candidate: str
    start_ms: int  # the first and last list of the two in the buckets compared: emission times
    end_ms: int
    left_out_users: int  # served by both within that time (a share raised mid-way): in neither side
    metrics: dict[str, tuple[Estimate, Estimate]]  # "recall@k" / "mrr@k" -> (baseline, candidate)
    bucket_ms: int = 0  # the time buckets compared are those in which both served lists; 0: not bucketed
    served_ms: int | None = None  # time served side by side; None: end_ms - start_ms
    alone_ms: int = 0  # buckets in which only one of them served (a promotion, a rollback): not compared

    @property
    def side_by_side_ms(self) -> int:
        return self.end_ms - self.start_ms if self.served_ms is None else self.served_ms

    def difference(self, metric: str) -> tuple[float, float]:
        """candidate - baseline, and the 95% half width (the sides' users are disjoint: independent)."""
        diff, se = self.difference_se(metric)
        return diff, Z95 * se

    def difference_se(self, metric: str) -> tuple[float, float]:
        """candidate - baseline, and its standard error."""
        a, b = self.metrics[metric]
        return b.value - a.value, float(np.hypot(a.se, b.se))

    def facing(self, baseline: str) -> "Comparison":
        """This comparison with `baseline` (one of its two versions) as the baseline."""
        if baseline == self.baseline:
            return self
        return replace(self, baseline=self.candidate, candidate=self.baseline,
                       metrics={name: (b, a) for name, (a, b) in self.metrics.items()})

    @property
    def users(self) -> int:
        """users judged on both sides together"""
        return sum(e.users for e in next(iter(self.metrics.values())))

    def verdict(self, metric: str) -> str:
        """"better" or "worse" when the whole interval of the difference lies on that side of 0."""
        diff, half = self.difference(metric)
        return "better" if diff - half > 0 else "worse" if diff + half < 0 else "no difference shown"

    def to_dict(self) -> dict:
        return {"baseline": self.baseline, "candidate": self.candidate, "start_ms": self.start_ms,
                "end_ms": self.end_ms, "side_by_side_ms": self.side_by_side_ms, "bucket_ms": self.bucket_ms,
                "alone_ms": self.alone_ms, "left_out_users": self.left_out_users,
                "metrics": {name: {"baseline": a.to_dict(), "candidate": b.to_dict(),
                                   "difference": self.difference(name)[0],
                                   "ci95": self.difference(name)[1], "verdict": self.verdict(name)}
                            for name, (a, b) in self.metrics.items()}}


@dataclass
class QualityReport:
    input_topic: str
    output_topic: str
    ks: list[int]
    since_ms: int | None
    verdicts: Verdicts
    pending: int = 0  # recommendations whose user had no later event among those read
    input_log: str | None = None

    def ranks(self) -> dict[str, dict[str, Ranks]]:
        """name (a version, or REFERENCE over every judged recommendation) -> kind -> Ranks."""
        v = self.verdicts
        kinds = {"all": v.kind >= 0, "same session": v.kind == SAME, "next session": v.kind == NEXT}
        out = {name: {kind: v.ranks(m & (v.version == code)) for kind, m in kinds.items()}
               for code, name in enumerate(v.versions)}
        if len(v.rank):
            out[REFERENCE] = {kind: v.ranks(m, reference=True) for kind, m in kinds.items()}
        return out

    def rows(self) -> list[dict]:
        k_max = max(self.ks)
        return [{"name": name, "kind": kind, "judged": r.judged,
                 **{f"recall@{k}": r.recall(k) for k in self.ks}, f"mrr@{k_max}": r.mrr(k_max)}
                for name, by_kind in self.ranks().items() for kind, r in by_kind.items()]

    def series(self, k: int, bucket_ms: int) -> dict[str, list[tuple[int, int, float, float]]]:
        """name -> (bucket start ms, judged, recall@k, MRR@k) per bucket of emission time with judged events."""
        v = self.verdicts
        bucket = v.emitted_at // bucket_ms * bucket_ms
        out: dict[str, list[tuple[int, int, float, float]]] = {}
        for code, name in [*enumerate(v.versions), (-1, REFERENCE)]:
            mine = v.version == code if code >= 0 else np.ones(len(bucket), bool)
            rows = []
            for b in np.unique(bucket[mine]):
                r = v.ranks(mine & (bucket == b), reference=code < 0)
                rows.append((int(b), r.judged, r.recall(k), r.mrr(k)))
            if rows:
                out[name] = rows
        return out

    def comparisons(self) -> list[Comparison]:
        """Each canary against the version it served beside (the baseline), over the time both served to
        different users: the chart's time buckets in which both served lists. Users served by both then are
        left out of both sides."""
        return list(self._comparisons)

    @cached_property
    def _comparisons(self) -> tuple[Comparison, ...]:
        # Computed once: the printer, the JSON, --fail-if-worse and --decide-canary all read it, and each pair
        # of overlapping versions costs several passes over every judged list.
        v, k = self.verdicts, max(self.ks)
        width = bucket_ms_for(self)
        bucket = v.emitted_at // width
        served = [np.unique(bucket[v.version == c]) for c in range(len(v.versions))]
        out = []
        for a, b in ((a, b) for b in range(len(v.versions)) for a in range(b)):
            spans, alone_ms = self._side_by_side(a, b, bucket, served[a], served[b], width)
            if not spans:
                continue  # one after the other
            during = np.zeros(len(v.emitted_at), dtype=bool)
            for start, end in spans:
                during |= (v.emitted_at >= start) & (v.emitted_at <= end)
            users_a, users_b = (np.unique(v.user[during & (v.version == c)]) for c in (a, b))
            both = np.intersect1d(users_a, users_b)
            if len(both) in (len(users_a), len(users_b)):
                continue  # every user of one side saw the other version too: a swap, not side by side
            if self._is_canary(a, b, np.setdiff1d(users_a, both), np.setdiff1d(users_b, both)):
                a, b = b, a
            sides = [during & (v.version == c) & ~np.isin(v.user, both) for c in (a, b)]
            metrics = {f"{m}@{k}": (v.estimate(sides[0], k, m), v.estimate(sides[1], k, m))
                       for m in ("recall", "mrr")}
            out.append(Comparison(v.versions[a], v.versions[b], spans[0][0], spans[-1][1], len(both), metrics,
                                  width, sum(e - s for s, e in spans), alone_ms))
        return tuple(out)

    def _side_by_side(self, a: int, b: int, bucket: np.ndarray, served_a: np.ndarray, served_b: np.ndarray,
                      width: int) -> tuple[list[tuple[int, int]], int]:
        """The times versions `a` and `b` served side by side, as (first, last) emission times, and the time of
        the buckets between in which one served alone (not compared).

        Not simply the span from the later one's first list to the earlier one's last: after a canary is
        promoted and then rolled back, that span holds the time the canary served everyone, whose users would
        "see both" and leave one side only, no longer a random split. So the chart's buckets in which both
        served are cut into runs at each bucket one served alone, and each run is clipped to its later first list
        and earlier last list: whole buckets would reach back before an announcement, where the canary's users
        were served by the stable version."""
        v, union = self.verdicts, np.union1d(served_a, served_b)
        alone = ~np.isin(union, np.intersect1d(served_a, served_b))
        runs = np.cumsum(alone)
        spans = []
        for r in np.unique(runs[~alone]):
            lo, hi = union[(runs == r) & ~alone][[0, -1]]
            inside = (bucket >= lo) & (bucket <= hi)
            ta, tb = (v.emitted_at[inside & (v.version == c)] for c in (a, b))
            first, last = max(ta.min(), tb.min()), min(ta.max(), tb.max())
            if first <= last:
                spans.append((int(first), int(last)))
        common = (union >= max(served_a[0], served_b[0])) & (union <= min(served_a[-1], served_b[-1]))
        return spans, int((alone & common).sum()) * width

    def _is_canary(self, a: int, b: int, users_a: np.ndarray, users_b: np.ndarray) -> bool:
        """Whether `a`, the first of the two to serve in what was read, is the canary beside `b`: its users
        and `b`'s are split as `a`'s canary hash splits users (at one share, or at a share raised mid-way:
        stream.canary.canary_split_chance), and not as `b`'s. What was read can open while a canary serves, with
        either version's list; when the split does not tell (no user names, too few
        users), the first to serve is the baseline."""
        # not at the top: stream.canary imports this module
        from stream.canary import SPLIT_CHANCE, canary_split_chance, split_as_canary

        v = self.verdicts
        if not v.user_names:
            return False
        names_a, names_b = ([v.user_names[u] for u in users] for users in (users_a, users_b))
        version_a, version_b = v.versions[a], v.versions[b]
        split_a, split_b = split_as_canary(version_a, names_a, names_b), split_as_canary(version_b, names_b, names_a)
        if split_a or split_b:
            return split_a and not split_b
        # A share raised mid-way leaves the users between its shares on both sides: no side lies wholly below
        # the other by either key, and taking the first to serve as the baseline would face the canary the wrong
        # way (a worse canary reported better). Its key still splits them far beyond chance; the other's does not.
        return (canary_split_chance(version_a, names_a, names_b) < SPLIT_CHANCE
                <= canary_split_chance(version_b, names_b, names_a))

    def to_dict(self) -> dict:
        return {"input_topic": self.input_topic, "output_topic": self.output_topic, "input_log": self.input_log,
                "since_ms": self.since_ms, "ks": self.ks, "judged": len(self.verdicts.rank),
                "pending": self.pending, "versions": self.verdicts.versions, "rows": self.rows(),
                "comparisons": [c.to_dict() for c in self.comparisons()]}


class Board:
    """Per input partition, what is known of each event read, by offset: its user's next event (the offset
    and its item), the reference list's rank of that item, and what its recommendation said."""

    def __init__(self, first: int, end: int) -> None:
        n = max(0, end - first)
        self.first, self.end = first, end
        self.next = np.full(n, -1, np.int64)  # offset of the same user's next event; -1: none read
        self.item = np.full(n, -1, np.int32)  # that event's item, a code into Judge.item_names
        self.reference = np.zeros(n, np.int16)  # at most the Judge's depth (<= MAX_K)
        self.rank = np.full(n, -1, np.int16)  # -1: no recommendation read; at most the Judge's depth (<= MAX_K)
        self.version = np.full(n, -1, np.int32)  # one code per model version: a long-lived topic holds many
        self.session = np.full(n, -1, np.int64)  # a code into Judge.sessions
        self.emitted = np.zeros(n, np.int64)
        self.user = np.full(n, -1, np.int32)  # a code into Judge.users

    def holds(self, offset: int) -> bool:
        return self.first <= offset < self.end

    def verdicts(self) -> tuple[np.ndarray, ...]:
        """(version, emitted_at, rank, reference rank, kind, user) of the recommendations judged here."""
        judged = np.flatnonzero((self.rank >= 0) & (self.next >= 0))
        after = self.session[self.next[judged] - self.first]  # the next event is one of those read: on this board
        kind = np.where(after < 0, 0, np.where(after == self.session[judged], SAME, NEXT))
        return (self.version[judged], self.emitted[judged], self.rank[judged].astype(np.int64),
                self.reference[judged].astype(np.int64), kind, self.user[judged].astype(np.int64))


class Judge:
    """Reads the input events (`add_event`) and then the recommendations (`add_recommendation`), and judges
    each recommendation against the item of its user's next event."""

    def __init__(self, bounds: Bounds, input_topic: str, input_log: str | None, depth: int,
                 judged_from: Mapping[int, int] | None = None,
                 max_event_lead_s: float = WorkerSettings.max_event_lead_s) -> None:
        if not 1 <= depth <= MAX_K:  # ranks up to `depth` are kept as int16
            raise ConfigError(f"the largest cutoff must lie in [1, {MAX_K}], got {depth}")
        self.boards = {p: Board(first, end) for p, (first, end) in bounds.items()}
        # Events before these offsets (the history read for the reference list) are not judged.
        self.judged_from = judged_from or {}
        self.topic, self.log, self.depth = input_topic, input_log, depth
        self.max_event_lead_s = max_event_lead_s  # the workers': an event they dead-letter is no user's next
        self.last: dict[tuple[int, str], int] = {}  # (partition, user) -> offset of the user's latest event
        self.recent: dict[str, list[int]] = {}  # user -> the reference list: distinct item codes, newest first
        self.items: dict[str, int] = {}  # item -> code; item_names[code] -> item
        self.item_names: list[str] = []
        self.sessions: dict[str | None, int] = {}
        self.versions: dict[str, int] = {}
        self.users: dict[str, int] = {}
        self.pending = 0
        self.copied: set[tuple[int, int]] = set()  # (partition, offset) of the records a re-keyed copy was read of

    def add_event(self, r: Record) -> None:
        board = self.boards.get(r.partition)
        if board is None or not board.holds(r.offset):
            return
        try:
            event = decode_event(r.value)
        except EventError:
            return  # a dead letter: no recommendation to judge, and not an event of the user
        if records.invalid_event(event, r.timestamp_ms, self.max_event_lead_s) is not None:
            return  # dead-lettered too (bad_timestamp)
        if r.key != event.user_id.encode():
            return  # mis-keyed: the worker re-keys it and scores the copy, which is read in its own partition
        # judged as the workers judge it: a header they would not take for their copy's makes an ordinary event
        origin = records.repartitioned_from(r.headers, self.topic, self.log, r.partition, r.offset)
        if origin is not None:
            if origin in self.copied:
                return  # copied again after a crash: the worker applies the first copy only, so the user's is that
            self.copied.add(origin)
        user, item = event.user_id, self._item_code(event.item_id)  # codes: one int object per item, shared
        recent = self.recent.setdefault(user, [])
        before = self.last.get((r.partition, user))
        if before is not None:
            i = before - board.first
            board.next[i], board.item[i] = r.offset, item
            board.reference[i] = recent.index(item) + 1 if item in recent else 0
        self.last[(r.partition, user)] = r.offset
        if item in recent:
            recent.remove(item)
        recent.insert(0, item)
        del recent[self.depth:]

    def add_recommendation(self, r: Record) -> None:
        try:
            rec = records.decode_recommendation(r.value or b"")
        except (msgspec.DecodeError, msgspec.ValidationError):
            return
        board = self.boards.get(rec.source_partition)
        if board is None or not board.holds(rec.source_offset) \
                or rec.source_offset < self.judged_from.get(rec.source_partition, 0) \
                or not records.names_log(self.topic, self.log, rec.source_topic, rec.source_log):
            return  # an event outside those judged, or another log's
        i = rec.source_offset - board.first
        if board.rank[i] >= 0:
            return  # a replay's second answer: judged once
        board.session[i] = self.sessions.setdefault(rec.session_id, len(self.sessions))
        board.version[i] = self.versions.setdefault(rec.model_version, len(self.versions))
        board.emitted[i] = rec.emitted_at
        board.user[i] = self.users.setdefault(rec.user_id, len(self.users))
        if board.next[i] < 0:
            board.rank[i] = 0  # read (a replay's answer is not counted again), but not judged: no next event
            self.pending += 1
            return
        wanted = self.item_names[board.item[i]]
        # Only the first `depth` (the largest cutoff) are looked at: a rank past it is a miss at every cutoff,
        # and the list, of any length, would not fit the board's ranks.
        board.rank[i] = next((n for n, s in enumerate(rec.items[:self.depth], 1) if s.item_id == wanted), 0)

    def _item_code(self, item: str) -> int:
        code = self.items.get(item)
        if code is None:
            code = self.items[item] = len(self.item_names)
            self.item_names.append(item)
        return code

    def verdicts(self) -> Verdicts:
        parts = [b.verdicts() for b in self.boards.values()]
        cols = [np.concatenate([p[c] for p in parts]) if parts else np.zeros(0, np.int64) for c in range(6)]
        version, emitted = cols[0], cols[1]
        names = list(self.versions)
        # Number the versions judged in the order they first served, as a table and a plot read them.
        order = sorted(np.unique(version), key=lambda code: emitted[version == code].min())
        recode = np.zeros(len(names), np.int64)
        recode[order] = np.arange(len(order))
        return Verdicts([names[c] for c in order], recode[version], emitted, *cols[2:], list(self.users))


def quality(bootstrap: str, *, input_topic: str, output_topic: str, ks: Iterable[int] = DEFAULT_KS,
            extra: ClientSettings | None = None, since_ms: int | None = None, history_ms: int = 0,
            idle_s: float = 2.0, timeout_s: float = 600.0, max_event_lead_s: float = WorkerSettings.max_event_lead_s,
            progress: Callable[[str], None] = lambda _: None) -> QualityReport:
    """Judge the recommendations on `output_topic` against the next events on `input_topic`; with `since_ms`,
    those of the input records of that time on (Kafka timestamps, epoch ms), the events of `history_ms` before
    it read too, for the reference list only. Events the workers dead-letter (stamped more than
    `max_event_lead_s` ahead of their record, as their settings say) are no user's next event."""
    ks = sorted(set(ks))
    bounds = window_bounds(bootstrap, {input_topic: earlier(since_ms, history_ms),
                                       output_topic: earlier(since_ms, ANSWER_SKEW_MS)}, extra, timeout_s=timeout_s)
    if not bounds[input_topic]:
        raise KafkaClientError(f"topic {input_topic!r} does not exist on {bootstrap}")
    if not bounds[output_topic]:  # else nothing judged would read as a report, and pass --fail-if-worse
        raise MissingOutputTopic(output_topic, bootstrap)
    # With history, the judged part starts later within the bounds already read: bisect there, not from scratch.
    judged = window_offsets(bootstrap, input_topic, since_ms, bounds[input_topic], extra) if history_ms \
        else bounds[input_topic]
    log = topic_id(admin_client(bootstrap, extra), input_topic)
    judge = Judge(bounds[input_topic], input_topic, log, depth=max(ks),
                  judged_from={p: first for p, (first, _) in judged.items()}, max_event_lead_s=max_event_lead_s)
    read_window(bootstrap, input_topic, bounds[input_topic], judge.add_event, idle_s=idle_s, timeout_s=timeout_s,
                extra=extra, progress=progress)
    read_window(bootstrap, output_topic, bounds[output_topic], judge.add_recommendation, idle_s=idle_s,
                timeout_s=timeout_s, extra=extra, progress=progress)
    return QualityReport(input_topic, output_topic, ks, since_ms, judge.verdicts(), judge.pending, log)


def quality_worker(settings: WorkerSettings, **kwargs) -> QualityReport:
    """`quality` of the worker group `settings` configure: its topics, client settings and event checks."""
    return quality(settings.bootstrap_servers, input_topic=settings.input_topic, output_topic=settings.output_topic,
                   extra=settings.consumer_kafka, max_event_lead_s=settings.max_event_lead_s, **kwargs)


def bucket_ms_for(report: QualityReport, buckets: int = 30) -> int:
    """A bucket width (whole seconds) that cuts the judged recommendations' emission times into about `buckets`."""
    t = report.verdicts.emitted_at
    span = int(t.max() - t.min()) if len(t) else 0
    return max(1000, -(-span // (buckets * 1000)) * 1000)


def plot_quality(report: QualityReport, path: str | Path, k: int, bucket_ms: int | None = None) -> Path:
    """Recall@k and MRR@k over emission time, one line per version and the reference dashed; a line breaks
    where a version had no judged recommendation for a bucket or more (it did not serve then)."""
    from model.plots import plt, save_figure  # matplotlib only when a chart is asked for

    bucket_ms = bucket_ms or bucket_ms_for(report)
    series = report.series(k, bucket_ms)
    t0 = min((rows[0][0] for rows in series.values()), default=0)
    span_ms = max((rows[-1][0] for rows in series.values()), default=t0) + bucket_ms - t0
    unit, unit_ms = next((u, ms) for u, ms in (("h", 3_600_000), ("min", 60_000), ("s", 1000))
                         if span_ms >= 3 * ms or ms == 1000)
    fig, axes = plt.subplots(1, 2, figsize=(11, 4))
    for name, rows in series.items():
        t, recall, mrr = with_gaps(rows, bucket_ms)
        t = (t + bucket_ms / 2 - t0) / unit_ms
        style = {"ls": "--", "color": "grey"} if name == REFERENCE else {"marker": "o", "ms": 3}
        for ax, y in zip(axes, (recall, mrr)):
            ax.plot(t, y, label=name, **style)
    for ax, metric in zip(axes, (f"recall@{k}", f"MRR@{k}")):
        ax.set(xlabel=f"{unit} since the first recommendation judged ({bucket_ms / 1000:g} s buckets)",
               ylabel=f"{metric} of the next event", title=f"Online {metric} by model version")
        ax.legend(fontsize=8)
    return save_figure(fig, path, dpi=110)


def with_gaps(rows: list[tuple[int, int, float, float]], bucket_ms: int) -> tuple[np.ndarray, ...]:
    """A series' bucket starts, recall and MRR, with a NaN point inside each run of empty buckets, so the
    chart does not draw a line across a time the version did not serve."""
    out: list[tuple[float, float, float]] = []
    for i, (b, _, recall, mrr) in enumerate(rows):
        if i and b - rows[i - 1][0] > bucket_ms:
            out.append((rows[i - 1][0] + bucket_ms, float("nan"), float("nan")))
        out.append((b, recall, mrr))
    return tuple(np.array(col, dtype=float) for col in zip(*out)) if out else (np.array([]),) * 3
