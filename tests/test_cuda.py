"""On a GPU: training learns, and a GPU serves what a CPU serves, so states and versions move between them.

Skipped where torch sees no CUDA device (CI). The per-device inference contracts are in
test_inference.py (its `device` fixture); these tests compare one device against the other.
"""
from __future__ import annotations

import numpy as np
import pytest
import torch

from model.artifact import latest_version_dir, load_version, save_version
from model.baselines import make_baseline
from model.config import DataConfig, HRNNConfig
from model.evaluate import evaluate
from model.inference import HRNNScorer, Recommender
from model.sessions import session_starts
from model.splits import last_session_split
from model.state import decode_state, encode_state
from model.synth import generate
from model.train import fit
from test_inference import _events_of, _saved_version
from worker_testkit import make_events, make_registry, offline, produce, recommendations, running, settings_for

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

# Summation order differs between the devices' kernels; scores agree to float32 rounding, not bitwise.
TOL = dict(rtol=1e-4, atol=1e-4)


@pytest.fixture(scope="module")
def version(tmp_path_factory):
    """test_inference's repeat-head HRNN-Init version (trained-looking head, calibrated offset, H=8)."""
    return _saved_version(tmp_path_factory.mktemp("reg"), "hrnn-init", True, 8)


def test_the_gpu_scores_and_states_equal_the_cpus(version):
    data, path = version
    cpu, gpu = Recommender.load(path, "cpu"), Recommender.load(path, "cuda")
    assert next(gpu.model.parameters()).device.type == "cuda"
    events = sorted(sum((_events_of(data, u) for u in range(6)), []), key=lambda e: e.ts_ms)
    a, b = cpu.advance({}, events), gpu.advance({}, events)
    np.testing.assert_allclose(b.scores.cpu().numpy(), a.scores.numpy(), **TOL)
    for user, s in a.states.items():
        np.testing.assert_allclose(b.states[user].user_hidden, s.user_hidden, **TOL)
        np.testing.assert_allclose(b.states[user].session_hidden, s.session_hidden, **TOL)
        assert b.states[user].history == s.history


def test_a_state_stored_by_a_gpu_worker_continues_on_a_cpu_one_and_back(version):
    data, path = version
    cpu, gpu = Recommender.load(path, "cpu"), Recommender.load(path, "cuda")
    events = _events_of(data, 7)
    u, half = events[0].user_id, len(events) // 2
    all_cpu = cpu.advance({}, events)
    stored = decode_state(encode_state(gpu.advance({}, events[:half]).states[u]))  # as RocksDB holds it
    moved = cpu.advance({u: stored}, events[half:])
    np.testing.assert_allclose(moved.scores.numpy(), all_cpu.scores.numpy()[half:], **TOL)
    back = gpu.advance({u: decode_state(encode_state(moved.states[u]))}, events[-1:])
    again = cpu.advance({u: moved.states[u]}, events[-1:])
    np.testing.assert_allclose(back.scores.cpu().numpy(), again.scores.numpy(), **TOL)


def test_the_offline_scorer_on_the_gpu_ranks_as_on_the_cpu(version):
    data, path = version
    loaded_cpu, loaded_gpu = load_version(path, "cpu"), load_version(path, "cuda")
    split = last_session_split(data, session_starts(data, 1800))
    scorers = {"cpu": HRNNScorer(loaded_cpu.model), "gpu": HRNNScorer(loaded_gpu.model)}
    for s in scorers.values():
        s.fit(split.train, split.train_starts)
    res = evaluate(split, scorers, progress=False).models
    assert res["gpu"]["recall@20"] == pytest.approx(res["cpu"]["recall@20"], abs=1e-9)
    assert res["gpu"]["mrr@20"] == pytest.approx(res["cpu"]["mrr@20"], abs=1e-4)


def test_training_on_the_gpu_learns_and_its_version_loads_on_a_cpu(tmp_path):
    data = generate(1500, 400, seed=2)
    split = last_session_split(data, session_starts(data, 1800))
    cfg = HRNNConfig(hidden_dimension=64, epochs=3, batch_size=32, repeat_head=True)
    trained = fit(split.train, split.train_starts, cfg, progress=False, device="cuda").model
    assert next(trained.parameters()).device.type == "cuda"
    scorers = {"hrnn": HRNNScorer(trained), "pop": make_baseline("pop")}
    for s in scorers.values():
        s.fit(split.train, split.train_starts)
    res = evaluate(split, scorers, progress=False).models
    assert res["hrnn"]["recall@20"] > 1.5 * res["pop"]["recall@20"]
    save_version(tmp_path, trained.eval(), cfg, DataConfig(), list(data.item_ids), list(data.event_types))
    on_cpu = load_version(latest_version_dir(tmp_path), "cpu").model
    for name, p in on_cpu.state_dict().items():
        torch.testing.assert_close(p, trained.state_dict()[name].cpu(), rtol=0, atol=0)


@pytest.mark.broker
def test_a_worker_on_the_gpu_streams_what_the_offline_api_computes_on_a_cpu(broker, tmp_path):
    registry = make_registry(tmp_path / "registry")
    settings = settings_for(broker.bootstrap, registry, tmp_path / "state", partitions=1, device="cuda",
                            batch_size=32)
    events = make_events(200, 20)
    with running(settings) as worker:
        assert next(worker.models.current().model.parameters()).device.type == "cuda"
        produce(broker.bootstrap, settings.input_topic, events)
        recs = recommendations(broker.bootstrap, settings.output_topic, len(events))
    want, _ = offline(registry, events)  # one partition: the input order is the serving order
    got = sorted(recs, key=lambda r: r["source_offset"])
    assert len(got) == len(want)
    for r, items in zip(got, want):
        np.testing.assert_allclose([g["score"] for g in r["items"]], [s for _, s in items], **TOL)
    differing = sum([g["item_id"] for g in r["items"]] != [i for i, _ in items] for r, items in zip(got, want))
    assert differing <= len(want) // 50  # only near-ties may swap places
