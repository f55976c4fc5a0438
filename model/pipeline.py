"""From an interactions log to a published model version.

Featurize, sessionize, hold out the evaluation protocol's test events (so `hrnn evaluate`
on the same file scores events the model never saw), leave out of what remains the users the
history-length filter keeps out of training (Personalize's min/max_user_history_length_percentile:
they are evaluated everywhere, `hrnn evaluate` included, but never learnt from), hold out each
user's last session for early stopping (every user's: validation is an evaluation, so the
filtered users' sessions are scored too; only the others' train), train, and publish the version
with its metrics. With `refit` (the default) the published network is trained once more, from
scratch, on all it may learn from for the epoch count early stopping chose: the held-out sessions
are each user's most recent ones, the behaviour (and the new items) a retrained model exists to learn.
With `distill_teachers` = N > 0, N networks of the same config (other seeds) are trained that way
first, and both runs of the published network also learn the teachers' mean predictions.
With the repeat head, the published network's window offset is then calibrated (model.calibration).
A publish that makes the version CURRENT holds the registry's pointer lock (model/registry.py current_lock).
"""
from __future__ import annotations

import sys
from contextlib import AbstractContextManager, nullcontext
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from model.artifact import save_version
from model.calibration import Calibration, calibrate_window_offset, set_window_offset
from model.config import DataConfig, HRNNConfig
from model.evaluate import evaluate
from model.errors import ArtifactError, DataError
from model.featurize import FeaturizeReport, event_weights, featurize, learning_users, why_empty, why_no_learning_user
from model.inference import HRNNScorer
from model.interactions import Interactions
from model.network import HRNN
from model.plots import plot_training_curve
from model.registry import current_lock
from model.sessions import session_starts
from model.splits import PERSONALIZE, Split, last_session_split, make_split
from model.train import FitResult, Validator, fit, has_targets

HOLDOUTS = ("last-session", "personalize", "none")
MAX_VALIDATION_USERS = 3000  # validation runs every epoch; a sample keeps it cheap


@dataclass
class Prepared:
    data: Interactions  # every user, those the history-length filter keeps out of training too: evaluations split it
    starts: np.ndarray
    report: FeaturizeReport
    learns: np.ndarray  # per user code of data: training learns from the user (model.featurize.learning_users)


@dataclass
class TrainingRun:
    version_dir: Path
    fit: FitResult  # the early-stopping run (its history, best epoch); with refit, not the published network
    report: FeaturizeReport
    metrics: dict


def prepare(data: Interactions, data_config: DataConfig) -> Prepared:
    feat, report = featurize(data, data_config)
    return Prepared(feat, session_starts(feat, data_config.session_timeout_s, data_config.whole_history_session),
                    report, learning_users(feat, report))


def training_part(prep: Prepared, holdout: str, seed: int = 0) -> tuple[Interactions, np.ndarray]:
    """The events left when `holdout` protocol's test events are reserved, of every user (codes of prep.data)."""
    if holdout == "none":
        return prep.data, prep.starts
    split = make_split(holdout, prep.data, prep.starts, seed=seed)
    return split.train, split.train_starts


def learning_part(prep: Prepared, holdout: str, seed: int = 0) -> tuple[Interactions, np.ndarray]:
    """What the network may learn from: the training part less the users the history-length filter keeps out,
    compacted (its items are the served catalogue)."""
    train, starts = training_part(prep, holdout, seed)
    learn = prep.learns[train.user]
    return train.subset(learn), starts[learn]


@dataclass
class FitInputs:
    """What one training run learns from and stops early on (shared by `hrnn train` and `hrnn tune`)."""

    prep: Prepared
    train: Interactions  # what early stopping trains on: `full` less the validation sessions
    starts: np.ndarray
    validation: Split | None  # every user's last training session (see validation_sessions), in `full`'s codes
    full: Interactions  # all the network may learn from (learning_part): its catalogue is the served one
    full_starts: np.ndarray


def fit_inputs(data: Interactions, data_config: DataConfig, holdout: str = "last-session", seed: int = 0,
               early_stopping: bool = True, config: HRNNConfig | None = None) -> FitInputs:
    """Featurize, reserve the `holdout` protocol's test events, keep the users the history-length filter lets
    training learn from, then (early_stopping) hold out each user's last session as the validation split; never
    touches the test events. With `config`, no validation split either when what it leaves the early-stopping
    run holds no row that run would predict (every pair in a last session): it would learn nothing, and its
    untrained network's validation would choose the refit's epoch count."""
    prep = prepare(data, data_config)
    steps = "; ".join(line.strip() for line in prep.report.lines())
    if not len(prep.data):
        raise DataError(data.source, f"{why_empty(prep.report, data_config, data.event_types)}. Featurization: {steps}")
    train, starts = training_part(prep, holdout, seed)
    learn = prep.learns[train.user]
    full, full_starts = train.subset(learn), starts[learn]  # learning_part's
    if not len(full):
        raise DataError(data.source, f"{why_no_learning_user(prep.report, data_config)}. Featurization: {steps}")
    if len(full) == len(np.unique(full.user)):  # a network trained on no pair would publish its random weights
        raise DataError(data.source, f"no user has two events in what training may learn from ({len(full)} events "
                                     f"of {len(full)} users, after the {holdout!r} holdout): there is no next event "
                                     f"to learn. {_why_single_events(prep.report)}")
    fit_on, fit_starts, val = full, full_starts, None
    if early_stopping:
        cand = validation_sessions(train, learn, data_config)
        if cand.test and (config is None or has_targets(cand.train, cand.train_starts, config)):
            fit_on, fit_starts, val = cand.train, cand.train_starts, cand
    return FitInputs(prep, fit_on, fit_starts, val, full, full_starts)


def _why_single_events(report: FeaturizeReport) -> str:
    if report.history_users_out:  # the users it kept out may be all those with a next event
        return (f"The user history length percentiles kept {report.history_users_out} user(s) out of training: "
                "widen min/max_user_history_length_percentile (0.0 / 1.0 turn them off)")
    return "Is USER_ID mapped to a per-event column?"


def validation_sessions(train: Interactions, learn: np.ndarray, data_config: DataConfig) -> Split:
    """Each user's last session of the training part `train` (`learn`: per row, training learns from its user),
    as the last-session split takes it; its train is what the early-stopping run learns from: the other sessions
    of the learning users. The users the history-length filter keeps out of training are validated too
    (validation is an evaluation, and the worker serves them), in the network's codes: their events of items no
    learning user has are left out, as the network cannot know them, and so are targets of items only the
    filtered users' earlier sessions hold: the early-stopping run never learns them."""
    learnt = np.zeros(train.n_items, dtype=bool)
    learnt[train.item[learn]] = True
    known = learnt[train.item]
    every = train.subset(known)  # compacted: the items, and so the codes, of learning_part's
    starts = session_starts(every, data_config.session_timeout_s, data_config.whole_history_session)
    learns = np.zeros(every.n_users, dtype=bool)
    learns[every.user[learn[known]]] = True
    split = last_session_split(every, starts)
    rows = learns[split.train.user]
    fit = split.train.subset(rows, reindex=False)
    fitted, trained = np.zeros(every.n_items, dtype=bool), np.zeros(every.n_items, dtype=bool)
    fitted[fit.item], trained[split.train.item] = True, True
    if (fitted != trained).any():  # some item only the filtered users' earlier sessions hold: no target of it
        split = last_session_split(every, starts, known=fitted)
    return replace(split, train=fit, train_starts=split.train_starts[rows])


def validator(split: Split, seed: int = 0) -> Validator:
    """MRR@20 and recall@20 of the network on (a sample of) the split's test sessions."""
    rng = np.random.default_rng(seed)
    test, first = split.test, split.target_first
    if len(test) > MAX_VALIDATION_USERS:
        keep = np.sort(rng.choice(len(test), MAX_VALIDATION_USERS, replace=False))
        test, first = [test[i] for i in keep], [first[i] for i in keep]
    sample = Split(split.protocol, split.train, split.train_starts, test, first)

    def run(model: HRNN) -> dict:
        scorer = HRNNScorer(model)
        scorer.fit(sample.train, sample.train_starts)
        m = evaluate(sample, {"hrnn": scorer}, cutoffs=(20,), progress=False).models["hrnn"]
        model.train()
        return {"mrr@20": m["mrr@20"], "recall@20": m["recall@20"]}
    return run


@dataclass
class Trained:
    """One network's training: the early-stopping run and, with refit, the run that is published."""

    early: FitResult
    refit: FitResult | None

    @property
    def published(self) -> HRNN:
        return (self.refit or self.early).model


def fit_and_refit(inputs: FitInputs, config: HRNNConfig, data_config: DataConfig, validate: Validator | None, *,
                  device: str = "auto", progress: bool = True, init_state: dict | None = None,
                  teachers: list[Trained] | None = None) -> Trained:
    """Early stopping on the validation sessions, then (refit) again from scratch on every training event for
    the epoch count it chose. With teachers, each run learns from the teachers' networks trained on the same
    events: their early-stopping networks never saw the validation sessions either."""
    early = fit(inputs.train, inputs.starts, config, type_weights=event_weights(inputs.train, data_config),
                validate=validate, device=device, progress=progress, init_state=init_state,
                teachers=[t.early.model for t in teachers] if teachers else None)
    if not (config.refit and validate is not None):
        return Trained(early, None)
    if progress:
        print(f"refit: {len(inputs.full)} events (validation sessions included), {early.best_epoch} epochs",
              file=sys.stderr, flush=True)
    again = fit(inputs.full, inputs.full_starts, replace(config, epochs=early.best_epoch),
                type_weights=event_weights(inputs.full, data_config), device=device, progress=progress,
                init_state=init_state, teachers=[t.published for t in teachers] if teachers else None)
    return Trained(early, again)


def train_teachers(inputs: FitInputs, config: HRNNConfig, data_config: DataConfig, validate: Validator | None, *,
                   progress: bool = True, **kwargs) -> list[Trained]:
    """config.distill_teachers networks of the same config with seeds seed+1, seed+2, ... (none when 0)."""
    out = []
    for i in range(config.distill_teachers):
        cfg = replace(config, seed=config.seed + 1 + i, distill_teachers=0)
        if progress:
            print(f"teacher {i + 1}/{config.distill_teachers} (seed {cfg.seed})", file=sys.stderr, flush=True)
        out.append(fit_and_refit(inputs, cfg, data_config, validate, progress=progress, **kwargs))
    return out


def calibrate(trained: Trained, config: HRNNConfig, validate: Validator | None, progress: bool
              ) -> Calibration | None:
    """The window offset, read off the early-stopping network (the refit one has seen the validation
    sessions) and given to the published network; None without the repeat head or validation."""
    if not (config.repeat_head and config.calibrate_window_offset and validate is not None):
        return None
    cal = calibrate_window_offset(trained.early.model, validate)
    set_window_offset(trained.published, cal.window_offset)
    if progress:
        print(f"calibration: window offset {cal.window_offset:g}, validation MRR@20 "
              f"{cal.uncalibrated:.4f} -> {cal.chosen[1]:.4f}", file=sys.stderr, flush=True)
    return cal


def validation_metrics(result: FitResult, calibration: Calibration | None = None) -> dict:
    """val_* of the network as it is published: the early-stopping run's best epoch, read at the
    calibrated window offset when there is one (its offset-0 reading is the best epoch's)."""
    if calibration is not None:
        return {f"val_{k}": v for k, v in calibration.table[calibration.window_offset].items()}
    last = result.history[result.best_epoch - 1] if result.history else {}
    return {k: v for k, v in last.items() if k.startswith("val_")}


def train_version(data: Interactions, registry: str | Path, *, config: HRNNConfig, data_config: DataConfig,
                  holdout: str = "last-session", early_stopping: bool = True, device: str = "auto",
                  progress: bool = True, init_state: dict | None = None, make_current: bool = True,
                  extra_metrics: dict | None = None) -> TrainingRun:
    inputs = fit_inputs(data, data_config, holdout, config.seed, early_stopping, config)
    validate = validator(inputs.validation, config.seed) if inputs.validation is not None else None
    run = dict(device=device, progress=progress, init_state=init_state)
    teachers = train_teachers(inputs, config, data_config, validate, **run)
    trained = fit_and_refit(inputs, config, data_config, validate, teachers=teachers, **run)
    result, again = trained.early, trained.refit
    calibration = calibrate(trained, config, validate, progress)
    train = inputs.full if again else inputs.train
    extra = {"refit": {"epochs": result.best_epoch, "history": again.history}} if again else {}
    if calibration:
        extra["calibration"] = calibration.to_json()
    if teachers:
        extra["distill"] = {"teachers": len(teachers), "weight": config.distill_weight,
                            "teacher_validation": [validation_metrics(t.early) for t in teachers]}
    # val_* are the early-stopping run's (a refit network has trained on the validation sessions), calibrated
    metrics = {"best_epoch": result.best_epoch, "history": result.history, "holdout": holdout,
               **holdout_seed_metric(holdout, config.seed),
               "train_events": len(train), "train_users": int(len(np.unique(train.user))),
               "featurize": report_dict(inputs.prep.report), **extra, **validation_metrics(result, calibration),
               **(extra_metrics or {})}
    with _pointer_lock(registry, make_current):
        path = save_version(registry, trained.published, config, data_config, [str(i) for i in train.item_ids],
                            list(train.event_types), metrics, make_current=make_current, holdout=holdout,
                            extras=lambda d: plot_training_curve(result.history, d / "training_curve.png",
                                                                 refit=again.history if again else None,
                                                                 calibrated=calibration and calibration.chosen))
    return TrainingRun(path, result, inputs.prep.report, metrics)


def _pointer_lock(registry: str | Path, make_current: bool) -> AbstractContextManager:
    """The registry's pointer lock for a publish that moves CURRENT: a promote at the same moment would otherwise
    interleave with it, and CURRENT's history (what a rollback returns to) could lose a step. Taken before the
    version is written, so a lock held too long (an ArtifactError) leaves nothing behind."""
    if not make_current:
        return nullcontext()
    try:
        Path(registry).mkdir(parents=True, exist_ok=True)  # a first publish makes the registry; the lock lives in it
    except OSError as exc:
        raise ArtifactError(f"cannot create the registry {registry} ({exc.strerror})") from None
    return current_lock(registry)


HOLDOUT_POPULATION = "all users"  # whom the personalize sample is drawn from since 2026-12-06 (before: the users
# the history-length filter let training learn from, so the same seed drew other users)


def holdout_seed_metric(holdout: str, seed: int) -> dict:
    """`hrnn evaluate` must draw the personalize protocol's users with the seed that held them out of training,
    from the same users, or it scores users the model trained on; only that protocol samples."""
    return {"holdout_seed": seed, "holdout_population": HOLDOUT_POPULATION} if holdout == PERSONALIZE else {}


def report_dict(report: FeaturizeReport) -> dict:
    return {"lines": report.lines()}


def train_and_publish(data: Interactions, registry: str | Path, *, config: HRNNConfig, data_config: DataConfig,
                      **kwargs) -> Path:
    """Convenience for callers that only need the version directory."""
    return train_version(data, registry, config=config, data_config=data_config, **kwargs).version_dir
