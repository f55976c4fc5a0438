"""Featurization: type filter, repeat collapsing, item support, history-length percentiles (training only)."""
from __future__ import annotations

import numpy as np
import pytest

from model.config import DataConfig
from model.featurize import event_weights, featurize, learning_users
from model.interactions import Interactions
from model.loaders import load_interactions

MIN = 60_000  # one minute in ms


def users_with_lengths(lengths: list[int]) -> Interactions:
    """User k has lengths[k] events, each of a distinct item, one minute apart."""
    users, items, ts = [], [], []
    for u, n in enumerate(lengths):
        for j in range(n):
            users.append(f"u{u:03d}")
            items.append(f"i{j:03d}")
            ts.append(j * MIN)
    return Interactions.from_columns(users, items, ts)


def kept_users(data: Interactions) -> set[str]:
    return set(data.user_ids.tolist())


def learners(out: Interactions, report) -> set[str]:
    return set(out.user_ids[learning_users(out, report)].tolist())


def test_max_percentile_keeps_the_longest_one_percent_of_users_out_of_training_not_out_of_the_log():
    lengths = list(range(1, 101))  # user k has k+1 events
    data = users_with_lengths(lengths)
    out, report = featurize(data, DataConfig(max_user_history_length_percentile=0.99))
    assert len(out) == len(data) and kept_users(out) == kept_users(data)  # evaluations still see u099
    assert kept_users(out) - learners(out, report) == {"u099"}
    assert (report.history_users_out, report.history_events_out) == (1, 100)
    assert "-100 events, -1 users kept out of training" in str(report)


@pytest.mark.parametrize("n", [2, 5, 10, 50, 99])
def test_a_percentile_whose_share_is_less_than_one_user_keeps_nobody_out_of_training(n):
    """The interpolated 0.99 quantile lies below a unique maximum: 5 users lost their longest one (20%, not 1%)."""
    data = users_with_lengths(list(range(1, n + 1)))
    out, report = featurize(data, DataConfig(min_user_history_length_percentile=0.01,
                                             max_user_history_length_percentile=0.99))
    assert report.history_users_out == 0 and learning_users(out, report).all()


@pytest.mark.parametrize("n, low, high", [(10, 0.0, 0.9), (5, 0.0, 0.8), (10, 0.1, 1.0), (100, 0.0, 0.99)])
def test_a_percentile_whose_share_is_exactly_one_user_keeps_that_user_out_of_training(n, low, high):
    data = users_with_lengths(list(range(1, n + 1)))
    _, report = featurize(data, DataConfig(min_user_history_length_percentile=low,
                                           max_user_history_length_percentile=high))
    assert report.history_users_out == 1


def test_training_refused_for_want_of_a_next_event_names_the_percentiles_when_they_kept_users_out():
    from model.errors import DataError
    from model.pipeline import fit_inputs

    # 199 users of one event, and one of two sessions: the only one with a next event is the longest 1%
    users = [f"u{u:03d}" for u in range(199)] + ["long"] * 6
    times = [0] * 199 + [0, MIN, 2 * MIN, 3 * 3600_000, 3 * 3600_000 + MIN, 3 * 3600_000 + 2 * MIN]
    data = Interactions.from_columns(users, [f"i{j % 3}" for j in range(len(users))], times)
    with pytest.raises(DataError, match="percentiles kept 1 user"):
        fit_inputs(data, DataConfig(), "last-session", seed=0)
    assert fit_inputs(data, DataConfig(max_user_history_length_percentile=1.0), "last-session", seed=0)


def test_min_percentile_zero_keeps_short_users_and_min_percentile_keeps_the_shortest_out_of_training():
    data = users_with_lengths(list(range(1, 101)))
    out, report = featurize(data, DataConfig(min_user_history_length_percentile=0.0,
                                             max_user_history_length_percentile=1.0))
    assert len(out) == len(data) and learners(out, report) == kept_users(data)
    out, report = featurize(data, DataConfig(min_user_history_length_percentile=0.05,
                                             max_user_history_length_percentile=1.0))
    assert kept_users(out) - learners(out, report) == {f"u{k:03d}" for k in range(5)}
    assert report.min_user_events > 5


def test_equal_history_lengths_keep_nobody_out_of_training():
    data = users_with_lengths([7] * 50)
    out, report = featurize(data, DataConfig(min_user_history_length_percentile=0.1,
                                             max_user_history_length_percentile=0.9))
    assert len(out) == len(data) and learning_users(out, report).all()
    assert report.users_after == report.users_before == 50 and report.history_users_out == 0


def test_min_item_support_drops_rare_items_and_users_left_with_nothing():
    data = Interactions.from_columns(
        ["a", "a", "b", "b", "c"], ["x", "y", "x", "y", "rare"], [0, MIN, 0, MIN, 0])
    out, report = featurize(data, DataConfig(min_item_support=2, max_user_history_length_percentile=1.0))
    assert set(out.item_ids.tolist()) == {"x", "y"}
    step = report.dropped("min_item_support")
    assert (step.events_dropped, step.items_dropped, step.users_dropped) == (1, 1, 1)
    assert "c" not in kept_users(out)


def test_collapse_repeats_merges_consecutive_same_item_within_a_session_only():
    gap = 2 * 3600 * 1000  # two hours: a new session
    data = Interactions.from_columns(
        ["a"] * 6, ["x", "x", "y", "x", "x", "x"], [0, MIN, 2 * MIN, 3 * MIN, 4 * MIN, 4 * MIN + gap],
        event_types=["click"] * 6)
    out, report = featurize(data, DataConfig(collapse_repeats=True, max_user_history_length_percentile=1.0))
    assert list(out.item_ids[out.item]) == ["x", "y", "x", "x"]  # the x after the gap opens a new session
    assert report.dropped("collapse_repeats").events_dropped == 2
    off, _ = featurize(data, DataConfig(collapse_repeats=False, max_user_history_length_percentile=1.0))
    assert len(off) == 6


def test_collapse_repeats_keeps_a_purchase_after_a_click_of_the_same_item():
    data = Interactions.from_columns(["a"] * 3, ["x", "x", "x"], [0, MIN, 2 * MIN],
                                     event_types=["click", "purchase", "purchase"])
    out, _ = featurize(data, DataConfig(collapse_repeats=True, max_user_history_length_percentile=1.0))
    assert [out.event_types[t] for t in out.event_type] == ["click", "purchase"]


def test_collapse_repeats_in_whole_history_mode_ignores_gaps():
    data = Interactions.from_columns(["a"] * 2, ["x", "x"], [0, 10 * 86400 * 1000])
    out, _ = featurize(data, DataConfig(collapse_repeats=True, whole_history_session=True,
                                        max_user_history_length_percentile=1.0))
    assert len(out) == 1


def test_event_type_filter_keeps_only_the_listed_types():
    data = Interactions.from_columns(["a", "a", "a", "b"], ["x", "y", "z", "x"], [0, 1, 2, 3],
                                     event_types=["click", "purchase", "view", "view"])
    out, report = featurize(data, DataConfig(event_types=("click", "purchase", "not-in-data"),
                                             max_user_history_length_percentile=1.0))
    assert sorted(out.event_types[t] for t in out.event_type) == ["click", "purchase"]
    step = report.dropped("event_types")
    assert (step.events_dropped, step.users_dropped, step.items_dropped) == (2, 1, 1)


def test_report_counts_add_up_on_real_data(reddit_path):
    data = load_interactions(reddit_path, columns={"USER_ID": "0", "ITEM_ID": "1", "TIMESTAMP": "2"})
    cfg = DataConfig(collapse_repeats=True, min_item_support=5, min_user_history_length_percentile=0.05)
    out, report = featurize(data, cfg)
    assert report.events_before == len(data) and report.events_after == len(out)
    assert report.events_before - sum(s.events_dropped for s in report.steps) == report.events_after
    assert report.users_before - sum(s.users_dropped for s in report.steps) == report.users_after == out.n_users
    assert report.items_before - sum(s.items_dropped for s in report.steps) == report.items_after == out.n_items
    assert all(s.events_dropped > 0 for s in report.steps if s.step != "event_types")
    counts = np.bincount(out.user)[learning_users(out, report)]
    assert counts.min() >= report.min_user_events and counts.max() <= report.max_user_events
    assert report.history_users_out == out.n_users - len(counts) > 0
    text = str(report)
    assert str(len(data)) in text and "collapse_repeats" in text and len(report.lines()) == len(report.steps) + 2


def test_event_weights_follow_the_config_and_default_to_one():
    data = Interactions.from_columns(["a", "a", "b"], ["x", "y", "x"], [0, 1, 2],
                                     event_types=["click", "purchase", "view"])
    w = event_weights(data, DataConfig(event_type_weights={"purchase": 3.0, "view": 0.5}))
    assert w.dtype == np.float32
    by_type = {data.event_types[t]: float(x) for t, x in zip(data.event_type, w)}
    assert by_type == pytest.approx({"click": 1.0, "purchase": 3.0, "view": 0.5})


def _clicks_and_purchases() -> Interactions:
    return Interactions.from_columns(["a", "a", "b", "b"], ["x", "y", "x", "z"], [0, 1, 2, 3],
                                     event_types=["click", "purchase", "click", "purchase"])


@pytest.mark.parametrize("cfg, setting", [(DataConfig(event_type_weights={"purchse": 5.0}), "event_type_weights"),
                                          (DataConfig(event_types=("click", "purchse")), "event_types")])
def test_an_event_type_name_no_event_has_is_warned_about_naming_it_the_data_types_and_the_close_match(
        cfg, setting, caplog):
    with caplog.at_level("WARNING", logger="model.featurize"):
        out, report = featurize(_clicks_and_purchases(), cfg)
    want = (f"{setting} names event type 'purchse', which no event of the data has (did you mean 'purchase'?): "
            "it matches nothing (the data's types: click, purchase)")
    assert [r.getMessage() for r in caplog.records] == [want]
    assert report.warnings == (want,) and f"  warning: {want}" in report.lines()
    assert len(out) == (4 if setting == "event_type_weights" else 2)  # a warning, not a refusal


def test_event_type_names_that_all_match_warn_of_nothing(caplog):
    cfg = DataConfig(event_types=("click", "purchase"), event_type_weights={"purchase": 5.0})
    with caplog.at_level("WARNING", logger="model.featurize"):
        _, report = featurize(_clicks_and_purchases(), cfg)
    assert not caplog.records and report.warnings == () and not any("warning" in line for line in report.lines())
