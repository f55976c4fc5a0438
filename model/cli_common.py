"""Command-line plumbing shared by the model commands: data flags and config flags.

Every field of HRNNConfig and DataConfig is a flag (`--hidden-dimension 64`), read with the
same coercion and range checks as a config file (`--config best.json`) or the environment
(HRNN_HIDDEN_DIMENSION); flags win over the environment, which wins over the file.
"""
from __future__ import annotations

import argparse
import dataclasses
from typing import Any

from model.config import DataConfig, HRNNConfig, load_config, read_config_file
from model.interactions import Interactions
from model.loaders import add_loader_arguments, load_interactions, loader_options

ENV_PREFIX = "HRNN_"


def add_data_flags(p: argparse.ArgumentParser) -> None:
    p.add_argument("--data", required=True, help="interactions file (CSV, TSV or Parquet; Personalize columns)")
    add_loader_arguments(p)


def load_data(args: argparse.Namespace) -> Interactions:
    return load_interactions(args.data, **loader_options(args))


def add_config_flags(p: argparse.ArgumentParser, *classes: type) -> None:
    p.add_argument("--config", help="JSON or TOML file of hyperparameters (e.g. the best.json of `hrnn tune`)")
    for cls in classes:
        group = p.add_argument_group(cls.__name__)
        for f in dataclasses.fields(cls):
            default = f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]
            group.add_argument("--" + f.name.replace("_", "-"), dest=f.name, default=None, metavar="V",
                               help=f"(default {default!r})")


def configs_from_args(args: argparse.Namespace, base: dict[str, Any] | None = None
                      ) -> tuple[HRNNConfig, DataConfig]:
    """Defaults < `base` (e.g. a model's saved config) < --config file < environment < flags."""
    values = dict(base or {})
    if getattr(args, "config", None):
        file_values = read_config_file(args.config)
        values.update(file_values.get("hrnn", {}) | file_values.get("data", {}) | file_values)
    flags = {k: v for k, v in vars(args).items() if v is not None}
    hrnn = load_config(HRNNConfig, file_values=values, env_prefix=ENV_PREFIX, overrides=flags)
    data = load_config(DataConfig, file_values=values, env_prefix=ENV_PREFIX, overrides=flags)
    return hrnn, data
