"""The `hrnn` command. Each subcommand lives in the module named in COMMANDS and is imported
only when used, so `hrnn synth` does not pay for torch or librdkafka start-up.

A command module provides `add_arguments(parser)` and `run(args) -> int`.
"""
from __future__ import annotations

import argparse
import importlib
import sys

from model.errors import exit_status

COMMANDS: dict[str, tuple[str, str]] = {
    "synth": ("model.cli_synth", "write a synthetic Personalize-schema interactions file"),
    "train": ("model.cli_train", "train an HRNN and publish a model version"),
    "evaluate": ("model.cli_evaluate", "evaluate models and baselines offline"),
    "models": ("stream.cli_models", "list, show, promote, canary or roll back model versions"),
    "tune": ("model.cli_tune", "hyperparameter optimisation (Personalize performHPO)"),
    "serve": ("stream.cli_serve", "run the streaming inference worker"),
    "broker": ("stream.cli_broker", "run the local Kafka-compatible broker for development"),
    "produce": ("stream.cli_produce", "replay an interactions file into the events topic"),
    "tail": ("stream.cli_tail", "print recommendations as they arrive"),
    "items": ("stream.cli_items", "take items off sale, put them back, list those off sale"),
    "audit": ("stream.cli_audit", "check that every committed input record got its recommendation or dead letter"),
    "quality": ("stream.cli_quality", "judge the recommendations served by each user's next event, per model version"),
    "retrainer": ("stream.cli_retrainer", "archive events and retrain on a schedule"),
    "demo": ("stream.cli_demo", "the whole loop locally: broker, synth, train, serve, replay, summary"),
}


def build_parser(argv: list[str]) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="hrnn", description="Streaming HRNN recommender")
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    wanted = next((a for a in argv if not a.startswith("-")), None)
    for name, (module, help_text) in COMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        if name == wanted:  # only the chosen command's module is imported
            importlib.import_module(module).add_arguments(p)
    return parser


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    args = build_parser(argv).parse_args(argv)
    from stream.settings import warn_unknown_env  # every command, as `hrnn train` reads HRNN_* settings too

    warn_unknown_env()
    module = importlib.import_module(COMMANDS[args.command][0])
    return exit_status(lambda: module.run(args), f"hrnn {args.command}")


if __name__ == "__main__":
    sys.exit(main())
