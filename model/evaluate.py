"""Offline evaluation: score the test sequences of a split with fitted scorers, chunk by chunk.

Rankings are always over the whole catalogue and unfiltered (items of the current session
are not hidden). For last-session splits the main metrics are the "rest" slice (2nd..last
event of each test session, given everything before it); the first event of each test
session is reported as the "first/" slice. For personalize splits the metrics are set-based
(one ranking per held-out user vs its held-out items).
"""
from __future__ import annotations

import sys
from dataclasses import dataclass, field
from typing import Any, Iterator

import numpy as np
from tqdm import tqdm

from model.errors import HRNNError
from model.metrics import CUTOFFS, NextItemMetrics, SetMetrics
from model.scorer import Scorer, UserSequence
from model.splits import PERSONALIZE, Split

FIRST = "first/"
_ROW_BUDGET = 1 << 25  # score elements (rows x items) per scorer call: 128 MiB of float32


@dataclass
class EvalResult:
    protocol: str
    n_test_events: int  # rankings in the main slice
    models: dict[str, dict[str, float]] = field(default_factory=dict)
    cutoffs: tuple[int, ...] = CUTOFFS
    n_first_events: int = 0  # rankings in the "first" slice (last-session only)
    # test events no model can rank (item unseen in training), or in a test session that left too short
    n_left_out_events: int = 0
    n_left_out_users: int = 0  # personalize: held-out users none of whose held-out items occur in training

    def to_json(self) -> dict[str, Any]:
        return {"protocol": self.protocol, "n_test_events": self.n_test_events,
                "n_first_events": self.n_first_events, "n_left_out_events": self.n_left_out_events,
                "n_left_out_users": self.n_left_out_users, "cutoffs": list(self.cutoffs),
                "models": {name: dict(m) for name, m in self.models.items()}}


def _chunks(seqs: list[UserSequence], firsts: list[np.ndarray], truths: list[np.ndarray] | None,
            batch_users: int, max_rows: int) -> Iterator[tuple[list[UserSequence], list[np.ndarray], list]]:
    """Groups of at most batch_users sequences and about max_rows targets; long target lists are cut."""
    cur_s: list[UserSequence] = []
    cur_f: list[np.ndarray] = []
    cur_t: list = []
    rows = 0
    for i, s in enumerate(seqs):
        for a in range(0, len(s.targets), max_rows):
            part = s if len(s.targets) <= max_rows else UserSequence(
                user=s.user, items=s.items, ts_ms=s.ts_ms, event_type=s.event_type,
                session_start=s.session_start, targets=s.targets[a:a + max_rows])
            n = len(part.targets)
            if cur_s and (len(cur_s) >= batch_users or rows + n > max_rows):
                yield cur_s, cur_f, cur_t
                cur_s, cur_f, cur_t, rows = [], [], [], 0
            cur_s.append(part)
            cur_f.append(firsts[i][a:a + max_rows])
            cur_t.append(None if truths is None else truths[i])
            rows += n
    if cur_s:
        yield cur_s, cur_f, cur_t


def _score(scorer: Scorer, name: str, seqs: list[UserSequence], n_items: int) -> list[np.ndarray]:
    out = scorer.score(seqs)
    if len(out) != len(seqs):
        raise HRNNError(f"scorer {name!r} returned {len(out)} score arrays for {len(seqs)} sequences")
    for s, sc in zip(seqs, out):
        if sc.shape != (len(s.targets), n_items):
            raise HRNNError(f"scorer {name!r} returned scores of shape {sc.shape}, expected "
                            f"({len(s.targets)}, {n_items}): one row per target over the whole catalogue")
    return out


def evaluate(split: Split, scorers: dict[str, Scorer], *, cutoffs: tuple[int, ...] = CUTOFFS,
             batch_users: int = 256, progress: bool = True) -> EvalResult:
    """Metrics of each fitted scorer on the split's test sequences (fits nothing)."""
    if batch_users < 1:
        raise HRNNError(f"batch_users must be >= 1, got {batch_users}")
    n_items = split.n_items
    max_rows = max(1, _ROW_BUDGET // max(1, n_items))
    by_set = split.protocol == PERSONALIZE
    n_first = 0 if by_set else split.n_first_targets
    result = EvalResult(protocol=split.protocol, n_test_events=split.n_targets - n_first,
                        cutoffs=tuple(cutoffs), n_first_events=n_first,
                        n_left_out_events=split.dropped_test_events, n_left_out_users=split.dropped_users)
    for name, scorer in scorers.items():
        if by_set:
            main: NextItemMetrics | SetMetrics = SetMetrics(n_items, cutoffs)
        else:
            main = NextItemMetrics(n_items, cutoffs)
        first = NextItemMetrics(n_items, cutoffs)
        bar = tqdm(total=split.n_targets, desc=f"evaluate {name}", unit="event", file=sys.stderr,
                   disable=not progress, leave=False)
        for seqs, firsts, truths in _chunks(split.test, split.target_first, split.ground_truth,
                                            batch_users, max_rows):
            scores = _score(scorer, name, seqs, n_items)
            if by_set:
                main.add(np.concatenate(scores), truths)  # type: ignore[arg-type]
            else:
                mat = np.concatenate(scores)
                tgt = np.concatenate([s.items[s.targets] for s in seqs])
                is_first = np.concatenate(firsts)
                main.add(mat[~is_first], tgt[~is_first])
                if is_first.any():
                    first.add(mat[is_first], tgt[is_first])
            bar.update(sum(len(s.targets) for s in seqs))
        bar.close()
        metrics = main.result()
        if not by_set:
            metrics.update({FIRST + k: v for k, v in first.result().items()})
        result.models[name] = metrics
    return result


TABLE_COLUMNS = ("recall@5", "recall@10", "recall@20", "mrr@20", "ndcg@20", "coverage@20", "first/recall@20")


def format_table(result: EvalResult, columns: tuple[str, ...] = TABLE_COLUMNS) -> str:
    """An aligned text table: one row per model, the chosen metrics as columns (absent ones omitted)."""
    cols = [c for c in columns if any(c in m for m in result.models.values())]
    head = ["model"] + cols
    rows = [[name] + [f"{m[c]:.4f}" if c in m else "-" for c in cols] for name, m in result.models.items()]
    widths = [max(len(r[i]) for r in [head] + rows) for i in range(len(head))]
    fmt = lambda r: "  ".join(v.ljust(w) if i == 0 else v.rjust(w) for i, (v, w) in enumerate(zip(r, widths)))
    title = f"protocol {result.protocol}: {result.n_test_events} test events"
    if result.n_first_events:
        title += f" (+{result.n_first_events} session-first events in first/)"
    if result.n_left_out_events:
        title += (f"; {result.n_left_out_events} test-session events left out: their item never occurs in training "
                  "(no model can rank it), or their session was left too short")
    if result.n_left_out_users:
        title += f"; {result.n_left_out_users} held-out users left out: none of their held-out items occurs in training"
    lines = [title, fmt(head), fmt(["-" * w for w in widths])] + [fmt(r) for r in rows]
    return "\n".join(lines)
