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
        if data.session_key is not None:  # an event with an id starts a session where the id changes (is_new_session)
            key = data.session_key
            boundary = np.where(key[1:] >= 0, key[1:] != key[:-1], boundary)
    starts[1:] = ~same_user | boundary
    return starts


def session_index(starts: np.ndarray) -> np.ndarray:
    """Global session number of each row (0, 0, 1, 1, 1, 2, ...)."""
    return np.cumsum(starts) - 1
