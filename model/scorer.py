"""What evaluation asks of any recommender, neural or baseline.

A scorer is fitted on training interactions and then, for each user sequence, returns
full-catalogue scores for the events at `targets`: row r scores the event at position
targets[r] given every event before it (and whether that event opens a session, which
the log tells). Higher is better; ties are ranked pessimistically by the evaluator.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol

import numpy as np

from model.interactions import Interactions


@dataclass(frozen=True)
class UserSequence:
    user: int  # code into the training user vocabulary, -1 if the user was not in training
    items: np.ndarray  # int32 item codes of the training catalogue; -1: item unknown to the model
    ts_ms: np.ndarray  # int64
    event_type: np.ndarray  # int16 codes into the training event types
    session_start: np.ndarray  # bool: the event opens a session
    targets: np.ndarray  # int64 positions to score, ascending


class Scorer(Protocol):
    name: str

    def fit(self, train: Interactions, session_start: np.ndarray) -> None: ...

    def score(self, seqs: list[UserSequence]) -> list[np.ndarray]:
        """One float32 array (len(seq.targets), n_items) per sequence."""
        ...
