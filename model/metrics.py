"""Ranking metrics against the full catalogue.

Ties count against the model: the rank of an item is the number of catalogue items scoring
at least as high as it (itself included), so rank 1 needs a strict win and a constant scorer
ranks every item last. NaN scores count as the lowest possible score.

Two kinds of ranking:
- next-item (one target per ranking): recall@K (hit rate), MRR@K, NDCG@K, precision@K = hit/K;
- set (one ranking per user vs the set G of held-out items, the Personalize protocol):
  precision@K = hits/K, recall@K = hits/|G|, NDCG@K = DCG/ideal DCG with min(|G|, K) ideal hits,
  MRR@K = 1/rank of the first hit.
Both report coverage@K: the share of catalogue items that appear in any top-K list.

Accumulators take score matrices chunk by chunk, so memory stays bounded by the chunk.
"""
from __future__ import annotations

import numpy as np

CUTOFFS: tuple[int, ...] = (5, 10, 20, 25)
_CHUNK_ELEMENTS = 1 << 24  # compare at most this many scores at once (16M bools)


def _clean(scores: np.ndarray) -> np.ndarray:
    scores = np.asarray(scores)
    if scores.ndim != 2:
        raise ValueError(f"scores must be a 2-d (rankings, items) array, got shape {scores.shape}")
    if np.issubdtype(scores.dtype, np.floating) and np.isnan(scores).any():
        scores = np.where(np.isnan(scores), -np.inf, scores)
    return scores


def pessimistic_ranks(scores: np.ndarray, rows: np.ndarray, items: np.ndarray) -> np.ndarray:
    """Rank (1-based) of scores[rows[j], items[j]] in its row: how many items score >= it."""
    scores = _clean(scores)
    rows = np.asarray(rows, dtype=np.int64)
    items = np.asarray(items, dtype=np.int64)
    out = np.empty(len(rows), dtype=np.int64)
    step = max(1, _CHUNK_ELEMENTS // max(1, scores.shape[1]))
    for a in range(0, len(rows), step):
        r, i = rows[a:a + step], items[a:a + step]
        mine = scores[r, i]
        out[a:a + step] = (scores[r] >= mine[:, None]).sum(axis=1)
    return out


def _set_ranks(scores: np.ndarray, sets: list[np.ndarray]) -> np.ndarray:
    """Ranks of each row's relevant items, concatenated: pessimistic against the other items (one tied with a
    relevant item ranks above it), but relevant items tied with each other take consecutive ranks, as in any
    ordering of them (the plain pessimistic rank would give each the last of their ranks)."""
    rows = np.repeat(np.arange(len(sets)), [len(t) for t in sets])
    items = np.concatenate(sets) if sets else np.zeros(0, dtype=np.int64)
    ranks = pessimistic_ranks(scores, rows, items)
    at = 0
    for r, t in enumerate(sets):
        mine = scores[r, t]
        order = np.argsort(-mine, kind="stable")
        higher_or_tied = np.searchsorted(-mine[order], -mine[order], side="right")  # relevant items scoring >= it
        ranks[at + order] += np.arange(1, len(t) + 1) - higher_or_tied
        at += len(t)
    return ranks


def top_k(scores: np.ndarray, k: int) -> np.ndarray:
    """Indices of the k best items of each row (unordered within the k; ties at the border broken arbitrarily)."""
    scores = _clean(scores)
    k = min(k, scores.shape[1])
    if k == scores.shape[1]:
        return np.broadcast_to(np.arange(k), (scores.shape[0], k))
    return np.argpartition(-scores, k - 1, axis=1)[:, :k]


def rank_metrics(ranks: np.ndarray, cutoffs: tuple[int, ...] = CUTOFFS) -> dict[str, float]:
    """Mean next-item metrics of single-target ranks (no coverage; see NextItemMetrics)."""
    acc = NextItemMetrics(n_items=1, cutoffs=cutoffs)
    acc.add_ranks(ranks)
    out = acc.result()
    return {k: v for k, v in out.items() if not k.startswith("coverage@")}


class _Coverage:
    def __init__(self, n_items: int, cutoffs: tuple[int, ...]) -> None:
        self.n_items = n_items
        self.seen = {k: np.zeros(n_items, dtype=bool) for k in cutoffs}

    def add(self, scores: np.ndarray) -> None:
        if scores.shape[0] == 0:
            return
        kmax = max(self.seen)
        best = top_k(scores, kmax)
        # order the kmax best so that every smaller cutoff is a prefix
        part = np.take_along_axis(scores, best, axis=1)
        best = np.take_along_axis(best, np.argsort(-part, axis=1, kind="stable"), axis=1)
        for k, seen in self.seen.items():
            seen[best[:, :k].ravel()] = True

    def result(self) -> dict[str, float]:
        return {f"coverage@{k}": float(s.sum()) / max(1, self.n_items) for k, s in self.seen.items()}


class NextItemMetrics:
    """Accumulates next-item metrics over chunks of (score row, target item) pairs."""

    def __init__(self, n_items: int, cutoffs: tuple[int, ...] = CUTOFFS) -> None:
        self.cutoffs = tuple(sorted(set(int(k) for k in cutoffs)))
        if not self.cutoffs or self.cutoffs[0] < 1:
            raise ValueError(f"cutoffs must be positive integers, got {cutoffs}")
        self.n = 0
        self.hits = {k: 0.0 for k in self.cutoffs}
        self.rr = {k: 0.0 for k in self.cutoffs}
        self.dcg = {k: 0.0 for k in self.cutoffs}
        self.coverage = _Coverage(n_items, self.cutoffs)

    def add_ranks(self, ranks: np.ndarray) -> None:
        ranks = np.asarray(ranks, dtype=np.float64)
        self.n += len(ranks)
        for k in self.cutoffs:
            hit = ranks <= k
            self.hits[k] += float(hit.sum())
            self.rr[k] += float((1.0 / ranks[hit]).sum())
            self.dcg[k] += float((1.0 / np.log2(ranks[hit] + 1.0)).sum())

    def add(self, scores: np.ndarray, targets: np.ndarray) -> None:
        """scores: (n, n_items); targets: (n,) item codes."""
        scores = _clean(scores)
        targets = np.asarray(targets, dtype=np.int64)
        if len(targets) != scores.shape[0]:
            raise ValueError(f"{scores.shape[0]} score rows for {len(targets)} targets")
        self.add_ranks(pessimistic_ranks(scores, np.arange(len(targets)), targets))
        self.coverage.add(scores)

    def result(self) -> dict[str, float]:
        d = max(1, self.n)
        out: dict[str, float] = {"n_events": float(self.n)}
        for k in self.cutoffs:
            out[f"recall@{k}"] = self.hits[k] / d
            out[f"mrr@{k}"] = self.rr[k] / d
            out[f"ndcg@{k}"] = self.dcg[k] / d
            out[f"precision@{k}"] = self.hits[k] / d / k
        out.update(self.coverage.result())
        return out


class SetMetrics:
    """Accumulates set-based metrics: one ranking per user against a set of relevant items."""

    def __init__(self, n_items: int, cutoffs: tuple[int, ...] = CUTOFFS) -> None:
        self.cutoffs = tuple(sorted(set(int(k) for k in cutoffs)))
        if not self.cutoffs or self.cutoffs[0] < 1:
            raise ValueError(f"cutoffs must be positive integers, got {cutoffs}")
        self.n = 0
        self.sums = {f"{m}@{k}": 0.0 for k in self.cutoffs for m in ("precision", "recall", "ndcg", "mrr")}
        self.coverage = _Coverage(n_items, self.cutoffs)

    def add(self, scores: np.ndarray, truths: list[np.ndarray]) -> None:
        """scores: (n, n_items); truths: n arrays of relevant item codes (non-empty)."""
        scores = _clean(scores)
        if len(truths) != scores.shape[0]:
            raise ValueError(f"{scores.shape[0]} score rows for {len(truths)} ground-truth sets")
        sets = [np.unique(np.asarray(t, dtype=np.int64)) for t in truths]
        sizes = np.array([len(t) for t in sets], dtype=np.int64)
        if (sizes == 0).any():
            raise ValueError("every ranking needs at least one ground-truth item")
        rows = np.repeat(np.arange(len(sets)), sizes)
        ranks = _set_ranks(scores, sets).astype(np.float64)
        n = len(sets)
        self.n += n
        for k in self.cutoffs:
            hit = ranks <= k
            hits = np.bincount(rows, weights=hit, minlength=n)
            dcg = np.bincount(rows, weights=np.where(hit, 1.0 / np.log2(ranks + 1.0), 0.0), minlength=n)
            ideal_disc = np.cumsum(1.0 / np.log2(np.arange(2, k + 2)))
            idcg = ideal_disc[np.minimum(sizes, k) - 1]
            best = np.full(n, np.inf)
            np.minimum.at(best, rows[hit], ranks[hit])
            self.sums[f"precision@{k}"] += float((hits / k).sum())
            self.sums[f"recall@{k}"] += float((hits / sizes).sum())
            self.sums[f"ndcg@{k}"] += float((dcg / idcg).sum())
            self.sums[f"mrr@{k}"] += float((1.0 / best).sum())
        self.coverage.add(scores)

    def result(self) -> dict[str, float]:
        d = max(1, self.n)
        out: dict[str, float] = {"n_events": float(self.n)}
        for key, s in self.sums.items():
            out[key] = s / d
        out.update(self.coverage.result())
        return out
