"""Settings as a user gives them (flags, a --config file): every value that would train a broken model or
crash a command is a ConfigError naming the setting, before any work starts."""
from __future__ import annotations

import argparse

import pytest

from model.cli_common import add_config_flags, configs_from_args
from model.config import DataConfig, HRNNConfig
from model.errors import ConfigError


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
