"""How often a canary judge that looks every day decides wrongly, with the plain 95% interval and with the
anytime-valid one that `hrnn quality --decide-canary` uses; prints ONE JSON object.

    python bench/canary_peeking.py [--experiments 1000] [--users 4000] [--looks 20] [--early-looks 6]
                                   [--arrival lists|users] [--png PATH]

Simulated canaries, judged by the real code (`Verdicts.estimate`, `Comparison`, `stream.canary.decide`):
each experiment draws --users users, each with as many judged lists as a user of reddit-jodie's last 20%
(by time) had events less one (the real, heavy-tailed counts; a list is judged by the user's next event, so
a user's last list waits and a user with one event has none judged), a hit probability from a Beta
distribution around the side's recall (mean --recall, concentration 4), and a side (the canary at --share);
a hit's rank is drawn over 1..20 with weight 1/rank (MRR@20 about 0.44 x recall@20). The judge reads
recall@20 and MRR@20, as `hrnn quality --decide-canary` does, and ends the canary when either did worse.
With --arrival lists (default) every list comes at its own random time, so a heavy user's lists spread over
the whole experiment, as in serving; with `users` a user's lists come all together. The judge looks after each
1/--looks of the lists (a day, say), and --early-looks times within the first of them, after 1/2^K, ..., 1/4,
1/2 of its lists (a judge run hourly while the canary is new, say: it sees the canary at a handful of users),
and stops at its first `end` or `promote`.
Scenarios: `a/a` (the canary is as good: ending it is the wrong decision), `loss` (its recall is --loss
lower) and `small loss` (1.5 x --max-loss lower): beyond the allowed loss, so promoting it is the wrong
decision. Per scenario and rule:
  end, promote, undecided      share of the experiments that ended with each
  wrong                        share decided wrongly (a/a: end; loss: promote)
  mean_users_at_decision       users judged at the deciding look, over the decided experiments
Rules: `fixed` (the plain interval at every look), `anytime` (the confidence sequence at every look) and
`fixed_one_look` (the plain interval, looked at once, at the end: what it is right for). The anytime
interval is tuned for half of --users (what `--planned-users` does).
"""
from __future__ import annotations

import argparse
import json
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from model.errors import exit_status  # noqa: E402
from stream.canary import Rule, decide  # noqa: E402
from stream.quality import Comparison, Verdicts  # noqa: E402

DATA = ROOT.parent / "shared" / "data" / "reddit-jodie" / "reddit.tsv"
PAST = {"end": "ended", "promote": "promoted"}


def lists_per_user(path: Path, live_share: float = 0.2) -> np.ndarray:
    """The judged lists of each user with any, in the last `live_share` of the log by time: events - 1, as a
    list is judged by the user's next event (the last list awaits one), as `hrnn quality` judges them."""
    users, times = np.loadtxt(path, dtype=np.int64, usecols=(0, 2), unpack=True)
    live = times >= np.quantile(times, 1 - live_share)
    events = np.bincount(users[live])
    return events[events >= 2] - 1


RANKS = np.arange(1, 21)
RANK_WEIGHTS = 1.0 / RANKS / (1.0 / RANKS).sum()  # a hit near the top of the list more often than further down


def experiment(rng: np.random.Generator, sizes: np.ndarray, *, users: int, share: float, recall: float,
               effect: float, arrival: str = "lists") -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """(side per list, rank per list: 1-20 on a hit, 0 on a miss, user per list) in the order the lists
    arrive: each list at its own random time ("lists": a user's lists spread over the whole experiment, as in
    serving) or a user's lists all together ("users")."""
    lists = rng.choice(sizes, users)
    canary = rng.random(users) < share
    mean = np.where(canary, recall + effect, recall)
    p = rng.beta(4 * mean, 4 * (1 - mean))
    user = np.repeat(np.arange(users), lists)
    hit = rng.random(len(user)) < p[user]
    rank = np.where(hit, rng.choice(RANKS, len(user), p=RANK_WEIGHTS), 0)
    order = rng.permutation(len(user)) if arrival == "lists" else np.arange(len(user))
    return canary[user][order].astype(np.int64), rank[order].astype(np.int64), user[order]


def comparison_after(side: np.ndarray, rank: np.ndarray, user: np.ndarray, n: int) -> Comparison:
    """The comparison `hrnn quality` would print after the first n lists, on both metrics `decide` judges."""
    v = Verdicts(["stable", "canary"], side[:n], np.zeros(n, np.int64), rank[:n], np.zeros(n, np.int64),
                 np.zeros(n, np.int64), user[:n])
    return Comparison("stable", "canary", 0, 0, 0, {f"{m}@20": (v.estimate(v.version == 0, 20, m),
                                                               v.estimate(v.version == 1, 20, m))
                                                    for m in ("recall", "mrr")})


def look_sizes(lists: int, looks: int, early_looks: int = 0) -> list[int]:
    """The lists judged at each look: after each 1/looks of `lists`, and `early_looks` times before the
    first of those, each after half as many lists as the next (at least one)."""
    first = lists / looks
    early = [max(1, round(first / 2 ** k)) for k in range(early_looks, 0, -1)]
    return early + [round(lists * look / looks) for look in range(1, looks + 1)]


def judge(side: np.ndarray, rank: np.ndarray, user: np.ndarray, looks: int, rules: dict[str, Rule],
          early_looks: int = 0) -> dict[str, tuple[str, int, int]]:
    """Per rule, (the first decision that is not wait, or 'undecided'; the look, 1-based, early looks
    included; users judged then), looking after the lists of `look_sizes`."""
    sizes = look_sizes(len(user), looks, early_looks)
    out: dict[str, tuple[str, int, int]] = {}
    for look, n in enumerate(sizes, 1):
        c = comparison_after(side, rank, user, n)
        for name, rule in rules.items():
            if name in out or (name == "fixed_one_look" and look != len(sizes)):
                continue
            action = decide(c, rule).action
            if action != "wait":
                out[name] = (action, look, c.users)
    return {name: out.get(name, ("undecided", len(sizes), 0)) for name in rules}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--data", type=Path, default=DATA)
    ap.add_argument("--experiments", type=int, default=1000)
    ap.add_argument("--users", type=int, default=4000)
    ap.add_argument("--looks", type=int, default=20)
    ap.add_argument("--early-looks", type=int, default=6, help="looks within the first of --looks, each after "
                    "half the lists of the next (default %(default)s: the first at a handful of users)")
    ap.add_argument("--share", type=float, default=0.5)
    ap.add_argument("--recall", type=float, default=0.9)
    ap.add_argument("--loss", type=float, default=0.03)
    ap.add_argument("--max-loss", type=float, default=0.01)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--arrival", choices=("lists", "users"), default="lists")
    ap.add_argument("--png", default="/tmp/canary_peeking.png")
    args = ap.parse_args()
    if args.experiments < 1 or args.looks < 1:  # no experiment: no share to report; no look: no decision
        ap.error("--experiments and --looks must be >= 1")
    if args.early_looks < 0:
        ap.error(f"--early-looks must be >= 0, got {args.early_looks}")
    if not args.data.is_file():  # said as a usage error, not numpy's FileNotFoundError traceback
        ap.error(f"--data {args.data}: no such file")
    started = time.perf_counter()
    sizes = lists_per_user(args.data)
    base = Rule(max_loss=args.max_loss, planned_users=args.users // 2)
    rules = {"fixed": replace(base, anytime=False), "anytime": base, "fixed_one_look": replace(base, anytime=False)}
    rng = np.random.default_rng(args.seed)
    looks = args.looks + args.early_looks
    result: dict = {"users": args.users, "looks": args.looks, "early_looks": args.early_looks,
                    "metrics": ["recall@20", "mrr@20"], "experiments": args.experiments, "arrival": args.arrival,
                    "lists_per_user": {"mean": float(sizes.mean()), "median": float(np.median(sizes)),
                                       "max": int(sizes.max()), "users_in_log": len(sizes)},
                    "planned_users": base.planned_users, "max_loss": args.max_loss, "scenarios": {}}
    curves = {}
    scenarios = (("a/a", 0.0, "end"), ("loss", -args.loss, "promote"), ("small loss", -1.5 * args.max_loss, "promote"))
    for scenario, effect, wrong in scenarios:
        runs = []
        for i in range(args.experiments):
            runs.append(judge(*experiment(rng, sizes, users=args.users, share=args.share, recall=args.recall,
                                          effect=effect, arrival=args.arrival), args.looks, rules, args.early_looks))
            if (i + 1) % 50 == 0:
                print(f"{scenario}: {i + 1}/{args.experiments} experiments", file=sys.stderr)
        result["scenarios"][scenario] = {"effect": effect, "wrong_decision": wrong,
                                         **{name: summary([r[name] for r in runs], wrong) for name in rules}}
        right = "promote" if wrong == "end" else "end"
        curves[scenario] = {name: {a: [np.mean([r[name][0] == a and r[name][1] <= look for r in runs])
                                       for look in range(1, looks + 1)] for a in (wrong, right)}
                            for name in ("fixed", "anytime")}
    result["png"] = plot(curves, looks, args.png, args.early_looks)
    result["seconds"] = round(time.perf_counter() - started, 1)
    print(json.dumps(result, indent=2))
    return 0


def summary(outcomes: list[tuple[str, int, int]], wrong: str) -> dict:
    actions = [a for a, _, _ in outcomes]
    decided = [n for a, _, n in outcomes if a != "undecided"]
    return {**{a: actions.count(a) / len(actions) for a in ("end", "promote", "undecided")},
            "wrong": actions.count(wrong) / len(actions),
            "mean_users_at_decision": float(np.mean(decided)) if decided else None}


def plot(curves: dict, looks: int, path: str, early_looks: int = 0) -> str:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator

    fig, axes = plt.subplots(1, len(curves), figsize=(5 * len(curves), 4))
    titles = {"a/a": "canary as good as the stable version", "loss": "canary much worse (--loss)",
              "small loss": "canary worse by 1.5 x the allowed loss"}
    for ax, (scenario, by_rule) in zip(axes, curves.items()):
        for (name, by_action), color in zip(by_rule.items(), ("tab:red", "tab:blue")):
            for (action, ys), style in zip(by_action.items(), ("-", "--")):
                what = "wrongly" if style == "-" else "rightly"
                ax.plot(range(1, looks + 1), ys, style, color=color, marker="o", ms=3,
                        label=f"{name}: {what} {PAST[action]} by then")
        ax.set_title(titles.get(scenario, scenario), fontsize=10)
        ax.set_ylabel("share of the experiments")
        ax.set_xlabel(f"look (a day, say; the first {early_looks} within the first day)" if early_looks
                      else "look (a day, say)")
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        ax.set_ylim(0, 1)
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


if __name__ == "__main__":
    sys.exit(exit_status(main, Path(__file__).name))
