"""Offline evaluation protocols: which events train a model and which ones it is scored on.

Two protocols:

- last-session (the HRNN paper's): each user's last session is the test session; every
  other event trains. Per user this leaks no future: a tested user's training events are all
  older than the test session (other users' training events may be later in wall time, as in
  the paper). Test events whose item never occurs in training are removed from the test
  session (no model can rank them), and test sessions left shorter than
  `min_test_session_len` are dropped from both test and training.
- personalize (Amazon Personalize's): a random 10% of users is held out of training; of each
  held-out user the oldest 90% of events are the input and one ranking after them is scored
  against the set of the remaining (newest) items.

Codes are never compacted: train keeps the full data's vocabularies, so an item code means
the same item in the training data, in the test sequences and in every scorer's output.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from model.errors import ConfigError
from model.interactions import Interactions
from model.scorer import UserSequence
from model.sessions import session_index

LAST_SESSION = "last-session"
PERSONALIZE = "personalize"
PROTOCOLS = (LAST_SESSION, PERSONALIZE)


@dataclass(frozen=True)
class Split:
    protocol: str  # LAST_SESSION or PERSONALIZE
    train: Interactions  # same vocabularies as the full data
    train_starts: np.ndarray  # bool per train row: the row opens a session
    test: list[UserSequence]
    # Per test sequence, one bool per target: the target opens the test session (the "first"
    # slice of last-session; the other targets are the main "rest" slice). All False for personalize.
    target_first: list[np.ndarray]
    # Personalize only: per test sequence, the sorted unique item codes of its held-out events.
    ground_truth: list[np.ndarray] | None = None
    dropped_test_sessions: int = 0  # last-session: test sessions too short after removing unknown items
    dropped_test_events: int = 0  # last-session: test-session events left out (unknown item, or session dropped)
    dropped_users: int = 0  # personalize: held-out users none of whose held-out items occur in training

    @property
    def n_items(self) -> int:
        return self.train.n_items

    @property
    def n_targets(self) -> int:
        return int(sum(len(s.targets) for s in self.test))

    @property
    def n_first_targets(self) -> int:
        return int(sum(int(f.sum()) for f in self.target_first))


def _check_starts(data: Interactions, starts: np.ndarray) -> np.ndarray:
    starts = np.asarray(starts, dtype=bool)
    if starts.shape != (len(data),):
        raise ConfigError(f"session starts have shape {starts.shape}, expected ({len(data)},): "
                          "compute them with model.sessions.session_starts on the same interactions")
    return starts


def _known_items(train: Interactions) -> np.ndarray:
    known = np.zeros(train.n_items, dtype=bool)
    known[train.item] = True
    return known


def _sequence(data: Interactions, rows: np.ndarray, starts: np.ndarray, known: np.ndarray, user: int,
              targets: np.ndarray) -> UserSequence:
    items = data.item[rows].astype(np.int32)
    items = np.where(known[items], items, np.int32(-1)).astype(np.int32)
    return UserSequence(user=int(user), items=items, ts_ms=data.ts_ms[rows].astype(np.int64),
                        event_type=data.event_type[rows].astype(np.int16),
                        session_start=starts[rows].astype(bool), targets=targets.astype(np.int64))


def last_session_split(data: Interactions, starts: np.ndarray, *, min_test_session_len: int = 2,
                       known: np.ndarray | None = None) -> Split:
    """Each user's last session (users with >= 2 sessions) is the test session.

    Targets of a test sequence are all positions of its test session; `target_first` marks the
    session's first event (scored given the user's earlier sessions only). `known` (bool per item): the items
    a model knows, by default those of the training rows; test events of other items are left out.
    """
    if min_test_session_len < 1:
        raise ConfigError(f"min_test_session_len must be >= 1, got {min_test_session_len}")
    starts = _check_starts(data, starts)
    n = len(data)
    if n == 0:
        return Split(LAST_SESSION, data, starts, [], [])
    sess = session_index(starts)
    bounds = data.user_bounds()
    lo, hi = bounds[:-1], bounds[1:]
    last_sess = sess[hi - 1]
    tested = last_sess > sess[lo]  # the user has at least two sessions
    run_len = hi - lo
    row_last = np.repeat(last_sess, run_len)
    row_tested = np.repeat(tested, run_len)
    in_test_session = row_tested & (sess == row_last)

    train_mask = ~in_test_session
    if known is None:
        known = np.zeros(data.n_items, dtype=bool)
        known[data.item[train_mask]] = True
    keep_test = in_test_session & known[data.item]
    # Test sessions that are too short after dropping unknown items leave the data entirely.
    kept_len = np.bincount(sess[keep_test], minlength=int(sess[-1]) + 1)
    long_enough = kept_len[sess] >= min_test_session_len
    keep_test &= long_enough
    dropped = int(np.count_nonzero(tested & (kept_len[last_sess] < min_test_session_len)))

    train = data.subset(train_mask, reindex=False)
    train_starts = starts[train_mask]

    seq_starts = starts.copy()
    test: list[UserSequence] = []
    first: list[np.ndarray] = []
    for k in np.flatnonzero(tested & (kept_len[last_sess] >= min_test_session_len)):
        a, b = int(lo[k]), int(hi[k])
        hist = np.arange(a, b)[train_mask[a:b]]
        tst = np.arange(a, b)[keep_test[a:b]]
        seq_starts[tst[0]] = True  # the first kept event opens the test session even if an unknown one preceded it
        rows = np.concatenate([hist, tst])
        targets = np.arange(len(hist), len(rows))
        test.append(_sequence(data, rows, seq_starts, known, int(data.user[a]), targets))
        f = np.zeros(len(targets), dtype=bool)
        f[0] = True
        first.append(f)
    return Split(LAST_SESSION, train, train_starts, test, first, dropped_test_sessions=dropped,
                 dropped_test_events=int(np.count_nonzero(in_test_session & ~keep_test)))


def validation_split(split: Split, *, min_test_session_len: int = 2) -> Split:
    """The last-session split applied again to a split's training part (for early stopping).

    The returned train is the outer training part minus the validation sessions.
    """
    return last_session_split(split.train, split.train_starts, min_test_session_len=min_test_session_len)


def personalize_split(data: Interactions, starts: np.ndarray, *, holdout_users: float = 0.10,
                      input_share: float = 0.90, seed: int = 0) -> Split:
    """Hold out a random share of users; rank once after each one's oldest `input_share` events.

    Only users with >= 2 events can be held out. A held-out user has floor(input_share * n)
    input events (at least 1, at most n - 1); the rest are ground truth. Ground-truth items
    that never occur in training are removed from the set (no model can rank them); users left
    with an empty set are dropped (they stay out of training). Held-out users get user code -1.
    """
    if not 0.0 < holdout_users < 1.0:
        raise ConfigError(f"holdout_users must be in (0, 1), got {holdout_users}")
    if not 0.0 < input_share < 1.0:
        raise ConfigError(f"input_share must be in (0, 1), got {input_share}")
    starts = _check_starts(data, starts)
    bounds = data.user_bounds() if len(data) else np.zeros(1, dtype=np.int64)
    lo, hi = bounds[:-1], bounds[1:]
    eligible = np.flatnonzero(hi - lo >= 2)
    n_hold = min(len(eligible), int(round(holdout_users * len(lo))))
    rng = np.random.default_rng(seed)
    held = np.sort(rng.choice(eligible, size=n_hold, replace=False)) if n_hold else np.zeros(0, dtype=np.int64)

    held_row = np.zeros(len(data), dtype=bool)
    for k in held:
        held_row[lo[k]:hi[k]] = True
    train_mask = ~held_row
    train = data.subset(train_mask, reindex=False)
    known = _known_items(train)

    test: list[UserSequence] = []
    truth: list[np.ndarray] = []
    dropped = 0
    for k in held:
        a, b = int(lo[k]), int(hi[k])
        n_in = min(max(int(np.floor(input_share * (b - a) + 1e-9)), 1), b - a - 1)
        gt = np.unique(data.item[a + n_in:b])
        gt = gt[known[gt]].astype(np.int32)
        if len(gt) == 0:
            dropped += 1
            continue
        test.append(_sequence(data, np.arange(a, b), starts, known, -1, np.array([n_in])))
        truth.append(gt)
    first = [np.zeros(1, dtype=bool) for _ in test]
    return Split(PERSONALIZE, train, starts[train_mask], test, first, ground_truth=truth, dropped_users=dropped)


def make_split(protocol: str, data: Interactions, starts: np.ndarray, *, seed: int = 0) -> Split:
    """The split for a protocol name (as a CLI flag gives it)."""
    if protocol == LAST_SESSION:
        return last_session_split(data, starts)
    if protocol == PERSONALIZE:
        return personalize_split(data, starts, seed=seed)
    raise ConfigError(f"unknown evaluation protocol {protocol!r}; known: {', '.join(PROTOCOLS)}")
