"""The public functions: validate once, pick the backend, call it.

Every logit loss (MATH.md#logit-losses) goes through one backend function, ``logit_losses``, whose canonical
arguments are described in DEVELOPERS.md; the attention ops (MATH.md#feature-losses) have one each.
"""

from . import _validate as check
from . import reference
from ._backends import available_backends, resolve
from .reference import balanced_log_gamma
from .vocabulary import FEATURE_REDUCTIONS, INCREMENTAL_CE_MODES, KD_MODES, REDUCTIONS, accumulation_dtype

__all__ = [
    "unbiased_cross_entropy",
    "knowledge_distillation",
    "unbiased_knowledge_distillation",
    "balanced_knowledge_distillation",
    "incremental_loss",
    "attentive_distillation",
    "structured_attention",
    "available_backends",
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
