"""Hot swap: the worker's serving model, replaced between two batches without stopping.

`ModelHolder` owns the serving `Recommender`. A requested version (from an announcement, or
directly) is loaded and validated on a background thread, so the worker never waits for
disk or torch; a version that passes becomes *pending*, and the worker's call to
`swap_if_ready()` between two batches makes it current. The worker reads `serving()` once at
the start of a batch and uses it for the whole batch, so a batch never changes versions midway
(a user is scored by one version; with a canary, two versions split the batch's users), and an
event waits at most for the batch in hand.

Before a loaded version becomes pending, the loader thread also rebuilds the stored users'
states with it (`prebuild_from`, Recommender.prebuild), so after the swap a user's next event
only catches up on the few events since, instead of the worker replaying last-H histories in
the middle of a batch. The loader runs at the lowest CPU priority, with short GIL slices and at
half duty while prebuilding: a swap may take longer, the batches must not.

A request may also make a version a *canary* (a share of the users, stream/canary.py) beside the serving
one, which stays *stable* for the rest. A canary is loaded and validated like any version and prebuilds its
own users' states; a full request for the canary's version promotes it without loading it again (the loader
only rebuilds the other users' states with it first, as before any swap), one for the stable version ends
the canary, and one for a third version replaces both (a full rollout ends any canary). A canary requested
while a full rollout is still loading or pending goes beside the version rolled out, not beside the one it
replaces: the result never depends on whether the worker swapped between the two requests. The worker reads
`serving()` once per batch, so a batch sees one stable version, one canary and one share.

A version that fails validation is refused with a log line and a counter per reason; the
serving version is untouched, and so is what the request superseded: a change loading or pending before it is under
way again, and a canary requested beside a refused rollout applies as if requested after the refusal, so a refused
version changes nothing whether or not the worker swapped before it came. Reasons:
  missing     no such version directory / manifest
  integrity   manifest unreadable or not a manifest, a file missing or unreadable, or a checksum mismatch
  unreadable  config, item index or weights cannot be read (or a check failed in a way not foreseen)
  shape       the weights do not fit the config and item index
  item_index  the item index is empty or has duplicate ids
  nonfinite   a weight is NaN or infinite
  mismatch    the directory holds another version than the one announced
  smoke       a small synthetic inference (fresh user + rebuilt stale user) failed or gave bad scores
"""
from __future__ import annotations

import logging
import math
import os
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Mapping
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from itertools import islice
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
import torch

from model.artifact import current_version, current_written_at, latest_version_dir, verify
from model.config import read_json
from model.errors import ArtifactError
from model.inference import Filters, Recommender, StepInput
from model.network import device_label
from model.state import HistoryEvent, UserState
from stream.canary import Serving, in_canary, serving_share

if TYPE_CHECKING:
    from stream.announce import Announcement, AnnouncementWatcher
    from stream.kafka_clients import ClientSettings
    from stream.observability import WorkerMetrics

log = logging.getLogger(__name__)

REFUSAL_REASONS = ("missing", "integrity", "unreadable", "shape", "item_index", "nonfinite", "mismatch", "smoke")
_SMOKE_T0_MS = 1_767_225_600_000  # any valid epoch-ms; the smoke events only need a plausible clock


class ModelRefused(ArtifactError):
    """A model version failed validation; `reason` is one of REFUSAL_REASONS."""

    def __init__(self, reason: str, path: str | Path, detail: str) -> None:
        self.reason, self.path, self.detail = reason, str(path), detail
        super().__init__(f"model version at {path} refused ({reason}): {detail}")


def validate_version(path: str | Path, *, device: str = "cpu", expected_version: str | None = None) -> Recommender:
    """Load a version and prove it can serve; raises ModelRefused with the first failed check."""
    d = Path(path)
    try:
        published = (d / "manifest.json").is_file()
    except OSError as exc:  # a directory this user may not enter: the registry's modes, not a missing version
        raise ModelRefused("unreadable", d, f"cannot be read ({exc.strerror})") from None
    if not published:
        raise ModelRefused("missing", d, "no manifest.json (not a published version directory)")
    try:
        verify(d)
    except ArtifactError as exc:
        raise ModelRefused("integrity", d, str(exc)) from None
    _check_item_index(d)
    try:
        rec = Recommender.load(d, device)
    except ArtifactError as exc:
        # load_version reports weights that do not fit the config/item index this way; checksums already passed
        reason = "shape" if "do not fit" in str(exc) else "unreadable"
        raise ModelRefused(reason, d, str(exc)) from None
    except Exception as exc:  # noqa: BLE001 (any failure to read a version is a refusal, never a crash)
        raise ModelRefused("unreadable", d, f"{type(exc).__name__}: {exc}") from None
    if expected_version is not None and rec.version != expected_version:
        raise ModelRefused("mismatch", d, f"directory holds version {rec.version!r}, announced {expected_version!r}")
    bad = [name for name, t in rec.model.state_dict().items() if t.is_floating_point() and not torch.isfinite(t).all()]
    if bad:
        raise ModelRefused("nonfinite", d, f"non-finite values in {', '.join(bad[:3])}")
    try:
        _smoke(rec)
    except ModelRefused:
        raise
    except Exception as exc:  # noqa: BLE001
        raise ModelRefused("smoke", d, f"{type(exc).__name__}: {exc}") from None
    return rec


def _check_item_index(d: Path) -> None:
    """Refuse an empty item index or one with duplicate ids before the model is built: an empty one builds a model
    no weights fit, which would read as a shape refusal. An index that cannot be read is left to the load."""
    try:
        item_ids = [str(i) for i in read_json(d / "items.json")["item_ids"]]
    except (OSError, ValueError, KeyError, TypeError):
        return
    if not item_ids or len(set(item_ids)) != len(item_ids):
        raise ModelRefused("item_index", d, f"{len(item_ids)} item ids, {len(set(item_ids))} distinct")


def check_servable(path: str | Path, version: str) -> None:
    """Refuse (ModelRefused, with its reason) a version the workers would refuse, before a command makes it
    current or announces it: the checks a worker runs before it serves one, so CURRENT never names a version no
    worker can start with."""
    validate_version(path, device="cpu", expected_version=version)


def _smoke(rec: Recommender) -> None:
    """Two events of a new user and one of a user whose state came from another version (forces a rebuild)."""
    items = rec.item_ids[:3]
    hidden = rec.model.hidden
    stale = UserState("__smoke_other_version__", np.zeros(hidden, np.float32), np.zeros(hidden, np.float32),
                      None, _SMOKE_T0_MS, 2,
                      [HistoryEvent(items[0], _SMOKE_T0_MS - 60_000, "click", True),
                       HistoryEvent(items[-1], _SMOKE_T0_MS, "click", False)], 0, 2)
    events = [StepInput("__smoke_new__", items[0], "click", _SMOKE_T0_MS),
              StepInput("__smoke_new__", items[-1], "click", _SMOKE_T0_MS + 30_000),
              StepInput("__smoke_stale__", items[0], "click", _SMOKE_T0_MS + 60_000)]
    k = min(5, len(rec.item_ids))
    out = rec.recommend({"__smoke_stale__": stale}, events, k=k, filters=Filters(exclude_purchased=False))
    if len(out.items) != len(events) or any(len(row) != k for row in out.items):
        raise ModelRefused("smoke", rec.loaded.path, f"expected {k} recommendations for each of {len(events)} events")
    if not all(math.isfinite(score) for row in out.items for _, score in row):
        raise ModelRefused("smoke", rec.loaded.path, "non-finite recommendation scores")
    if out.rebuilt_users != 1 or out.states["__smoke_stale__"].model_version != rec.version:
        raise ModelRefused("smoke", rec.loaded.path, "a state of another version was not rebuilt")
    for s in out.states.values():
        if s.user_hidden.shape != (hidden,) or not np.isfinite(s.user_hidden).all() \
                or not np.isfinite(s.session_hidden).all():
            raise ModelRefused("smoke", rec.loaded.path, "bad hidden state after a step")


def _lowest_cpu_priority() -> None:
    """Give the calling thread the lowest CPU priority (Linux: a thread is a task with its own nice
    value), so loading and prebuilding a version take only CPU time the serving batches leave."""
    try:
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), 19)
    except (AttributeError, OSError) as exc:  # not Linux, or not allowed: the load only runs at normal priority
        log.debug("cannot lower the loader thread's priority", extra={"error": str(exc)})


@contextmanager
def _short_gil_slices(seconds: float = 0.0005) -> Iterator[None]:
    """While the loader runs Python code, the worker thread waits for the GIL up to the interpreter's
    switch interval (5 ms) each time it needs it back, many times a batch; shorten it for the load."""
    before = sys.getswitchinterval()
    sys.setswitchinterval(min(before, seconds))
    try:
        yield
    finally:
        sys.setswitchinterval(before)


@dataclass
class SwapStats:
    serving: str
    pending: str | None
    loading: str | None
    swaps: int
    canary: str | None = None
    canary_share: float = 0.0
    refused: dict[str, int] = field(default_factory=dict)  # reason -> count
    last_refusal: str | None = None  # the last refusal's message
    last_load_s: float | None = None  # wall time of the last successful load + validation (+ prebuild)
    last_prebuilt: int = 0  # states the last loaded version rebuilt before its swap
    last_prebuild_s: float | None = None


@dataclass(frozen=True)
class _Request:
    path: Path
    version: str | None
    reason: str
    share: float = 1.0  # below 1: a canary
    model: Recommender | None = None  # the canary to promote: loaded already, only its prebuild runs
    # A canary's: the full rollout still under way that it goes beside, to load first (a request) or ready (a
    # model); None: beside the stable version serving now
    stable: "_Request | Recommender | None" = None
    # what this request superseded (a request or a pending change), under way again where it is refused: a refused
    # version changes nothing, whether or not the worker swapped before it came
    fallback: "_Request | _Change | None" = None

    @property
    def name(self) -> str:
        return self.version or self.path.name


def _name(change: _Request | Recommender) -> str:
    return change.name if isinstance(change, _Request) else change.version


def _relinked(req: _Request, superseded: _Request, back: "_Request | _Change | None", loaded: _Request | None,
              done: dict[int, _Request] | None = None) -> _Request:
    """`req` with every link to `superseded`, whose load finished, replaced throughout its chain of fallbacks and
    rollouts: as what a request puts back, by `back`; as the rollout a canary goes beside, by `loaded` (None:
    refused: the canary applies anew beside what the refused rollout put back, `_beside`). Else a request deeper in
    the chain, under way again after a refusal, would load that version again. A request linked twice (a rollout,
    and what a canary beside it superseded) is replaced by one copy (`done`), so the canary still tells the rollout
    it goes beside."""
    done = {} if done is None else done
    if id(req) in done:
        return done[id(req)]
    fallback, stable = req.fallback, req.stable
    if fallback is superseded:
        fallback = back
    elif isinstance(fallback, _Request):
        refused_beside = fallback.stable is superseded and loaded is None
        fallback = _relinked(fallback, superseded, back, loaded, done)
        if refused_beside:  # a canary (only ever a fallback) whose rollout was refused
            fallback = _beside(fallback)
    if stable is superseded:
        stable = loaded
    elif isinstance(stable, _Request):
        stable = _relinked(stable, superseded, back, loaded, done)
    done[id(req)] = req if fallback is req.fallback and stable is req.stable \
        else replace(req, fallback=fallback, stable=stable)
    return done[id(req)]


def _rollout_of(change: "_Request | _Change | None") -> "_Request | Recommender | None":
    """The full rollout that `change`, once under way, makes stable (as `_rollout_under_way` tells it)."""
    if change is not None and change.share < 1.0:
        return change.stable
    return change.model if isinstance(change, _Change) else change


def _beside(canary: _Request) -> "_Request | _Change":
    """`canary`, whose rollout was refused, as if requested again once what that rollout superseded
    (`canary.fallback`) is under way (by `request`'s rules): beside the rollout that makes stable; a request for
    that very version leaves the rollout alone, still putting back what it superseded should it be refused."""
    rollout = _rollout_of(canary.fallback)
    if rollout is None or canary.name != _name(rollout):
        return replace(canary, stable=rollout)
    if isinstance(rollout, Recommender):
        return _Change(rollout, 1.0)
    return rollout if canary.fallback is rollout else replace(rollout, fallback=canary.fallback)


def _repeats(req: _Request, loaded: _Request) -> bool:
    """`req` a full rollout of the version whose load `loaded` was: that load's result serves it too (a copy queued
    with another fallback, as `_end_planned_canary` does, is not the same request but the same load)."""
    return req.share == loaded.share == 1.0 and req.model is None and loaded.model is None \
        and (req.path, req.version) == (loaded.path, loaded.version)


def _restored(refused: _Request, stable: Recommender | None) -> "_Request | _Change | None":
    """What is under way again once `refused` is refused: what it superseded. A canary's beside the rollout `stable`,
    loaded with it, keeps that rollout (with the canary planned beside it before, if any) without loading it again."""
    back = refused.fallback
    if stable is None or isinstance(back, _Change):
        return back
    if isinstance(back, _Request) and back.share < 1.0:  # a canary beside the same rollout
        return replace(back, stable=stable)
    return _Change(stable, 1.0)  # the rollout alone


@dataclass(frozen=True)
class _Change:
    """What the next swap does: serve `model` to `share` of the users (1: to all, ending any canary); a canary's
    `stable`, where set, becomes the stable version in the same swap."""

    model: Recommender
    share: float
    stable: Recommender | None = None


class ModelHolder:
    """The serving model of one worker and its background loader (see the module docstring).

    Thread contract: `serving()`, `current()` and `swap_if_ready()` are called by the worker loop thread;
    `request()` / `on_announcement()` by anyone (the announcement watcher's thread).
    """

    def __init__(self, recommender: Recommender, *, registry: str | Path | None = None, device: str = "auto",
                 metrics: "WorkerMetrics | None" = None) -> None:
        self.registry = Path(registry) if registry is not None else None
        self.device, self.metrics = device, metrics
        self._serving = recommender
        self._canary: Recommender | None = None
        self._share = 0.0  # the canary's share of users
        self._pending: _Change | None = None
        self._wanted: _Request | None = None
        self._generation = 0  # bumped by every new request; a load of an older generation is dropped
        self._loading: _Request | None = None
        self._loading_gen = -1
        self._lock = threading.Condition()
        self._closed = False
        self._thread: threading.Thread | None = None
        self._watcher: "AnnouncementWatcher | None" = None
        self._swaps = 0
        self._refused: Counter[str] = Counter()
        self._last_refusal: str | None = None
        self._last_load_s: float | None = None
        self._prebuild_source: Callable[[], Iterable[Mapping[str, UserState]]] | None = None
        self._prebuild_max = 0
        self._unfit: Callable[[Recommender], str | None] = lambda _: None
        self._last_prebuilt, self._last_prebuild_s = 0, None
        if metrics is not None:
            metrics.set_model_versions({recommender.version: 1.0})

    @classmethod
    def open(cls, registry: str | Path, *, device: str = "auto", version_dir: str | Path | None = None,
             metrics: "WorkerMetrics | None" = None) -> "ModelHolder":
        """Load and validate the registry's CURRENT version (or `version_dir`) before serving.

        This first load is synchronous: there is nothing to serve until it is done. A broken
        starting version raises ModelRefused (nothing old can keep serving)."""
        path = Path(version_dir) if version_dir is not None else latest_version_dir(registry)
        rec = validate_version(path, device=device)
        log.info("serving model version", extra={"version": rec.version, "path": str(path),
                                                  "device": device_label(rec.device)})
        return cls(rec, registry=registry, device=device, metrics=metrics)

    # --- the worker loop's side ---

    def current(self) -> Recommender:
        """The stable version (the only one without a canary)."""
        return self._serving

    def serving(self) -> Serving:
        """What scores the next batch; read once per batch."""
        return Serving(self._serving, self._canary, self._share)

    @property
    def version(self) -> str:
        return self._serving.version

    def swap_if_ready(self) -> Recommender | None:
        """Between two batches: apply a pending change (a validated version, a canary's promotion, new share
        or end). Returns the new stable version if it changed, else None."""
        with self._lock:
            change, self._pending = self._pending, None
            if change is None:
                return None
            before = self.serving()
            if change.share >= 1.0:
                self._serving, self._canary, self._share = change.model, None, 0.0
            else:
                if change.stable is not None:  # a rollout with a canary beside it: both in one swap
                    self._serving = change.stable
                self._canary, self._share = change.model, change.share
            after = self.serving()
            swapped = after.stable is not before.stable
            self._swaps += swapped
        if self.metrics is not None:
            self.metrics.model_swaps_total.inc(int(swapped))
            self.metrics.set_model_versions(after.shares)
        log.info("model swapped" if swapped else "canary changed", extra={
            "from_versions": before.shares, "to_versions": after.shares})
        return after.stable if swapped else None

    def prebuild_from(self, source: Callable[[], Iterable[Mapping[str, UserState]]], max_users: int) -> None:
        """Have each loaded version rebuild up to `max_users` stored states before it becomes pending.

        `source()` yields chunks of {user: state} and runs on the loader thread (StateStores.scan_states
        is safe there); users past the cap, or met later, are rebuilt on their next event."""
        self._prebuild_source, self._prebuild_max = source, max_users

    # --- the announcing side ---

    def refuse_when(self, unfit: Callable[[Recommender], str | None]) -> None:
        """Refuse (reason `unfit`) a version loaded from now on for which `unfit` gives a reason: what the
        user of this holder cannot serve it with (the worker: its producer's record limit)."""
        self._unfit = unfit

    def request(self, path: str | Path, version: str | None = None, *, reason: str = "request",
                share: float = 1.0) -> bool:
        """Load and validate a version in the background, to serve everyone or, with `share` below 1, as a
        canary; True if a load was scheduled.

        The latest request wins: it supersedes a load in progress or a pending change (under way again where
        the request is refused: a refused version changes nothing). A request for what
        is already in flight or pending changes nothing. One for a version serving now loads nothing: it
        promotes the canary, changes its share or ends it (the stable version requested in full). A full
        rollout ends any canary, not the reverse: a canary requested while a full rollout is under way is
        loaded to serve beside the version rolled out, and a request for that version ends such a canary."""
        share = serving_share(share)
        req = _Request(self._resolve(Path(path), version), version, reason, share)
        with self._lock:
            if self._closed or not self._apply(req):
                return False
        log.info("model version requested", extra={"version": req.name, "path": str(req.path), "reason": reason,
                                                    "share": share})
        return True

    def _apply(self, req: _Request) -> bool:
        """(Under the lock) `req` as the latest request (see `request`); True if a load was scheduled."""
        if self._under_way() == (req.name, req.share):
            return False
        rollout = self._rollout_under_way()
        if rollout is not None and req.name == _name(rollout):
            self._end_planned_canary(rollout, req)
            return False
        if rollout is not None and req.share < 1.0:
            self._queue(replace(req, stable=rollout))
        elif req.name in (self._serving.version, self._canary and self._canary.version):
            self._settle(req)
            return False
        else:
            self._queue(req)
        return True

    def _under_way(self) -> tuple[str, float] | None:
        """(Under the lock) the version and share of the load in flight, else of the pending change."""
        live_load = self._loading if self._loading_gen == self._generation else None
        in_flight = self._wanted or live_load
        if in_flight is not None:
            return in_flight.name, in_flight.share
        return (self._pending.model.version, self._pending.share) if self._pending is not None else None

    def _rollout_under_way(self) -> _Request | Recommender | None:
        """(Under the lock) the full rollout of another version than the stable one that is under way, alone or
        with a canary planned beside it: its request while it loads, its model once pending (prebuilt already)."""
        live_load = self._loading if self._loading_gen == self._generation else None
        in_flight = self._wanted or live_load
        if in_flight is not None:
            return in_flight if in_flight.share == 1.0 else in_flight.stable
        change = self._pending
        if change is None:
            return None
        if change.share < 1.0:
            return change.stable
        return change.model if change.model is not self._serving else None  # not the end of a canary

    def _end_planned_canary(self, rollout: _Request | Recommender, req: _Request) -> None:
        """(Under the lock) a request for the version a rollout under way makes stable: the rollout stays, any
        canary planned beside it goes (as a request for the stable version ends a canary)."""
        if self._under_way() == (_name(rollout), 1.0):
            return  # the rollout alone: nothing planned beside it
        if isinstance(rollout, _Request):
            self._queue(rollout)
        else:
            self._generation += 1
            self._pending, self._wanted = _Change(rollout, 1.0), None
            self._lock.notify_all()
        log.info("the version a rollout under way makes stable requested: the canary planned beside it dropped",
                 extra={"version": req.name, "share": req.share, "reason": req.reason})

    def _queue(self, req: _Request) -> None:
        """(Under the lock) hand `req` to the loader thread; whatever it loads now finishes unused, and what was under
        way comes back where `req` is refused."""
        live_load = self._loading if self._loading_gen == self._generation else None
        superseded = self._wanted or live_load or self._pending
        self._generation += 1
        self._pending, self._wanted = None, replace(req, fallback=superseded)
        self._lock.notify_all()
        if self._thread is None:
            self._thread = threading.Thread(target=self._load_loop, name="hrnn-model-loader", daemon=True)
            self._thread.start()

    def _settle(self, req: _Request) -> None:
        """(Under the lock) a request for a version serving now: drop what is under way, and change the canary.
        Its promotion goes through the loader thread, which only rebuilds the other users' states with it (as
        before any swap); a new share or the canary's end waits only for the next swap."""
        dropped = self._under_way() is not None
        self._generation += 1
        self._pending, self._wanted = None, None
        self._lock.notify_all()
        canary, change = self._canary, "none"
        if canary is not None and req.name == canary.version and req.share == 1.0:
            self._queue(replace(req, model=canary))
            change = "promote the canary"
        elif canary is not None and req.name == canary.version and req.share != self._share:
            self._pending, change = _Change(canary, req.share), "change the canary's share"
        elif canary is not None and req.name == self._serving.version:  # whatever the share asked
            self._pending, change = _Change(self._serving, 1.0), "end the canary"
        if dropped or change != "none":
            log.info("a version serving now requested", extra={
                "version": req.name, "share": req.share, "reason": req.reason, "change": change, "dropped": dropped})

    def on_announcement(self, ann: "Announcement") -> None:
        """AnnouncementWatcher callback. The latest announcement found at start (handed over before the watcher
        reports being caught up) is skipped when it is a full rollout older than the registry's CURRENT: CURRENT
        moved since without an announcement (`hrnn models rollback` without --bootstrap-servers, `hrnn train`),
        and serving the announced version would undo that. A canary, and any announcement read later, applies."""
        watcher = self._watcher
        if watcher is not None and not watcher.caught_up and self._superseded_by_current(ann):
            log.warning("the latest announcement, of %s, is older than the registry's CURRENT: not served",
                        ann.version, extra={"announced_version": ann.version, "announced_at": ann.announced_at,
                                            "serving_version": self._serving.version})
            return
        self.request(ann.path, ann.version, reason=f"announcement ({ann.reason})", share=ann.share)

    def _superseded_by_current(self, ann: "Announcement") -> bool:
        """A full rollout of another version than CURRENT names, announced before CURRENT was last moved (or at a
        time not known)."""
        if ann.share < 1.0 or self.registry is None:
            return False
        try:
            current, moved_at = current_version(self.registry), current_written_at(self.registry)
        except ArtifactError as exc:  # the worker serves already; the announcement decides as it did before
            log.warning("cannot read the registry's CURRENT", extra={"error": str(exc)})
            return False
        if current is None or moved_at is None or current == ann.version:
            return False
        announced = ann.announced_epoch_s()
        return announced is None or announced < moved_at

    def follow(self, bootstrap: str, topic: str | None = None, *, registry_id: str | None = None,
               extra: "ClientSettings | None" = None, create_topic: bool = True) -> "AnnouncementWatcher":
        """Start following the announcements topic; `close()` stops it. With `create_topic` False the topic is
        neither created nor checked (a client without the rights to: it must exist already)."""
        from stream.announce import AnnouncementWatcher
        from stream.topics import MODEL_UPDATES_TOPIC

        # set before it starts: on_announcement tells the announcement found at start by this watcher's state
        self._watcher = AnnouncementWatcher(bootstrap, topic or MODEL_UPDATES_TOPIC, registry_id=registry_id,
                                            on_announcement=self.on_announcement, extra=extra,
                                            create_topic=create_topic)
        self._watcher.start()
        return self._watcher

    # --- observation ---

    def stats(self) -> SwapStats:
        with self._lock:
            return SwapStats(self._serving.version, self._pending.model.version if self._pending else None,
                             self._loading_name(), self._swaps, self._canary and self._canary.version, self._share,
                             dict(self._refused), self._last_refusal, self._last_load_s, self._last_prebuilt,
                             self._last_prebuild_s)

    def wait_announced(self, timeout_s: float) -> bool:
        """Block until the announcements present when `follow()` began are read and the version they name is
        loaded (pending for the next swap, or serving); True at once when not following; False at the deadline."""
        if self._watcher is None:
            return True
        deadline = time.monotonic() + timeout_s
        # The watcher hands the latest announcement to on_announcement before it reports being caught up.
        return self._watcher.wait_caught_up(timeout_s) and self.wait_idle(max(0.0, deadline - time.monotonic()))

    def wait_idle(self, timeout_s: float) -> bool:
        """Block until no load is queued or running (tests, shutdown); False at the deadline."""
        deadline = time.monotonic() + timeout_s
        with self._lock:
            while self._wanted is not None or self._loading is not None:
                left = deadline - time.monotonic()
                if left <= 0:
                    return False
                self._lock.wait(left)
            return True

    def close(self) -> None:
        if self._watcher is not None:
            self._watcher.stop()
        with self._lock:
            self._closed = True
            self._lock.notify_all()
        if self._thread is not None:
            self._thread.join(timeout=60)

    def __enter__(self) -> "ModelHolder":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # --- the loader thread ---

    def _loading_name(self) -> str | None:
        return None if self._loading is None else self._loading.name

    def _resolve(self, path: Path, version: str | None) -> Path:
        # An announcement carries the announcer's path; this host may mount the registry elsewhere.
        if not path.exists() and self.registry is not None:
            local = self.registry / (version or path.name)
            if local.exists():
                return local
        return path

    def _load_loop(self) -> None:
        _lowest_cpu_priority()
        while self._load_next():
            pass

    def _load_next(self) -> bool:
        """(On the loader thread) wait for the next request and load it; False once closed. One turn a call: its
        locals (requests, the versions they loaded) go with it, so a version retired meanwhile is not kept alive
        while the loader waits for the next request."""
        with self._lock:
            while self._wanted is None and not self._closed:
                self._lock.wait()
            if self._closed:
                return False
            req, self._wanted, self._loading = self._wanted, None, self._wanted
            generation = self._loading_gen = self._generation
        t0 = time.perf_counter()
        with _short_gil_slices():
            stable = req.stable
            if isinstance(stable, _Request):  # the rollout the canary goes beside loads first
                stable = self._load(stable, generation, then=self._after_refusal(stable))
                beside = self._beside_rollout(req, stable, generation)
                if beside is None:
                    return True
                req = beside
            rec = self._load(req, generation, then=stable or self._after_refusal(req))
        secs = time.perf_counter() - t0
        with self._lock:
            self._loading = None
            change = _Change(rec, req.share, stable) if rec is not None else None
            if change is not None:
                if generation != self._generation:
                    log.info("model version superseded before it was ready", extra={
                        "version": change.model.version})
                else:
                    self._pending, self._last_load_s = change, secs
                    log.info("model version ready to swap", extra={
                        "version": change.model.version, "load_s": round(secs, 3), "reason": req.reason,
                        "share": change.share, "stable_version": change.stable and change.stable.version})
            elif generation == self._generation:
                self._reinstate(req, stable)
            if generation != self._generation:
                self._hand_over(req, change, stable)
            self._lock.notify_all()
        return True

    def _beside_rollout(self, req: _Request, stable: Recommender | None, generation: int) -> _Request | None:
        """(On the loader thread, the rollout the canary `req` goes beside loaded or refused) the canary's request
        to load now, else None. Loaded, the rollout is kept with the load in flight: a canary requested meanwhile
        goes beside it without loading it again. Refused, it is no longer under way, and `req` applies as if
        requested after the refusal: it may only end or change the canary serving (`_settle`), or load, in a later
        turn of the loader, beside the stable version."""
        with self._lock:
            if generation == self._generation and stable is not None:
                self._loading = req = replace(req, stable=stable)
                return req
            self._loading = None
            if generation == self._generation:
                self._rollout_refused(req)
            else:
                self._hand_over(req.stable, _Change(stable, 1.0) if stable is not None else None, None)
            self._lock.notify_all()
            return None

    def _hand_over(self, superseded: _Request, change: _Change | None, stable: Recommender | None) -> None:
        """(Under the lock, the load of `superseded` finished after a newer request) the request still to load, and
        every one its chain holds, that refers to it takes its result (`change`, None where refused beside the
        rollout `stable` or alone) rather than loading it again: as what it puts back if refused (a loaded change
        waits as it is, its prebuild maybe cut short), and as the rollout it goes beside (its load only goes on with
        the rollout's prebuild; refused, it applies as after the refusal, with the canaries it superseded beside
        that rollout)."""
        wanted = self._wanted
        if wanted is None:
            return
        if wanted.stable is superseded and change is None:  # what it superseded beside the rollout applies anew
            self._wanted = None
            self._rollout_refused(wanted)
            return
        loaded = None if change is None else replace(superseded, model=change.model, fallback=None)  # not under way
        relinked = _relinked(wanted, superseded, change or _restored(superseded, stable), loaded)
        if _repeats(relinked, superseded):  # requested again meanwhile (`_end_planned_canary`): one validation
            self._wanted = None
            if change is not None:
                self._pending = change
            else:
                self._reinstate(relinked, None)
            return
        self._wanted = relinked

    def _rollout_refused(self, req: _Request) -> None:
        """(Under the lock) the rollout the canary `req` was to go beside is refused: what the rollout superseded is
        under way again, and `req` applies to it as a request made after the refusal (by `request`'s rules)."""
        log.info("the rollout a canary was to go beside was refused: the canary applies as requested after it",
                 extra={"version": req.name, "share": req.share, "reason": req.reason})
        rollout = req.stable
        if isinstance(rollout, _Request):
            self._reinstate(rollout, None)
        self._apply_after(req, rollout)

    def _apply_after(self, req: _Request, rollout: "_Request | Recommender | None") -> None:
        """(Under the lock) the canary `req` as requested after the refusal of `rollout`; a canary it superseded
        beside the same rollout first, as it was requested first (else it would be lost, or come back where `req`
        is refused after something requested after it ended that one)."""
        back = req.fallback
        if isinstance(back, _Request) and back.share < 1.0 and back.stable is rollout:
            self._apply_after(back, rollout)
        self._apply(replace(req, stable=None, fallback=None))

    def _reinstate(self, refused: _Request, stable: Recommender | None) -> None:
        """(Under the lock) `refused` (a canary: beside the rollout `stable` where set) changes nothing: what it
        superseded is under way again."""
        back = _restored(refused, stable)
        if isinstance(back, _Request) and back.stable is None \
                and back.name in (self._serving.version, self._canary and self._canary.version):
            # a canary whose rollout was refused, of a version serving now: it only changes the canary (`_settle`)
            self._apply(replace(back, fallback=None))
            return
        if isinstance(back, _Change):
            self._pending = back
        else:
            self._wanted = back
        if back is not None:
            log.info("a refused version changes nothing: what it superseded is under way again", extra={
                "refused_version": refused.name, "version": _name(back.model if isinstance(back, _Change) else back)})

    def _after_refusal(self, req: _Request) -> Recommender:
        """The stable version once `req` is refused: the one that what it superseded makes stable, where loaded
        already, else the one serving now."""
        back = req.fallback
        if isinstance(back, _Change):
            return back.model if back.share == 1.0 else back.stable or self._serving
        return self._serving

    def _load(self, req: _Request, generation: int, *, then: Recommender) -> Recommender | None:
        """(On the loader thread) `req`'s version validated and prebuilt; None where it is refused (and `then`
        is the stable version that serves on)."""
        rec: Recommender | None = None
        try:
            rec = req.model or validate_version(req.path, device=self.device, expected_version=req.version)
            why = self._unfit(rec)
            if why is not None:
                rec = None
                raise ModelRefused("unfit", req.path, why)
        except ModelRefused as exc:
            self._refuse(exc, then)
        except Exception as exc:  # noqa: BLE001 (a check that crashed: this thread must live for the next)
            self._refuse(ModelRefused("unreadable", req.path, f"{type(exc).__name__}: {exc}"), then)
        if rec is not None:
            self._prebuild(rec, generation, req.share)
        return rec

    def _prebuild(self, rec: Recommender, generation: int, share: float) -> None:
        """Rebuild stored states with `rec` (a canary's: only its users') at half duty, up to the cap."""
        if self._prebuild_source is None or self._prebuild_max <= 0:
            return
        t0, done = time.perf_counter(), 0
        try:
            for chunk in self._prebuild_source():
                if self._closed or generation != self._generation:
                    return  # superseded: the newer request loads what it needs (`_hand_over`)
                t = time.perf_counter()
                # a canary being promoted holds its own users' entries already (those not served since)
                chunk = {u: s for u, s in chunk.items() if u not in rec.prebuilt
                         and (share == 1.0 or in_canary(u, rec.version, share))}
                done += rec.prebuild(dict(islice(chunk.items(), self._prebuild_max - done)))
                if done >= self._prebuild_max:
                    break
                # Half duty: on a host whose cores the batches need, a swap may wait; the batches may not.
                time.sleep(min(time.perf_counter() - t, 0.1))
        except Exception as exc:  # noqa: BLE001 (a failed prebuild only leaves rebuilds to the next events)
            log.warning("background state rebuild failed; stale states rebuild on their next event",
                        extra={"version": rec.version, "error": f"{type(exc).__name__}: {exc}"})
        secs = time.perf_counter() - t0
        with self._lock:
            self._last_prebuilt, self._last_prebuild_s = done, secs
        if self.metrics is not None:
            self.metrics.prebuilt_states_total.inc(done)
        log.info("states rebuilt ahead of the swap", extra={
            "version": rec.version, "states": done, "seconds": round(secs, 3)})

    def _refuse(self, exc: ModelRefused, then: Recommender) -> None:
        """Count and log a refusal; `then` is the stable version that serves on (a canary refused beside a
        rollout: the version rolled out, not the one serving now)."""
        with self._lock:
            self._refused[exc.reason] += 1
            self._last_refusal = str(exc)
        if self.metrics is not None:
            self.metrics.model_refused_total.labels(reason=exc.reason).inc()
        serves = "keeps serving" if then is self._serving else "serves next (the rollout under way)"
        # the message, not the exception: a handler keeping the record would keep the loader's frames (the versions
        # its requests would put back) alive through the traceback
        log.error("model version refused; %s %s: %s", then.version, serves, str(exc),
                  extra={"reason": exc.reason, "path": exc.path, "serving_version": then.version})
