"""Model versions: complete or invisible, checksummed, shape-checked."""
from __future__ import annotations

import hashlib
import json
import pickle

import pytest
import torch

from model.artifact import (current_version, latest_version_dir, list_versions, load_version, save_version,
                            set_current, verify)
from model.config import DataConfig, HRNNConfig
from model.errors import ArtifactError
from model.network import HRNN

CFG = HRNNConfig(hidden_dimension=32)
ITEMS = [f"i{k}" for k in range(20)]


def _save(reg, **kw):
    torch.manual_seed(0)
    return save_version(reg, HRNN(len(ITEMS), CFG), CFG, DataConfig(), ITEMS, ["click"], {"val_mrr@20": 0.5}, **kw)


def test_a_saved_version_loads_back_with_the_same_weights_and_settings(tmp_path):
    path = _save(tmp_path)
    loaded = load_version(path)
    assert loaded.item_ids == ITEMS and loaded.config == CFG and loaded.data_config == DataConfig()
    torch.manual_seed(0)
    torch.testing.assert_close(loaded.model.out_emb.weight, HRNN(len(ITEMS), CFG).out_emb.weight)
    assert latest_version_dir(tmp_path) == path and current_version(tmp_path) == path.name


def test_weights_load_with_weights_only(tmp_path):
    path = _save(tmp_path)
    state = torch.load(path / "weights.pt", weights_only=True)
    assert "session_gru.weight_ih" in state


def test_a_tampered_file_is_refused_with_the_file_named(tmp_path):
    path = _save(tmp_path)
    with open(path / "weights.pt", "ab") as f:
        f.write(b"junk")
    with pytest.raises(ArtifactError, match="checksum mismatch for weights.pt"):
        load_version(path)


def test_weights_that_do_not_fit_the_item_index_are_refused(tmp_path):
    path = _save(tmp_path)
    items = json.loads((path / "items.json").read_text())
    items["item_ids"] = items["item_ids"][:-1]
    (path / "items.json").write_text(json.dumps(items))
    manifest = json.loads((path / "manifest.json").read_text())
    import hashlib
    manifest["files"]["items.json"] = hashlib.sha256((path / "items.json").read_bytes()).hexdigest()
    (path / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ArtifactError, match="do not fit"):
        load_version(path)


def _rewrite(path, name, content: bytes):
    """Replace one file of a version and its checksum, as a version published that way would hold it."""
    (path / name).write_bytes(content)
    manifest = json.loads((path / "manifest.json").read_text())
    manifest["files"][name] = hashlib.sha256(content).hexdigest()
    (path / "manifest.json").write_text(json.dumps(manifest))


def test_weights_of_another_hidden_dimension_are_refused_naming_the_tensor_and_both_shapes(tmp_path):
    path = _save(tmp_path)
    config = json.loads((path / "config.json").read_text())
    config["hrnn"]["hidden_dimension"] = 64
    _rewrite(path, "config.json", json.dumps(config).encode())
    with pytest.raises(ArtifactError) as refused:
        load_version(path)
    said = str(refused.value)
    assert "do not fit" in said and "size mismatch for" in said and "[20, 32]" in said and "[20, 64]" in said
    assert "\n" not in said


@pytest.mark.parametrize("content, said", [
    pytest.param(b"", "EOFError: no message (the file is empty or cut short?)", id="empty"),
    pytest.param(pickle.dumps({"w": object()}, protocol=2), "UnpicklingError: Weights only load failed", id="pickle"),
])
def test_weights_that_are_empty_or_pickle_more_than_tensors_are_refused_on_one_line(tmp_path, content, said):
    path = _save(tmp_path)
    _rewrite(path, "weights.pt", content)
    with pytest.raises(ArtifactError, match="cannot read version") as refused:
        load_version(path)
    assert said in str(refused.value) and "\n" not in str(refused.value) and "\x1b" not in str(refused.value)


@pytest.mark.parametrize("section", ["hrnn", "data"])
def test_a_version_with_a_setting_this_build_does_not_know_is_refused_naming_it(tmp_path, section):
    path = _save(tmp_path)
    config = json.loads((path / "config.json").read_text())
    config[section]["future_knob"] = 3
    _rewrite(path, "config.json", json.dumps(config).encode())
    with pytest.raises(ArtifactError, match=r"settings this build does not know \(future_knob\)"):
        load_version(path)


def test_a_half_written_version_is_invisible(tmp_path):
    _save(tmp_path)
    (tmp_path / ".tmp-v2-abc").mkdir()
    (tmp_path / "v3-no-manifest").mkdir()
    assert [v.version for v in list_versions(tmp_path)] == [current_version(tmp_path)]
    with pytest.raises(ArtifactError):
        set_current(tmp_path, "v3-no-manifest")


def test_an_empty_registry_says_how_to_get_a_version(tmp_path):
    with pytest.raises(ArtifactError, match="hrnn train"):
        latest_version_dir(tmp_path)


def test_publishing_without_making_current_keeps_the_pointer(tmp_path):
    first = _save(tmp_path)
    second = _save(tmp_path, make_current=False)
    assert current_version(tmp_path) == first.name
    set_current(tmp_path, second.name)
    assert latest_version_dir(tmp_path) == second


@pytest.mark.parametrize("manifest", [[], {"files": ["weights.pt"]}, {"files": {"weights.pt": 5}}, {"files": None}],
                         ids=["a list", "files a list", "a digest not a string", "files null"])
def test_a_manifest_of_the_wrong_shape_is_an_artifact_error(tmp_path, manifest):
    path = _save(tmp_path)
    (path / "manifest.json").write_text(json.dumps(manifest))
    with pytest.raises(ArtifactError, match="manifest.json is not a version manifest"):
        verify(path)


DEEP = "[" * 100_000 + "]" * 100_000  # past the parser's recursion limit


@pytest.mark.parametrize("name, text", [("manifest.json", "[1, 2]"), ("metrics.json", "[1, 2]"),
                                        ("manifest.json", '{"created_at": 5, "files": {}}'),
                                        ("manifest.json", DEEP), ("metrics.json", DEEP)])
def test_a_version_whose_manifest_or_metrics_has_the_wrong_shape_or_nests_too_deeply_is_not_listed(tmp_path, name,
                                                                                                   text):
    good = _save(tmp_path)
    odd = _save(tmp_path, make_current=False)
    (odd / name).write_text(text)
    assert [v.version for v in list_versions(tmp_path)] == [good.name]


def test_a_listed_file_that_cannot_be_read_is_an_artifact_error(tmp_path):
    path = _save(tmp_path)
    (path / "items.json").unlink()
    (path / "items.json").mkdir()  # exists, but reading it fails with an OSError
    with pytest.raises(ArtifactError, match="items.json unreadable"):
        verify(path)


def _rewrite_manifest(path, edit) -> None:
    manifest = json.loads((path / "manifest.json").read_text())
    edit(manifest["files"])
    (path / "manifest.json").write_text(json.dumps(manifest))


@pytest.mark.parametrize("dropped, said", [(["weights.pt"], "weights.pt"), (["metrics.json"], "metrics.json"),
                                           ("all", "weights.pt, config.json, items.json, metrics.json")],
                         ids=["without weights.pt", "without metrics.json", "files empty"])
def test_a_manifest_that_does_not_list_a_file_every_version_holds_is_refused(tmp_path, dropped, said):
    path = _save(tmp_path)
    dropped = list(json.loads((path / "manifest.json").read_text())["files"]) if dropped == "all" else dropped
    _rewrite_manifest(path, lambda files: [files.pop(name) for name in dropped])
    if "weights.pt" in dropped:  # changed since publishing, with nothing to check it against
        state = torch.load(path / "weights.pt", weights_only=True)
        torch.save({k: v + 1 for k, v in state.items()}, path / "weights.pt")
    else:
        (path / dropped[0]).write_text('{"val_mrr@20": 0.9}')
    with pytest.raises(ArtifactError, match=f"manifest.json does not list {said} "):
        verify(path)


@pytest.mark.parametrize("name", ["../outside.pt", "sub/weights.pt"])
def test_a_manifest_naming_a_path_rather_than_a_file_of_the_version_is_refused(tmp_path, name):
    path = _save(tmp_path)
    (path / "sub").mkdir()
    for copy in (tmp_path / "outside.pt", path / "sub" / "weights.pt"):
        copy.write_bytes((path / "weights.pt").read_bytes())  # checksums that match: only the name is wrong
    digest = hashlib.sha256((path / "weights.pt").read_bytes()).hexdigest()
    _rewrite_manifest(path, lambda files: files.update({name: digest}))
    with pytest.raises(ArtifactError, match="which is no file name of the version directory"):
        verify(path)


def test_a_version_published_with_a_history_length_past_todays_bound_still_loads(tmp_path):
    """The bound on history_length (one state per Kafka record) holds for versions trained from now on; a version
    published under the bound before it stays servable, so workers and rollbacks still take it."""
    from model.config import MAX_HISTORY_LENGTH

    cfg = HRNNConfig(hidden_dimension=32, history_length=MAX_HISTORY_LENGTH + 100)
    torch.manual_seed(0)
    path = save_version(tmp_path, HRNN(len(ITEMS), cfg), cfg, DataConfig(), ITEMS, ["click"], {"val_mrr@20": 0.5})
    assert load_version(path).config.history_length == MAX_HISTORY_LENGTH + 100


def test_a_versions_config_json_holds_its_holdout_so_training_from_it_holds_out_the_same_events(tmp_path):
    """`hrnn train --config REG/V/config.json` retrains the version: with its protocol too, not last-session."""
    import argparse

    from model.cli_train import add_arguments, resolve_holdout

    path = _save(tmp_path, holdout="personalize")
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    args = parser.parse_args(["--data", "x.csv", "--registry", "r", "--config", str(path / "config.json")])
    assert resolve_holdout(args) == "personalize"


def test_a_version_published_before_config_json_kept_its_holdout_is_retrained_on_the_holdout_its_metrics_record(
        tmp_path):
    import argparse
    import json

    from model.cli_train import add_arguments, resolve_holdout

    path = _save(tmp_path, holdout="personalize")
    config = json.loads((path / "config.json").read_text())
    del config["holdout"]  # as versions of builds before 2026-12-06 wrote it
    (path / "config.json").write_text(json.dumps(config))
    metrics = json.loads((path / "metrics.json").read_text())
    (path / "metrics.json").write_text(json.dumps({**metrics, "holdout": "personalize"}))
    parser = argparse.ArgumentParser()
    add_arguments(parser)
    args = parser.parse_args(["--data", "x.csv", "--registry", "r", "--config", str(path / "config.json")])
    assert resolve_holdout(args) == "personalize"


def test_a_registry_path_too_long_for_the_system_is_an_artifact_error_saying_so(tmp_path):
    with pytest.raises(ArtifactError, match="cannot be read \\(File name too long\\)"):
        list_versions(tmp_path / ("A" * 300))


def test_a_manifest_nested_too_deeply_is_an_artifact_error(tmp_path):
    path = _save(tmp_path)
    (path / "manifest.json").write_text(DEEP)
    with pytest.raises(ArtifactError, match="manifest.json unreadable.*nested too deeply"):
        verify(path)


def test_a_config_json_nested_too_deeply_is_the_value_error_of_any_unreadable_one(tmp_path):
    from model.artifact import version_settings

    path = _save(tmp_path)
    (path / "config.json").write_text(DEEP)
    with pytest.raises(ValueError, match="nested too deeply"):  # the retrainer then starts from the defaults
        version_settings(path)
