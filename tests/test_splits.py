"""Evaluation protocols: no future in training, test items known to training, Personalize proportions."""
from __future__ import annotations

import numpy as np
import pytest

from model.errors import ConfigError
from model.interactions import Interactions
from model.sessions import session_starts
from model.splits import (LAST_SESSION, PERSONALIZE, last_session_split, make_split, personalize_split,
                          validation_split)

HOUR_MS = 3_600_000


def random_log(seed: int = 0, n_users: int = 60, n_items: int = 40) -> Interactions:
    """Users with 1-5 sessions of 1-6 events, sessions hours apart."""
    rng = np.random.default_rng(seed)
    users, items, ts = [], [], []
    for u in range(n_users):
        t = int(rng.integers(0, 100)) * HOUR_MS
        for _ in range(int(rng.integers(1, 6))):
            for _ in range(int(rng.integers(1, 7))):
                users.append(f"u{u}")
                items.append(f"i{int(rng.zipf(1.5)) % n_items}")
                ts.append(t)
                t += int(rng.integers(1, 600)) * 1000
            t += int(rng.integers(2, 48)) * HOUR_MS
    return Interactions.from_columns(users, items, ts)


def user_rows(data: Interactions, code: int) -> np.ndarray:
    return np.flatnonzero(data.user == code)


@pytest.fixture(scope="module")
def log():
    data = random_log()
    return data, session_starts(data, 1800)


def test_training_events_of_a_tested_user_are_older_than_its_test_session(log):
    data, starts = log
    split = last_session_split(data, starts)
    assert split.protocol == LAST_SESSION and split.test
    for seq in split.test:
        test_start = seq.ts_ms[seq.targets[0]]
        train_ts = split.train.ts_ms[split.train.user == seq.user]
        assert len(train_ts) > 0 and train_ts.max() < test_start


def test_test_items_occur_in_training(log):
    data, starts = log
    split = last_session_split(data, starts)
    known = set(split.train.item.tolist())
    for seq in split.test:
        assert set(seq.items[seq.targets].tolist()) <= known
        assert (seq.items >= 0).all()


def test_the_sequence_is_the_users_history_followed_by_the_test_session(log):
    data, starts = log
    split = last_session_split(data, starts)
    for seq, first in zip(split.test, split.target_first):
        hist = split.train.item[split.train.user == seq.user]
        assert np.array_equal(seq.items[:seq.targets[0]], hist)
        assert np.array_equal(seq.targets, np.arange(seq.targets[0], len(seq.items)))
        assert len(seq.targets) >= 2
        assert first[0] and not first[1:].any()
        assert seq.session_start[seq.targets[0]] and not seq.session_start[seq.targets[1:]].any()


def test_train_keeps_the_full_vocabularies(log):
    data, starts = log
    split = last_session_split(data, starts)
    assert split.train.item_ids is data.item_ids and split.train.user_ids is data.user_ids
    assert split.n_items == data.n_items


def test_single_session_users_are_not_tested_and_train_whole():
    data = Interactions.from_columns(["a", "a", "b", "b", "b", "b"], ["x", "y", "x", "y", "y", "x"],
                                     [0, 1000, 0, 1000, 10 * HOUR_MS, 10 * HOUR_MS + 1000])
    split = last_session_split(data, session_starts(data, 1800))
    a = int(np.flatnonzero(data.user_ids == "a")[0])
    assert [s.user for s in split.test] == [int(np.flatnonzero(data.user_ids == "b")[0])]
    assert (split.train.user == a).sum() == 2


def test_unknown_test_items_are_removed_and_short_sessions_dropped():
    # user b's last session: x, NEW, y -> x, y (NEW occurs nowhere else); user c's last session: NEW2, x -> dropped
    users = ["a"] * 3 + ["b"] * 5 + ["c"] * 4
    items = ["x", "y", "x", "x", "y", "x", "new", "y", "y", "x", "new2", "x"]
    ts = [0, 1000, 2000, 0, 1000, 10 * HOUR_MS, 10 * HOUR_MS + 1, 10 * HOUR_MS + 2,
          0, 1000, 10 * HOUR_MS, 10 * HOUR_MS + 1]
    data = Interactions.from_columns(users, items, ts)
    split = last_session_split(data, session_starts(data, 1800))
    names = [data.user_ids[s.user] for s in split.test]
    assert names == ["b"]
    b = split.test[0]
    assert [data.item_ids[i] for i in b.items[b.targets]] == ["x", "y"]
    assert split.dropped_test_sessions == 1
    assert not np.isin(split.train.item, np.flatnonzero(np.isin(data.item_ids, ["new", "new2"]))).any()


def test_a_longer_minimum_test_session_keeps_fewer_sessions(log):
    data, starts = log
    short, long_ = last_session_split(data, starts), last_session_split(data, starts, min_test_session_len=4)
    assert len(long_.test) < len(short.test)
    assert all(len(s.targets) >= 4 for s in long_.test)


def test_validation_split_holds_out_the_last_training_session(log):
    data, starts = log
    outer = last_session_split(data, starts)
    val = validation_split(outer)
    assert len(val.train) + val.n_targets <= len(outer.train)
    for seq in val.test:
        outer_ts = outer.train.ts_ms[outer.train.user == seq.user]
        assert seq.ts_ms[seq.targets[-1]] == outer_ts.max()
        assert val.train.ts_ms[val.train.user == seq.user].max() < seq.ts_ms[seq.targets[0]]


def test_personalize_holds_out_a_tenth_of_users_with_their_newest_tenth(log):
    data, starts = log
    split = personalize_split(data, starts, seed=1)
    assert split.protocol == PERSONALIZE
    n_held = len(split.test) + split.dropped_users
    assert n_held == round(0.10 * data.n_users)
    held_users = set(range(data.n_users)) - set(np.unique(split.train.user).tolist())
    assert len(held_users) == n_held
    known = set(split.train.item.tolist())
    for seq, truth in zip(split.test, split.ground_truth):
        n = len(seq.items)
        (t,) = seq.targets
        assert t == min(max(int(np.floor(0.9 * n + 1e-9)), 1), n - 1)
        assert seq.user == -1 and len(truth) > 0 and set(truth.tolist()) <= known
        assert set(truth.tolist()) <= set(seq.items[t:].tolist())


def test_personalize_proportions_follow_the_arguments(log):
    data, starts = log
    split = personalize_split(data, starts, holdout_users=0.3, input_share=0.5, seed=2)
    assert len(split.test) + split.dropped_users == round(0.3 * data.n_users)
    for seq in split.test:
        assert seq.targets[0] == min(max(len(seq.items) // 2, 1), len(seq.items) - 1)


def test_personalize_is_reproducible_by_seed(log):
    data, starts = log
    one, again, other = (personalize_split(data, starts, seed=s) for s in (5, 5, 6))
    def held(sp):  # held-out users are absent from training
        return set(range(data.n_users)) - set(np.unique(sp.train.user).tolist())
    assert held(one) == held(again)
    assert held(one) != held(other)


def test_bad_protocol_arguments_are_config_errors(log):
    data, starts = log
    with pytest.raises(ConfigError, match="holdout_users"):
        personalize_split(data, starts, holdout_users=1.5)
    with pytest.raises(ConfigError, match="input_share"):
        personalize_split(data, starts, input_share=0)
    with pytest.raises(ConfigError, match="session starts"):
        last_session_split(data, starts[:-1])
    with pytest.raises(ConfigError, match="last-session"):
        make_split("leave-one-out", data, starts)


def test_reddit_last_session_split_has_no_future_leakage(reddit_path):
    from model.loaders import load_interactions

    data = load_interactions(reddit_path, columns={"USER_ID": "0", "ITEM_ID": "1", "TIMESTAMP": "2"}, time_unit="s")
    split = last_session_split(data, session_starts(data, 1800))
    assert len(split.test) > 1000
    last_train = np.full(data.n_users, -1, dtype=np.int64)
    np.maximum.at(last_train, split.train.user, split.train.ts_ms)
    test_start = np.array([s.ts_ms[s.targets[0]] for s in split.test])
    assert (last_train[[s.user for s in split.test]] < test_start).all()
    assert len(split.train) + split.n_targets <= len(data)
