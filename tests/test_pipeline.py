"""`train_version`: early stopping on each user's last training session, then (refit) the published
network learns from those sessions too, for the epoch count early stopping chose."""
from __future__ import annotations

import dataclasses

import pytest
import torch

import model.pipeline as pipeline
from model.artifact import load_version
from model.config import DataConfig, HRNNConfig
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
