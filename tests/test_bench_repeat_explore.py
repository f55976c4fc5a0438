"""bench/repeat_explore.py sorts each main-slice target into the kind of repeat it is (or new)."""
import importlib.util
from pathlib import Path

import numpy as np

from model.scorer import UserSequence

_PATH = Path(__file__).resolve().parents[1] / "bench" / "repeat_explore.py"
_SPEC = importlib.util.spec_from_file_location("repeat_explore", _PATH)
repeat_explore = importlib.util.module_from_spec(_SPEC)
_SPEC.loader.exec_module(repeat_explore)


def _seq(items: list[int], test_from: int) -> UserSequence:
    n = len(items)
    starts = np.zeros(n, dtype=bool)
    starts[[0, test_from]] = True
    return UserSequence(user=0, items=np.array(items, dtype=np.int32), ts_ms=np.arange(n, dtype=np.int64) * 1000,
                        event_type=np.zeros(n, dtype=np.int16), session_start=starts,
                        targets=np.arange(test_from, n, dtype=np.int64))


def test_each_target_after_the_first_is_a_stay_a_session_a_history_or_a_new_item():
    # earlier session: 7, 8; test session: 9 (session-first, not classified), 9, 7, 9, 5, 8, 8
    seq = _seq([7, 8, 9, 9, 7, 9, 5, 8, 8], test_from=2)
    kinds = repeat_explore.target_kinds([seq])
    names = [repeat_explore.KINDS[k] for k in kinds]
    assert names == ["stay", "history", "session", "new", "history", "stay"]


def test_kinds_line_up_with_the_ranks_of_the_same_targets():
    seqs = [_seq([1, 2, 2, 3], test_from=1), _seq([4, 4, 0], test_from=1)]
    scores = [np.tile(np.linspace(1.0, 0.0, 5, dtype=np.float32), (len(s.targets), 1)) for s in seqs]
    ranks, _ = repeat_explore.ranks_and_new_ranks(scores, seqs)
    kinds = repeat_explore.target_kinds(seqs)
    assert len(ranks) == len(kinds) == 3
    assert ranks.tolist() == [3, 4, 1]  # items 2, 3 and 0 under scores that fall with the item index
    assert [repeat_explore.KINDS[k] for k in kinds] == ["stay", "new", "new"]
