"""The repeat-aware scoring head: one history window in every path, scores only for the user's own items,
and the effect on quality both ways (it helps when users repeat, it costs nothing when they do not)."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from model.config import DataConfig, HRNNConfig
from model.evaluate import evaluate
from model.inference import HRNNScorer, Recommender, StepInput
from model.interactions import Interactions
from model.network import HRNN
from model.pipeline import prepare
from model.repeat import HistoryWindow, RepeatHead, sequence_windows, type_slots, window_from_events
from model.sessions import session_starts
from model.splits import last_session_split
from model.synth import generate
from model.train import TrainSequences, fit

MIN_MS = 60_000
HOUR_MS = 60 * MIN_MS


def _log(seed: int = 0, users: int = 6, per_user: int = 25, items: int = 15) -> Interactions:
    rng = np.random.default_rng(seed)
    rows = []
    for u in range(users):
        t = 1_700_000_000_000 + int(rng.integers(0, HOUR_MS))
        for _ in range(per_user):
            t += int(rng.choice([MIN_MS, 3 * MIN_MS, 5 * HOUR_MS]))
            rows.append((f"u{u}", f"i{int(rng.integers(0, items))}", t, "purchase" if rng.random() < 0.3 else "click"))
    return Interactions.from_columns(*zip(*rows))


def _same(a: HistoryWindow, b: HistoryWindow) -> None:
    for name in ("items", "ts_ms", "types", "in_session", "present"):
        assert torch.equal(getattr(a, name), getattr(b, name)), name


def _random_head(n_items: int, hidden: int = 8, seed: int = 0) -> RepeatHead:
    torch.manual_seed(seed)
    head = RepeatHead(n_items, hidden)
    with torch.no_grad():
        for p in head.parameters():
            p.add_(torch.randn_like(p) * 0.5)
    return head.eval()


@pytest.mark.parametrize("length", [4, 100])
def test_training_evaluation_and_the_online_api_build_the_same_window(length):
    data = _log()
    starts = session_starts(data, 1800)
    seqs = TrainSequences.build(data, starts, HRNNConfig(history_length=length))
    user = 2
    rows = np.flatnonzero(data.user == user)
    first = rows[0]
    flags = starts[rows].copy()
    flags[0] = True
    for p in rows[1:]:
        k = p - first  # position of the predicted event in the user's sequence
        # training predicts row p from the state after row p-1: its window ends at p-1
        train_win = seqs.windows(np.array([p - 1]), length, np.array([starts[p]]))
        eval_win = sequence_windows([data.item[rows]], [data.ts_ms[rows]], [data.event_type[rows]], [starts[rows]],
                                    [np.array([k])], length, torch.device("cpu"))
        _same(train_win, eval_win)
        assert int(train_win.present.sum()) == min(k, length)
        assert int(train_win.items[0, -1]) == int(data.item[p - 1])  # the newest column is the latest event
        if starts[p]:  # a session-opening target shares its session with no earlier event
            assert not train_win.in_session.any()
        else:  # online, the next event is assumed to continue the session: the same window
            online_events = [(int(data.item[r]), int(data.ts_ms[r]),
                              int(type_slots(np.array([data.event_type[r]]))[0]), bool(f))
                             for r, f in zip(rows[:k], flags[:k])]
            _same(train_win, window_from_events([online_events], length, torch.device("cpu")))


def test_the_window_spans_earlier_sessions_and_flags_only_the_current_one():
    data = _log()
    starts = session_starts(data, 1800)
    seqs = TrainSequences.build(data, starts, HRNNConfig())
    rows = np.flatnonzero(data.user == 1)
    end = rows[-1]
    win = seqs.windows(np.array([end]), 100, np.array([False]))
    sess_begin = max(r for r in rows if starts[r])
    assert int(win.present.sum()) == len(rows)
    assert int(win.in_session.sum()) == end - sess_begin + 1
    assert len(set(np.flatnonzero(starts[rows]))) > 1  # several sessions are in the window


def test_only_items_of_the_window_are_rescored_and_candidate_columns_match_the_catalogue():
    n_items = 20
    head = _random_head(n_items)
    t0 = 1_700_000_000_000
    events = [[(3, t0, 1, True), (5, t0 + MIN_MS, 2, False), (3, t0 + 2 * MIN_MS, 1, False), (-1, t0 + 3 * MIN_MS, 1, False)],
              [(7, t0, 1, True)], []]
    win = window_from_events(events, 6, torch.device("cpu"))
    h = torch.randn(3, 8)
    with torch.no_grad():
        dense = head.dense(h, win, n_items)
        cands = torch.tensor([5, 3, 9, 3, 7, 0])
        at = head.at(h, win, cands)
    nonzero = {(r, c) for r, c in zip(*np.nonzero(dense.numpy()))}
    assert nonzero == {(0, 3), (0, 5), (1, 7)}  # unknown items (-1) and empty windows get nothing
    torch.testing.assert_close(at, dense[:, cands])
    assert RepeatHead.members(win, cands).tolist() == [[True, True, False, True, False, False],
                                                       [False, False, False, False, True, False],
                                                       [False] * 6]


def test_the_repeat_head_adds_its_scores_to_the_catalogue_scores_in_place():
    torch.manual_seed(0)
    model = HRNN(20, HRNNConfig(hidden_dimension=8, repeat_head=True)).eval()
    with torch.no_grad():
        for prm in model.repeat.parameters():
            prm.add_(torch.randn_like(prm) * 0.5)
    t0 = 1_700_000_000_000
    win = window_from_events([[(3, t0, 1, True), (5, t0 + MIN_MS, 2, False), (3, t0 + 2 * MIN_MS, 1, False)],
                              [(7, t0, 1, True)], []], 6, torch.device("cpu"))
    h = torch.randn(3, 8)
    with torch.no_grad():
        catalogue = torch.addmm(model.out_bias, model.output_with(h, win), model.out_weight.t())
        scores = catalogue.clone()
        assert model.repeat.add_to(scores, h, win) is scores
        torch.testing.assert_close(scores, catalogue + model.repeat.dense(h, win, 20))
        torch.testing.assert_close(model.score_all(h, win), scores)
    assert (scores != catalogue).sum() == 3  # the windows' items only: (0, 3), (0, 5), (1, 7)


def test_the_window_profile_is_the_mean_embedding_of_the_windows_known_events():
    head = _random_head(10)
    t0 = 1_700_000_000_000
    events = [[(2, t0, 1, True), (-1, t0 + MIN_MS, 1, False), (2, t0 + 2 * MIN_MS, 1, False), (5, t0 + 3 * MIN_MS, 1, False)],
              [(-1, t0, 1, True)], []]
    with torch.no_grad():
        prof = head.profile(window_from_events(events, 6, torch.device("cpu")))
        emb = head.profile_emb
        torch.testing.assert_close(prof[0], (2 * emb[2] + emb[5]) / 3)  # unknown items and padding do not count
    assert not prof[1:].any()  # nothing known: no profile
    assert RepeatHead(10, 8, profile=False).profile(window_from_events(events, 6, torch.device("cpu"))) is None


@pytest.mark.parametrize("profile", [True, False])
def test_only_the_window_profile_lets_the_window_move_the_scores_of_items_the_user_never_had(profile):
    torch.manual_seed(0)
    model = HRNN(12, HRNNConfig(hidden_dimension=32, repeat_head=True, window_profile=profile)).eval()
    with torch.no_grad():
        for prm in model.repeat.parameters():
            prm.add_(torch.randn_like(prm) * 0.5)
    t0 = 1_700_000_000_000
    a = window_from_events([[(1, t0, 1, True), (2, t0 + MIN_MS, 1, False)]], 10, torch.device("cpu"))
    b = window_from_events([[(3, t0, 1, True), (4, t0 + MIN_MS, 1, False)]], 10, torch.device("cpu"))
    h = torch.randn(1, 32)
    with torch.no_grad():
        never = torch.tensor([0, 5, 6, 7, 8, 9, 10, 11])  # in neither window
        moved = not torch.allclose(model.score_all(h, a)[:, never], model.score_all(h, b)[:, never])
    assert moved == profile


def test_a_version_saved_before_the_window_profile_existed_loads_without_it(tmp_path):
    import json

    from model.artifact import _sha256, load_version, save_version

    cfg = HRNNConfig(hidden_dimension=32, repeat_head=True, window_profile=False)
    path = save_version(tmp_path, HRNN(6, cfg), cfg, DataConfig(), [f"i{k}" for k in range(6)], ["click"])
    conf = json.loads((path / "config.json").read_text())
    del conf["hrnn"]["window_profile"]
    (path / "config.json").write_text(json.dumps(conf))
    manifest = json.loads((path / "manifest.json").read_text())
    manifest["files"]["config.json"] = _sha256(path / "config.json")
    (path / "manifest.json").write_text(json.dumps(manifest))
    loaded = load_version(path)
    assert loaded.config.window_profile is False and loaded.model.repeat.profile_emb is None


def test_ages_are_measured_from_the_newest_event_so_a_common_time_shift_changes_nothing():
    head = _random_head(10)
    t0 = 1_700_000_000_000
    evs = [(1, t0, 1, True), (2, t0 + 20 * MIN_MS, 1, False), (1, t0 + 3 * HOUR_MS, 2, True), (4, t0 + 4 * HOUR_MS, 1, False)]
    shifted = [(i, t + 86_400_000 * 30, ty, f) for i, t, ty, f in evs]
    h = torch.randn(1, 8)
    with torch.no_grad():
        a = head.dense(h, window_from_events([evs], 10, torch.device("cpu")), 10)
        b = head.dense(h, window_from_events([shifted], 10, torch.device("cpu")), 10)
        older = [(i, t - (30 * MIN_MS if j == 0 else 0), ty, f) for j, (i, t, ty, f) in enumerate(evs)]
        c = head.dense(h, window_from_events([older], 10, torch.device("cpu")), 10)
    torch.testing.assert_close(a, b)
    assert not torch.allclose(a[0, 1], c[0, 1])  # an older first event of item 1 changes item 1's score


@pytest.mark.parametrize("shift_ms", [-10_000_000, -1_700_000_000_000], ids=["just-before-1970", "1916"])
def test_a_shift_to_times_before_1970_changes_no_repeat_score(shift_ms):
    head = _random_head(10)
    evs = [(1, 0, 1, True), (2, HOUR_MS, 1, False), (1, 2 * HOUR_MS, 2, False)]  # the window of 10 is not full
    shifted = [(i, t + shift_ms, ty, f) for i, t, ty, f in evs]
    h = torch.randn(1, 8)
    with torch.no_grad():
        a = head.dense(h, window_from_events([evs], 10, torch.device("cpu")), 10)
        b = head.dense(h, window_from_events([shifted], 10, torch.device("cpu")), 10)
    assert int(window_from_events([shifted], 10, torch.device("cpu")).now_ms()[0]) == 2 * HOUR_MS + shift_ms
    torch.testing.assert_close(a, b)


def test_the_online_recommender_uses_the_head_with_the_models_item_and_type_index(tmp_path):
    from model.artifact import save_version

    data = _log()
    cfg = HRNNConfig(hidden_dimension=32, repeat_head=True)
    model = HRNN(data.n_items, cfg).eval()
    with torch.no_grad():
        model.repeat.gate.bias.fill_(5.0)
        model.repeat.mlp[2].bias.fill_(10.0)  # any item of the window beats the whole catalogue
    path = save_version(tmp_path, model, cfg, DataConfig(), list(data.item_ids), list(data.event_types))
    rec = Recommender.load(path, device="cpu")
    t0 = 1_700_000_000_000
    seen = [data.item_ids[3], data.item_ids[7]]
    evs = [StepInput("x", seen[0], "click", t0), StepInput("x", "not-in-catalogue", "click", t0 + MIN_MS),
           StepInput("x", seen[1], "purchase", t0 + 2 * MIN_MS)]
    out = rec.recommend({}, evs, k=2, filters=None)
    assert {i for i, _ in out.items[-1]} == set(seen)


def _train_and_score(data: Interactions, cfg: HRNNConfig) -> dict:
    prep = prepare(data, DataConfig(max_user_history_length_percentile=1.0))
    split = last_session_split(prep.data, prep.starts)
    result = fit(split.train, split.train_starts, cfg, progress=False)
    scorer = HRNNScorer(result.model)
    scorer.fit(split.train, split.train_starts)
    return evaluate(split, {"m": scorer}, cutoffs=(20,), progress=False).models["m"]


QUICK = dict(hidden_dimension=48, batch_size=32, n_sample=128, seed=1)


@pytest.fixture(scope="module")
def synth_repeat_results():
    # Users revisiting their items half of the time; and none beyond chance (tastes are stable, popularity skewed).
    sizes = {0.5: dict(users=700, epochs=6), 0.0: dict(users=1000, epochs=8)}
    out = {}
    for share, size in sizes.items():
        data = generate(size["users"], 300, seed=5, repeat_share=share, events_per_user=20)
        out[share] = {on: _train_and_score(data, HRNNConfig(repeat_head=on, epochs=size["epochs"], **QUICK))
                      for on in (False, True)}
    return out


def test_the_head_lifts_quality_when_users_come_back_to_their_items(synth_repeat_results):
    plain, rep = synth_repeat_results[0.5][False], synth_repeat_results[0.5][True]
    assert rep["mrr@20"] > 1.3 * plain["mrr@20"]
    assert rep["recall@20"] > 1.2 * plain["recall@20"]


def test_the_head_costs_next_to_nothing_when_users_do_not_repeat(synth_repeat_results):
    plain, rep = synth_repeat_results[0.0][False], synth_repeat_results[0.0][True]
    assert rep["mrr@20"] >= 0.96 * plain["mrr@20"]
    assert rep["recall@20"] >= 0.97 * plain["recall@20"]


def test_on_reddit_one_epoch_of_the_head_beats_plain_hrnn_and_matches_the_repeat_heuristic(reddit_path):
    from model.baselines import make_baseline
    from model.loaders import load_interactions
    from model.pipeline import fit_inputs
    from model.splits import make_split

    data = load_interactions(reddit_path, columns={"USER_ID": "0", "ITEM_ID": "1", "TIMESTAMP": "2"}, time_unit="s")
    prep = prepare(data, DataConfig())
    split = make_split("last-session", prep.data, prep.starts)
    inputs = fit_inputs(data, DataConfig(), "last-session", early_stopping=False)
    scorers = {"user-repeat+session": make_baseline("user-repeat+session")}
    for on in (False, True):
        model = fit(inputs.train, inputs.starts, HRNNConfig(repeat_head=on, epochs=1), progress=False).model
        scorers[f"repeat={on}"] = HRNNScorer.for_vocabulary(model, [str(i) for i in inputs.train.item_ids],
                                                            split.train.item_ids)
    for s in scorers.values():
        s.fit(split.train, split.train_starts)
    res = evaluate(split, scorers, cutoffs=(20,), progress=False).models
    assert res["repeat=True"]["mrr@20"] > 1.3 * res["repeat=False"]["mrr@20"]
    assert res["repeat=True"]["mrr@20"] > 0.97 * res["user-repeat+session"]["mrr@20"]
