"""The online inference API computes exactly what evaluation's forward pass computes, on every device here."""
from __future__ import annotations

from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch

from model.artifact import latest_version_dir, load_version, save_version
from model.config import DataConfig, HRNNConfig
from model.featurize import featurize
from model.inference import Filters, HRNNScorer, Recommender, StepInput
from model.interactions import Interactions
from model.network import HRNN
from model.scorer import UserSequence
from model.sessions import session_starts
from model.state import decode_state, encode_state

HOUR_MS = 3_600_000


def _tiny_log(seed: int = 0, users: int = 12, per_user: int = 30, items: int = 40) -> Interactions:
    rng = np.random.default_rng(seed)
    rows = []
    for u in range(users):
        t = 1_700_000_000_000 + int(rng.integers(0, HOUR_MS))
        for _ in range(per_user):
            t += int(rng.choice([60_000, 5 * HOUR_MS]))  # a gap of 5 h opens a new session
            etype = "purchase" if rng.random() < 0.2 else "click"
            rows.append((f"u{u}", f"i{int(rng.integers(0, items))}", t, etype))
    u, i, t, e = zip(*rows)
    return Interactions.from_columns(u, i, t, e)


# (variant, repeat head, H): H = 8 is shorter than a user's 30 events, so the window's cut is covered too.
@pytest.fixture(scope="module", params=[("hrnn-init", False, 100), ("hrnn-all", False, 100),
                                        ("session-only", False, 100), ("hrnn-init", True, 100),
                                        ("hrnn-all", True, 8), ("session-only", True, 8)],
                ids=lambda p: f"{p[0]}{'+repeat-H' + str(p[2]) if p[1] else ''}")
def version(request, tmp_path_factory):
    return _saved_version(tmp_path_factory.mktemp("reg"), *request.param)


def _saved_version(reg: Path, variant: str, repeat: bool, h: int) -> tuple[Interactions, Path]:
    """The tiny log and a version of `variant` trained on nothing, its repeat head (if any) trained-looking."""
    data = _tiny_log()
    cfg = HRNNConfig(variant=variant, hidden_dimension=32, time_gap_input=True, seed=3, repeat_head=repeat,
                     history_length=h)
    torch.manual_seed(3)
    model = HRNN(data.n_items, cfg).eval()
    if model.repeat is not None:  # trained-looking weights: an untrained head's zero gate weights hide mistakes
        with torch.no_grad():
            for prm in model.repeat.parameters():
                prm.add_(torch.randn_like(prm) * 0.5)
            model.repeat.window_offset.fill_(0.75)  # and a calibrated one: every path must add it
    save_version(reg, model, cfg, DataConfig(), list(data.item_ids), list(data.event_types))
    return data, latest_version_dir(reg)


def _with_repeats(data: Interactions, seed: int = 1) -> Interactions:
    """`data` with runs of repeats (what collapse_repeats merges) after half of the events: the same item, of the
    same type or the other (kept), first 1 min, 20 min (the next event then opens a session offline, counted from
    the event repeated) or 5 h (a new session: kept) later, then 0 or 1 min apart; the next event 1 min, 15 min
    or 5 h after the run. A run may last past the session timeout with each gap within it (merged whole offline,
    where the gap counts from the repeat before), and an event of the run's item after it comes 5 h later."""
    rng = np.random.default_rng(seed)
    types = list(data.event_types)
    rows = []
    for u in np.unique(data.user):
        t, run_item = 1_700_000_000_000, None
        for r in np.flatnonzero(data.user == u):
            item, etype = data.item_ids[data.item[r]], types[data.event_type[r]]
            gaps = [60_000, 5 * HOUR_MS] if run_item is None else [60_000, 15 * 60_000, 5 * HOUR_MS]
            t += 5 * HOUR_MS if item == run_item else int(rng.choice(gaps))
            rows.append((data.user_ids[u], item, t, etype))
            run_item = None
            if rng.random() < 0.5:
                run_item, rtype = item, etype if rng.random() < 0.75 else types[1 - types.index(etype)]
                for k in range(int(rng.integers(1, 4))):
                    t += int(rng.choice([60_000, 20 * 60_000, 5 * HOUR_MS] if k == 0 else [0, 60_000, 20 * 60_000]))
                    rows.append((data.user_ids[u], item, t, rtype))
    return Interactions.from_columns(*zip(*rows))


def _events_of(data: Interactions, user: int) -> list[StepInput]:
    rows = np.flatnonzero(data.user == user)
    return [StepInput(data.user_ids[user], data.item_ids[data.item[r]], data.event_types[data.event_type[r]],
                      int(data.ts_ms[r])) for r in rows]


def _republished(path: Path, reg: Path, data_config: DataConfig) -> Path:
    """The same network published as trained under `data_config` (its event types: the ones it keeps)."""
    m = load_version(path)
    save_version(reg, m.model, m.config, data_config, m.item_ids,
                 [t for t in m.event_types if not data_config.event_types or t in data_config.event_types])
    return latest_version_dir(reg)


# clicks-only: the version's featurization drops purchases, so evaluation never sees them, while the worker is
# given every event; those must leave the state (network, session clock, stored history) as it was. collapse:
# the same for the repeats featurization merges (on a log with runs of them).
@pytest.mark.parametrize("collapse", [False, True], ids=["no-collapse", "collapse"])
@pytest.mark.parametrize("event_types", [(), ("click",)], ids=["all-types", "clicks-only"])
def test_event_by_event_api_gives_the_evaluation_forward_pass_scores(version, event_types, collapse, device,
                                                                     tmp_path):
    data, path = version
    if collapse:
        data = _with_repeats(data)
    if event_types or collapse:
        path = _republished(path, tmp_path, DataConfig(event_types=event_types, collapse_repeats=collapse))
    rec = Recommender.load(path, device=device)
    feat, _ = featurize(data, rec.data_config)  # what evaluation scores
    scorer = HRNNScorer.for_version(rec.loaded, feat)
    columns = [rec.index[str(i)] for i in feat.item_ids]
    starts = session_starts(feat, rec.data_config.session_timeout_s)
    for user in range(3):
        rows = np.flatnonzero(feat.user == user)
        targets = np.array([j for j in range(1, len(rows)) if not starts[rows[j]]])
        seq = UserSequence(user, feat.item[rows], feat.ts_ms[rows], feat.event_type[rows], starts[rows], targets)
        offline = scorer.score([seq])[0]
        seen = [(feat.item_ids[feat.item[r]], int(feat.ts_ms[r]), feat.event_types[feat.event_type[r]]) for r in rows]
        events = _events_of(data, int(np.flatnonzero(data.user_ids == feat.user_ids[user])[0]))  # every event
        state, online = None, []
        for ev in events:
            adv = rec.advance({ev.user_id: state}, [ev])
            state = decode_state(encode_state(adv.states[ev.user_id]))  # through the stored form, as the worker does
            if seen[len(online):len(online) + 1] == [(ev.item_id, ev.ts_ms, ev.event_type)]:
                online.append(adv.scores[0].cpu().numpy()[columns])  # the scores after each event evaluation sees
        assert len(online) == len(rows) == state.n_events
        assert len(rows) < len(events) if collapse or event_types else len(rows) == len(events)
        np.testing.assert_allclose(np.stack([online[j - 1] for j in targets]), offline, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("collapse", [False, True], ids=["no-collapse", "collapse"])
@pytest.mark.parametrize("event_types", [(), ("click",)], ids=["all-types", "clicks-only"])
def test_a_batch_with_several_events_per_user_equals_one_event_at_a_time(version, event_types, collapse, device,
                                                                          tmp_path):
    data, path = version
    if collapse:  # a repeat is judged by the user's state after the events before it in the batch
        data = _with_repeats(data)
    if event_types or collapse:  # purchases, left out of the state, sit in the same waves as other users' steps
        path = _republished(path, tmp_path, DataConfig(event_types=event_types, collapse_repeats=collapse))
    rec = Recommender.load(path, device=device)
    events = sorted(_events_of(data, 0) + _events_of(data, 1) + _events_of(data, 2), key=lambda e: e.ts_ms)
    batch = rec.advance({}, events)
    states: dict = {}
    for i, ev in enumerate(events):
        one = rec.advance(states, [ev])
        states[ev.user_id] = one.states[ev.user_id]
        np.testing.assert_allclose(one.scores[0].cpu().numpy(), batch.scores[i].cpu().numpy(),
                                   rtol=1e-5, atol=1e-5)
        assert one.new_session[0] == batch.new_session[i]
    for user, s in batch.states.items():
        np.testing.assert_allclose(s.user_hidden, states[user].user_hidden, atol=1e-6)
        assert s.history == states[user].history


def test_unknown_items_advance_time_and_sessions_but_not_the_network(version, device):
    data, path = version
    rec = Recommender.load(path, device=device)
    first = rec.advance({}, [StepInput("x", data.item_ids[0], "click", 1_700_000_000_000)])
    s0 = first.states["x"]
    later = StepInput("x", "never-seen-item", "click", 1_700_000_000_000 + 10 * HOUR_MS)
    adv = rec.advance({"x": s0}, [later])
    s1 = adv.states["x"]
    assert adv.known == [False] and adv.new_session == [True]
    assert s1.last_event_ms == later.ts_ms and s1.history[-1].item_id == "never-seen-item"
    assert s1.session_id != s0.session_id
    if rec.config.variant != "session-only":  # the closed session still reached the user GRU
        assert not np.allclose(s1.user_hidden, s0.user_hidden)


def test_advancing_leaves_the_states_it_was_given_as_they_were(version, device):
    data, path = version
    rec = Recommender.load(path, device=device)
    s0 = rec.advance({}, [StepInput("x", data.item_ids[0], "click", 1_700_000_000_000)]).states["x"]
    before = encode_state(s0)
    after = rec.advance({"x": s0}, [StepInput("x", data.item_ids[1], "purchase", 1_700_000_060_000)]).states["x"]
    assert encode_state(s0) == before and len(after.history) == 2


def test_a_repeat_collapse_repeats_merges_is_answered_from_the_state_as_it_is_and_leaves_it_so(version, device,
                                                                                                tmp_path):
    data, path = version
    rec = Recommender.load(_republished(path, tmp_path, DataConfig(collapse_repeats=True)), device=device)
    t0, item = 1_700_000_000_000, data.item_ids[0]
    first = rec.advance({}, [StepInput("x", item, "click", t0)])
    s0 = first.states["x"]
    rep = rec.advance({"x": s0}, [StepInput("x", item, "click", t0 + 20 * 60_000)])
    assert rep.states["x"].repeat_ms == t0 + 20 * 60_000  # all the repeat leaves: the next repeat's gap counts from it
    assert encode_state(replace(rep.states["x"], repeat_ms=0)) == encode_state(s0)
    assert rep.new_session == [False] and rep.known == [True] and rep.session_ids == [s0.session_id]
    np.testing.assert_allclose(rep.scores.cpu().numpy(), first.scores.cpu().numpy(), rtol=1e-6, atol=1e-6)
    # 35 min after the click repeated (the session timeout is 30), 15 after its repeat: merged too, as offline
    again = rec.advance({"x": rep.states["x"]}, [StepInput("x", item, "click", t0 + 35 * 60_000)])
    assert again.new_session == [False] and encode_state(replace(again.states["x"], repeat_ms=0)) == encode_state(s0)
    # a purchase of the item is another signal, kept; the repeats did not move the session clock
    nxt = rec.advance({"x": again.states["x"]}, [StepInput("x", item, "purchase", t0 + 36 * 60_000)])
    assert nxt.new_session == [True] and len(nxt.states["x"].history) == 2


def test_late_events_do_not_move_the_clock_backwards(version, device):
    data, path = version
    rec = Recommender.load(path, device=device)
    t0 = 1_700_000_000_000
    evs = [StepInput("y", data.item_ids[1], "click", t0), StepInput("y", data.item_ids[2], "click", t0 - 60_000)]
    adv = rec.advance({}, evs)
    assert adv.states["y"].last_event_ms == t0
    assert adv.new_session == [True, False]


def test_purchased_items_are_filtered_by_default_and_session_items_only_on_request(version, device):
    data, path = version
    rec = Recommender.load(path, device=device)
    n = len(rec.item_ids)
    evs = [StepInput("z", item, "purchase" if j == 0 else "click", 1_700_000_000_000 + j * 1000)
           for j, item in enumerate(rec.item_ids[:5])]
    plain = rec.recommend({}, evs, k=n)
    assert rec.item_ids[0] not in {i for i, _ in plain.items[-1]}
    assert len(plain.items[-1]) == n - 1
    strict = rec.recommend({}, evs, k=n, filters=Filters(exclude_session_items=True))
    assert not {i for i, _ in strict.items[-1]} & set(rec.item_ids[:5])
    scores = [s for _, s in plain.items[-1]]
    assert scores == sorted(scores, reverse=True)


def test_an_item_bought_is_filtered_from_its_purchases_list_and_later_ones_by_a_version_that_does_not_step_purchases(
        version, device, tmp_path):
    data, path = version
    rec = Recommender.load(_republished(path, tmp_path, DataConfig(event_types=("click",))), device=device)
    n, bought, t0 = len(rec.item_ids), rec.item_ids[7], 1_700_000_000_000
    evs = [StepInput("z", rec.item_ids[1], "click", t0), StepInput("z", bought, "purchase", t0 + 1000),
           StepInput("z", rec.item_ids[2], "click", t0 + 2000)]

    def listed(filters: Filters) -> list[bool]:
        return [bought in {i for i, _ in row} for row in rec.recommend({}, evs, k=n, filters=filters).items]

    assert listed(Filters()) == [True, False, False]
    assert listed(Filters(exclude_purchased=False)) == [True, True, True]
    assert listed(Filters(exclude_purchased=False, exclude_event_types=("purchase",))) == [True, False, False]
    state, one_by_one = None, []
    for ev in evs + [StepInput("z", rec.item_ids[3], "click", t0 + 3000)]:
        out = rec.recommend({"z": state}, [ev], k=n)
        state = decode_state(encode_state(out.states["z"]))  # through the stored form, as the worker does
        one_by_one.append(bought in {i for i, _ in out.items[0]})
    assert one_by_one == [True, False, False, False] and state.history.items == [rec.item_ids[j] for j in (1, 2, 3)]


def test_events_a_version_does_not_step_for_their_type_leave_its_scores_hidden_states_and_rebuilds_as_without_them(
        version, device, tmp_path):
    data, path = version
    rec = Recommender.load(_republished(path, tmp_path, DataConfig(event_types=("click",))), device=device)
    events = _events_of(data, 0)
    u, clicks = events[0].user_id, [j for j, e in enumerate(events) if e.event_type == "click"]
    bought = [e.item_id for e in events if e.event_type != "click"]
    assert bought
    every, only_clicks = rec.advance({}, events), rec.advance({}, [events[j] for j in clicks])
    np.testing.assert_allclose(every.scores[clicks].cpu().numpy(), only_clicks.scores.cpu().numpy(),
                               rtol=1e-6, atol=1e-6)  # the repeat head's window too
    s, ref = every.states[u], only_clicks.states[u]
    np.testing.assert_allclose(s.user_hidden, ref.user_hidden, atol=1e-6)
    assert s.history == ref.history and len(ref.skipped) == 0 and s.skipped.items == bought[-rec.history_length:]
    nxt = [StepInput(u, data.item_ids[0], "click", events[-1].ts_ms + 60_000)]
    rebuilt = [rec.advance({u: replace(x, model_version="older", user_hidden=x.user_hidden * 0 + 7)}, nxt)
               for x in (s, ref)]  # replayed from the stored history alone
    assert rebuilt[0].rebuilt_users == 1
    np.testing.assert_allclose(rebuilt[0].scores.cpu().numpy(), rebuilt[1].scores.cpu().numpy(), rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(rebuilt[0].states[u].user_hidden, rebuilt[1].states[u].user_hidden, atol=1e-6)
    # the purchase filter only takes the items bought out: every other item keeps its score and its place
    n, gone = len(rec.item_ids), set(bought[-rec.history_length:])
    on, off = rec.recommend({}, events, k=n), rec.recommend({}, events, k=n, filters=Filters(exclude_purchased=False))
    assert on.items[-1] == [x for x in off.items[-1] if x[0] not in gone] and len(on.items[-1]) == n - len(gone)


def test_items_off_sale_are_left_out_for_every_user_and_the_list_is_filled_from_the_rest(version, device):
    data, path = version
    rec = Recommender.load(path, device=device)
    evs = _events_of(data, 0)[:6] + _events_of(data, 1)[:6]
    plain = rec.recommend({}, evs, k=10, filters=Filters(exclude_purchased=False))
    top = {row[0][0] for row in plain.items}  # every list's first item
    off = frozenset(top | {"no-such-item"})  # ids the model does not know are ignored
    filtered = rec.recommend({}, evs, k=10, filters=Filters(exclude_purchased=False, unavailable_items=off))
    for before, after in zip(plain.items, filtered.items):
        assert len(after) == 10 and not {i for i, _ in after} & off
        kept = [x for x in before if x[0] not in off]
        assert [i for i, _ in after[:len(kept)]] == [i for i, _ in kept]  # the rest keep their order
    cols = rec._unavailable_columns(off)
    assert rec._unavailable_columns(off) is cols  # the same set: nothing rebuilt per batch
    assert len(cols) == len(top) and rec._unavailable_columns(frozenset()) is None


def test_a_state_of_another_version_is_rebuilt_from_its_last_events(version, tmp_path, device):
    data, path = version
    rec = Recommender.load(path, device=device)
    events = _events_of(data, 4)
    fresh = rec.advance({}, events[:-1]).states[events[0].user_id]
    stale = decode_state(encode_state(fresh))
    stale.model_version = "some-older-version"
    stale.user_hidden[:] = 7.0
    adv = rec.advance({events[0].user_id: stale}, events[-1:])
    # A rebuild replays only the stored last-H events: it equals a user whose whole past is those events.
    replayed = rec.advance({}, events[:-1][-rec.history_length:]).states[events[0].user_id]
    ref = rec.advance({events[0].user_id: replayed}, events[-1:])
    assert adv.rebuilt_users == 1
    np.testing.assert_allclose(adv.scores.cpu().numpy(), ref.scores.cpu().numpy(), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("n_since", [0, 3])
def test_a_state_rebuilt_ahead_of_a_swap_catches_up_on_the_events_served_since(version, n_since, device):
    data, path = version
    serving, incoming = Recommender.load(path, device=device), Recommender.load(path, device=device)
    serving.version = "the-serving-version"
    events = _events_of(data, 5)
    u, cut = events[0].user_id, len(events) - 1 - n_since
    at_scan = serving.advance({}, events[:cut]).states[u]
    at_scan.user_hidden[:] = 7.0  # the serving version's hidden states must not leak into the new one's
    assert incoming.prebuild({u: at_scan}) == 1
    since = serving.advance({u: at_scan}, events[cut:-1]).states[u] if n_since else at_scan
    adv = incoming.advance({u: since}, events[-1:])
    # As if the new version had taken over at the scan: rebuilt from the then last-H, then serving.
    ref = incoming.advance({u: incoming.rebuild([at_scan])[0]}, events[cut:])
    assert adv.rebuilt_users == 1 and u not in incoming.prebuilt
    np.testing.assert_allclose(adv.scores.cpu().numpy(), ref.scores.cpu().numpy()[-1:], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(adv.states[u].user_hidden, ref.states[u].user_hidden, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(adv.states[u].session_hidden, ref.states[u].session_hidden, rtol=1e-5, atol=1e-5)


def test_a_prebuilt_state_older_than_the_stored_history_is_rebuilt_instead(version, device):
    data, path = version
    serving, incoming = Recommender.load(path, device=device), Recommender.load(path, device=device)
    serving.version = "the-serving-version"
    events = _events_of(data, 6)
    u, h = events[0].user_id, incoming.history_length
    if len(events) <= h + 2:
        pytest.skip("the history holds every event of this log")
    at_scan = serving.advance({}, events[:2]).states[u]
    incoming.prebuild({u: at_scan})
    since = serving.advance({u: at_scan}, events[2:-1]).states[u]  # more events than the history keeps
    adv = incoming.advance({u: since}, events[-1:])
    ref = incoming.advance({u: incoming.rebuild([since])[0]}, events[-1:])
    np.testing.assert_allclose(adv.scores.cpu().numpy(), ref.scores.cpu().numpy(), rtol=1e-5, atol=1e-5)


def test_a_prebuilt_state_that_stepped_nothing_catches_up_as_a_user_served_fresh(version, device, tmp_path):
    data, path = version
    clicks = _republished(path, tmp_path, DataConfig(event_types=("click",)))
    serving, incoming = Recommender.load(clicks, device=device), Recommender.load(clicks, device=device)
    serving.version = "the-serving-version"
    t0, it = 1_700_000_000_000, data.item_ids
    bought = serving.advance({}, [StepInput("u", it[5], "purchase", t0)]).states["u"]
    assert bought.n_events == 0 and len(bought.skipped) == 1  # the version steps clicks only: nothing stepped
    incoming.prebuild({"u": bought})
    clicks_since = [StepInput("u", it[j], "click", t0 + j * 60_000) for j in (1, 2)]
    since = serving.advance({"u": bought}, clicks_since).states["u"]
    nxt = [StepInput("u", it[3], "click", t0 + 3 * 60_000)]
    adv = incoming.advance({"u": since}, nxt)
    fresh = incoming.advance({}, [StepInput("u", it[5], "purchase", t0)] + clicks_since + nxt)  # the same weights
    assert adv.rebuilt_users == 1 and "u" not in incoming.prebuilt
    np.testing.assert_allclose(adv.scores.cpu().numpy(), fresh.scores.cpu().numpy()[-1:], rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(adv.states["u"].user_hidden, fresh.states["u"].user_hidden, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(adv.states["u"].session_hidden, fresh.states["u"].session_hidden, rtol=1e-5,
                               atol=1e-5)


def test_the_repeat_head_rescores_the_users_own_items_and_the_window_profile_shifts_the_catalogue(version, device):
    data, path = version
    rec = Recommender.load(path, device=device)
    if rec.model.repeat is None:
        pytest.skip("plain model")
    events = _events_of(data, 5)
    adv = rec.advance({}, events)
    window = [rec.index[e.item_id] for e in events[-rec.history_length:] if e.item_id in rec.index]
    with torch.no_grad():
        h = torch.from_numpy(adv.states[events[0].user_id].session_hidden).to(device)
        profile = rec.model.repeat.profile_emb[window].mean(0)  # the fixture's versions have the profile
        catalogue = rec.model.out_bias + rec.model.out_weight @ (h + profile)
        without_profile = rec.model.out_bias + rec.model.out_weight @ h
    diff = (adv.scores[-1] - catalogue).abs()
    seen = set(window)
    assert all(float(diff[i]) < 1e-5 for i in range(len(rec.item_ids)) if i not in seen)
    assert max(float(diff[i]) for i in seen) > 1e-3
    assert float((catalogue - without_profile).abs().max()) > 1e-3


def test_a_version_scores_a_file_listing_other_event_types_as_it_serves_its_events(tmp_path, device):
    data, path = _saved_version(tmp_path, "hrnn-init", True, 100)
    rec = Recommender.load(path, device=device)
    # the same log plus a user of a type the model never saw: it sorts first, so the file's type codes shift
    extra = [(data.user_ids[u], data.item_ids[i], int(t), data.event_types[e])
             for u, i, t, e in zip(data.user, data.item, data.ts_ms, data.event_type)] + \
        [("zz", data.item_ids[0], int(data.ts_ms[0]), "add_to_cart")]
    other = Interactions.from_columns(*zip(*extra))
    assert list(other.event_types) != rec.loaded.event_types
    scorer = HRNNScorer.for_version(rec.loaded, other)
    starts = session_starts(other, rec.data_config.session_timeout_s)
    rows = np.flatnonzero(other.user == 0)
    targets = np.array([j for j in range(1, len(rows)) if not starts[rows[j]]])
    seq = UserSequence(0, other.item[rows], other.ts_ms[rows], other.event_type[rows], starts[rows], targets)
    state, online = None, []
    for ev in _events_of(other, 0):
        adv = rec.advance({ev.user_id: state}, [ev])
        state = adv.states[ev.user_id]
        online.append(adv.scores[0].cpu().numpy())
    columns = [rec.index[str(i)] for i in other.item_ids]
    np.testing.assert_allclose(np.stack([online[j - 1] for j in targets])[:, columns], scorer.score([seq])[0],
                               rtol=1e-5, atol=1e-5)
