"""`hrnn quality`: how well the recommendations served did, judged by each user's next event
(see stream/quality.py): recall@k and MRR@k per model version, beside a recent-items reference.

The worker group's topics and client settings resolve as for `hrnn serve` and `hrnn audit`.
Exit status: 0 with a report (also when nothing could be judged yet), 1 with --fail-if-worse when a version
served side by side with another (a canary) did worse on recall@k or MRR@k beyond its 95% interval, and with
--decide-canary when the canary was ended for doing worse; 2 on bad input.
"""
from __future__ import annotations

import argparse
import json
import math
import sys
import time
from pathlib import Path
from typing import TYPE_CHECKING, Callable, TextIO

from model.cli_common import output_file
from model.config import path_arg
from model.errors import ArtifactError, ConfigError
from stream.canary import Rule, anytime_z, decide
from stream.cli_common import add_deployment_flags, deployment_settings, positive
from stream.settings import MAX_K

if TYPE_CHECKING:
    from stream.quality import Comparison, QualityReport
    from stream.settings import WorkerSettings


def add_arguments(parser: argparse.ArgumentParser) -> None:
    add_deployment_flags(parser, "judge the recommendations of")
    a = parser.add_argument
    a("--cutoffs", default="1,5,10,20", metavar="K,K,...", help="the k of recall@k, comma-separated (default "
      "1,5,10,20; MRR is at the largest); past the worker's list length recall@k is that of the whole list")
    a("--history-s", type=float, default=0.0, help="with --since-s: also read the events of S seconds before the "
      "window, not judged, so the recent-items reference knows the users' earlier items (default 0)")
    a("--png", type=path_arg, help="also draw recall@k and MRR@k (the largest k) over time, per version, to this PNG")
    a("--bucket-s", type=float, help="the chart's time buckets (default: about 30 over the recommendations judged)")
    a("--fail-if-worse", action="store_true", help="exit 1 when a version served side by side with an earlier one "
      "(a canary) did worse than it beyond the 95%% interval (too few users to tell passes: read the intervals)")
    a("--decide-canary", action="store_true", help="if the workers' registry has a canary serving, act on its "
      "comparison with the current version, once --min-users users are on each side: end it if it did worse, "
      "promote it if a loss above --max-loss is ruled out, else wait (stream/canary.py decide); by an anytime-valid "
      "interval, so the judge may run every day and stop at the first answer")
    a("--max-loss", type=float, default=Rule.max_loss, help="with --decide-canary: the largest loss of recall@k or "
      "MRR@k (absolute) a promotion may risk (default %(default)s)")
    a("--min-users", type=int, default=Rule.min_users, help="with --decide-canary: users needed on each side "
      "before the canary is ended or promoted (default %(default)s)")
    a("--planned-users", type=int, default=Rule.planned_users, help="the users (both sides of a canary) at which "
      "the anytime interval, printed and --decide-canary's, is narrowest (default %(default)s; it widens slowly "
      "either side)")
    a("--fixed-horizon", action="store_true", help="with --decide-canary: decide on the plain 95%% interval "
      "instead, right only for a judge that looks once, when --planned-users is reached")
    a("--registry", help="with --decide-canary: the workers' model registry (default: their settings')")
    a("--updates-topic", help="with --decide-canary: the model-updates topic (default: the workers' settings')")
    a("--registry-id", help="with --decide-canary: the key of the registry's announcements (default: the workers' "
      "settings', else the registry's absolute path)")


def _ks(text: str) -> list[int]:
    try:
        ks = sorted({int(k) for k in text.split(",") if k.strip()})
    except ValueError:
        raise ConfigError(f"--cutoffs must be whole numbers separated by commas, got {text!r}") from None
    if not ks or ks[0] < 1 or ks[-1] > MAX_K:
        raise ConfigError(f"--cutoffs {text!r}: each must lie in [1, {MAX_K}]")
    return ks


def _finite(obj: object) -> object:
    """`obj` with null for each NaN or infinity (a kind with nothing judged, a side of one user): JSON has no
    such numbers, and json.dumps would write them bare, which other readers refuse."""
    if isinstance(obj, float) and not math.isfinite(obj):
        return None
    if isinstance(obj, dict):
        return {k: _finite(v) for k, v in obj.items()}
    if isinstance(obj, (list, tuple)):
        return [_finite(v) for v in obj]
    return obj


def _cell(x: float) -> str:
    return "-" if math.isnan(x) else f"{x:.4f}"


def print_report(report: QualityReport, out: TextIO | None = None, planned_users: int = Rule.planned_users) -> None:
    out = out or sys.stdout  # looked up at call time: a caller may have redirected it
    k_max = max(report.ks)
    heads = [f"recall@{k}" for k in report.ks] + [f"mrr@{k_max}"]
    width = max([len(r["name"]) for r in report.rows()] + [13])
    print(f"{'model version':<{width}}  {'next event':<12} {'judged':>8} " + " ".join(f"{h:>9}" for h in heads),
          file=out)
    for r in report.rows():
        name = r["name"] if r["kind"] == "all" else ""
        print(f"{name:<{width}}  {r['kind']:<12} {r['judged']:>8} " + " ".join(f"{_cell(r[h]):>9}" for h in heads),
              file=out)
    print(f"{len(report.verdicts.rank)} recommendations judged by the user's next event on {report.input_topic!r}; "
          f"{report.pending} await their user's next event", file=out)
    for c in report.comparisons():
        print_comparison(c, out, planned_users)


def print_comparison(c: Comparison, out: TextIO, planned_users: int) -> None:
    """Two versions served side by side (a canary): each metric's difference with its 95% interval, and the
    anytime-valid one a judge that reads this again and again should use (stream/canary.py)."""
    print(f"\n{c.candidate} vs {c.baseline}, served side by side to different users for "
          f"{c.side_by_side_ms / 1000:.0f} s"
          + (f" (only the {c.bucket_ms / 1000:g} s buckets in which both served lists" if c.bucket_ms else " (")
          + (f"; {c.alone_ms / 1000:g} s in which one served alone left out" if c.alone_ms else "")
          + ("; " if c.bucket_ms else "") + "95% intervals by user"
          + (f"; {c.left_out_users} user(s) who saw both left out" if c.left_out_users else "") + "):", file=out)
    z = anytime_z(max(c.users, 1), planned_users)
    for name, (a, b) in c.metrics.items():
        (diff, half), se = c.difference(name), c.difference_se(name)[1]
        print(f"  {name}: {_cell(b.value)} ({b.lists} lists, {b.users} users) vs {_cell(a.value)} ({a.lists}, "
              f"{a.users}): {diff:+.4f} ± {half:.4f}, {c.verdict(name)} (anytime ± {z * se:.4f})", file=out)


def run(args: argparse.Namespace) -> int:
    from stream.quality import plot_quality, quality_worker

    ks = _ks(args.cutoffs)
    # Bounded by the time since the epoch: a wider bucket holds every emission time already, and one past
    # 64-bit milliseconds fails in the chart, after the whole judgement.
    if args.bucket_s is not None and not (positive(args.bucket_s) and args.bucket_s <= time.time()):
        raise ConfigError(f"--bucket-s must be > 0 seconds and at most {time.time():.0f} (the time since the "
                          f"epoch), got {args.bucket_s:g}")
    if not (args.history_s == 0 or positive(args.history_s)) or (args.history_s and args.since_s is None):
        raise ConfigError(f"--history-s must be >= 0 seconds and needs --since-s (without a window every event is "
                          f"read), got {args.history_s:g}")
    if not (math.isfinite(args.max_loss) and args.max_loss >= 0) or args.min_users < 1 or args.planned_users < 1:
        raise ConfigError(f"--max-loss must be >= 0, --min-users and --planned-users >= 1, got {args.max_loss:g}, "
                          f"{args.min_users} and {args.planned_users}")
    if args.png:
        from model.plots import check_format  # matplotlib only when a chart is asked for

        # Before the judgement, not after it: a .txt fails in savefig, and no extension writes another name.
        check_format(args.png, "--png")
    output_file(args.json, "--json")
    output_file(args.png, "--png")
    settings, since_ms = deployment_settings(args)
    if args.decide_canary and not settings.registry:
        raise ConfigError("--decide-canary needs the workers' registry: --registry DIR, or a --config that names it")

    def judge(since_ms: int | None, history_ms: int = 0) -> QualityReport:
        return quality_worker(settings, ks=ks, since_ms=since_ms, history_ms=history_ms, idle_s=args.idle_s,
                              timeout_s=args.timeout_s,
                              progress=lambda line: print(f"hrnn quality: {line}", file=sys.stderr))

    report = judge(since_ms, int(args.history_s * 1000))
    print_report(report, planned_users=args.planned_users)
    if args.png:
        bucket_ms = None if args.bucket_s is None else max(1, int(args.bucket_s * 1000))
        print(f"chart: {plot_quality(report, args.png, max(ks), bucket_ms)}")
    # The decision comes first: a window that alarms must not keep a canary from being judged.
    decision = decide_canary(settings, report, Rule(args.max_loss, args.min_users, not args.fixed_horizon,
                                                    args.planned_users), judge) if args.decide_canary else None
    if args.json:
        out = {**report.to_dict(), **({"canary_decision": decision} if decision is not None else {})}
        Path(args.json).write_text(json.dumps(_finite(out), indent=2, allow_nan=False) + "\n")
    worse = [f"{c.candidate} vs {c.baseline} on {name}" for c in report.comparisons() for name in c.metrics
             if c.verdict(name) == "worse"]
    if args.fail_if_worse and worse:
        print(f"hrnn quality: worse beyond the 95% interval: {'; '.join(worse)}", file=sys.stderr)
        return 1
    return 1 if decision is not None and decision["action"] == "end" else 0


# Input records written before the announcement can be scored by the canary (a worker's backlog); reading
# more than needed is harmless, the comparison keeps only the time both versions served.
CANARY_LEAD_MS = 3_600_000


def decide_canary(settings: WorkerSettings, report: QualityReport, rule: Rule,
                  judge: Callable[[int | None], QualityReport]) -> dict:
    """Promote, end or keep the canary the registry's latest announcement names; what was decided (also for
    the JSON): canary (None when none serves), share, stable, action, reason, announced (the version
    announced for everyone, or None).

    The decision reads the canary's whole time (its announcement on): a report over a shorter window is
    judged again from there (`judge(since_ms)`), so a daily judge decides on the growing experiment the
    anytime interval is made for, not on the last day alone."""
    from model.artifact import current_version
    from model.registry import current_lock, promote, version_path
    from stream.announce import announce, latest_canary, registry_id
    from stream.hotswap import check_servable

    registry, key = settings.registry, settings.registry_id or registry_id(settings.registry)
    ann = latest_canary(settings.bootstrap_servers, settings.updates_topic, key, extra=settings.consumer_kafka)
    if ann is None:
        print(f"canary: none serving for {key}")
        return {"canary": None, "action": "none"}
    stable = current_version(registry)
    start_s = ann.announced_epoch_s()  # read as the workers read it: without an offset, UTC
    start_ms = None if start_s is None else int(start_s * 1000)
    if report.since_ms is not None and start_ms is not None and start_ms - CANARY_LEAD_MS < report.since_ms:
        print(f"judging the canary over its whole time: from {ann.announced_at} (its announcement) on")
        report = judge(start_ms - CANARY_LEAD_MS)
    comparison = next((c.facing(stable) for c in report.comparisons()
                       if {c.baseline, c.candidate} == {stable, ann.version}), None)
    decision = decide(comparison, rule)
    print(f"canary {ann.version} ({ann.share:.1%} of the users) vs {stable}: {decision.action}, {decision.reason}")
    out = {"canary": ann.version, "share": ann.share, "stable": stable, "action": decision.action,
           "reason": decision.reason, "announced": None}
    if decision.action != "wait":
        target = ann.version if decision.action == "promote" else stable
        check_servable(version_path(registry, target), target)  # as `models promote` does: CURRENT stays servable
        with current_lock(registry):  # as `models promote` holds it: CURRENT ends at the version announced last
            if current_version(registry) != stable:  # moved while the canary was judged against it
                raise ArtifactError(f"CURRENT of {registry} moved from {stable} to {current_version(registry)} "
                                    "while the canary was judged: nothing was announced; judge it again")
            promoting = decision.action == "promote"
            path = promote(registry, target) if promoting else version_path(registry, target)
            # an ended canary is rolled back: its users return to the stable version, which CURRENT never left
            announce(settings.bootstrap_servers, settings.updates_topic, target, path,
                     reason="promote" if promoting else "rollback", registry_id=key, extra=settings.producer_kafka)
        print(f"announced {target} for all users on {settings.updates_topic}")
        out["announced"] = target
    return out
