"""One retraining run against a registry that others change too: operators, killed runs, clocks of other hosts."""
from __future__ import annotations

import datetime as dt
import fcntl
import json
import logging
from pathlib import Path

import pytest

import model.artifact as artifact
import stream.retrain_job as retrain_job
from model.artifact import current_version, list_versions
from model.registry import promote
from model.synth import generate
from stream.archive import ArchivedEvent, ArchiveWriter
from stream.replay import events_from_interactions
from stream.retrain_job import LOCK_NAME, RetrainSpec, retrain

TINY = {"hidden_dimension": 32, "epochs": 1, "n_sample": 32, "batch_size": 32}
TINY_FLAGS = [f"--{k.replace('_', '-')}={v}" for k, v in TINY.items()]


@pytest.fixture(scope="module")
def archive(tmp_path_factory) -> Path:
    data = generate(300, 120, seed=3, events_per_user=12, start_spread_days=2)
    root = tmp_path_factory.mktemp("archive")
    ArchiveWriter(root, "ev").write([ArchivedEvent(i % 2, i, e) for i, e in enumerate(events_from_interactions(data))])
    return root


def _spec(tmp_path: Path, archive: Path, **kw) -> RetrainSpec:
    kw = {"window_days": 30, "min_events": 100, "margin": 1.0, "hrnn": dict(TINY), **kw}
    return RetrainSpec(registry=str(tmp_path / "registry"), archive=str(archive), **kw)


def _left_staging(reg: Path) -> list[str]:
    return sorted(p.name for p in reg.iterdir() if p.name.startswith(".staging-"))


# --- CURRENT moved during the run (#1) ---

def test_a_run_does_not_publish_over_a_promotion_made_while_it_trained(tmp_path, archive, monkeypatch, caplog):
    reg = tmp_path / "registry"
    first = retrain(_spec(tmp_path, archive))
    canary = retrain(_spec(tmp_path, archive, canary=True))
    assert current_version(reg) == first.version and canary.status == "published"
    real_train = retrain_job.train_version

    def train_while_an_operator_promotes(*a, **k):  # `hrnn models promote` takes no lock: it lands mid-run
        promote(reg, canary.version)
        return real_train(*a, **k)

    monkeypatch.setattr(retrain_job, "train_version", train_while_an_operator_promotes)
    out = retrain(_spec(tmp_path, archive))
    assert out.status == "skipped" and out.version is None and out.serving_version == first.version
    assert out.reason == (f"CURRENT moved from {first.version} to {canary.version} during the run: "
                          "not published over it")
    assert current_version(reg) == canary.version  # the operator's choice stands
    assert {v.version for v in list_versions(reg)} == {first.version, canary.version} and not _left_staging(reg)
    assert "CURRENT moved during the run" in caplog.text


def test_a_first_run_does_not_publish_over_a_version_made_current_while_it_trained(tmp_path, archive, monkeypatch):
    reg = tmp_path / "registry"
    real_train = retrain_job.train_version
    other = {}

    def train_while_another_publisher_saves(*a, **k):
        run = real_train(*a, **k)
        loaded = artifact.load_version(run.version_dir)
        other["path"] = artifact.save_version(reg, loaded.model, loaded.config, loaded.data_config, loaded.item_ids,
                                              loaded.event_types, version="v-other")
        return run

    monkeypatch.setattr(retrain_job, "train_version", train_while_another_publisher_saves)
    out = retrain(_spec(tmp_path, archive))
    assert out.status == "skipped" and "CURRENT moved from none to v-other during the run" in out.reason
    assert current_version(reg) == "v-other" and [v.version for v in list_versions(reg)] == ["v-other"]


def _pointer_lock_held(reg: Path) -> bool:
    """Whether someone holds the registry's pointer lock (model/registry.py current_lock) now."""
    from model.registry import CURRENT_LOCK

    with open(reg / CURRENT_LOCK, "a") as f:
        try:
            fcntl.flock(f, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return True
        fcntl.flock(f, fcntl.LOCK_UN)
        return False


def test_a_promote_landing_while_a_run_publishes_waits_for_it_instead_of_being_overridden(
        tmp_path, archive, monkeypatch, capsys):
    """From its last look at CURRENT through its publish and its pruning, the run holds the pointer lock that
    `hrnn models promote` takes: a promote in that gap waits (here, too long: it fails with nothing changed) rather
    than move CURRENT just before the publish moves it again, or have its version pruned."""
    import model.registry
    from stream.cli import main as hrnn

    reg = tmp_path / "registry"
    first = retrain(_spec(tmp_path, archive))
    canary = retrain(_spec(tmp_path, archive, canary=True))
    real_save, real_prune = retrain_job.save_version, retrain_job.prune
    promoted, held = [], []

    def save_while_an_operator_promotes(*a, **k):
        promoted.append(hrnn(["models", "promote", str(reg), canary.version]))
        held.append(("save", _pointer_lock_held(reg)))
        return real_save(*a, **k)

    def prune_under(*a, **k):
        held.append(("prune", _pointer_lock_held(reg)))
        return real_prune(*a, **k)

    monkeypatch.setattr(model.registry, "CURRENT_LOCK_WAIT_S", 0.2)
    monkeypatch.setattr(retrain_job, "save_version", save_while_an_operator_promotes)
    monkeypatch.setattr(retrain_job, "prune", prune_under)
    out = retrain(_spec(tmp_path, archive, keep_versions=5))
    assert promoted == [2] and "has held its lock" in capsys.readouterr().err
    assert held == [("save", True), ("prune", True)]
    assert out.status == "published" and out.current == out.version == current_version(reg)
    assert artifact.current_history(reg) == [first.version]  # the promote changed nothing
    assert not _pointer_lock_held(reg)  # let go once published


# --- pruning after publishing (#2) ---

def test_keep_versions_never_prunes_the_canary_the_run_has_just_published(tmp_path, archive, monkeypatch):
    """Another version carries a later created_at (published from a host whose clock runs ahead): the canary is
    neither CURRENT, nor the rollback target, nor among the newest by created_at, and must still stay."""
    reg = tmp_path / "registry"
    rollback_target = retrain(_spec(tmp_path, archive))

    class TwoHoursAhead(dt.datetime):
        @classmethod
        def now(cls, tz=None):
            return dt.datetime.now(tz) + dt.timedelta(hours=2)

    monkeypatch.setattr(artifact, "datetime", TwoHoursAhead)
    ahead = retrain(_spec(tmp_path, archive))
    monkeypatch.setattr(artifact, "datetime", dt.datetime)
    out = retrain(_spec(tmp_path, archive, canary=True, keep_versions=1))
    assert out.status == "published" and out.version not in out.pruned
    assert Path(out.path).is_dir() and current_version(reg) == ahead.version
    assert {v.version for v in list_versions(reg)} == {rollback_target.version, ahead.version, out.version}


# --- staging folders of killed runs (#5) ---

def _killed_runs_staging(reg: Path, name: str) -> Path:
    """What a run SIGKILLed at --job-timeout-s leaves: its staging registry with a version being written."""
    d = reg / name / ".tmp-v20260101T000000000Z-0badcafe"
    d.mkdir(parents=True)
    (d / "weights.pt").write_bytes(b"\0" * 1024)
    return reg / name


def test_a_run_removes_the_staging_folders_killed_runs_left_and_logs_them(tmp_path, archive, caplog):
    reg = tmp_path / "registry"
    left = [_killed_runs_staging(reg, ".staging-0000dead"), _killed_runs_staging(reg, ".staging-0000beef")]
    caplog.set_level(logging.WARNING, logger="stream.retrain_job")
    out = retrain(_spec(tmp_path, archive, min_events=10**9))  # any run cleans up, also one that skips at once
    assert out.status == "skipped" and not any(d.exists() for d in left) and not _left_staging(reg)
    assert ".staging-0000beef, .staging-0000dead" in caplog.text  # fresh ones too: prune's spares the last hour's
    published = retrain(_spec(tmp_path, archive))
    assert published.status == "published" and not _left_staging(reg)


def test_a_run_without_the_registry_lock_leaves_the_staging_folder_of_the_run_that_holds_it(tmp_path, archive):
    reg = tmp_path / "registry"
    in_use = _killed_runs_staging(reg, ".staging-0000a11e")
    with open(reg / LOCK_NAME, "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)  # another run is training into it
        out = retrain(_spec(tmp_path, archive))
    assert out.status == "skipped" and "lock" in out.reason and in_use.is_dir()


# --- hrnn retrainer --once (#7) ---

def test_once_with_a_canary_share_and_no_broker_is_refused_before_training(tmp_path, archive, monkeypatch, capsys):
    """Only an announcement makes a version a canary: without a broker it would be published and serve nobody."""
    import stream.observability
    from stream.cli import main as hrnn

    monkeypatch.setattr(stream.observability, "setup_json_logging", lambda level: None)
    reg = tmp_path / "registry"
    rc = hrnn(["retrainer", "--once", "--registry", str(reg), "--archive", str(archive), "--window-days", "30",
               "--min-events", "100", "--canary-share", "0.2", *TINY_FLAGS])
    captured = capsys.readouterr()
    assert rc == 2 and captured.out == "" and "Traceback" not in captured.err
    assert captured.err.startswith("hrnn retrainer: error: --canary-share 0.2 needs --bootstrap-servers")
    assert "drop --canary-share" in captured.err and not reg.exists()


def test_once_without_a_canary_share_still_needs_no_broker(tmp_path, archive, monkeypatch, capsys):
    import stream.observability
    from stream.cli import main as hrnn

    monkeypatch.setattr(stream.observability, "setup_json_logging", lambda level: None)
    rc = hrnn(["retrainer", "--once", "--registry", str(tmp_path / "registry"), "--archive", str(archive),
               "--window-days", "30", "--min-events", "100", *TINY_FLAGS])
    out = json.loads(capsys.readouterr().out)
    assert rc == 0 and out["status"] == "published" and current_version(tmp_path / "registry") == out["version"]
