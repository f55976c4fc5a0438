"""One retraining run: archive window -> candidate model -> compare with the serving one -> publish or not.

It runs in a child process of the retraining service (`python -m stream.retrain_job SPEC OUT`),
so training never blocks the service's event loop, and imports neither Kafka nor Faust.

Steps: read the newest `window_days` of the archive; train a candidate with the serving
version's hyperparameters (plus overrides), holding out each user's last session
(the newest events, unseen by the candidate); evaluate candidate and serving version on those
sessions; publish the candidate (and make it CURRENT) only if its metric is not worse than the
serving one's by more than `margin` (relative), and not when CURRENT has moved since the run read
it (a rollback or promotion during the run: the comparison is then with a version that no longer
serves). That last look at CURRENT, the publishing and the pruning after it hold the registry's
pointer lock (model/registry.py current_lock), so a promote or rollback lands before or after
them, never in between. The candidate is trained into a staging registry first, so a rejected
one never appears in the registry, and a published one carries the comparison in its
metrics.json from the moment it is visible. A staging registry left by a killed run is removed
by the next run.
"""
from __future__ import annotations

import argparse
import json
import logging
import shutil
import sys
import time
import uuid
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

from model.artifact import LoadedModel, current_version, load_version, save_version
from model.config import DataConfig, HRNNConfig, load_config, to_dict
from model.errors import ArtifactError, ConfigError, HRNNError
from model.evaluate import FIRST, evaluate
from model.inference import HRNNScorer
from model.metrics import NextItemMetrics
from model.network import HRNN, WINDOW_OFFSET
from model.pipeline import learning_part, prepare, train_version
from model.registry import STAGING_PREFIX, RegistryLock, current_lock, prune
from model.splits import LAST_SESSION, make_split
from stream.archive import ArchiveError, Window, read_window, scan_window

log = logging.getLogger("stream.retrain_job")  # also when run as __main__

HOLDOUT = LAST_SESSION
LOCK_NAME = ".retrain.lock"
STATUSES = ("published", "rejected", "skipped", "failed")
GATE_CUTOFFS = (10, 20)  # the comparison's metrics; "first/" prefixes those of the first item of a session
GATE_METRICS = frozenset(k for name in NextItemMetrics(1, GATE_CUTOFFS).result() for k in (name, FIRST + name))


@dataclass
class RetrainSpec:
    """Everything one run needs; JSON round-trips to the child process."""

    registry: str
    archive: str
    window_days: int = 7
    margin: float = 0.05  # candidate may be this much worse (relative) than the serving version
    metric: str = "mrr@20"
    warm_start: bool = False
    min_events: int = 1000
    device: str = "cpu"
    keep_versions: int = 0  # after publishing, keep this many versions (0: keep all)
    canary: bool = False  # publish without making the version CURRENT (it is announced as a canary)
    hrnn: dict[str, Any] = field(default_factory=dict)  # HRNNConfig overrides
    data: dict[str, Any] = field(default_factory=dict)  # DataConfig overrides


@dataclass
class RetrainOutcome:
    status: str  # one of STATUSES
    reason: str
    version: str | None = None
    path: str | None = None
    serving_version: str | None = None
    candidate: dict[str, float] = field(default_factory=dict)
    serving: dict[str, float] = field(default_factory=dict)
    train_events: int = 0
    window_events: int = 0
    warm_start: dict[str, Any] | None = None
    seconds: float = 0.0
    pruned: list[str] = field(default_factory=list)
    # what CURRENT named right after publishing (the version itself, or the one a canary serves beside): the
    # service announces the version only while CURRENT still names it (stream/retrainer.py announce_published)
    current: str | None = None


def passes_gate(candidate: float, serving: float | None, margin: float) -> bool:
    """Not worse than the serving metric by more than `margin` of it (no serving version: pass)."""
    if serving is None:
        return True
    return candidate >= serving - margin * abs(serving)


def item_indexed_keys(config: HRNNConfig) -> set[str]:
    """Parameters with one row per item: the keys whose first dimension follows the catalogue size."""
    a, b = HRNN(2, config).state_dict(), HRNN(3, config).state_dict()
    return {k for k in a if a[k].shape != b[k].shape}


def warm_start_state(serving: LoadedModel, item_ids: list[str], config: HRNNConfig
                     ) -> tuple[dict[str, torch.Tensor] | None, dict[str, Any]]:
    """Initial weights for a model over `item_ids` taken from the serving model.

    Item rows are carried over by item id (new items keep a fresh initialisation); every other
    weight must have the same shape. Returns (None, why) when the serving model cannot seed it."""
    fresh = HRNN(len(item_ids), config).state_dict()
    old = serving.model.state_dict()
    if set(old) != set(fresh):
        return None, {"reason": "the serving model has other parameters (another variant or head)"}
    per_item = item_indexed_keys(config)
    old_index = {item: i for i, item in enumerate(serving.item_ids)}
    rows_new = [i for i, item in enumerate(item_ids) if item in old_index]
    if not rows_new:
        return None, {"reason": "no item of the new window is known to the serving model"}
    rows_old = [old_index[item_ids[i]] for i in rows_new]
    state = {}
    for k, t in fresh.items():
        o = old[k].to(t.device)
        if k == WINDOW_OFFSET:
            state[k] = t  # not the serving network's: the new network is calibrated after its own training
        elif k in per_item:
            if o.shape[1:] != t.shape[1:]:
                return None, {"reason": f"{k} has shape {tuple(o.shape)} in the serving model"}
            t = t.clone()
            t[torch.tensor(rows_new)] = o[torch.tensor(rows_old)]
            state[k] = t
        elif o.shape != t.shape:
            return None, {"reason": f"{k} has shape {tuple(o.shape)} in the serving model, {tuple(t.shape)} needed"}
        else:
            state[k] = o.clone()
    return state, {"from": serving.version, "items_shared": len(rows_new),
                   "items_new": len(item_ids) - len(rows_new)}


def _metrics_on_split(models: dict[str, LoadedModel], data, data_config: DataConfig) -> dict[str, dict[str, float]]:
    """Scores on every user's last session: the users the history-length filter kept out of training too, as the
    worker serves them."""
    prep = prepare(data, data_config)
    split = make_split(HOLDOUT, prep.data, prep.starts)
    if not split.test:
        raise ArchiveError("no user of the window has two sessions: nothing to evaluate on")
    scorers = {name: HRNNScorer.for_version(m, split.train, name=name) for name, m in models.items()}
    for s in scorers.values():
        s.fit(split.train, split.train_starts)
    res = evaluate(split, scorers, cutoffs=GATE_CUTOFFS, progress=False)
    return {name: {k: float(v) for k, v in m.items() if isinstance(v, (int, float))} for name, m in res.models.items()}


def _serving_model(registry: Path, cur: str | None) -> LoadedModel | None:
    if cur is None:
        return None
    try:
        return load_version(registry / cur)
    except ArtifactError as exc:
        # a broken CURRENT must not block a fresh model: the candidate then competes with nothing
        log.error("serving version unreadable; the candidate is judged alone: %s", exc)
        return None


def retrain(spec: RetrainSpec) -> RetrainOutcome:
    """Run one retraining (in this process); never raises for data or model problems, reports them."""
    t0 = time.monotonic()
    registry = Path(spec.registry)
    try:
        lock = RegistryLock(registry, LOCK_NAME)  # only one run per registry, even when leadership moves mid-run
    except ConfigError as exc:
        return RetrainOutcome("failed", str(exc))
    if not lock.acquire():
        lock.release()
        return RetrainOutcome("skipped", "another retraining run holds the registry lock")
    staging = registry / f"{STAGING_PREFIX}{uuid.uuid4().hex[:8]}"
    try:
        _remove_left_staging(registry)
        out = _retrain_locked(spec, registry, staging)
    except HRNNError as exc:
        out = RetrainOutcome("failed", str(exc))
    finally:
        shutil.rmtree(staging, ignore_errors=True)
        lock.release()
    out.seconds = round(time.monotonic() - t0, 3)
    return out


def _remove_left_staging(registry: Path) -> None:
    """Remove the staging folders of earlier runs: a run killed at its timeout (SIGKILL) never cleans its own up.
    Only under the registry lock: it guarantees that no other run is training into one of them."""
    left = sorted(d for d in registry.glob(f"{STAGING_PREFIX}*") if d.is_dir())
    for d in left:
        shutil.rmtree(d, ignore_errors=True)
    if left:
        log.warning("removed the staging folders of earlier runs (killed before they could clean up): %s",
                    ", ".join(d.name for d in left))


def _retrain_locked(spec: RetrainSpec, registry: Path, staging: Path) -> RetrainOutcome:
    window = scan_window(spec.archive, spec.window_days)
    try:
        out = _retrain_window(spec, registry, staging, window)
    except HRNNError as exc:  # a failed run is where an incomplete window matters most
        out = RetrainOutcome("failed", str(exc))
    out.reason += window.note()  # what the window left out (unreadable files): a JSON reader must learn it too
    return out


def _retrain_window(spec: RetrainSpec, registry: Path, staging: Path, window: Window) -> RetrainOutcome:
    n = window.events
    if n < spec.min_events:
        return RetrainOutcome("skipped", f"{n} events in the {spec.window_days}-day window, "
                                         f"{spec.min_events} needed", window_events=n)
    data = read_window(spec.archive, spec.window_days, window=window)
    serving_name = current_version(registry)  # the name, not serving.version: that is None for a broken CURRENT
    serving = _serving_model(registry, serving_name)
    base_h = to_dict(serving.config) if serving else {}
    base_d = to_dict(serving.data_config) if serving else {}
    config = load_config(HRNNConfig, file_values=base_h, overrides=spec.hrnn)
    data_config = load_config(DataConfig, file_values=base_d, overrides=spec.data)
    init_state, warm = None, None
    if spec.warm_start and serving is not None:
        items = [str(i) for i in learning_part(prepare(data, data_config), HOLDOUT, config.seed)[0].item_ids]
        init_state, warm = warm_start_state(serving, items, config)
        log.info("warm start" if init_state is not None else "cold start: serving model cannot seed it",
                 extra={"warm_start": warm})
    window = {"window_days": spec.window_days, "window_events": len(data), "source": data.source}
    log.info("training a candidate", extra={**window, "serving_version": serving.version if serving else None})
    run = train_version(data, staging, config=config, data_config=data_config, holdout=HOLDOUT,
                        early_stopping=True, device=spec.device, progress=False, init_state=init_state,
                        make_current=False, extra_metrics={"retrain": {**window, "warm_start": warm}})
    candidate = load_version(run.version_dir)
    models = {"candidate": candidate} | ({"serving": serving} if serving else {})
    scores = _metrics_on_split(models, data, data_config)
    cand_m = scores["candidate"].get(spec.metric)
    serv_m = scores["serving"].get(spec.metric) if serving else None
    if cand_m is None:
        raise ArchiveError(f"metric {spec.metric!r} is not computed (known: {', '.join(sorted(scores['candidate']))})")
    accepted = passes_gate(cand_m, serv_m, spec.margin) and bool(np.isfinite(cand_m))
    comparison = {"metric": spec.metric, "margin": spec.margin, "protocol": HOLDOUT,
                  "candidate": scores["candidate"], "serving": scores.get("serving"),
                  "serving_version": serving.version if serving else None, "accepted": accepted}
    out = RetrainOutcome("rejected", "", serving_version=serving.version if serving else None,
                         candidate=scores["candidate"], serving=scores.get("serving", {}),
                         train_events=int(run.metrics.get("train_events", 0)), window_events=len(data),
                         warm_start=warm)
    if not accepted:
        out.reason = f"{spec.metric} {cand_m:.4f} is worse than the serving {serv_m:.4f} by more than {spec.margin:g}"
        log.warning("candidate rejected", extra={"comparison": comparison})
        return out
    # the pointer lock from the look at CURRENT to the last deletion: a promote or rollback landing in between would
    # be overridden by the publish, or have its version pruned
    with current_lock(registry):
        now_current = current_version(registry)
        if now_current != serving_name:
            # a rollback or promotion during the run: the gate judged the candidate against a version that no
            # longer serves, and publishing would override the operator's choice
            out.status = "skipped"
            out.reason = (f"CURRENT moved from {serving_name or 'none'} to {now_current or 'none'} during the run: "
                          "not published over it")
            log.warning("candidate not published: CURRENT moved during the run",
                        extra={"serving_version": serving_name, "current_version": now_current})
            return out
        curve = run.version_dir / "training_curve.png"
        path = save_version(registry, candidate.model, candidate.config, candidate.data_config, candidate.item_ids,
                            candidate.event_types, {**candidate.metrics, "comparison": comparison},
                            version=candidate.version, make_current=not spec.canary, holdout=HOLDOUT,
                            extras=(lambda d: shutil.copy(curve, d / curve.name)) if curve.exists() else None)
        out.status, out.version, out.path = "published", candidate.version, str(path)
        out.current = now_current if spec.canary else candidate.version
        out.reason = (f"{spec.metric} {cand_m:.4f} vs serving {serv_m:.4f} (margin {spec.margin:g})"
                      if serv_m is not None else "no serving version to compare with")
        if spec.keep_versions:
            out.pruned = _prune_after_publishing(registry, spec.keep_versions, out)
    log.info("candidate published", extra={"version": out.version, "comparison": comparison})
    return out


def _prune_after_publishing(registry: Path, keep: int, out: RetrainOutcome) -> list[str]:
    """Prune to `keep` versions; a failure is logged and added to out.reason, never raised: the version is
    saved (and CURRENT moved) already, so the run must still report it published and have it announced."""
    try:
        return prune(registry, keep, protect=(out.version,))  # a canary is not CURRENT: prune would not spare it
    except Exception as exc:  # noqa: BLE001 (any failure here would otherwise hide a published version)
        log.error("published %s but pruning to %d versions failed: %s", out.version, keep, exc)
        out.reason += f"; pruning failed: {type(exc).__name__}: {exc}"
        return []


def main(argv: list[str] | None = None) -> int:
    """Child-process entry: read a RetrainSpec JSON file, write the RetrainOutcome JSON file."""
    p = argparse.ArgumentParser(prog="python -m stream.retrain_job")
    p.add_argument("spec")
    p.add_argument("out")
    args = p.parse_args(argv)
    from stream.observability import setup_json_logging

    setup_json_logging("INFO")
    spec = RetrainSpec(**json.loads(Path(args.spec).read_text()))
    try:
        out = retrain(spec)
    except Exception as exc:  # noqa: BLE001 (the parent must always get an outcome)
        log.exception("retraining crashed")
        out = RetrainOutcome("failed", f"{type(exc).__name__}: {exc}")
    Path(args.out).write_text(json.dumps(asdict(out), default=str))
    return 0


if __name__ == "__main__":
    sys.exit(main())
