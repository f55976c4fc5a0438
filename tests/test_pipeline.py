"""`train_version`: early stopping on each user's last training session, then (refit) the published
network learns from those sessions too, for the epoch count early stopping chose."""
from __future__ import annotations

import dataclasses

import numpy as np
import pytest
import torch

import model.pipeline as pipeline
from model.artifact import load_version
from model.cli_evaluate import split_seed
from model.config import DataConfig, HRNNConfig
from model.errors import ConfigError, DataError
from model.interactions import Interactions
from model.splits import make_split
from model.synth import generate

BASE = HRNNConfig(epochs=3, batch_size=32, hidden_dimension=32, n_sample=64)


@pytest.fixture(scope="module")
def data():
    return generate(300, 150, seed=3, repeat_share=0.3, events_per_user=20)


@pytest.fixture
def fits(monkeypatch):
    """Every fit() train_version makes: (events it learns from, epochs asked, validated?)."""
    calls: list[tuple[int, int, bool]] = []
    real = pipeline.fit

    def spy(train, starts, cfg, **kwargs):
        calls.append((len(train), cfg.epochs, kwargs.get("validate") is not None))
        return real(train, starts, cfg, **kwargs)

    monkeypatch.setattr(pipeline, "fit", spy)
    return calls


def _state_equal(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k].cpu(), sb[k].cpu()) for k in sa)  # fit may use a GPU


def test_refit_publishes_a_network_trained_on_the_validation_sessions_too(data, fits, tmp_path):
    inputs = pipeline.fit_inputs(data, DataConfig(), "last-session", BASE.seed)
    run = pipeline.train_version(data, tmp_path, config=BASE, data_config=DataConfig(), progress=False)
    assert len(inputs.full) > len(inputs.train)
    assert fits == [(len(inputs.train), BASE.epochs, True), (len(inputs.full), run.fit.best_epoch, False)]
    assert run.metrics["train_events"] == len(inputs.full)
    assert run.metrics["refit"]["epochs"] == run.fit.best_epoch == len(run.metrics["refit"]["history"])
    assert run.metrics["val_mrr@20"] == run.fit.history[run.fit.best_epoch - 1]["val_mrr@20"]
    published = load_version(run.version_dir)
    assert list(published.item_ids) == [str(i) for i in inputs.full.item_ids]
    assert not _state_equal(published.model, run.fit.model)


def test_without_refit_the_early_stopping_network_is_published(data, fits, tmp_path):
    cfg = dataclasses.replace(BASE, refit=False)
    inputs = pipeline.fit_inputs(data, DataConfig(), "last-session", cfg.seed)
    run = pipeline.train_version(data, tmp_path, config=cfg, data_config=DataConfig(), progress=False)
    assert fits == [(len(inputs.train), cfg.epochs, True)]
    assert run.metrics["train_events"] == len(inputs.train) and "refit" not in run.metrics
    assert _state_equal(load_version(run.version_dir).model, run.fit.model)


def test_without_early_stopping_there_is_nothing_to_refit(data, fits, tmp_path):
    run = pipeline.train_version(data, tmp_path, config=BASE, data_config=DataConfig(), early_stopping=False,
                                 progress=False)
    assert len(fits) == 1 and fits[0][2] is False
    assert "refit" not in run.metrics


@pytest.fixture(scope="module")
def personalize_version(data, tmp_path_factory):
    cfg = dataclasses.replace(BASE, epochs=1, seed=7)
    run = pipeline.train_version(data, tmp_path_factory.mktemp("reg"), config=cfg, data_config=DataConfig(),
                                 holdout="personalize", early_stopping=False, progress=False)
    trained = pipeline.fit_inputs(data, DataConfig(), "personalize", cfg.seed, early_stopping=False).full
    return run, load_version(run.version_dir), set(trained.user_ids[np.unique(trained.user)])


def _untested_users(data, seed: int) -> set:
    """The users the personalize split of `seed` does not test, but for those the history-length filter keeps out of
    training (untested, never trained on)."""
    prep = pipeline.prepare(data, DataConfig())
    train = make_split("personalize", prep.data, prep.starts, seed=seed).train
    return set(train.user_ids[np.unique(train.user[prep.learns[train.user]])])


def test_evaluate_tests_exactly_the_users_a_personalize_holdout_kept_out_of_training(data, personalize_version,
                                                                                     capsys):
    run, loaded, trained_users = personalize_version
    assert run.metrics["holdout_seed"] == 7
    seed = split_seed("personalize", None, [loaded])  # `hrnn evaluate --protocol personalize` without --seed
    assert seed == 7 and _untested_users(data, seed) == trained_users
    assert capsys.readouterr().err == ""


def test_evaluate_with_another_personalize_seed_warns_that_it_tests_training_users(data, personalize_version, capsys):
    _, loaded, trained_users = personalize_version
    assert split_seed("personalize", 0, [loaded]) == 0
    assert "held out the personalize users of seed 7, not 0" in capsys.readouterr().err
    assert _untested_users(data, 0) != trained_users  # what the warning is about


def test_evaluate_warns_that_a_personalize_version_drew_its_users_before_every_user_was_evaluated(personalize_version,
                                                                                                   capsys):
    import copy

    _, loaded, _ = personalize_version
    assert loaded.metrics["holdout_population"] == "all users"
    older = copy.copy(loaded)  # as a version of an earlier build records it (the fixture's is shared)
    older.metrics = {k: v for k, v in loaded.metrics.items() if k != "holdout_population"}
    assert split_seed("personalize", None, [older]) == 7
    assert "drew its held-out personalize users before 2026-12-06" in capsys.readouterr().err


@pytest.mark.parametrize("data_config, step, setting", [
    (DataConfig(event_types=("foo",)), "event_types", "event_types = foo matches none of the file's types (click"),
    (DataConfig(min_item_support=100_000), "min_item_support", "min_item_support = 100000"),
])
def test_training_on_what_featurization_emptied_is_a_data_error_naming_the_step(data_config, step, setting):
    with pytest.raises(DataError, match=f"^events.csv: featurization left no events: step {step} ") as err:
        pipeline.train_version(_log_of_lengths([10] * 50 + [20] * 50), "/tmp/never-written", config=BASE,
                               data_config=data_config, progress=False)
    assert setting in str(err.value) and "events 1500 -> 0" in str(err.value)


def test_a_history_length_filter_that_keeps_every_user_out_of_training_is_a_data_error_naming_it():
    # users have 10 or 20 events: a window strictly between the two counts keeps nobody
    cfg = DataConfig(min_user_history_length_percentile=0.5, max_user_history_length_percentile=0.505)
    with pytest.raises(DataError, match="^events.csv: the user_history_length filter keeps no user for training: "
                                        "min/max_user_history_length_percentile = 0.5/0.505 keep users of 15 .. ") as e:
        pipeline.train_version(_log_of_lengths([10] * 50 + [20] * 50), "/tmp/never-written", config=BASE,
                               data_config=cfg, progress=False)
    assert "-1500 events, -100 users kept out of training" in str(e.value)


def _log_of_lengths(lengths: list[int], session: int = 0) -> Interactions:
    """User u has lengths[u] events of 7 items, a minute apart; with `session`, a day apart every `session` events."""
    day = 86_400_000
    users, items, ts = zip(*[(f"u{u:02d}", f"i{j % 7}", j * 60_000 + (j // session * day if session else 0))
                             for u, n in enumerate(lengths) for j in range(n)])
    return Interactions.from_columns(users, items, ts, source="events.csv")


def _names(ids, seqs) -> set[str]:
    return {str(ids[s.user]) for s in seqs}


def test_the_users_the_history_length_filter_keeps_out_of_training_are_evaluated_and_validated_but_never_learnt_from():
    log = _log_of_lengths([21] * 20 + [60, 60], session=7)  # three sessions or more each; max 0.9 keeps out the 60s
    cfg = DataConfig(max_user_history_length_percentile=0.9)
    out = {"u20", "u21"}
    prep = pipeline.prepare(log, cfg)
    split = make_split("last-session", prep.data, prep.starts)  # what `hrnn evaluate` scores
    assert out <= _names(prep.data.user_ids, split.test)
    inputs = pipeline.fit_inputs(log, cfg, "last-session", BASE.seed)
    for learnt in (inputs.full, inputs.train):
        assert not out & set(learnt.user_ids[np.unique(learnt.user)]) and len(np.unique(learnt.user)) == 20
    val = inputs.validation
    assert _names(val.train.user_ids, val.test) == {f"u{u:02d}" for u in range(22)}  # early stopping scores them
    assert list(val.train.item_ids) == list(inputs.full.item_ids)  # in the network's codes
    assert prep.report.history_users_out == 2 and "-120 events, -2 users kept out of training" in str(prep.report)


def test_validation_targets_only_items_the_early_stopping_run_learns():
    """An item a learning user has only in the validation session, and a filtered user has earlier: scored, it
    could only be a miss (the early-stopping network never trains on it), as before the filtered users were
    validated."""
    base = _log_of_lengths([21] * 20 + [60, 60], session=7)  # a session holds each of the 7 items
    items = base.item_ids[base.item].astype(object)
    users = base.user_ids[base.user]
    items[np.flatnonzero(users == "u00")[10]] = "rare"  # u00's last session
    items[np.flatnonzero(users == "u20")[1]] = "rare"  # the first session of a user kept out of training
    log = Interactions.from_columns(users, items, base.ts_ms, source="events.csv")
    val = pipeline.fit_inputs(log, DataConfig(max_user_history_length_percentile=0.9), "last-session",
                              BASE.seed).validation
    targets = {str(val.train.item_ids[s.items[t]]) for s in val.test for t in s.targets}
    assert "rare" not in targets and "i3" in targets
    assert "rare" not in set(val.train.item_ids[val.train.item])  # the early-stopping run never learns it


@pytest.mark.parametrize("holdout, per_user", [("last-session", 1), ("none", 1), ("last-session", 2)])
def test_a_log_with_no_next_event_to_learn_is_a_data_error_not_a_published_random_network(tmp_path, holdout, per_user):
    """One event per user (USER_ID mapped to an event id, say), or two in two sessions of which the holdout keeps
    the second: there is no training pair, and the network would be published at its starting weights."""
    users, items, ts = zip(*[(f"e{u}", f"i{u % 7}", u * 60_000 + j * 86_400_000) for u in range(40)
                             for j in range(per_user)])
    log = Interactions.from_columns(users, items, ts, source="events.csv")
    with pytest.raises(DataError, match=r"^events.csv: no user has two events in what training may learn from"):
        pipeline.train_version(log, tmp_path / "reg", config=BASE, data_config=DataConfig(), holdout=holdout,
                               progress=False)
    assert not (tmp_path / "reg").exists()


@pytest.mark.parametrize("data_config", [DataConfig(event_type_weights={"click": 0, "purchase": 0}),
                                         DataConfig(event_types=("purchase",), event_type_weights={"purchase": 0})])
def test_event_type_weights_that_leave_nothing_to_learn_publish_nothing(data, data_config, tmp_path):
    with pytest.raises(ConfigError, match="^event_type_weights give every training target a weight of 0"):
        pipeline.train_version(data, tmp_path, config=BASE, data_config=data_config, progress=False)
    assert not any(tmp_path.iterdir())


@pytest.mark.parametrize("flags, setting", [(["--variant", "session-only"], "variant session-only"),
                                            (["--predict-session-start", "false"], "predict_session_start false")])
def test_a_variant_that_learns_no_pair_of_one_event_sessions_exits_2_naming_it_and_publishes_nothing(
        tmp_path, capsys, flags, setting):
    """Every session has one event (an hour apart, the timeout half an hour): next-in-session pairs are the only
    targets these settings learn, and there is none; the untrained network must not become CURRENT."""
    from stream.cli import main

    log = tmp_path / "log.csv"
    log.write_text("USER_ID,ITEM_ID,TIMESTAMP\n" + "".join(
        f"u{u},i{(u * 7 + k * 3) % 40},{1767225600 + u * 10 + k * 3600}\n" for u in range(60) for k in range(8)))
    reg = tmp_path / "reg"
    assert main(["train", "--data", str(log), "--registry", str(reg), "--epochs", "1", "--hidden-dimension", "32",
                 "--device", "cpu", "--quiet", *flags]) == 2
    err = capsys.readouterr().err
    assert f"error: {setting} learns only next-in-session pairs" in err
    assert "no session of the events trained on has two events" in err and "session_timeout_s" in err
    assert not reg.exists() or not any(reg.iterdir())


def test_when_every_pair_lies_in_a_last_session_training_skips_validation_rather_than_learn_nothing(tmp_path, fits):
    """One event a day, then two a minute apart the next: held out for validation, those pairs would leave the
    early-stopping run one event per user, nothing to learn (and a refusal that no user has two events)."""
    users, items, ts = zip(*[(f"u{u}", f"i{(u + j) % 7}", u * 60_000 + min(j, 1) * 86_400_000 + j * 60_000)
                             for u in range(40) for j in range(3)])
    log = Interactions.from_columns(users, items, ts, source="events.csv")
    run = pipeline.train_version(log, tmp_path, config=BASE, data_config=DataConfig(), holdout="none", progress=False)
    assert fits == [(len(log), BASE.epochs, False)]
    assert all(h["loss"] > 0 for h in run.metrics["history"]) and "val_mrr@20" not in run.metrics
