"""Inference: the offline sequence scorer used by evaluation, and the online API the worker calls.

Both run `HRNN.transition`, so streaming adds no error to what evaluation measured.
The online API takes a batch of events in arrival order plus the stored states of their
users and returns new states and catalogue scores. Events of one user are applied in
order: the batch is cut into waves (the k-th event of every user in wave k), each wave is
one batched network step, and all events are scored with one matmul at the end.
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace
from itertools import repeat
from pathlib import Path
from typing import Mapping, Sequence

import numpy as np
import torch

from model.artifact import LoadedModel, load_version
from model.interactions import Interactions
from model.network import HRNN, PaddedSequences, resolve_device, run_sequences
from model.repeat import HistoryWindow, sequence_windows, type_slots, window_from_columns
from model.scorer import UserSequence
from model.sessions import is_new_session
from model.state import History, Packed, UserState, pack

MAX_K = 500


class HRNNScorer:
    """The Scorer protocol for a trained network: evaluation's batched forward pass."""

    def __init__(self, model: HRNN, name: str = "hrnn", batch_size: int = 256,
                 item_map: np.ndarray | None = None, type_map: np.ndarray | None = None) -> None:
        """item_map[c] is the model's index of the evaluation data's item code c (-1: unknown to the model);
        type_map likewise for event-type codes (only the repeat head reads types); None when the codes agree."""
        self.model, self.name, self.batch_size, self.item_map = model, name, batch_size, item_map
        self.type_map = type_map
        self.unseen: torch.Tensor | None = None

    @classmethod
    def for_vocabulary(cls, model: HRNN, model_items: list[str], data_items, name: str = "hrnn",
                       model_types: list[str] | None = None, data_types=None) -> "HRNNScorer":
        index = {item: i for i, item in enumerate(model_items)}
        type_map = None
        if model_types is not None and data_types is not None:
            tindex = {t: i for i, t in enumerate(model_types)}
            type_map = np.array([tindex.get(str(t), -1) for t in data_types], dtype=np.int64)
        return cls(model, name, item_map=np.array([index.get(str(i), -1) for i in data_items], dtype=np.int64),
                   type_map=type_map)

    @classmethod
    def for_version(cls, loaded: LoadedModel, data: Interactions, name: str = "hrnn") -> "HRNNScorer":
        """A loaded version scoring `data`'s codes: item and event-type vocabularies both mapped, as a file
        other than the training one may list other types (the repeat head reads them) and other items."""
        return cls.for_vocabulary(loaded.model, loaded.item_ids, data.item_ids, name,
                                  model_types=loaded.event_types, data_types=data.event_types)

    def fit(self, train: Interactions, session_start: np.ndarray) -> None:
        """Nothing to learn here (training is model.train); remember which items training never saw."""
        seen = np.bincount(train.item, minlength=train.n_items) > 0
        if self.item_map is not None:
            seen &= self.item_map >= 0
        self.unseen = torch.from_numpy(~seen)

    @torch.inference_mode()
    def score(self, seqs: list[UserSequence]) -> list[np.ndarray]:
        self.model.eval()
        out: list[np.ndarray] = [np.empty(0)] * len(seqs)
        order = sorted(range(len(seqs)), key=lambda i: len(seqs[i].items))  # similar lengths pad less
        for start in range(0, len(order), self.batch_size):
            chunk = order[start:start + self.batch_size]
            for i, scores in zip(chunk, self._score_chunk([seqs[i] for i in chunk])):
                out[i] = scores
        return out

    def _score_chunk(self, seqs: list[UserSequence]) -> list[np.ndarray]:
        dev = next(self.model.parameters()).device
        items = [s.items if self.item_map is None else np.where(s.items >= 0, self.item_map[s.items], -1)
                 for s in seqs]
        padded = PaddedSequences.build(items, [s.session_start for s in seqs],
                                       [s.ts_ms for s in seqs], dev)
        collect = torch.zeros_like(padded.valid)
        for r, s in enumerate(seqs):
            collect[r, torch.as_tensor(s.targets, dtype=torch.long)] = True
        _, _, pre = run_sequences(self.model, padded, collect)
        window = None
        if self.model.repeat is not None:
            types = [s.event_type if self.type_map is None else self.type_map[s.event_type] for s in seqs]
            window = sequence_windows(items, [s.ts_ms for s in seqs], types, [s.session_start for s in seqs],
                                      [s.targets for s in seqs], self.model.cfg.history_length, dev)
        scores = self.model.score_all(pre, window)
        if self.item_map is not None:
            scores = scores[:, torch.from_numpy(self.item_map.clip(min=0)).to(dev)]
        if self.unseen is not None:
            scores[:, self.unseen.to(dev)] = -torch.inf
        parts = torch.split(scores.float().cpu(), [len(s.targets) for s in seqs])
        return [p.numpy() for p in parts]


@dataclass(frozen=True)
class StepInput:
    user_id: str
    item_id: str
    event_type: str
    ts_ms: int
    session_id: str | None = None


@dataclass(frozen=True)
class Filters:
    """Serving-time exclusions (evaluation never filters): items of the user's stored last-H events
    by type (of the last H the version steps and the last H of types it does not: UserState.skipped) or
    session (of events it steps), and items no one is to be recommended now (off sale)."""

    exclude_purchased: bool = True
    purchase_types: tuple[str, ...] = ("purchase",)
    exclude_session_items: bool = False
    exclude_event_types: tuple[str, ...] = ()
    unavailable_items: frozenset[str] = frozenset()


@dataclass
class Advanced:
    states: dict[str, UserState]
    scores: torch.Tensor  # (n_events, n_items): scores after each event, i.e. for the next one
    new_session: list[bool]
    known: list[bool]
    session_ids: list[str]
    rebuilt_users: int
    excluded: list[list[int]] = field(default_factory=list)  # item indices to filter, per event


@dataclass(frozen=True, slots=True)
class Prebuilt:
    """A stale state rebuilt ahead of a swap: this version's hidden states after the user's first
    `n_events` events; `last_event_ms` is the user's clock at that point."""

    n_events: int
    last_event_ms: int
    hidden: np.ndarray  # float32 (2, hidden_dimension): user, session


@dataclass
class Recommendations:
    states: dict[str, UserState]
    items: list[list[tuple[str, float]]]
    new_session: list[bool]
    known: list[bool]
    session_ids: list[str]
    rebuilt_users: int
    model_version: str


def _excluded(s: UserState, index: Mapping[str, int], f: Filters) -> list[int]:
    types = set(f.exclude_event_types) | (set(f.purchase_types) if f.exclude_purchased else set())
    # A version trained on other types never stores a purchase in the history: its skipped events hold it.
    items = s.history.items_of_types(types) + s.skipped.items_of_types(types)
    if f.exclude_session_items:
        items += s.history.session_items()
    return sorted({index[i] for i in items if i in index})


class Recommender:
    """A loaded model version serving batches of events."""

    def __init__(self, loaded: LoadedModel) -> None:
        self.loaded = loaded
        self.model, self.version = loaded.model, loaded.version
        self.config, self.data_config = loaded.config, loaded.data_config
        self.item_ids = loaded.item_ids
        self.index = {item: i for i, item in enumerate(loaded.item_ids)}
        self.device = next(self.model.parameters()).device
        self.timeout_ms = int(loaded.data_config.session_timeout_s * 1000)
        self.history_length = loaded.config.history_length
        self.type_slot = {t: int(type_slots(np.array([i]))[0]) for i, t in enumerate(loaded.event_types)}
        self.kept_types = frozenset(loaded.data_config.event_types)  # empty: every type
        self.collapse = loaded.data_config.collapse_repeats
        self.drops_events = bool(self.kept_types) or self.collapse  # else every event steps: skip the check
        # Filled by prebuild() before this version serves; the worker thread takes entries out after.
        self.prebuilt: dict[str, Prebuilt] = {}
        self._unavailable: tuple[frozenset[str], torch.Tensor | None] = (frozenset(), None)

    @classmethod
    def load(cls, version_dir: str | Path, device: str = "auto") -> "Recommender":
        return cls(load_version(version_dir, resolve_device(device)))

    def blank_state(self) -> UserState:
        z = np.zeros(self.model.hidden, dtype=np.float32)
        return UserState(self.version, z, z.copy(), None, 0, 0, History())

    @torch.inference_mode()
    def rebuild(self, states: list[UserState]) -> list[UserState]:
        """Recompute hidden states with this version from each state's stored last-H events, in one batch."""
        if not states:
            return []
        return self._replay(states, [s.history for s in states])

    def _replay(self, states: Sequence[UserState], events: list[History],
                start: Sequence[Prebuilt] | None = None) -> list[UserState]:
        """`states` restamped with this version and the hidden states reached by running each row's
        `events` through the network, from a blank user or, with `start`, from a prebuilt state."""
        cols = pack(events)
        seqs = PaddedSequences.build(cols.split(self._item_indices(cols)), cols.split(cols.opens),
                                     cols.split(cols.ts_ms), self.device,
                                     prev_ts=None if start is None else [p.last_event_ms for p in start])
        h0 = None
        if start is not None:
            hidden = torch.from_numpy(np.stack([p.hidden for p in start])).to(self.device)
            h0 = (hidden[:, 0], hidden[:, 1])
        h_user, h_sess, _ = run_sequences(self.model, seqs, start=h0)
        hu, hs = h_user.cpu().numpy(), h_sess.cpu().numpy()
        return [replace(s, model_version=self.version, user_hidden=hu[i].copy(), session_hidden=hs[i].copy(),
                        history=s.history.copy(), skipped=s.skipped.copy()) for i, s in enumerate(states)]

    def prebuild(self, states: Mapping[str, UserState]) -> int:
        """Rebuild the stale ones of `states` now (before this version serves) and keep the result, so
        their users' next events only catch up on what happened since; returns how many were rebuilt."""
        stale = {u: s for u, s in states.items() if s.model_version != self.version}
        for (u, old), new in zip(stale.items(), self.rebuild(list(stale.values()))):
            if not len(new.history):  # stepped nothing: the user's next stepped event is a new user's (a rebuild)
                continue
            self.prebuilt[u] = Prebuilt(old.n_events, old.last_event_ms,
                                        np.stack([new.user_hidden, new.session_hidden]))
        return len(stale)

    @torch.inference_mode()
    def catch_up(self, pairs: list[tuple[UserState, Prebuilt]]) -> list[UserState]:
        """States of this version from prebuilt ones, advanced over the events each user had since
        (the newest of its stored history), batched: as if this version had served those events."""
        if not pairs:
            return []
        tails = [s.history[len(s.history) - (s.n_events - p.n_events):] for s, p in pairs]
        return self._replay([s for s, _ in pairs], tails, start=[p for _, p in pairs])

    def _take_prebuilt(self, user: str, s: UserState) -> Prebuilt | None:
        p = self.prebuilt.pop(user, None)
        if p is None or not 0 <= s.n_events - p.n_events <= len(s.history):
            return None  # never prebuilt, or more events since than the history holds: rebuild
        return p

    def _prepare(self, states: Mapping[str, UserState | None], users: list[str]) -> tuple[dict, int]:
        work = {u: states.get(u) for u in users}
        stale = [u for u, s in work.items() if s is not None and s.model_version != self.version]
        prebuilt = {u: p for u in stale if (p := self._take_prebuilt(u, work[u])) is not None}
        for u, s in zip(prebuilt, self.catch_up([(work[u], p) for u, p in prebuilt.items()])):
            work[u] = s
        rebuild = [u for u in stale if u not in prebuilt]
        for u, s in zip(rebuild, self.rebuild([work[u] for u in rebuild])):
            work[u] = s
        for u, s in work.items():
            work[u] = self.blank_state() if s is None else s.copy()
        return work, len(stale)

    @torch.inference_mode()
    def advance(self, states: Mapping[str, UserState | None], events: Sequence[StepInput],
                filters: Filters | None = None) -> Advanced:
        users = list(dict.fromkeys(e.user_id for e in events))
        work, rebuilt = self._prepare(states, users)
        row = {u: i for i, u in enumerate(users)}
        h_user = torch.from_numpy(np.stack([work[u].user_hidden for u in users])).to(self.device) \
            if users else torch.zeros(0, self.model.hidden, device=self.device)
        h_sess = torch.from_numpy(np.stack([work[u].session_hidden for u in users])).to(self.device) \
            if users else torch.zeros(0, self.model.hidden, device=self.device)
        post = torch.zeros(len(events), self.model.hidden, device=self.device)
        new_session, known, session_ids = [False] * len(events), [False] * len(events), [""] * len(events)
        excluded: list[list[int]] = [[] for _ in events]
        windows: list[History] = [History()] * len(events)
        for wave in _waves(events):
            stepping = [i for i in wave if self._kept(work[events[i].user_id], events[i])] \
                if self.drops_events else wave
            flags = [self._bookkeep(work[events[i].user_id], events[i]) for i in stepping]
            if stepping:
                rows = torch.tensor([row[events[i].user_id] for i in stepping], device=self.device)
                t = lambda xs, dt: torch.tensor(xs, dtype=dt, device=self.device)  # noqa: E731
                hu, hs, _ = self.model.transition(
                    h_user[rows], h_sess[rows], t([f[0] for f in flags], torch.long),
                    t([f[1] for f in flags], torch.bool), t([f[2] for f in flags], torch.bool),
                    t([f[0] >= 0 for f in flags], torch.bool), t([f[3] for f in flags], torch.long))
                h_user[rows], h_sess[rows] = hu, hs
                post[torch.tensor(stepping, device=self.device)] = hs
            step_flags = dict(zip(stepping, flags))
            for i in wave:
                s = work[events[i].user_id]
                f = step_flags.get(i)
                if f is None:  # answered from the state as it is, like the user's previous event
                    post[i] = h_sess[row[events[i].user_id]]
                    f = (self.index.get(events[i].item_id, -1), False, False, 0)
                new_session[i], known[i], session_ids[i] = f[2], f[0] >= 0, s.session_id or ""
                if filters is not None:
                    excluded[i] = _excluded(s, self.index, filters)
                if self.model.repeat is not None:
                    windows[i] = s.history[-self.history_length:]  # this event's view: later ones append
        hu_np, hs_np = h_user.cpu().numpy(), h_sess.cpu().numpy()
        for u, s in work.items():
            s.user_hidden, s.session_hidden = hu_np[row[u]].copy(), hs_np[row[u]].copy()
        window = self._window(windows) if self.model.repeat is not None and events else None
        scores = self.model.score_all(post, window) if events \
            else torch.zeros(0, len(self.item_ids), device=self.device)
        return Advanced(work, scores, new_session, known, session_ids, rebuilt, excluded)

    def featurized(self, e: StepInput, s: UserState) -> bool:
        """Whether training and evaluation see `e` after the user's state `s`: featurization drops the types
        outside the version's event_types and (collapse_repeats) repeats, both before sessionizing, so such an
        event neither steps the network nor moves the session clock, and stays out of the stored history (the
        repeat head's window) as it does offline."""
        if self.kept_types and e.event_type not in self.kept_types:
            return False
        return not self.collapse or not self._repeats(s, e)

    def _kept(self, s: UserState, e: StepInput) -> bool:
        """featurized(e, s), noting a collapsed repeat's time in `s` (the next repeat's gap counts from it) and an
        event of a type the version does not step in `s.skipped` (the filters read it). A collapsed repeat is not
        noted there: its item is already the history's newest."""
        if self.featurized(e, s):
            return True
        if self.kept_types and e.event_type not in self.kept_types:
            s.skipped.append(e.item_id, e.ts_ms, e.event_type, False)
            s.skipped.keep_last(self.history_length)
        elif self.collapse:
            s.repeat_ms = max(s.repeat_ms, e.ts_ms)
        return False

    def _repeats(self, s: UserState, e: StepInput) -> bool:
        """Whether featurization collapses `e` into the user's previous event: the same item and type in the same
        session. The previous event of a kept type is the newest stored one (a repeat never enters the history,
        and it has the same item and type as the event it repeats), or a repeat merged since: the session gap
        counts from the later of the two, as featurization counts it from the event just before."""
        h = s.history
        if not len(h) or h.names[h.item_codes[-1]] != e.item_id or h.type_names[h.type_codes[-1]] != e.event_type:
            return False
        before = max(s.last_event_ms, s.repeat_ms)
        return not is_new_session(s.session_id, before, e.session_id, e.ts_ms, self.timeout_ms,
                                  self.data_config.whole_history_session)

    def _item_indices(self, cols: Packed) -> np.ndarray:
        """Model item index per event (-1 unknown), looking up each distinct name once."""
        by_name = np.fromiter(map(self.index.get, cols.names, repeat(-1)), np.int64, len(cols.names))
        return by_name[cols.item_codes]

    def _window(self, histories: list[History]) -> HistoryWindow:
        """The repeat head's view of each row's stored last-H events: model item index (-1 unknown), time,
        type slot, session flag, from the packed columns (this reads H events per event)."""
        cols = pack(histories)
        slots = np.fromiter(map(self.type_slot.get, cols.type_names, repeat(0)), np.int64, len(cols.type_names))
        return window_from_columns(self._item_indices(cols), cols.ts_ms, slots[cols.type_codes], cols.opens,
                                   cols.lengths, self.history_length, self.device)

    def _bookkeep(self, s: UserState, e: StepInput) -> tuple[int, bool, bool, int]:
        """Apply one event's session/time/history bookkeeping; return (item, new_user, new_session, gap_ms)."""
        new_user = s.n_events == 0
        prev_ts = None if new_user else s.last_event_ms
        new_sess = is_new_session(s.session_id, prev_ts, e.session_id, e.ts_ms, self.timeout_ms,
                                  self.data_config.whole_history_session)
        gap = 0 if new_user else max(e.ts_ms - s.last_event_ms, 0)
        if new_sess:
            s.session_id = e.session_id or f"{e.user_id}-{e.ts_ms}"
            s.session_length = 0
        s.session_length += 1
        s.last_event_ms = e.ts_ms if new_user else max(s.last_event_ms, e.ts_ms)  # late events never rewind the clock
        s.n_events += 1
        s.history.append(e.item_id, e.ts_ms, e.event_type, new_sess)
        s.history.keep_last(self.history_length)
        return self.index.get(e.item_id, -1), new_user, new_sess, gap

    @torch.inference_mode()
    def recommend(self, states: Mapping[str, UserState | None], events: Sequence[StepInput], *, k: int = 25,
                  filters: Filters | None = Filters()) -> Recommendations:
        k = max(1, min(k, MAX_K, len(self.item_ids)))
        adv = self.advance(states, events, filters)
        scores = adv.scores
        rows = [i for i, ex in enumerate(adv.excluded) for _ in ex]
        cols = [c for ex in adv.excluded for c in ex]
        if rows:
            scores[torch.tensor(rows, device=self.device), torch.tensor(cols, device=self.device)] = -torch.inf
        off_sale = None if filters is None else self._unavailable_columns(filters.unavailable_items)
        if off_sale is not None:  # index_fill_ writes only those columns (a mask would rewrite every score)
            scores.index_fill_(1, off_sale, -torch.inf)
        top_s, top_i = torch.topk(scores, k, dim=1) if len(events) else (scores, scores.long())
        top_s, top_i = top_s.cpu().tolist(), top_i.cpu().tolist()
        items = [[(self.item_ids[j], s) for j, s in zip(ji, si) if s != -np.inf] for ji, si in zip(top_i, top_s)]
        return Recommendations(adv.states, items, adv.new_session, adv.known, adv.session_ids, adv.rebuilt_users,
                               self.version)

    def _unavailable_columns(self, items: frozenset[str]) -> torch.Tensor | None:
        """The catalogue columns of `items`; rebuilt only for another set object, as the set of items
        off sale is replaced, never changed in place, when it changes."""
        key, cols = self._unavailable
        if items is not key:
            known = sorted(self.index[i] for i in items if i in self.index)
            cols = torch.tensor(known, dtype=torch.long, device=self.device) if known else None
            self._unavailable = (items, cols)
        return cols

def _waves(events: Sequence[StepInput]) -> list[list[int]]:
    """Split event indices so each user appears at most once per wave, keeping per-user order."""
    seen: dict[str, int] = {}
    waves: list[list[int]] = []
    for i, e in enumerate(events):
        w = seen.get(e.user_id, 0)
        seen[e.user_id] = w + 1
        if w == len(waves):
            waves.append([])
        waves[w].append(i)
    return waves
