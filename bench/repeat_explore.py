"""Where the hits and misses are on reddit-jodie: repeat targets (the user had the item before) vs
explore targets (a new item for the user), and what the +5% bar asks of each; prints ONE JSON object.

    python bench/repeat_explore.py [--data ../shared/data/reddit-jodie/reddit.tsv] [VERSION_DIR ...]

Same split as bench/quality_reddit.py (last-session protocol, 30-minute sessions, events 2..n of
each test session, full-catalogue ranks with ties counted pessimistically). VERSION_DIRs are
trained versions to score beside the baselines, e.g. the registry that quality_reddit.py wrote.

  repeat_share                 share of targets whose item is in the user's earlier events
  <model>.recall@20_repeat / _explore, mrr@20_repeat / _explore
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
from model.inference import HRNNScorer  # noqa: E402
from model.loaders import load_interactions  # noqa: E402
from model.pipeline import prepare  # noqa: E402
from model.scorer import Scorer, UserSequence  # noqa: E402
from model.splits import make_split  # noqa: E402

REDDIT = ROOT.parent / "shared" / "data" / "reddit-jodie" / "reddit.tsv"
REFERENCE = "user-repeat+session"
BAR = 0.05
CUT = 20
FUSION_BETAS = (0.0, 0.5, 1.0, 2.0, 4.0, 8.0, 16.0)


def ranks_and_kinds(scorer: Scorer, seqs: list[UserSequence]) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Per main-slice target (events 2..n): pessimistic rank, whether it repeats an earlier item, and
    its rank among the items new to the user (meaningful for explore targets only)."""
    ranks, repeat, new_ranks = [], [], []
    for a in range(0, len(seqs), 256):
        chunk = seqs[a:a + 256]
        for s, mat in zip(chunk, scorer.score(chunk)):
            for row, t in zip(mat[1:], s.targets[1:]):
                truth, earlier = s.items[t], s.items[:t]
                above = row >= row[truth]
                ranks.append(int(above.sum()))
                repeat.append(bool((earlier == truth).any()))
                above[np.unique(earlier[earlier >= 0])] = False
                new_ranks.append(int(above.sum()) + int(repeat[-1]))
    return np.array(ranks), np.array(repeat), np.array(new_ranks)


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


def fusion_grid(network: Scorer, ease: Scorer, seqs: list[UserSequence]) -> dict[str, dict[str, float]]:
    """Per beta: recall@20 and MRR@20 over the main-slice targets of network scores + beta * ease scores."""
    net, add, truth = [], [], []
    for a in range(0, len(seqs), 256):
        chunk = seqs[a:a + 256]
        for s, mn, me in zip(chunk, network.score(chunk), ease.score(chunk)):
            net.append(mn[1:])
            add.append(me[1:])
            truth.append(s.items[s.targets[1:]])
    n_mat, e_mat, t = np.concatenate(net), np.concatenate(add), np.concatenate(truth).astype(np.int64)
    out = {}
    for beta in FUSION_BETAS:
        scores = n_mat + beta * e_mat
        ranks = (scores >= scores[np.arange(len(t)), t][:, None]).sum(axis=1)
        hit = ranks <= CUT
        out[str(beta)] = {f"recall@{CUT}": round(float(hit.mean()), 4),
                          f"mrr@{CUT}": round(float(np.where(hit, 1.0 / ranks, 0.0).mean()), 4)}
    return out


def summary(ranks: np.ndarray, repeat: np.ndarray, new_ranks: np.ndarray) -> dict[str, float]:
    hit = ranks <= CUT
    rr = np.where(hit, 1.0 / ranks, 0.0)
    return {f"recall@{CUT}": float(hit.mean()), f"mrr@{CUT}": float(rr.mean()),
            f"explore_recall@{CUT}_new_items_only": float((new_ranks[~repeat] <= CUT).mean()),
            f"recall@{CUT}_repeat": float(hit[repeat].mean()), f"recall@{CUT}_explore": float(hit[~repeat].mean()),
            f"mrr@{CUT}_repeat": float(rr[repeat].mean()), f"mrr@{CUT}_explore": float(rr[~repeat].mean())}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", default=str(REDDIT))
    p.add_argument("versions", nargs="*", help="trained version directories to score too")
    args = p.parse_args()

    data = load_interactions(args.data, columns={"USER_ID": "0", "ITEM_ID": "1", "TIMESTAMP": "2"}, time_unit="s")
    prep = prepare(data, DataConfig())
    split = make_split("last-session", prep.data, prep.starts)
    scorers: dict[str, Scorer] = {b: make_baseline(b) for b in ("pop", "sknn", "user-knn", "ease", "user-repeat",
                                                             REFERENCE)}
    for d in args.versions:
        m = load_version(d)
        scorers[Path(d).name] = HRNNScorer.for_vocabulary(m.model, m.item_ids, split.train.item_ids, name=Path(d).name,
                                                          model_types=m.event_types,
                                                          data_types=split.train.event_types)
    report: dict = {"data": args.data, "models": {}, "own_items_first": {}, "ease_fusion": {}}
    for scorer in scorers.values():
        scorer.fit(split.train, split.train_starts)
    for name, scorer in scorers.items():
        ranks, repeat, new_ranks = ranks_and_kinds(scorer, split.test)
        report["models"][name] = {k: round(v, 4) for k, v in summary(ranks, repeat, new_ranks).items()}
        report["n_targets"], report["repeat_share"] = len(ranks), round(float(repeat.mean()), 4)
    ur = scorers[REFERENCE]
    for name, scorer in scorers.items():
        hits: list[bool] = []
        for a in range(0, len(split.test), 256):
            chunk = split.test[a:a + 256]
            hits += own_items_first(ur.score(chunk), scorer.score(chunk), chunk)
        report["own_items_first"][name] = {f"recall@{CUT}": round(float(np.mean(hits)), 4)}
    for d in args.versions:
        report["ease_fusion"][Path(d).name] = fusion_grid(scorers[Path(d).name], scorers["ease"], split.test)
    ref, share = report["models"][REFERENCE], report["repeat_share"]
    need = ref[f"recall@{CUT}"] * (1 + BAR)
    report["bar"] = {f"recall@{CUT}": round(need, 4), f"mrr@{CUT}": round(ref[f"mrr@{CUT}"] * (1 + BAR), 4),
                     f"explore_recall@{CUT}_needed": round((need - share) / (1 - share), 4)}
    best = max(m[f"explore_recall@{CUT}_new_items_only"] for m in report["models"].values())
    report["perfect_gate_bound"] = {f"recall@{CUT}": round(share + (1 - share) * best, 4),
                                    "explore_scorer": best}
    print(json.dumps(report))
    return 0


if __name__ == "__main__":
    sys.exit(main())
