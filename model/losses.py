"""Ranking losses over sampled candidates (row i's positive is column i).

Columns that hold the same item as a row's positive (another slot with the same target,
or a sample that hit it) are not negatives for that row: `collide` masks them out, so no
loss ever pushes a positive item down against itself.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

NEG_INF = -1e9


def _masks(cands: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    m = targets.shape[0]
    eye = torch.zeros(m, cands.shape[0], dtype=torch.bool, device=cands.device)
    eye[:, :m] = torch.eye(m, dtype=torch.bool, device=cands.device)
    collide = (cands.unsqueeze(0) == targets.unsqueeze(1)) & ~eye
    return eye, collide


def cross_entropy(logits: torch.Tensor, cands: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    # Same values as _masks + [eye], without the (rows, cands) eye mask and its nonzero (~10% of a training epoch)
    m = targets.shape[0]
    collide = cands.unsqueeze(0) == targets.unsqueeze(1)
    collide[:, :m].fill_diagonal_(False)
    return -F.log_softmax(logits.masked_fill(collide, NEG_INF), dim=1).diagonal()


def bpr_max(logits: torch.Tensor, cands: torch.Tensor, targets: torch.Tensor, reg: float) -> torch.Tensor:
    eye, collide = _masks(cands, targets)
    neg = ~(eye | collide)
    pos = logits[eye].unsqueeze(1)
    w = torch.softmax(logits.masked_fill(~neg, NEG_INF), dim=1)  # BPR-max weighs negatives by their softmax
    hit = (w * torch.sigmoid(pos - logits)).sum(1)
    return -torch.log(hit + 1e-24) + reg * (w * logits.pow(2)).sum(1)


def top1(logits: torch.Tensor, cands: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    eye, collide = _masks(cands, targets)
    neg = (~(eye | collide)).float()
    pos = logits[eye].unsqueeze(1)
    per = torch.sigmoid(logits - pos) + torch.sigmoid(logits.pow(2))
    return (per * neg).sum(1) / neg.sum(1).clamp(min=1)


def ranking_loss(name: str, logits: torch.Tensor, cands: torch.Tensor, targets: torch.Tensor,
                 *, bpreg: float = 1.0) -> torch.Tensor:
    """Per-row loss, shape (rows,)."""
    if name == "cross-entropy":
        return cross_entropy(logits, cands, targets)
    if name == "bpr-max":
        return bpr_max(logits, cands, targets, bpreg)
    return top1(logits, cands, targets)
