"""Baselines on small hand-made logs: each follows the signal it is named after, sees no future."""
from __future__ import annotations

import numpy as np
import pytest

from model.baselines import BASELINES, fit_baselines, make_baseline
from model.errors import ConfigError
from model.interactions import Interactions
from model.scorer import UserSequence
from model.sessions import session_starts

MIN_MS = 60_000
HOUR_MS = 60 * MIN_MS
DAY_MS = 24 * HOUR_MS


def build(events: list[tuple[str, str, int]]) -> tuple[Interactions, np.ndarray]:
    """events: (user, item, ts_ms)."""
    u, i, t = zip(*events)
    data = Interactions.from_columns(list(u), list(i), list(t))
    return data, session_starts(data, 1800)


def code(data: Interactions, item: str) -> int:
    return int(np.flatnonzero(data.item_ids == item)[0])


def sequence(data: Interactions, items: list[str], ts: list[int], *, user: int = -1) -> UserSequence:
    """A sequence of known (or '?' = unknown) items; the target is one event after the last, 1 minute later."""
    codes = [code(data, x) if x != "?" else -1 for x in items] + [0]
    times = list(ts) + [ts[-1] + MIN_MS]
    gaps = np.diff(np.array(times))
    starts = np.concatenate([[True], gaps > 30 * MIN_MS])
    return UserSequence(user=user, items=np.array(codes, dtype=np.int32), ts_ms=np.array(times, dtype=np.int64),
                        event_type=np.zeros(len(codes), dtype=np.int16), session_start=starts,
                        targets=np.array([len(codes) - 1]))


def ranking(scorer, seq: UserSequence, data: Interactions) -> list[str]:
    (scores,) = scorer.score([seq])
    return [data.item_ids[j] for j in np.argsort(-scores[0], kind="stable")]


def fitted(name: str, data: Interactions, starts: np.ndarray, **params):
    """A baseline made by name and fitted on the log (data, starts)."""
    sc = make_baseline(name, **params)
    sc.fit(data, starts)
    return sc


def background() -> list[tuple[str, str, int]]:
    """Other users: 'pop' is the most popular item; sessions {a, b, c} and {d, e, f}; a -> b transitions."""
    ev = []
    for k in range(30):
        ev += [(f"p{k}", "pop", k * DAY_MS), (f"p{k}", "pop", k * DAY_MS + MIN_MS)]
    for k in range(5):
        t = k * DAY_MS + 2 * HOUR_MS
        ev += [(f"s{k}", "a", t), (f"s{k}", "b", t + MIN_MS), (f"s{k}", "c", t + 2 * MIN_MS)]
        ev += [(f"t{k}", "d", t), (f"t{k}", "e", t + MIN_MS), (f"t{k}", "f", t + 2 * MIN_MS), (f"t{k}", "g", t + 3 * MIN_MS)]
    return ev


@pytest.fixture(scope="module")
def bg():
    return build(background())


def test_pop_ranks_the_most_frequent_item_first(bg):
    data, starts = bg
    pop = fitted("pop", data, starts)
    assert ranking(pop, sequence(data, ["d"], [0]), data)[0] == "pop"


def test_recent_pop_prefers_what_was_popular_lately():
    ev = [(f"old{k}", "x", 0) for k in range(10)] + [(f"new{k}", "y", 10 * DAY_MS) for k in range(3)]
    data, starts = build(ev)
    recent, pop = fitted("recent-pop", data, starts, days=2), fitted("pop", data, starts)
    seq = sequence(data, ["x"], [11 * DAY_MS])
    assert ranking(recent, seq, data)[0] == "y" and ranking(pop, seq, data)[0] == "x"


def test_user_repeat_ranks_the_users_recent_item_first(bg):
    data, starts = build(background() + [("me", "a", 0), ("me", "e", 30 * DAY_MS)])
    ur = fitted("user-repeat", data, starts)
    seq = sequence(data, ["a", "a", "a", "e"], [0, MIN_MS, 2 * MIN_MS, 20 * DAY_MS])
    assert ranking(ur, seq, data)[:2] == ["e", "a"]


def test_user_repeat_half_life_trades_frequency_against_recency(bg):
    data, starts = bg
    seq = sequence(data, ["a", "a", "a", "e"], [0, MIN_MS, 2 * MIN_MS, 20 * DAY_MS])
    short = fitted("user-repeat", data, starts, half_life_days=7)
    long_ = fitted("user-repeat", data, starts, half_life_days=100)
    assert ranking(short, seq, data)[0] == "e"  # 1 vs 3 * 2^(-20/7) = 0.41
    assert ranking(long_, seq, data)[0] == "a"  # 1 vs 3 * 2^(-20/100) = 2.6


def test_user_repeat_ranks_unseen_items_by_popularity(bg):
    data, starts = bg
    ur = fitted("user-repeat", data, starts)
    assert ranking(ur, sequence(data, ["e"], [0]), data)[:2] == ["e", "pop"]


@pytest.mark.parametrize("name", ["user-repeat", "user-repeat+session"])
@pytest.mark.parametrize("days", [300, 8000])
def test_user_repeat_ranks_the_users_old_items_above_unseen_ones_and_by_recency_however_old(name, days):
    """At a 7-day half-life, 300 days make a weight 2^-43, under a popularity tie-break of 1e-9; 8000 days
    make it 0 in float64. Still: the user's items by recency, then the items the user never saw."""
    data, starts = build(background() + [(f"q{k}", "b", k * DAY_MS) for k in range(10)])  # b: 15 events, a: 5
    seq = sequence(data, ["b", "a", "e"], [0, 20 * DAY_MS, days * DAY_MS])
    assert ranking(fitted(name, data, starts), seq, data)[:4] == ["e", "a", "b", "pop"]


def test_the_popularity_tie_break_survives_between_close_popularities():
    ev = background() + [("solo", "z", 3 * HOUR_MS)]  # z one event more popular than y
    for k in range(5):
        t = k * DAY_MS + 5 * HOUR_MS
        ev += [(f"x{k}", "x", t), (f"x{k}", "y", t + MIN_MS), (f"x{k}", "z", t + 2 * MIN_MS)]
    data, starts = build(ev)
    for name in ("sknn", "user-knn"):  # y and z share every neighbour session: equal similarity sums
        (scores,) = fitted(name, data, starts).score([sequence(data, ["x"], [40 * DAY_MS])])
        assert scores[0, code(data, "z")] > scores[0, code(data, "y")], name


def test_the_popularity_tie_break_never_reorders_two_different_similarities():
    """sim(L, X) = 1/sqrt(10000) exceeds sim(L, Y) = 1/sqrt(10001) by 5e-7, less than a 1e-6 popularity term could
    add to Y (three times as popular)."""
    users, items = ["u0"] * 3, ["L", "X", "Y"]
    for k in range(9999):
        users.append(f"x{k}"), items.append("X")
    for k in range(10000):
        users += [f"y{k}"] * 3
        items += ["Y"] * 3
    train = Interactions.from_columns(users, items, np.arange(len(users)) * 1000)
    knn = make_baseline("item-knn")
    knn.fit(train, session_starts(train, 1800))
    code = {n: i for i, n in enumerate(train.item_ids)}
    seq = UserSequence(0, np.array([code["L"], code["X"]], np.int32), np.array([0, 1000]), np.zeros(2, np.int16),
                       np.array([True, False]), np.array([1]))
    scores = knn.score([seq])[0][0]
    assert scores[code["X"]] > scores[code["Y"]]


def test_session_term_lifts_the_current_sessions_items(bg):
    data, starts = bg
    # history: a twice a day ago; current session: c once
    seq = sequence(data, ["a", "a", "c"], [0, MIN_MS, DAY_MS])
    ur, urs = fitted("user-repeat", data, starts), fitted("user-repeat+session", data, starts, session_weight=3.0)
    assert ranking(ur, seq, data)[0] == "a"
    assert ranking(urs, seq, data)[0] == "c"


def test_markov_follows_transitions(bg):
    data, starts = bg
    mk = fitted("markov", data, starts)
    assert ranking(mk, sequence(data, ["d", "a"], [0, MIN_MS]), data)[0] == "b"
    assert ranking(mk, sequence(data, ["a", "d"], [0, MIN_MS]), data)[0] == "e"


def test_markov_backs_off_to_popularity(bg):
    data, starts = bg
    mk = fitted("markov", data, starts)
    # g was never followed by anything
    assert ranking(mk, sequence(data, ["g"], [0]), data)[0] == "pop"


def test_unknown_items_are_skipped_as_inputs(bg):
    data, starts = bg
    for name in BASELINES:
        sc = fitted(name, data, starts)
        with_unknown = sc.score([sequence(data, ["d", "a", "?"], [0, MIN_MS, 2 * MIN_MS])])[0]
        without = sc.score([sequence(data, ["d", "a"], [0, MIN_MS])])[0]
        assert np.argmax(with_unknown) == np.argmax(without), name
    mk = fitted("markov", data, starts)
    assert ranking(mk, sequence(data, ["a", "?"], [0, MIN_MS]), data)[0] == "b"


def test_sknn_finds_the_similar_session(bg):
    data, starts = bg
    sk = fitted("sknn", data, starts, k=3, sample_size=50)
    r = ranking(sk, sequence(data, ["d", "e"], [0, MIN_MS]), data)
    assert set(r[:4]) == {"d", "e", "f", "g"}
    assert r.index("f") < r.index("a") and r.index("g") < r.index("pop")


def test_user_knn_follows_the_users_whole_history_where_sknn_sees_only_the_session(bg):
    data, starts = bg
    seq = sequence(data, ["d", "e"], [0, 2 * DAY_MS])
    opening = UserSequence(seq.user, seq.items, np.array([0, 2 * DAY_MS, 3 * DAY_MS]), seq.event_type,
                           np.array([True, True, True]), seq.targets)  # the target opens a third session
    uk = fitted("user-knn", data, starts, k=3)
    r = ranking(uk, opening, data)
    assert set(r[:4]) == {"d", "e", "f", "g"}  # users who had d and e also had f and g
    sk = fitted("sknn", data, starts)
    assert ranking(sk, opening, data)[0] == "pop"  # no current session: sknn falls back to popularity
    with pytest.raises(ConfigError, match="user-knn: k"):
        make_baseline("user-knn", k=0)


def test_ease_ranks_the_items_that_go_with_the_users_items_across_users_first(bg):
    data, starts = bg
    ease = fitted("ease", data, starts)
    r = ranking(ease, sequence(data, ["d", "e"], [0, 2 * DAY_MS]), data)
    new = [x for x in r if x not in ("d", "e")]
    assert set(new[:2]) == {"f", "g"}  # every user with d and e also had f and g
    assert new.index("f") < new.index("pop") and new.index("g") < new.index("a")


def test_ease_refuses_a_catalogue_above_max_items_and_a_non_positive_l2(bg):
    data, starts = bg
    with pytest.raises(ConfigError, match="max_items=3"):
        make_baseline("ease", max_items=3).fit(data, starts)
    with pytest.raises(ConfigError, match="l2 must be > 0"):
        make_baseline("ease", l2=0)


def test_item_knn_scores_items_that_share_sessions_with_the_last_item(bg):
    data, starts = bg
    knn = fitted("item-knn", data, starts)
    r = ranking(knn, sequence(data, ["d", "a"], [0, MIN_MS]), data)
    assert set(r[:3]) == {"a", "b", "c"}  # always together: cosine 1, itself included
    no_self = fitted("item-knn", data, starts, exclude_self=True)
    assert set(ranking(no_self, sequence(data, ["a"], [0]), data)[:2]) == {"b", "c"}


def test_session_only_baselines_fall_back_to_popularity_when_a_session_opens(bg):
    data, starts = bg
    seq = sequence(data, ["a", "b"], [0, MIN_MS])
    opening = UserSequence(seq.user, seq.items, np.array([0, MIN_MS, 5 * HOUR_MS]), seq.event_type,
                           np.array([True, False, True]), seq.targets)
    for name in ("item-knn", "sknn"):
        sc = fitted(name, data, starts)
        assert ranking(sc, opening, data)[0] == "pop", name


def test_scores_use_only_events_before_the_target(bg):
    data, starts = bg
    seq = sequence(data, ["d", "a", "b"], [0, MIN_MS, 2 * MIN_MS])
    seq = UserSequence(seq.user, seq.items[:3], seq.ts_ms[:3], seq.event_type[:3], seq.session_start[:3],
                       np.array([1, 2]))
    changed = UserSequence(seq.user, np.array([seq.items[0], code(data, "g"), code(data, "e")], dtype=np.int32),
                           seq.ts_ms + np.array([0, 0, 9 * HOUR_MS]), seq.event_type, seq.session_start,
                           seq.targets)
    for name in BASELINES:
        sc = fitted(name, data, starts)
        a, b = sc.score([seq])[0], sc.score([changed])[0]
        assert np.array_equal(a[0], b[0]), name  # row 0 sees only position 0, which is identical


def test_scores_are_full_catalogue_and_deterministic(bg):
    data, starts = bg
    seqs = [sequence(data, ["a", "b", "c"], [0, MIN_MS, 2 * MIN_MS]), sequence(data, ["e"], [0])]
    for name, sc in fit_baselines(BASELINES, data, starts).items():
        first, again = sc.score(seqs), sc.score(seqs)
        assert [x.shape for x in first] == [(1, data.n_items)] * 2, name
        assert all(np.issubdtype(x.dtype, np.floating) for x in first), name
        assert all(np.array_equal(x, y) for x, y in zip(first, again)), name


def test_unknown_baseline_names_and_parameters_are_config_errors():
    with pytest.raises(ConfigError, match="known: pop, recent-pop"):
        make_baseline("gru4rec")
    with pytest.raises(ConfigError, match="sknn"):
        make_baseline("sknn", neighbours=3)
    with pytest.raises(ConfigError, match="half_life_days"):
        make_baseline("user-repeat", half_life_days=0)


def test_scoring_before_fitting_is_a_config_error(bg):
    data, _ = bg
    with pytest.raises(ConfigError, match="fit"):
        make_baseline("pop").score([sequence(data, ["a"], [0])])
