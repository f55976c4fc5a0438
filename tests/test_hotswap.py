"""ModelHolder: background load + validation, swap between batches, refusal of broken versions."""
from __future__ import annotations

import gc
import json
import logging
import shutil
import threading
import time
import uuid
from collections import Counter
from pathlib import Path

import numpy as np
import pytest
import torch

from model.artifact import set_current
from model.config import DataConfig, HRNNConfig
from model.inference import Recommender, StepInput
from model.network import HRNN
from model.pipeline import train_version
from model.synth import generate
from stream.hotswap import ModelHolder, ModelRefused, validate_version
from stream.observability import WorkerMetrics
from worker_testkit import resign

TINY = HRNNConfig(hidden_dimension=32, epochs=1, n_sample=32, batch_size=32)


def _train(registry: Path, seed: int) -> Path:
    data = generate(200, 80, seed=seed, events_per_user=10)
    return train_version(data, registry, config=TINY, data_config=DataConfig(), early_stopping=False,
                         progress=False, make_current=False).version_dir


@pytest.fixture(scope="module")
def versions(tmp_path_factory) -> tuple[Path, Path, Path]:
    """A registry with two trained versions; CURRENT is the first."""
    reg = tmp_path_factory.mktemp("registry")
    a = _train(reg, seed=1)
    b = _train(reg, seed=2)
    set_current(reg, a.name)
    return reg, a, b


def _copy(src: Path, name: str) -> Path:
    dst = src.parent / f"{name}-{uuid.uuid4().hex[:6]}"
    shutil.copytree(src, dst)
    resign(dst)
    return dst


def broken_copy(src: Path, kind: str) -> Path:
    d = _copy(src, kind)
    if kind == "integrity":  # bytes flipped after publishing: the manifest no longer matches
        raw = bytearray((d / "weights.pt").read_bytes())
        raw[len(raw) // 2] ^= 0xFF
        (d / "weights.pt").write_bytes(bytes(raw))
        return d
    if kind == "shape":
        items = json.loads((d / "items.json").read_text())["item_ids"]
        other = HRNN(len(items), HRNNConfig(hidden_dimension=48))
        torch.save(other.state_dict(), d / "weights.pt")
    elif kind == "unreadable":
        (d / "config.json").write_text("{ not json")
    elif kind == "nonfinite":
        state = torch.load(d / "weights.pt", weights_only=True)
        state["out_bias"][0] = float("nan")
        torch.save(state, d / "weights.pt")
    elif kind == "item_index":
        items = json.loads((d / "items.json").read_text())
        items["item_ids"][1] = items["item_ids"][0]
        (d / "items.json").write_text(json.dumps(items))
    resign(d)
    return d


def test_a_trained_version_validates_and_serves(versions):
    _, a, _ = versions
    rec = validate_version(a)
    out = rec.recommend({}, [StepInput("u", rec.item_ids[0], "click", 1_767_225_600_000)], k=5)
    assert rec.version == a.name and len(out.items[0]) == 5


def test_the_log_says_which_version_serves_and_on_which_device(versions, caplog):
    reg, a, _ = versions
    with caplog.at_level(logging.INFO, logger="stream.hotswap"), ModelHolder.open(reg, device="cpu",
                                                                                  version_dir=a):
        pass
    said = [r for r in caplog.records if r.getMessage() == "serving model version"]
    assert said and said[0].version == a.name and said[0].device.startswith("cpu (")


@pytest.mark.parametrize("kind", ["integrity", "shape", "unreadable", "nonfinite", "item_index"])
def test_broken_versions_are_refused_with_their_reason(versions, kind):
    _, a, _ = versions
    with pytest.raises(ModelRefused) as err:
        validate_version(broken_copy(a, kind))
    assert err.value.reason == kind


def test_missing_and_mismatched_versions_are_refused(versions, tmp_path):
    _, a, b = versions
    with pytest.raises(ModelRefused) as err:
        validate_version(tmp_path / "nothing-here")
    assert err.value.reason == "missing"
    with pytest.raises(ModelRefused) as err:
        validate_version(b, expected_version=a.name)
    assert err.value.reason == "mismatch"


def test_an_empty_item_index_is_refused_for_its_item_index_not_for_the_weights_it_cannot_fit(versions):
    _, a, _ = versions
    d = _copy(a, "no-items")
    items = json.loads((d / "items.json").read_text())
    (d / "items.json").write_text(json.dumps({**items, "item_ids": []}))
    resign(d)
    with pytest.raises(ModelRefused) as err:
        validate_version(d)
    assert err.value.reason == "item_index"


def test_a_version_this_user_may_not_enter_is_refused_as_unreadable_not_raised(versions, monkeypatch):
    _, a, _ = versions
    real = Path.is_file

    def denied(self):  # as for a user without the trainer's rights (root, running the tests, has them)
        if self.parent == a:
            raise PermissionError(13, "Permission denied")
        return real(self)

    monkeypatch.setattr(Path, "is_file", denied)
    with pytest.raises(ModelRefused) as err:
        validate_version(a)
    assert err.value.reason == "unreadable" and "Permission denied" in str(err.value)


def test_a_version_swaps_in_only_between_batches(versions):
    reg, a, b = versions
    metrics = WorkerMetrics()
    with ModelHolder.open(reg, device="cpu", metrics=metrics) as holder:
        assert holder.current().version == a.name
        assert holder.swap_if_ready() is None
        assert holder.request(b, b.name)
        assert holder.wait_idle(60)
        assert holder.current().version == a.name  # loaded, but the worker has not swapped yet
        assert holder.stats().pending == b.name
        new = holder.swap_if_ready()
        assert new is not None and new.version == b.name and holder.current() is new
        assert holder.swap_if_ready() is None
        stats = holder.stats()
        assert stats.swaps == 1 and stats.serving == b.name and stats.pending is None
        assert not holder.request(b, b.name)  # already serving: nothing to do
    assert metrics.value("hrnn_model_swaps_total") == 1
    assert metrics.value("hrnn_model_version_info", {"version": b.name}) == 1


def test_a_loaded_version_rebuilds_stored_states_before_it_can_swap_in(versions):
    reg, a, b = versions
    metrics = WorkerMetrics()
    with ModelHolder.open(reg, device="cpu", metrics=metrics) as holder:
        serving = holder.current()
        items = serving.item_ids
        events = [StepInput(f"user-{u}", items[(u * 7 + j) % len(items)], "click", 1_700_000_000_000 + j * 60_000)
                  for u in range(3) for j in range(5)]
        stored = serving.advance({}, events).states
        chunks = [{u: stored[u] for u in ("user-0", "user-1")}, {"user-2": stored["user-2"]}]
        holder.prebuild_from(lambda: iter(chunks), max_users=2)
        assert holder.request(b, b.name) and holder.wait_idle(60)
        new = holder.swap_if_ready()
    assert new is not None and sorted(new.prebuilt) == ["user-0", "user-1"]  # capped at max_users
    want = new.rebuild([stored["user-0"]])[0]
    assert np.allclose(new.prebuilt["user-0"].hidden, [want.user_hidden, want.session_hidden], atol=1e-6)
    assert holder.stats().last_prebuilt == 2 and metrics.value("hrnn_prebuilt_states_total") == 2


def test_a_broken_version_is_refused_and_the_old_one_keeps_serving(versions, caplog):
    reg, a, _ = versions
    metrics = WorkerMetrics()
    bad = broken_copy(a, "integrity")
    with ModelHolder.open(reg, device="cpu", metrics=metrics) as holder, caplog.at_level(logging.ERROR):
        serving = holder.current()
        assert holder.request(bad, bad.name)
        assert holder.wait_idle(60)
        assert holder.swap_if_ready() is None and holder.current() is serving
        stats = holder.stats()
        assert stats.refused == {"integrity": 1} and stats.swaps == 0
        assert "checksum mismatch" in stats.last_refusal
    assert metrics.value("hrnn_model_refused_total", {"reason": "integrity"}) == 1
    refusals = [r for r in caplog.records if r.name == "stream.hotswap" and "refused" in r.getMessage()]
    assert refusals and refusals[0].reason == "integrity" and a.name in refusals[0].getMessage()


def test_a_manifest_of_the_wrong_shape_is_refused_and_a_later_version_still_swaps_in(versions):
    reg, a, b = versions
    odd = _copy(a, "odd-manifest")
    manifest = json.loads((odd / "manifest.json").read_text())
    manifest["files"] = sorted(manifest["files"])  # valid JSON, but not a name -> sha256 map
    (odd / "manifest.json").write_text(json.dumps(manifest))
    with ModelHolder.open(reg, device="cpu") as holder:
        assert holder.request(odd, odd.name) and holder.wait_idle(60)
        assert holder.stats().refused == {"integrity": 1} and "not a version manifest" in holder.stats().last_refusal
        assert holder.request(b, b.name) and holder.wait_idle(60)
        assert holder.swap_if_ready().version == b.name


def test_a_check_that_fails_unforeseen_is_refused_as_unreadable_and_the_loader_goes_on(versions, monkeypatch):
    import stream.hotswap as hotswap

    reg, a, b = versions
    real = hotswap.validate_version

    def crashes_on_a(path, **kw):
        if Path(path) == a:
            raise RecursionError("a check nobody foresaw")
        return real(path, **kw)

    with ModelHolder.open(reg, device="cpu", version_dir=b) as holder:
        monkeypatch.setattr(hotswap, "validate_version", crashes_on_a)
        assert holder.request(a, a.name) and holder.wait_idle(60)
        stats = holder.stats()
        assert stats.refused == {"unreadable": 1} and "RecursionError: a check nobody foresaw" in stats.last_refusal
        assert holder.swap_if_ready() is None and holder.current().version == b.name
        monkeypatch.setattr(hotswap, "validate_version", real)
        assert holder.request(a, a.name) and holder.wait_idle(60)
        assert holder.swap_if_ready().version == a.name


def test_the_latest_request_wins(versions):
    reg, a, b = versions
    with ModelHolder.open(reg, device="cpu") as holder:
        holder.request(b, b.name)
        holder.request(a, a.name)  # back to the serving version (a rollback) before b was swapped in
        assert holder.wait_idle(60)
        assert holder.swap_if_ready() is None and holder.current().version == a.name


def test_a_loaded_version_waiting_to_swap_in_still_swaps_in_after_a_later_request_is_refused(versions):
    reg, a, b = versions
    with ModelHolder.open(reg, device="cpu") as holder:
        assert holder.request(b, b.name) and holder.wait_idle(60)
        assert holder.stats().pending == b.name  # loaded, waiting for a batch boundary
        bad = broken_copy(b, "integrity")
        assert holder.request(bad, bad.name) and holder.wait_idle(60)  # supersedes b, then is refused
        assert holder.swap_if_ready().version == b.name  # as if the worker had swapped before the bad request


@pytest.mark.parametrize("before", ["pending", "loading"])
@pytest.mark.parametrize("change", ["a rollout", "the end of a canary", "a canary"])
def test_a_refused_request_leaves_the_change_it_superseded_under_way(versions, monkeypatch, before, change):
    reg, a, b = versions
    bad = broken_copy(b, "integrity")
    with ModelHolder.open(reg, device="cpu") as holder:
        if change == "the end of a canary":
            assert holder.request(b, b.name, share=0.1) and holder.wait_idle(60)
            holder.swap_if_ready()
        gate = _held(holder, before == "loading")
        holder.request(a if change == "the end of a canary" else b, share=0.2 if change == "a canary" else 1.0)
        if change != "the end of a canary":  # (that one loads nothing: pending at once)
            gate.until_under_way(holder, b.name)
        held = _HeldValidation(monkeypatch, Path("/nowhere"))
        assert holder.request(bad, bad.name)
        gate.open()
        assert holder.wait_idle(60)
        holder.swap_if_ready()
        want = {"a rollout": (b.name, None, 0.0), "the end of a canary": (a.name, None, 0.0),
                "a canary": (a.name, b.name, 0.2)}[change]
        assert _serves(holder) == want  # as if the worker had swapped before the bad request
        assert held.calls == [bad] and holder.stats().refused == {"integrity": 1}  # nothing loaded twice


def test_an_announced_path_from_another_host_resolves_in_the_local_registry(versions):
    reg, _, b = versions
    with ModelHolder.open(reg, device="cpu") as holder:
        assert holder.request(f"/elsewhere/registry/{b.name}", b.name)
        assert holder.wait_idle(60)
        assert holder.swap_if_ready().version == b.name


def test_a_broken_starting_version_fails_loudly(versions, tmp_path):
    _, a, _ = versions
    reg = tmp_path / "reg"
    reg.mkdir()
    bad = broken_copy(a, "shape")
    shutil.copytree(bad, reg / bad.name)
    set_current(reg, bad.name)
    with pytest.raises(ModelRefused, match="shape"):
        ModelHolder.open(reg, device="cpu")


def test_batches_never_mix_versions_while_swapping(versions):
    """A worker-like loop: current() at batch start, swap_if_ready() between batches, requests from another thread."""
    reg, a, b = versions
    with ModelHolder.open(reg, device="cpu") as holder:
        seen: list[set[str]] = []
        stop = threading.Event()

        def announcer() -> None:
            for target in (b, a, b):
                holder.request(target, target.name)
                holder.wait_idle(60)
            stop.set()

        t = threading.Thread(target=announcer)
        t.start()
        batches = 0
        while not stop.is_set() or holder.stats().pending:
            holder.swap_if_ready()
            rec = holder.current()
            events = [StepInput(f"u{i}", rec.item_ids[i % len(rec.item_ids)], "click", 1_767_225_600_000 + i)
                      for i in range(8)]
            out = rec.recommend({}, events, k=3)
            seen.append({out.model_version})
            batches += 1
        t.join()
        assert all(len(s) == 1 for s in seen)
        assert holder.current().version == b.name and holder.stats().swaps >= 1


@pytest.mark.broker
def test_announced_versions_swap_in_and_a_broken_announcement_is_refused(versions, broker):
    from stream.announce import announce

    reg, a, b = versions
    topic = f"hrnn.model-updates-{uuid.uuid4().hex[:8]}"
    bad = broken_copy(b, "integrity")
    with ModelHolder.open(reg, device="cpu") as holder:
        watcher = holder.follow(broker.bootstrap, topic)
        assert watcher.wait_caught_up(20)
        announce(broker.bootstrap, topic, bad.name, bad)
        assert _until(lambda: holder.stats().refused.get("integrity") == 1 and holder.wait_idle(0))
        assert holder.swap_if_ready() is None and holder.current().version == a.name
        announce(broker.bootstrap, topic, b.name, b, reason="retrain")
        assert _until(lambda: holder.swap_if_ready() is not None)
        assert holder.current().version == b.name
        assert holder.stats().swaps == 1


def _until(cond, timeout_s: float = 30.0) -> bool:
    import time

    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if cond():
            return True
        time.sleep(0.05)
    return False


def test_a_version_requested_again_after_a_cancel_is_loaded(versions):
    reg, a, b = versions
    with ModelHolder.open(reg, device="cpu") as holder:
        holder.request(b, b.name)
        holder.request(a, a.name)  # cancels b (maybe while it loads)
        holder.request(b, b.name)  # and b again: it must not be lost with the cancelled load
        assert holder.wait_idle(60)
        assert holder.swap_if_ready().version == b.name


def test_a_canary_serves_beside_the_stable_version_and_is_promoted_without_loading_again(versions):
    reg, a, b = versions
    metrics = WorkerMetrics()
    with ModelHolder.open(reg, device="cpu", metrics=metrics) as holder:
        stable = holder.current()
        assert holder.request(b, b.name, share=0.3) and holder.wait_idle(60)
        assert holder.serving().canary is None  # loaded, not yet swapped in
        assert holder.swap_if_ready() is None  # the stable version did not change
        serving = holder.serving()
        assert serving.stable is stable and serving.canary.version == b.name and serving.share == 0.3
        assert metrics.value("hrnn_model_version_info", {"version": b.name}) == 0.3
        assert metrics.value("hrnn_model_version_info", {"version": a.name}) == 0.7
        canary = serving.canary
        assert not holder.request(b, b.name, share=0.5)  # a new share: nothing to load
        holder.swap_if_ready()
        assert holder.serving().canary is canary and holder.serving().share == 0.5
        assert not holder.request(b, b.name)  # promoted: the canary's model becomes the stable one
        assert holder.wait_idle(60) and holder.swap_if_ready() is canary
        assert holder.serving() == type(serving)(canary)
        stats = holder.stats()
        assert (stats.serving, stats.canary, stats.swaps) == (b.name, None, 1)
    assert metrics.value("hrnn_model_version_info", {"version": b.name}) == 1
    assert metrics.value("hrnn_model_version_info", {"version": a.name}) is None


def test_a_canary_prebuilds_its_own_users_and_its_promotion_the_others(versions):
    from stream.canary import in_canary

    reg, a, b = versions
    with ModelHolder.open(reg, device="cpu") as holder:
        serving = holder.current()
        items = serving.item_ids
        events = [StepInput(f"user-{u}", items[(u * 7 + j) % len(items)], "click", 1_700_000_000_000 + j * 60_000)
                  for u in range(40) for j in range(3)]
        stored = serving.advance({}, events).states
        holder.prebuild_from(lambda: iter([stored]), max_users=1000)
        assert holder.request(b, b.name, share=0.5) and holder.wait_idle(60)
        holder.swap_if_ready()
        canary = holder.serving().canary
        mine = {u for u in stored if in_canary(u, b.name, 0.5)}
        assert 0 < len(mine) < 40 and set(canary.prebuilt) == mine
        canary.prebuilt.clear()  # as if the canary's users had all been served since, their states now its own:
        stored.update(zip(mine, canary.rebuild([stored[u] for u in mine])))
        assert not holder.request(b, b.name) and holder.wait_idle(60)
        assert holder.swap_if_ready() is canary and set(canary.prebuilt) == set(stored) - mine


def test_requesting_the_stable_version_ends_a_canary(versions):
    reg, a, b = versions
    with ModelHolder.open(reg, device="cpu") as holder:
        assert holder.request(b, b.name, share=0.2) and holder.wait_idle(60)
        holder.swap_if_ready()
        assert holder.stats().canary == b.name
        assert not holder.request(a, a.name)
        assert holder.swap_if_ready() is None
        assert holder.serving().canary is None and holder.current().version == a.name
        assert holder.stats().swaps == 0


def test_a_full_rollout_of_another_version_ends_the_canary(versions):
    reg, a, b = versions
    third = _copy(a, "third")
    with ModelHolder.open(reg, device="cpu") as holder:
        assert holder.request(b, b.name, share=0.2) and holder.wait_idle(60)
        holder.swap_if_ready()
        assert holder.request(third, third.name) and holder.wait_idle(60)
        assert holder.serving().canary.version == b.name  # until the swap
        assert holder.swap_if_ready().version == third.name
        assert holder.serving().canary is None


def test_a_broken_canary_is_refused_and_nothing_changes(versions):
    reg, a, _ = versions
    bad = broken_copy(a, "nonfinite")
    with ModelHolder.open(reg, device="cpu") as holder:
        assert holder.request(bad, bad.name, share=0.5) and holder.wait_idle(60)
        assert holder.swap_if_ready() is None and holder.serving().canary is None
        assert holder.stats().refused == {"nonfinite": 1}


class _LoadGate:
    """A prebuild source that holds the loader (every load prebuilds) until opened: a change requested before
    then finds the one before it still loading. Opened at once, it lets each load through."""

    def __init__(self, opened: bool, let_through: int = 0) -> None:
        self.loading, self.opened = threading.Event(), threading.Event()
        self.let_through = let_through  # the first loads pass unheld
        if opened:
            self.opened.set()

    def __call__(self):
        if self.let_through:
            self.let_through -= 1
            return iter([{}])
        self.loading.set()
        assert self.opened.wait(60)
        return iter([{}])

    def until_under_way(self, holder: ModelHolder, version: str) -> None:
        """Until `version` is loading (held at the gate) or, with the gate open, pending."""
        if self.opened.is_set():
            assert holder.wait_idle(60) and holder.stats().pending == version
        else:
            assert self.loading.wait(60) and holder.stats().loading == version

    def open(self) -> None:
        self.opened.set()


def _held(holder: ModelHolder, still_loading: bool) -> _LoadGate:
    gate = _LoadGate(opened=not still_loading)
    holder.prebuild_from(gate, max_users=10)
    return gate


def _serves(holder: ModelHolder) -> tuple[str, str | None, float]:
    serving = holder.serving()
    return serving.stable.version, serving.canary and serving.canary.version, serving.share


@pytest.mark.parametrize("share", [0.1, 0.2])
@pytest.mark.parametrize("rollout", ["loading", "pending"])
@pytest.mark.parametrize("canary_serving", [False, True])
def test_a_canary_requested_while_a_full_rollout_is_under_way_serves_beside_the_version_rolled_out(
        versions, rollout, canary_serving, share):
    reg, a, b = versions
    other = _copy(a, "other")
    with ModelHolder.open(reg, device="cpu") as holder:
        rolled, canary = b, other
        if canary_serving:  # the canary serving now, announced again (or at a new share) after the rollout
            assert holder.request(b, b.name, share=0.1) and holder.wait_idle(60)
            holder.swap_if_ready()
            rolled, canary = other, b
        gate = _held(holder, rollout == "loading")
        assert holder.request(rolled, rolled.name)  # ends any canary
        gate.until_under_way(holder, rolled.name)
        holder.request(canary, canary.name, share=share)
        gate.open()
        assert holder.wait_idle(60)
        assert holder.swap_if_ready().version == rolled.name  # the rollout and its canary in one swap
        assert _serves(holder) == (rolled.name, canary.name, share)  # as if the worker had swapped between the two


@pytest.mark.parametrize("promotion", ["loading", "pending"])
def test_a_new_canary_requested_while_a_canary_is_being_promoted_serves_beside_the_promoted_version(versions,
                                                                                                     promotion):
    reg, a, b = versions
    c = _copy(a, "canary")
    with ModelHolder.open(reg, device="cpu") as holder:
        assert holder.request(b, b.name, share=0.1) and holder.wait_idle(60)
        holder.swap_if_ready()
        promoted = holder.serving().canary
        gate = _held(holder, promotion == "loading")
        assert not holder.request(b, b.name)  # the promotion: only the others' prebuild runs
        gate.until_under_way(holder, b.name)
        assert holder.request(c, c.name, share=0.1)
        gate.open()
        assert holder.wait_idle(60)
        assert holder.swap_if_ready() is promoted
        assert _serves(holder) == (b.name, c.name, 0.1)


@pytest.mark.parametrize("rollout", ["loading", "pending"])
def test_requesting_the_version_rolled_out_ends_the_canary_requested_beside_it(versions, rollout):
    reg, a, b = versions
    c = _copy(a, "canary")
    with ModelHolder.open(reg, device="cpu") as holder:
        gate = _held(holder, rollout == "loading")
        assert holder.request(b, b.name)
        gate.until_under_way(holder, b.name)
        assert holder.request(c, c.name, share=0.1)
        if rollout == "pending":
            gate.until_under_way(holder, c.name)
        assert not holder.request(b, b.name, share=0.3)  # the stable version to be, at any share
        gate.open()
        assert holder.wait_idle(60)
        assert holder.swap_if_ready().version == b.name
        assert _serves(holder) == (b.name, None, 0.0)


def test_a_canary_beside_a_refused_rollout_serves_beside_the_stable_version(versions):
    reg, a, b = versions
    bad = broken_copy(b, "nonfinite")
    with ModelHolder.open(reg, device="cpu") as holder:
        assert holder.request(bad, bad.name) and holder.request(b, b.name, share=0.1) and holder.wait_idle(60)
        assert holder.swap_if_ready() is None
        assert _serves(holder) == (a.name, b.name, 0.1) and set(holder.stats().refused) == {"nonfinite"}


class _HeldValidation:
    """Holds the loader in the validation of `path` until released: a request made meanwhile finds that version
    loading, and it is refused (or loaded) only after."""

    def __init__(self, monkeypatch, path: Path) -> None:
        import stream.hotswap as hotswap

        self.started, self.released, real = threading.Event(), threading.Event(), hotswap.validate_version
        self.calls: list[Path] = []

        def held(p, **kw):
            self.calls.append(Path(p))
            if Path(p) == path:
                self.started.set()
                assert self.released.wait(60)
            return real(p, **kw)

        monkeypatch.setattr(hotswap, "validate_version", held)


@pytest.mark.parametrize("planned", ["loading", "pending"])
def test_a_canary_refused_beside_a_rollout_leaves_the_canary_planned_beside_it_before(versions, monkeypatch,
                                                                                       planned):
    reg, a, b = versions
    c, bad = _copy(a, "canary"), broken_copy(a, "integrity")
    with ModelHolder.open(reg, device="cpu") as holder:
        held = _HeldValidation(monkeypatch, Path("/nowhere"))
        gate = _LoadGate(opened=planned == "pending", let_through=1)  # the rollout's prebuild passes
        holder.prebuild_from(gate, max_users=10)
        assert holder.request(b, b.name) and holder.request(c, c.name, share=0.1)
        gate.until_under_way(holder, c.name)
        assert holder.request(bad, bad.name, share=0.2)
        gate.open()
        assert holder.wait_idle(60)
        assert holder.swap_if_ready().version == b.name
        assert _serves(holder) == (b.name, c.name, 0.1)  # as if the worker had swapped before the bad request
        assert Counter(held.calls) == {b: 1, c: 1, bad: 1}


@pytest.mark.parametrize("canary_serving", [False, True])
def test_a_canary_of_a_version_serving_now_requested_beside_a_refused_rollout_changes_only_the_canary(
        versions, monkeypatch, canary_serving):
    reg, a, b = versions
    bad = broken_copy(b, "integrity")
    metrics = WorkerMetrics()
    with ModelHolder.open(reg, device="cpu", metrics=metrics) as holder:
        if canary_serving:
            assert holder.request(b, b.name, share=0.1) and holder.wait_idle(60)
            holder.swap_if_ready()
        canary = holder.serving().canary
        held = _HeldValidation(monkeypatch, bad)
        assert holder.request(bad, bad.name)
        assert held.started.wait(60)
        # the stable version ends the canary, and the canary's version at another share only changes it
        wanted = (b, 0.2) if canary_serving else (a, 0.1)
        holder.request(wanted[0], wanted[0].name, share=wanted[1])
        held.released.set()
        assert holder.wait_idle(60)
        holder.swap_if_ready()
        assert _serves(holder) == ((a.name, b.name, 0.2) if canary_serving else (a.name, None, 0.0))
        assert holder.serving().canary is canary and held.calls == [bad]  # validated once, nothing loaded again
        assert holder.stats().refused == {"integrity": 1}
    assert metrics.value("hrnn_model_version_info", {"version": a.name}) == (0.8 if canary_serving else 1.0)


@pytest.mark.parametrize("later", ["another canary", "the refused version again"])
def test_a_refused_rollout_is_no_longer_under_way_while_the_canary_requested_beside_it_loads(versions, monkeypatch,
                                                                                            later):
    reg, a, b = versions
    bad, c, d = broken_copy(b, "integrity"), _copy(a, "canary"), _copy(a, "other")
    with ModelHolder.open(reg, device="cpu") as holder:
        gate = _held(holder, still_loading=True)
        assert holder.request(bad, bad.name) and holder.request(c, c.name, share=0.1)
        gate.until_under_way(holder, c.name)  # the rollout refused already
        held = _HeldValidation(monkeypatch, Path("/nowhere"))
        if later == "another canary":
            assert holder.request(d, d.name, share=0.2)
        else:  # announced again: validated again, as it would be had the worker swapped in between
            assert holder.request(bad, bad.name)
        gate.open()
        assert holder.wait_idle(60)
        holder.swap_if_ready()
        if later == "another canary":
            assert held.calls == [d] and holder.stats().refused == {"integrity": 1}
            assert _serves(holder) == (a.name, d.name, 0.2)
        else:  # refused again, the canary still serves beside the stable version
            assert held.calls == [bad] and holder.stats().refused == {"integrity": 2}
            assert _serves(holder) == (a.name, c.name, 0.1)


def test_a_canary_requested_while_the_canary_beside_a_loaded_rollout_loads_does_not_load_the_rollout_again(
        versions, monkeypatch):
    reg, a, b = versions
    c, d = _copy(a, "canary"), _copy(a, "other")
    with ModelHolder.open(reg, device="cpu") as holder:
        gate = _LoadGate(opened=False, let_through=1)  # the rollout's prebuild passes, the canary's is held
        holder.prebuild_from(gate, max_users=10)
        assert holder.request(b, b.name) and holder.request(c, c.name, share=0.1)
        gate.until_under_way(holder, c.name)
        held = _HeldValidation(monkeypatch, Path("/nowhere"))
        assert holder.request(d, d.name, share=0.2)
        gate.open()
        assert holder.wait_idle(60)
        assert holder.swap_if_ready().version == b.name and held.calls == [d]
        assert _serves(holder) == (b.name, d.name, 0.2)


def test_a_canary_refused_beside_a_rollout_logs_the_version_rolled_out_as_the_one_that_serves(versions, caplog):
    reg, a, b = versions
    bad = broken_copy(a, "integrity")
    with ModelHolder.open(reg, device="cpu") as holder, caplog.at_level(logging.ERROR, logger="stream.hotswap"):
        assert holder.request(b, b.name) and holder.request(bad, bad.name, share=0.1) and holder.wait_idle(60)
        assert holder.swap_if_ready().version == b.name
    [refusal] = [r for r in caplog.records if "refused" in r.getMessage()]
    assert refusal.serving_version == b.name and f"{b.name} " in refusal.getMessage()
    assert f"{a.name} " not in refusal.getMessage()


def _alive(version: str) -> int:
    gc.collect()
    return sum(1 for o in gc.get_objects() if type(o) is Recommender and o.version == version)


def test_a_version_superseded_before_its_swap_is_not_kept_alive_while_the_loader_waits(versions, monkeypatch):
    reg, a, b = versions
    retired, c, first = _copy(b, "retired"), _copy(a, "other"), reg / "first"
    with ModelHolder.open(reg, device="cpu") as holder:
        assert holder.request(retired, retired.name) and holder.wait_idle(60)
        assert holder.stats().pending == retired.name and _alive(retired.name) == 1  # loaded, never swapped in
        held = _HeldValidation(monkeypatch, first)
        assert holder.request(first) and held.started.wait(60)  # the loader busy: the next two wait their turn
        assert holder.request(c, c.name) and holder.request(a, a.name, share=0.1)
        held.released.set()
        assert holder.wait_idle(60)
        assert holder.swap_if_ready().version == c.name and _serves(holder) == (c.name, a.name, 0.1)
        assert _alive(retired.name) == 0  # its weights and prebuilt states freed, the loader idle


def test_a_request_superseded_during_a_refused_load_does_not_validate_that_version_again(versions, monkeypatch):
    reg, a, b = versions
    bad, missing, nonfinite = broken_copy(b, "integrity"), reg / "absent", broken_copy(b, "nonfinite")
    with ModelHolder.open(reg, device="cpu") as holder:
        held = _HeldValidation(monkeypatch, bad)
        assert holder.request(bad, bad.name, share=0.2)
        assert held.started.wait(60)
        assert holder.request(missing, share=0.2) and holder.request(nonfinite, nonfinite.name, share=0.3)
        held.released.set()
        assert holder.wait_idle(60)
        assert holder.swap_if_ready() is None and _serves(holder) == (a.name, None, 0.0)
        assert Counter(held.calls) == {bad: 1, missing: 1, nonfinite: 1}  # each refused once, as requested
        assert holder.stats().refused == {"integrity": 1, "missing": 1, "nonfinite": 1}


def _refusal_cast(versions) -> tuple[Path, Path, Path, Path, Path, Path]:
    """The registry, its serving version a, a rollout refused (integrity), a canary refused (nonfinite), a first
    request that does not exist (held by the loader while the others queue) and a good canary c."""
    reg, a, b = versions
    return reg, a, broken_copy(b, "integrity"), broken_copy(a, "nonfinite"), reg / "first", _copy(a, "canary")


@pytest.mark.parametrize("rollout", ["loading", "queued"])
def test_canaries_requested_beside_a_refused_rollout_apply_in_turn_as_requested_after_the_refusal(
        versions, monkeypatch, rollout):
    reg, a, bad, nonfinite, first, c = _refusal_cast(versions)
    with ModelHolder.open(reg, device="cpu") as holder:
        held = _HeldValidation(monkeypatch, bad if rollout == "loading" else first)
        if rollout == "queued":  # all requested while the loader is busy with an earlier one
            assert holder.request(first)
        else:
            assert holder.request(bad, bad.name)
        assert held.started.wait(60)
        if rollout == "queued":
            assert holder.request(bad, bad.name)
        # the refused rollout changes nothing: a canary, then another one refused, which leaves the first
        assert holder.request(c, c.name, share=0.1) and holder.request(nonfinite, nonfinite.name, share=0.1)
        held.released.set()
        assert holder.wait_idle(60)
        holder.swap_if_ready()
        assert _serves(holder) == (a.name, c.name, 0.1)  # as if the worker had swapped after each request
        assert set(Counter(held.calls).values()) == {1}, held.calls  # nothing validated twice


@pytest.mark.parametrize("rollout", ["loading", "queued behind a canary", "queued behind a refused rollout"])
def test_the_stable_version_requested_beside_a_refused_rollout_ends_the_canary_under_way_before_it(
        versions, monkeypatch, rollout):
    reg, a, bad, nonfinite, first, c = _refusal_cast(versions)
    with ModelHolder.open(reg, device="cpu") as holder:
        held = _HeldValidation(monkeypatch, bad if rollout == "loading" else first)
        if rollout != "loading":  # all requested while the loader is busy with an earlier request
            assert holder.request(first, share=0.2 if rollout == "queued behind a canary" else 1.0)
            assert held.started.wait(60)
        assert holder.request(c, c.name, share=0.3) and holder.request(bad, bad.name)
        if rollout == "loading":
            assert held.started.wait(60)
        # after the refusal: the canary c, ended by the stable version at any share, then a refused canary
        holder.request(a, a.name, share=0.3)
        assert holder.request(nonfinite, nonfinite.name, share=0.3)
        held.released.set()
        assert holder.wait_idle(60)
        holder.swap_if_ready()
        assert _serves(holder) == (a.name, None, 0.0)  # as if the worker had swapped after each request
        assert set(Counter(held.calls).values()) == {1}, held.calls  # nothing validated twice


# (serving before, the rollout, the canary and its share requested beside the refused rollout after it, expected)
_BESIDE_WHAT_A_REFUSED_ROLLOUT_REPLACED = {
    "another version": ("a", "b", "c", 0.2, ("b", "c", 0.2)),
    "the version rolled out": ("a", "b", "b", 0.5, ("b", None, 0.0)),
    "the stable version": ("a", "b", "a", 0.1, ("b", "a", 0.1)),
    "the stable version, rolled back from": ("b", "a", "b", 0.1, ("a", "b", 0.1)),
}


@pytest.mark.parametrize("rollout", ["pending", "loading"])
@pytest.mark.parametrize("canary", list(_BESIDE_WHAT_A_REFUSED_ROLLOUT_REPLACED))
def test_a_canary_requested_beside_a_refused_rollout_queued_behind_another_goes_beside_the_rollout_it_replaced(
        versions, monkeypatch, canary, rollout):
    reg, a, bad, _, missing, c = _refusal_cast(versions)
    b = versions[2]
    named = {"a": a, "b": b, "c": c}
    before, rolled, beside, share, expected = _BESIDE_WHAT_A_REFUSED_ROLLOUT_REPLACED[canary]
    with ModelHolder.open(reg, device="cpu") as holder:
        if before != "a":
            assert holder.request(named[before], named[before].name) and holder.wait_idle(60)
            holder.swap_if_ready()
        first = _HeldValidation(monkeypatch, named[rolled] if rollout == "loading" else Path("/nowhere"))
        assert holder.request(named[rolled], named[rolled].name)
        if rollout == "loading":  # the refused rollout requested while this one loads: its result is handed over
            assert first.started.wait(60) and holder.request(bad, bad.name)
        held = _HeldValidation(monkeypatch, bad)  # wraps `first`: the refused rollout is held while it loads
        first.released.set()
        if rollout == "pending":
            assert holder.wait_idle(60) and holder.request(bad, bad.name)
        assert held.started.wait(60)
        holder.request(named[beside], named[beside].name, share=share)
        assert holder.request(missing, missing.name)  # refused after it: the canary's request applies after all
        held.released.set()
        assert holder.wait_idle(60)
        holder.swap_if_ready()
        assert _serves(holder) == tuple(named[x].name if x in named else x for x in expected)
        assert holder.stats().refused == {"integrity": 1, "missing": 1}


@pytest.mark.parametrize("broken", [False, True])
def test_a_rollout_requested_again_while_it_loads_after_a_canary_beside_it_is_validated_once(
        versions, monkeypatch, broken):
    reg, a, bad, _, _, c = _refusal_cast(versions)
    rolled = bad if broken else versions[2]
    with ModelHolder.open(reg, device="cpu") as holder:
        held = _HeldValidation(monkeypatch, rolled)
        assert holder.request(rolled, rolled.name) and held.started.wait(60)
        assert holder.request(c, c.name, share=0.5)
        assert not holder.request(rolled, rolled.name)  # drops the canary planned beside it
        held.released.set()
        assert holder.wait_idle(60)
        holder.swap_if_ready()
        # refused: the canary it had dropped applies, as if the worker had swapped after each request
        assert _serves(holder) == ((a.name, c.name, 0.5) if broken else (rolled.name, None, 0.0))
        assert held.calls.count(rolled) == 1 and holder.stats().refused == ({"integrity": 1} if broken else {})


def _stored_users(holder: ModelHolder, n: int) -> dict:
    items = holder.current().item_ids
    events = [StepInput(f"user-{u}", items[(u * 7 + j) % len(items)], "click", 1_700_000_000_000 + j * 60_000)
              for u in range(n) for j in range(3)]
    return holder.current().advance({}, events).states


@pytest.mark.parametrize("cap", [10, 1000])
def test_a_canarys_promotion_rebuilds_up_to_the_cap_beyond_its_own_unused_states_and_counts_only_those(versions, cap):
    from stream.canary import in_canary

    reg, a, b = versions
    metrics = WorkerMetrics()
    with ModelHolder.open(reg, device="cpu", metrics=metrics) as holder:
        stored = _stored_users(holder, 60)
        holder.prebuild_from(lambda: iter([stored]), max_users=cap)
        assert holder.request(b, b.name, share=0.5) and holder.wait_idle(60)
        holder.swap_if_ready()
        canary = holder.serving().canary
        mine = {u for u in stored if in_canary(u, b.name, 0.5)}
        own = min(len(mine), cap)
        assert 10 < len(mine) < 60 and len(canary.prebuilt) == holder.stats().last_prebuilt == own
        assert not holder.request(b, b.name) and holder.wait_idle(60)  # none of its users served since
        assert holder.swap_if_ready() is canary
        rebuilt = min(60 - own, cap)  # its own entries kept, not rebuilt again nor counted
        assert len(canary.prebuilt) == own + rebuilt and holder.stats().last_prebuilt == rebuilt
        assert metrics.value("hrnn_prebuilt_states_total") == own + rebuilt


def test_a_canary_share_outside_zero_to_one_is_a_typed_error(versions):
    from stream.canary import ShareError

    reg, _, b = versions
    with ModelHolder.open(reg, device="cpu") as holder:
        for share in (0.0, 1.5):
            with pytest.raises(ShareError):
                holder.request(b, b.name, share=share)
        assert holder.stats().loading is None and holder.wait_idle(1)


class _RecordingWatcher:
    """Stands in for AnnouncementWatcher: keeps the arguments it was built with, reads nothing."""

    built: list[dict] = []

    def __init__(self, bootstrap, topic, **kwargs) -> None:
        _RecordingWatcher.built.append({"topic": topic, **kwargs})

    def start(self) -> "_RecordingWatcher":
        return self

    def stop(self) -> None:
        pass


def _follow_recorded(reg, monkeypatch, **kwargs) -> dict:
    """The arguments ModelHolder.follow(**kwargs) builds its watcher with."""
    import stream.announce

    monkeypatch.setattr(stream.announce, "AnnouncementWatcher", _RecordingWatcher)
    monkeypatch.setattr(_RecordingWatcher, "built", [])
    with ModelHolder.open(reg, device="cpu") as holder:
        holder.follow("127.0.0.1:1", "shop1.model-updates", **kwargs)
    [built] = _RecordingWatcher.built
    return built


def test_following_without_create_topic_leaves_the_announcements_topic_alone(versions, monkeypatch):
    # A worker without CreateTopics/DescribeConfigs rights must not list, create or describe the topic.
    built = _follow_recorded(versions[0], monkeypatch, create_topic=False)
    assert built["topic"] == "shop1.model-updates" and built.get("create_topic", True) is False


def test_following_creates_or_checks_the_announcements_topic_by_default(versions, monkeypatch):
    assert _follow_recorded(versions[0], monkeypatch).get("create_topic", True) is True


def _registry_copy(tmp_path: Path, *versions: Path) -> Path:
    """A registry of its own holding copies of `versions` (their names kept): a test may move its CURRENT."""
    reg = tmp_path / "registry"
    for v in versions:
        shutil.copytree(v, reg / v.name)
    return reg


def _moved_later(reg: Path, version: str) -> None:
    # past the file system's clock tick: CURRENT's mtime comes from a coarser clock than an announcement's time
    time.sleep(0.05)
    set_current(reg, version)


def test_a_starting_worker_keeps_a_current_moved_after_the_latest_announcement_and_follows_later_ones(
        versions, broker, tmp_path):
    from stream.announce import announce, registry_id

    _, a, b = versions
    reg, topic = _registry_copy(tmp_path, a, b), f"hrnn.model-updates-{uuid.uuid4().hex[:8]}"
    set_current(reg, b.name)
    announce(broker.bootstrap, topic, b.name, reg / b.name, reason="retrain")
    _moved_later(reg, a.name)  # `hrnn models rollback` without --bootstrap-servers
    with ModelHolder.open(reg, device="cpu") as holder:
        holder.follow(broker.bootstrap, topic, registry_id=registry_id(reg))
        assert holder.wait_announced(30)
        assert holder.swap_if_ready() is None and holder.version == a.name and holder.stats().loading is None
        announce(broker.bootstrap, topic, b.name, reg / b.name)  # one read after the start applies
        assert _until(lambda: holder.swap_if_ready() is not None) and holder.version == b.name
    with ModelHolder.open(reg, device="cpu") as holder:  # that announcement is newer than CURRENT: a restart follows it
        holder.follow(broker.bootstrap, topic, registry_id=registry_id(reg))
        assert holder.wait_announced(30)
        assert holder.swap_if_ready() is not None and holder.version == b.name


def test_a_canary_announced_before_current_moved_still_serves_beside_it_at_start(versions, broker, tmp_path):
    from stream.announce import announce, registry_id

    _, a, b = versions
    reg, topic = _registry_copy(tmp_path, a, b), f"hrnn.model-updates-{uuid.uuid4().hex[:8]}"
    announce(broker.bootstrap, topic, b.name, reg / b.name, reason="canary", share=0.5)
    _moved_later(reg, a.name)
    with ModelHolder.open(reg, device="cpu") as holder:
        holder.follow(broker.bootstrap, topic, registry_id=registry_id(reg))
        assert holder.wait_announced(30)
        holder.swap_if_ready()
        assert holder.serving().shares == {a.name: 0.5, b.name: 0.5}


def test_a_worker_started_before_its_announcements_topic_exists_follows_it_once_created(versions, broker,
                                                                                          monkeypatch):
    # A reader may not create the topic (create_topics: false); the retrainer's first announcement creates it.
    # A reader that gave up on the offsets (after _WATERMARK_WAIT_S, once) would never swap.
    import stream.compacted
    from stream.announce import announce

    monkeypatch.setattr(stream.compacted, "_WATERMARK_WAIT_S", 1.0, raising=False)
    reg, a, b = versions
    topic = f"hrnn.model-updates-{uuid.uuid4().hex[:8]}"
    with ModelHolder.open(reg, device="cpu") as holder:
        watcher = holder.follow(broker.bootstrap, topic, create_topic=False)
        assert not holder.wait_announced(4) and watcher.error is None
        announce(broker.bootstrap, topic, b.name, b, reason="retrain")
        assert _until(lambda: holder.swap_if_ready() is not None, 60), (watcher.error, holder.stats())
        assert holder.version == b.name and watcher.error is None
