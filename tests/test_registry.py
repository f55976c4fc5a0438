"""Registry helpers: promote, rollback, retention."""
from __future__ import annotations

import os
import shutil
import time
from pathlib import Path

import pytest

from model.artifact import HISTORY, current_version, list_versions, save_version, set_current
from model.config import DataConfig, HRNNConfig
from model.errors import ArtifactError
from model.network import HRNN
from model.registry import STALE_TEMP_S, ordered_versions, previous_version, promote, prune, rollback, version_path
from stream.cli import main as hrnn

CFG = HRNNConfig(hidden_dimension=32)


def _publish(registry: Path, names: list[str], *, make_current: bool = True) -> None:
    items = [f"i{k}" for k in range(10)]
    for name in names:
        save_version(registry, HRNN(len(items), CFG), CFG, DataConfig(), items, ["click"], version=name,
                     make_current=make_current)


@pytest.fixture
def registry(tmp_path) -> Path:
    reg = tmp_path / "registry"
    # names out of time order: retention follows publication time, not names
    _publish(reg, ["v-c", "v-a", "v-d", "v-b", "v-e"])
    return reg


def test_versions_are_ordered_by_publication(registry):
    assert [v.version for v in ordered_versions(registry)] == ["v-c", "v-a", "v-d", "v-b", "v-e"]
    assert current_version(registry) == "v-e"


def test_prune_keeps_the_newest_and_never_the_current(registry):
    set_current(registry, "v-c")  # the oldest is serving (a rollback)
    removed = prune(registry, 2)
    assert sorted(removed) == ["v-a", "v-d"]
    assert {v.version for v in list_versions(registry)} == {"v-c", "v-b", "v-e"}
    assert not [p for p in registry.iterdir() if p.name.startswith(".trash-")]
    assert prune(registry, 2) == []


def test_prune_refuses_to_keep_nothing(registry):
    with pytest.raises(ArtifactError):
        prune(registry, 0)


def test_prune_removes_stale_temp_dirs_only(registry):
    stale, fresh = registry / ".tmp-v-x-crashed", registry / ".tmp-v-y-writing"
    stale.mkdir()
    fresh.mkdir()
    old = time.time() - STALE_TEMP_S - 10
    os.utime(stale, (old, old))
    prune(registry, 10)
    assert not stale.exists() and fresh.exists()


def test_promote_rollback_and_errors(registry):
    assert promote(registry, "v-a") == registry / "v-a"
    assert current_version(registry) == "v-a" and previous_version(registry) == "v-e"  # current before v-a
    assert rollback(registry) == "v-e"
    with pytest.raises(ArtifactError, match="no version 'nope'"):
        version_path(registry, "nope")


def test_rollback_returns_to_the_previously_current_version_not_an_ended_canary(tmp_path):
    reg = tmp_path / "registry"
    _publish(reg, ["v1"])
    _publish(reg, ["v2", "v3"], make_current=False)  # two canaries: v2 ended, v3 then promoted
    promote(reg, "v3")
    assert rollback(reg) == "v1" and current_version(reg) == "v1"


def test_a_second_rollback_goes_further_back_instead_of_bouncing(tmp_path):
    reg = tmp_path / "registry"
    _publish(reg, ["v1", "v2", "v3"])
    promote(reg, "v1")
    _publish(reg, ["v4"])  # CURRENT named v1, v2, v3, v1, v4: rollbacks retrace that, one step each
    assert [rollback(reg), rollback(reg), rollback(reg), rollback(reg)] == ["v1", "v3", "v2", "v1"]
    with pytest.raises(ArtifactError, match="no version before 'v1'"):
        rollback(reg)


def test_rollback_skips_a_previously_current_version_pruned_since(tmp_path):
    reg = tmp_path / "registry"
    _publish(reg, ["v1", "v2"])
    _publish(reg, ["v3", "v4"], make_current=False)  # v3 a canary ended, v4 promoted
    promote(reg, "v4")
    shutil.rmtree(reg / "v2")
    assert rollback(reg) == "v1"


def test_a_registry_without_the_pointers_history_rolls_back_by_publication_order(tmp_path):
    reg = tmp_path / "registry"
    _publish(reg, ["v1"])
    _publish(reg, ["v2", "v3"], make_current=False)
    promote(reg, "v3")
    (reg / HISTORY).unlink()  # as a registry written before the history was kept
    assert rollback(reg) == "v2"


def test_promote_refuses_a_corrupted_version(registry):
    (registry / "v-b" / "weights.pt").write_bytes(b"tampered")
    with pytest.raises(ArtifactError, match="checksum"):
        promote(registry, "v-b")
    assert current_version(registry) == "v-e"


def test_models_cli_prune_and_rollback(registry, capsys):
    assert hrnn(["models", "prune", str(registry), "--keep", "3"]) == 0
    assert "removed 2 version(s): v-c, v-a" in capsys.readouterr().out
    assert hrnn(["models", "rollback", str(registry)]) == 0
    assert current_version(registry) == "v-b"
    assert hrnn(["models", "list", str(registry)]) == 0
    assert "* v-b" in capsys.readouterr().out


def test_the_models_commands_work_beside_a_directory_whose_manifest_has_the_wrong_shape(registry, capsys):
    odd = registry / "v-odd"
    odd.mkdir()
    (odd / "manifest.json").write_text('["not", "a", "manifest"]')
    (odd / "metrics.json").write_text("{}")
    assert hrnn(["models", "list", str(registry)]) == 0
    assert "v-odd" not in capsys.readouterr().out
    assert hrnn(["models", "promote", str(registry), "v-a"]) == 0
    assert hrnn(["models", "rollback", str(registry)]) == 0 and current_version(registry) == "v-e"
    assert hrnn(["models", "prune", str(registry), "--keep", "4"]) == 0 and odd.exists()


def test_prune_removes_a_killed_retraining_runs_stale_staging_dir(registry):
    stale, running = registry / ".staging-dead0001", registry / ".staging-live0002"
    (stale / "v-killed").mkdir(parents=True)
    running.mkdir()
    old = time.time() - STALE_TEMP_S - 10
    os.utime(stale, (old, old))
    prune(registry, 10)
    assert not stale.exists() and running.exists()


def test_a_canary_of_the_current_version_is_refused_without_announcing(registry, capsys, monkeypatch):
    import stream.announce

    announced = []
    monkeypatch.setattr(stream.announce, "announce", lambda *a, **k: announced.append(a))
    assert hrnn(["models", "canary", str(registry), "v-e", "--share", "0.1",
                 "--bootstrap-servers", "127.0.0.1:9"]) == 2
    assert "v-e is already the current version" in capsys.readouterr().err and announced == []
    assert hrnn(["models", "canary", str(registry), "v-b", "--share", "0.1",
                 "--bootstrap-servers", "127.0.0.1:9"]) == 0
    assert [a[2] for a in announced] == ["v-b"]
