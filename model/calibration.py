"""Rank calibration of the repeat head: the window offset that maximizes validation MRR@20.

Training maximizes likelihood; the product is judged by the top of a ranking. A network that
keeps some probability on new items for every user ranks a few of them above the user's own
items, which cross-entropy rewards and MRR@20 does not. One constant added to the scores of the
user's last-H items (RepeatHead.window_offset) moves that border; it is read off the validation
sessions the early stopping already uses, never the test events, and 0 stays in the grid, so a
log where new items deserve their place keeps the network as trained.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from model.network import HRNN
from model.train import Validator

OFFSET_GRID: tuple[float, ...] = (0.0, 0.5, 1.0, 2.0, 4.0, 8.0)
METRIC = "mrr@20"


@dataclass(frozen=True)
class Calibration:
    window_offset: float
    table: dict[float, dict[str, float]]  # per offset: the validator's metrics

    @property
    def chosen(self) -> tuple[float, float]:
        """(offset, its validation MRR@20)."""
        return self.window_offset, self.table[self.window_offset][METRIC]

    @property
    def uncalibrated(self) -> float:
        """The validation MRR@20 of the network as trained (offset 0)."""
        return self.table[0.0][METRIC]

    def to_json(self) -> dict:
        return {"window_offset": self.window_offset, "metric": f"val_{METRIC}",
                "grid": [{"window_offset": c, **m} for c, m in self.table.items()]}


def set_window_offset(model: HRNN, offset: float) -> None:
    if model.repeat is None:
        raise ValueError("only a network with the repeat head has a window offset")
    model.repeat.window_offset.fill_(float(offset))


def calibrate_window_offset(model: HRNN, validate: Validator, grid: tuple[float, ...] = OFFSET_GRID
                            ) -> Calibration:
    """Validate `model` at each offset of `grid`; leaves it at the best (the smallest of equals)."""
    table = {}
    with torch.no_grad():
        for c in grid:
            set_window_offset(model, c)
            table[c] = validate(model)
    best = max(grid, key=lambda c: (table[c][METRIC], -c))
    set_window_offset(model, best)
    return Calibration(best, table)
