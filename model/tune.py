"""Hyperparameter optimisation (the Personalize `performHPO` equivalent) with Optuna.

Each trial trains on exactly what `hrnn train` trains on (model.pipeline.fit_inputs: the
evaluation protocol's test events are reserved and never seen; each remaining user's last
session is the validation split) and is scored by MRR@20 on that validation split, the
number early stopping also uses. After every epoch the trial reports its validation MRR
to Optuna; a trial below the median of earlier trials at the same epoch is pruned, and so
is a trial that would run past the time budget. A completed trial is scored as `hrnn train`
would publish it: with the repeat head, at its calibrated window offset (model.calibration),
so trials are compared as they would serve and the best value is the one training reports.
The first trial is the base config, so the study never ends worse than the defaults it
started from.

Outputs in `out_dir`: best.json (every HRNNConfig and DataConfig field: `hrnn train --config
best.json` reruns the best trial and, with `refit`, then trains it once more on the validation
sessions too; trials never distil, so with `distill_teachers` it also trains the teachers first),
trials.json and trials.csv (one row per trial) and optimization_history.png.
"""
from __future__ import annotations

import csv
import dataclasses
import json
import math
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

import matplotlib

matplotlib.use("Agg")  # headless
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
import optuna  # noqa: E402

from model.config import LOSSES, DataConfig, HRNNConfig, to_dict  # noqa: E402
from model.errors import ConfigError  # noqa: E402
from model.featurize import event_weights  # noqa: E402
from model.interactions import Interactions  # noqa: E402
from model.network import HRNN, resolve_device  # noqa: E402
from model.pipeline import Trained, calibrate, fit_inputs, validation_metrics, validator  # noqa: E402
from model.plots import save_figure  # noqa: E402
from model.train import fit  # noqa: E402

OBJECTIVE = "mrr@20"
N_SAMPLE_CHOICES = (0, 64, 128, 256, 512, 1024, 2048)


def suggest(trial: optuna.Trial, base: HRNNConfig) -> HRNNConfig:
    """The search space; everything not searched stays as in `base`."""
    repeat = trial.suggest_categorical("repeat_head", [False, True])
    values: dict[str, Any] = {
        "hidden_dimension": trial.suggest_int("hidden_dimension", 32, 256, log=True),
        "learning_rate": trial.suggest_float("learning_rate", 1e-4, 3e-2, log=True),
        "dropout_session": trial.suggest_float("dropout_session", 0.0, 0.5),
        "dropout_user": trial.suggest_float("dropout_user", 0.0, 0.5),
        "dropout_init": trial.suggest_float("dropout_init", 0.0, 0.5),
        "loss": trial.suggest_categorical("loss", list(LOSSES)),
        "n_sample": trial.suggest_categorical("n_sample", list(N_SAMPLE_CHOICES)),
        "logq": trial.suggest_categorical("logq", [0.0, 1.0]),
        "bptt": trial.suggest_int("bptt", 4, 32, log=True),
        "recency_mask": trial.suggest_categorical("recency_mask", [False, True]),
        "repeat_head": repeat,
    }
    if repeat:  # H only matters with the head; without it the base value is kept
        values["history_length"] = trial.suggest_int("history_length", 10, 200, log=True)
        values["window_profile"] = trial.suggest_categorical("window_profile", [False, True])
    cfg = dataclasses.replace(base, **values)
    cfg.validate()
    return cfg


def base_params(base: HRNNConfig) -> dict[str, Any]:
    """The base config as a point of the search space (the study's first trial), clipped into it."""
    p = {"repeat_head": base.repeat_head, "hidden_dimension": base.hidden_dimension,
         "learning_rate": min(max(base.learning_rate, 1e-4), 3e-2), "dropout_session": min(base.dropout_session, 0.5),
         "dropout_user": min(base.dropout_user, 0.5), "dropout_init": min(base.dropout_init, 0.5), "loss": base.loss,
         "n_sample": min(N_SAMPLE_CHOICES, key=lambda n: abs(n - base.n_sample)),
         "logq": 1.0 if base.logq >= 0.5 else 0.0, "bptt": max(base.bptt, 4), "recency_mask": base.recency_mask}
    if base.repeat_head:
        p["history_length"] = min(max(base.history_length, 10), 200)
        p["window_profile"] = base.window_profile
    return p


@dataclass
class TuneResult:
    best_number: int
    best_value: float
    best_config: HRNNConfig
    data_config: DataConfig
    trials: list[dict] = field(default_factory=list)
    seconds: float = 0.0
    out_dir: Path | None = None


class _OutOfTime(optuna.TrialPruned):
    """The trial would run past the study's time budget."""


def tune(data: Interactions, out_dir: str | Path, *, base: HRNNConfig, data_config: DataConfig, trials: int = 20,
         timeout_s: float = 1800.0, holdout: str = "last-session", device: str = "auto", seed: int = 0,
         log: Callable[[str], None] | None = None) -> TuneResult:
    """Run the study and write its outputs (see the module docstring). `base.epochs` is each trial's epoch budget."""
    if trials < 1:
        raise ConfigError(f"trials must be >= 1, got {trials}")
    if not 0 < timeout_s < math.inf:  # NaN fails too: a NaN deadline would never be reached
        raise ConfigError(f"timeout_s must be a number of seconds > 0, got {timeout_s}")
    if not 0 <= seed < 2**32:
        raise ConfigError(f"the sampler's seed must lie in [0, 2**32), got {seed}")
    resolve_device(device)  # here, not as every trial's failure
    say = log or (lambda line: print(line, file=sys.stderr, flush=True))
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    deadline = started + timeout_s
    inputs = fit_inputs(data, data_config, holdout, base.seed)
    if inputs.validation is None:
        raise ConfigError("no user has two sessions in the training part: there is no validation split to tune on")
    validate = validator(inputs.validation, base.seed)
    weights = event_weights(inputs.train, data_config)
    configs: dict[int, HRNNConfig] = {}

    def objective(trial: optuna.Trial) -> float:
        cfg = suggest(trial, base)
        configs[trial.number] = cfg
        epoch_times: list[float] = []
        t_epoch = [time.perf_counter()]

        def report(model: HRNN) -> dict:
            m = validate(model)
            now = time.perf_counter()
            epoch_times.append(now - t_epoch[0])
            t_epoch[0] = now
            step = len(epoch_times)
            trial.report(m[OBJECTIVE], step)
            trial.set_user_attr("epochs", step)
            if trial.should_prune():
                raise optuna.TrialPruned(f"pruned after epoch {step}: {OBJECTIVE} {m[OBJECTIVE]:.4f}")
            if step < cfg.epochs and now + max(epoch_times) > deadline:
                raise _OutOfTime(f"stopped after epoch {step}: the time budget would run out")
            return m

        t0 = time.perf_counter()
        result = fit(inputs.train, inputs.starts, cfg, type_weights=weights, validate=report, device=device,
                     progress=False)
        calibration = calibrate(Trained(result, None), cfg, validate, progress=False)
        best = validation_metrics(result, calibration)
        trial.set_user_attr("best_epoch", result.best_epoch)
        trial.set_user_attr("window_offset", calibration and calibration.window_offset)
        trial.set_user_attr("recall@20", best.get("val_recall@20"))
        trial.set_user_attr("seconds", round(time.perf_counter() - t0, 1))
        return float(best["val_" + OBJECTIVE])

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(direction="maximize", sampler=optuna.samplers.TPESampler(seed=seed),
                                pruner=optuna.pruners.MedianPruner(n_startup_trials=3, n_warmup_steps=0))
    study.enqueue_trial(base_params(base))

    def progress(study: optuna.Study, t: optuna.trial.FrozenTrial) -> None:
        say(_trial_line(study, t, trials, time.perf_counter() - started))
        if time.perf_counter() >= deadline:
            study.stop()

    study.optimize(objective, n_trials=trials, timeout=timeout_s, callbacks=[progress], catch=(ConfigError,))
    done = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
    if not done:
        raise ConfigError("no trial completed within the budget (raise --timeout-s or lower --epochs)")
    best = max(done, key=lambda t: t.value)
    result = TuneResult(best.number, float(best.value), configs[best.number], data_config,
                        [_trial_row(t) for t in study.trials], time.perf_counter() - started, out)
    write_outputs(result, out)
    say(f"best trial #{best.number}: {OBJECTIVE} {best.value:.4f} after {result.seconds:.0f} s; "
        f"wrote {out / 'best.json'}")
    return result


def _trial_row(t: optuna.trial.FrozenTrial) -> dict:
    last = t.intermediate_values[max(t.intermediate_values)] if t.intermediate_values else None
    return {"number": t.number, "state": t.state.name.lower(), "value": t.value, "last_reported": last,
            "epochs": t.user_attrs.get("epochs", 0), "best_epoch": t.user_attrs.get("best_epoch"),
            "window_offset": t.user_attrs.get("window_offset"), "recall@20": t.user_attrs.get("recall@20"),
            "seconds": round(t.duration.total_seconds(), 1) if t.duration else None,
            "intermediate": {str(k): v for k, v in sorted(t.intermediate_values.items())}, "params": dict(t.params)}


def _trial_line(study: optuna.Study, t: optuna.trial.FrozenTrial, total: int, elapsed: float) -> str:
    row = _trial_row(t)
    if t.state == optuna.trial.TrialState.COMPLETE:
        offset = "" if row["window_offset"] is None else f", window offset {row['window_offset']:g}"
        what = f"{OBJECTIVE} {t.value:.4f} (epoch {row['best_epoch']}/{row['epochs']}{offset})"
    elif t.state == optuna.trial.TrialState.PRUNED:
        what = f"pruned at epoch {row['epochs']} ({row['last_reported'] or 0:.4f})"
    else:
        what = t.state.name.lower()
    try:
        best = f"best {study.best_value:.4f} #{study.best_trial.number}"
    except ValueError:
        best = "no best yet"
    params = " ".join(f"{k}={_short(v)}" for k, v in t.params.items())
    return (f"trial #{t.number} ({t.number + 1}/{total}): {what}; {best}; {row['seconds']} s, {elapsed:.0f} s total"
            f" | {params}")


def _short(v: Any) -> str:
    return f"{v:.3g}" if isinstance(v, float) else str(v)


def write_outputs(result: TuneResult, out: Path) -> None:
    best = {**to_dict(result.best_config), **to_dict(result.data_config)}
    (out / "best.json").write_text(json.dumps(best, indent=2, sort_keys=True))
    (out / "trials.json").write_text(json.dumps({"objective": "validation " + OBJECTIVE, "best_trial": result.best_number,
                                                 "best_value": result.best_value, "seconds": round(result.seconds, 1),
                                                 "trials": result.trials}, indent=2))
    params = sorted({k for r in result.trials for k in r["params"]})
    with open(out / "trials.csv", "w", newline="") as f:
        w = csv.writer(f)
        head = ["number", "state", "value", "epochs", "best_epoch", "window_offset", "recall@20", "seconds"]
        w.writerow([*head, *params])
        for r in result.trials:
            w.writerow([*(r[k] for k in head), *(r["params"].get(k, "") for k in params)])
    plot_history(result.trials, out / "optimization_history.png")


def plot_history(rows: list[dict], path: Path) -> Path:
    """Each trial's validation MRR@20 (pruned: the last value it reported, hollow) and the best so far."""
    fig, ax = plt.subplots(figsize=(7.0, 4.0), dpi=120)
    done = [(r["number"], r["value"]) for r in rows if r["state"] == "complete"]
    pruned = [(r["number"], r["last_reported"]) for r in rows if r["state"] == "pruned" and r["last_reported"] is not None]
    if done:
        ax.plot(*zip(*done), "o", color="tab:blue", label="complete")
        nums, vals = zip(*sorted(done))
        ax.step(nums, np.maximum.accumulate(vals), where="post", color="tab:red", label="best so far")
    if pruned:
        ax.plot(*zip(*pruned), "o", mfc="none", color="tab:gray", label="pruned (last report)")
    ax.set_xlabel("trial")
    ax.set_ylabel(f"validation {OBJECTIVE}")
    ax.set_title("hrnn tune: optimisation history", fontsize=10)
    ax.grid(alpha=0.3)
    if done or pruned:
        ax.legend(fontsize=8, loc="lower right")
    return save_figure(fig, path)
