"""Settings as a user gives them (flags, a --config file): every value that would train a broken model or
crash a command is a ConfigError naming the setting, before any work starts."""
from __future__ import annotations

import argparse
import json

import pytest

from model.artifact import save_version
from model.cli_common import add_config_flags, configs_from_args
from model.config import DataConfig, HRNNConfig
from model.errors import ConfigError
from model.network import HRNN


def _configs(*argv: str) -> tuple[HRNNConfig, DataConfig]:
    p = argparse.ArgumentParser()
    add_config_flags(p, HRNNConfig, DataConfig)
    return configs_from_args(p.parse_args(list(argv)))


@pytest.mark.parametrize("flag, value, setting", [
    ("--event-type-weights", "click=nan", "event_type_weights['click']"),
    ("--event-type-weights", "click=inf", "event_type_weights['click']"),
    ("--event-type-weights", "click=-1", "event_type_weights['click']"),
    ("--recency-half-life-days", "-0.001", "recency_half_life_days"),
    ("--recency-half-life-days", "nan", "recency_half_life_days"),
    ("--weight-decay", "-1", "weight_decay"),
    ("--weight-decay", "inf", "weight_decay"),
    ("--logq", "nan", "logq"),
    ("--logq", "-0.5", "logq"),
    ("--sample-alpha", "nan", "sample_alpha"),
    ("--sample-alpha", "-1", "sample_alpha"),
    ("--bpreg", "inf", "bpreg"),
    ("--bpreg", "-1", "bpreg"),
    ("--learning-rate", "nan", "learning_rate"),  # every ranged setting rejects NaN
])
def test_a_setting_outside_its_range_or_not_finite_is_a_config_error_naming_it(flag, value, setting):
    with pytest.raises(ConfigError, match=r"^" + setting.replace("[", r"\[")):
        _configs(flag, value)


def test_the_ranges_admit_the_defaults_and_the_ends_of_each_meaning():
    _configs()
    _configs("--event-type-weights", "click=0,purchase=5", "--recency-half-life-days", "0", "--weight-decay", "0",
             "--logq", "0", "--sample-alpha", "1", "--bpreg", "0")


@pytest.mark.parametrize("suffix, text, found", [
    (".json", "[1, 2]", "holds an array"),
    (".json", "5", "holds a number"),
    (".json", '{"hrnn": 5}', "'hrnn' holds a number"),
    (".json", '{"data": ["a"]}', "'data' holds an array"),
    (".toml", "hrnn = 5", "'hrnn' holds a number"),
])
def test_a_config_file_that_is_not_an_object_of_settings_is_a_config_error(tmp_path, suffix, text, found):
    path = tmp_path / f"best{suffix}"
    path.write_text(text)
    with pytest.raises(ConfigError, match=found) as err:
        _configs("--config", str(path))
    assert str(path) in str(err.value)


def test_a_config_file_may_group_settings_in_hrnn_and_data_sections(tmp_path):
    path = tmp_path / "best.json"
    path.write_text('{"hrnn": {"hidden_dimension": 64}, "data": {"min_item_support": 2}, "epochs": 3}')
    hrnn, data = _configs("--config", str(path))
    assert (hrnn.hidden_dimension, hrnn.epochs, data.min_item_support) == (64, 3, 2)


@pytest.mark.parametrize("text, found", [
    ('{"hidden_dimensions": 64, "epochs": 1}',
     "unknown setting 'hidden_dimensions' (did you mean 'hidden_dimension'?)"),
    ('{"hrnn": {"epoch": 1}}', "section 'hrnn': unknown setting 'epoch' (did you mean 'epochs'?)"),
    ('{"data": {"session_timeout": 60}}', "unknown setting 'session_timeout' (did you mean 'session_timeout_s'?)"),
    ('{"hrnn": {"min_item_support": 2}}', "'min_item_support' is a DataConfig setting; move it to section 'data'"),
    ('{"zzz": 1}', "unknown setting 'zzz'"),
])
def test_a_key_of_a_config_file_that_is_no_setting_is_a_config_error_naming_it_the_file_and_the_setting_meant(
        tmp_path, text, found):
    path = tmp_path / "typo.json"
    path.write_text(text)
    with pytest.raises(ConfigError) as err:
        _configs("--config", str(path))
    assert found in str(err.value) and str(path) in str(err.value)


def test_a_published_versions_config_json_is_a_config_file_but_a_key_beside_its_settings_is_not(tmp_path):
    cfg = HRNNConfig(hidden_dimension=64, epochs=2)
    version = save_version(tmp_path / "reg", HRNN(5, cfg), cfg, DataConfig(min_item_support=2),
                           [f"i{k}" for k in range(5)], ["click"])
    hrnn, data = _configs("--config", str(version / "config.json"))
    assert (hrnn.hidden_dimension, hrnn.epochs, data.min_item_support) == (64, 2, 2)
    typo = tmp_path / "typo.json"
    typo.write_text(json.dumps({**json.loads((version / "config.json").read_text()), "epoch": 1}))
    with pytest.raises(ConfigError, match="unknown setting 'epoch'"):
        _configs("--config", str(typo))


def test_a_config_file_that_is_not_utf8_is_a_config_error_naming_the_file_and_the_byte_offset(tmp_path):
    path = tmp_path / "latin1.json"
    path.write_bytes('{"variant": "café"}'.encode("latin-1"))
    with pytest.raises(ConfigError, match="not UTF-8") as err:
        _configs("--config", str(path))
    assert str(path) in str(err.value) and "0xe9 at offset 16" in str(err.value)


@pytest.mark.parametrize("setting, wrong, as_string, found", [
    ("session_timeout_s", True, "60", "setting session_timeout_s: true is a boolean, not a number"),
    ("epochs", False, "3", "setting epochs: false is a boolean, not an integer"),
    ("recency_mask", 0.5, "false", "setting recency_mask: 0.5 is a number, not a boolean"),
    ("recency_mask", 1, "true", "setting recency_mask: 1 is a number, not a boolean"),
    ("event_types", {"a": 1}, "click,purchase", 'setting event_types: {"a": 1} is an object, not a list'),
    ("event_type_weights", {"click": True}, "click=2", "setting event_type_weights['click']: true is a boolean"),
    # str() made text of any kind: the variant "None", the event type "1"
    ("variant", None, "hrnn-all", "setting variant: null is not a string (leave the key out for its default)"),
    ("optimizer", True, "adagrad", "setting optimizer: true is a boolean, not a string"),
    ("loss", ["top1"], "top1", 'setting loss: ["top1"] is an array, not a string'),
    ("event_types", [1, True], "1,true", "setting event_types[0]: 1 is a number, not a string"),
    ("event_types", ["click", None], "click", "setting event_types[1]: null is not a string"),
    ("event_types", None, "", "setting event_types: null is not a list of names"),
])
def test_a_config_value_of_another_kind_than_its_setting_is_refused_while_its_spelling_as_a_string_is_read(
        tmp_path, setting, wrong, as_string, found):
    path = tmp_path / "kind.json"
    path.write_text(json.dumps({setting: wrong}))
    with pytest.raises(ConfigError) as err:
        _configs("--config", str(path))
    assert str(err.value).startswith(found)
    path.write_text(json.dumps({setting: as_string}))  # flags and the environment give every value as a string
    _configs("--config", str(path))


def test_a_toml_config_value_of_another_kind_than_its_setting_is_refused_too(tmp_path):
    path = tmp_path / "kind.toml"
    path.write_text("[hrnn]\nrecency_mask = 0.5\n")
    with pytest.raises(ConfigError, match="setting recency_mask: 0.5 is a number, not a boolean"):
        _configs("--config", str(path))


def test_a_toml_config_list_of_event_types_holding_another_kind_than_text_is_refused_naming_the_item(tmp_path):
    path = tmp_path / "kind.toml"
    path.write_text('[data]\nevent_types = ["click", true]\n')
    with pytest.raises(ConfigError, match=r"setting event_types\[1\]: true is a boolean, not a string"):
        _configs("--config", str(path))


def test_text_settings_from_the_environment_are_read_as_written_even_when_they_look_like_numbers(monkeypatch):
    monkeypatch.setenv("HRNN_EVENT_TYPES", "1,2")
    assert _configs()[1].event_types == ("1", "2")


def _train_args(*argv: str) -> argparse.Namespace:
    from model import cli_train

    p = argparse.ArgumentParser()
    cli_train.add_arguments(p)
    return p.parse_args(["--data", "events.csv", "--registry", "reg", *argv])


def test_a_config_files_holdout_is_the_holdout_of_hrnn_train_unless_the_flag_names_another(tmp_path):
    from model.cli_train import resolve_holdout

    path = tmp_path / "best.json"
    path.write_text('{"holdout": "personalize", "hidden_dimension": 40}')
    args = _train_args("--config", str(path))
    assert configs_from_args(args)[0].hidden_dimension == 40  # the key is no setting, yet not refused
    assert resolve_holdout(args) == "personalize"
    assert resolve_holdout(_train_args("--config", str(path), "--holdout", "none")) == "none"
    assert resolve_holdout(_train_args()) == "last-session"


def test_a_config_files_holdout_that_is_no_holdout_is_a_config_error_naming_it(tmp_path):
    from model.cli_train import resolve_holdout

    path = tmp_path / "best.json"
    path.write_text('{"holdout": "last_session"}')
    with pytest.raises(ConfigError, match=r"best.json: holdout 'last_session' is not one of last-session, "):
        resolve_holdout(_train_args("--config", str(path)))


def test_the_settings_given_explicitly_are_those_of_the_flags_the_environment_and_the_config_file(tmp_path,
                                                                                                   monkeypatch):
    from model.cli_common import explicit_settings

    path = tmp_path / "c.json"
    path.write_text('{"hrnn": {"bptt": 8}, "min_item_support": 2, "holdout": "none"}')
    monkeypatch.setenv("HRNN_N_SAMPLE", "0")
    args = _train_args("--config", str(path), "--loss", "top1")
    assert explicit_settings(args) == {"bptt", "min_item_support", "n_sample", "loss"}


def test_a_settings_file_shared_with_the_worker_trains_from_its_sections_and_leaves_its_serve_table_to_the_worker(
        tmp_path):
    from model.cli_common import explicit_settings

    path = tmp_path / "shared.toml"
    path.write_text('[serve]\nregistry = "reg"\nbatch_size = 500\n\n[hrnn]\nbptt = 8\n\n[data]\nmin_item_support = 2\n')
    args = _train_args("--config", str(path))
    hrnn, data = configs_from_args(args)
    assert (hrnn.bptt, hrnn.batch_size, data.min_item_support) == (8, HRNNConfig().batch_size, 2)
    assert explicit_settings(args) == {"bptt", "min_item_support"}


def test_a_top_level_serve_key_that_is_no_table_is_still_refused(tmp_path):
    path = tmp_path / "c.toml"
    path.write_text('serve = "yes"\n')
    with pytest.raises(ConfigError, match="unknown setting 'serve'"):
        configs_from_args(_train_args("--config", str(path)))


def _worst_case_state(history_length: int):
    """One user's state at its largest: the last H stepped and H skipped events, each with an item id and an event
    type of 256 four-byte characters seen once, plus the names of the events that left the window a history keeps
    until it compacts, 256 hidden units and the longest session id and model version."""
    import numpy as np

    from model.events import MAX_ID_CHARS
    from model.state import _SLACK, History, UserState

    def name(tag: str, i: int) -> str:
        return f"{tag}{i:06d}".ljust(MAX_ID_CHARS, "\U0001F600")

    def history(tag: str) -> History:
        h = History()
        for i in range(history_length + _SLACK):
            h.append(name(tag + "i", i), 2**62 + i, name(tag + "t", i), True)
        for column in (h.item_codes, h.type_codes, h.ts, h.opens):  # the oldest left; their names are kept
            del column[:_SLACK]
        return h

    hidden = np.ones(256, np.float32)
    return UserState(name("v", 0), hidden, hidden, name("s", 0), 2**62, 2**62, history("h"), 2**62, 2**62,
                     {p: 2**62 for p in range(1000)}, 2**62, history("s"))


def test_one_users_state_at_the_largest_history_length_encodes_below_kafkas_record_limit():
    from model.config import MAX_HISTORY_LENGTH
    from model.state import FORMATS, encode_state

    state = _worst_case_state(MAX_HISTORY_LENGTH)
    assert len(state.history) == len(state.skipped) == MAX_HISTORY_LENGTH
    assert max(len(encode_state(state, fmt)) for fmt in FORMATS) < 900_000


def test_a_history_length_whose_states_could_pass_kafkas_record_limit_is_a_config_error_saying_why():
    from model.config import MAX_HISTORY_LENGTH

    HRNNConfig(history_length=MAX_HISTORY_LENGTH).validate()
    with pytest.raises(ConfigError, match=rf"^history_length = {MAX_HISTORY_LENGTH + 1} is outside its range "
                                          rf"\[1, {MAX_HISTORY_LENGTH}\]: one user's state must fit a Kafka record "
                                          r"\(1 MB\) on the state changelog"):
        _configs("--history-length", str(MAX_HISTORY_LENGTH + 1))


@pytest.mark.parametrize("suffix, text", [(".json", "[" * 100_000 + "]" * 100_000),
                                          (".toml", "a = " + "[" * 100_000 + "]" * 100_000)])
def test_a_config_file_nested_too_deeply_is_a_config_error_not_a_crash(tmp_path, suffix, text):
    path = tmp_path / f"deep{suffix}"
    path.write_text(text)
    with pytest.raises(ConfigError, match="is not valid (JSON|TOML): nested too deeply"):
        _configs("--config", str(path))


def test_a_versions_metrics_nested_too_deeply_records_no_holdout_for_training_from_its_config(tmp_path):
    from model.cli_train import resolve_holdout

    path = save_version(tmp_path, HRNN(5, HRNNConfig(hidden_dimension=8)), HRNNConfig(hidden_dimension=8),
                        DataConfig(), [f"i{k}" for k in range(5)], ["click"], {})
    config = json.loads((path / "config.json").read_text())
    config.pop("holdout", None)  # as versions of builds before 2026-12-06 wrote it: metrics.json is read instead
    (path / "config.json").write_text(json.dumps(config))
    (path / "metrics.json").write_text("[" * 100_000 + "]" * 100_000)
    assert resolve_holdout(_train_args("--config", str(path / "config.json"))) == "last-session"


def test_a_config_file_name_too_long_for_the_system_is_a_config_error_saying_so(tmp_path):
    with pytest.raises(ConfigError, match="cannot read config file .*\\.\\.\\..*: File name too long"):
        _configs("--config", str(tmp_path / ("A" * 300 + ".json")))
