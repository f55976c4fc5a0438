"""In-memory interactions: columnar arrays sorted by (user, time), with string vocabularies.

`Interactions` is the one shape every offline component takes: loaders produce it, the
synthetic generator produces it, featurization filters it, sessionizing annotates it.
"""
from __future__ import annotations

from dataclasses import dataclass, replace

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc


@dataclass(frozen=True)
class Interactions:
    user: np.ndarray  # int32 codes into user_ids
    item: np.ndarray  # int32 codes into item_ids
    ts_ms: np.ndarray  # int64 epoch milliseconds
    event_type: np.ndarray  # int16 codes into event_types
    value: np.ndarray  # float32 EVENT_VALUE (NaN where absent)
    session_key: np.ndarray | None  # int64 codes of SESSION_ID when the file has one; -1: this event has none
    user_ids: np.ndarray  # object array of str
    item_ids: np.ndarray  # object array of str
    event_types: tuple[str, ...]
    source: str = "<memory>"
    # the SESSION_ID text session_key codes into: replay sends it, so sessions of two files never share an id
    session_ids: np.ndarray | None = None  # object array of str; None when only codes are known

    def __len__(self) -> int:
        return int(self.user.shape[0])

    @property
    def n_users(self) -> int:
        return len(self.user_ids)

    @property
    def n_items(self) -> int:
        return len(self.item_ids)

    @classmethod
    def from_columns(cls, user_ids, item_ids, ts_ms, event_types=None, values=None, session_ids=None,
                     source: str = "<memory>") -> "Interactions":
        """Encode string columns and sort by (user, time, input order)."""
        n = len(ts_ms)
        u_vocab, user = encode_text(user_ids)
        i_vocab, item = encode_text(item_ids)
        if event_types is None:
            t_vocab, etype = np.array(["click"]), np.zeros(n, dtype=np.int64)
        else:
            t_vocab, etype = encode_text(event_types)
        val = np.full(n, np.nan, dtype=np.float32) if values is None else np.asarray(values, dtype=np.float32)
        s_vocab, skey = (None, None) if session_ids is None else _session_codes(session_ids)
        ts = np.asarray(ts_ms, dtype=np.int64)
        order = np.lexsort((np.arange(n), ts, user))
        return cls(
            user=user.astype(np.int32)[order], item=item.astype(np.int32)[order], ts_ms=ts[order],
            event_type=etype.astype(np.int16)[order], value=val[order],
            session_key=None if skey is None else skey[order],
            user_ids=u_vocab, item_ids=i_vocab,
            event_types=tuple(str(t) for t in t_vocab), source=source, session_ids=s_vocab,
        )

    def subset(self, mask: np.ndarray, *, reindex: bool = True) -> "Interactions":
        """Rows where mask is true; with reindex, vocabularies shrink to what is left."""
        cols = dict(user=self.user[mask], item=self.item[mask], ts_ms=self.ts_ms[mask],
                    event_type=self.event_type[mask], value=self.value[mask],
                    session_key=None if self.session_key is None else self.session_key[mask])
        out = replace(self, **cols)
        return out.compact() if reindex else out

    def compact(self) -> "Interactions":
        """Drop users and items that no longer occur, keeping relative code order."""
        u_keep, user = np.unique(self.user, return_inverse=True)
        i_keep, item = np.unique(self.item, return_inverse=True)
        return replace(self, user=user.astype(np.int32), item=item.astype(np.int32),
                       user_ids=self.user_ids[u_keep], item_ids=self.item_ids[i_keep])

    def user_bounds(self) -> np.ndarray:
        """Start offsets of each user's run of rows, plus the end: shape (n_present_users + 1,)."""
        change = np.flatnonzero(np.diff(self.user)) + 1
        return np.concatenate([[0], change, [len(self)]]).astype(np.int64)

    def type_code(self, name: str) -> int | None:
        return self.event_types.index(name) if name in self.event_types else None


def _session_codes(session_ids) -> tuple[np.ndarray, np.ndarray]:
    """The vocabulary of the session ids and their codes in it, -1 where an event has none (None): such an event
    is sessionized by its time gap, as the worker sessionizes it (model/sessions.py)."""
    ids = np.asarray(session_ids, dtype=object)
    missing = np.fromiter((v is None for v in ids), dtype=bool, count=len(ids))
    codes = np.full(len(ids), -1, dtype=np.int64)
    if missing.all():
        return np.array([], dtype=object), codes
    vocab, present = encode_text(ids[~missing])
    codes[~missing] = present
    return vocab, codes


def encode_text(values) -> tuple[np.ndarray, np.ndarray]:
    """The sorted vocabulary of `values` as text (an object array of str) and each value's code in it.

    Never through numpy's fixed-width strings: `astype(str)` makes every row as wide as the longest value,
    so one 20,000-character id in a 1 MB file asked for 12 GB. pyarrow orders UTF-8 by its bytes, which is
    code point order, the order np.unique gives str, so the codes are the ones np.unique would give.
    """
    arr = values if isinstance(values, np.ndarray) else np.asarray(values, dtype=object)
    if arr.dtype.kind != "O":
        text = arr.astype(str).astype(object)  # numbers are short; a str array is as wide as its caller made it
    else:
        text = np.frompyfunc(str, 1, 1)(arr)  # what astype(str) writes, without the fixed width
    try:
        column = pa.array(text, type=pa.string())
    except (pa.ArrowException, UnicodeError):  # a lone surrogate is not UTF-8: sort the Python objects
        vocab, codes = np.unique(text, return_inverse=True)
        return vocab, codes.reshape(-1)
    vocab = pc.unique(column)
    vocab = vocab.take(pc.sort_indices(vocab))
    codes = pc.index_in(column, value_set=vocab)
    return vocab.to_numpy(zero_copy_only=False), codes.to_numpy(zero_copy_only=False)
