"""Rank calibration of the repeat head: one constant raises every item of the user's window, it is chosen
on the validation sessions, published with the version, and never carried into a warm-started training."""
from __future__ import annotations

import dataclasses
import json

import pytest
import torch

from model.artifact import _sha256, load_version, save_version
from model.calibration import OFFSET_GRID, calibrate_window_offset, set_window_offset
from model.config import DataConfig, HRNNConfig
from model.network import HRNN, WINDOW_OFFSET
from model import pipeline
from model.pipeline import fit_inputs, train_version, validator
from model.repeat import RepeatHead, window_from_events
from model.synth import generate
from stream.retrain_job import warm_start_state

MIN_MS = 60_000
T0 = 1_700_000_000_000
REPEAT = HRNNConfig(epochs=3, batch_size=32, hidden_dimension=32, n_sample=64, repeat_head=True)


def _head_scores(offset: float) -> tuple[torch.Tensor, torch.Tensor]:
    torch.manual_seed(0)
    head = RepeatHead(12, 8).eval()
    with torch.no_grad():
        for p in head.parameters():
            p.add_(torch.randn_like(p) * 0.5)
    head.window_offset.fill_(offset)
    win = window_from_events([[(3, T0, 1, True), (5, T0 + MIN_MS, 2, False), (-1, T0 + 2 * MIN_MS, 1, False)], []],
                             6, torch.device("cpu"))
    torch.manual_seed(1)
    h = torch.randn(2, 8)
    with torch.no_grad():
        return head.dense(h, win, 12), head.at(h, win, torch.tensor([5, 0, 3]))


def test_the_offset_raises_every_window_item_by_the_same_amount_and_nothing_else():
    dense0, at0 = _head_scores(0.0)
    dense, at = _head_scores(1.5)
    lift = torch.zeros(2, 12)
    lift[0, [3, 5]] = 1.5  # the unknown item (-1) and the empty window get nothing
    torch.testing.assert_close(dense - dense0, lift)
    torch.testing.assert_close(at - at0, lift[:, [5, 0, 3]])


def _fake_validator(mrr_by_offset: dict[float, float]):
    def run(model: HRNN) -> dict:
        return {"mrr@20": mrr_by_offset[model.repeat.window_offset.item()], "recall@20": 0.5}
    return run


@pytest.mark.parametrize("mrr, chosen", [
    ({0.0: .50, 0.5: .60, 1.0: .70, 2.0: .70, 4.0: .65, 8.0: .60}, 1.0),  # the best; the smaller of equals
    ({c: .40 for c in OFFSET_GRID}, 0.0),  # nothing gained: the network stays as trained
    ({0.0: .50, 0.5: .40, 1.0: .30, 2.0: .20, 4.0: .10, 8.0: .00}, 0.0),
])
def test_calibration_keeps_the_offset_that_validates_best(mrr, chosen):
    model = HRNN(6, HRNNConfig(hidden_dimension=32, repeat_head=True))
    cal = calibrate_window_offset(model, _fake_validator(mrr))
    assert cal.window_offset == chosen and model.repeat.window_offset.item() == chosen
    assert cal.chosen == (chosen, mrr[chosen]) and cal.uncalibrated == mrr[0.0]
    assert [row["mrr@20"] for row in cal.to_json()["grid"]] == [mrr[c] for c in OFFSET_GRID]


def test_a_network_without_the_repeat_head_has_no_offset_to_set():
    with pytest.raises(ValueError, match="repeat head"):
        set_window_offset(HRNN(6, HRNNConfig(hidden_dimension=32)), 1.0)


def _saved(tmp_path, offset: float):
    model = HRNN(4, REPEAT)
    set_window_offset(model, offset)
    return save_version(tmp_path, model, REPEAT, DataConfig(), ["a", "b", "c", "d"], ["click"])


def test_the_offset_is_published_with_the_weights(tmp_path):
    assert load_version(_saved(tmp_path, 2.5)).model.repeat.window_offset.item() == 2.5


def test_a_version_saved_before_calibration_existed_loads_with_no_offset(tmp_path):
    path = _saved(tmp_path, 2.5)
    state = torch.load(path / "weights.pt", weights_only=True)
    del state[WINDOW_OFFSET]
    torch.save(state, path / "weights.pt")
    manifest = json.loads((path / "manifest.json").read_text())
    manifest["files"]["weights.pt"] = _sha256(path / "weights.pt")
    (path / "manifest.json").write_text(json.dumps(manifest))
    assert load_version(path).model.repeat.window_offset.item() == 0.0


def test_a_warm_start_does_not_carry_the_serving_networks_offset(tmp_path):
    serving = load_version(_saved(tmp_path, 4.0))
    state, info = warm_start_state(serving, ["a", "b", "e"], REPEAT)
    assert info["items_shared"] == 2
    assert state[WINDOW_OFFSET].item() == 0.0  # training starts uncalibrated; the new network gets its own


@pytest.fixture(scope="module")
def repeat_log():
    return generate(300, 150, seed=3, repeat_share=0.5, events_per_user=20)


def test_training_publishes_the_offset_that_validated_best_on_the_early_stopping_network(repeat_log, tmp_path):
    run = train_version(repeat_log, tmp_path, config=REPEAT, data_config=DataConfig(), progress=False)
    cal = run.metrics["calibration"]
    table = {row["window_offset"]: row["mrr@20"] for row in cal["grid"]}
    assert list(table) == list(OFFSET_GRID)
    best = max(table.values())
    assert cal["window_offset"] == min(c for c, v in table.items() if v == best)
    assert load_version(run.version_dir).model.repeat.window_offset.item() == cal["window_offset"]
    # the table is the early-stopping validator's own reading, offset by offset
    validate = validator(fit_inputs(repeat_log, DataConfig(), "last-session", REPEAT.seed).validation, REPEAT.seed)
    for c in (0.0, cal["window_offset"]):
        set_window_offset(run.fit.model, c)
        assert validate(run.fit.model)["mrr@20"] == pytest.approx(table[c])
    # the version's validation figures are the published network's, at its offset; offset 0 is the best epoch
    chosen = next(row for row in cal["grid"] if row["window_offset"] == cal["window_offset"])
    assert (run.metrics["val_mrr@20"], run.metrics["val_recall@20"]) == (chosen["mrr@20"], chosen["recall@20"])
    assert table[0.0] == pytest.approx(run.fit.history[run.fit.best_epoch - 1]["val_mrr@20"])


def test_a_versions_validation_figures_are_the_calibrated_networks(repeat_log, tmp_path, monkeypatch):
    # the synthetic log's own table is flat (offset 0 wins), so a validator that only offset 4 improves
    def fake_validator(split, seed):
        return lambda model: {"mrr@20": 0.1 + 0.01 * (model.repeat.window_offset.item() == 4.0),
                              "recall@20": 0.5 + 0.02 * (model.repeat.window_offset.item() == 4.0)}

    monkeypatch.setattr(pipeline, "validator", fake_validator)
    run = train_version(repeat_log, tmp_path, config=dataclasses.replace(REPEAT, epochs=1),
                        data_config=DataConfig(), progress=False)
    assert run.metrics["calibration"]["window_offset"] == 4.0
    assert [h["val_mrr@20"] for h in run.metrics["history"]] == [0.1]  # trained and validated at offset 0
    assert run.metrics["val_mrr@20"] == pytest.approx(0.11) and run.metrics["val_recall@20"] == pytest.approx(0.52)


@pytest.mark.parametrize("change", [dict(calibrate_window_offset=False), dict(repeat_head=False)])
def test_no_calibration_when_it_is_off_or_there_is_no_repeat_head(repeat_log, tmp_path, change):
    cfg = dataclasses.replace(REPEAT, epochs=1, **change)
    run = train_version(repeat_log, tmp_path, config=cfg, data_config=DataConfig(), progress=False)
    assert "calibration" not in run.metrics
    published = load_version(run.version_dir).model
    assert published.repeat is None or published.repeat.window_offset.item() == 0.0


def test_no_calibration_without_validation_sessions(repeat_log, tmp_path):
    run = train_version(repeat_log, tmp_path, config=dataclasses.replace(REPEAT, epochs=1),
                        data_config=DataConfig(), early_stopping=False, progress=False)
    assert "calibration" not in run.metrics
    assert load_version(run.version_dir).model.repeat.window_offset.item() == 0.0


def test_on_reddit_the_validation_sessions_ask_for_the_users_own_items_higher(reddit_path, tmp_path):
    from model.loaders import load_interactions

    data = load_interactions(reddit_path, columns={"USER_ID": "0", "ITEM_ID": "1", "TIMESTAMP": "2"}, time_unit="s")
    run = train_version(data, tmp_path, config=HRNNConfig(repeat_head=True, epochs=1, refit=False),
                        data_config=DataConfig(), progress=False)
    cal = run.metrics["calibration"]
    table = {row["window_offset"]: row["mrr@20"] for row in cal["grid"]}
    assert cal["window_offset"] > 0 and table[cal["window_offset"]] > table[0.0]
