"""Where the hits and misses are on reddit-jodie: repeat targets (the user had the item before) vs
explore targets (a new item for the user), and what the +5% bar asks of each; prints ONE JSON object.

    python bench/repeat_explore.py [--data ../shared/data/reddit-jodie/reddit.tsv] [--png PATH] [VERSION_DIR ...]

Same split as bench/quality_reddit.py (last-session protocol, 30-minute sessions, events 2..n of
each test session, full-catalogue ranks with ties counted pessimistically). VERSION_DIRs are
trained versions to score beside the baselines, e.g. the registry that quality_reddit.py wrote.

  repeat_share                 share of targets whose item is in the user's earlier events
  kind_shares                  the repeat targets split three ways: stay (the item of the event just
                               before), session (another item of the current session), history (an
                               item of earlier sessions only); and new (the explore targets)
  <model>.recall@20_repeat / _explore, mrr@20_repeat / _explore
  <model>.recall@20_repeat_<kind>, mrr@20_repeat_<kind>
                               the same metrics per kind of repeat target (a network that gains on
                               history targets may pay for it on stay targets: this shows the trade)
  bar                          the recall@20 and MRR@20 that +5% over user-repeat+session means,
                               and explore_recall@20_needed: the explore recall@20 that reaches
                               the recall bar even if every repeat target were in the top 20
  explore_recall@20_new_items_only
                               explore targets in the scorer's top 20 of the items new to the user:
                               what a perfect repeat/explore gate would leave them
  perfect_gate_bound           recall@20 if every repeat target were in the top 20 and every explore
                               target got all 20 slots of the best scorer's new items (a ranking
                               that orders new items as that scorer does cannot do better)
  own_items_first              recall@20 of a hand-made hybrid per scorer: the user's earlier items
                               first (in user-repeat+session's order), the slots left filled by
                               that scorer's ranking of the other items
  png                          a chart of the recall@20 figures against the bar (default
                               /tmp/repeat_explore.png)
  ease_fusion                  per VERSION_DIR: recall@20 and MRR@20 of (its scores + beta * EASE's)
                               for each beta of a grid, read on the test split itself: an optimistic
                               look at what the best explore scorer here could add to the network
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from model.artifact import load_version  # noqa: E402
from model.baselines import make_baseline  # noqa: E402
from model.config import DataConfig  # noqa: E402
from model.errors import exit_status  # noqa: E402
from model.inference import HRNNScorer  # noqa: E402
from model.loaders import load_interactions  # noqa: E402
from model.pipeline import prepare  # noqa: E402
from model.plots import check_format  # noqa: E402
from model.scorer import Scorer, UserSequence  # noqa: E402
from model.splits import make_split  # noqa: E402

REDDIT = ROOT.parent / "shared" / "data" / "reddit-jodie" / "reddit.tsv"
REFERENCE = "user-repeat+session"
BAR = 0.05
CUT = 20
FUSION_BETAS = (0.0, 0.5, 1.0, 2.0, 4.0, 8.0, 16.0)
KINDS = ("stay", "session", "history", "new")  # see target_kinds


def score_all(scorer: Scorer, seqs: list[UserSequence]) -> list[np.ndarray]:
    """The scorer's (targets, catalogue) matrix per sequence, scored once, 256 sequences at a time."""
    return [m for a in range(0, len(seqs), 256) for m in scorer.score(seqs[a:a + 256])]


def target_kinds(seqs: list[UserSequence]) -> np.ndarray:
    """Per main-slice target (events 2..n), which of KINDS it is: the item of the event just before it
    (the user stays), another item of its session, an item of the user's earlier sessions only, or new."""
    kinds = []
    for s in seqs:
        begin = s.targets[0]  # the test session's first event (last-session: targets are the session)
        for t in s.targets[1:]:
            truth = s.items[t]
            kinds.append(0 if s.items[t - 1] == truth else 1 if (s.items[begin:t] == truth).any()
                         else 2 if (s.items[:begin] == truth).any() else 3)
    return np.array(kinds)


def ranks_and_new_ranks(scores: list[np.ndarray], seqs: list[UserSequence]) -> tuple[np.ndarray, np.ndarray]:
    """Per main-slice target: pessimistic rank, and its rank among the items new to the user (meaningful
    for explore targets only)."""
    ranks, new_ranks = [], []
    for s, mat in zip(seqs, scores):
        for row, t in zip(mat[1:], s.targets[1:]):
            truth, earlier = s.items[t], s.items[:t]
            above = row >= row[truth]
            ranks.append(int(above.sum()))
            above[np.unique(earlier[earlier >= 0])] = False
            new_ranks.append(int(above.sum()))
    return np.array(ranks), np.array(new_ranks)


def own_items_first(ur_scores: list[np.ndarray], other: list[np.ndarray], seqs: list[UserSequence]) -> list[bool]:
    """Per main-slice target: is it in the top 20 of (own items by UR+S, then `other`'s new items)?"""
    hits = []
    for s, mu, mo in zip(seqs, ur_scores, other):
        for r, t in enumerate(s.targets[1:], start=1):
            earlier = s.items[:t]
            own = np.unique(earlier[earlier >= 0])
            own = own[np.argsort(-mu[r][own], kind="stable")][:CUT]
            row = mo[r].copy()
            row[own] = -np.inf
            top = np.argpartition(-row, CUT)[:CUT]
            fill = top[np.argsort(-row[top], kind="stable")][:CUT - len(own)]
            hits.append(bool(s.items[t] in own or s.items[t] in fill))
    return hits


def fusion_grid(network: list[np.ndarray], ease: list[np.ndarray], seqs: list[UserSequence]
                ) -> dict[str, dict[str, float]]:
    """Per beta: recall@20 and MRR@20 over the main-slice targets of network scores + beta * ease scores."""
    n_mat, e_mat = np.concatenate([m[1:] for m in network]), np.concatenate([m[1:] for m in ease])
    t = np.concatenate([s.items[s.targets[1:]] for s in seqs]).astype(np.int64)
    out = {}
    for beta in FUSION_BETAS:
        scores = n_mat + beta * e_mat
        ranks = (scores >= scores[np.arange(len(t)), t][:, None]).sum(axis=1)
        hit = ranks <= CUT
        out[str(beta)] = {f"recall@{CUT}": round(float(hit.mean()), 4),
                          f"mrr@{CUT}": round(float(np.where(hit, 1.0 / ranks, 0.0).mean()), 4)}
    return out


def summary(ranks: np.ndarray, kinds: np.ndarray, new_ranks: np.ndarray) -> dict[str, float]:
    hit = ranks <= CUT
    rr = np.where(hit, 1.0 / ranks, 0.0)
    repeat = kinds != KINDS.index("new")
    out = {f"recall@{CUT}": float(hit.mean()), f"mrr@{CUT}": float(rr.mean()),
           f"explore_recall@{CUT}_new_items_only": float((new_ranks[~repeat] <= CUT).mean()),
           f"recall@{CUT}_repeat": float(hit[repeat].mean()), f"recall@{CUT}_explore": float(hit[~repeat].mean()),
           f"mrr@{CUT}_repeat": float(rr[repeat].mean()), f"mrr@{CUT}_explore": float(rr[~repeat].mean())}
    for k, kind in enumerate(KINDS[:3]):
        out[f"recall@{CUT}_repeat_{kind}"] = float(hit[kinds == k].mean())
        out[f"mrr@{CUT}_repeat_{kind}"] = float(rr[kinds == k].mean())
    return out


def plot(report: dict, path: Path) -> Path:
    """Left: where each scorer's hits are; right: recall@20 of scorers, hybrids and the bound vs the bar."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from model.plots import save_figure

    models = report["models"]
    names = list(models)
    fig, (left, middle, right) = plt.subplots(1, 3, figsize=(19, 4.8), dpi=120)
    kinds = (f"recall@{CUT}_repeat", f"recall@{CUT}_explore", f"explore_recall@{CUT}_new_items_only")
    x = np.arange(len(names))
    for j, k in enumerate(kinds):
        bars = left.bar(x + (j - 1) * 0.27, [models[n][k] for n in names], 0.27, label=k)
        left.bar_label(bars, fmt="%.2f", fontsize=6, padding=1)
    left.set_xticks(x, names, rotation=25, ha="right", fontsize=8)
    left.set_ylim(0, 1.25)
    left.set_title(f"repeat targets ({report['repeat_share']:.0%}) vs explore targets", fontsize=10)
    left.legend(fontsize=7, loc="upper left", ncols=3)
    shares = report["kind_shares"]
    for j, kind in enumerate(KINDS):
        key = f"mrr@{CUT}_repeat_{kind}" if kind != "new" else f"mrr@{CUT}_explore"
        bars = middle.bar(x + (j - 1.5) * 0.2, [models[n][key] for n in names], 0.2,
                          label=f"{kind} ({shares[kind]:.0%})")
        middle.bar_label(bars, fmt="%.2f", fontsize=5, padding=1)
    middle.set_xticks(x, names, rotation=25, ha="right", fontsize=8)
    middle.set_ylim(0, 1.15)
    middle.set_title(f"MRR@{CUT} by target: stay = the item just before, session = another of the\n"
                     "session, history = of earlier sessions only, new = new to the user", fontsize=9)
    middle.legend(fontsize=7, loc="upper right", ncols=4)
    rows = [(n, models[n][f"recall@{CUT}"]) for n in names]
    rows += [(f"{n}: own items first", v[f"recall@{CUT}"]) for n, v in report["own_items_first"].items()
             if n not in ("user-repeat", REFERENCE)]
    rows += [(f"{n} + beta x ease (best beta)", max(g[f"recall@{CUT}"] for g in grid.values()))
             for n, grid in report["ease_fusion"].items()]
    rows.append(("perfect gate, best explore scorer", report["perfect_gate_bound"][f"recall@{CUT}"]))
    y, lo = np.arange(len(rows)), 0.8
    colors = ["tab:gray"] * len(names) + ["tab:blue"] * (len(rows) - len(names) - 1) + ["tab:green"]
    bars = right.barh(y, [max(v, lo) for _, v in rows], color=colors)
    right.bar_label(bars, labels=[f"{v:.3f}" + (" (off scale)" if v < lo else "") for _, v in rows], fontsize=6,
                    padding=1)
    right.axvline(report["bar"][f"recall@{CUT}"], color="tab:red", label=f"bar (+5% over {REFERENCE})")
    right.set_yticks(y, [n for n, _ in rows], fontsize=7)
    right.set_xlim(lo, 0.95)
    right.invert_yaxis()
    right.set_title(f"recall@{CUT}", fontsize=10)
    right.legend(fontsize=7, loc="upper right")
    return save_figure(fig, path)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", default=str(REDDIT))
    p.add_argument("--png", default="/tmp/repeat_explore.png", help="where to write the chart")
    p.add_argument("versions", nargs="*", help="trained version directories to score too")
    args = p.parse_args()
    check_format(args.png, "--png")  # before the scoring: a chart it cannot write lost every figure after it

    data = load_interactions(args.data, columns={"USER_ID": "0", "ITEM_ID": "1", "TIMESTAMP": "2"}, time_unit="s")
    prep = prepare(data, DataConfig())
    split = make_split("last-session", prep.data, prep.starts)
    scorers: dict[str, Scorer] = {b: make_baseline(b) for b in ("pop", "sknn", "user-knn", "ease", "user-repeat",
                                                             REFERENCE)}
    for d in args.versions:
        m = load_version(d)
        scorers[Path(d).name] = HRNNScorer.for_version(m, split.train, name=Path(d).name)
    report: dict = {"data": args.data, "models": {}, "own_items_first": {}, "ease_fusion": {}}
    scores = {}
    for name, scorer in scorers.items():
        scorer.fit(split.train, split.train_starts)
        scores[name] = score_all(scorer, split.test)
    kinds = target_kinds(split.test)
    report["n_targets"] = len(kinds)
    report["repeat_share"] = round(float((kinds != KINDS.index("new")).mean()), 4)
    report["kind_shares"] = {kind: round(float((kinds == k).mean()), 4) for k, kind in enumerate(KINDS)}
    for name, mats in scores.items():
        ranks, new_ranks = ranks_and_new_ranks(mats, split.test)
        report["models"][name] = {k: round(v, 4) for k, v in summary(ranks, kinds, new_ranks).items()}
        hits = own_items_first(scores[REFERENCE], mats, split.test)
        report["own_items_first"][name] = {f"recall@{CUT}": round(float(np.mean(hits)), 4)}
    for d in args.versions:
        report["ease_fusion"][Path(d).name] = fusion_grid(scores[Path(d).name], scores["ease"], split.test)
    ref, share = report["models"][REFERENCE], report["repeat_share"]
    need = ref[f"recall@{CUT}"] * (1 + BAR)
    report["bar"] = {f"recall@{CUT}": round(need, 4), f"mrr@{CUT}": round(ref[f"mrr@{CUT}"] * (1 + BAR), 4),
                     f"explore_recall@{CUT}_needed": round((need - share) / (1 - share), 4)}
    best = max(m[f"explore_recall@{CUT}_new_items_only"] for m in report["models"].values())
    report["perfect_gate_bound"] = {f"recall@{CUT}": round(share + (1 - share) * best, 4),
                                    "explore_scorer": best}
    report["png"] = str(Path(args.png))
    print(json.dumps(report), flush=True)  # the figures first: a chart that fails to write leaves them printed
    plot(report, Path(args.png))
    return 0


if __name__ == "__main__":
    sys.exit(exit_status(main, Path(__file__).name))
