"""Knowledge distillation: the trained network also learns its teachers' mean predictions, row by row
for exactly its own context, and `hrnn train` trains the teachers first (distill_teachers > 0)."""
from __future__ import annotations

import copy
import dataclasses

import numpy as np
import pytest
import torch
import torch.nn.functional as F

import model.pipeline as pipeline
from model.config import DataConfig, HRNNConfig
from model.errors import ConfigError
from model.inference import HRNNScorer
from model.losses import NEG_INF
from model.network import HRNN
from model.sessions import session_starts
from model.splits import last_session_split
from model.synth import generate
from model.train import Teachers, TrainSequences, distillation_loss, fit, run_epoch

NO_DROPOUT = dict(dropout_session=0.0, dropout_user=0.0, dropout_init=0.0)
SMALL = HRNNConfig(hidden_dimension=32, batch_size=16, n_sample=16, epochs=1, repeat_head=True, history_length=20)


@pytest.fixture(scope="module")
def data():
    return generate(300, 150, seed=3, repeat_share=0.3, events_per_user=20)


def test_the_distillation_loss_is_zero_at_the_soft_targets_and_ignores_empty_columns():
    logits = torch.tensor([[2.0, 0.5, NEG_INF], [0.0, 1.0, 3.0]])
    soft = F.softmax(logits, dim=1)
    at_target = distillation_loss(logits, soft)
    torch.testing.assert_close(at_target, torch.zeros(2), atol=1e-6, rtol=0)
    away = distillation_loss(torch.tensor([[0.5, 2.0, NEG_INF], [3.0, 1.0, 0.0]]), soft)
    assert torch.isfinite(away).all() and (away > 0.1).all()


def _epoch_loss(model: HRNN, cfg: HRNNConfig, seqs: TrainSequences, teachers: Teachers | None) -> float:
    """One epoch's mean loss with frozen weights (learning rate 0), the same sampled negatives every time."""
    torch.manual_seed(0)
    opt = torch.optim.SGD(model.parameters(), lr=0.0)
    return run_epoch(model, seqs, cfg, opt, np.random.default_rng(0), torch.device("cpu"), teachers=teachers)["loss"]


@pytest.mark.parametrize("repeat_head", [False, True])
def test_teachers_predict_the_rows_of_the_students_own_context(data, repeat_head):
    cfg = dataclasses.replace(SMALL, repeat_head=repeat_head, **NO_DROPOUT)
    seqs = TrainSequences.build(data, session_starts(data, 1800), cfg)
    torch.manual_seed(1)
    student = HRNN(data.n_items, cfg)
    alone = _epoch_loss(student, cfg, seqs, None)
    # A teacher with the student's weights predicts exactly what the student does on every row, window
    # included, only if it advanced through the same users, sessions and events: nothing to distil then.
    twin = _epoch_loss(student, cfg, seqs, Teachers([copy.deepcopy(student)]))
    assert twin == pytest.approx(alone, abs=1e-5)
    torch.manual_seed(2)
    other = _epoch_loss(student, cfg, seqs, Teachers([HRNN(data.n_items, cfg)]))
    assert other > alone + 1e-3


def _kl_to(teacher: HRNN, student: HRNN, split) -> float:
    """Mean KL(teacher || student) of their full-catalogue predictions on the test sequences."""
    scored = []
    for m in (teacher, student):
        s = HRNNScorer(m)
        s.fit(split.train, split.train_starts)
        scored.append(torch.cat([torch.from_numpy(x) for x in s.score(split.test)]))
    t, s = (F.log_softmax(x.clamp(min=NEG_INF), dim=1) for x in scored)
    return float(F.kl_div(s, t, log_target=True, reduction="batchmean"))


def test_distillation_pulls_the_network_towards_its_teachers_predictions(data):
    split = last_session_split(data, session_starts(data, 1800))
    cfg = dataclasses.replace(SMALL, epochs=2, bptt=4, learning_rate=0.01)
    teacher = fit(split.train, split.train_starts, dataclasses.replace(cfg, seed=7, epochs=4), progress=False,
                  device="cpu")
    plain = fit(split.train, split.train_starts, cfg, progress=False, device="cpu").model
    taught = fit(split.train, split.train_starts, dataclasses.replace(cfg, distill_weight=5.0), progress=False,
                 device="cpu", teachers=[teacher.model]).model
    assert _kl_to(teacher.model, taught, split) < 0.8 * _kl_to(teacher.model, plain, split)  # .40 vs .72


def test_hrnn_train_trains_the_teachers_first_and_each_run_learns_from_teachers_of_the_same_events(
        data, tmp_path, monkeypatch):
    calls = []
    real = pipeline.fit

    def spy(train, starts, cfg, **kwargs):
        result = real(train, starts, cfg, **kwargs)
        calls.append({"events": len(train), "seed": cfg.seed, "model": result.model,
                      "teachers": kwargs.get("teachers") or []})
        return result

    monkeypatch.setattr(pipeline, "fit", spy)
    cfg = dataclasses.replace(SMALL, epochs=2, distill_teachers=2, seed=42)
    inputs = pipeline.fit_inputs(data, DataConfig(), "last-session", cfg.seed)
    run = pipeline.train_version(data, tmp_path, config=cfg, data_config=DataConfig(), progress=False)
    assert [c["seed"] for c in calls] == [43, 43, 44, 44, 42, 42]
    assert [len(c["teachers"]) for c in calls] == [0, 0, 0, 0, 2, 2]
    early, refit = calls[4], calls[5]
    # the early-stopping run learns from the teachers that never saw the validation sessions either
    assert early["events"] == len(inputs.train) and early["teachers"] == [calls[0]["model"], calls[2]["model"]]
    assert refit["events"] == len(inputs.full) and refit["teachers"] == [calls[1]["model"], calls[3]["model"]]
    assert run.metrics["distill"]["teachers"] == 2
    assert [set(v) for v in run.metrics["distill"]["teacher_validation"]] == [{"val_mrr@20", "val_recall@20"}] * 2


@pytest.mark.parametrize("field,value", [("distill_teachers", -1), ("distill_teachers", 17), ("distill_weight", -0.5)])
def test_distillation_settings_out_of_range_are_config_errors(field, value):
    with pytest.raises(ConfigError, match=field):
        dataclasses.replace(HRNNConfig(), **{field: value}).validate()
