"""`hrnn train`: train an HRNN on an interactions file and publish a model version."""
from __future__ import annotations

import argparse
import sys

from model.artifact import check_pointer_files
from model.cli_common import add_config_flags, add_data_flags, config_holdout, configs_from_args, load_data, output_dir
from model.config import path_arg
from model.pipeline import HOLDOUTS, train_version


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_data_flags(p)
    p.add_argument("--registry", required=True, type=path_arg, help="model registry directory")
    p.add_argument("--holdout", choices=HOLDOUTS, default=None,
                   help="reserve this protocol's test events so `hrnn evaluate` scores unseen events (default: the "
                        "--config file's holdout, as `hrnn tune` records it in best.json, else last-session)")
    p.add_argument("--no-early-stopping", action="store_true", help="train all epochs, no validation split")
    p.add_argument("--device", default="auto", help="auto (CUDA if present), cpu or cuda")
    p.add_argument("--quiet", action="store_true", help="no progress bars")
    add_config_flags(p, *_config_classes())


def _config_classes():
    from model.config import DataConfig, HRNNConfig
    return HRNNConfig, DataConfig


def resolve_holdout(args: argparse.Namespace) -> str:
    """--holdout, else the --config file's (tune's best.json: its trials were scored under it), else last-session."""
    return args.holdout or config_holdout(args, HOLDOUTS) or "last-session"


def run(args: argparse.Namespace) -> int:
    config, data_config = configs_from_args(args)
    holdout = resolve_holdout(args)
    output_dir(args.registry, "--registry")  # before the training, not after it
    check_pointer_files(args.registry)
    data = load_data(args)
    run_ = train_version(data, args.registry, config=config, data_config=data_config, holdout=holdout,
                         early_stopping=not args.no_early_stopping, device=args.device, progress=not args.quiet)
    for line in run_.report.lines():
        print(line, file=sys.stderr)
    val = {k: round(v, 4) for k, v in run_.metrics.items() if k.startswith("val_")}
    print(f"best epoch {run_.fit.best_epoch}, validation {val}", file=sys.stderr)
    print(run_.version_dir)
    return 0
