"""Registry helpers: promote, rollback, retention."""
from __future__ import annotations

import fcntl
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from model.artifact import HISTORY, current_history, current_version, list_versions, save_version, set_current
from model.config import DataConfig, HRNNConfig
from model.errors import ArtifactError
from model.network import HRNN
from model.registry import STALE_TEMP_S, ordered_versions, previous_version, promote, prune, rollback, version_path
from stream.cli import main as hrnn
from worker_testkit import resign

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


@pytest.mark.parametrize("written", ["v-e/", "./v-e", "../registry/v-e", "{reg}/v-e", ".", ".trash-v-e"])
def test_a_current_pointer_that_is_a_path_not_a_version_name_is_refused_and_promote_repairs_it(
        registry, capsys, written):
    """'v-e/' (tab completion) loaded fine but was no name the commands matched: prune deleted the version
    being served, and the next worker start failed."""
    (registry / "CURRENT").write_text(written.format(reg=registry) + "\n")
    with pytest.raises(ArtifactError, match="which is no version name"):
        current_version(registry)
    assert hrnn(["models", "prune", str(registry), "--keep", "1"]) == 2
    assert "hrnn models promote" in capsys.readouterr().err
    assert hrnn(["models", "list", str(registry)]) == 2
    out, err = capsys.readouterr()
    assert out.count(" v-") == 5 and "which is no version name" in err
    assert len(list_versions_unchecked(registry)) == 5  # nothing deleted
    assert hrnn(["models", "promote", str(registry), "v-e"]) == 0 and current_version(registry) == "v-e"


def list_versions_unchecked(registry: Path) -> list[str]:
    return sorted(p.name for p in registry.iterdir() if (p / "manifest.json").is_file())


@pytest.mark.parametrize("name, content", [("CURRENT", b"\xff\xfe"), ("CURRENT", None), ("CURRENT.history", b"\xff")])
def test_a_pointer_file_that_cannot_be_read_is_named_not_a_traceback(registry, capsys, name, content):
    path = registry / name
    path.unlink()
    if content is None:
        path.mkdir()
    else:
        path.write_bytes(content)
    commands = [["promote", "v-a"], ["rollback"], ["prune", "--keep", "1"]] + [["list"]] * (name == "CURRENT")
    for command in commands:
        assert hrnn(["models", command[0], str(registry), *command[1:]]) == 2, command
        err = capsys.readouterr().err
        assert str(path) in err and "Traceback" not in err, (command, err)
    assert len(list_versions_unchecked(registry)) == 5


def test_a_pointer_history_that_cannot_be_read_stops_train_before_it_trains(registry, tmp_path, capsys):
    (registry / HISTORY).write_bytes(b"\xff")
    data = tmp_path / "events.csv"
    data.write_text("USER_ID,ITEM_ID,TIMESTAMP\n" + "".join(f"u{k % 3},i{k % 5},{1_700_000_000 + k}\n"
                                                              for k in range(30)))
    assert hrnn(["train", "--data", str(data), "--registry", str(registry), "--epochs", "1", "--quiet"]) == 2
    assert f"{registry / HISTORY} is not UTF-8 text" in capsys.readouterr().err
    assert len(list_versions_unchecked(registry)) == 5  # no version trained and left beside CURRENT


def test_a_current_pointer_naming_a_missing_version_says_so(registry, capsys):
    from model.artifact import latest_version_dir

    (registry / "CURRENT").write_text("v-gone\n")
    with pytest.raises(ArtifactError, match=r"CURRENT names 'v-gone', which is not in the registry"):
        latest_version_dir(registry)
    assert hrnn(["models", "list", str(registry)]) == 2  # the versions, then why none is marked current
    out, err = capsys.readouterr()
    assert "  v-e  " in out and "CURRENT names 'v-gone'" in err


def test_a_registry_path_that_is_a_file_is_called_one(tmp_path, capsys):
    (tmp_path / "reg").write_text("")
    assert hrnn(["models", "list", str(tmp_path / "reg")]) == 2
    assert "is not a directory" in capsys.readouterr().err


def test_prune_counts_only_versions_that_can_serve(registry):
    shutil.copytree(registry / "v-e", registry / "v-z")  # newest, but its weights lost (an interrupted copy)
    (registry / "v-z" / "weights.pt").unlink()
    assert previous_version(registry) == "v-b"
    assert sorted(prune(registry, 2)) == ["v-a", "v-c", "v-d", "v-z"]  # v-z took none of the 2 places
    assert {v.version for v in ordered_versions(registry)} == {"v-b", "v-e"}
    assert rollback(registry) == "v-b"


def test_a_single_version_kept_still_leaves_the_rollback_target(registry):
    assert sorted(prune(registry, 1)) == ["v-a", "v-c", "v-d"]
    assert rollback(registry) == "v-b"


def test_registry_files_take_the_umask_so_a_worker_running_as_another_user_can_read_them(tmp_path):
    old = os.umask(0o022)
    try:
        _publish(tmp_path / "reg", ["v-a", "v-b"])
    finally:
        os.umask(old)
    reg = tmp_path / "reg"
    assert oct((reg / "v-b").stat().st_mode & 0o777) == oct(0o755)
    for f in ("CURRENT", HISTORY):
        assert oct((reg / f).stat().st_mode & 0o777) == oct(0o644), f


def test_a_version_this_user_may_not_read_is_an_error_not_an_empty_registry(registry, monkeypatch):
    real = Path.read_text

    def denied(self, *a, **k):  # as for a user without the trainer's rights (root, running the tests, has them)
        if self.name == "manifest.json" and self.parent.name == "v-b":
            raise PermissionError(13, "Permission denied")
        return real(self, *a, **k)

    monkeypatch.setattr(Path, "read_text", denied)
    with pytest.raises(ArtifactError, match=r"v-b cannot be read \(Permission denied\)"):
        list_versions(registry)


def _signed_copy(registry: Path, src: str, name: str) -> Path:
    """A copy of `src` named `name`, its manifest rewritten to match whatever the test then changes (`resign`)."""
    shutil.copytree(registry / src, registry / name)
    resign(registry / name)
    return registry / name


def _unloadable(registry: Path, name: str) -> Path:
    """A signed version whose weights do not fit its config: every worker refuses it (shape)."""
    d = _signed_copy(registry, "v-b", name)
    torch.save(HRNN(10, HRNNConfig(hidden_dimension=48)).state_dict(), d / "weights.pt")
    resign(d)
    return d


def test_promote_rollback_and_canary_refuse_a_version_no_worker_could_load_and_leave_current(registry, capsys,
                                                                                            monkeypatch):
    import stream.announce

    announced = []
    monkeypatch.setattr(stream.announce, "announce", lambda *a, **k: announced.append(a))
    _unloadable(registry, "v-bad")
    assert hrnn(["models", "promote", str(registry), "v-bad"]) == 2
    assert "refused (shape)" in capsys.readouterr().err and current_version(registry) == "v-e"
    assert hrnn(["models", "canary", str(registry), "v-bad", "--share", "0.1",
                 "--bootstrap-servers", "127.0.0.1:9"]) == 2
    assert "refused (shape)" in capsys.readouterr().err and announced == []
    set_current(registry, "v-bad")  # as a registry written before promote checked this may hold it
    set_current(registry, "v-a")
    assert hrnn(["models", "rollback", str(registry), "--bootstrap-servers", "127.0.0.1:9"]) == 2
    assert "refused (shape)" in capsys.readouterr().err and current_version(registry) == "v-a" and announced == []
    assert hrnn(["models", "promote", str(registry), "v-b"]) == 0 and current_version(registry) == "v-b"


def test_models_show_of_a_version_whose_config_is_not_json_names_the_file_without_a_traceback(registry, capsys):
    d = _signed_copy(registry, "v-b", "v-odd-config")
    (d / "config.json").write_text("{ not json")
    resign(d)
    assert hrnn(["models", "show", str(registry), "v-odd-config"]) == 2
    err = capsys.readouterr().err
    assert f"{d}: config.json unreadable" in err and "Traceback" not in err


def test_promote_and_rollback_without_bootstrap_servers_warn_that_running_workers_are_not_told(registry, capsys):
    assert hrnn(["models", "promote", str(registry), "v-a"]) == 0
    err = capsys.readouterr().err
    assert "not announced" in err and "running workers keep serving what they serve" in err
    assert "workers started from now on serve v-a" in err
    assert hrnn(["models", "rollback", str(registry)]) == 0
    assert "not announced" in capsys.readouterr().err and current_version(registry) == "v-e"


def test_promote_and_rollback_with_a_broker_that_cannot_be_reached_change_nothing(registry, capsys, monkeypatch):
    """The broker is reached before CURRENT moves: else CURRENT and the running workers' version stay apart until
    someone announces it by hand. The promote reaches for a real address nobody listens on (about 30 s)."""
    import stream.compacted
    from stream.topics import TopicCreationError

    history = current_history(registry)
    assert hrnn(["models", "promote", str(registry), "v-a", "--bootstrap-servers", "127.0.0.1:9"]) == 2
    assert "is the broker reachable?" in capsys.readouterr().err
    assert current_version(registry) == "v-e" and current_history(registry) == history

    def unreachable(*args, **kwargs):
        raise TopicCreationError("cannot list topics (is the broker reachable?)")

    monkeypatch.setattr(stream.compacted, "ensure_table_topic", unreachable)
    assert hrnn(["models", "rollback", str(registry), "--bootstrap-servers", "127.0.0.1:9"]) == 2
    assert current_version(registry) == "v-e" and current_history(registry) == history


def test_models_list_says_when_current_names_a_version_without_its_manifest(registry, capsys):
    (registry / "v-e" / "manifest.json").unlink()  # a copy cut short, a version deleted by hand
    assert hrnn(["models", "list", str(registry)]) == 2
    out, err = capsys.readouterr()
    assert out.count(" v-") == 4 and "*" not in out
    assert "CURRENT of" in err and "names 'v-e', which is no complete version" in err


def test_a_pointer_that_cannot_be_written_on_a_read_only_registry_is_an_error_naming_it(registry, monkeypatch):
    import errno

    from model.artifact import set_current

    def read_only(*args, **kwargs):
        raise OSError(errno.EROFS, "Read-only file system")

    monkeypatch.setattr(os, "open", read_only)
    monkeypatch.setattr(Path, "unlink", read_only)  # EROFS even for a file never made, not ENOENT
    with pytest.raises(ArtifactError, match=r"cannot write .*CURRENT.* \(Read-only file system\)"):
        set_current(registry, "v-a")


def test_promote_refuses_a_version_whose_manifest_no_longer_lists_its_weights(registry, capsys):
    d = _signed_copy(registry, "v-b", "v-unlisted")
    manifest = json.loads((d / "manifest.json").read_text())
    del manifest["files"]["weights.pt"]
    (d / "manifest.json").write_text(json.dumps(manifest))
    torch.save(HRNN(10, CFG).state_dict(), d / "weights.pt")  # other weights, which nothing checks now
    assert hrnn(["models", "promote", str(registry), "v-unlisted"]) == 2
    err = capsys.readouterr().err
    assert "refused (integrity)" in err and "does not list weights.pt" in err and current_version(registry) == "v-e"


# A `hrnn models promote` in a process of its own. The announcement's stand-in appends to a file, in the order
# the announcements are made; set_current reads CURRENT's history just after CURRENT itself, and waits there for
# the other promote to have read CURRENT too (or 5 s: the other then waits for this one's lock).
_PROMOTER = """
import os, sys, time
from pathlib import Path
import model.artifact, stream.announce, stream.compacted
from stream.cli import main

meet, announced = Path(sys.argv[1]), Path(sys.argv[2])
read_history = model.artifact.current_history

def history_once_both_read_current(registry):
    (meet / str(os.getpid())).touch()
    deadline = time.monotonic() + 5
    while len(list(meet.iterdir())) < 2 and time.monotonic() < deadline:
        time.sleep(0.02)
    return read_history(registry)

def announce(bootstrap, topic, version, path, **kw):
    with open(announced, "a") as f:
        f.write(version + "\\n")

model.artifact.current_history = history_once_both_read_current
stream.announce.announce = announce
stream.compacted.ensure_table_topic = lambda *args, **kwargs: None  # the broker answers
sys.exit(main(["models", "promote", *sys.argv[3:], "--bootstrap-servers", "127.0.0.1:9"]))
"""


def test_two_promotes_at_once_take_turns_so_current_is_the_version_announced_last_with_both_steps_in_its_history(
        tmp_path):
    reg = tmp_path / "registry"
    _publish(reg, ["v-a", "v-b"], make_current=False)
    _publish(reg, ["v-c"])
    meet, announced = tmp_path / "meet", tmp_path / "announced"
    meet.mkdir()
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[1])}
    promoters = [subprocess.Popen([sys.executable, "-c", _PROMOTER, str(meet), str(announced), str(reg), version],
                                  env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
                 for version in ("v-a", "v-b")]
    errors = [p.communicate(timeout=120)[1] for p in promoters]
    assert [p.returncode for p in promoters] == [0, 0], errors
    first, last = announced.read_text().split()
    assert current_version(reg) == last and current_history(reg) == ["v-c", first]


@pytest.mark.parametrize("command", [["promote", "v-a"], ["rollback"], ["canary", "v-a", "--share", "0.1"],
                                     ["prune", "--keep", "1"]])
def test_a_models_command_that_waits_too_long_for_the_registry_lock_fails_with_nothing_changed(
        registry, capsys, monkeypatch, command):
    """prune too: it reads CURRENT and the rollback target, then deletes, so a promote of an old version landing
    in between would be deleted from under the promote."""
    import model.registry
    import stream.announce

    announced = []
    monkeypatch.setattr(stream.announce, "announce", lambda *a, **k: announced.append(a))
    monkeypatch.setattr(model.registry, "CURRENT_LOCK_WAIT_S", 0.2)
    history = current_history(registry)
    with open(registry / model.registry.CURRENT_LOCK, "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)  # another promote is announcing
        assert hrnn(["models", command[0], str(registry), *command[1:], "--bootstrap-servers", "127.0.0.1:9"]) == 2
    err = capsys.readouterr().err
    assert "has held its lock" in err and "for over 0.2 s: nothing was changed" in err
    assert current_version(registry) == "v-e" and current_history(registry) == history and announced == []
    assert len(list_versions(registry)) == 5


def test_train_publishing_a_current_version_waits_for_the_registry_lock_and_publishes_nothing_when_kept_waiting(
        registry, tmp_path, capsys, monkeypatch):
    """`hrnn train` moves CURRENT as a promote does: at the same moment, the two would interleave their moves of
    CURRENT and its history (a rollback's steps), and one step would be lost."""
    import model.registry

    data = tmp_path / "events.csv"
    data.write_text("USER_ID,ITEM_ID,TIMESTAMP\n" + "".join(f"u{k % 3},i{k % 5},{1_700_000_000 + k}\n"
                                                              for k in range(30)))
    train = ["train", "--data", str(data), "--registry", str(registry), "--epochs", "1", "--quiet"]
    monkeypatch.setattr(model.registry, "CURRENT_LOCK_WAIT_S", 0.2)
    history = current_history(registry)
    with open(registry / model.registry.CURRENT_LOCK, "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)  # a promote is announcing
        assert hrnn(train) == 2
    assert "has held its lock" in capsys.readouterr().err
    assert current_version(registry) == "v-e" and current_history(registry) == history
    assert len(list_versions_unchecked(registry)) == 5  # nothing written, not even a version beside CURRENT
    assert not [p.name for p in registry.iterdir() if p.name.startswith(".tmp-")]
    assert hrnn(train) == 0  # once it is free
    assert current_version(registry) != "v-e" and current_history(registry) == [*history, "v-e"]
