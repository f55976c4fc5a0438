"""Non-neural baselines, each a Scorer (model.scorer): fit on training interactions, then score
every target of a user sequence over the whole catalogue.

Shared conventions:
- A target at position t sees only positions < t. Its current session is the events from the
  last session start at or before t up to t - 1; it is empty when the target opens a session.
- Items with code -1 (unknown to training) are skipped as inputs.
- Ties are broken by training popularity with a term too small to reorder the primary scores:
  integer-valued scores (counts) get popularity / (max popularity + 1) < 1; real-valued scores
  get 1e-12 (sums of kNN similarities: two cosines can differ by less than 1e-6, e.g. 1/sqrt(10^4) and
  1/sqrt(10^4 + 1)), 1e-6 (EASE, whose float32 weights hold no finer differences) or 1e-9 (the log2 of
  recency weights) times popularity / max popularity; the items outside a user's history rank below
  all of it, by popularity.
  Without it the evaluator's pessimistic tie rule would rank every unscored item last together.
  Scores are float64: in float32 a term of 1e-9 (or 1e-6 between close popularities) vanishes
  beside a score near 1, and the ties it should break count against the baseline.
- Scores are deterministic (no sampling by chance: sknn samples the most recent sessions).
"""
from __future__ import annotations

import warnings
from typing import Any, Callable

import numpy as np
import torch

from model.errors import ConfigError
from model.interactions import Interactions
from model.scorer import Scorer, UserSequence
from model.sessions import session_index

DAY_MS = 86_400_000
SIMILARITY_TIE_BREAK = 1e-12  # times popularity / max popularity: float64 resolves it beside scores up to ~500


def _session_begin(seq: UserSequence) -> np.ndarray:
    """For each position p, the index of the last session start at or before p."""
    idx = np.arange(len(seq.items))
    return np.maximum.accumulate(np.where(seq.session_start, idx, 0)) if len(idx) else idx


def _ragged_gather(ptr: np.ndarray, values: np.ndarray, which: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Concatenate values[ptr[w]:ptr[w+1]] for w in which; also return, per element, its index into which."""
    lens = ptr[which + 1] - ptr[which]
    owner = np.repeat(np.arange(len(which)), lens)
    start = np.repeat(ptr[which] - np.concatenate([[0], np.cumsum(lens)[:-1]]), lens)
    return values[start + np.arange(int(lens.sum()))], owner


class _Baseline:
    """Common fitting (catalogue size, popularity) and the per-target loop."""

    name = "baseline"

    def fit(self, train: Interactions, session_start: np.ndarray) -> None:
        session_start = np.asarray(session_start, dtype=bool)
        if session_start.shape != (len(train),):
            raise ConfigError(f"{self.name}: session_start has shape {session_start.shape}, expected ({len(train)},)")
        self.n_items = train.n_items
        self.pop = np.bincount(train.item, minlength=self.n_items).astype(np.float64)
        self.pop_norm = self.pop / max(1.0, self.pop.max())  # in [0, 1]
        self._fit(train, session_start)

    def _fit(self, train: Interactions, session_start: np.ndarray) -> None:
        pass

    def score(self, seqs: list[UserSequence]) -> list[np.ndarray]:
        if not hasattr(self, "n_items"):
            raise ConfigError(f"{self.name}: fit() must be called before score()")
        return [self._score_seq(s) for s in seqs]

    def _score_seq(self, seq: UserSequence) -> np.ndarray:
        out = np.empty((len(seq.targets), self.n_items), dtype=np.float64)
        begin = _session_begin(seq)
        for r, t in enumerate(seq.targets):
            t = int(t)
            out[r] = self._score_one(seq, int(begin[t]), t)
        return out

    def _score_one(self, seq: UserSequence, begin: int, t: int) -> np.ndarray:
        raise NotImplementedError


class Popularity(_Baseline):
    """Number of training events of each item."""

    name = "pop"

    def _score_seq(self, seq: UserSequence) -> np.ndarray:
        return np.broadcast_to(self.pop.astype(np.float32), (len(seq.targets), self.n_items)).copy()


class RecentPopularity(_Baseline):
    """Training events of each item in the last `days` days of training, ties by overall popularity."""

    name = "recent-pop"

    def __init__(self, days: float = 1.0) -> None:
        if days <= 0:
            raise ConfigError(f"recent-pop: days must be > 0, got {days}")
        self.days = float(days)

    def _fit(self, train: Interactions, session_start: np.ndarray) -> None:
        recent = train.ts_ms >= (train.ts_ms.max() if len(train) else 0) - self.days * DAY_MS
        counts = np.bincount(train.item[recent], minlength=self.n_items).astype(np.float64)
        self.row = counts + self.pop / (self.pop.max() + 1.0)

    def _score_seq(self, seq: UserSequence) -> np.ndarray:
        return np.broadcast_to(self.row, (len(seq.targets), self.n_items)).copy()


def _training_sessions(train: Interactions, session_start: np.ndarray):
    """Unique (session, item) pairs of the training data, sorted by session then item."""
    sess = session_index(session_start).astype(np.int64)
    n_sess = int(sess[-1]) + 1 if len(sess) else 0
    key = np.unique(sess * train.n_items + train.item)
    return key // train.n_items, (key % train.n_items).astype(np.int64), n_sess


def _user_starts(train: Interactions) -> np.ndarray:
    """True at each user's first event: whole user histories as the 'sessions' of _training_sessions."""
    starts = np.ones(len(train), dtype=bool)
    starts[1:] = train.user[1:] != train.user[:-1]
    return starts


def _cooccurrence(groups: np.ndarray, items: np.ndarray, n_groups: int, n_items: int) -> torch.Tensor:
    """Sparse (n_items, n_items) counts of groups holding both items, from unique (group, item) pairs."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch flags its sparse API as beta
        x = torch.sparse_coo_tensor(torch.from_numpy(np.stack([groups, items])),
                                    torch.ones(len(groups), dtype=torch.float64),
                                    (max(1, n_groups), n_items)).coalesce()
        return torch.sparse.mm(x.t().coalesce(), x).coalesce()


class ItemKNN(_Baseline):
    """Cosine similarity of items as binary session-membership vectors; a target is scored by the
    similarities to the last (known) item of its current session, popularity if the session is
    empty. An item's similarity to itself is 1, so the last item itself ranks first unless
    `exclude_self` (the classic next-item variant). Each item keeps its `neighbours` most similar items.
    """

    name = "item-knn"

    def __init__(self, neighbours: int = 200, exclude_self: bool = False) -> None:
        if neighbours < 1:
            raise ConfigError(f"item-knn: neighbours must be >= 1, got {neighbours}")
        self.neighbours = int(neighbours)
        self.exclude_self = bool(exclude_self)

    def _fit(self, train: Interactions, session_start: np.ndarray) -> None:
        s, i, n_sess = _training_sessions(train, session_start)
        n = self.n_items
        co = _cooccurrence(s, i, n_sess, n)
        r, c = co.indices().numpy()
        v = co.values().numpy()
        support = np.bincount(i, minlength=n).astype(np.float64)  # sessions per item
        sim = v / np.sqrt(support[r] * support[c])
        if self.exclude_self:
            keep = r != c
            r, c, sim = r[keep], c[keep], sim[keep]
        m = min(self.neighbours, n)
        order = np.lexsort((c, -sim, r))  # per item: most similar first, then by code
        r, c, sim = r[order], c[order], sim[order]
        row_start = np.searchsorted(r, np.arange(n))
        pos = np.arange(len(r)) - row_start[r]
        keep = pos < m
        self.nbr = np.zeros((n, m), dtype=np.int64)
        self.sim = np.zeros((n, m), dtype=np.float64)
        self.nbr[r[keep], pos[keep]] = c[keep]
        self.sim[r[keep], pos[keep]] = sim[keep]
        self.base = SIMILARITY_TIE_BREAK * self.pop_norm

    def _score_one(self, seq: UserSequence, begin: int, t: int) -> np.ndarray:
        row = self.base.copy()
        ctx = seq.items[begin:t]
        ctx = ctx[ctx >= 0]
        if len(ctx):
            last = int(ctx[-1])
            np.add.at(row, self.nbr[last], self.sim[last])  # padding repeats code 0 with similarity 0
        return row


class SessionKNN(_Baseline):
    """Session-based kNN: the current session (a set of items) is compared with past training
    sessions that share an item with it; of those, the `sample_size` most recent (by last event)
    are candidates, the `k` most similar (cosine of binary item sets) are the neighbours, and an
    item scores the summed similarity of the neighbours containing it. Popularity if the current
    session is empty. Defaults (k=500, sample_size=2000): larger neighbourhoods scored better on
    the reddit validation split than the classic k=100/500 (R@20 .840 vs .816).
    """

    name = "sknn"

    def __init__(self, k: int = 500, sample_size: int = 2000) -> None:
        if k < 1 or sample_size < 1:
            raise ConfigError(f"{self.name}: k and sample_size must be >= 1, got k={k}, sample_size={sample_size}")
        self.k, self.sample_size = int(k), int(sample_size)

    def _fit(self, train: Interactions, session_start: np.ndarray) -> None:
        s, i, n_sess = _training_sessions(train, session_start)
        sess = session_index(session_start)
        self.sess_time = np.full(n_sess, np.iinfo(np.int64).min, dtype=np.int64)
        np.maximum.at(self.sess_time, sess, train.ts_ms)
        # rank of each session by recency; ties by session number so the order is total
        recency = np.empty(n_sess, dtype=np.int64)
        recency[np.lexsort((np.arange(n_sess), self.sess_time))] = np.arange(n_sess)
        self.recency = recency
        self.sess_ptr = np.concatenate([[0], np.cumsum(np.bincount(s, minlength=n_sess))]).astype(np.int64)
        self.sess_items = i
        self.sess_len = np.diff(self.sess_ptr).astype(np.float64)
        # item -> its sessions, oldest first, cut to the most recent sample_size: the sample_size most
        # recent sessions sharing any item with a query are always among these
        order = np.lexsort((recency[s], i))
        it, ss = i[order], s[order]
        item_ptr = np.concatenate([[0], np.cumsum(np.bincount(it, minlength=self.n_items))]).astype(np.int64)
        pos_from_end = item_ptr[it + 1] - 1 - np.arange(len(it))
        keep = pos_from_end < self.sample_size
        self.item_sessions = ss[keep]
        self.item_ptr = np.concatenate([[0], np.cumsum(np.bincount(it[keep], minlength=self.n_items))]).astype(np.int64)
        self.base = SIMILARITY_TIE_BREAK * self.pop_norm

    def _score_one(self, seq: UserSequence, begin: int, t: int) -> np.ndarray:
        row = self.base.copy()
        q = seq.items[begin:t]
        q = np.unique(q[q >= 0])
        if len(q) == 0:
            return row
        cand, _ = _ragged_gather(self.item_ptr, self.item_sessions, q)
        cand, overlap = np.unique(cand, return_counts=True)
        if len(cand) > self.sample_size:
            recent = np.argsort(-self.recency[cand], kind="stable")[: self.sample_size]
            cand, overlap = cand[recent], overlap[recent]
        sim = overlap / np.sqrt(len(q) * self.sess_len[cand])
        if len(cand) > self.k:
            best = np.lexsort((-self.recency[cand], -sim))[: self.k]
            cand, sim = cand[best], sim[best]
        items, owner = _ragged_gather(self.sess_ptr, self.sess_items, cand)
        row += np.bincount(items, weights=sim[owner], minlength=self.n_items)
        return row


class UserKNN(SessionKNN):
    """User-based kNN: sknn with whole user histories in place of sessions. The query is every earlier
    event of the user; the neighbours are training users (their whole training history as one item
    set); an item scores the summed similarity of the neighbours that have it. Where sknn follows the
    session, this follows taste: on reddit it ranks the subreddits new to a user second best of the
    scorers here (explore targets in the top 20 of the user's new items, bench/repeat_explore.py:
    ease .52, user-knn .47, tuned repeat-aware HRNN .45, sknn .42, popularity .22). k=200 found more
    of them than k=50 in a first look (.50 vs .44, log-count cosine over all users).
    """

    name = "user-knn"

    def __init__(self, k: int = 200, sample_size: int = 2000) -> None:
        super().__init__(k, sample_size)

    def _fit(self, train: Interactions, session_start: np.ndarray) -> None:
        super()._fit(train, _user_starts(train))

    def _score_one(self, seq: UserSequence, begin: int, t: int) -> np.ndarray:
        return super()._score_one(seq, 0, t)


class EASE(_Baseline):
    """EASE (Steck, WWW 2019): a full item-item linear model fit in closed form on the binary user x item
    matrix X of training: P = (X'X + l2 I)^-1, B[i, j] = -P[i, j] / P[j, j], B[j, j] = 0. A target scores
    x B, where x marks the items of the user's earlier events (the whole history, not only the session).
    On reddit it ranks the subreddits new to a user best of the scorers here (bench/repeat_explore.py).
    Memory and fitting grow with the square and the cube of the catalogue: catalogues above
    `max_items` are refused rather than left to exhaust the machine.
    """

    name = "ease"

    def __init__(self, l2: float = 300.0, max_items: int = 10_000) -> None:
        if l2 <= 0:
            raise ConfigError(f"{self.name}: l2 must be > 0, got {l2}")
        self.l2, self.max_items = float(l2), int(max_items)

    def _fit(self, train: Interactions, session_start: np.ndarray) -> None:
        n = self.n_items
        if n > self.max_items:
            raise ConfigError(f"{self.name}: {n} items is above max_items={self.max_items} (it inverts an n x n "
                              "matrix, 8 n^2 bytes): leave ease out of the baselines, or raise max_items "
                              "(make_baseline('ease', max_items=...)) where the memory is there")
        users, items, n_users = _training_sessions(train, _user_starts(train))
        gram = _cooccurrence(users, items, n_users, n).to_dense()
        p = torch.linalg.inv(gram + self.l2 * torch.eye(n, dtype=torch.float64))
        b = -p / torch.diagonal(p).unsqueeze(0)
        b.fill_diagonal_(0.0)
        self.weights = b.to(torch.float32).numpy()
        self.base = 1e-6 * self.pop_norm

    def _score_one(self, seq: UserSequence, begin: int, t: int) -> np.ndarray:
        earlier = seq.items[:t]
        earlier = np.unique(earlier[earlier >= 0])
        return self.base + self.weights[earlier].sum(axis=0)


class Markov(_Baseline):
    """First-order transitions: an item scores how often it followed the previous (known) item in
    training, ties and unseen transitions by popularity. With `within_session` only transitions
    inside a session count and the previous item must be in the current session; otherwise the
    user's previous event counts whatever the gap (so session-opening targets get scores too).
    """

    name = "markov"

    def __init__(self, within_session: bool = False) -> None:
        self.within_session = bool(within_session)

    def _fit(self, train: Interactions, session_start: np.ndarray) -> None:
        n = self.n_items
        ok = train.user[1:] == train.user[:-1]
        if self.within_session:
            ok &= ~session_start[1:]
        key = np.unique(train.item[:-1][ok].astype(np.int64) * n + train.item[1:][ok], return_counts=True)
        prev, nxt = key[0] // n, key[0] % n
        self.next_ptr = np.concatenate([[0], np.cumsum(np.bincount(prev, minlength=n))]).astype(np.int64)
        self.next_item, self.next_count = nxt, key[1].astype(np.float64)
        self.base = self.pop / (self.pop.max() + 1.0)

    def _score_one(self, seq: UserSequence, begin: int, t: int) -> np.ndarray:
        row = self.base.copy()
        ctx = seq.items[begin if self.within_session else 0:t]
        ctx = ctx[ctx >= 0]
        if len(ctx):
            p = int(ctx[-1])
            a, b = self.next_ptr[p], self.next_ptr[p + 1]
            row[self.next_item[a:b]] += self.next_count[a:b]
        return row


class UserRepeat(_Baseline):
    """The user's own history: item i scores sum over the user's earlier events e of item i of
    2 ** (-age_e / half_life), age measured to the last event before the target (the request time;
    any common reference time gives the same ranking). Ranked by its log2: the weight itself drops below
    a popularity tie-break of 1e-9 after 30 half-lives, and to 0 after 1,074, which would rank an old item
    of the user's by popularity, or below items the user never saw. Ties by popularity * 1e-9; the items
    outside the history rank below every item in it, by popularity.
    """

    name = "user-repeat"

    def __init__(self, half_life_days: float = 7.0) -> None:
        if half_life_days <= 0:
            raise ConfigError(f"{self.name}: half_life_days must be > 0, got {half_life_days}")
        self.half_life_days = float(half_life_days)

    def _fit(self, train: Interactions, session_start: np.ndarray) -> None:
        self.base = 1e-9 * self.pop_norm

    def _log_history(self, seq: UserSequence, t: int) -> np.ndarray:
        """log2 of each item's summed history weight; -inf for the items outside the history."""
        items, ts = seq.items[:t], seq.ts_ms[:t]
        known = items >= 0
        out = np.full(self.n_items, -np.inf)
        if not known.any():
            return out
        items, age_days = items[known], (ts[t - 1] - ts[known]) / DAY_MS
        log_w = -age_days / self.half_life_days
        np.maximum.at(out, items, log_w)
        # Summed relative to the item's newest event, which weighs 1 there: no weight underflows.
        rel = np.bincount(items, weights=np.exp2(log_w - out[items]), minlength=self.n_items)
        seen = rel > 0
        out[seen] += np.log2(rel[seen])
        return out

    def _ranked(self, log_score: np.ndarray) -> np.ndarray:
        """History items by their log score, ties by popularity; below the lowest of them the rest, by popularity."""
        seen = np.isfinite(log_score)
        floor = log_score[seen].min() if seen.any() else 0.0
        return np.where(seen, log_score + self.base, floor - 2.0 + self.pop_norm)

    def _score_one(self, seq: UserSequence, begin: int, t: int) -> np.ndarray:
        return self._ranked(self._log_history(seq, t))


class UserRepeatSession(UserRepeat):
    """user-repeat plus the current session: item i scores
    user_repeat(i) + session_weight * (events of i in the current session) / (events in the current session),
    i.e. the session's item shares, scaled, ranked by its log2 as user-repeat is. The session events also count
    in user_repeat(i).
    The default weight 3 was the best of 0..10 on the reddit validation split (MRR@20; small effect)."""

    name = "user-repeat+session"

    def __init__(self, half_life_days: float = 7.0, session_weight: float = 3.0) -> None:
        super().__init__(half_life_days)
        if session_weight < 0:
            raise ConfigError(f"{self.name}: session_weight must be >= 0, got {session_weight}")
        self.session_weight = float(session_weight)

    def _score_one(self, seq: UserSequence, begin: int, t: int) -> np.ndarray:
        row = self._log_history(seq, t)
        ctx = seq.items[begin:t]
        ctx = ctx[ctx >= 0]
        if len(ctx) and self.session_weight > 0:
            share = self.session_weight * np.bincount(ctx, minlength=self.n_items) / len(ctx)
            inside = share > 0  # in the history too, as every session event is: finite log scores
            row[inside] = np.logaddexp2(row[inside], np.log2(share[inside]))
        return self._ranked(row)


_REGISTRY: dict[str, Callable[..., _Baseline]] = {
    "pop": Popularity,
    "recent-pop": RecentPopularity,
    "item-knn": ItemKNN,
    "sknn": SessionKNN,
    "user-knn": UserKNN,
    "ease": EASE,
    "markov": Markov,
    "user-repeat": UserRepeat,
    "user-repeat+session": UserRepeatSession,
}
BASELINES: tuple[str, ...] = tuple(_REGISTRY)


def make_baseline(name: str, **params: Any) -> Scorer:
    """A new, unfitted baseline by name; params are its constructor's keyword arguments."""
    if name not in _REGISTRY:
        raise ConfigError(f"unknown baseline {name!r}; known: {', '.join(BASELINES)}")
    try:
        return _REGISTRY[name](**params)
    except TypeError as exc:
        raise ConfigError(f"bad parameters for baseline {name!r}: {exc}") from None


def fit_baselines(names: list[str] | tuple[str, ...], train: Interactions, session_start: np.ndarray,
                  params: dict[str, dict[str, Any]] | None = None) -> dict[str, Scorer]:
    """Make and fit the named baselines, in order: {name: fitted scorer}."""
    params = params or {}
    out: dict[str, Scorer] = {}
    for name in names:
        b = make_baseline(name, **params.get(name, {}))
        b.fit(train, session_start)
        out[name] = b
    return out
