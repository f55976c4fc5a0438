"""Synthetic interactions with a known cross-session signal, for tests, demos and benchmarks.

Generative process (all draws from one seeded numpy Generator, vectorised over events):

1. Catalogue. `n_items` items are spread evenly over `n_categories` categories at random.
   Within a category, popularity is Zipf: the item of rank r gets weight 1 / r**zipf_a.
2. Users. Each user has a long-term taste over categories, drawn from a sparse Dirichlet
   (`taste_concentration` < 1, so a user likes a few categories). The taste drifts slowly:
   in log space it follows a Gaussian random walk, one step of size `drift` per session.
   This drift is what a user-level GRU can track and a session-only model cannot.
3. Sessions. A user's event count is log-normal around `events_per_user` (at least 2); each
   event after the first opens a new session with probability 1 / `session_length`. A session
   draws a short-term intent of one category (or two, with probability 0.3) from the user's
   current taste. Each event picks one of the intent categories (or, with probability
   `explore`, any category by the current taste) and then an item of that category by its
   Zipf popularity.
4. Repeats (the repeat knob). Some events outside a user's first session instead revisit an
   item from that user's earlier sessions, chosen with recency: the offset back from the
   session start is geometric, so recent items are likelier. Fresh draws already revisit
   old items by chance (tastes are stable, popularity is skewed); the forced share is set so
   that the measured share of events revisiting an earlier session's item, over all events,
   comes out near `repeat_share` (`measured_repeat_share` computes it). A target below the
   natural rate leaves the natural rate; a target above the share of events outside first
   sessions (about 0.8 with the defaults) is capped there.
5. Time. Each user starts at a random point of the first `start_spread_days` after the base
   epoch (2026-01-01 UTC). Gaps between sessions are log-normal, hours to days (never below
   31 minutes); gaps inside a session are log-normal, seconds to minutes (1 s to 25 min), so
   the default 30-minute session timeout recovers the generated sessions exactly.
6. Event types: "purchase" with probability `purchase_rate`, otherwise "click".

Timestamps are whole epoch seconds (stored as ms), so a CSV round trip is exact.
"""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.csv as pa_csv
import pyarrow.parquet as pq

from model.errors import ConfigError
from model.interactions import Interactions
from model.sessions import session_index, session_starts

BASE_EPOCH_S = 1_767_225_600  # 2026-01-01T00:00:00Z
# bound on n_users x events_per_user, so a slip (--events-per-user 1e6 with 2000 users: 2e9 events) is a
# message rather than a MemoryError part way through
MAX_EVENTS = 100_000_000
# bound on n_items, for the same reason: the catalogue arrays are drawn whole, so 10**11 items asked for a
# 745 GiB allocation and 2**64 overflowed numpy's int64 (a traceback, not a message)
MAX_ITEMS = 10_000_000
EVENT_TYPES = ("click", "purchase")


def generate(n_users: int, n_items: int, *, seed: int, n_categories: int = 20, repeat_share: float = 0.0,
             events_per_user: float = 25.0, session_length: float = 5.0, taste_concentration: float = 0.15,
             drift: float = 0.3, explore: float = 0.1, zipf_a: float = 1.0, purchase_rate: float = 0.05,
             start_spread_days: float = 7.0) -> Interactions:
    """Draw a synthetic interactions log (see the module docstring for the process)."""
    _check(n_users, n_items, n_categories, repeat_share, events_per_user, session_length)
    rng = np.random.default_rng(seed)
    C = n_categories

    # 1. catalogue: items sorted by category, Zipf within category
    item_cat = _draw_item_categories(rng, n_items, C)
    by_cat = np.argsort(item_cat, kind="stable")  # item codes grouped by category
    cat_sizes = np.bincount(item_cat, minlength=C)
    cat_start = np.concatenate([[0], np.cumsum(cat_sizes)])
    rank = np.arange(n_items) - np.repeat(cat_start[:-1], cat_sizes)
    weight = 1.0 / (rank + 1.0) ** zipf_a
    csum = np.cumsum(weight)
    before = np.concatenate([[0.0], csum[cat_start[1:] - 1]])  # total weight of all earlier categories
    sorted_cat = np.repeat(np.arange(C), cat_sizes)
    within_cdf = (csum - before[sorted_cat]) / (before[sorted_cat + 1] - before[sorted_cat])
    # category c's items occupy (c, c + 1] on one axis, so one searchsorted serves all categories
    global_cdf = sorted_cat.astype(np.float64) + within_cdf

    # 3. events per user and session boundaries
    sigma = 0.6
    n_ev = np.maximum(2, np.rint(rng.lognormal(np.log(events_per_user) - sigma**2 / 2, sigma, n_users))).astype(np.int64)
    N = int(n_ev.sum())
    user = np.repeat(np.arange(n_users, dtype=np.int32), n_ev)
    user_start = np.concatenate([[0], np.cumsum(n_ev)[:-1]])
    first_of_user = np.zeros(N, dtype=bool)
    first_of_user[user_start] = True
    new_session = first_of_user | (rng.random(N) < 1.0 / session_length)
    sess = np.cumsum(new_session) - 1  # global session number of each event
    S = int(sess[-1]) + 1
    sess_user = user[new_session]
    sess_first = np.flatnonzero(new_session)  # row where each session starts
    sess_in_user = np.arange(S) - np.searchsorted(sess_user, sess_user, side="left")  # k = 0, 1, ... per user

    # 2. tastes: base Dirichlet, log-space random walk across a user's sessions
    base = rng.dirichlet(np.full(C, taste_concentration), size=n_users)
    steps = rng.normal(0.0, drift, size=(S, C))
    steps[sess_in_user == 0] = 0.0
    walk = np.cumsum(steps, axis=0)
    walk -= walk[_first_session_of_user(sess_in_user)]  # restart the walk at each user's first session
    logits = np.log(base[sess_user] + 1e-4) + walk
    taste = np.exp(logits - logits.max(axis=1, keepdims=True))
    taste /= taste.sum(axis=1, keepdims=True)
    taste_cdf = np.cumsum(taste, axis=1)

    def draw_category(rows: np.ndarray, u: np.ndarray) -> np.ndarray:
        return np.minimum((taste_cdf[rows] < u[:, None] * taste_cdf[rows, -1:]).sum(axis=1), C - 1)

    intent1 = draw_category(np.arange(S), rng.random(S))
    intent2 = np.where(rng.random(S) < 0.3, draw_category(np.arange(S), rng.random(S)), intent1)
    pick2 = rng.random(N) < 0.5
    cat = np.where(pick2, intent2[sess], intent1[sess])
    roam = rng.random(N) < explore
    if roam.any():
        cat[roam] = draw_category(sess[roam], rng.random(int(roam.sum())))
    fresh_item = by_cat[np.minimum(np.searchsorted(global_cdf, cat + rng.random(N) * (1 - 1e-12), side="left"),
                                   n_items - 1)]
    # guard against rounding pushing a draw into the next category's first slot
    fresh_item = np.where(item_cat[fresh_item] == cat, fresh_item, by_cat[cat_start[cat]])

    # 4. repeats: point at an earlier-session row of the same user, recency-weighted
    start_of_session = sess_first[sess]
    eligible = start_of_session > user_start[user]
    back = rng.geometric(0.15, N) - 1  # 0: the last event before this session
    src_row = np.maximum(start_of_session - 1 - back, user_start[user])
    draw = rng.random(N)  # drawn whatever the knob, so the knob changes items only, not times or types
    item = fresh_item.copy()
    if repeat_share > 0 and eligible.any():
        natural = _revisits(user, fresh_item, sess, n_items)
        b = natural[eligible].mean()
        e_share = eligible.mean()
        p = float(np.clip((repeat_share / e_share - b) / max(1e-9, 1 - b), 0.0, 1.0))
        item = _apply_repeats(fresh_item, eligible & (draw < p), src_row)
        # repeats shrink the pool of fresh revisits a little; one secant step corrects for it
        got = _revisits(user, item, sess, n_items).mean()
        p = float(np.clip(p + (repeat_share - got) / max(1e-9, e_share * (1 - b)), 0.0, 1.0))
        item = _apply_repeats(fresh_item, eligible & (draw < p), src_row)

    # 5. time
    gap_in = np.clip(rng.lognormal(np.log(45.0), 1.0, N), 1, 1500)
    gap_out = np.clip(rng.lognormal(np.log(12 * 3600.0), 1.0, N), 1860, 14 * 86400)
    gap = np.rint(np.where(new_session, gap_out, gap_in)).astype(np.int64)
    offset = np.rint(rng.random(n_users) * start_spread_days * 86400).astype(np.int64)
    gap[user_start] = offset
    csum = np.cumsum(gap)
    ts_s = csum - np.repeat(csum[user_start] - offset, n_ev)  # per-user cumulative sum
    ts_ms = (BASE_EPOCH_S + ts_s) * 1000

    # 6. event types
    etype = (rng.random(N) < purchase_rate).astype(np.int16)

    width_u, width_i = len(str(max(n_users - 1, 0))), len(str(max(n_items - 1, 0)))
    data = Interactions(
        user=user, item=item.astype(np.int32), ts_ms=ts_ms.astype(np.int64), event_type=etype,
        value=np.full(N, np.nan, dtype=np.float32), session_key=None,
        user_ids=np.array([f"u{k:0{width_u}d}" for k in range(n_users)], dtype=object),
        item_ids=np.array([f"i{k:0{width_i}d}" for k in range(n_items)], dtype=object),
        event_types=EVENT_TYPES, source=f"synth(seed={seed})",
    )
    return data.compact()


def item_categories(n_items: int, *, seed: int, n_categories: int = 20) -> np.ndarray:
    """The category of item number k (the k in its id "i<k>") in `generate(..., seed, n_categories)`."""
    return _draw_item_categories(np.random.default_rng(seed), n_items, n_categories)


def _draw_item_categories(rng: np.random.Generator, n_items: int, n_categories: int) -> np.ndarray:
    # must stay the generator's first draw so item_categories can replay it
    return rng.permutation(np.arange(n_items) % n_categories)


def _apply_repeats(fresh_item: np.ndarray, forced: np.ndarray, src_row: np.ndarray) -> np.ndarray:
    src = np.where(forced, src_row, np.arange(len(fresh_item)))
    while True:  # follow chains (a repeat of a repeat) to the fresh row they lead to
        nxt = src[src]
        if np.array_equal(nxt, src):
            return fresh_item[src]
        src = nxt


def _first_session_of_user(sess_in_user: np.ndarray) -> np.ndarray:
    """For each session, the index of its user's first session (sessions are grouped by user)."""
    firsts = np.flatnonzero(sess_in_user == 0)
    return firsts[np.cumsum(sess_in_user == 0) - 1]


def _revisits(user: np.ndarray, item: np.ndarray, sess: np.ndarray, n_items: int) -> np.ndarray:
    """Row is true when its (user, item) occurred in an earlier session of that user."""
    pair = user.astype(np.int64) * n_items + item
    order = np.lexsort((sess, pair))
    sp = pair[order]
    first = np.ones(len(sp), dtype=bool)
    first[1:] = sp[1:] != sp[:-1]
    first_sess = sess[order][np.flatnonzero(first)[np.cumsum(first) - 1]]
    out = np.empty(len(sp), dtype=bool)
    out[order] = sess[order] > first_sess
    return out


def measured_repeat_share(data: Interactions, timeout_s: float = 1800.0) -> float:
    """Share of all events whose item the same user had in an earlier session."""
    if len(data) == 0:
        return 0.0
    sess = session_index(session_starts(data, timeout_s))
    return float(_revisits(data.user, data.item, sess, max(data.n_items, 1)).mean())


def write(data: Interactions, path: str | Path) -> Path:
    """Write Personalize columns (USER_ID, ITEM_ID, TIMESTAMP in epoch seconds, EVENT_TYPE).

    CSV unless the extension says Parquet. EVENT_VALUE and SESSION_ID are written only when the
    data has them. TIMESTAMP is an integer when every time is a whole second, else a float.
    """
    p = Path(path)
    ts = data.ts_ms
    seconds = pa.array(ts // 1000) if np.all(ts % 1000 == 0) else pa.array(ts / 1000.0)
    # ids go to pyarrow as the Python strings they are: astype(str) would make every row as wide as the longest
    cols = {
        "USER_ID": pa.array(data.user_ids[data.user], type=pa.string()),
        "ITEM_ID": pa.array(data.item_ids[data.item], type=pa.string()),
        "TIMESTAMP": seconds,
        "EVENT_TYPE": pa.array(np.asarray(data.event_types, dtype=object)[data.event_type], type=pa.string()),
    }
    if not np.all(np.isnan(data.value)):
        cols["EVENT_VALUE"] = pa.array(data.value, mask=np.isnan(data.value))
    if data.session_key is not None:
        cols["SESSION_ID"] = pa.array(data.session_key.astype(str))
    table = pa.table(cols)
    p.parent.mkdir(parents=True, exist_ok=True)
    if p.suffix.lower() in (".parquet", ".pq", ".parq"):
        pq.write_table(table, p)
    else:
        delim = "\t" if p.suffix.lower() in (".tsv", ".tab") else ","
        # plain, unquoted fields like Personalize's own examples; quote only when a value needs it
        # (pyarrow always quotes its header, so the header line is written here)
        with open(p, "wb") as fh:
            fh.write((delim.join(table.column_names) + "\n").encode())
            body = pa.BufferOutputStream()
            try:
                pa_csv.write_csv(table, body, write_options=pa_csv.WriteOptions(
                    include_header=False, delimiter=delim, quoting_style="none"))
            except pa.ArrowInvalid:
                body = pa.BufferOutputStream()
                pa_csv.write_csv(table, body, write_options=pa_csv.WriteOptions(
                    include_header=False, delimiter=delim, quoting_style="needed"))
            fh.write(body.getvalue().to_pybytes())
    return p


def _check(n_users: int, n_items: int, n_categories: int, repeat_share: float, events_per_user: float,
           session_length: float) -> None:
    if n_users < 1:
        raise ConfigError(f"n_users must be at least 1, got {n_users}")
    if n_categories < 1:
        raise ConfigError(f"n_categories must be at least 1, got {n_categories}")
    if n_items < n_categories:
        raise ConfigError(f"n_items ({n_items}) must be at least n_categories ({n_categories})")
    if n_items > MAX_ITEMS:
        raise ConfigError(f"n_items must be at most {MAX_ITEMS:,}, got {n_items}")
    if not 0.0 <= repeat_share < 1.0:
        raise ConfigError(f"repeat_share must be in [0, 1), got {repeat_share}")
    if not 2 <= events_per_user <= 1e6:  # NaN fails too
        raise ConfigError(f"events_per_user must lie in [2, 1e6], got {events_per_user}")
    if n_users * events_per_user > MAX_EVENTS:
        raise ConfigError(f"n_users x events_per_user asks for about {n_users * events_per_user:.3g} events, more "
                          f"than the {MAX_EVENTS:.0e} a synthetic log may have")
    if not 1 <= session_length <= 1e6:
        raise ConfigError(f"session_length must lie in [1, 1e6], got {session_length}")
