"""Ranking losses over sampled candidates (row i's positive is column i).

Columns that hold the same item as a row's positive (another slot with the same target,
or a sample that hit it) are not negatives for that row: `collide` masks them out, so no
loss ever pushes a positive item down against itself.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

NEG_INF = -1e9


def _masks(cands: torch.Tensor, targets: torch.Tensor,
           exclude: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor]:
    m = targets.shape[0]
    eye = torch.zeros(m, cands.shape[0], dtype=torch.bool, device=cands.device)
    eye[:, :m] = torch.eye(m, dtype=torch.bool, device=cands.device)
    collide = (cands.unsqueeze(0) == targets.unsqueeze(1)) & ~eye
    return eye, collide if exclude is None else collide | exclude


def cross_entropy(logits: torch.Tensor, cands: torch.Tensor, targets: torch.Tensor,
                  exclude: torch.Tensor | None = None) -> torch.Tensor:
    # Same values as _masks + [eye], without the (rows, cands) eye mask and its nonzero (~10% of a training epoch)
    m = targets.shape[0]
    collide = cands.unsqueeze(0) == targets.unsqueeze(1)
    collide[:, :m].fill_diagonal_(False)
    if exclude is not None:
        collide |= exclude
    return -F.log_softmax(logits.masked_fill(collide, NEG_INF), dim=1).diagonal()


def bpr_max(logits: torch.Tensor, cands: torch.Tensor, targets: torch.Tensor, reg: float,
            exclude: torch.Tensor | None = None) -> torch.Tensor:
    eye, collide = _masks(cands, targets, exclude)
    neg = ~(eye | collide)
    pos = logits[eye].unsqueeze(1)
    w = torch.softmax(logits.masked_fill(~neg, NEG_INF), dim=1)  # BPR-max weighs negatives by their softmax
    hit = (w * torch.sigmoid(pos - logits)).sum(1)
    return -torch.log(hit + 1e-24) + reg * (w * logits.pow(2)).sum(1)


def top1(logits: torch.Tensor, cands: torch.Tensor, targets: torch.Tensor,
         exclude: torch.Tensor | None = None) -> torch.Tensor:
    # Excluded columns must leave `neg`, not be set to NEG_INF: TOP1's sigmoid(score^2) term would make each
    # of them a constant 1 in the sum, counted in the mean (it halved the gradient on reddit-like windows).
    eye, collide = _masks(cands, targets, exclude)
    neg = (~(eye | collide)).float()
    pos = logits[eye].unsqueeze(1)
    per = torch.sigmoid(logits - pos) + torch.sigmoid(logits.pow(2))
    return (per * neg).sum(1) / neg.sum(1).clamp(min=1)


def ranking_loss(name: str, logits: torch.Tensor, cands: torch.Tensor, targets: torch.Tensor,
                 *, bpreg: float = 1.0, exclude: torch.Tensor | None = None) -> torch.Tensor:
    """Per-row loss, shape (rows,). `exclude` (rows, columns): True where a column is no negative for that
    row either (besides its positive and the columns holding the same item)."""
    if name == "cross-entropy":
        return cross_entropy(logits, cands, targets, exclude)
    if name == "bpr-max":
        return bpr_max(logits, cands, targets, bpreg, exclude)
    return top1(logits, cands, targets, exclude)
