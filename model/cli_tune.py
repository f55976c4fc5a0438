"""`hrnn tune`: hyperparameter optimisation on an interactions file (Personalize performHPO)."""
from __future__ import annotations

import argparse

from model.cli_common import (add_config_flags, add_data_flags, configs_from_args, explicit_settings, load_data,
                               output_dir)
from model.cli_train import resolve_holdout
from model.config import DataConfig, HRNNConfig, path_arg
from model.pipeline import HOLDOUTS

TRIAL_EPOCHS = 4  # per-trial budget unless --epochs, HRNN_EPOCHS or --config says otherwise: pruning does the rest
TUNE_BASE = {"epochs": TRIAL_EPOCHS}


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_data_flags(p)
    p.add_argument("--out", required=True, type=path_arg,
                   help="directory for best.json, trials.json/csv and the history PNG")
    p.add_argument("--trials", type=int, default=20, help="trial budget (default 20)")
    p.add_argument("--timeout-s", type=float, default=1800.0, help="time budget in seconds (default 1800)")
    p.add_argument("--holdout", choices=HOLDOUTS,
                   help="the evaluation protocol whose test events tuning must never see (default: the --config "
                   "file's holdout, else last-session)")
    p.add_argument("--tune-seed", type=int, default=0, help="seed of the Optuna sampler")
    p.add_argument("--device", default="auto", help="auto (CUDA if present), cpu or cuda")
    add_config_flags(p, HRNNConfig, DataConfig, base=TUNE_BASE)
    p.epilog = ("A searched hyperparameter given by flag, HRNN_<NAME> or --config is fixed in every trial, not "
                "searched; --epochs is each trial's epoch budget (default 4).")


def run(args: argparse.Namespace) -> int:
    from model.tune import tune

    config, data_config = configs_from_args(args, base=TUNE_BASE)  # the lowest layer, not a flag
    output_dir(args.out, "--out")
    result = tune(load_data(args), args.out, base=config, data_config=data_config, trials=args.trials,
                  timeout_s=args.timeout_s, holdout=resolve_holdout(args), device=args.device, seed=args.tune_seed,
                  fixed=frozenset(explicit_settings(args)))
    print(result.out_dir / "best.json")
    return 0
