"""The public functions: validate once, pick the backend, call it.

Every logit loss (MATH.md#logit-losses) goes through one backend function, ``logit_losses``, whose canonical
arguments are described in DEVELOPERS.md; the attention ops (MATH.md#feature-losses) have one each.
"""

import torch

from . import _validate as check
from . import reference, vocabulary
from ._backends import available_backends, resolve
from .reference import balanced_log_gamma
from .vocabulary import (
    FEATURE_REDUCTIONS,
    INCREMENTAL_CE_MODES,
    KD_MODES,
    REDUCTIONS,
    SIGMOID_IGNORED_PIXELS,
    accumulation_dtype,
)

__all__ = [
    "unbiased_cross_entropy",
    "knowledge_distillation",
    "unbiased_knowledge_distillation",
    "balanced_knowledge_distillation",
    "incremental_loss",
    "attentive_distillation",
    "structured_attention",
    "local_pod",
    "available_backends",
    "entropy_pseudo_labels",
    "entropy_pseudo_labels_",
    "entropy_histogram",
    "histogram_medians",
]


def _for_inputs(implementation, tensor):
    """The backend for a call with these inputs: empty ones (a dimension of 0) go to the reference,
    which defines their result on every backend (MATH.md#empty)."""
    return reference if tensor.numel() == 0 else implementation


# How the arguments are named in the caller's code: the public functions' names by default; the
# MiB drop-in modules (incseg_fast.losses) pass their own, so every error names what the caller wrote.
NAMES = dict(x="x", t="t", y="y", old_classes="old_classes", mask="mask", size="size")


def _logit_losses(
    x, t, y, *, old_classes, ce, kd, alpha, mask, gamma, ignore_index, reduction, backend, size=None, names=NAMES
):
    """Validate the arguments of any logit loss and run the chosen backend.

    ``size=(H, W)`` (MATH.md#upsampling): the loss of the bilinear upsampling of x and y to (H, W);
    t and mask are then (B, H, W) and x, y may each have any lower resolution.
    """
    check.logits(x, names["x"])
    size = check.output_size(size, x, names["size"], names["x"])
    ignore_index = check.integer(ignore_index, "ignore_index", *check.INT64_RANGE)
    reduction = check.choice(reduction, "reduction", REDUCTIONS)
    alpha = check.teacher_scale(alpha)
    if kd != "none":
        check.teacher(y, x, names["y"], names["x"], size, names["size"])
        if old_classes is None:  # the distillation-only losses: Co is the teacher's channel count
            old_classes = y.shape[1]
    old_classes = check.old_classes(old_classes, x, names["old_classes"])
    if ce != "none":
        check.labels(t, x, ignore_index, names["t"], names["x"], size)
    if kd != "none" and y.shape[1] != old_classes:
        raise ValueError(
            f"{names['old_classes']}={old_classes} but {names['y']} has {y.shape[1]} channels; they must be equal"
        )
    mask = check.mask(mask, x, names["mask"], names["x"], size)
    log_gamma = None
    if kd == "balanced":
        gamma = check.gamma(gamma, x)
        # The backends take log γ (MATH.md#bkd-gamma): a computed γ overflows float32 where its log
        # does not. In x's accumulation dtype (float32, float64 for float64 x), like a checked gamma; from
        # y as given (in its own dtype, MATH.md#teacher-dtype), at its own resolution also with size=
        # (MATH.md#upsampling).
        log_gamma = (balanced_log_gamma(y) if gamma is None else gamma.log()).to(accumulation_dtype(x.dtype))
    implementation = _for_inputs(resolve(backend, x.device), x)
    return implementation.logit_losses(
        x,
        t if ce != "none" else None,
        y if kd != "none" else None,
        log_gamma,
        mask,
        old_classes=old_classes,
        ce=ce,
        kd=kd,
        alpha=alpha,
        ignore_index=ignore_index,
        reduction=reduction,
        size=size,
    )


def unbiased_cross_entropy(x, t, old_classes, *, ignore_index=255, reduction="mean", size=None, backend="auto"):
    """MATH.md#unce (MiB's unbiased cross-entropy): old classes and background share the background label.

    ``x`` (B, C, H, W) logits, ``t`` (B, H, W) labels, ``old_classes`` = Co. With Co == 1 this is
    ordinary cross-entropy. ``reduction="mean"`` divides by the non-ignored pixels (0 if none).
    ``size=(H, W)``: the loss of ``F.interpolate(x, size, mode="bilinear", align_corners=False)``
    for x at its own resolution (B, C, h, w), computed without materialising it (MATH.md#upsampling);
    the same keyword on every logit loss.
    """
    return _logit_losses(
        x,
        t,
        None,
        old_classes=old_classes,
        ce="unbiased",
        kd="none",
        alpha=1.0,
        mask=None,
        gamma=None,
        ignore_index=ignore_index,
        reduction=reduction,
        backend=backend,
        size=size,
    )[0]


def _distillation(kd, x, y, *, alpha, mask, reduction, gamma, size, backend):
    return _logit_losses(
        x,
        None,
        y,
        old_classes=None,
        ce="none",
        kd=kd,
        alpha=alpha,
        mask=mask,
        gamma=gamma,
        ignore_index=255,
        reduction=reduction,
        backend=backend,
        size=size,
    )[1]


def knowledge_distillation(x, y, *, alpha=1.0, mask=None, reduction="mean", size=None, backend="auto"):
    """MATH.md#kd (LwF / ILT's output distillation, as MiB implements it).

    ``y`` (B, Co, H, W) old-model logits; the new logits are narrowed to their first Co channels.
    ``mask`` (B, H, W) bool or float weights the per-pixel loss; ``"mean"`` is over all pixels.
    ``size=(H, W)``: the loss of the bilinear upsampling of x and y (each at its own resolution) to
    (H, W), as in unbiased_cross_entropy; mask is then (B, H, W).
    """
    return _distillation(
        "plain", x, y, alpha=alpha, mask=mask, reduction=reduction, gamma=None, size=size, backend=backend
    )


def unbiased_knowledge_distillation(x, y, *, alpha=1.0, mask=None, reduction="mean", size=None, backend="auto"):
    """MATH.md#unkd (MiB's unbiased distillation): the old background matches background + new classes."""
    return _distillation(
        "unbiased", x, y, alpha=alpha, mask=mask, reduction=reduction, gamma=None, size=size, backend=backend
    )


def balanced_knowledge_distillation(
    x, y, *, alpha=1.0, mask=None, reduction="mean", gamma=None, size=None, backend="auto"
):
    """MATH.md#bkd (CAF's balanced distillation): the background term weighted per image by gamma.

    ``gamma`` (B,) may be given; otherwise it is computed from ``y`` as given (no gradient; with
    ``size=`` from the low-resolution y, MATH.md#upsampling).
    """
    return _distillation(
        "balanced", x, y, alpha=alpha, mask=mask, reduction=reduction, gamma=gamma, size=size, backend=backend
    )


def incremental_loss(
    x,
    t,
    y,
    *,
    old_classes,
    ce="unbiased",
    kd="unbiased",
    alpha=1.0,
    mask=None,
    gamma=None,
    ignore_index=255,
    size=None,
    backend="auto",
):
    """MATH.md#incremental-loss: the classification and distillation terms in one fused op, each reduced with "mean".

    Returns ``(ce, kd)``, two differentiable scalars: write ``loss = ce + lambda_kd * kd``.
    ``ce`` in {"unbiased", "plain"}; ``kd`` in {"unbiased", "balanced", "plain", "none"} (``y`` may be
    None only with "none", and kd is then a zero scalar). ``mask`` weights the distillation term only.
    ``gamma`` (B,): BKD's background weight (MATH.md#bkd-gamma), computed from ``y`` when None.
    ``size=(H, W)``: the losses of the bilinear upsampling of x and y to the labels' (H, W)
    (MATH.md#upsampling), the one-argument change of a MiB-style trainer.
    """
    ce = check.choice(ce, "ce", INCREMENTAL_CE_MODES)
    kd = check.choice(kd, "kd", KD_MODES)
    if kd != "none" and y is None:
        raise ValueError(f"y (the old model's logits) is required with kd={kd!r}")
    if gamma is not None and kd != "balanced":
        raise ValueError(f"gamma weights the balanced distillation only; kd={kd!r} takes none")
    return _logit_losses(
        x,
        t,
        y,
        old_classes=old_classes,
        ce=ce,
        kd=kd,
        alpha=alpha,
        mask=mask,
        gamma=gamma,
        ignore_index=ignore_index,
        reduction="mean",
        backend=backend,
        size=size,
    )


def attentive_distillation(f, g, a, b, *, reduction="mean", detach_spatial=False, backend="auto"):
    """MATH.md#ad (CAF's attentive distillation) for one feature pair.

    ``f``, ``g`` (B, C, H, W) new and old features; ``a``, ``b`` (B, C) their channel attentions.
    Returns mean (or sum) of ``((a ⊗ Ŝ_f + 1) f - (b ⊗ Ŝ_g + 1) g)^2``.
    """
    check.feature_pair(f, g, a, b)
    reduction = check.choice(reduction, "reduction", FEATURE_REDUCTIONS)
    if not isinstance(detach_spatial, bool):
        raise TypeError(f"detach_spatial must be a bool, got {type(detach_spatial).__name__}")
    return _for_inputs(resolve(backend, f.device), f).attentive_distillation(
        f, g, a, b, reduction=reduction, detach_spatial=detach_spatial
    )


def structured_attention(v, a_ch, a_sp, *, backend="auto"):
    """MATH.md#sab (CAF's structured attention block): ``(1 + a_ch ⊗ a_sp) * v``.

    ``v`` (B, C, H, W), ``a_ch`` (B, C), ``a_sp`` (B, H, W) or (B, 1, H, W); output like ``v``.
    """
    a_sp = check.structured_attention_args(v, a_ch, a_sp)
    return _for_inputs(resolve(backend, v.device), v).structured_attention(v, a_ch, a_sp)


def local_pod(new, old, *, scales=vocabulary.POD_SCALES, reduction="mean", backend="auto"):
    """MATH.md#local-pod (PLOP's Local POD) for one layer.

    ``new``, ``old`` (B, C, H, W) features of the new and the frozen old model. Per image: the L2
    distance between the multi-scale (``scales``, PLOP's (1, 2, 4)) width- and height-pooled means
    of the squared features; ``reduction`` "mean" (over the batch, PLOP's), "sum" or "none" ((B,)).
    ``old`` with fewer channels Co than ``new`` (logits): the new classes' logits are first added
    into the background channel (PLOP's ``extra_channels="sum"``). Differentiable w.r.t. ``new``.
    """
    return _local_pod(new, old, scales=scales, reduction=reduction, backend=backend)


def _local_pod(new, old, *, scales, reduction, backend, names=("new", "old")):
    """local_pod, with the caller's names for ``new`` and ``old`` in its errors (incseg_fast.losses)."""
    check.pod_pair(new, old, names)
    scales = check.pod_scales(scales, new, new_name=names[0], most=vocabulary.POD_MAX_SCALES)
    reduction = check.choice(reduction, "reduction", REDUCTIONS)
    implementation = _for_inputs(resolve(backend, new.device), new)
    if old.shape[1] < new.shape[1]:
        new = reference.merge_new_channels(new, old.shape[1])
    return implementation.local_pod(new, old, scales=scales, reduction=reduction)


# ---- entropy pseudo-labels (PLOP; MATH.md#pseudo-labels) ----


def _pseudo_label_inputs(y, t, ignore_index, size):
    """Checks shared by the two pseudo-label ops; returns (y detached, ignore_index, size)."""
    check.logits(y, "y")
    if y.shape[1] < 1:
        raise ValueError(f"y must have at least one channel (Co >= 1), got shape {tuple(y.shape)}")
    size = check.output_size(size, y, "size", "y")
    ignore_index = check.integer(ignore_index, "ignore_index", *check.INT64_RANGE)
    check.step_labels(t, y, ignore_index, size)
    return y.detach(), ignore_index, size


def entropy_pseudo_labels(y, t, thresholds, *, ignore_index=255, size=None, backend="auto"):
    """MATH.md#pseudo-labels (PLOP's entropy pseudo-labelling): relabel the background of step t > 0.

    ``y`` (B, Co, h, w): the old model's logits; ``t`` (B, H, W): the step's labels (background and old
    classes 0, new classes >= Co, ``ignore_index``); ``thresholds`` (Co,): θ per old class, on the
    normalised entropy u in [0, 1] (PLOP's θ_PLOP is θ / (Co·log N), MATH.md#pseudo-labels).
    ``size=(H, W)``: ``y`` is bilinearly upsampled to the labels' resolution on the fly.
    Returns ``(labels, factor)``: int64 (B, H, W) labels (k̂ where the old model is confident,
    ``ignore_index`` on the rest of the background, ``t`` elsewhere) and PLOP's per-image adaptive factor
    (B,) float32. Not differentiable.
    """
    y, ignore_index, size = _pseudo_label_inputs(y, t, ignore_index, size)
    thresholds = check.thresholds(thresholds, y)
    return _for_inputs(resolve(backend, y.device), y).entropy_pseudo_labels(
        y, t, thresholds, ignore_index=ignore_index, size=size
    )


def entropy_pseudo_labels_(y, t, thresholds, *, ignore_index=255, size=None, backend="auto"):
    """:func:`entropy_pseudo_labels` written into ``t`` in place, for a caller that owns its labels (the
    trainer's step): no second (B, H, W) map. ``t`` must be int64 and contiguous. Returns ``(t, factor)``."""
    y, ignore_index, size = _pseudo_label_inputs(y, t, ignore_index, size)
    if t.dtype != torch.int64:
        raise TypeError(f"t must be int64 to take the pseudo-labels in place, got {t.dtype}")
    if not t.is_contiguous():
        raise ValueError("t must be contiguous to take the pseudo-labels in place")
    thresholds = check.thresholds(thresholds, y)
    factor = _for_inputs(resolve(backend, y.device), y).entropy_pseudo_labels_(
        y, t, thresholds, ignore_index=ignore_index, size=size
    )
    return t, factor


def entropy_histogram(y, t, *, bins=100, ignore_index=255, size=None, backend="auto"):
    """MATH.md#entropy-histogram: int64 (Co, bins) counts of the background pixels of ``t`` by the old
    model's predicted class and the bin of their normalised entropy u. Histograms of batches add up;
    ``histogram_medians`` turns the total into per-class thresholds (PLOP's ``find_median``)."""
    y, ignore_index, size = _pseudo_label_inputs(y, t, ignore_index, size)
    bins = check.integer(bins, "bins", minimum=1, maximum=2**31 - 1)
    return _for_inputs(resolve(backend, y.device), y).entropy_histogram(
        y, t, bins=bins, ignore_index=ignore_index, size=size
    )


def histogram_medians(hist):
    """MATH.md#histogram-median: (Co,) float32 per-class medians of u from an (Co, bins) histogram,
    interpolated inside the bin where the cumulative count reaches half; 0 for an empty class."""
    return reference.histogram_medians(check.histogram(hist))


# ---------------------------------------------------------------------------------------------
# Sigmoid losses with composed targets (MATH.md#sigmoid-losses): SSUL's and DKD's BCE.
# ---------------------------------------------------------------------------------------------

__all__ += ["sigmoid_losses"]

SIGMOID_NAMES = dict(x="x", t="t", y="y", size="size")


def _sigmoid_teacher(y, x, *, soft, pseudo, label_channels_from, size, names):
    """y when soft targets or pseudo-labels need it (checked), else it must be None."""
    if not (soft or pseudo):
        if y is not None:
            raise ValueError(
                f"{names['y']} is not used: there are no soft-target channels "
                "(negative_channels == label_channels_from) and no pseudo_threshold"
            )
        return None
    if y is None:
        need = (
            "channels [negative_channels, label_channels_from) take sigmoid(y) as targets"
            if soft
            else "pseudo_threshold"
        )
        raise ValueError(f"{names['y']} (the old model's logits) is required: {need}")
    check.teacher(y, x, names["y"], names["x"], size, names["size"])
    if y.shape[1] < label_channels_from:
        raise ValueError(
            f"{names['y']} has Co={y.shape[1]} channels, fewer than label_channels_from={label_channels_from}: "
            "every soft-target channel needs its old logit"
        )
    return y


def sigmoid_losses(
    x,
    t=None,
    y=None,
    *,
    negative_channels=0,
    label_channels_from=0,
    pos_weight=None,
    channel_weight=None,
    pseudo_threshold=None,
    pseudo_background=1,
    ignore_index=255,
    ignored_pixels="skip",
    reduction="mean",
    size=None,
    backend="auto",
    names=SIGMOID_NAMES,
):
    """MATH.md#sigmoid-losses: per-class BCE with logits whose targets are composed per pixel, fused.

    ``x`` (B, C, h, w) logits. Channels ``[0, negative_channels)`` have target 0,
    ``[negative_channels, label_channels_from)`` the soft target ``sigmoid(y_c)`` of the old model's
    logits ``y`` (B, Co, h', w'), and ``[label_channels_from, C)`` the one-hot of the labels ``t``
    (B, H, W). ``pseudo_threshold`` (SSUL): a pixel labelled below ``pseudo_background`` takes the old
    model's argmax class k when k >= pseudo_background and sigmoid(y_k) >= pseudo_threshold.
    ``pos_weight`` and ``channel_weight``: a number or (C,) values (BCEWithLogitsLoss's pos_weight; a
    weight per channel). ``ignored_pixels``: "skip" (SSUL: ignored pixels are not in the label term)
    or "negative" (DKD: they are pixels without a positive channel). ``reduction`` "mean" (label
    term over the counted pixels, the others over B·H·W), "sum" or "none" (B, H, W maps).
    ``size=(H, W)``: the losses of x and y bilinearly upsampled to the labels' resolution.

    Returns ``(label, soft, negative)``, one term per target kind, float32 (float64 for float64 x).
    SSUL: ``sigmoid_losses(x, t, y_old, pseudo_threshold=0.7, pseudo_background=fg_idx + 1)[0]``.
    DKD: ``label, soft, negative = sigmoid_losses(x, t, y_old, negative_channels=1,
    label_channels_from=Co, pos_weight=w, ignored_pixels="negative")``, then
    ``mbce * label + kd * soft + ac * negative``.
    """
    check.logits(x, names["x"])
    size = check.output_size(size, x, names["size"], names["x"])
    negative_channels, label_channels_from = check.sigmoid_layout(negative_channels, label_channels_from, x)
    ignore_index = check.integer(ignore_index, "ignore_index", *check.INT64_RANGE)
    ignored_pixels = check.choice(ignored_pixels, "ignored_pixels", SIGMOID_IGNORED_PIXELS)
    reduction = check.choice(reduction, "reduction", REDUCTIONS)
    pseudo_threshold = check.pseudo_threshold(pseudo_threshold)
    pseudo_background = check.integer(pseudo_background, "pseudo_background", 1, x.shape[1])
    pseudo = pseudo_threshold is not None
    if label_channels_from < x.shape[1] or pseudo:
        check.labels(t, x, ignore_index, names["t"], names["x"], size)
    elif t is not None:
        raise ValueError(f"{names['t']} is not used: there are no label channels (label_channels_from == C)")
    y = _sigmoid_teacher(
        y,
        x,
        soft=negative_channels < label_channels_from,
        pseudo=pseudo,
        label_channels_from=label_channels_from,
        size=size,
        names=names,
    )
    pos_weight = check.channel_weights(pos_weight, x, "pos_weight")
    channel_weight = check.channel_weights(channel_weight, x, "channel_weight")
    implementation = _for_inputs(resolve(backend, x.device), x)
    return implementation.sigmoid_losses(
        x,
        t,
        y,
        pos_weight,
        channel_weight,
        negative_channels=negative_channels,
        label_channels_from=label_channels_from,
        pseudo_threshold=pseudo_threshold,
        pseudo_background=pseudo_background,
        ignore_index=ignore_index,
        ignored_pixels=ignored_pixels,
        reduction=reduction,
        size=size,
    )
