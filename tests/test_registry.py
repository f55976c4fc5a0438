"""Registry helpers: promote, rollback, retention."""
from __future__ import annotations

import os
import time
from pathlib import Path

import pytest

from model.artifact import current_version, list_versions, save_version, set_current
from model.config import DataConfig, HRNNConfig
from model.errors import ArtifactError
from model.network import HRNN
from model.registry import STALE_TEMP_S, ordered_versions, previous_version, promote, prune, rollback, version_path
from stream.cli import main as hrnn

CFG = HRNNConfig(hidden_dimension=32)


def _publish(registry: Path, names: list[str]) -> None:
    items = [f"i{k}" for k in range(10)]
    for name in names:
        save_version(registry, HRNN(len(items), CFG), CFG, DataConfig(), items, ["click"], version=name)


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
    assert current_version(registry) == "v-a" and previous_version(registry) == "v-c"
    assert rollback(registry) == "v-c"
    with pytest.raises(ArtifactError, match="no version before"):
        rollback(registry)
    with pytest.raises(ArtifactError, match="no version 'nope'"):
        version_path(registry, "nope")


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
