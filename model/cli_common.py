"""Command-line plumbing shared by the model commands: data flags, config flags, output files and folders.

Every field of HRNNConfig and DataConfig is a flag (`--hidden-dimension 64`), read with the
same coercion and range checks as a config file (`--config best.json`) or the environment
(HRNN_HIDDEN_DIMENSION); flags win over the environment, which wins over the file. A config file may also
name the `holdout` its values were tuned under (`hrnn tune` writes it into best.json); `config_holdout` reads it.
"""
from __future__ import annotations

import argparse
import dataclasses
import os
from pathlib import Path
from typing import Any

from model.config import (DataConfig, HRNNConfig, field_names, json_kind, load_config, read_config_file,
                          path_arg, read_json, shown_path, unknown_setting)
from model.errors import ConfigError
from model.interactions import Interactions
from model.loaders import add_loader_arguments, load_interactions, loader_options

ENV_PREFIX = "HRNN_"
SECTIONS: dict[str, type] = {"hrnn": HRNNConfig, "data": DataConfig}
# The bookkeeping keys of a published version's config.json (model/artifact.py), which is a valid --config:
# its hrnn and data sections hold every setting the version was trained with.
VERSION_KEYS = ("version", "n_items")
# Not a setting of either class but of the run: tune's best.json records the holdout its trials were scored
# under, since training under another one would neither reproduce the best trial nor keep its test events unseen.
HOLDOUT_KEY = "holdout"
SERVE_TABLE = "serve"  # the worker's table in a settings file shared by every command


def add_data_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data", required=True, type=path_arg,
                   help="interactions file (CSV, TSV or Parquet; Personalize columns)")
    add_loader_arguments(p)


def load_data(args: argparse.Namespace) -> Interactions:
    return load_interactions(args.data, **loader_options(args))


def add_config_flags(p: argparse.ArgumentParser, *classes: type, base: dict[str, Any] | None = None) -> None:
    """A flag per setting of `classes`, its help the default the command applies (`base` over the class's)."""
    p.add_argument("--config", type=path_arg,
                   help="JSON or TOML file of hyperparameters (e.g. the best.json of `hrnn tune`)")
    for cls in classes:
        group = p.add_argument_group(cls.__name__)
        for f in dataclasses.fields(cls):
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]
            default = (base or {}).get(f.name, default)
            group.add_argument("--" + f.name.replace("_", "-"), dest=f.name, default=None, metavar="V",
                               help=f"(default {default!r})")


def configs_from_args(args: argparse.Namespace, base: dict[str, Any] | None = None
                      ) -> tuple[HRNNConfig, DataConfig]:
    """Defaults < `base` (e.g. a model's saved config) < --config file < environment < flags."""
    values, flags = _layers(args, base)
    hrnn = load_config(HRNNConfig, file_values=values, env_prefix=ENV_PREFIX, overrides=flags)
    data = load_config(DataConfig, file_values=values, env_prefix=ENV_PREFIX, overrides=flags)
    return hrnn, data


def data_config_from_args(args: argparse.Namespace, base: dict[str, Any] | None = None) -> DataConfig:
    """The DataConfig alone, for a command that trains nothing (`hrnn evaluate`): an HRNN_* variable of training
    or of the worker (HRNN_BATCH_SIZE is both), or its own flags (--seed), must not be read as HRNNConfig's."""
    values, flags = _layers(args, base)
    return load_config(DataConfig, file_values=values, env_prefix=ENV_PREFIX, overrides=flags)


def _layers(args: argparse.Namespace, base: dict[str, Any] | None) -> tuple[dict[str, Any], dict[str, Any]]:
    """`base` under the --config file's settings, and the flags given."""
    values = dict(base or {})
    if getattr(args, "config", None):
        values.update(file_settings(args.config))
    return values, {k: v for k, v in vars(args).items() if v is not None}


def file_settings(path: str) -> dict[str, Any]:
    """A --config file's settings, its sections' merged under its top level's. Every key must be a setting:
    a misspelt one would otherwise leave its setting at the default without a word. A `[serve]` table is the
    worker's (stream/settings.py), so one file can serve every command: skipped, as the worker skips ours."""
    file_values = {k: v for k, v in read_config_file(path).items() if not (k == SERVE_TABLE and isinstance(v, dict))}
    merged: dict[str, Any] = {}
    for name in SECTIONS:
        section = _section(path, file_values, name)
        for key in section:
            _check_section_key(path, name, key)
        merged.update(section)
    top = {k: v for k, v in file_values.items() if k not in SECTIONS and k not in (*VERSION_KEYS, HOLDOUT_KEY)}
    every = field_names(HRNNConfig) | field_names(DataConfig)
    for key in top:
        if key not in every:
            raise unknown_setting(key, every, f"config file {path}")
    return merged | top


def _published_holdout(version_dir: Path) -> str | None:
    """The holdout a version's metrics.json records: a config.json written before it kept the holdout itself
    (2026-12-06) does not say, and training from it would change the split without a word."""
    try:
        return read_json(version_dir / "metrics.json").get(HOLDOUT_KEY)
    except (OSError, ValueError, AttributeError):
        return None


def config_holdout(args: argparse.Namespace, choices: tuple[str, ...]) -> str | None:
    """The `holdout` the --config file records (None: no file or no such key), one of `choices`."""
    path = getattr(args, "config", None)
    if not path:
        return None
    values = read_config_file(path)
    value = values.get(HOLDOUT_KEY)
    if value is None and all(k in values for k in VERSION_KEYS):
        value = _published_holdout(Path(path).parent)
    if value is not None and value not in choices:
        raise ConfigError(f"config file {path}: {HOLDOUT_KEY} {value!r} is not one of {', '.join(choices)}")
    return value


def explicit_settings(args: argparse.Namespace) -> set[str]:
    """The settings given on purpose: by flag, environment or --config file (not left at a default)."""
    given = {k for k, v in vars(args).items() if v is not None}
    if getattr(args, "config", None):
        given |= set(file_settings(args.config))
    every = field_names(HRNNConfig) | field_names(DataConfig)
    given |= {k for k in every if ENV_PREFIX + k.upper() in os.environ}
    return given & every


def _check_section_key(path: str, name: str, key: str) -> None:
    # A setting in the other class's section is refused too: the retrainer reads each section for its own
    # class only, so it would train without it.
    own = field_names(SECTIONS[name])
    if key in own:
        return
    where = f"config file {path}, section {name!r}"
    for other, cls in SECTIONS.items():
        if key in field_names(cls):
            raise ConfigError(f"{where}: {key!r} is a {cls.__name__} setting; move it to section {other!r} "
                              "or the top level")
    raise unknown_setting(key, own, where)


def _section(path: str, file_values: dict[str, Any], name: str) -> dict[str, Any]:
    """A config file's optional `name` section (settings may also sit at the top level)."""
    section = file_values.get(name, {})
    if not isinstance(section, dict):
        raise ConfigError(f"config file {path}: {name!r} holds {json_kind(section)}, not an object of "
                          f"{'HRNNConfig' if name == 'hrnn' else 'DataConfig'} settings")
    return section


def output_file(path: str | None, flag: str) -> None:
    """Make sure a result can be written to `path` (its folder created) before the work that makes it: a bad
    path found after minutes of work loses them (and `hrnn audit`'s exit 1 would read as a broken promise)."""
    if path is None:
        return
    target = Path(path)
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ConfigError(f"{flag} {shown_path(path)}: cannot create its folder ({exc.strerror})") from None
    try:
        is_dir = target.is_dir()
    except OSError as exc:  # a file name too long: is_dir() raises rather than say False
        raise ConfigError(f"{flag} {shown_path(path)}: cannot be written ({exc.strerror or exc})") from None
    if is_dir or not os.access(target.parent, os.W_OK):
        raise ConfigError(f"{flag} {path}: " + ("a folder, not a file" if is_dir else "its folder is not writable"))


def output_dir(path: str, flag: str) -> None:
    """Make sure `path` is (or can be made) a writable directory before the work that fills it."""
    target = Path(path)
    try:
        target.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise ConfigError(f"{flag} {path}: cannot create the directory ({exc.strerror})") from None
    if not os.access(target, os.W_OK | os.X_OK):
        raise ConfigError(f"{flag} {path}: the directory is not writable")
