"""SSUL's and DKD's sigmoid losses as their training code computes them: the eager chains a user runs today.

Written here from their formulas (SSUL: Cha et al., NeurIPS 2021, clovaai/SSUL; DKD: Baek et al.,
NeurIPS 2022, cvlab-yonsei/DKD), not copied: each builds what their code builds (a dense one-hot or
zeros_like target filled class by class over ``label.unique()``, the full sigmoid of the old logits)
and runs BCEWithLogitsLoss on it, so that the benchmark's provider allocates as they do. The tests
check the reference against these (tests/test_parity_sigmoid.py).
"""

import torch
import torch.nn.functional as F

IGNORE_INDEX = 255


def ssul_pseudo_labels(labels, old_logits, *, fg_idx, threshold):
    """SSUL's train loop: a background (or unknown) pixel takes the old model's confident foreground class."""
    scores, predicted = torch.max(torch.sigmoid(old_logits), dim=1)
    return torch.where((labels <= fg_idx) & (predicted > fg_idx) & (scores >= threshold), predicted, labels)


def ssul_bce(inputs, labels, reduction="mean", ignore_index=IGNORE_INDEX):
    """SSUL's BCE with ignore index: one-hot with an extra class for ignored pixels, then dropped;
    channels summed; "mean" over the pixels with a positive channel."""
    C = inputs.shape[1]
    with_ignore_class = torch.where(labels != ignore_index, labels, torch.full_like(labels, C))
    targets = F.one_hot(with_ignore_class, C + 1).to(inputs.dtype).permute(0, 3, 1, 2)[:, :C]
    loss = F.binary_cross_entropy_with_logits(inputs, targets, reduction="none").sum(dim=1)
    has_positive = targets.sum(dim=1) != 0
    if reduction == "mean":
        return torch.masked_select(loss, has_positive).mean()
    if reduction == "sum":
        return torch.masked_select(loss, has_positive).sum()
    return loss * targets.sum(dim=1)


def _channels_last_bce(logit, target, pos_weight=None):
    """BCEWithLogitsLoss(reduction="none") on (N·H·W, C) rows, back to (N, C, H, W), as DKD's modules run it."""
    N, C, H, W = logit.shape
    loss = torch.nn.BCEWithLogitsLoss(pos_weight=pos_weight, reduction="none")(
        logit.permute(0, 2, 3, 1).reshape(-1, C), target.permute(0, 2, 3, 1).reshape(-1, C)
    )
    return loss.reshape(N, H, W, C).permute(0, 3, 1, 2)


def dkd_terms(logit, logit_old, label, *, n_old, pos_weight, ignore_index=IGNORE_INDEX):
    """DKD's step t > 0 on the logits: (WBCE, KD, AC), each a per-channel mean over N, H, W, summed.

    Channel 0 is DKD's auxiliary classifier and class c is channel c; ``n_old`` old classes (without
    the background), so ``logit_old`` has 1 + n_old channels and the new classes follow.
    """
    n_new = logit.shape[1] - 1 - n_old
    new_logit = logit[:, -n_new:]
    target = torch.zeros_like(new_logit)
    for cls in label.unique():
        if int(cls) in (0, ignore_index):
            continue
        target[:, int(cls) - (n_old + 1)] = (label == int(cls)).to(target.dtype)
    weights = torch.full((n_new,), float(pos_weight), dtype=logit.dtype, device=logit.device)
    wbce = _channels_last_bce(new_logit, target, weights).mean(dim=[0, 2, 3])
    kd = _channels_last_bce(logit[:, 1 : n_old + 1], logit_old[:, 1:].sigmoid()).mean(dim=[0, 2, 3])
    ac = _channels_last_bce(logit[:, 0:1], torch.zeros_like(logit[:, 0:1])).mean(dim=[0, 2, 3])
    return wbce.sum(), kd.sum(), ac.sum()
