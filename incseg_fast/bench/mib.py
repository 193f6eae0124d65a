"""MiB's losses as MiB's utils/loss.py computes them: the eager chains a user runs today.

Written here from MiB's formulas (Cermelli et al., CVPR 2020; fcdl94/MiB, MIT), not copied: each
materialises what MiB's code materialises (a zeros_like output tensor, index_select copies, the
full softmax of the teacher), so that the benchmark's "mib" provider allocates as MiB does. The
tests check them against the reference (tests/test_reference.py).
"""

import torch
import torch.nn.functional as F


def mib_unbiased_cross_entropy(inputs, targets, old_cl, ignore_index=255, reduction="mean"):
    """MiB's UnbiasedCrossEntropy: the old classes' probabilities summed into the background."""
    outputs = torch.zeros_like(inputs)
    den = torch.logsumexp(inputs, dim=1)
    outputs[:, 0] = torch.logsumexp(inputs[:, 0:old_cl], dim=1) - den
    outputs[:, old_cl:] = inputs[:, old_cl:] - den.unsqueeze(dim=1)
    labels = targets.clone()
    labels[targets < old_cl] = 0
    return F.nll_loss(outputs, labels, ignore_index=ignore_index, reduction=reduction)


def _reduce(loss, mask, reduction):
    if mask is not None:
        loss = loss * mask.float()
    return {"mean": -torch.mean(loss), "sum": -torch.sum(loss), "none": -loss}[reduction]


def mib_knowledge_distillation(inputs, targets, mask=None, reduction="mean", alpha=1.0):
    """MiB's KnowledgeDistillationLoss: softmax KD over the old classes' channels."""
    inputs = inputs.narrow(1, 0, targets.shape[1])
    outputs = torch.log_softmax(inputs, dim=1)
    labels = torch.softmax(targets * alpha, dim=1)
    return _reduce((outputs * labels).mean(dim=1), mask, reduction)


def mib_unbiased_knowledge_distillation(inputs, targets, mask=None, reduction="mean", alpha=1.0):
    """MiB's UnbiasedKnowledgeDistillationLoss: the new classes' probabilities summed into the background."""
    new_cl = inputs.shape[1] - targets.shape[1]
    targets = targets * alpha
    new_bkg_idx = torch.tensor([0] + list(range(targets.shape[1], inputs.shape[1])), device=inputs.device)
    den = torch.logsumexp(inputs, dim=1)
    outputs_no_bgk = inputs[:, 1:-new_cl] - den.unsqueeze(dim=1)
    outputs_bkg = torch.logsumexp(torch.index_select(inputs, index=new_bkg_idx, dim=1), dim=1) - den
    labels = torch.softmax(targets, dim=1)
    loss = (labels[:, 0] * outputs_bkg + (labels[:, 1:] * outputs_no_bgk).sum(dim=1)) / targets.shape[1]
    return _reduce(loss, mask, reduction)


def mib_incremental_loss(x, t, y):
    """MiB's step-1 objective's two terms, UNCE and UNKD (the caller weighs them)."""
    return mib_unbiased_cross_entropy(x, t, y.shape[1]), mib_unbiased_knowledge_distillation(x, y)
