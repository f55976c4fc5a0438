"""`hrnn tune`: an Optuna study on the validation split only, within its budgets, whose best.json reruns the best trial."""
from __future__ import annotations

import dataclasses
import json

import numpy as np
import pytest

import model.tune as tune_mod
from model.config import DataConfig, HRNNConfig, load_config
from model.errors import ConfigError
from model.pipeline import fit_inputs, prepare, train_version
from model.splits import make_split
from model.synth import generate, write
from model.tune import tune
from stream.cli import main as hrnn

BASE = HRNNConfig(epochs=2, batch_size=32, hidden_dimension=32, n_sample=64)


@pytest.fixture(scope="module")
def data():
    return generate(300, 150, seed=3, repeat_share=0.3, events_per_user=20)


@pytest.fixture(scope="module")
def study(data, tmp_path_factory):
    out = tmp_path_factory.mktemp("tune")
    seen: list[int] = []
    real_fit = tune_mod.fit

    def spy(train, *args, **kwargs):
        seen.append(len(train))
        return real_fit(train, *args, **kwargs)

    tune_mod.fit = spy
    try:
        result = tune(data, out, base=BASE, data_config=DataConfig(), trials=5, timeout_s=600, log=lambda _: None)
    finally:
        tune_mod.fit = real_fit
    return result, out, seen


def test_the_study_writes_best_json_trials_and_a_history_plot(study):
    result, out, _ = study
    best = json.loads((out / "best.json").read_text())
    fields = {f.name for f in dataclasses.fields(HRNNConfig)} | {f.name for f in dataclasses.fields(DataConfig)}
    assert set(best) == fields
    trials = json.loads((out / "trials.json").read_text())["trials"]
    assert len(trials) == 5 and {t["state"] for t in trials} <= {"complete", "pruned"}
    assert len((out / "trials.csv").read_text().strip().splitlines()) == 1 + 5
    assert (out / "optimization_history.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    for t in trials:  # the per-epoch validation MRR went to Optuna (what pruning decides on)
        assert 1 <= len(t["intermediate"]) <= BASE.epochs


def test_the_reported_best_is_the_best_complete_trial_and_best_json_is_its_config(study):
    result, out, _ = study
    trials = json.loads((out / "trials.json").read_text())["trials"]
    complete = [t for t in trials if t["state"] == "complete"]
    top = max(complete, key=lambda t: t["value"])
    assert result.best_number == top["number"] and result.best_value == pytest.approx(top["value"])
    best = json.loads((out / "best.json").read_text())
    for k, v in top["params"].items():
        assert best[k] == v
    assert trials[0]["params"]["hidden_dimension"] == BASE.hidden_dimension  # the base config is trial 0


def test_trials_train_on_the_training_part_only_never_the_test_or_validation_sessions(study, data):
    _, _, seen = study
    inputs = fit_inputs(data, DataConfig(), "last-session", BASE.seed)
    prep = prepare(data, DataConfig())
    test_events = make_split("last-session", prep.data, prep.starts).n_targets
    assert set(seen) == {len(inputs.train)}
    assert len(inputs.train) <= len(prep.data) - test_events - inputs.validation.n_targets


def test_training_from_best_json_reproduces_the_best_trial(study, data, tmp_path):
    result, out, _ = study
    values = json.loads((out / "best.json").read_text())
    cfg, dcfg = load_config(HRNNConfig, file_values=values), load_config(DataConfig, file_values=values)
    run = train_version(data, tmp_path, config=cfg, data_config=dcfg, progress=False)
    assert run.metrics["val_mrr@20"] == result.best_value  # the same floats: training is deterministic


def test_a_repeat_head_trial_is_scored_at_the_window_offset_training_would_publish(data, tmp_path, monkeypatch):
    def fake_validator(split, seed):  # validation that only offset 4 improves, whatever the network learnt
        return lambda model: {"mrr@20": 0.1 + 0.01 * (model.repeat.window_offset.item() == 4.0), "recall@20": 0.5}

    monkeypatch.setattr(tune_mod, "validator", fake_validator)
    base = dataclasses.replace(BASE, repeat_head=True)
    result = tune(data, tmp_path, base=base, data_config=DataConfig(), trials=1, timeout_s=600, log=lambda _: None)
    (trial,) = result.trials
    assert set(trial["intermediate"].values()) == {0.1}  # epochs are validated as trained, at offset 0
    assert (trial["window_offset"], result.best_value) == (4.0, pytest.approx(0.11))
    off = tune(data, tmp_path / "off", base=dataclasses.replace(base, calibrate_window_offset=False),
               data_config=DataConfig(), trials=1, timeout_s=600, log=lambda _: None)
    assert (off.trials[0]["window_offset"], off.best_value) == (None, pytest.approx(0.1))


def test_a_device_this_machine_cannot_use_is_refused_before_any_trial(data, tmp_path):
    with pytest.raises(ConfigError, match="'cuda:7': torch sees"):  # not "no trial completed"
        tune(data, tmp_path, base=BASE, data_config=DataConfig(), trials=2, device="cuda:7", log=lambda _: None)
    assert not (tmp_path / "trials.json").exists()


def test_the_time_budget_stops_the_study(data, tmp_path):
    result = tune(data, tmp_path, base=dataclasses.replace(BASE, epochs=3), data_config=DataConfig(), trials=50,
                  timeout_s=8, log=lambda _: None)
    assert len(result.trials) < 50
    assert result.seconds < 8 + 30  # at most the trial running at the deadline finishes its epoch


def test_the_cli_prints_one_line_per_trial_and_the_path_of_best_json(data, tmp_path, capsys):
    csv = write(data, tmp_path / "log.csv")
    rc = hrnn(["tune", "--data", str(csv), "--out", str(tmp_path / "out"), "--trials", "2", "--epochs", "1",
               "--batch-size", "32", "--n-sample", "64"])
    cap = capsys.readouterr()
    assert rc == 0
    assert cap.out.strip().endswith("best.json")
    lines = [ln for ln in cap.err.splitlines() if ln.startswith("trial ")]
    assert len(lines) == 2 and "mrr@20" in lines[0]
    best = json.loads((tmp_path / "out" / "best.json").read_text())
    assert np.isfinite(json.loads((tmp_path / "out" / "trials.json").read_text())["best_value"])
    assert best["epochs"] == 1 and best["batch_size"] == 32
