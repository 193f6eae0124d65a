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

import math

import torch
from torch import nn

from . import _validate as check
from . import api
from .vocabulary import POD_SCALES

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


class LocalPODLoss(nn.Module):
    """MATH.md#local-pod: PLOP's Local POD feature distillation over a model's layers.

    ``forward(new_features, old_features, *, num_classes=None, num_new_classes=None)`` takes two
    equally long sequences of (B, C, H, W) maps of the new and the frozen old model (PLOP: the
    backbone's stages, then the logits, whose new classes are merged into the background when the
    old map has fewer channels). Returns ``(1/L) Σ_l λ_l local_pod(new_l, old_l)`` with PLOP's
    weights: ``feature_weight`` (0.01) for every layer but the last, ``last_weight`` (0.0005) for the
    last, all times ``sqrt(num_classes / num_new_classes)`` when those are given (PLOP's schedule:
    the classes seen so far over the classes added at this step).
    """

    def __init__(self, scales=POD_SCALES, feature_weight=0.01, last_weight=0.0005, *, backend="auto"):
        super().__init__()
        self.scales = scales
        self.feature_weight = check.finite_float(feature_weight, "feature_weight")
        self.last_weight = check.finite_float(last_weight, "last_weight")
        self.backend = backend

    def forward(self, new_features, old_features, *, num_classes=None, num_new_classes=None):
        new_features, old_features = list(new_features), list(old_features)
        if len(new_features) != len(old_features) or not new_features:
            raise ValueError(
                "new_features and old_features must hold as many layers, got "
                f"{len(new_features)} and {len(old_features)}"
            )
        if (num_classes is None) != (num_new_classes is None):
            raise ValueError("num_classes and num_new_classes go together: give both or neither")
        schedule = 1.0
        if num_classes is not None:
            num_new_classes = check.integer(num_new_classes, "num_new_classes", minimum=1)
            schedule = math.sqrt(check.integer(num_classes, "num_classes", minimum=num_new_classes) / num_new_classes)
        total = 0.0
        for i, (new, old) in enumerate(zip(new_features, old_features, strict=True)):
            weight = self.last_weight if i == len(new_features) - 1 else self.feature_weight
            layer = api._local_pod(
                new,
                old,
                scales=self.scales,
                reduction="mean",
                backend=self.backend,
                names=(f"new_features[{i}]", f"old_features[{i}]"),
            )
            total = total + weight * layer
        return total * schedule / len(new_features)


# ---------------------------------------------------------------------------------------------
# The sigmoid family (MATH.md#sigmoid-losses): SSUL's and DKD's binary cross-entropy.
# ---------------------------------------------------------------------------------------------


class BCEWithLogitsLossWithIgnoreIndex(nn.Module):
    """SSUL's ``utils/loss.py`` loss: BCE with the one-hot of the labels on every channel, summed over
    the channels; "mean" over the non-ignored pixels, "sum", or "none" (B×H×W, 0 where ignored).

    ``forward(inputs, targets, weight=None, *, old_logits=None, pseudo_threshold=None,
    pseudo_background=1, size=None)``. With ``old_logits`` and ``pseudo_threshold``, SSUL's
    pseudo-labelling (its train loop's, fused here): a pixel labelled below ``pseudo_background``
    (SSUL's ``fg_idx + 1``) takes the old model's confident foreground class. Differences: no
    per-pixel ``weight`` (SSUL's trainer passes none; one is refused); no non-ignored pixel gives 0
    (SSUL: NaN).
    """

    def __init__(self, reduction="mean", ignore_index=255, *, backend="auto"):
        super().__init__()
        self.reduction = reduction
        self.ignore_index = ignore_index
        self.backend = backend

    def forward(
        self, inputs, targets, weight=None, *, old_logits=None, pseudo_threshold=None, pseudo_background=1, size=None
    ):
        if weight is not None:
            raise ValueError("weight (a per-pixel weight) is not supported by the fused loss; pass None")
        if (old_logits is None) != (pseudo_threshold is None):
            raise ValueError("old_logits and pseudo_threshold go together: pass both for pseudo-labels, or neither")
        return api.sigmoid_losses(
            inputs,
            targets,
            old_logits,
            pseudo_threshold=pseudo_threshold,
            pseudo_background=pseudo_background,
            ignore_index=self.ignore_index,
            ignored_pixels="skip",
            reduction=self.reduction,
            size=size,
            backend=self.backend,
            names=dict(x="inputs", t="targets", y="old_logits", size="size"),
        )[0]


class DKDLoss(nn.Module):
    """DKD's losses on the logits at an incremental step (its ``WBCELoss``, ``KDLoss`` on the old
    classes and ``ACLoss`` as its trainer combines them), in one fused call.

    Channel 0 is DKD's auxiliary ("unknown") classifier, channel c the class c; ``n_old_classes``
    and ``n_new_classes`` count classes without the background, as DKD's trainer does, so the
    logits have C = 1 + n_old_classes + n_new_classes channels and the old model's Co = 1 + n_old_classes.
    ``forward(logit, label, logit_old)`` returns ``(loss_mbce, loss_kd, loss_ac)``: each DKD term
    after its ``.mean(dim=[0, 2, 3]).sum()`` (per-channel means over N, H, W, summed), so the step's
    loss is ``mbce * loss_mbce + kd * loss_kd + ac * loss_ac``. Ignored pixels are negatives on the new
    channels, as in DKD. ``pos_weight`` weights the new classes' positives (DKD's hyperparameter).
    """

    def __init__(self, n_old_classes, n_new_classes, pos_weight=1.0, ignore_index=255, *, backend="auto"):
        super().__init__()
        self.n_old_classes = check.integer(n_old_classes, "n_old_classes", minimum=0)
        self.n_new_classes = check.integer(n_new_classes, "n_new_classes", minimum=1)
        self.pos_weight = check.finite_float(pos_weight, "pos_weight")
        self.ignore_index = ignore_index
        self.backend = backend

    def forward(self, logit, label, logit_old, *, size=None):
        check.logits(logit, "logit")
        old = 1 + self.n_old_classes
        expected = old + self.n_new_classes
        if logit.shape[1] != expected:
            raise ValueError(
                f"logit has {logit.shape[1]} channels; 1 + n_old_classes + n_new_classes = {expected} expected"
            )
        pos_weight = torch.ones(expected, dtype=torch.float64)  # converted to the computation dtype by the API
        pos_weight[old:] = self.pos_weight
        return api.sigmoid_losses(
            logit,
            label,
            logit_old,
            negative_channels=1,
            label_channels_from=old,
            pos_weight=pos_weight.to(logit.device),
            ignore_index=self.ignore_index,
            ignored_pixels="negative",
            reduction="mean",
            size=size,
            backend=self.backend,
            names=dict(x="logit", t="label", y="logit_old", size="size"),
        )
