"""Sessionizing: the offline rule (vectorized, for training and evaluation) is the worker's rule event by event."""
from __future__ import annotations

import numpy as np
import pytest

from model.interactions import Interactions
from model.sessions import is_new_session, session_starts

TIMEOUT_S = 1800


def _events(seed: int, id_share: float) -> list[tuple[str, int, str | None]]:
    """(user, time, session id) of users whose events come minutes or hours apart, in each user's time order;
    a share of the events carry a session id."""
    rng = np.random.default_rng(seed)
    out = []
    for u in range(30):
        t = 0
        for _ in range(int(rng.integers(1, 12))):
            t += int(rng.choice([60, 600, 3 * 3600])) * 1000
            out.append((f"u{u}", t, f"s{int(rng.integers(0, 3))}" if rng.random() < id_share else None))
    return out


def _online_starts(events: list[tuple[str, int, str | None]]) -> dict[tuple[str, int], bool]:
    """As the worker keeps a user's state (model/inference.py _bookkeep): the session's id is the one of the event
    that opened it, or one made up when that event had none."""
    out, prev = {}, None
    for user, ts, sid in events:
        same = prev is not None and prev[0] == user
        session = prev[2] if same else None
        new = out[user, ts] = is_new_session(session, prev[1] if same else None, sid, ts, TIMEOUT_S * 1000)
        prev = (user, ts, (sid or f"{user}-{ts}") if new else session)
    return out


def _offline_starts(events: list[tuple[str, int, str | None]]) -> dict[tuple[str, int], bool]:
    users, ts, sessions = zip(*events)
    data = Interactions.from_columns(list(users), ["i"] * len(ts), list(ts), session_ids=list(sessions))
    starts = session_starts(data, TIMEOUT_S)
    return {(str(data.user_ids[data.user[r]]), int(data.ts_ms[r])): bool(starts[r]) for r in range(len(data))}


@pytest.mark.parametrize("id_share", [0.0, 0.2, 0.5, 0.8, 1.0])
def test_offline_sessions_start_where_the_worker_starts_them_with_without_and_with_some_session_ids(id_share):
    """An event with an id starts a session where the id changes; one without starts one after the timeout gap,
    whatever other events of the log carry (an archive window mixes producers that send ids with ones that don't)."""
    events = _events(seed=int(id_share * 10), id_share=id_share)
    assert _offline_starts(events) == _online_starts(events)


def test_an_event_without_an_id_inside_a_session_neither_ends_it_nor_gives_it_another_id():
    """s1, none, s1 a minute apart are one session for the worker (the session keeps s1); none, s1 are two (the
    session the first opened has an id of the worker's own)."""
    for ids, want in ((["s1", None, "s1"], [True, False, False]), ([None, "s1", "s1"], [True, True, False]),
                      (["s1", None, "s2"], [True, False, True])):
        events = [("u", k * 60_000, sid) for k, sid in enumerate(ids)]
        assert [_offline_starts(events)[e[:2]] for e in events] == want == list(_online_starts(events).values())


def test_one_event_with_a_session_id_does_not_make_other_users_one_session():
    hours = [0, 1, 10, 11, 20]
    data = Interactions.from_columns(["a"] * 5 + ["b"], ["i"] * 6, [h * 3_600_000 for h in hours] + [0],
                                     session_ids=[None] * 5 + ["s1"])
    starts = session_starts(data, TIMEOUT_S)
    assert int(starts[data.user == list(data.user_ids).index("a")].sum()) == 5
