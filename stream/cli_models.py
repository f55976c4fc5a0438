"""`hrnn models list|show|promote|rollback|canary|prune`: the versions of a registry.

promote and rollback also announce the new current version on the model-updates topic when
--bootstrap-servers is given, so running workers switch to it. canary only announces: running workers
serve the version to a share of the users beside the current one, which stays CURRENT in the registry
(so a worker starting meanwhile serves it as the stable version); promoting either version ends the canary.
All three first check the version as a worker does before serving it (stream/hotswap.py validate_version), and
refuse one every worker would refuse. All three hold the registry's pointer lock (model/registry.py current_lock)
from their read of CURRENT to their announcement: two at once take turns (the second waits for the first, or
fails with nothing changed when it waits too long), so CURRENT names the version announced last. prune holds it
too, from its read of CURRENT and the rollback target to its last deletion, so it never deletes a version
promoted meanwhile.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from model.artifact import current_version, latest_version_dir, list_versions, verify
from model.config import path_arg, read_json
from model.errors import ArtifactError, HRNNError
from stream.cli_common import add_kafka_flags, kafka_settings
from stream.topics import MODEL_UPDATES_TOPIC, check_topic_name


def add_arguments(p: argparse.ArgumentParser) -> None:
    sub = p.add_subparsers(dest="action", required=True)
    ls = sub.add_parser("list", help="versions, newest last; * marks the current one (~ a canary, read from the "
                                     "model-updates topic with --bootstrap-servers)")
    ls.add_argument("registry", type=path_arg)
    show = sub.add_parser("show", help="manifest, config and metrics of one version")
    show.add_argument("registry", type=path_arg)
    show.add_argument("version")
    promote = sub.add_parser("promote", help="make VERSION the current one (rollback included)")
    promote.add_argument("registry", type=path_arg)
    promote.add_argument("version")
    rollback = sub.add_parser("rollback", help="make the version that was current before the current one current "
                                               "again (a second rollback goes one further back)")
    rollback.add_argument("registry", type=path_arg)
    canary = sub.add_parser("canary", help="have running workers serve VERSION to a share of the users; "
                                           "promote it, or the current version, to end the canary")
    canary.add_argument("registry", type=path_arg)
    canary.add_argument("version")
    canary.add_argument("--share", type=float, required=True, help="of the users, strictly between 0 and 1")
    prune = sub.add_parser("prune", help="delete all but the newest N versions (never the current one or the one a "
                                         "rollback returns to, nor with --bootstrap-servers the canary serving now)")
    prune.add_argument("registry", type=path_arg)
    prune.add_argument("--keep", type=int, required=True)
    for q in (ls, prune):
        q.add_argument("--bootstrap-servers", help="also read the announcements: "
                       + ("mark a canary serving now" if q is ls else "keep a canary serving now"))
    for q in (promote, rollback, canary):
        q.add_argument("--bootstrap-servers", required=q is canary,
                       help="announce it on the model-updates topic" + ("" if q is canary else " too"))
    for q in (ls, promote, rollback, canary, prune):
        q.add_argument("--topic", default=MODEL_UPDATES_TOPIC)
        q.add_argument("--registry-id", help="announcement key (default: the registry's absolute path); workers "
                       "follow the key of their registry_id setting")
        add_kafka_flags(q)


def run(args: argparse.Namespace) -> int:
    kafka = _kafka_settings(args)  # before the registry changes: a bad setting then changes nothing
    if args.action == "list":
        canary = _announced_canary(args, kafka) if args.bootstrap_servers else None
        versions = list_versions(args.registry)
        for v in versions:
            val = v.metrics.get("val_mrr@20")
            score = f"val_mrr@20={val:.4f}" if isinstance(val, (int, float)) else ""
            is_canary = canary is not None and v.version == canary.version
            mark = "*" if v.current else "~" if is_canary else " "
            print(f"{mark} {v.version}  {v.created_at}  {score}"
                  + (f"  canary: {canary.share:.1%} of the users" if is_canary else ""))
        current = current_version(args.registry)
        if current is not None:  # a CURRENT no worker can serve: said below the list, exit 2
            latest_version_dir(args.registry)
            if not any(v.current for v in versions):
                raise ArtifactError(f"CURRENT of {args.registry} names {current!r}, which is no complete version (no "
                                    f"manifest.json): no worker can start from it; point it at a listed version with "
                                    f"`hrnn models promote {args.registry} VERSION`")
        return 0
    if args.action == "rollback":
        from model.registry import current_lock, previous_version, rollback, version_path
        from stream.hotswap import check_servable

        with current_lock(args.registry):
            target = previous_version(args.registry)
            if target is not None:  # else rollback() says there is none
                check_servable(version_path(args.registry, target), target)
            _check_updates_topic(args, kafka)
            version = rollback(args.registry)
            _announce(args, kafka, version, version_path(args.registry, version), reason="rollback")
        print(f"current version of {args.registry}: {version} (rolled back)")
        return 0
    if args.action == "prune":
        from model.registry import current_lock, prune

        # the canary is looked up under the lock too: `models canary` and the retrainer announce one under it
        with current_lock(args.registry):  # a promote of an old version must not land between its read and delete
            canary = _announced_canary(args, kafka) if args.bootstrap_servers else None
            removed = prune(args.registry, args.keep, protect=(canary.version,) if canary else ())
        print(f"removed {len(removed)} version(s)" + (f": {', '.join(removed)}" if removed else "")
              + (f"; kept the canary {canary.version}" if canary else ""))
        if not args.bootstrap_servers:
            print("announcements not read: a canary serving now was not looked for (--bootstrap-servers)",
                  file=sys.stderr)
        return 0
    d = _version_dir(args.registry, args.version)
    if args.action == "canary":
        from model.registry import current_lock
        from stream.canary import check_share
        from stream.hotswap import check_servable

        check_share(args.share)
        with current_lock(args.registry):
            _refuse_current_as_canary(args.registry, args.version)
            check_servable(d, args.version)
            _announce(args, kafka, args.version, d, reason="canary", share=args.share)
        print(f"{args.version} announced as a canary for {args.share:.1%} of the users of {args.registry}")
        return 0
    if args.action == "show":
        manifest = verify(d)
        out = {"manifest": manifest, "config": _read_json(d, "config.json"),
               "metrics": {k: v for k, v in _read_json(d, "metrics.json").items() if k != "history"}}
        print(json.dumps(out, indent=2))
        return 0
    from model.registry import current_lock, promote
    from stream.hotswap import check_servable

    check_servable(d, args.version)
    with current_lock(args.registry):
        _check_updates_topic(args, kafka)
        promote(args.registry, args.version)
        _announce(args, kafka, args.version, d)
    print(f"current version of {args.registry}: {args.version}")
    return 0


def _kafka_settings(args: argparse.Namespace) -> dict[str, str]:
    """The Kafka client settings of a command given --bootstrap-servers, checked by librdkafka; else none."""
    if not getattr(args, "bootstrap_servers", None):
        return {}
    from stream.kafka_clients import check_client_settings

    check_topic_name("--topic", args.topic)
    kafka = kafka_settings(args)
    check_client_settings(args.bootstrap_servers, kafka)
    return kafka


def _check_updates_topic(args: argparse.Namespace, kafka: dict[str, str]) -> None:
    """Reach the broker (and make the announcements topic) before CURRENT moves: a broker down then changes
    nothing, rather than leave CURRENT and the workers' version apart until someone announces it by hand."""
    if args.bootstrap_servers:
        from stream.compacted import ensure_table_topic

        ensure_table_topic(args.bootstrap_servers, args.topic, extra=kafka)


def _announce(args: argparse.Namespace, kafka: dict[str, str], version: str, path, *, reason: str = "promote",
              share: float = 1.0) -> None:
    """Announce what the command did; when a promote or rollback already changed CURRENT, a failure says how to
    announce it without changing the registry again (a second rollback would go one further back)."""
    if not args.bootstrap_servers:
        print(f"not announced (no --bootstrap-servers): running workers keep serving what they serve until the next "
              f"announcement, workers started from now on serve {version}; to tell the running ones: `hrnn models "
              f"promote {args.registry} {version} --bootstrap-servers ...`", file=sys.stderr)
        return
    from stream.announce import AnnouncementError, announce

    try:
        announce(args.bootstrap_servers, args.topic, version, str(path), reason=reason,
                 registry_id=args.registry_id, share=share, extra=kafka)
    except HRNNError as exc:
        if reason == "canary":
            raise
        topic = args.topic if args.topic != MODEL_UPDATES_TOPIC else None
        where = "".join(f" {flag} {value}" for flag, value in (("--topic", topic), ("--registry-id", args.registry_id))
                        if value)
        raise AnnouncementError(f"{exc}. The current version of {args.registry} is {version} now, but running "
                                f"workers were not told: once that is fixed, announce it with `hrnn models promote "
                                f"{args.registry} {version}{where} --bootstrap-servers ...`") from None


def _read_json(d: Path, name: str) -> dict:
    """A version's JSON file, or ArtifactError naming it (a signed version may still hold one that is not JSON)."""
    try:
        return read_json(d / name)
    except (OSError, ValueError) as exc:  # ValueError: not JSON (or nested too deeply), or not UTF-8
        raise ArtifactError(f"{d}: {name} unreadable ({exc})") from None


def _refuse_current_as_canary(registry: str, version: str) -> None:
    # Workers would end any canary for it (it serves the rest already), yet the announcement would read as a
    # canary until the next one: `models list` would mark it and a --canary-share retrainer would wait on it.
    if version == current_version(registry):
        raise ArtifactError(f"{version} is already the current version of {registry}; a canary is another version "
                            f"served beside it (to end a canary serving now, promote {version}: `hrnn models "
                            f"promote {registry} {version} --bootstrap-servers ...`)")


def _announced_canary(args: argparse.Namespace, kafka: dict[str, str]):
    """The canary serving now for the registry (its announcement), else None."""
    from stream.announce import latest_canary, registry_id

    return latest_canary(args.bootstrap_servers, args.topic, args.registry_id or registry_id(args.registry),
                         extra=kafka)


def _version_dir(registry: str, version: str):
    for v in list_versions(registry):
        if v.version == version:
            return v.path
    raise ArtifactError(f"no version {version!r} in {registry} (see `hrnn models list {registry}`)")
