"""Training with user-parallel, session-parallel mini-batches.

Each of `batch_size` slots carries one user through all of that user's sessions in time
order; when the user is exhausted the slot takes the next user and its states reset (the
reset is per slot, exact). Every epoch visits every user: slots run until the queue is
empty, so no user is silently dropped. Backpropagation is truncated every `bptt` steps.

Targets per step: the next event of the same session, predicted from the state after the
current event; and (predict_session_start) the first event of a new session, predicted
from the fresh session state the user GRU produced. Negatives are the step's other targets
plus `n_sample` shared items drawn by popularity^sample_alpha; only targets and samples are
scored, never the whole catalogue.

With the repeat head (repeat_head=true) every scored row also carries the end of its
history window: the row's own event for next-in-session targets, the previous event for
session-start targets, so the window is the slot user's last H events (earlier sessions
and the current one) exactly as evaluation and the online API see them.

Distillation (fit's `teachers`): trained networks step through the same slots beside the network
being trained, in eval mode, and score the same columns as its loss; their mean probabilities
over those columns are a second target (KL, weight distill_weight) for every row.

Recency mask (recency_mask=true): a target event at time t weighs
    w = 0.5 ** ((t_end - t) / half_life)
where t_end is the newest training timestamp and half_life is recency_half_life_days, or a
quarter of the training time span when that is 0. Weights (times the per-event-type
weights) are rescaled to mean 1. A chunk's loss is its rows' weighted mean (sum of w * loss over sum of w, as
torch's weighted losses reduce), so the weights set the balance between the rows of one chunk (batch_size slots x
bptt steps) and no chunk's step size: a chunk whose rows weigh alike, a single row at batch_size 1 and bptt 1, is
not reweighted. Dividing by the row count instead, so that a chunk's step grows with its mean weight, cost the
default config a tenth of its validation MRR@20 on reddit-jodie (tune's trial 0: .4447, against .4933).
"""
from __future__ import annotations

import copy
import math
import sys
import time
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import Callable, Iterator

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from model.config import HRNNConfig
from model.errors import ConfigError
from model.interactions import Interactions
from model.losses import NEG_INF, ranking_loss
from model.network import HRNN, resolve_device
from model.repeat import HistoryWindow, RepeatHead, gather_windows, pair_columns, scatter_at, type_slots

Validator = Callable[[HRNN], dict]


@dataclass
class TrainSequences:
    """Row arrays in (user, time) order, ready for the slot loop."""

    items: np.ndarray  # int64
    ts_ms: np.ndarray  # int64
    new_session: np.ndarray  # bool
    next_in_session: np.ndarray  # bool: row p+1 continues row p's session
    weight: np.ndarray  # float32 weight of the row as a target
    user_start: np.ndarray  # bool: first row of a user
    bounds: np.ndarray  # user start offsets + end
    popularity: np.ndarray  # float64 per item
    type_slot: np.ndarray | None = None  # int64 repeat-head type slot per row
    user_first: np.ndarray | None = None  # int64 first row of each row's user
    session_first: np.ndarray | None = None  # int64 first row of each row's session

    @classmethod
    def build(cls, data: Interactions, session_start: np.ndarray, cfg: HRNNConfig,
              type_weights: np.ndarray | None = None) -> "TrainSequences":
        n = len(data)
        nxt = np.zeros(n, dtype=bool)
        nxt[:-1] = ~session_start[1:]
        pop = np.bincount(data.item, minlength=data.n_items).astype(np.float64)
        bounds = data.user_bounds()
        first = user_first_rows(bounds, n)
        w = target_weights(data.ts_ms, session_start | first, first, cfg, type_weights)
        rows = np.arange(n)
        user_first = np.repeat(bounds[:-1], np.diff(bounds)).astype(np.int64)
        session_first = np.maximum.accumulate(np.where(session_start | first, rows, 0)).astype(np.int64) \
            if n else rows
        return cls(data.item.astype(np.int64), data.ts_ms.astype(np.int64), session_start | first, nxt, w,
                   first, bounds, pop, type_slots(data.event_type).astype(np.int64), user_first, session_first)

    def windows(self, ends: np.ndarray, length: int, opens: np.ndarray | None = None) -> HistoryWindow:
        """The repeat head's windows ending at rows `ends` (each within its user's rows); opens[r]: row r
        predicts the event after ends[r] as the first of a new session."""
        assert self.type_slot is not None and self.user_first is not None and self.session_first is not None
        sess = self.session_first[ends] if opens is None else np.where(opens, ends + 1, self.session_first[ends])
        t = torch.from_numpy
        return gather_windows(t(self.items), t(self.ts_ms), t(self.type_slot), t(ends), t(self.user_first[ends]),
                              t(np.ascontiguousarray(sess, dtype=np.int64)), length)


def user_first_rows(bounds: np.ndarray, n: int) -> np.ndarray:
    """Per row of n, whether it is its user's first (`bounds`: Interactions.user_bounds)."""
    first = np.zeros(n, dtype=bool)
    first[bounds[:-1]] = True
    return first


def check_target_weights(data: Interactions, session_start: np.ndarray, cfg: HRNNConfig,
                         type_weights: np.ndarray | None = None) -> None:
    """target_weights' ConfigError, before any training, without building the training tensors."""
    first = user_first_rows(data.user_bounds(), len(data))
    target_weights(data.ts_ms, session_start | first, first, cfg, type_weights)


def has_targets(data: Interactions, session_start: np.ndarray, cfg: HRNNConfig) -> bool:
    """Whether training on `data` with `cfg` has any row to predict (target_weights refuses to train otherwise)."""
    first = user_first_rows(data.user_bounds(), len(data))
    return bool(target_rows(session_start | first, first, cfg).any())


def target_rows(new_session: np.ndarray, user_first: np.ndarray, cfg: HRNNConfig) -> np.ndarray:
    """Per row: the trainer predicts it. A user's first event never; a session's first only from the user state
    (predict_session_start, not session-only)."""
    return ~user_first & (~new_session | (cfg.predict_session_start and cfg.variant != "session-only"))


def target_weights(ts_ms: np.ndarray, new_session: np.ndarray, user_first: np.ndarray, cfg: HRNNConfig,
                   type_weights: np.ndarray | None = None) -> np.ndarray:
    """Each row's weight as a target, rescaled to mean 1. A ConfigError names the setting when no row is a
    target, or every row that is one weighs 0: the loss would be 0 from the first step and the random network
    would be published."""
    w = recency_weights(ts_ms, cfg) if cfg.recency_mask else np.ones(len(ts_ms), dtype=np.float32)
    if type_weights is not None:
        w = w * type_weights
    targets = target_rows(new_session, user_first, cfg)
    if not targets.any():
        raise ConfigError(_no_target(cfg))
    if not float(w[targets].sum(dtype=np.float64)) > 0:
        if type_weights is not None and not (type_weights[targets] > 0).any():
            raise ConfigError("event_type_weights give every training target a weight of 0 (of the event types "
                              "trained on, at least one needs a weight above 0): nothing would be learnt")
        raise ConfigError(f"recency_half_life_days {cfg.recency_half_life_days:g} gives every training target a "
                          "weight of 0: nothing would be learnt (lengthen it, or set recency_mask false)")
    return (w / max(float(w.mean()), 1e-12)).astype(np.float32)


def _no_target(cfg: HRNNConfig) -> str:
    if cfg.predict_session_start and cfg.variant != "session-only":
        return "no user has two events in the events trained on: there is no next event to learn"
    setting = "variant session-only" if cfg.variant == "session-only" else "predict_session_start false"
    return (f"{setting} learns only next-in-session pairs (a session's first event is never a target) and no session "
            "of the events trained on has two events: nothing would be learnt (use variant hrnn-init with "
            "predict_session_start true, or a longer session_timeout_s)")


def recency_weights(ts_ms: np.ndarray, cfg: HRNNConfig) -> np.ndarray:
    if len(ts_ms) == 0:
        return np.ones(0, dtype=np.float32)
    t_end, span = int(ts_ms.max()), int(ts_ms.max() - ts_ms.min())
    half_life = cfg.recency_half_life_days * 86_400_000 or max(span / 4, 1.0)
    return np.power(0.5, (t_end - ts_ms) / half_life).astype(np.float32)


@dataclass
class FitResult:
    model: HRNN
    history: list[dict] = field(default_factory=list)
    best_epoch: int = 0


class _Slots:
    """The per-slot cursor state of one epoch."""

    def __init__(self, seqs: TrainSequences, order: np.ndarray, batch: int) -> None:
        self.seqs, self.queue = seqs, list(order[::-1])
        self.cur = np.zeros(batch, dtype=np.int64)
        self.end = np.zeros(batch, dtype=np.int64)
        self.active = np.zeros(batch, dtype=bool)
        for s in range(batch):
            self._take(s)

    def _take(self, s: int) -> None:
        if self.queue:
            u = self.queue.pop()
            self.cur[s], self.end[s], self.active[s] = self.seqs.bounds[u], self.seqs.bounds[u + 1], True
        else:
            self.active[s] = False

    def advance(self) -> None:
        self.cur += self.active
        for s in np.flatnonzero(self.active & (self.cur >= self.end)):
            self._take(s)


def _sampler(seqs: TrainSequences, cfg: HRNNConfig, device: torch.device) -> torch.Tensor:
    p = np.power(seqs.popularity, cfg.sample_alpha)
    return torch.tensor(p / p.sum(), dtype=torch.float32, device=device)


def _step_rows(model: HRNN, state: tuple, seqs: TrainSequences, slots: _Slots, cfg: HRNNConfig,
               device: torch.device) -> tuple[tuple, list]:
    """Advance every slot by one event; return new hidden states and rows of (hidden, target, weight, end of
    the target's history window, whether the target opens a session)."""
    h_user, h_sess = state
    act = slots.active
    p = np.where(act, slots.cur, 0)  # parked slots read row 0 and are masked out
    user_start = seqs.user_start[p]
    new_user = user_start | ~act
    gap = np.where(user_start, 0, seqs.ts_ms[p] - seqs.ts_ms[np.maximum(p - 1, 0)])
    t = lambda a, dt=None: torch.as_tensor(a, device=device, dtype=dt)  # noqa: E731
    items = t(seqs.items[p])
    h_user, h_sess, h_pre = model.transition(h_user, h_sess, items, t(new_user), t(seqs.new_session[p] | new_user),
                                             t(np.ones_like(act)), t(gap))
    rows = []
    nxt = act & seqs.next_in_session[p] & (p + 1 < slots.end)
    if nxt.any():
        rows.append((h_sess[t(nxt)], t(seqs.items[p[nxt] + 1]), t(seqs.weight[p[nxt] + 1]), p[nxt],
                     np.zeros(int(nxt.sum()), dtype=bool)))
    if cfg.predict_session_start and cfg.variant != "session-only":
        st = act & seqs.new_session[p] & ~user_start
        if st.any():
            rows.append((h_pre[t(st)], items[t(st)], t(seqs.weight[p[st]]), p[st] - 1, np.ones(int(st.sum()), dtype=bool)))
    return (h_user, h_sess), rows


def _chunk_loss(model: HRNN, rows: list, probs: torch.Tensor, cfg: HRNNConfig, seqs: TrainSequences,
                teachers: Teachers | None = None) -> torch.Tensor | None:
    if not rows:
        return None
    h = torch.cat([r[0] for r in rows])
    targets = torch.cat([r[1] for r in rows])
    w = torch.cat([r[2] for r in rows])
    cands = targets
    if cfg.n_sample:
        cands = torch.cat([targets, torch.multinomial(probs, cfg.n_sample, replacement=True)])
    window = None
    if model.repeat is not None:
        window = seqs.windows(np.concatenate([r[3] for r in rows]), cfg.history_length,
                              np.concatenate([r[4] for r in rows])).to(h.device)
    logits, columns, gru = _row_logits(model, h, window, cands, probs, cfg)
    loss = _weighted(ranking_loss(cfg.loss, logits, columns, targets, bpreg=cfg.bpreg), w)
    if window is not None:
        loss = loss + _explore_loss(gru, window, cands, targets, w, cfg)
    if teachers is not None:
        soft = teachers.predict(window, cands, probs, cfg)
        loss = loss + cfg.distill_weight * _weighted(distillation_loss(logits, soft), w)
    return loss


def _weighted(per_row: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """The chunk's weighted mean loss (module docstring: the weights balance a chunk's rows, not its step size)."""
    return (per_row * w).sum() / w.sum().clamp(min=1e-6)


def _row_logits(model: HRNN, h: torch.Tensor, window: HistoryWindow | None, cands: torch.Tensor,
                probs: torch.Tensor, cfg: HRNNConfig) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The scores the loss ranks: (logits, the item of each column, the GRU's own scores of the shared columns).

    Columns are the shared candidates; with the repeat head (a window given) every item of a row's window
    is also a negative of that row, sampled or not: shared samples rarely hold a user's other items in a
    large catalogue, and a head that only ever saw its items as positives would learn to boost them all.
    Those items that are not shared candidates get per-row columns after the shared ones (item -1, empty
    cells NEG_INF); not for top1, whose score of a masked column is not zero: it keeps the shared columns.
    The layout depends on the window and the candidates only, so teachers score the same columns.
    """
    out = model.output_with(h, window)  # one dropout mask for every score of a row
    gru = torch.addmm(model.out_bias[cands], out, model.out_weight[cands].t())
    if cfg.logq:
        gru = gru - cfg.logq * torch.log(probs[cands] + 1e-12)
    if model.repeat is None or window is None:
        return gru, cands, gru
    p_rows, p_items, p_values = pairs = model.repeat(h, window)
    n = h.shape[0]
    logits, columns = gru + scatter_at(pairs, n, cands), cands
    if cfg.loss != "top1" and len(p_rows):
        keep = ~torch.isin(p_items, cands)  # the shared columns (targets included) already score the others
        col, width = pair_columns(p_rows, n)
        pair_gru = (out[p_rows] * model.out_weight[p_items]).sum(1) + model.out_bias[p_items]
        extra = torch.full((n, width), NEG_INF, device=h.device, dtype=logits.dtype)
        extra = extra.index_put((p_rows[keep], col[keep]), (pair_gru + p_values)[keep])
        logits = torch.cat([logits, extra], dim=1)
        columns = torch.cat([cands, torch.full((width,), -1, dtype=cands.dtype, device=cands.device)])
    return logits, columns, gru


def _explore_loss(gru: torch.Tensor, window: HistoryWindow, cands: torch.Tensor, targets: torch.Tensor,
                  w: torch.Tensor, cfg: HRNNConfig) -> torch.Tensor:
    """Rows whose target is not in the window also train the GRU alone to rank it above the other items
    outside the window (a repeat/explore split): left to the joint loss the GRU lets the head explain the
    repeats and ranks new items worse than popularity does (reddit: 3% of the new-item targets found in
    the free top-20 slots, popularity 17%, with this term 30%).

    The GRU is trained jointly with the head, not frozen under it: on reddit the co-adapted GRU ranks
    the user's own items better (MRR@20 .710 vs .690 with the GRU trained alone under a detached head).
    """
    member = RepeatHead.members(window, cands)
    diag = torch.arange(targets.shape[0], device=gru.device)
    explore = ~member[diag, diag]
    member[diag, diag] = False
    per_row = ranking_loss(cfg.loss, gru, cands, targets, bpreg=cfg.bpreg, exclude=member)
    return _weighted(per_row * explore, w)


def distillation_loss(logits: torch.Tensor, soft: torch.Tensor) -> torch.Tensor:
    """Per row: KL(soft || softmax(logits)) over the loss's columns; soft is a probability per column."""
    return F.kl_div(F.log_softmax(logits, dim=1), soft, reduction="none").sum(1)


class Teachers:
    """Trained networks whose mean predictions the network being trained also learns (knowledge
    distillation): they advance through the same slots, event by event, in eval mode, and score the
    same columns as the loss, so each row's soft target is theirs for exactly the student's context."""

    def __init__(self, models: list[HRNN]) -> None:
        if not models:
            raise ValueError("Teachers needs at least one network")
        self.models = [m.eval() for m in models]
        self.states: list[tuple] = []
        self.rows: list[list[torch.Tensor]] = []

    def begin(self, batch: int, device: torch.device) -> None:
        self.states = [m.blank_state(batch, device) for m in self.models]
        self.rows = [[] for _ in self.models]

    @torch.no_grad()
    def step(self, seqs: TrainSequences, slots: _Slots, cfg: HRNNConfig, device: torch.device) -> None:
        for i, m in enumerate(self.models):
            self.states[i], rows = _step_rows(m, self.states[i], seqs, slots, cfg, device)
            self.rows[i] += [r[0] for r in rows]

    @torch.no_grad()
    def predict(self, window: HistoryWindow | None, cands: torch.Tensor, probs: torch.Tensor,
                cfg: HRNNConfig) -> torch.Tensor:
        """Mean probabilities over the loss's columns of the rows stepped since the last call."""
        soft = torch.stack([F.softmax(_row_logits(m, torch.cat(rows), window, cands, probs, cfg)[0], dim=1)
                            for m, rows in zip(self.models, self.rows)]).mean(0)
        self.rows = [[] for _ in self.models]
        return soft


def _make_optimizer(model: HRNN, cfg: HRNNConfig) -> torch.optim.Optimizer:
    if cfg.optimizer == "adagrad":
        return torch.optim.Adagrad(model.parameters(), lr=cfg.learning_rate, weight_decay=cfg.weight_decay)
    return torch.optim.Adam(model.parameters(), lr=cfg.learning_rate, weight_decay=cfg.weight_decay)


class WeightAverage:
    """A moving average of the network's weights over about the last `epochs` epochs of optimizer steps:
    the plain mean of every step so far until that many steps were taken, an exponential average with
    that horizon after. The horizon is counted in epochs so that it means the same on any log size;
    the first epoch's step count turns it into steps."""

    def __init__(self, model: HRNN, epochs: float) -> None:
        self.model, self.epochs = copy.deepcopy(model), epochs
        self.steps, self.horizon = 0, math.inf

    def end_epoch(self) -> None:
        if math.isinf(self.horizon):
            self.horizon = max(1.0, self.epochs * self.steps)

    def update(self, model: HRNN) -> None:
        self.steps += 1
        weight = max(1 / self.steps, 1 / self.horizon)
        with torch.no_grad():
            for a, p in zip(self.model.parameters(), model.parameters()):
                a.lerp_(p, weight)


def run_epoch(model: HRNN, seqs: TrainSequences, cfg: HRNNConfig, opt: torch.optim.Optimizer,
              rng: np.random.Generator, device: torch.device, bar: tqdm | None = None,
              average: WeightAverage | None = None, teachers: Teachers | None = None) -> dict:
    model.train()
    n_users = len(seqs.bounds) - 1
    slots = _Slots(seqs, rng.permutation(n_users), min(cfg.batch_size, max(n_users, 1)))
    b = len(slots.cur)
    state = model.blank_state(b, device)
    if teachers is not None:
        teachers.begin(b, device)
    probs = _sampler(seqs, cfg, device)
    total, batches, events = 0.0, 0, 0
    while slots.active.any():
        rows: list = []
        for _ in range(cfg.bptt):
            if not slots.active.any():
                break
            events += int(slots.active.sum())
            if teachers is not None:
                teachers.step(seqs, slots, cfg, device)
            state, step_rows = _step_rows(model, state, seqs, slots, cfg, device)
            rows += step_rows
            slots.advance()
        loss = _chunk_loss(model, rows, probs, cfg, seqs, teachers)
        if loss is not None:
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            if average is not None:
                average.update(model)
            total, batches = total + float(loss.detach()), batches + 1
        state = tuple(s.detach() for s in state)
        if bar is not None:
            bar.update(events - bar.n)
            bar.set_postfix(loss=f"{total / max(batches, 1):.4f}")
    return {"loss": total / max(batches, 1), "events": events}


@contextmanager
def deterministic_kernels(device: torch.device) -> Iterator[None]:
    """Torch's deterministic kernels while training on the CPU, then the caller's setting back. The default
    CPU `index_put_(accumulate=True)` (the backward of `out_weight[cands]`, whose sampled candidates repeat)
    adds from several threads in a racing order: two runs with one seed parted in the 5th digit on reddit
    with 2 threads, so a tuned trial was not reproduced exactly. The sorted kernel cost no time measurable
    here. CUDA is left as it was: its deterministic mode needs a cuBLAS workspace setting and is untested."""
    if device.type != "cpu":
        yield
        return
    was, warn_only = torch.are_deterministic_algorithms_enabled(), torch.is_deterministic_algorithms_warn_only_enabled()
    torch.use_deterministic_algorithms(True)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(was, warn_only=warn_only)


def fit(data: Interactions, session_start: np.ndarray, cfg: HRNNConfig, *, type_weights: np.ndarray | None = None,
        validate: Validator | None = None, patience: int = 2, device: str = "auto", progress: bool = True,
        init_state: dict | None = None, teachers: list[HRNN] | None = None,
        stop: Callable[[], bool] | None = None) -> FitResult:
    """Train an HRNN. With `validate`, keep the weights of the best epoch by its 'mrr@20'. With `teachers`
    (trained on the same data), also learn their mean predictions, weighted by cfg.distill_weight. `stop`,
    asked after each epoch, ends training there as early stopping would (e.g. a time budget)."""
    cfg.validate()
    torch.manual_seed(cfg.seed)
    rng = np.random.default_rng(cfg.seed)
    dev = resolve_device(device)
    model = HRNN(data.n_items, cfg).to(dev)
    if init_state is not None:
        model.load_state_dict(init_state)
    seqs = TrainSequences.build(data, session_start, cfg, type_weights)
    opt = _make_optimizer(model, cfg)
    result = FitResult(model)
    best, best_state, bad = -math.inf, None, 0
    average = WeightAverage(model, cfg.weight_average_epochs) if cfg.weight_average_epochs > 0 else None
    served = average.model if average is not None else model  # what is validated and published
    guides = Teachers([t.to(dev) for t in teachers]) if teachers else None
    with deterministic_kernels(dev):
        for epoch in range(1, cfg.epochs + 1):
            t0 = time.perf_counter()
            with tqdm(total=len(data), desc=f"epoch {epoch}/{cfg.epochs}", unit="ev", disable=not progress,
                      leave=True, mininterval=1.0) as bar:
                stats = run_epoch(model, seqs, cfg, opt, rng, dev, bar, average, guides)
            if average is not None:
                average.end_epoch()
            secs = time.perf_counter() - t0
            entry = {"epoch": epoch, "loss": stats["loss"], "seconds": secs, "events_per_s": stats["events"] / secs}
            if validate is not None:
                entry.update({f"val_{k}": v for k, v in validate(served).items()})
                score = entry.get("val_mrr@20", -stats["loss"])
                if score > best:
                    best, best_state, bad, result.best_epoch = score, copy.deepcopy(served.state_dict()), 0, epoch
                else:
                    bad += 1
            result.history.append(entry)
            if progress:
                shown = {k: round(v, 4) if isinstance(v, float) else v for k, v in entry.items()}
                tqdm.write(f"epoch {epoch}: {shown}", file=sys.stderr)  # stdout is the caller's result
            if validate is not None and bad >= patience:
                break
            if stop is not None and stop():
                break
    if best_state is None and average is not None:
        best_state = average.model.state_dict()
    if best_state is not None:
        model.load_state_dict(best_state)
    if validate is None:
        result.best_epoch = len(result.history)
    model.eval()
    return result
