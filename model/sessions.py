"""Sessionizing: one rule, used offline (vectorized) and online (per event).

A new session starts at a user's first event, when an explicit session id changes, or
when the gap since the user's previous event exceeds `session_timeout`. In whole-history
mode a user has one session. Time never moves backwards: a late event (earlier than the
last seen) is treated as a zero gap.
"""
from __future__ import annotations

import numpy as np

from model.interactions import Interactions


def is_new_session(prev_session_id: str | None, prev_ts_ms: int | None, session_id: str | None,
                   ts_ms: int, timeout_ms: int, whole_history: bool = False) -> bool:
    """The online rule for one event given the user's previous one (None: the user is new)."""
    if prev_ts_ms is None:
        return True
    if whole_history:
        return False
    if session_id is not None:
        return session_id != prev_session_id
    return ts_ms - prev_ts_ms > timeout_ms


def session_starts(data: Interactions, timeout_s: float, whole_history: bool = False) -> np.ndarray:
    """Boolean array: row i starts a session (rows are sorted by user, time)."""
    n = len(data)
    starts = np.ones(n, dtype=bool)
    if n == 0:
        return starts
    same_user = data.user[1:] == data.user[:-1]
    if whole_history:
        boundary = np.zeros(n - 1, dtype=bool)
    else:
        boundary = np.diff(data.ts_ms) > int(timeout_s * 1000)
        if data.session_key is not None:
            boundary = _id_boundaries(data.session_key, ~same_user | boundary)
    starts[1:] = ~same_user | boundary
    return starts


def _id_boundaries(key: np.ndarray, by_gap: np.ndarray) -> np.ndarray:
    """Where rows 1.. start a session given session-id codes (-1: the event has none) and where the user or the
    time gap would start one. As the worker does (is_new_session against the state's session id): an event with
    an id starts one when its id differs from the id of the session it would join, which is the id of the event
    that opened it, or one no event has (the worker makes one up) when that event had none; an event without an
    id starts one by the gap, and otherwise keeps the session's id."""
    n = len(key)
    has = key >= 0
    opens_without = ~has & np.concatenate(([True], by_gap))  # events without an id that open a session
    session_key = np.where(has, key, -2 - np.arange(n))  # a key of its own for each session such an event opens
    known = has | opens_without
    carried = session_key[np.maximum.accumulate(np.where(known, np.arange(n), 0))]  # the key the session has
    return np.where(has[1:], key[1:] != carried[:-1], by_gap)


def session_index(starts: np.ndarray) -> np.ndarray:
    """Global session number of each row (0, 0, 1, 1, 1, 2, ...)."""
    return np.cumsum(starts) - 1
