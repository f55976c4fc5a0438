"""Synthetic data: deterministic, the documented shape, a real cross-session signal, the repeat knob."""
from __future__ import annotations

import numpy as np
import pytest

from model.errors import ConfigError
from model.loaders import load_interactions
from model.sessions import session_index, session_starts
from model.synth import BASE_EPOCH_S, generate, item_categories, measured_repeat_share, write
from stream.cli import main as hrnn

N_CAT = 20


@pytest.fixture(scope="module")
def default_data():
    return generate(2000, 1000, seed=0)


def test_same_seed_same_data_other_seed_other_data():
    a, b, c = generate(200, 300, seed=7), generate(200, 300, seed=7), generate(200, 300, seed=8)
    assert np.array_equal(a.item, b.item) and np.array_equal(a.ts_ms, b.ts_ms)
    assert np.array_equal(a.event_type, b.event_type) and list(a.item_ids) == list(b.item_ids)
    assert len(a) != len(c) or not np.array_equal(a.item, c.item)


def test_default_shape_users_have_several_sessions(default_data):
    d = default_data
    assert 40_000 <= len(d) <= 60_000
    assert d.n_users == 2000 and d.n_items > 900
    starts = session_starts(d, 1800)
    per_user = np.bincount(d.user[starts])
    assert np.median(per_user) >= 3 and (per_user >= 2).mean() > 0.9
    share = np.mean(np.array(d.event_types)[d.event_type] == "purchase")
    assert 0.03 < share < 0.07 and set(d.event_types) == {"click", "purchase"}


def test_times_start_at_the_base_epoch_and_gaps_separate_sessions(default_data):
    d = default_data
    assert d.ts_ms.min() >= BASE_EPOCH_S * 1000 and np.all(d.ts_ms % 1000 == 0)
    same_user = d.user[1:] == d.user[:-1]
    gaps = np.diff(d.ts_ms)[same_user] / 1000
    assert gaps.min() >= 1
    # no gap sits near the 30-minute timeout: the sessions are unambiguous
    assert not np.any((gaps > 1500) & (gaps < 1860))
    assert np.any(gaps > 86400) and np.any(gaps < 60)


def session_category_profiles(d, seed):
    cats = item_categories(1000, seed=seed, n_categories=N_CAT)[[int(s[1:]) for s in d.item_ids]]
    sess = session_index(session_starts(d, 1800))
    profile = np.zeros((sess[-1] + 1, N_CAT))
    np.add.at(profile, (sess, cats[d.item]), 1.0)
    sess_user = d.user[np.flatnonzero(session_starts(d, 1800))]
    return profile, sess_user


def test_next_session_categories_resemble_the_users_own_history_far_more_than_others(default_data):
    profile, sess_user = session_category_profiles(default_data, seed=0)
    rng = np.random.default_rng(0)
    own, other = [], []
    bounds = np.flatnonzero(np.r_[True, sess_user[1:] != sess_user[:-1], True])
    histories = {}
    for a, b in zip(bounds[:-1], bounds[1:]):
        if b - a >= 3:
            histories[sess_user[a]] = (profile[a:b - 1].sum(0), profile[b - 1])
    users = list(histories)
    for u in users:
        past, nxt = histories[u]
        v = users[rng.integers(len(users))]
        while v == u:
            v = users[rng.integers(len(users))]
        cos = lambda x, y: float(x @ y / (np.linalg.norm(x) * np.linalg.norm(y)))
        own.append(cos(nxt, past))
        other.append(cos(nxt, histories[v][0]))
    assert len(own) > 1000
    assert np.mean(own) > 0.3 and np.mean(own) > 3 * np.mean(other)


def test_tastes_drift_so_recent_sessions_predict_better_than_old_ones():
    d = generate(2000, 1000, seed=0, events_per_user=60)
    profile, sess_user = session_category_profiles(d, seed=0)
    bounds = np.flatnonzero(np.r_[True, sess_user[1:] != sess_user[:-1], True])
    near, far = [], []
    for a, b in zip(bounds[:-1], bounds[1:]):
        if b - a >= 12:
            last = profile[b - 1] / profile[b - 1].sum()
            recent = profile[b - 6:b - 1].sum(0)
            old = profile[a:a + 5].sum(0)
            near.append(last @ (recent / recent.sum()))
            far.append(last @ (old / old.sum()))
    assert len(near) > 200 and np.mean(near) > np.mean(far) * 1.05


@pytest.mark.parametrize("target", [0.3, 0.6])
def test_repeat_knob_sets_the_measured_share_of_revisits(target):
    base = measured_repeat_share(generate(1000, 1000, seed=3))
    d = generate(1000, 1000, seed=3, repeat_share=target)
    assert base < target - 0.05
    assert measured_repeat_share(d) == pytest.approx(target, abs=0.03)


def test_repeats_favour_recent_items():
    d = generate(1000, 1000, seed=4, repeat_share=0.6)
    # how many events back (within the user) was the item last seen; recent gaps dominate
    last_seen: dict[tuple[int, int], int] = {}
    backs = []
    for row, (u, i) in enumerate(zip(d.user.tolist(), d.item.tolist())):
        if (u, i) in last_seen:
            backs.append(row - last_seen[(u, i)])
        last_seen[(u, i)] = row
    backs = np.array(backs)
    assert np.mean(backs <= 10) > 2 * np.mean((backs > 10) & (backs <= 20))


def test_a_million_events_generate_quickly():
    import time

    t = time.perf_counter()
    d = generate(40_000, 20_000, seed=1)
    took = time.perf_counter() - t
    assert len(d) > 900_000 and took < 30


def test_bad_parameters_are_config_errors():
    with pytest.raises(ConfigError, match="n_users"):
        generate(0, 10, seed=0)
    with pytest.raises(ConfigError, match="repeat_share"):
        generate(10, 100, seed=0, repeat_share=1.5)
    with pytest.raises(ConfigError, match="n_categories"):
        generate(10, 5, seed=0)


@pytest.mark.parametrize("suffix", [".csv", ".parquet"])
def test_written_file_reads_back_identically(tmp_path, suffix):
    d = generate(300, 200, seed=5, repeat_share=0.2)
    back = load_interactions(write(d, tmp_path / f"x{suffix}"))
    assert (len(back), back.n_users, back.n_items) == (len(d), d.n_users, d.n_items)
    assert np.array_equal(back.ts_ms, d.ts_ms) and np.array_equal(back.item, d.item)
    assert back.event_types == d.event_types and back.session_key is None


def test_cli_writes_a_file_the_loader_reads_with_the_same_counts(tmp_path, capsys):
    out = tmp_path / "s.csv"
    assert hrnn(["synth", "--out", str(out), "--users", "300", "--items", "200", "--seed", "2"]) == 0
    line = capsys.readouterr().out.strip()
    d = generate(300, 200, seed=2)
    back = load_interactions(out)
    assert (len(back), back.n_users, back.n_items) == (len(d), d.n_users, d.n_items)
    sessions = int(session_starts(back, 1800).sum())
    assert f"{len(d)} events, {d.n_users} users, {d.n_items} items, {sessions} sessions" in line
    assert out.read_text().splitlines()[0] == "USER_ID,ITEM_ID,TIMESTAMP,EVENT_TYPE"


def test_cli_rejects_bad_arguments_with_a_message(tmp_path, capsys):
    assert hrnn(["synth", "--out", str(tmp_path / "s.txt")]) == 2
    assert "unknown extension" in capsys.readouterr().err
    assert hrnn(["synth", "--out", str(tmp_path / "s.csv"), "--repeat-share", "2"]) == 2
    assert "repeat_share" in capsys.readouterr().err
    with pytest.raises(SystemExit) as exit_:
        hrnn(["synth", "--out", str(tmp_path / "s.csv"), "--users", "many"])
    assert exit_.value.code != 0


def test_cli_refuses_a_negative_seed_naming_the_flag(tmp_path, capsys):
    assert hrnn(["synth", "--out", str(tmp_path / "s.csv"), "--users", "5", "--seed", "-1"]) == 2
    assert "--seed -1" in capsys.readouterr().err and not (tmp_path / "s.csv").exists()


def _limited(*command: str) -> "subprocess.CompletedProcess":
    """Run with a 3 GB address-space limit, so a run that tries to allocate billions of events fails at once
    (with a MemoryError) instead of swapping the machine."""
    import resource
    import subprocess

    def limit() -> None:
        resource.setrlimit(resource.RLIMIT_AS, (3 << 30, 3 << 30))

    return subprocess.run(command, capture_output=True, text=True, timeout=120, preexec_fn=limit)


def test_cli_refuses_more_events_than_it_can_make_naming_both_flags(tmp_path):
    import sys
    from pathlib import Path

    out = tmp_path / "big.csv"
    proc = _limited(str(Path(sys.executable).with_name("hrnn")), "synth", "--out", str(out),
                    "--events-per-user", "1000000")
    assert proc.returncode == 2, proc.stderr[-500:]
    assert "--users 2000" in proc.stderr and "--events-per-user 1000000" in proc.stderr
    assert "Traceback" not in proc.stderr and not out.exists()


def test_generate_refuses_more_events_than_it_can_make_naming_both_parameters():
    import sys

    proc = _limited(sys.executable, "-c", "from model.synth import generate; "
                                          "generate(2000, 1000, seed=0, events_per_user=1e6)")
    assert "ConfigError" in proc.stderr and "n_users x events_per_user" in proc.stderr, proc.stderr[-500:]


@pytest.mark.parametrize("items", [10**11, 2**63 - 1, 2**64])
def test_generate_refuses_more_items_than_a_catalogue_may_have(items):
    """Drawn whole, 10**11 items asked for 745 GiB and 2**64 overflowed int64: a message instead."""
    with pytest.raises(ConfigError, match="n_items must be at most 10,000,000"):
        generate(10, items, seed=0)


@pytest.mark.parametrize("command", ["synth", "demo"])
@pytest.mark.parametrize("items", ["100000000000", "9223372036854775807", "18446744073709551616"])
@pytest.mark.timeout(30)
def test_synth_and_demo_refuse_more_items_than_a_catalogue_may_have_naming_the_flag(tmp_path, capsys, command,
                                                                                      items):
    out = tmp_path / ("s.csv" if command == "synth" else "demo")
    assert hrnn([command, "--out", str(out), "--items", items]) == 2
    err = capsys.readouterr().err
    assert f"--items {items}" in err and "10,000,000" in err and "Traceback" not in err
    assert not out.exists()


@pytest.mark.timeout(30)
def test_demo_refuses_more_users_than_synth_makes_events_for_naming_the_flag(tmp_path, capsys):
    assert hrnn(["demo", "--out", str(tmp_path / "demo"), "--users", str(10**12)]) == 2
    err = capsys.readouterr().err
    assert f"--users {10**12}" in err and "4,000,000" in err
