"""Ranking metrics: pessimistic ties, known ranks, set-based metrics, coverage, chunking."""
from __future__ import annotations

import math

import numpy as np
import pytest

import model.metrics as metrics
from model.metrics import NextItemMetrics, SetMetrics, pessimistic_ranks, rank_metrics, top_k


def test_a_tie_with_the_target_counts_against_it():
    scores = np.array([[1.0, 1.0, 1.0, 0.0]], dtype=np.float32)
    assert pessimistic_ranks(scores, [0], [0])[0] == 3


def test_rank_one_needs_a_strict_win():
    scores = np.array([[2.0, 1.0, 1.0], [2.0, 2.0, 1.0]], dtype=np.float32)
    assert list(pessimistic_ranks(scores, [0, 1], [0, 0])) == [1, 2]


def test_a_constant_scorer_ranks_every_target_last():
    n_items = 50
    acc = NextItemMetrics(n_items, cutoffs=(5, 20))
    acc.add(np.zeros((7, n_items), dtype=np.float32), np.arange(7))
    out = acc.result()
    assert out["recall@20"] == 0.0 and out["mrr@20"] == 0.0 and out["n_events"] == 7


def test_nan_scores_rank_lowest():
    scores = np.array([[np.nan, 0.5, -1.0], [0.1, np.nan, 0.2]], dtype=np.float32)
    assert list(pessimistic_ranks(scores, [0, 1], [0, 2])) == [3, 1]


def test_a_known_rank_gives_known_recall_mrr_ndcg_precision():
    target_rank = 3
    scores = np.array([[0.9, 0.8, 0.7, 0.6, 0.1]], dtype=np.float32)  # item 2 is third
    acc = NextItemMetrics(5, cutoffs=(2, 3, 5))
    acc.add(scores, np.array([2]))
    out = acc.result()
    assert out["recall@2"] == 0.0 and out["mrr@2"] == 0.0 and out["ndcg@2"] == 0.0
    for k in (3, 5):
        assert out[f"recall@{k}"] == 1.0
        assert out[f"mrr@{k}"] == pytest.approx(1 / target_rank)
        assert out[f"ndcg@{k}"] == pytest.approx(1 / math.log2(target_rank + 1))
        assert out[f"precision@{k}"] == pytest.approx(1 / k)


def test_metrics_match_a_per_event_reference_on_random_scores():
    rng = np.random.default_rng(3)
    n, n_items = 200, 40
    scores = rng.integers(0, 6, size=(n, n_items)).astype(np.float32)  # many ties
    targets = rng.integers(0, n_items, size=n)
    ranks = [int((scores[r] >= scores[r, targets[r]]).sum()) for r in range(n)]
    out = rank_metrics(pessimistic_ranks(scores, np.arange(n), targets), cutoffs=(5, 10))
    for k in (5, 10):
        assert out[f"recall@{k}"] == pytest.approx(np.mean([r <= k for r in ranks]))
        assert out[f"mrr@{k}"] == pytest.approx(np.mean([1 / r if r <= k else 0 for r in ranks]))
        assert out[f"ndcg@{k}"] == pytest.approx(np.mean([1 / math.log2(r + 1) if r <= k else 0 for r in ranks]))


def test_chunked_ranking_equals_unchunked(monkeypatch):
    rng = np.random.default_rng(0)
    scores = rng.normal(size=(300, 64)).astype(np.float32)
    rows, items = np.arange(300), rng.integers(0, 64, 300)
    whole = pessimistic_ranks(scores, rows, items)
    monkeypatch.setattr(metrics, "_CHUNK_ELEMENTS", 64 * 7)
    assert np.array_equal(pessimistic_ranks(scores, rows, items), whole)


def test_accumulating_in_chunks_equals_one_pass():
    rng = np.random.default_rng(1)
    scores = rng.normal(size=(100, 30)).astype(np.float32)
    targets = rng.integers(0, 30, 100)
    one, parts = NextItemMetrics(30), NextItemMetrics(30)
    one.add(scores, targets)
    for a in range(0, 100, 33):
        parts.add(scores[a:a + 33], targets[a:a + 33])
    assert one.result() == pytest.approx(parts.result())


def test_coverage_is_the_share_of_items_in_any_top_k_list():
    scores = np.array([[5, 4, 0, 0, 0, 0], [0, 0, 5, 4, 0, 0]], dtype=np.float32)
    acc = NextItemMetrics(6, cutoffs=(1, 2))
    acc.add(scores, np.array([0, 2]))
    out = acc.result()
    assert out["coverage@1"] == pytest.approx(2 / 6)
    assert out["coverage@2"] == pytest.approx(4 / 6)


def test_top_k_returns_the_k_best_items():
    scores = np.array([[0.1, 0.9, 0.5, 0.7]], dtype=np.float32)
    assert set(top_k(scores, 2)[0]) == {1, 3}


def test_set_metrics_for_a_known_pair_of_ranks():
    # ground truth {1, 3}: item 1 is ranked first, item 3 third
    scores = np.array([[0.4, 0.9, 0.8, 0.5, 0.1]], dtype=np.float32)
    acc = SetMetrics(5, cutoffs=(2, 3))
    acc.add(scores, [np.array([1, 3])])
    out = acc.result()
    assert out["precision@2"] == pytest.approx(1 / 2)
    assert out["recall@2"] == pytest.approx(1 / 2)
    assert out["mrr@2"] == pytest.approx(1.0)
    assert out["ndcg@2"] == pytest.approx(1.0 / (1.0 + 1 / math.log2(3)))
    assert out["precision@3"] == pytest.approx(2 / 3)
    assert out["recall@3"] == pytest.approx(1.0)
    assert out["ndcg@3"] == pytest.approx((1 + 1 / math.log2(4)) / (1 + 1 / math.log2(3)))


def test_set_mrr_is_the_reciprocal_rank_of_the_first_hit():
    scores = np.array([[0.9, 0.8, 0.7, 0.6]], dtype=np.float32)
    acc = SetMetrics(4, cutoffs=(4,))
    acc.add(scores, [np.array([2, 3])])
    assert acc.result()["mrr@4"] == pytest.approx(1 / 3)


def test_a_perfect_set_ranking_scores_one():
    truth = np.array([0, 4, 7])
    scores = np.zeros((1, 10), dtype=np.float32)
    scores[0, truth] = [3, 2, 1]
    acc = SetMetrics(10, cutoffs=(3, 5))
    acc.add(scores, [truth])
    out = acc.result()
    assert out["ndcg@3"] == pytest.approx(1.0) and out["recall@3"] == pytest.approx(1.0)
    assert out["precision@3"] == pytest.approx(1.0) and out["precision@5"] == pytest.approx(3 / 5)


def test_relevant_items_tied_with_each_other_take_consecutive_ranks_and_lose_ties_with_the_others():
    acc = SetMetrics(5, cutoffs=(1, 2))
    acc.add(np.array([[1.0, 1.0, 0.0, 0.0, 0.0]], dtype=np.float32), [np.array([0, 1])])  # the set alone on top
    out = acc.result()
    assert (out["precision@1"], out["recall@1"], out["mrr@1"], out["ndcg@2"]) == pytest.approx((1.0, 0.5, 1.0, 1.0))
    acc = SetMetrics(5, cutoffs=(2, 3))  # an irrelevant item tied with both still ranks above them: ranks 2, 3
    acc.add(np.array([[1.0, 1.0, 1.0, 0.0, 0.0]], dtype=np.float32), [np.array([0, 1])])
    out = acc.result()
    assert (out["recall@2"], out["recall@3"], out["mrr@3"]) == pytest.approx((0.5, 1.0, 0.5))


def test_an_empty_ground_truth_set_is_refused():
    with pytest.raises(ValueError, match="ground-truth"):
        SetMetrics(3).add(np.zeros((1, 3), dtype=np.float32), [np.array([], dtype=np.int64)])
