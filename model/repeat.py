"""The repeat-aware scoring head: re-rank the user's own last-H events next to the GRU's catalogue scores.

A user GRU squeezes a whole history into one vector and so ranks "the item this user keeps
coming back to" poorly; simple history counts beat it on repeat-heavy logs. This head
adds, per scoring row,

    score(c) = gru_logit(c) + gate(h) * repeat_logit(c)

where repeat_logit(c) is 0 for items absent from the window and, for an item of the
window, a small MLP of that item's aggregated history features plus a learned per-item
repeat bias ("discount weights as a learnable function of the items and timestamps").
Item features: time-decayed counts at three learned half-lives, each event weighted by a
learned per-event-type factor; raw count; count and share in the current session; whether
it is the newest event; events since its newest occurrence; how often it followed the
newest item in this user's window (a personal "after X comes Y"). Row context, also fed to
the MLP: window size, distinct items, how often the newest item occurs and repeats itself,
session length. The gate is a softplus of the session state and the window's size, so each
step decides how far the user's history outranks exploration. The head is additive in
logit space, so every loss and sampled candidates work unchanged.

One constant is not learned by gradient: `window_offset`, added to every window item's score after
training (model.calibration picks it on the validation sessions). Cross-entropy pays for a new item
scored far down and so keeps new items' scores close to the window's; MRR@20 and recall@20 only see
the top of the list, where on reddit the user's own items deserve more room than likelihood gives them.

The explore side (window_profile, on by default): gru_logit(c) is scored against the session
state plus the mean of a learned embedding of the window's items, so the items that go with
the user's items across users (reddit: the subreddits a user is about to try) rank higher among
the items the user never had. The GRU's explore loss (model.train) trains it. On reddit it
lifted the share of new-to-the-user targets in the top 20 of new items from 37% to 43%.

Everything is computed from a `HistoryWindow`: the last H events before the scoring point
(item, time, type slot, in-current-session flag), right-aligned so column H-1 is the newest
event. Training, evaluation and the online API build the same window from the same events
(`gather_windows` for sorted arrays, `window_from_columns` for stored user histories), and
ages are measured from the newest event of the window, the one the prediction is made
from, so the three paths cannot disagree.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from itertools import chain
from typing import Sequence

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

MAX_TYPE_SLOTS = 8  # slot 0: a type the model never saw; type code k -> slot min(k + 1, 7)
INIT_HALF_LIVES_S = (600.0, 86_400.0, 7 * 86_400.0)  # minutes ("same as just now"), a day, a week (habits)
# decays; count, session count, transitions from the newest item; session share; newest; steps back; 5 row context
_N_FEATURES = len(INIT_HALF_LIVES_S) + 6 + 5
_MLP_WIDTH = 32


def type_slots(codes: np.ndarray | torch.Tensor) -> np.ndarray | torch.Tensor:
    """Event-type codes (index into the model's training event types, -1 unknown) -> head slots."""
    if isinstance(codes, torch.Tensor):
        return (codes.long() + 1).clamp(0, MAX_TYPE_SLOTS - 1)
    return np.clip(np.asarray(codes, dtype=np.int64) + 1, 0, MAX_TYPE_SLOTS - 1)


@dataclass
class HistoryWindow:
    """The last H events before each scoring row, oldest first, right-aligned (column H-1 newest)."""

    items: torch.Tensor  # (R, H) long: model item index; -1 for padding and for items the model does not know
    ts_ms: torch.Tensor  # (R, H) long
    types: torch.Tensor  # (R, H) long: type slot (see type_slots)
    in_session: torch.Tensor  # (R, H) bool: the event belongs to the session of the predicted event
    present: torch.Tensor  # (R, H) bool: a real event (known item or not); padding is False

    @property
    def known(self) -> torch.Tensor:
        return self.present & (self.items >= 0)

    def to(self, device: torch.device) -> "HistoryWindow":
        return HistoryWindow(*(t.to(device) for t in (self.items, self.ts_ms, self.types, self.in_session,
                                                      self.present)))

    def now_ms(self) -> torch.Tensor:
        """(R,) time the prediction is made from: the newest event of the window (0 for an empty one)."""
        newest = torch.where(self.present, self.ts_ms, torch.full_like(self.ts_ms, torch.iinfo(torch.int64).min))
        return torch.where(self.present.any(dim=1), newest.amax(dim=1), 0)  # padding is no time: times may be < 0


def gather_windows(items: torch.Tensor, ts_ms: torch.Tensor, types: torch.Tensor, ends: torch.Tensor,
                   first: torch.Tensor, sess_first: torch.Tensor, length: int) -> HistoryWindow:
    """Windows out of flat, time-ordered arrays (training rows, or concatenated evaluation sequences).

    items/ts_ms/types are per flat position (types already as slots). Row r's window holds the positions
    ends[r]-length+1 .. ends[r] that are >= first[r] (the first position of the row's user sequence);
    sess_first[r] is the first position of the predicted event's session (ends[r] + 1 when that event
    opens a session: then no window event is in it). ends[r] < first[r] (a prediction before the
    sequence's first event) gives an empty window.
    """
    ends, first = ends.long(), first.long()
    idx = ends.unsqueeze(1) - torch.arange(length - 1, -1, -1, device=ends.device).unsqueeze(0)
    present = idx >= first.unsqueeze(1)
    safe = torch.where(present, idx, torch.zeros_like(idx))
    it = torch.where(present, items[safe], torch.full_like(idx, -1))
    return HistoryWindow(it, torch.where(present, ts_ms[safe], torch.zeros_like(idx)),
                         torch.where(present, types[safe], torch.zeros_like(idx)),
                         present & (idx >= sess_first.long().unsqueeze(1)), present)


def sequence_windows(items: Sequence[np.ndarray], ts_ms: Sequence[np.ndarray], type_codes: Sequence[np.ndarray],
                     session_start: Sequence[np.ndarray], targets: Sequence[np.ndarray], length: int,
                     device: torch.device) -> HistoryWindow:
    """Windows for predicting positions `targets` of whole user sequences (evaluation): the events before
    each target, rows in sequence-then-target order. The first event of a sequence always opens a session;
    a target that opens one sees no window event in its session."""
    lens = np.array([len(x) for x in items], dtype=np.int64)
    offset = np.concatenate([[0], np.cumsum(lens)[:-1]]).astype(np.int64)
    flat_items = np.concatenate([np.asarray(x, dtype=np.int64) for x in items]) if len(items) else np.zeros(0, np.int64)
    flat_ts = np.concatenate([np.asarray(x, dtype=np.int64) for x in ts_ms]) if len(items) else np.zeros(0, np.int64)
    flat_types = type_slots(np.concatenate([np.asarray(x) for x in type_codes])) if len(items) \
        else np.zeros(0, np.int64)
    opens = np.concatenate([np.asarray(x, dtype=bool) for x in session_start]) if len(items) else np.zeros(0, bool)
    opens[offset[lens > 0]] = True
    pos = np.arange(len(flat_items))
    sess_first = np.maximum.accumulate(np.where(opens, pos, 0)) if len(pos) else pos
    ends = np.concatenate([o + np.asarray(t, dtype=np.int64) - 1 for o, t in zip(offset, targets)]) \
        if len(items) else np.zeros(0, np.int64)
    first = np.repeat(offset, [len(t) for t in targets])
    row_sess = sess_first[ends + 1] if len(pos) else np.zeros(len(ends), np.int64)  # the target's session
    as_t = lambda a: torch.from_numpy(np.ascontiguousarray(a, dtype=np.int64)).to(device)  # noqa: E731
    if len(pos) == 0:  # nothing to index: every window is empty
        flat_items = flat_ts = flat_types = np.zeros(1, np.int64)
    return gather_windows(as_t(flat_items), as_t(flat_ts), as_t(flat_types), as_t(ends), as_t(first),
                          as_t(row_sess), length)


def window_from_events(events: Sequence[Sequence[tuple[int, int, int, bool]]], length: int,
                       device: torch.device) -> HistoryWindow:
    """Windows from per-row event lists [(item index or -1, ts_ms, type slot, opens a session), ...], oldest
    first (the online API's stored last-H events). Only the newest `length` events of a row count."""
    rows = [list(evs)[-length:] for evs in events]
    flat = list(chain.from_iterable(rows))
    cols = [np.array(c, dtype=dt) for c, dt in zip(zip(*flat), (np.int64, np.int64, np.int64, bool))] if flat \
        else [np.zeros(0, np.int64)] * 3 + [np.zeros(0, bool)]
    return window_from_columns(*cols, np.fromiter(map(len, rows), np.int64, len(rows)), length, device)


def window_from_columns(items: np.ndarray, ts_ms: np.ndarray, types: np.ndarray, opens: np.ndarray,
                        lens: np.ndarray, length: int, device: torch.device) -> HistoryWindow:
    """`window_from_events` from flat columns (row after row, oldest first, at most `length` per row; `lens`
    events per row), so a batch's stored histories are placed with array operations, not per event. The
    predicted event is taken to continue the newest event's session: online, nobody knows yet."""
    r, total = len(lens), int(lens.sum())
    row = np.repeat(np.arange(r), lens)
    col = np.arange(total) + np.repeat(length - lens - (np.cumsum(lens) - lens), lens)  # right-aligned
    it = np.full((r, length), -1, dtype=np.int64)
    ts, ty = np.zeros((r, length), dtype=np.int64), np.zeros((r, length), dtype=np.int64)
    present = np.zeros((r, length), dtype=bool)
    it[row, col], ts[row, col], ty[row, col], present[row, col] = items, ts_ms, types, True
    first = length - lens  # the session covers the window from its newest opening event, else all of it
    np.maximum.at(first, row[opens], col[opens])
    sess = present & (np.arange(length) >= first[:, None])
    as_t = lambda a: torch.from_numpy(a).to(device)  # noqa: E731
    return HistoryWindow(as_t(it), as_t(ts), as_t(ty), as_t(sess), as_t(present))


def _inverse_softplus(y: float) -> float:
    return math.log(math.expm1(y))


class RepeatHead(nn.Module):
    """Gate and per-item repeat logits over a HistoryWindow (see the module docstring)."""

    def __init__(self, n_items: int, hidden: int, profile: bool = True) -> None:
        super().__init__()
        self.n_items = n_items
        self.log_half_life = nn.Parameter(torch.tensor([math.log(h) for h in INIT_HALF_LIVES_S]))
        self.type_weight = nn.Parameter(torch.full((MAX_TYPE_SLOTS,), _inverse_softplus(1.0)))
        self.item_bias = nn.Parameter(torch.zeros(n_items))
        self.mlp = nn.Sequential(nn.Linear(_N_FEATURES, _MLP_WIDTH), nn.Tanh(), nn.Linear(_MLP_WIDTH, 1))
        self.gate = nn.Linear(hidden + 2, 1)
        self.profile_emb = nn.Parameter(torch.zeros(n_items, hidden)) if profile else None
        self.register_buffer("window_offset", torch.zeros(()))  # 0 while training; see the module docstring
        nn.init.zeros_(self.gate.weight)
        nn.init.constant_(self.gate.bias, _inverse_softplus(1.0))  # start as a plain sum of the two scores

    def forward(self, h: torch.Tensor, win: HistoryWindow) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Gated repeat logits of each distinct (row, item) pair of the windows: (rows (K,), items (K,),
        values (K,)), pairs sorted by row then item. Items absent from a row's window score 0 (no pair)."""
        n_rows, length = win.items.shape
        dev = win.items.device
        known = win.known
        col = torch.arange(length, device=dev).expand(n_rows, length)
        row = torch.arange(n_rows, device=dev).unsqueeze(1).expand(n_rows, length)
        pair, inv = torch.unique((row * self.n_items + win.items)[known], return_inverse=True)
        # the newest known item, and which events follow an occurrence of it (the user's own "after X comes Y")
        last_col = torch.where(known, col, -1).amax(dim=1)
        last_item = win.items.gather(1, last_col.clamp(min=0).unsqueeze(1))
        is_last = known & (win.items == last_item) & (last_col >= 0).unsqueeze(1)
        follows_last = torch.zeros_like(known)
        follows_last[:, 1:] = is_last[:, :-1] & known[:, 1:]
        age_s = (win.now_ms().unsqueeze(1) - win.ts_ms)[known].clamp(min=0).to(torch.float32) / 1000.0
        decay = torch.exp(-age_s.unsqueeze(1) * (math.log(2.0) / torch.exp(self.log_half_life)).unsqueeze(0))
        newest = (col[known] == length - 1).to(torch.float32).unsqueeze(1)
        in_sess = (win.in_session & known).to(torch.float32)
        per_event = torch.cat([decay * F.softplus(self.type_weight)[win.types[known]].unsqueeze(1),
                               torch.ones_like(newest), in_sess[known].unsqueeze(1), newest,
                               follows_last[known].to(torch.float32).unsqueeze(1)], dim=1)
        agg = torch.zeros(len(pair), per_event.shape[1], device=dev).index_add_(0, inv, per_event)
        newest_col = torch.zeros(len(pair), dtype=torch.long, device=dev).scatter_reduce_(
            0, inv, col[known], "amax", include_self=False)
        rows, items = pair // self.n_items, pair % self.n_items
        n_dec = len(INIT_HALF_LIVES_S)
        count, sess_count, is_newest, trans = (agg[:, n_dec + k] for k in range(4))
        sess_len = in_sess.sum(1)
        n_known = known.sum(1).to(torch.float32)
        n_distinct = torch.bincount(rows, minlength=n_rows).to(torch.float32)
        last_count = is_last.sum(1).to(torch.float32)
        last_repeats = (follows_last & is_last).sum(1).to(torch.float32)
        context = torch.log1p(torch.stack([n_known, n_distinct, last_count, last_repeats, sess_len], dim=1))
        feats = torch.cat([torch.log(agg[:, :n_dec] + 1e-4),
                           torch.log1p(torch.stack([count, sess_count, trans], dim=1)),
                           (sess_count / sess_len[rows].clamp(min=1.0)).unsqueeze(1), is_newest.unsqueeze(1),
                           torch.log1p((length - 1 - newest_col).to(torch.float32)).unsqueeze(1),
                           context[rows]], dim=1)
        gate = F.softplus(self.gate(torch.cat([h, context[:, :2]], dim=1))).squeeze(1)
        values = (self.mlp(feats).squeeze(1) + self.item_bias[items]) * gate[rows] + self.window_offset
        return rows, items, values

    def profile(self, win: HistoryWindow) -> torch.Tensor | None:
        """(R, hidden) mean profile embedding of the window's known events (None without the profile)."""
        if self.profile_emb is None:
            return None
        known = win.known
        counts = known.sum(1)
        offsets = torch.cumsum(counts, 0) - counts
        return F.embedding_bag(win.items[known], self.profile_emb, offsets, mode="mean")

    def dense(self, h: torch.Tensor, win: HistoryWindow, n_items: int) -> torch.Tensor:
        """(R, n_items) gate * repeat logit; 0 for items outside the row's window."""
        return self.add_to(torch.zeros(h.shape[0], n_items, device=h.device), h, win)

    def add_to(self, scores: torch.Tensor, h: torch.Tensor, win: HistoryWindow) -> torch.Tensor:
        """`scores` (R, n_items) plus gate * repeat logit, in place: only the windows' items are touched,
        where adding a dense (R, n_items) matrix would write two more of them."""
        rows, items, values = self(h, win)
        return scores.index_put_((rows, items), values.to(scores.dtype), accumulate=True)

    def at(self, h: torch.Tensor, win: HistoryWindow, cands: torch.Tensor) -> torch.Tensor:
        """(R, C) gate * repeat logit at candidate columns (duplicates allowed), never the whole catalogue."""
        return scatter_at(self(h, win), h.shape[0], cands)

    @staticmethod
    def members(win: HistoryWindow, cands: torch.Tensor) -> torch.Tensor:
        """(R, C) bool: candidate column c's item occurs (known) in row r's window."""
        rows = torch.arange(win.items.shape[0], device=cands.device).unsqueeze(1).expand_as(win.items)
        known = win.known
        ones = torch.ones(int(known.sum()), dtype=torch.bool, device=cands.device)
        return scatter_at((rows[known], win.items[known], ones), win.items.shape[0], cands)


Pairs = tuple[torch.Tensor, torch.Tensor, torch.Tensor]  # (rows, items, values) of distinct (row, item) pairs


def scatter_at(pairs: Pairs, n_rows: int, cands: torch.Tensor) -> torch.Tensor:
    """Pair values at candidate columns (R, C); 0 (False) where a row has no pair for the column's item."""
    rows, items, values = pairs
    uniq, inv = torch.unique(cands, return_inverse=True)
    pos = torch.searchsorted(uniq, items).clamp(max=len(uniq) - 1)
    hit = uniq[pos] == items
    out = torch.zeros(n_rows, len(uniq), device=values.device, dtype=values.dtype)
    return out.index_put((rows[hit], pos[hit]), values[hit])[:, inv]


def pair_columns(rows: torch.Tensor, n_rows: int) -> tuple[torch.Tensor, int]:
    """Column of each pair within its row (pairs sorted by row) and the widest row: lays pairs out as (R, W)."""
    counts = torch.bincount(rows, minlength=n_rows)
    first = torch.cumsum(counts, 0) - counts
    return torch.arange(len(rows), device=rows.device) - first[rows], int(counts.max()) if n_rows else 0
