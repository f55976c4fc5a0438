"""Recommendation quality on reddit-jodie: repeat-aware HRNN vs plain HRNN-Init vs the simple baselines.

    python bench/quality_reddit.py [--data ../shared/data/reddit-jodie/reddit.tsv] [--out-dir /tmp/quality]
        [--repeat-set key=value,...] [--plain-set key=value,...] [--repeat-config best.json] [--models repeat,plain]
        [--seeds 42,1,2]
    python bench/quality_reddit.py --synth [--repeat-share 0]   # the same on `hrnn synth`'s default log

Both networks are trained exactly as `hrnn train` does (model.pipeline.train_version: featurize,
hold out the last-session test, early stopping on a validation split carved from the training
part, then the refit on the whole training part), then scored with the baselines under the
last-session protocol (30-minute sessions, full-catalogue ranking, pessimistic ties) as
`hrnn evaluate` does. Prints ONE JSON object
(metrics per model, training time, the repeat model's relative gain over user-repeat+session)
and writes a bar chart PNG next to it. Training time swings with the shared machine's load.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from model.artifact import load_version  # noqa: E402
from model.baselines import make_baseline  # noqa: E402
from model.cli_common import file_settings  # noqa: E402
from model.cli_evaluate import differing_split_settings  # noqa: E402
from model.config import DataConfig, HRNNConfig, field_names, load_config, to_dict, unknown_setting  # noqa: E402
from model.errors import exit_status  # noqa: E402
from model.evaluate import evaluate, format_table  # noqa: E402
from model.inference import HRNNScorer  # noqa: E402
from model.loaders import load_interactions  # noqa: E402
from model.pipeline import prepare, train_version  # noqa: E402
from model.plots import plot_eval_table  # noqa: E402
from model.splits import make_split  # noqa: E402
from model.synth import generate  # noqa: E402

REDDIT = ROOT.parent / "shared" / "data" / "reddit-jodie" / "reddit.tsv"
BASELINES = ("pop", "sknn", "user-knn", "ease", "user-repeat", "user-repeat+session")
REFERENCE = "user-repeat+session"
BAR = 0.05  # the target: +5% relative on recall@20 and MRR@20 over REFERENCE
# Settings beyond the defaults: more epochs than the default 5 (validation MRR still rose to epoch ~8 on
# reddit; early stopping ends the run), the same budget for both networks.
REPEAT_DEFAULTS: dict = {"repeat_head": True, "epochs": 12}
PLAIN_DEFAULTS: dict = {"repeat_head": False, "epochs": 12}


def setting_pairs(text: str) -> dict[str, str]:
    """A --*-set's key=value,... items (an argparse type: a malformed one is a usage error before any data)."""
    pairs = {}
    for kv in text.split(","):
        if not kv.strip():
            continue
        key, eq, value = kv.partition("=")
        if not eq:
            raise argparse.ArgumentTypeError(f"expected key=value, got {kv.strip()!r}")
        pairs[key.strip()] = value
    return pairs


def _config(base: dict, file: str | None, pairs: dict[str, str], flag: str) -> tuple[HRNNConfig, DataConfig]:
    # file_settings holds a file as `hrnn train --config` does, and takes a tune best.json (its `holdout`)
    return configs_from({**base, **(file_settings(file) if file else {})}, pairs, flag)


def configs_from(values: dict, pairs: dict[str, str], flag: str) -> tuple[HRNNConfig, DataConfig]:
    """The configs of `values` under the `flag`'s pairs, every key of which must be a setting, as `hrnn train
    --config` holds them: a misspelt one would train the default and report it as the config asked for."""
    every = field_names(HRNNConfig) | field_names(DataConfig)
    for key in pairs:
        if key not in every:
            raise unknown_setting(key, every, flag)
    values = {**values, **pairs}
    return load_config(HRNNConfig, file_values=values), load_config(DataConfig, file_values=values)


def _seeds(text: str) -> list[int]:
    try:
        return [int(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a comma list of integers, got {text!r}") from None


def _seed_means(models: dict[str, dict[str, float]], names: list[str]) -> dict[str, dict[str, float]]:
    """Per network (name before "/seed"), recall@20 and MRR@20 averaged over its seeds, with min and max."""
    groups: dict[str, list[dict[str, float]]] = {}
    for n in names:
        groups.setdefault(n.split("/seed")[0], []).append(models[n])
    out = {}
    for net, runs in groups.items():
        out[net] = {}
        for k in ("recall@20", "mrr@20"):
            vals = [r[k] for r in runs]
            out[net].update({k: round(sum(vals) / len(vals), 4), f"{k}_min": round(min(vals), 4),
                            f"{k}_max": round(max(vals), 4)})
        out[net]["seeds"] = len(runs)
    return out


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", default=str(REDDIT))
    p.add_argument("--out-dir", default=str(Path(tempfile.gettempdir()) / "quality_reddit"))
    p.add_argument("--models", default="repeat,plain", help="which networks to train: repeat, plain")
    p.add_argument("--repeat-config", help="config file for the repeat model (e.g. hrnn tune's best.json)")
    p.add_argument("--repeat-set", type=setting_pairs, default="", help="overrides for the repeat model: key=value,...")
    p.add_argument("--plain-config", help="config file for plain HRNN-Init")
    p.add_argument("--plain-set", type=setting_pairs, default="", help="overrides for plain HRNN-Init: key=value,...")
    p.add_argument("--synth", action="store_true", help="hrnn synth's default log (2000 users, 1000 items) instead")
    p.add_argument("--repeat-share", type=float, default=0.0, help="with --synth: the repeat knob")
    p.add_argument("--seeds", type=_seeds, default=[], help="train each network once per seed (comma list) and compare the "
                   "means: seed-to-seed spread on reddit is about 0.3%% MRR (default: the config's seed)")
    p.add_argument("--quiet", action="store_true")
    args = p.parse_args()
    wanted = [m.strip() for m in args.models.split(",") if m.strip()]
    unknown = sorted(set(wanted) - {"repeat", "plain"})
    if unknown:  # a typo trained no network and reported the baselines alone
        p.error(f"--models: unknown network {', '.join(unknown)} (known: repeat, plain)")

    configs = {}  # before the data: a bad setting is refused before minutes of loading
    if "repeat" in wanted:
        configs["hrnn-repeat"] = _config(REPEAT_DEFAULTS, args.repeat_config, args.repeat_set, "--repeat-set")
    if "plain" in wanted:
        configs["hrnn-init"] = _config(PLAIN_DEFAULTS, args.plain_config, args.plain_set, "--plain-set")
    if len(configs) == 2 and (differ := differing_split_settings(*(d for _, d in configs.values()))):
        # Every network is tested on one split: one featurized otherwise would be tested on events it trained on.
        p.error("the networks must split the log alike, but " + "; ".join(
            f"{name} is {a!r} for hrnn-repeat and {b!r} for hrnn-init" for name, a, b in differ))

    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    if args.synth:
        args.data = f"synth(2000 users, 1000 items, seed 0, repeat_share {args.repeat_share})"
        data = generate(2000, 1000, seed=0, repeat_share=args.repeat_share)
    else:
        data = load_interactions(args.data, columns={"USER_ID": "0", "ITEM_ID": "1", "TIMESTAMP": "2"},
                                 time_unit="s")

    seeds = args.seeds
    if seeds:
        configs = {(f"{name}/seed{sd}" if len(seeds) > 1 else name): (dataclasses.replace(cfg, seed=sd), dcfg)
                   for name, (cfg, dcfg) in configs.items() for sd in seeds}
    training: dict[str, dict] = {}
    versions = {}
    for name, (cfg, dcfg) in configs.items():
        t0 = time.perf_counter()
        run = train_version(data, out / "registry", config=cfg, data_config=dcfg, holdout="last-session",
                            progress=not args.quiet, make_current=False)
        training[name] = {"seconds": round(time.perf_counter() - t0, 1), "best_epoch": run.fit.best_epoch,
                          "epochs_run": len(run.fit.history), "version": run.version_dir.name,
                          "val_mrr@20": run.metrics.get("val_mrr@20"),
                          "val_recall@20": run.metrics.get("val_recall@20"),
                          "window_offset": run.metrics.get("calibration", {}).get("window_offset"),
                          "config": to_dict(cfg)}
        versions[name] = (load_version(run.version_dir), dcfg)

    # All networks of one run share the data config (the split must be the one they were trained around).
    dcfg = next(iter(configs.values()))[1] if configs else DataConfig()
    prep = prepare(data, dcfg)
    split = make_split("last-session", prep.data, prep.starts)
    scorers = {b: make_baseline(b) for b in BASELINES}
    for name, (m, _) in versions.items():
        scorers[name] = HRNNScorer.for_version(m, split.train, name=name)
    for s in scorers.values():
        s.fit(split.train, split.train_starts)
    result = evaluate(split, scorers, progress=False)
    print(format_table(result), file=sys.stderr)

    keys = ("recall@5", "recall@20", "mrr@20", "ndcg@20", "first/recall@20", "first/mrr@20")
    report: dict = {"data": str(args.data), "protocol": result.protocol, "n_test_events": result.n_test_events,
                    "models": {n: {k: round(m[k], 4) for k in keys if k in m} for n, m in result.models.items()},
                    "training": training}
    ref = result.models[REFERENCE]
    networks = _seed_means(result.models, list(versions))
    if len(networks) < len(versions):
        report["seed_means"] = networks
    for name, m in networks.items():
        gain = {k: round(m[k] / ref[k] - 1.0, 4) for k in ("recall@20", "mrr@20")}
        report.setdefault("relative_to_" + REFERENCE, {})[name] = gain
        if name == "hrnn-repeat":
            report["repeat_meets_bar"] = all(v >= BAR for v in gain.values())
            if "hrnn-init" in networks:
                plain = networks["hrnn-init"]
                report["repeat_beats_plain"] = m["recall@20"] > plain["recall@20"] and m["mrr@20"] > plain["mrr@20"]
                report["repeat_relative_to_plain"] = {k: round(m[k] / plain[k] - 1.0, 4)
                                                      for k in ("recall@20", "mrr@20")}
    png = plot_eval_table(result, out / ("quality_synth.png" if args.synth else "quality_reddit.png"))
    report["png"] = str(png)
    (out / ("quality_synth.json" if args.synth else "quality_reddit.json")).write_text(json.dumps(report, indent=2))
    print(json.dumps(report))
    return 0


if __name__ == "__main__":
    sys.exit(exit_status(main, Path(__file__).name))
