"""The HRNN module (Quadrana et al., RecSys 2017) and the one recurrence every path uses.

A session-level GRU runs over item embeddings. When a session ends, a user-level GRU
steps once on the session's last hidden state; the next session starts from
`dropout(tanh(W h_user + b))` (HRNN-Init). HRNN-All also feeds the user state into every
session step; `session-only` is the GRU4Rec-style ablation that starts sessions from zero.

`HRNN.transition` is the single definition of "consume one event" used by training,
evaluation and the streaming inference API, so the three cannot drift apart. With
`repeat_head` the scores also take the user's last-H events (model.repeat); callers pass
the same `HistoryWindow` in all three paths.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Sequence

import numpy as np
import torch
from torch import nn

from model.config import HRNNConfig
from model.errors import ConfigError
from model.repeat import HistoryWindow, RepeatHead

WINDOW_OFFSET = "repeat.window_offset"  # RepeatHead.window_offset's state-dict key: calibrated, not trained
GAP_SCALE = 1.0 / math.log1p(30 * 86400)  # log1p(gap seconds) scaled so 30 days ~ 1


def gap_feature(gap_ms: torch.Tensor) -> torch.Tensor:
    """log(1 + seconds since the user's previous event), scaled to about [0, 1]; negative gaps count as 0."""
    return (torch.log1p(gap_ms.clamp(min=0).to(torch.float32) / 1000.0) * GAP_SCALE).unsqueeze(-1)


class HRNN(nn.Module):
    def __init__(self, n_items: int, cfg: HRNNConfig) -> None:
        super().__init__()
        self.cfg, self.n_items = cfg, n_items
        hid, emb = cfg.hidden_dimension, cfg.emb_dim
        self.item_emb = nn.Embedding(n_items, emb)
        in_dim = emb + (hid if cfg.variant == "hrnn-all" else 0) + (1 if cfg.time_gap_input else 0)
        self.session_gru = nn.GRUCell(in_dim, hid)
        self.user_gru = nn.GRUCell(hid, hid)
        self.init_proj = nn.Linear(hid, hid)
        self.out_emb = None if cfg.tied_embeddings else nn.Embedding(n_items, hid)
        self.out_bias = nn.Parameter(torch.zeros(n_items))
        self.drop_emb = nn.Dropout(cfg.dropout_embedding)
        self.drop_sess = nn.Dropout(cfg.dropout_session)
        self.drop_user = nn.Dropout(cfg.dropout_user)
        self.drop_init = nn.Dropout(cfg.dropout_init)
        self.repeat = RepeatHead(n_items, hid, cfg.window_profile) if cfg.repeat_head else None
        self.reset_parameters()

    def reset_parameters(self) -> None:
        scale = 1.0 / math.sqrt(self.cfg.hidden_dimension)
        nn.init.uniform_(self.item_emb.weight, -scale, scale)
        if self.out_emb is not None:
            nn.init.uniform_(self.out_emb.weight, -scale, scale)

    @property
    def hidden(self) -> int:
        return self.cfg.hidden_dimension

    def blank_state(self, batch: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """(h_user, h_sess) of `batch` users the network has not seen yet."""
        return torch.zeros(batch, self.hidden, device=device), torch.zeros(batch, self.hidden, device=device)

    @property
    def out_weight(self) -> torch.Tensor:
        return self.item_emb.weight if self.out_emb is None else self.out_emb.weight

    def start_session(self, h_user: torch.Tensor) -> torch.Tensor:
        if self.cfg.variant == "session-only":
            return torch.zeros_like(h_user)
        return self.drop_init(torch.tanh(self.init_proj(h_user)))

    def end_session(self, h_user: torch.Tensor, h_sess: torch.Tensor) -> torch.Tensor:
        if self.cfg.variant == "session-only":
            return h_user
        return self.user_gru(self.drop_user(h_sess), h_user)

    def step(self, items: torch.Tensor, h_sess: torch.Tensor, h_user: torch.Tensor,
             gap_ms: torch.Tensor) -> torch.Tensor:
        parts = [self.drop_emb(self.item_emb(items))]
        if self.cfg.variant == "hrnn-all":
            parts.append(h_user)
        if self.cfg.time_gap_input:
            parts.append(gap_feature(gap_ms))
        return self.session_gru(torch.cat(parts, dim=-1), h_sess)

    def transition(self, h_user: torch.Tensor, h_sess: torch.Tensor, items: torch.Tensor,
                   new_user: torch.Tensor, new_session: torch.Tensor, known: torch.Tensor,
                   gap_ms: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Consume one event per row. Returns (h_user, h_sess after the event, h_pre).

        h_pre is the session state just before the item is read: the fresh session start for
        an event that opens a session, else the previous state. Scoring h_pre predicts this
        event; scoring the returned h_sess predicts the next one. Masks are exact per row:
        a row's flags never touch another row's state.
        """
        zeros = torch.zeros_like(h_user)
        nu, ns, kn = new_user.unsqueeze(-1), new_session.unsqueeze(-1), known.unsqueeze(-1)
        h_user = torch.where(nu, zeros, h_user)
        h_sess = torch.where(nu, zeros, h_sess)
        h_user = torch.where(ns & ~nu, self.end_session(h_user, h_sess), h_user)
        h_pre = torch.where(ns, self.start_session(h_user), h_sess)
        stepped = self.step(items.clamp(min=0), h_pre, h_user, gap_ms)
        return h_user, torch.where(kn, stepped, h_pre), h_pre

    def output(self, h_sess: torch.Tensor) -> torch.Tensor:
        return self.drop_sess(h_sess)

    def output_with(self, h_sess: torch.Tensor, history: HistoryWindow | None) -> torch.Tensor:
        """The vector the catalogue is scored against: the session state, plus the window profile."""
        out = self.output(h_sess)
        profile = self.repeat.profile(history) if self.repeat is not None and history is not None else None
        return out if profile is None else out + profile

    def score_all(self, h: torch.Tensor, history: HistoryWindow | None = None) -> torch.Tensor:
        """(B, H) -> (B, n_items) catalogue scores; `history` (the rows' last-H events) feeds the repeat head."""
        scores = torch.addmm(self.out_bias, self.output_with(h, history), self.out_weight.t())
        if self.repeat is not None and history is not None:
            self.repeat.add_to(scores, h, history)
        return scores


@dataclass
class PaddedSequences:
    """A batch of event sequences aligned by position (row b, step t); `valid` marks real events."""

    items: torch.Tensor  # (B, T) long, -1 unknown
    new_session: torch.Tensor  # (B, T) bool
    gap_ms: torch.Tensor  # (B, T) long
    valid: torch.Tensor  # (B, T) bool

    @classmethod
    def build(cls, items: list[np.ndarray], new_session: list[np.ndarray], ts_ms: list[np.ndarray],
              device: torch.device, prev_ts: Sequence[int] | None = None) -> "PaddedSequences":
        """`prev_ts[r]`: the user's clock (latest event time) before row r's first event, when the rows
        continue a user's stream rather than start it; the first event's gap is measured from it."""
        b, t = len(items), max((len(x) for x in items), default=0)
        it = np.full((b, t), -1, dtype=np.int64)
        ns = np.zeros((b, t), dtype=bool)
        gap = np.zeros((b, t), dtype=np.int64)
        valid = np.zeros((b, t), dtype=bool)
        for r, (i, s, ts) in enumerate(zip(items, new_session, ts_ms)):
            n = len(i)
            it[r, :n], ns[r, :n], valid[r, :n] = i, s, True
            if n:  # a new user's first event has no gap: measure it from its own time
                prev = ts[0] if prev_ts is None else prev_ts[r]
                gap[r, :n] = np.diff(np.maximum.accumulate(np.concatenate([[prev], ts])))
        as_t = lambda a: torch.from_numpy(a).to(device)  # noqa: E731
        return cls(as_t(it), as_t(ns), as_t(gap), as_t(valid))


def run_sequences(model: HRNN, seqs: PaddedSequences, collect: torch.Tensor | None = None,
                  start: tuple[torch.Tensor, torch.Tensor] | None = None
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """Replay whole sequences from a blank user state (every row starts as a new user), or continue
    them from `start` = (h_user, h_sess) per row.

    Returns final (h_user, h_sess) per row and, if `collect` (B, T bool) is given, the
    pre-event states h_pre at the collected positions in row-major order (predictions of
    those events). Rows past their end keep their state untouched.
    """
    b, t = seqs.items.shape
    dev = seqs.items.device
    if start is None:
        h_user, h_sess = model.blank_state(b, dev)
    else:
        h_user, h_sess = start
    pre = torch.zeros(b, t, model.hidden, device=dev) if collect is not None else None
    for j in range(t):
        v = seqs.valid[:, j]
        new_user = torch.full_like(v, j == 0 and start is None)
        hu, hs, hp = model.transition(h_user, h_sess, seqs.items[:, j], new_user, seqs.new_session[:, j] | new_user,
                                      seqs.items[:, j] >= 0, seqs.gap_ms[:, j])
        vv = v.unsqueeze(-1)
        h_user, h_sess = torch.where(vv, hu, h_user), torch.where(vv, hs, h_sess)
        if pre is not None:
            pre[:, j] = hp
    collected = pre[collect] if pre is not None else None
    return h_user, h_sess, collected


def resolve_device(name: str = "auto") -> torch.device:
    """'auto' takes CUDA when present, else the CPU; one code path for both. A device this machine
    cannot use is a ConfigError that says so, before anything is loaded onto it."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(name)
    except (RuntimeError, TypeError):
        dev = None
    if dev is None or dev.type not in ("cpu", "cuda"):
        raise ConfigError(f"device {name!r} is not one of auto, cpu, cuda, cuda:N")
    if dev.type == "cuda" and (dev.index or 0) >= torch.cuda.device_count():
        found = f"{torch.cuda.device_count()} CUDA device(s)" if torch.cuda.is_available() else "no CUDA device"
        raise ConfigError(f"device {name!r}: torch sees {found} here (use auto or cpu)")
    return dev


def available_devices() -> list[str]:
    """The devices this machine can serve and train on: the CPU, and CUDA where torch sees a GPU."""
    return ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def device_label(device: torch.device | str) -> str:
    """What a log line or a benchmark names a device by: the GPU's model name, or the CPU and its threads."""
    dev = resolve_device(device) if isinstance(device, str) else device
    if dev.type == "cuda":
        return f"{dev} ({torch.cuda.get_device_name(dev)})"
    return f"cpu ({torch.get_num_threads()} threads)"
