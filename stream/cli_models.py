"""`hrnn models list|show|promote`: the versions of a registry."""
from __future__ import annotations

import argparse
import json

from model.artifact import list_versions, set_current, verify
from model.errors import ArtifactError


def add_arguments(p: argparse.ArgumentParser) -> None:
    sub = p.add_subparsers(dest="action", required=True)
    ls = sub.add_parser("list", help="versions, newest last; * marks the current one")
    ls.add_argument("registry")
    show = sub.add_parser("show", help="manifest, config and metrics of one version")
    show.add_argument("registry")
    show.add_argument("version")
    promote = sub.add_parser("promote", help="make VERSION the current one (rollback included)")
    promote.add_argument("registry")
    promote.add_argument("version")
    promote.add_argument("--bootstrap-servers", help="also announce it on the model-updates topic")
    promote.add_argument("--topic", default="hrnn.model-updates")


def run(args: argparse.Namespace) -> int:
    if args.action == "list":
        for v in list_versions(args.registry):
            val = v.metrics.get("val_mrr@20")
            score = f"val_mrr@20={val:.4f}" if isinstance(val, (int, float)) else ""
            print(f"{'*' if v.current else ' '} {v.version}  {v.created_at}  {score}")
        return 0
    d = _version_dir(args.registry, args.version)
    if args.action == "show":
        manifest = verify(d)
        out = {"manifest": manifest, "config": json.loads((d / "config.json").read_text()),
               "metrics": {k: v for k, v in json.loads((d / "metrics.json").read_text()).items() if k != "history"}}
        print(json.dumps(out, indent=2))
        return 0
    verify(d)
    set_current(args.registry, args.version)
    if args.bootstrap_servers:
        from stream.announce import announce

        announce(args.bootstrap_servers, args.topic, args.version, str(d))
    print(f"current version of {args.registry}: {args.version}")
    return 0


def _version_dir(registry: str, version: str):
    for v in list_versions(registry):
        if v.version == version:
            return v.path
    raise ArtifactError(f"no version {version!r} in {registry} (see `hrnn models list {registry}`)")
