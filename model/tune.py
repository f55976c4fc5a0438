"""Hyperparameter optimisation (the Personalize `performHPO` equivalent) with Optuna.

Each trial trains on exactly what `hrnn train` trains on (model.pipeline.fit_inputs: the
evaluation protocol's test events are reserved and never seen; each remaining user's last
session is the validation split) and is scored by MRR@20 on that validation split, the
number early stopping also uses. After every epoch the trial reports its validation MRR
to Optuna; a trial below the median of earlier trials at the same epoch is pruned. A completed trial
is scored as `hrnn train` would publish it: with the repeat head, at its calibrated window offset
(model.calibration), so trials are compared as they would serve and the best value is the one
training reports. The first trial is the base config, so the study never ends worse than the
defaults it started from. Settings given explicitly (flag, environment, config file) are fixed:
no trial searches them.

The time budget: no trial starts when the time left is shorter than the quickest first epoch seen,
and no epoch (nor the calibration) starts that the time left would not hold by the longest one seen.
A trial stopped so is complete, scored as trained so far: its row in best.json holds the epochs it
ran (and calibrate_window_offset false if the calibration was skipped), so `hrnn train` reruns it.

Outputs in `out_dir`: best.json (every HRNNConfig and DataConfig field and the `holdout`: `hrnn train
--config best.json` reruns the best trial and, with `refit`, then trains it once more on the validation
sessions too; trials never distil, so with `distill_teachers` it also trains the teachers first),
trials.json and trials.csv (one row per trial) and optimization_history.png, rewritten after every trial,
so Ctrl-C or a crash keeps what the trials completed so far found.
"""
from __future__ import annotations

import csv
import dataclasses
import io
import json
import math
import os
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

from model.calibration import OFFSET_GRID  # noqa: E402
from model.config import LOSSES, DataConfig, HRNNConfig, to_dict  # noqa: E402
from model.errors import ConfigError  # noqa: E402
from model.featurize import event_weights  # noqa: E402
from model.interactions import Interactions  # noqa: E402
from model.network import HRNN, resolve_device  # noqa: E402
from model.pipeline import Trained, calibrate, fit_inputs, validation_metrics, validator  # noqa: E402
from model.plots import save_figure  # noqa: E402
from model.train import check_target_weights, fit  # noqa: E402

OBJECTIVE = "mrr@20"
N_SAMPLE_CHOICES = (0, 64, 128, 256, 512, 1024, 2048)
# The searched settings: name -> how a trial draws it (history_length and window_profile only with the head).
SPACE: dict[str, Callable[[optuna.Trial, str], Any]] = {
    "repeat_head": lambda t, k: t.suggest_categorical(k, [False, True]),
    "hidden_dimension": lambda t, k: t.suggest_int(k, 32, 256, log=True),
    "learning_rate": lambda t, k: t.suggest_float(k, 1e-4, 3e-2, log=True),
    "dropout_session": lambda t, k: t.suggest_float(k, 0.0, 0.5),
    "dropout_user": lambda t, k: t.suggest_float(k, 0.0, 0.5),
    "dropout_init": lambda t, k: t.suggest_float(k, 0.0, 0.5),
    "loss": lambda t, k: t.suggest_categorical(k, list(LOSSES)),
    "n_sample": lambda t, k: t.suggest_categorical(k, list(N_SAMPLE_CHOICES)),
    "logq": lambda t, k: t.suggest_categorical(k, [0.0, 1.0]),
    "bptt": lambda t, k: t.suggest_int(k, 4, 32, log=True),
    "recency_mask": lambda t, k: t.suggest_categorical(k, [False, True]),
    "history_length": lambda t, k: t.suggest_int(k, 10, 200, log=True),
    "window_profile": lambda t, k: t.suggest_categorical(k, [False, True]),
}
HEAD_ONLY = ("history_length", "window_profile")


def suggest(trial: optuna.Trial, base: HRNNConfig, fixed: frozenset[str] = frozenset()) -> HRNNConfig:
    """The search space; everything not searched, or `fixed` (given explicitly), stays as in `base`."""
    values: dict[str, Any] = {}
    for name, draw in SPACE.items():
        repeat = values.get("repeat_head", base.repeat_head)
        if name in fixed or (name in HEAD_ONLY and not repeat):  # H only matters with the head
            continue
        values[name] = draw(trial, name)
    cfg = dataclasses.replace(base, **values)
    cfg.validate()
    return cfg


def base_params(base: HRNNConfig, fixed: frozenset[str] = frozenset()) -> dict[str, Any]:
    """The base config as a point of the search space (the study's first trial), clipped into it; `fixed`
    settings are not in the space."""
    p = {"repeat_head": base.repeat_head, "hidden_dimension": base.hidden_dimension,
         "learning_rate": min(max(base.learning_rate, 1e-4), 3e-2), "dropout_session": min(base.dropout_session, 0.5),
         "dropout_user": min(base.dropout_user, 0.5), "dropout_init": min(base.dropout_init, 0.5), "loss": base.loss,
         "n_sample": min(N_SAMPLE_CHOICES, key=lambda n: abs(n - base.n_sample)),
         "logq": 1.0 if base.logq >= 0.5 else 0.0, "bptt": max(base.bptt, 4), "recency_mask": base.recency_mask}
    if base.repeat_head:
        p["history_length"] = min(max(base.history_length, 10), 200)
        p["window_profile"] = base.window_profile
    return {k: v for k, v in p.items() if k not in fixed}


@dataclass
class TuneResult:
    best_number: int
    best_value: float
    best_config: HRNNConfig
    data_config: DataConfig
    trials: list[dict] = field(default_factory=list)
    seconds: float = 0.0
    out_dir: Path | None = None


class _Interrupted(optuna.TrialPruned):
    """Ctrl-C during a trial. As a failure Optuna would log it with a traceback; as a prune it logs nothing."""


def tune(data: Interactions, out_dir: str | Path, *, base: HRNNConfig, data_config: DataConfig, trials: int = 20,
         timeout_s: float = 1800.0, holdout: str = "last-session", device: str = "auto", seed: int = 0,
         log: Callable[[str], None] | None = None, fixed: frozenset[str] = frozenset()) -> TuneResult:
    """Run the study and write its outputs (see the module docstring). `base.epochs` is each trial's epoch budget;
    `fixed`: the settings given explicitly, which keep their `base` value in every trial."""
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
    check_target_weights(inputs.train, inputs.starts, base, weights)  # weights that leave nothing to learn: say so once
    fixed = frozenset(fixed) & set(SPACE)
    if fixed:
        say("fixed in every trial (given explicitly, not searched): "
            + ", ".join(f"{k}={_short(getattr(base, k))}" for k in SPACE if k in fixed))
    if base.tied_embeddings and base.embedding_dimension and "hidden_dimension" not in fixed:
        fixed |= {"hidden_dimension"}
        say(f"hidden_dimension={base.hidden_dimension} fixed in every trial: tied_embeddings needs it equal to "
            f"embedding_dimension")
    configs: dict[int, HRNNConfig] = {}
    first_epochs: list[float] = []  # each trial's time to its first validation: what starting one costs at least

    def objective(trial: optuna.Trial) -> float:
        cfg = suggest(trial, base, fixed)
        configs[trial.number] = cfg
        epoch_times: list[float] = []
        val_times: list[float] = []
        t_epoch = [time.perf_counter()]
        out_of_time = [False]

        def report(model: HRNN) -> dict:
            t_val = time.perf_counter()
            m = validate(model)
            now = time.perf_counter()
            val_times.append(now - t_val)
            epoch_times.append(now - t_epoch[0])
            t_epoch[0] = now
            step = len(epoch_times)
            if step == 1:
                first_epochs.append(epoch_times[0])
            say(f"  trial #{trial.number} epoch {step}/{cfg.epochs}: {OBJECTIVE} {m[OBJECTIVE]:.4f}, "
                f"{epoch_times[-1]:.1f} s")
            trial.report(m[OBJECTIVE], step)
            trial.set_user_attr("epochs", step)
            if trial.should_prune():
                raise optuna.TrialPruned(f"pruned after epoch {step}: {OBJECTIVE} {m[OBJECTIVE]:.4f}")
            out_of_time[0] = step < cfg.epochs and now + max(epoch_times) > deadline
            return m

        t0 = time.perf_counter()
        result = fit(inputs.train, inputs.starts, cfg, type_weights=weights, validate=report, device=device,
                     progress=False, stop=lambda: out_of_time[0])
        if out_of_time[0]:  # kept as trained so far: best.json must rerun these epochs, not cfg.epochs
            cfg = configs[trial.number] = dataclasses.replace(cfg, epochs=len(epoch_times))
            trial.set_user_attr("stopped_for_time", True)
        calibrates = cfg.repeat_head and cfg.calibrate_window_offset
        if calibrates and time.perf_counter() + len(OFFSET_GRID) * max(val_times) > deadline:
            # the calibration validates once per offset; a trial scored without it is rerun without it
            cfg = configs[trial.number] = dataclasses.replace(cfg, calibrate_window_offset=False)
            trial.set_user_attr("stopped_for_time", True)
        calibration = calibrate(Trained(result, None), cfg, validate, progress=False)
        best = validation_metrics(result, calibration)
        trial.set_user_attr("best_epoch", result.best_epoch)
        trial.set_user_attr("window_offset", calibration and calibration.window_offset)
        trial.set_user_attr("recall@20", best.get("val_recall@20"))
        trial.set_user_attr("seconds", round(time.perf_counter() - t0, 1))
        return float(best["val_" + OBJECTIVE])

    def run_trial(trial: optuna.Trial) -> float:
        try:
            return objective(trial)
        except KeyboardInterrupt:
            trial.set_user_attr("interrupted", True)
            raise _Interrupted("interrupted") from None

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(direction="maximize", sampler=optuna.samplers.TPESampler(seed=seed),
                                pruner=optuna.pruners.MedianPruner(n_startup_trials=3, n_warmup_steps=0))
    study.enqueue_trial(base_params(base, fixed))

    def finish() -> TuneResult | None:
        """Write the outputs of the trials completed so far (None: none has)."""
        done = [t for t in study.trials if t.state == optuna.trial.TrialState.COMPLETE]
        if not done:
            return None
        best = max(done, key=lambda t: t.value)
        result = TuneResult(best.number, float(best.value), configs[best.number], data_config,
                            [_trial_row(t) for t in study.trials], time.perf_counter() - started, out)
        write_outputs(result, out, holdout)
        return result

    def progress(study: optuna.Study, t: optuna.trial.FrozenTrial) -> None:
        say(_trial_line(study, t, trials, time.perf_counter() - started))
        finish()  # after every trial: Ctrl-C or a crash in a later one keeps what this one found
        left = deadline - time.perf_counter()
        if t.user_attrs.get("interrupted") or left <= 0 or (first_epochs and left < min(first_epochs)):
            study.stop()

    try:
        study.optimize(run_trial, n_trials=trials, timeout=timeout_s, callbacks=[progress], catch=(ConfigError,))
        if any(t.user_attrs.get("interrupted") for t in study.trials):
            raise KeyboardInterrupt
    except (KeyboardInterrupt, Exception) as exc:  # an interrupted or crashed study keeps its completed trials
        say(_stopped_line(exc, finish()))
        raise
    result = finish()
    if result is None:
        raise ConfigError("no trial completed within the budget (raise --timeout-s or lower --epochs)")
    say(f"best trial #{result.best_number}: {OBJECTIVE} {result.best_value:.4f} after {result.seconds:.0f} s; "
        f"wrote {out / 'best.json'}")
    return result


def _stopped_line(exc: BaseException, result: TuneResult | None) -> str:
    why = "interrupted" if isinstance(exc, KeyboardInterrupt) else f"stopped by {type(exc).__name__}: {exc}"
    if result is None:
        return f"{why} before any trial completed: nothing written"
    n = sum(r["state"] == "complete" for r in result.trials)
    return (f"{why}; the best of the {n} trial(s) completed, #{result.best_number} ({OBJECTIVE} "
            f"{result.best_value:.4f}), is in {result.out_dir / 'best.json'}")


def _trial_row(t: optuna.trial.FrozenTrial) -> dict:
    last = t.intermediate_values[max(t.intermediate_values)] if t.intermediate_values else None
    state = "interrupted" if t.user_attrs.get("interrupted") else t.state.name.lower()
    return {"number": t.number, "state": state, "value": t.value, "last_reported": last,
            "epochs": t.user_attrs.get("epochs", 0), "best_epoch": t.user_attrs.get("best_epoch"),
            "window_offset": t.user_attrs.get("window_offset"), "recall@20": t.user_attrs.get("recall@20"),
            "stopped_for_time": bool(t.user_attrs.get("stopped_for_time")),
            "seconds": round(t.duration.total_seconds(), 1) if t.duration else None,
            "intermediate": {str(k): v for k, v in sorted(t.intermediate_values.items())}, "params": dict(t.params)}


def _trial_line(study: optuna.Study, t: optuna.trial.FrozenTrial, total: int, elapsed: float) -> str:
    row = _trial_row(t)
    if t.state == optuna.trial.TrialState.COMPLETE:
        offset = "" if row["window_offset"] is None else f", window offset {row['window_offset']:g}"
        offset += ", stopped for time" if row["stopped_for_time"] else ""
        what = f"{OBJECTIVE} {t.value:.4f} (epoch {row['best_epoch']}/{row['epochs']}{offset})"
    elif row["state"] == "interrupted":
        # after its last epoch the cut may have come in the calibration: the epochs done, not the one "in"
        what = f"interrupted after epoch {row['epochs']}" if row["epochs"] else "interrupted in its first epoch"
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


def write_outputs(result: TuneResult, out: Path, holdout: str = "last-session") -> None:
    """best.json, trials.json/csv and the history PNG, each replaced whole: a Ctrl-C while writing leaves the
    previous trial's file, never half of one."""
    best = {**to_dict(result.best_config), **to_dict(result.data_config), "holdout": holdout}
    _replace(out / "best.json", lambda p: p.write_text(json.dumps(best, indent=2, sort_keys=True)))
    trials = {"objective": "validation " + OBJECTIVE, "best_trial": result.best_number, "best_value": result.best_value,
              "seconds": round(result.seconds, 1), "holdout": holdout, "trials": result.trials}
    _replace(out / "trials.json", lambda p: p.write_text(json.dumps(trials, indent=2)))
    params = sorted({k for r in result.trials for k in r["params"]})
    table = io.StringIO(newline="")
    w = csv.writer(table)
    head = ["number", "state", "value", "epochs", "best_epoch", "window_offset", "recall@20", "seconds"]
    w.writerow([*head, *params])
    for r in result.trials:
        w.writerow([*(r[k] for k in head), *(r["params"].get(k, "") for k in params)])
    _replace(out / "trials.csv", lambda p: p.write_text(table.getvalue(), newline=""))
    _replace(out / "optimization_history.png", lambda p: plot_history(result.trials, p))


def _replace(path: Path, write: Callable[[Path], object]) -> None:
    tmp = path.with_name(f".{path.stem}.tmp{path.suffix}")  # the suffix kept: savefig picks the format by it
    write(tmp)
    os.replace(tmp, path)


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
