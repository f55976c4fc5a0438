"""`hrnn tune`: an Optuna study on the validation split only, within its budgets, whose best.json reruns the best trial."""
from __future__ import annotations

import contextlib
import dataclasses
import io
import json
import os
import signal
import subprocess
import sys
import types
from pathlib import Path

import numpy as np
import optuna
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
    assert set(best) == fields | {"holdout"}
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


# A small study, fast enough to run whole: one epoch of a small network takes about a second.
SMALL = dict(batch_size=32, hidden_dimension=32, n_sample=64, repeat_head=False)


@pytest.fixture(scope="module")
def small():
    return generate(120, 60, seed=3, events_per_user=15)


@pytest.fixture(scope="module")
def small_csv(small, tmp_path_factory):
    return write(small, tmp_path_factory.mktemp("small") / "log.csv")


def hrnn_here(argv: list[str]) -> tuple[int, str, str]:
    """`hrnn ...` in this process: (exit status, stdout, stderr)."""
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = hrnn(argv)
    return rc, out.getvalue(), err.getvalue()


@pytest.fixture(scope="module")
def pinned(small_csv, tmp_path_factory):
    """`hrnn tune` with searched settings given by flag (loss, hidden dimension, repeat head) and environment
    (n_sample), and its epochs by environment only."""
    out = tmp_path_factory.mktemp("pinned")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("HRNN_EPOCHS", "2")
        mp.setenv("HRNN_N_SAMPLE", "0")
        rc, _, err = hrnn_here(["tune", "--data", str(small_csv), "--out", str(out), "--trials", "3",
                                "--loss", "top1", "--hidden-dimension", "40", "--repeat-head", "false",
                                "--batch-size", "32", "--device", "cpu"])
    assert rc == 0, err
    return out, err


def test_settings_given_by_flag_or_environment_are_fixed_in_every_trial_and_the_output_says_so(pinned):
    out, err = pinned
    trials = json.loads((out / "trials.json").read_text())["trials"]
    assert len(trials) == 3
    for t in trials:
        assert not {"loss", "hidden_dimension", "repeat_head", "n_sample", "history_length"} & set(t["params"])
    best = json.loads((out / "best.json").read_text())
    assert (best["loss"], best["hidden_dimension"], best["repeat_head"], best["n_sample"]) == ("top1", 40, False, 0)
    assert "learning_rate" in trials[1]["params"]  # the rest is still searched
    (fixed,) = [ln for ln in err.splitlines() if ln.startswith("fixed in every trial")]
    assert all(s in fixed for s in ("loss=top1", "hidden_dimension=40", "repeat_head=False", "n_sample=0"))


def test_tune_takes_its_epochs_from_the_environment_its_default_of_4_only_below_it(pinned):
    out, _ = pinned
    assert json.loads((out / "best.json").read_text())["epochs"] == 2


def test_tune_prints_a_line_per_epoch_of_each_trial_to_stderr(pinned):
    _, err = pinned
    epochs = [ln for ln in err.splitlines() if ln.startswith("  trial #0 epoch ")]
    assert [ln.split(":")[0] for ln in epochs] == ["  trial #0 epoch 1/2", "  trial #0 epoch 2/2"]
    assert all("mrr@20 " in ln and ln.endswith(" s") for ln in epochs)


def test_only_the_settings_searched_are_left_out_of_the_search_when_given():
    study = tune_mod.optuna.create_study()
    trial = study.ask()
    cfg = tune_mod.suggest(trial, dataclasses.replace(BASE, repeat_head=True, history_length=77),
                           frozenset({"loss", "history_length"}))
    assert "loss" not in trial.params and "history_length" not in trial.params and "bptt" in trial.params
    assert (cfg.loss, cfg.history_length) == (BASE.loss, 77)
    assert "loss" not in tune_mod.base_params(BASE, frozenset({"loss"}))


def test_tied_embeddings_of_a_given_size_fix_the_hidden_dimension_instead_of_failing_every_trial(data, tmp_path):
    """The tie needs hidden_dimension == embedding_dimension: searching the one beside the other given made every
    drawn trial a ConfigError."""
    base = dataclasses.replace(BASE, tied_embeddings=True, embedding_dimension=40, hidden_dimension=40, epochs=1)
    said: list[str] = []
    result = tune_mod.tune(data, tmp_path, base=base, data_config=DataConfig(), trials=3, device="cpu",
                           log=said.append)
    assert "hidden_dimension=40 fixed in every trial: tied_embeddings needs it equal to embedding_dimension" in said
    assert not any("given explicitly" in line for line in said)  # nobody gave it
    trials = json.loads((tmp_path / "trials.json").read_text())["trials"]
    assert [t["state"] for t in trials] == ["complete"] * 3
    assert all("hidden_dimension" not in t["params"] for t in trials) and result.best_config.hidden_dimension == 40


def test_tune_takes_the_holdout_of_its_config_file_as_train_does(small_csv, tmp_path, monkeypatch):
    asked = {}
    monkeypatch.setattr(tune_mod, "tune", lambda *a, **kw: asked.update(kw) or
                        types.SimpleNamespace(out_dir=tmp_path))
    config = tmp_path / "best.json"
    config.write_text('{"holdout": "personalize"}')
    rc, _, err = hrnn_here(["tune", "--data", str(small_csv), "--out", str(tmp_path / "o"), "--config", str(config)])
    assert rc == 0, err
    assert asked["holdout"] == "personalize"


def test_a_crash_in_a_trial_leaves_best_json_and_the_trials_completed_before_it(small, tmp_path, monkeypatch):
    calls = []
    real_fit = tune_mod.fit

    def second_fails(*args, **kwargs):
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("CUDA out of memory")
        return real_fit(*args, **kwargs)

    monkeypatch.setattr(tune_mod, "fit", second_fails)
    lines: list[str] = []
    with pytest.raises(RuntimeError, match="out of memory"):
        tune(small, tmp_path, base=HRNNConfig(epochs=1, **SMALL), data_config=DataConfig(), trials=5,
             timeout_s=600, log=lines.append)
    trials = json.loads((tmp_path / "trials.json").read_text())
    assert [t["state"] for t in trials["trials"]] == ["complete", "fail"]
    best = json.loads((tmp_path / "best.json").read_text())
    assert best["hidden_dimension"] == trials["trials"][trials["best_trial"]]["params"]["hidden_dimension"]
    assert (tmp_path / "trials.csv").exists() and (tmp_path / "optimization_history.png").exists()
    assert not list(tmp_path.glob(".*"))  # no temporary file left behind
    assert lines[-1].startswith("stopped by RuntimeError: CUDA out of memory; the best of the 1 trial(s) completed")


def test_ctrl_c_during_tune_keeps_the_completed_trials_and_exits_130_with_one_line_and_no_traceback(small_csv,
                                                                                                     tmp_path):
    out = tmp_path / "out"
    env = dict(os.environ, OMP_NUM_THREADS="1", PYTHONPATH=str(Path(__file__).resolve().parents[1]))
    proc = subprocess.Popen([sys.executable, "-m", "stream.cli", "tune", "--data", str(small_csv), "--out", str(out),
                             "--trials", "500", "--epochs", "2", "--batch-size", "32", "--hidden-dimension", "32",
                             "--repeat-head", "false", "--device", "cpu"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))  # as in a terminal
    try:
        seen = []
        for line in proc.stderr:  # the first trial's line, then Ctrl-C in the next trial
            seen.append(line)
            if line.startswith("trial #0 "):
                break
        assert seen and seen[-1].startswith("trial #0 "), "".join(seen)
        proc.send_signal(signal.SIGINT)
        rest = proc.stderr.read()
        assert proc.wait(timeout=120) == 130
    finally:
        proc.kill()
    assert "Traceback" not in rest and "KeyboardInterrupt" not in rest, rest
    assert rest.strip().splitlines()[-1].startswith("interrupted; the best of the ")
    trials = json.loads((out / "trials.json").read_text())["trials"]
    assert trials[0]["state"] == "complete"
    assert json.loads((out / "best.json").read_text())["hidden_dimension"] == 32


@pytest.mark.parametrize("epochs, said", [(4, "interrupted after epoch 4;"), (0, "interrupted in its first epoch;")])
def test_an_interrupted_trials_line_names_the_epochs_it_finished_not_one_past_its_last(epochs, said):
    """Ctrl-C after a trial's last epoch (in its calibration) named an epoch the trial does not have."""
    study = optuna.create_study(direction="maximize")
    t = optuna.trial.create_trial(state=optuna.trial.TrialState.FAIL, params={"hidden_dimension": 32},
                                  distributions={"hidden_dimension": optuna.distributions.IntDistribution(32, 256)},
                                  user_attrs={"interrupted": True, "epochs": epochs})
    line = tune_mod._trial_line(study, t, 50, 10.0)
    assert f": {said} no best yet;" in line, line


@pytest.fixture(scope="module")
def cut_short(small, tmp_path_factory):
    """A study whose every validation takes 100 s by the clock tune reads (the network trains for real): with a
    250 s budget the second epoch ends at about 200 s, when neither a third, nor the calibration (6 validations),
    nor another trial's first epoch would end before the deadline."""
    out = tmp_path_factory.mktemp("cut_short")
    skew = [0.0]
    real_validator, real_clock = tune_mod.validator, tune_mod.time.perf_counter

    def slow_validator(split, seed):
        run = real_validator(split, seed)

        def validate(model):
            skew[0] += 100.0
            return run(model)
        return validate

    base = HRNNConfig(epochs=4, **{**SMALL, "repeat_head": True})
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(tune_mod, "validator", slow_validator)
        mp.setattr(tune_mod, "time", types.SimpleNamespace(perf_counter=lambda: real_clock() + skew[0]))
        result = tune(small, out, base=base, data_config=DataConfig(), trials=50, timeout_s=250, log=lambda _: None)
    return result, out


def test_no_trial_starts_when_the_time_left_is_shorter_than_a_first_epoch(cut_short):
    result, _ = cut_short
    assert len(result.trials) == 1


def test_a_trial_the_budget_cuts_short_is_kept_with_the_epochs_it_ran_and_without_the_calibration(cut_short):
    result, out = cut_short
    (trial,) = result.trials
    assert (trial["state"], trial["epochs"], trial["stopped_for_time"]) == ("complete", 2, True)
    assert trial["window_offset"] is None
    best = json.loads((out / "best.json").read_text())
    assert (best["epochs"], best["calibrate_window_offset"]) == (2, False)


def test_training_from_the_best_json_of_a_study_cut_short_reproduces_its_best_trial(cut_short, small, tmp_path):
    result, out = cut_short
    values = json.loads((out / "best.json").read_text())
    cfg, dcfg = load_config(HRNNConfig, file_values=values), load_config(DataConfig, file_values=values)
    run = train_version(small, tmp_path, config=cfg, data_config=dcfg, progress=False)
    assert run.metrics["val_mrr@20"] == result.best_value


def test_best_json_records_the_holdout_and_hrnn_train_with_it_reproduces_the_trial(small_csv, tmp_path):
    tuned = tmp_path / "tune"
    rc, _, err = hrnn_here(["tune", "--data", str(small_csv), "--out", str(tuned), "--trials", "1", "--epochs", "2",
                            "--holdout", "personalize", "--batch-size", "32", "--hidden-dimension", "32",
                            "--n-sample", "64", "--repeat-head", "false", "--device", "cpu"])
    assert rc == 0, err
    assert json.loads((tuned / "best.json").read_text())["holdout"] == "personalize"
    rc, out, err = hrnn_here(["train", "--data", str(small_csv), "--registry", str(tmp_path / "reg"),
                              "--config", str(tuned / "best.json"), "--device", "cpu", "--quiet"])
    assert rc == 0, err
    metrics = json.loads((Path(out.strip()) / "metrics.json").read_text())
    assert metrics["holdout"] == "personalize"
    assert metrics["val_mrr@20"] == json.loads((tuned / "trials.json").read_text())["best_value"]


def test_tunes_help_gives_the_epoch_budget_each_trial_gets():
    import argparse

    from model.cli_tune import TRIAL_EPOCHS, add_arguments

    parser = argparse.ArgumentParser()
    add_arguments(parser)
    [epochs] = [a for a in parser._actions if a.dest == "epochs"]
    assert epochs.help == f"(default {TRIAL_EPOCHS})" and TRIAL_EPOCHS != 5  # not HRNNConfig's own default
