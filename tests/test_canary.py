"""Which users a canary serves: a stable function of the user, the canary version and the share."""
from __future__ import annotations

from types import SimpleNamespace

import pytest

from stream.canary import Serving, ShareError, check_share, in_canary

USERS = [f"user-{i}" for i in range(20_000)]


def _share_of(version: str, share: float) -> float:
    return sum(in_canary(u, version, share) for u in USERS) / len(USERS)


@pytest.mark.parametrize("share", [0.01, 0.1, 0.5, 0.9])
def test_a_canary_serves_about_its_share_of_the_users(share):
    assert abs(_share_of("v2", share) - share) < 0.01


def test_a_user_stays_on_one_side_and_raising_the_share_only_adds_users():
    at_5 = {u for u in USERS if in_canary(u, "v2", 0.05)}
    assert at_5 == {u for u in USERS if in_canary(u, "v2", 0.05)}
    at_20 = {u for u in USERS if in_canary(u, "v2", 0.20)}
    assert at_5 < at_20


def test_each_canary_version_draws_another_set_of_users():
    a = {u for u in USERS if in_canary(u, "v2", 0.2)}
    b = {u for u in USERS if in_canary(u, "v3", 0.2)}
    overlap = len(a & b) / len(USERS)
    assert abs(overlap - 0.2 * 0.2) < 0.01  # independent draws, not the same users every time


def test_a_share_must_lie_strictly_between_zero_and_one():
    assert check_share(0.3) == 0.3
    for bad in (0.0, 1.0, -0.5, 2.0, float("nan")):
        with pytest.raises(ShareError, match="strictly between 0 and 1"):
            check_share(bad)


def test_serving_splits_items_by_the_version_of_their_user_keeping_order():
    stable, canary = SimpleNamespace(version="v1"), SimpleNamespace(version="v2")
    events = [(u, n) for n in range(3) for u in USERS[:200]]
    groups = Serving(stable, canary, 0.3).split(events, lambda e: e[0])
    assert [m for m, _ in groups] == [stable, canary]
    by_model = {m.version: g for m, g in groups}
    assert sorted(by_model["v1"] + by_model["v2"]) == sorted(events)
    assert all(in_canary(u, "v2", 0.3) for u, _ in by_model["v2"])
    assert not any(in_canary(u, "v2", 0.3) for u, _ in by_model["v1"])
    assert by_model["v2"] == [e for e in events if e in set(by_model["v2"])]  # order kept
    assert Serving(stable).split(events, lambda e: e[0]) == [(stable, events)]
    assert Serving(stable, canary, 0.3).split([], lambda e: e[0]) == []
    assert Serving(stable, canary, 0.3).shares == {"v1": 0.7, "v2": 0.3}


def _comparison(candidate: tuple[float, float], baseline: tuple[float, float], users: int = 500):
    """A canary's comparison on one metric: (value, 95% half width) of each side."""
    from stream.quality import Comparison, Estimate

    side = lambda v: Estimate(v[0], v[1], users * 4, users)  # noqa: E731
    return Comparison("stable", "canary", 0, 3_600_000, 0, {"recall@20": (side(baseline), side(candidate))})


def test_a_canary_that_did_worse_beyond_its_interval_is_ended():
    from stream.canary import decide

    d = decide(_comparison((0.80, 0.01), (0.90, 0.01)), max_loss=0.01, min_users=100)
    assert d.action == "end" and "recall@20" in d.reason


def test_a_canary_is_promoted_only_when_a_loss_above_the_allowed_one_is_ruled_out():
    from stream.canary import decide

    assert decide(_comparison((0.90, 0.005), (0.90, 0.005)), max_loss=0.01, min_users=100).action == "promote"
    wide = decide(_comparison((0.90, 0.03), (0.90, 0.03)), max_loss=0.01, min_users=100)  # no difference shown
    assert wide.action == "wait" and "not ruled out" in wide.reason
    few = decide(_comparison((0.95, 0.001), (0.90, 0.001), users=20), max_loss=0.01, min_users=100)
    assert few.action == "wait" and "20 users on the smaller side, 100 needed" == few.reason
    assert decide(None, max_loss=0.01, min_users=100).action == "wait"
