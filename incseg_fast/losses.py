"""nn.Module drop-ins for MiB's ``utils/loss.py``.

Same class names, constructor arguments and ``forward`` signatures, so a MiB-style trainer swaps
them in by changing one import::

    from incseg_fast.losses import UnbiasedCrossEntropy, UnbiasedKnowledgeDistillationLoss

Each module also takes a keyword ``backend`` ("auto" by default) passed to the public API.
Differences from MiB, on purpose: an all-ignored batch gives 0 (MiB: NaN); ``C == Co`` works in
the unbiased distillation (MiB's indexing breaks); ``old_cl=None`` means no old classes, i.e.
ordinary cross-entropy (MiB fails).
"""
import torch
from torch import nn

from . import api


class UnbiasedCrossEntropy(nn.Module):
    """SPEC 2.1. ``forward(inputs, targets, mask=None)``: ``mask`` (bool, B×H×W) marks pixels that
    become ignored, as in PLOP."""

    def __init__(self, old_cl=None, reduction="mean", ignore_index=255, *, backend="auto"):
        super().__init__()
        self.old_cl = old_cl
        self.reduction = reduction
        self.ignore_index = ignore_index
        self.backend = backend

    def forward(self, inputs, targets, mask=None):
        if mask is not None:
            if not isinstance(mask, torch.Tensor) or mask.shape != targets.shape:
                raise ValueError(f"mask must be a tensor shaped like targets {tuple(targets.shape)}")
            targets = targets.masked_fill(mask.bool(), self.ignore_index)
        old_classes = 1 if self.old_cl is None else self.old_cl
        return api.unbiased_cross_entropy(inputs, targets, old_classes, ignore_index=self.ignore_index,
                                          reduction=self.reduction, backend=self.backend)


class _Distillation(nn.Module):
    _loss = None  # the public function each subclass applies

    def __init__(self, reduction="mean", alpha=1.0, *, backend="auto"):
        super().__init__()
        self.reduction = reduction
        self.alpha = alpha
        self.backend = backend

    def forward(self, inputs, targets, mask=None):
        return type(self)._loss(inputs, targets, alpha=self.alpha, mask=mask, reduction=self.reduction,
                                backend=self.backend)


class KnowledgeDistillationLoss(_Distillation):
    """SPEC 2.2; ``targets`` are the old model's logits, ``mask`` weights pixels."""

    _loss = staticmethod(api.knowledge_distillation)


class UnbiasedKnowledgeDistillationLoss(_Distillation):
    """SPEC 2.3 (MiB)."""

    _loss = staticmethod(api.unbiased_knowledge_distillation)


class BalancedKnowledgeDistillationLoss(_Distillation):
    """SPEC 2.4 (CAF): gamma is computed from ``targets`` per image."""

    _loss = staticmethod(api.balanced_knowledge_distillation)


class SqueezeExcitation(nn.Module):
    """CAF eq. 5: channel attention sigmoid(W2 relu(W1 avgpool(m))), shape (B, C)."""

    def __init__(self, channels, reduction_ratio=16):
        super().__init__()
        hidden = max(1, channels // reduction_ratio)
        self.fc1 = nn.Linear(channels, hidden)
        self.fc2 = nn.Linear(hidden, channels)

    def forward(self, m):
        return torch.sigmoid(self.fc2(torch.relu(self.fc1(m.mean(dim=(2, 3))))))


class AttentiveDistillationLoss(nn.Module):
    """SPEC 3.1 / CAF eq. 5–8 for one feature pair, with its two squeeze-excitation blocks.

    The blocks are specific to the feature map they read (eq. 5): one for the new features, one for
    the old. ``forward(new_features, old_features)``; sum the module over CAF's pairs (z, h).
    """

    def __init__(self, channels, reduction="mean", *, reduction_ratio=16, detach_spatial=False, backend="auto"):
        super().__init__()
        self.new_attention = SqueezeExcitation(channels, reduction_ratio)
        self.old_attention = SqueezeExcitation(channels, reduction_ratio)
        self.reduction = reduction
        self.detach_spatial = detach_spatial
        self.backend = backend

    def forward(self, inputs, targets):
        a = self.new_attention(inputs).to(inputs.dtype)
        b = self.old_attention(targets).to(targets.dtype)
        return api.attentive_distillation(inputs, targets, a, b, reduction=self.reduction,
                                          detach_spatial=self.detach_spatial, backend=self.backend)
