"""Offline evaluation: slices, chunking, result shape, the table, and the baselines on reddit."""
from __future__ import annotations

import json

import numpy as np
import pytest

import model.evaluate as evaluate_mod
from model.baselines import BASELINES, fit_baselines
from model.errors import HRNNError
from model.evaluate import EvalResult, evaluate, format_table
from model.interactions import Interactions
from model.scorer import UserSequence
from model.sessions import session_starts
from model.splits import last_session_split, personalize_split

HOUR_MS = 3_600_000


class Oracle:
    """Fake scorer that peeks at the target (unit tests only): every target ranks first."""

    name = "oracle"

    def __init__(self, n_items: int, truths: list[np.ndarray] | None = None) -> None:
        self.n_items, self.truths, self.calls = n_items, truths, 0

    def fit(self, train, session_start) -> None:
        pass

    def score(self, seqs: list[UserSequence]) -> list[np.ndarray]:
        self.calls += 1
        out = []
        for s in seqs:
            sc = np.zeros((len(s.targets), self.n_items), dtype=np.float32)
            sc[np.arange(len(s.targets)), s.items[s.targets]] = 1.0
            out.append(sc)
        return out


class Constant(Oracle):
    name = "constant"

    def score(self, seqs):
        return [np.ones((len(s.targets), self.n_items), dtype=np.float32) for s in seqs]


class WrongShape(Oracle):
    def score(self, seqs):
        return [np.zeros((1, 3), dtype=np.float32) for _ in seqs]


def synthetic_log(seed: int = 0, n_users: int = 80, n_items: int = 60) -> Interactions:
    rng = np.random.default_rng(seed)
    users, items, ts = [], [], []
    for u in range(n_users):
        t = 0
        for _ in range(int(rng.integers(2, 5))):
            for _ in range(int(rng.integers(2, 6))):
                users.append(f"u{u}")
                items.append(f"i{int(rng.integers(0, n_items))}")
                ts.append(t)
                t += 60_000
            t += 5 * HOUR_MS
    return Interactions.from_columns(users, items, ts)


@pytest.fixture(scope="module")
def split():
    data = synthetic_log()
    return last_session_split(data, session_starts(data, 1800))


def test_an_oracle_scores_perfectly_and_a_constant_scorer_zero(split):
    res = evaluate(split, {"oracle": Oracle(split.n_items), "constant": Constant(split.n_items)}, progress=False)
    o, c = res.models["oracle"], res.models["constant"]
    for k in (5, 10, 20, 25):
        assert o[f"recall@{k}"] == 1.0 and o[f"mrr@{k}"] == 1.0 and o[f"ndcg@{k}"] == 1.0
        assert o[f"first/recall@{k}"] == 1.0
        assert c[f"recall@{k}"] == 0.0 and c[f"first/mrr@{k}"] == 0.0


def test_slices_split_targets_into_rest_and_session_first(split):
    res = evaluate(split, {"oracle": Oracle(split.n_items)}, progress=False)
    m = res.models["oracle"]
    assert m["first/n_events"] == len(split.test) == res.n_first_events
    assert m["n_events"] + m["first/n_events"] == split.n_targets
    assert res.n_test_events == m["n_events"]
    for key in ("recall@20", "mrr@20", "ndcg@20", "precision@20", "coverage@20"):
        assert key in m and "first/" + key in m


def test_results_do_not_depend_on_chunking(split, monkeypatch):
    base = fit_baselines(["user-repeat+session", "sknn"], split.train, split.train_starts)
    whole = evaluate(split, base, batch_users=256, progress=False).models
    small = evaluate(split, base, batch_users=3, progress=False).models
    monkeypatch.setattr(evaluate_mod, "_ROW_BUDGET", split.n_items * 2)  # cuts target lists into pairs
    cut = evaluate(split, base, batch_users=256, progress=False).models
    for name in base:
        assert whole[name] == pytest.approx(small[name]) and whole[name] == pytest.approx(cut[name])


def test_scorers_are_called_per_chunk_of_users(split):
    oracle = Oracle(split.n_items)
    evaluate(split, {"oracle": oracle}, batch_users=10, progress=False)
    assert oracle.calls == -(-len(split.test) // 10)


def test_a_scorer_with_the_wrong_output_shape_is_reported(split):
    with pytest.raises(HRNNError, match="shape"):
        evaluate(split, {"bad": WrongShape(split.n_items)}, progress=False)


def test_personalize_results_are_set_based():
    data = synthetic_log(1, n_users=200)
    sp = personalize_split(data, session_starts(data, 1800), seed=0)

    class SetOracle(Oracle):
        def score(self, seqs):
            out = []
            for s in seqs:
                truth = sp.ground_truth[[id(x) for x in sp.test].index(id(s))]
                sc = np.zeros((1, self.n_items), dtype=np.float32)
                sc[0, truth] = np.arange(len(truth), 0, -1)  # distinct: equal scores would tie pessimistically
                out.append(sc)
            return out

    res = evaluate(sp, {"set-oracle": SetOracle(sp.n_items)}, progress=False)
    m = res.models["set-oracle"]
    assert res.protocol == "personalize" and m["n_events"] == len(sp.test)
    assert m["recall@25"] == pytest.approx(1.0) and m["ndcg@25"] == pytest.approx(1.0)
    assert not any(k.startswith("first/") for k in m)


def test_to_json_is_serialisable_and_names_protocol_and_models(split):
    res = evaluate(split, {"oracle": Oracle(split.n_items)}, progress=False)
    doc = json.loads(json.dumps(res.to_json()))
    assert doc["protocol"] == "last-session" and doc["n_test_events"] == res.n_test_events
    assert doc["models"]["oracle"]["recall@20"] == 1.0


def test_format_table_has_one_aligned_row_per_model():
    res = EvalResult("last-session", 10, {"pop": {"recall@20": 0.4, "mrr@20": 0.1},
                                          "user-repeat+session": {"recall@20": 0.88, "mrr@20": 0.68}})
    lines = format_table(res).splitlines()
    body = lines[1:]
    assert "recall@20" in body[0] and "mrr@20" in body[0] and "coverage@20" not in body[0]
    assert len({len(line) for line in body}) == 1
    assert body[2].startswith("pop ") and "0.4000" in body[2]
    assert body[3].startswith("user-repeat+session") and "0.8800" in body[3]


def test_reddit_last_session_baselines_order_sensibly(reddit_path):
    """Reference (the issue, last-session, 30-min sessions): USER-REPEAT+SESSION R@20 .884 MRR@20 .677,
    session kNN .839/.639, popularity .408/.109."""
    from model.loaders import load_interactions

    data = load_interactions(reddit_path, columns={"USER_ID": "0", "ITEM_ID": "1", "TIMESTAMP": "2"}, time_unit="s")
    split = last_session_split(data, session_starts(data, 1800))
    scorers = fit_baselines(BASELINES, split.train, split.train_starts)
    m = evaluate(split, scorers, progress=False).models
    urs, sknn, pop = m["user-repeat+session"], m["sknn"], m["pop"]
    assert urs["recall@20"] > pop["recall@20"] + 0.3
    assert urs["mrr@20"] > 3 * pop["mrr@20"]
    assert sknn["recall@20"] > pop["recall@20"] + 0.3
    assert urs["recall@20"] >= sknn["recall@20"]
    # within a few points of the published figures
    assert abs(urs["recall@20"] - 0.884) < 0.03 and abs(urs["mrr@20"] - 0.677) < 0.03
    assert abs(sknn["recall@20"] - 0.839) < 0.03 and abs(sknn["mrr@20"] - 0.639) < 0.03
    assert abs(pop["recall@20"] - 0.408) < 0.03 and abs(pop["mrr@20"] - 0.109) < 0.03
    for name, r in m.items():
        assert 0 <= r["mrr@20"] <= r["ndcg@20"] <= r["recall@20"] <= r["recall@25"] <= 1, name
        assert r["coverage@5"] <= r["coverage@20"], name
    # history-based scorers also predict the session's first event; session-only ones cannot
    assert urs["first/recall@20"] > pop["first/recall@20"] + 0.3
    assert sknn["first/recall@20"] == pytest.approx(pop["first/recall@20"], abs=0.01)


def test_the_table_says_how_many_test_events_were_left_out_and_why():
    """Each user's test session a0, new-x, new-y, a1: the two items never in training cannot be ranked by any
    model, so they leave the test; the table says so rather than scoring 20 of the 40 events silently."""
    users, items, ts = [], [], []
    for u in range(10):
        for day, session in enumerate([["a0", "a1", "a2"], ["a0", f"new{u}x", f"new{u}y", "a1"]]):
            for j, item in enumerate(session):
                users.append(f"u{u}")
                items.append(item)
                ts.append(day * 24 * HOUR_MS + u * 1000 + j * 60_000)
    data = Interactions.from_columns(users, items, ts)
    split = last_session_split(data, session_starts(data, 1800))
    res = evaluate(split, {"oracle": Oracle(split.n_items)}, progress=False)
    assert (res.n_test_events, res.n_first_events, res.n_left_out_events) == (10, 10, 20)
    assert "; 20 test-session events left out: their item never occurs in training" in format_table(res)
    assert res.to_json()["n_left_out_events"] == 20
