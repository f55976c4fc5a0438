"""`hrnn evaluate`: models and baselines on one split, one table, one JSON, one plot."""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from model.artifact import LoadedModel, load_version
from model.baselines import BASELINES, make_baseline
from model.cli_common import (add_config_flags, add_data_flags, config_holdout, data_config_from_args, load_data,
                               output_file)
from model.config import DataConfig, path_arg, to_dict
from model.errors import ConfigError
from model.evaluate import evaluate, format_table
from model.inference import HRNNScorer
from model.network import resolve_device
from model.pipeline import HOLDOUT_POPULATION, HOLDOUTS, prepare
from model.plots import check_format, plot_eval_table
from model.splits import PERSONALIZE, PROTOCOLS, make_split

DEFAULT_BASELINES = "pop,recent-pop,item-knn,sknn,user-knn,user-repeat+session"  # the strongest bars by default
DEFAULT_SEED = 0  # the personalize sample's seed when no model says which users it held out
# The DataConfig settings that decide the test events: which events featurization keeps, where sessions start.
SPLIT_SETTINGS = ("event_types", "collapse_repeats", "min_item_support", "session_timeout_s", "whole_history_session")


def add_arguments(p: argparse.ArgumentParser) -> None:
    add_data_flags(p)
    p.add_argument("--model", action="append", default=[], metavar="DIR", type=path_arg,
                   help="a model version directory (repeatable)")
    p.add_argument("--baselines", default=DEFAULT_BASELINES, help=f"comma list of: {', '.join(BASELINES)} ('' for none)")
    p.add_argument("--protocol", choices=PROTOCOLS, default=None,
                   help="default: the --config file's holdout where it is a protocol (`hrnn tune` records it in "
                        "best.json), else last-session")
    p.add_argument("--json", type=path_arg, help="write the result as JSON here")
    p.add_argument("--plot", type=path_arg, help="write a bar chart PNG here (default: next to --json)")
    p.add_argument("--seed", type=int, default=None,
                   help="seed of the personalize protocol's user sample (default: the one the first --model held "
                        f"out of training with `hrnn train --holdout personalize`, else {DEFAULT_SEED})")
    p.add_argument("--device", default="auto")
    p.add_argument("--quiet", action="store_true")
    add_config_flags(p, DataConfig)


def run(args: argparse.Namespace) -> int:
    baselines = baseline_names(args.baselines)
    if not baselines and not args.model:
        raise ConfigError("nothing to evaluate: --baselines is empty and no --model is given "
                          f"(baselines: {', '.join(BASELINES)})")
    if args.seed is not None and args.seed < 0:  # numpy's generator, which draws that sample, takes any other
        raise ConfigError(f"seed = {args.seed} is outside its range [0, inf): the personalize sample's generator "
                          "takes no negative seed")
    if args.plot:
        check_format(args.plot, "--plot")
    plot = args.plot or (str(Path(args.json).with_suffix(".png")) if args.json else None)
    if plot and args.json and Path(plot).resolve() == Path(args.json).resolve():
        # The chart is written after the JSON: it would replace the result it charts.
        where = "--plot names it too" if args.plot else "the chart goes next to --json, as .png"
        raise ConfigError(f"--json {args.json}: the chart would overwrite it ({where}): name the JSON file .json, "
                          "or give --plot another path")
    output_file(args.json, "--json")
    output_file(plot, "--plot")
    device = resolve_device(args.device)
    loaded = [load_version(d, device) for d in args.model]
    # The split must match the one the models were trained around: use the first model's featurization. A model
    # featurized otherwise (a later --model, or any under an overriding flag or --config) is warned of below.
    base = to_dict(loaded[0].data_config) if loaded else None
    data_config = data_config_from_args(args, base)
    args.protocol = args.protocol or protocol_of(config_holdout(args, HOLDOUTS))
    for m in loaded:
        if m.metrics.get("holdout") not in (args.protocol, None):
            print(f"warning: {m.path} was trained holding out {m.metrics.get('holdout')!r}, not {args.protocol!r}: "
                  "its scores may include events it trained on", file=sys.stderr)
        for name, own, used in differing_split_settings(m.data_config, data_config):
            print(f"warning: {m.path} was featurized with {name} {own!r}, this split with {used!r}: it held out "
                  "other events, so its scores may include events it trained on", file=sys.stderr)
    seed = split_seed(args.protocol, args.seed, loaded)
    prep = prepare(load_data(args), data_config)
    split = make_split(args.protocol, prep.data, prep.starts, seed=seed)
    if not split.test:
        raise ConfigError(f"{args.data}: no user qualifies for a {args.protocol} test (too few sessions per user?)")
    scorers = {}
    for name in baselines:
        scorers[name] = make_baseline(name)
    for m in loaded:
        scorers[f"hrnn:{m.version}"] = HRNNScorer.for_version(m, split.train, name=f"hrnn:{m.version}")
    for s in scorers.values():
        s.fit(split.train, split.train_starts)
    result = evaluate(split, scorers, progress=not args.quiet)
    print(format_table(result))
    if args.json:
        Path(args.json).write_text(json.dumps(result.to_json(), indent=2))
    if plot:
        plot_eval_table(result, plot)
    return 0


def protocol_of(holdout: str | None) -> str:
    """The protocol that tests what `holdout` kept out of training; a holdout of none kept nothing out."""
    return holdout if holdout in PROTOCOLS else PROTOCOLS[0]


def differing_split_settings(own: DataConfig, used: DataConfig) -> list[tuple[str, Any, Any]]:
    """(setting, own value, used value) for each setting that decides the test events (which events featurization
    keeps, where sessions start) and differs. The history-length percentiles only keep users out of training, and
    the event-type weights only weigh its loss: the test events are the same whatever they are."""
    def key(v: Any) -> Any:
        return sorted(v) if isinstance(v, (tuple, list)) else v  # event types filter as a set

    whole = own.whole_history_session and used.whole_history_session  # no timeout cuts a session then
    return [(name, getattr(own, name), getattr(used, name)) for name in SPLIT_SETTINGS
            if key(getattr(own, name)) != key(getattr(used, name)) and not (whole and name == "session_timeout_s")]


def baseline_names(text: str) -> list[str]:
    """The names in a --baselines comma list ('' and stray commas: none)."""
    return [b.strip() for b in text.split(",") if b.strip()]


def holdout_seed(m: LoadedModel) -> int | None:
    """The seed that drew the users `m` held out of training under the personalize protocol (None: it held
    out none). Versions from before the seed was recorded used their config's: train_version always did."""
    if m.metrics.get("holdout") != PERSONALIZE:
        return None
    return int(m.metrics.get("holdout_seed", m.config.seed))


def split_seed(protocol: str, seed: int | None, loaded: list[LoadedModel]) -> int:
    """The personalize sample's seed: `seed` when given, else the first model's holdout seed, so its test users
    are the ones it never trained on; a warning for each model whose held-out users are not the ones tested."""
    held = [(m, s) for m in loaded if (s := holdout_seed(m)) is not None]
    if seed is None:
        seed = held[0][1] if held else DEFAULT_SEED
    if protocol == PERSONALIZE:
        for m, s in held:
            if s != seed:
                print(f"warning: {m.path} held out the personalize users of seed {s}, not {seed}: "
                      "its scores may include users it trained on", file=sys.stderr)
            elif m.metrics.get("holdout_population") != HOLDOUT_POPULATION:
                print(f"warning: {m.path} drew its held-out personalize users before 2026-12-06, leaving out the "
                      "users the history-length filter keeps out of training; they are drawn from all users now, "
                      "so its scores may include users it trained on (train it again)", file=sys.stderr)
    return seed

