"""nn.Module drop-ins for MiB's ``utils/loss.py``.

Same class names, constructor arguments and ``forward`` signatures, so a MiB-style trainer swaps
them in by changing one import::

    from incseg_fast.losses import UnbiasedCrossEntropy, UnbiasedKnowledgeDistillationLoss

Each module also takes a keyword ``backend`` ("auto" by default) passed to the public API, and
``forward`` a keyword ``size=(H, W)``: the loss of the inputs (and the old model's logits)
bilinearly upsampled to the labels' resolution, without materialising them (MATH.md#upsampling).
Differences from MiB, on purpose: an all-ignored batch gives 0 (MiB: NaN); ``C == Co`` works in
the unbiased distillation (MiB's indexing breaks); ``old_cl=None`` means no old classes, i.e.
ordinary cross-entropy (MiB fails).
"""

import torch
from torch import nn

from . import _validate as check
from . import api

# The modules' argument names, so that every error names what the caller wrote.
_NAMES = dict(x="inputs", t="targets", y="targets", old_classes="old_cl", mask="mask", size="size")


class UnbiasedCrossEntropy(nn.Module):
    """MATH.md#unce. ``forward(inputs, targets, mask=None)``: ``mask`` (bool, B×H×W) marks pixels
    that become ignored, as in PLOP. Cross-entropy has no per-pixel weight: a float mask is refused
    rather than binarised."""

    def __init__(self, old_cl=None, reduction="mean", ignore_index=255, *, backend="auto"):
        super().__init__()
        self.old_cl = old_cl
        self.reduction = reduction
        self.ignore_index = ignore_index
        self.backend = backend

    def forward(self, inputs, targets, mask=None, *, size=None):
        if mask is not None:
            check.tensor(targets, "targets")
            check.tensor(mask, "mask")
            if mask.dtype != torch.bool:
                raise TypeError(
                    f"mask must be a bool tensor marking the pixels to ignore (PLOP), got {mask.dtype}; "
                    "cross-entropy takes no per-pixel weight"
                )
            if mask.shape != targets.shape:
                raise ValueError(f"mask must have the shape of targets {tuple(targets.shape)}, got {tuple(mask.shape)}")
            targets = targets.masked_fill(mask, self.ignore_index)
        old_classes = 1 if self.old_cl is None else self.old_cl
        return api._logit_losses(
            inputs,
            targets,
            None,
            old_classes=old_classes,
            ce="unbiased",
            kd="none",
            alpha=1.0,
            mask=None,
            gamma=None,
            ignore_index=self.ignore_index,
            reduction=self.reduction,
            backend=self.backend,
            size=size,
            names=_NAMES,
        )[0]


class _Distillation(nn.Module):
    _kd = None  # the distillation mode of each subclass

    def __init__(self, reduction="mean", alpha=1.0, *, backend="auto"):
        super().__init__()
        self.reduction = reduction
        self.alpha = alpha
        self.backend = backend

    def forward(self, inputs, targets, mask=None, *, size=None):
        """``targets`` are the old model's logits; ``mask`` (bool or float, B×H×W) weights pixels."""
        return api._logit_losses(
            inputs,
            None,
            targets,
            old_classes=None,
            ce="none",
            kd=self._kd,
            alpha=self.alpha,
            mask=mask,
            gamma=None,
            ignore_index=255,
            reduction=self.reduction,
            backend=self.backend,
            size=size,
            names=_NAMES,
        )[1]


class KnowledgeDistillationLoss(_Distillation):
    """MATH.md#kd (LwF, ILT as MiB implements it)."""

    _kd = "plain"


class UnbiasedKnowledgeDistillationLoss(_Distillation):
    """MATH.md#unkd (MiB)."""

    _kd = "unbiased"


class BalancedKnowledgeDistillationLoss(_Distillation):
    """MATH.md#bkd (CAF): gamma is computed from ``targets`` per image."""

    _kd = "balanced"


class SqueezeExcitation(nn.Module):
    """CAF eq. 5: channel attention sigmoid(W2 relu(W1 avgpool(m))), shape (B, C), computed in the
    parameters' dtype (float16 features outside autocast are pooled, then cast)."""

    def __init__(self, channels, reduction_ratio=16):
        super().__init__()
        hidden = max(1, channels // reduction_ratio)
        self.fc1 = nn.Linear(channels, hidden)
        self.fc2 = nn.Linear(hidden, channels)

    def forward(self, m):
        pooled = m.mean(dim=(2, 3)).to(self.fc1.weight.dtype)
        return torch.sigmoid(self.fc2(torch.relu(self.fc1(pooled))))


class AttentiveDistillationLoss(nn.Module):
    """MATH.md#ad (CAF eq. 5–8) for one feature pair, with its two squeeze-excitation blocks.

    The blocks are specific to the feature map they read (eq. 5): one for the new features, one for
    the old. ``forward(new_features, old_features)``; sum the module over CAF's pairs (z, h).
    """

    def __init__(self, channels, reduction="mean", *, reduction_ratio=16, detach_spatial=False, backend="auto"):
        super().__init__()
        self.channels = check.integer(channels, "channels", minimum=1)
        reduction_ratio = check.integer(reduction_ratio, "reduction_ratio", minimum=1)
        self.new_attention = SqueezeExcitation(channels, reduction_ratio)
        self.old_attention = SqueezeExcitation(channels, reduction_ratio)
        self.reduction = reduction
        self.detach_spatial = detach_spatial
        self.backend = backend

    def forward(self, inputs, targets):
        for value, name in ((inputs, "inputs"), (targets, "targets")):
            check.float_tensor(value, name, 4)
            if value.shape[1] != self.channels:
                raise ValueError(
                    f"{name} has {value.shape[1]} channels but this AttentiveDistillationLoss was "
                    f"built with channels={self.channels}"
                )
        a = self.new_attention(inputs).to(inputs.dtype)
        b = self.old_attention(targets).to(targets.dtype)
        check.feature_pair(inputs, targets, a, b, names=("inputs", "targets", "new attention", "old attention"))
        return api.attentive_distillation(
            inputs, targets, a, b, reduction=self.reduction, detach_spatial=self.detach_spatial, backend=self.backend
        )
