"""The trainer: exact per-slot resets, every user every epoch, determinism, recency mask, real learning."""
from __future__ import annotations

import numpy as np
import pytest
import torch

from model.config import HRNNConfig
from model.evaluate import evaluate
from model.inference import HRNNScorer
from model.baselines import make_baseline
from model.interactions import Interactions
from model.losses import ranking_loss
from model.network import HRNN
from model.sessions import session_starts
from model.splits import last_session_split
from model.synth import generate
from model.train import TrainSequences, WeightAverage, fit, run_epoch

SMALL = dict(hidden_dimension=32, batch_size=16, n_sample=16, epochs=1)


@pytest.fixture(scope="module")
def synth() -> Interactions:
    return generate(300, 200, seed=5)


def test_resetting_one_slot_leaves_the_other_slots_untouched():
    torch.manual_seed(0)
    model = HRNN(10, HRNNConfig(hidden_dimension=32)).eval()
    h_user, h_sess = torch.randn(3, 32), torch.randn(3, 32)
    items = torch.tensor([1, 2, 3])
    gap = torch.zeros(3, dtype=torch.long)
    yes = torch.ones(3, dtype=torch.bool)
    mixed = model.transition(h_user, h_sess, items, torch.tensor([True, False, False]),
                             torch.tensor([True, True, False]), yes, gap)
    alone = model.transition(h_user[1:], h_sess[1:], items[1:], torch.tensor([False, False]),
                             torch.tensor([True, False]), yes[1:], gap[1:])
    for got, want in zip(mixed, alone):
        torch.testing.assert_close(got[1:], want)
    fresh = model.transition(torch.zeros(1, 32), torch.zeros(1, 32), items[:1], yes[:1], yes[:1], yes[:1], gap[:1])
    torch.testing.assert_close(mixed[1][:1], fresh[1])


def test_an_epoch_feeds_every_event_of_every_user(synth):
    cfg = HRNNConfig(**SMALL)
    starts = session_starts(synth, 1800)
    seqs = TrainSequences.build(synth, starts, cfg)
    model = HRNN(synth.n_items, cfg)
    stats = run_epoch(model, seqs, cfg, torch.optim.Adam(model.parameters()), np.random.default_rng(0),
                      torch.device("cpu"))
    assert stats["events"] == len(synth)


def test_training_with_a_seed_is_deterministic_on_cpu(synth):
    starts = session_starts(synth, 1800)
    a = fit(synth, starts, HRNNConfig(**SMALL, seed=11), progress=False, device="cpu")
    b = fit(synth, starts, HRNNConfig(**SMALL, seed=11), progress=False, device="cpu")
    c = fit(synth, starts, HRNNConfig(**SMALL, seed=12), progress=False, device="cpu")
    for k, v in a.model.state_dict().items():
        torch.testing.assert_close(v, b.model.state_dict()[k], rtol=0, atol=0)
    assert not torch.equal(a.model.out_bias, c.model.out_bias)


@pytest.fixture()
def two_threads():
    before = torch.get_num_threads()
    torch.set_num_threads(2)
    yield
    torch.set_num_threads(before)


def test_training_with_a_seed_is_deterministic_with_threads_adding_into_shared_rows(synth, two_threads):
    # Enough sampled negatives (with replacement) that the backward of out_weight[cands] adds thousands of
    # rows into the same items across threads: torch's default kernel races there (reddit: 5th digit).
    cfg = HRNNConfig(hidden_dimension=64, batch_size=64, n_sample=2048, epochs=1, repeat_head=True, seed=3)
    starts = session_starts(synth, 1800)
    a, b = (fit(synth, starts, cfg, progress=False, device="cpu").model.state_dict() for _ in range(2))
    for k, v in a.items():
        torch.testing.assert_close(v, b[k], rtol=0, atol=0, msg=k)
    assert not torch.are_deterministic_algorithms_enabled()  # the caller's setting is given back


def _shift(model: HRNN, by: float) -> None:
    with torch.no_grad():
        for p in model.parameters():
            p.add_(by)


def test_the_weight_average_is_the_mean_of_the_steps_until_its_horizon_then_exponential():
    model = HRNN(10, HRNNConfig(hidden_dimension=32))
    start = {k: v.clone() for k, v in model.state_dict().items()}
    average = WeightAverage(model, epochs=2)
    for by in (1.0, 2.0):  # one "epoch" of two steps: weights at start+1, then start+3
        _shift(model, by)
        average.update(model)
    average.end_epoch()  # horizon: 2 epochs x 2 steps
    for k, v in average.model.state_dict().items():
        torch.testing.assert_close(v, start[k] + 2.0)  # the random start itself is not in the mean
    for _ in range(2):  # steps 3 and 4: still the plain mean, of 1, 3, 3, 3
        average.update(model)
    for k, v in average.model.state_dict().items():
        torch.testing.assert_close(v, start[k] + 2.5)
    _shift(model, 2.0)  # step 5, past the horizon: moves by 1/4 of the gap (start+5 vs start+2.5)
    average.update(model)
    for k, v in average.model.state_dict().items():
        torch.testing.assert_close(v, start[k] + 3.125)


def test_with_weight_average_the_published_network_is_the_average_not_the_last_step(synth):
    starts = session_starts(synth, 1800)
    plain = fit(synth, starts, HRNNConfig(**SMALL, seed=11), progress=False, device="cpu")
    averaged = fit(synth, starts, HRNNConfig(**SMALL, seed=11, weight_average_epochs=0.5), progress=False, device="cpu")
    assert not torch.equal(plain.model.out_bias, averaged.model.out_bias)
    # the same optimisation path, so the average stays close to the last step's weights
    torch.testing.assert_close(averaged.model.out_bias, plain.model.out_bias, rtol=0, atol=0.05)


@pytest.mark.parametrize("loss", ["top1", "bpr-max", "cross-entropy"])
def test_losses_ignore_candidates_that_are_the_positive_item(loss):
    logits = torch.tensor([[2.0, 0.5, 1.0, 3.0]])
    cands = torch.tensor([7, 8, 9, 7])  # column 3 is the same item as the positive
    targets = torch.tensor([7])
    with_dup = ranking_loss(loss, logits, cands, targets)
    without = ranking_loss(loss, logits[:, :3], cands[:3], targets)
    torch.testing.assert_close(with_dup, without)


@pytest.mark.parametrize("loss", ["top1", "bpr-max", "cross-entropy"])
def test_excluded_columns_count_for_nothing_in_any_loss(loss):
    """The repeat head's explore loss excludes each row's window items: as if those columns were not there."""
    torch.manual_seed(0)
    logits = torch.randn(4, 10)
    cands, targets = torch.arange(10), torch.arange(4)
    exclude = torch.zeros(4, 10, dtype=torch.bool)
    exclude[:, 5:8] = True
    keep = ~exclude[0]
    torch.testing.assert_close(ranking_loss(loss, logits, cands, targets, exclude=exclude),
                               ranking_loss(loss, logits[:, keep], cands[keep], targets))


def _drifting_popularity() -> Interactions:
    """Item 'old' is what everybody clicks early on; item 'new' takes over at the end."""
    rng = np.random.default_rng(0)
    rows = []
    for u in range(200):
        t = int(rng.integers(0, 10)) * 86_400_000
        for day in range(0, 40, 4):
            hot = "old" if day < 30 else "new"
            for j in range(4):
                item = hot if rng.random() < 0.5 else f"i{int(rng.integers(0, 30))}"
                rows.append((f"u{u}", item, t + day * 86_400_000 + j * 60_000))
    u, i, t = zip(*rows)
    return Interactions.from_columns(u, i, t)


def test_the_recency_mask_shifts_the_model_towards_recent_popularity():
    data = _drifting_popularity()
    starts = session_starts(data, 1800)
    old, new = list(data.item_ids).index("old"), list(data.item_ids).index("new")
    margins = {}
    for mask in (False, True):
        cfg = HRNNConfig(**(SMALL | {"epochs": 2}), recency_mask=mask, recency_half_life_days=3.0)
        model = fit(data, starts, cfg, progress=False, device="cpu").model
        with torch.no_grad():
            s = model.score_all(model.start_session(torch.zeros(1, model.hidden)))[0]
        margins[mask] = float(s[new] - s[old])
    assert margins[True] > margins[False] + 0.1


@pytest.mark.slow
def test_the_hrnn_really_learns_the_synthetic_cross_session_signal():
    data = generate(1500, 400, seed=2)
    split = last_session_split(data, session_starts(data, 1800))
    cfg = HRNNConfig(hidden_dimension=64, epochs=3, batch_size=32)
    model = fit(split.train, split.train_starts, cfg, progress=False, device="cpu").model
    scorers = {"hrnn": HRNNScorer(model), "pop": make_baseline("pop")}
    for s in scorers.values():
        s.fit(split.train, split.train_starts)
    res = evaluate(split, scorers, progress=False).models
    assert res["hrnn"]["recall@20"] > 1.5 * res["pop"]["recall@20"]
    assert res["hrnn"]["first/recall@20"] > res["pop"]["first/recall@20"]


def test_event_type_weights_of_0_for_every_target_are_a_config_error_naming_the_setting_before_training(
        synth, monkeypatch):
    import model.train as train_mod
    from model.errors import ConfigError

    monkeypatch.setattr(train_mod, "run_epoch", lambda *a, **k: pytest.fail("trained"))
    starts = session_starts(synth, 1800)
    with pytest.raises(ConfigError, match="^event_type_weights give every training target a weight of 0"):
        fit(synth, starts, HRNNConfig(**SMALL), type_weights=np.zeros(len(synth), dtype=np.float32), progress=False)


def test_a_recency_half_life_that_leaves_every_target_a_weight_of_0_is_a_config_error_naming_it():
    from model.errors import ConfigError
    from model.train import target_weights

    # user 0: three events long ago (the targets); user 1: one event, the newest, and a user's first is no target
    ts_ms = np.array([0, 1000, 2000, 10**12])
    new_session, first = np.array([True, False, False, True]), np.array([True, False, False, True])
    cfg = HRNNConfig(recency_mask=True, recency_half_life_days=1e-6)
    with pytest.raises(ConfigError, match="^recency_half_life_days 1e-06 gives every training target a weight of 0"):
        target_weights(ts_ms, new_session, first, cfg)
    assert np.allclose(target_weights(ts_ms, new_session, first, HRNNConfig(recency_mask=False)), 1.0)


@pytest.mark.parametrize("settings", [dict(variant="session-only"), dict(predict_session_start=False)])
def test_settings_that_learn_only_next_in_session_pairs_on_one_event_sessions_are_a_config_error_before_training(
        synth, monkeypatch, settings):
    import model.train as train_mod
    from model.errors import ConfigError

    monkeypatch.setattr(train_mod, "run_epoch", lambda *a, **k: pytest.fail("trained"))
    every_event_a_session = np.ones(len(synth), dtype=bool)
    with pytest.raises(ConfigError, match="learns only next-in-session pairs .* no session of the events trained on "
                                          "has two events: nothing would be learnt"):
        fit(synth, every_event_a_session, HRNNConfig(**SMALL, **settings), progress=False)


def test_a_chunks_loss_is_its_rows_weighted_mean_so_weights_balance_rows_not_the_step_size():
    from model.train import _weighted

    per_row = torch.tensor([1.0, 2.0, 4.0])
    torch.testing.assert_close(_weighted(per_row, torch.tensor([0.5, 0.5, 0.5])), torch.tensor(7 / 3))
    torch.testing.assert_close(_weighted(per_row, torch.tensor([1.0, 1.0, 2.0])), torch.tensor(11 / 4))
    torch.testing.assert_close(_weighted(per_row, torch.tensor([0.0, 0.0, 3.0])), torch.tensor(4.0))
