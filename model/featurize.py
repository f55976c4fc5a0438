"""Featurization as Amazon Personalize does it: which events and users a model trains on.

Steps, in order (each one sees what the previous left):
1. event types: keep only `cfg.event_types` (all when empty);
2. collapse repeats: within a session, a run of consecutive events of the same item and the
   same type keeps only its first event (a click followed by a purchase of that item stays:
   the purchase is a different signal);
3. item support: drop items with fewer than `cfg.min_item_support` events;
4. user history length: the users whose event count is below the
   `min_user_history_length_percentile` quantile or above the
   `max_user_history_length_percentile` quantile of all users' counts (with max 0.99 the
   longest 1%; a percentile of 0.0 / 1.0 disables its side, as does one whose share of the users
   is less than one user: max 0.99 applies from 100 users on) are kept out of TRAINING only, as
   Personalize documents these settings: they stay in the featurized log, so every evaluation
   (`hrnn evaluate`, validation, tune's objective, the retrainer's comparison) scores them as the
   worker serves them. `learning_users` says who training learns from.

Event type names of `event_types` or `event_type_weights` that no event of the data has are warned about (the
logger and the report), not refused: a retraining window may lack a type the config names (no purchase this
month), but a misspelt name would otherwise drop that type's events or leave its weight at 1, silently.
"""
from __future__ import annotations

import difflib
import logging
from dataclasses import dataclass, field

import numpy as np

from model.config import DataConfig
from model.interactions import Interactions
from model.sessions import session_starts

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class StepCount:
    """What one featurization step removed."""

    step: str
    events_dropped: int
    users_dropped: int
    items_dropped: int


@dataclass(frozen=True)
class FeaturizeReport:
    events_before: int
    events_after: int
    users_before: int
    users_after: int
    items_before: int
    items_after: int
    steps: tuple[StepCount, ...] = field(default_factory=tuple)
    min_user_events: float = 0.0  # history-length bounds of the users training learns from (events per user)
    max_user_events: float = float("inf")
    history_users_out: int = 0  # users outside those bounds (kept out of training, still evaluated)
    history_events_out: int = 0  # their events in the featurized log
    warnings: tuple[str, ...] = ()  # event type names of the config that no event has (unmatched_types)

    def dropped(self, step: str) -> StepCount:
        return next(s for s in self.steps if s.step == step)

    def emptied_by(self) -> StepCount | None:
        """The step that dropped the last events (None while some are left)."""
        left = self.events_before
        for s in self.steps:
            left -= s.events_dropped
            if left == 0 and s.events_dropped:
                return s
        return None

    def lines(self) -> list[str]:
        out = [f"events {self.events_before} -> {self.events_after}, users {self.users_before} -> "
               f"{self.users_after}, items {self.items_before} -> {self.items_after}"]
        for s in self.steps:
            out.append(f"  {s.step}: -{s.events_dropped} events, -{s.users_dropped} users, -{s.items_dropped} items")
        out.append(f"  user history length kept for training: {self.min_user_events:g} .. {self.max_user_events:g} "
                   f"events: -{self.history_events_out} events, -{self.history_users_out} users kept out of "
                   "training (still evaluated)")
        out += [f"  warning: {w}" for w in self.warnings]
        return out

    def __str__(self) -> str:
        return "\n".join(self.lines())


def featurize(data: Interactions, cfg: DataConfig) -> tuple[Interactions, FeaturizeReport]:
    """Apply the steps of the module docstring; the result has compacted vocabularies."""
    cur = data.compact()
    steps: list[StepCount] = []
    warnings = unmatched_types(cfg, tuple(cur.event_types[t] for t in np.unique(cur.event_type)))
    for w in warnings:
        log.warning("%s", w)

    def apply(step: str, keep: np.ndarray) -> None:
        nonlocal cur
        before = (len(cur), _n_present(cur.user), _n_present(cur.item))
        cur = cur.subset(keep)
        steps.append(StepCount(step, before[0] - len(cur), before[1] - cur.n_users, before[2] - cur.n_items))

    # 1. event types
    if cfg.event_types:
        wanted = [cur.type_code(t) for t in cfg.event_types]
        apply("event_types", np.isin(cur.event_type, [c for c in wanted if c is not None]))
    else:
        apply("event_types", np.ones(len(cur), dtype=bool))

    # 2. collapse repeats
    keep = np.ones(len(cur), dtype=bool)
    if cfg.collapse_repeats and len(cur) > 1:
        starts = session_starts(cur, cfg.session_timeout_s, cfg.whole_history_session)
        keep[1:] = starts[1:] | (cur.item[1:] != cur.item[:-1]) | (cur.event_type[1:] != cur.event_type[:-1])
    apply("collapse_repeats", keep)

    # 3. item support
    support = np.bincount(cur.item, minlength=cur.n_items)
    apply("min_item_support", support[cur.item] >= cfg.min_item_support)

    # 4. user history length percentiles: bounds only, the users outside them leave training alone (pipeline)
    lengths = np.bincount(cur.user, minlength=cur.n_users)
    lo, hi = 0.0, float("inf")
    # A side applies only where its share is at least one whole user: the interpolated 0.99 quantile lies below a
    # unique maximum, so a log of 5 users lost its longest one (20%, where the setting says 1%). With a tolerance:
    # 1 - 0.9 is 0.0999..., and 10 users at max 0.9 keep one out.
    n = len(lengths)
    if n * cfg.min_user_history_length_percentile >= 1.0 - 1e-9:
        lo = float(np.quantile(lengths, cfg.min_user_history_length_percentile))
    if n * (1.0 - cfg.max_user_history_length_percentile) >= 1.0 - 1e-9:
        hi = float(np.quantile(lengths, cfg.max_user_history_length_percentile))
    out_user = (lengths < lo) | (lengths > hi)

    report = FeaturizeReport(
        events_before=len(data), events_after=len(cur),
        users_before=_n_present(data.user), users_after=cur.n_users,
        items_before=_n_present(data.item), items_after=cur.n_items,
        steps=tuple(steps), min_user_events=lo, max_user_events=hi,
        history_users_out=int(out_user.sum()), history_events_out=int(lengths[out_user].sum()),
        warnings=tuple(warnings),
    )
    return cur, report


def unmatched_types(cfg: DataConfig, types_in_data: tuple[str, ...]) -> list[str]:
    """A warning for each event type name of `cfg.event_types` and `cfg.event_type_weights` that none of
    `types_in_data` is, with the data's types and the closest of them to a misspelling."""
    out = []
    for setting, names in (("event_types", cfg.event_types), ("event_type_weights", tuple(cfg.event_type_weights))):
        for name in names:
            if name in types_in_data:
                continue
            close = difflib.get_close_matches(name, types_in_data, n=1)
            out.append(f"{setting} names event type {name!r}, which no event of the data has"
                       + (f" (did you mean {close[0]!r}?)" if close else "")
                       + f": it matches nothing (the data's types: {', '.join(types_in_data) or 'none'})")
    return out


def learning_users(data: Interactions, report: FeaturizeReport) -> np.ndarray:
    """Per user code of the featurized `data`: its history length lies within the report's bounds, so training
    learns from the user (the history-length filter of step 4)."""
    lengths = np.bincount(data.user, minlength=data.n_users)
    return (lengths >= report.min_user_events) & (lengths <= report.max_user_events)


def why_empty(report: FeaturizeReport, cfg: DataConfig, types_in_data: tuple[str, ...]) -> str:
    """What to change when featurization left no events: the step that dropped the last ones, its setting."""
    step = report.emptied_by()
    if step is None:
        return "the file has no events"
    setting = {
        "event_types": f"event_types = {', '.join(cfg.event_types)} matches none of the file's types "
                       f"({', '.join(types_in_data)})",
        "collapse_repeats": "collapse_repeats",
        "min_item_support": f"min_item_support = {cfg.min_item_support}: no item has that many events",
    }[step.step]
    return f"featurization left no events: step {step.step} dropped the last {step.events_dropped} ({setting})"


def why_no_learning_user(report: FeaturizeReport, cfg: DataConfig) -> str:
    """What to change when the history-length filter kept every user of the training part out of training."""
    return (f"the user_history_length filter keeps no user for training: min/max_user_history_length_percentile = "
            f"{cfg.min_user_history_length_percentile:g}/{cfg.max_user_history_length_percentile:g} keep users of "
            f"{report.min_user_events:g} .. {report.max_user_events:g} events: the training part has none")


def event_weights(data: Interactions, cfg: DataConfig) -> np.ndarray:
    """float32 loss weight of each row from `cfg.event_type_weights` (types not listed weigh 1.0)."""
    table = np.array([cfg.event_type_weights.get(t, 1.0) for t in data.event_types] or [1.0], dtype=np.float32)
    return table[data.event_type]


def _n_present(codes: np.ndarray) -> int:
    return int(np.unique(codes).size)
