"""The reference path: docs/MATH.md in plain PyTorch, differentiated by autograd.

This module defines the math. Every other backend is tested against it, run on float64
copies of the inputs. It favours clarity over speed and materialises what it needs.

Computation happens in the input dtype promoted to at least float32 (float64 stays float64);
losses come back in that computation dtype, ``structured_attention`` in the input's dtype.
The functions here do not validate their arguments: the public API (``incseg_fast.api``) does.
"""

import math

import torch

__all__ = [
    "unbiased_cross_entropy",
    "knowledge_distillation",
    "unbiased_knowledge_distillation",
    "balanced_knowledge_distillation",
    "balanced_log_gamma",
    "incremental_loss",
    "attentive_distillation",
    "structured_attention",
    "local_pod",
    "merge_new_channels",
    "logit_losses",
    "upsample",
    "ignored",
    "entropy_pseudo_labels",
    "entropy_pseudo_labels_",
    "entropy_histogram",
    "histogram_medians",
]


def _upcast(t):
    """Promote to at least float32 (float64 stays float64)."""
    return t.to(torch.promote_types(t.dtype, torch.float32))


def _weight_times(weight, v):
    """weight * v, and exactly 0 where the weight is 0, so that a -inf, +inf or NaN sample read with
    weight 0 contributes nothing (0 * -inf would be NaN); its gradient there is 0 as well."""
    return torch.where(weight == 0, torch.zeros_like(v), weight * v)


def _interpolate_axis(v, dim, out_size):
    """Bilinear interpolation (align_corners=False) of ``v`` along ``dim`` to ``out_size`` samples,
    with the taps of MATH.md#upsampling: the source coordinate in v's dtype, as PyTorch forms it."""
    in_size = v.shape[dim]
    scale = torch.tensor(in_size, dtype=v.dtype) / out_size
    source = (scale * (torch.arange(out_size, dtype=v.dtype) + 0.5) - 0.5).clamp(min=0)
    i0 = source.long()
    i1 = torch.clamp(i0 + 1, max=in_size - 1)
    l1 = source - i0.to(v.dtype)
    shape = [1] * v.dim()
    shape[dim] = out_size
    first, second = (v.index_select(dim, i.to(v.device)) for i in (i0, i1))
    l1 = l1.to(v.device).view(shape)
    return _weight_times(1 - l1, first) + _weight_times(l1, second)


def upsample(v, size):
    """MATH.md#upsampling: the logits every loss sees with ``size=(H, W)``; ``v`` itself for None.

    F.interpolate's bilinear values (columns first, then rows, as its CPU kernel), except that a
    weight of exactly 0 contributes nothing: a masked class (-inf) stays -inf where every neighbour
    read with a nonzero weight is -inf, instead of becoming NaN from 0 * (-inf).
    """
    if size is None:
        return v
    return _interpolate_axis(_interpolate_axis(v, 3, size[1]), 2, size[0])


# ---------------------------------------------------------------------------------------------
# Per-pixel terms (MATH.md#logit-losses). Each returns a (B, H, W) map.
# ---------------------------------------------------------------------------------------------


def _background_set_lse(x, old_classes):
    """lse over bgset = {0} ∪ [Co, C): background plus the classes added at this step."""
    bgset = torch.cat([x[:, :1], x[:, old_classes:]], dim=1)
    return torch.logsumexp(bgset, dim=1)


def ignored(target, ignore_index):
    """Where a label equals ignore_index as integers (MATH.md#numerics).

    torch compares in the labels' dtype, where an out-of-range ignore_index would wrap (-1 as a
    uint8 is 255); such an ignore_index matches no label.
    """
    info = torch.iinfo(target.dtype)
    if not info.min <= ignore_index <= info.max:
        return torch.zeros_like(target, dtype=torch.bool)
    return target == ignore_index


def _cross_entropy_map(x, target, old_classes, ignore_index, unbiased):
    """MATH.md#unce (unbiased) or plain cross-entropy; 0 at ignored pixels."""
    valid = ~ignored(target, ignore_index)
    safe_target = torch.where(valid, target, torch.zeros_like(target)).long()
    lse = torch.logsumexp(x, dim=1)
    x_target = x.gather(1, safe_target.unsqueeze(1)).squeeze(1)
    loss = lse - x_target
    if unbiased:
        lse_old = torch.logsumexp(x[:, :old_classes], dim=1)
        loss = torch.where(safe_target < old_classes, lse - lse_old, loss)
    return torch.where(valid, loss, torch.zeros_like(loss)), valid


def _teacher_probabilities(y, alpha):
    return torch.softmax(alpha * y, dim=1)


def _kd_map(x, y, alpha):
    """MATH.md#kd: -(1/Co) sum_{c<Co} q_c log softmax(x_{<Co})_c."""
    old_classes = y.shape[1]
    log_s = torch.log_softmax(x[:, :old_classes], dim=1)
    q = _teacher_probabilities(y, alpha)
    return -(q * log_s).sum(dim=1) / old_classes


def _unbiased_kd_map(x, y, alpha, log_gamma=None):
    """MATH.md#unkd, and MATH.md#bkd when ``log_gamma`` (B,) weights the background term.

    γ q_0 is formed as exp(log γ + log q_0): γ beyond float32's range (a teacher whose pooled logits
    favour a class by ~89 or more) meets a q_0 that underflows, and their product is often ~1.
    """
    old_classes = y.shape[1]
    log_q = torch.log_softmax(alpha * y, dim=1)
    q = log_q.exp()
    weighted_q0 = q[:, 0]
    if log_gamma is not None:
        weighted_q0 = torch.exp(log_gamma.to(log_q.dtype).view(-1, 1, 1) + log_q[:, 0])
    lse = torch.logsumexp(x, dim=1)
    background_term = weighted_q0 * (_background_set_lse(x, old_classes) - lse)
    old_terms = (q[:, 1:] * (x[:, 1:old_classes] - lse.unsqueeze(1))).sum(dim=1)
    return -(background_term + old_terms) / old_classes


def balanced_log_gamma(y):
    """MATH.md#bkd-gamma: log γ_b, γ_b = (sum_{c>=1} g_c) / g_0 with g = softmax_c(mean_{h,w} y[b, c]).

    Uses the raw teacher logits (no alpha). Carries no gradient. Returns (B,) in the computation
    dtype of ``y``. The log, logsumexp(pooled[1:]) - pooled[0], is finite where γ itself overflows
    float32 (a class's mean logit leading the background's by ~89 or more); with Co == 1 the
    logsumexp of nothing is -inf (γ = 0).
    """
    with torch.no_grad():
        pooled = _upcast(y).mean(dim=(2, 3))
        return torch.logsumexp(pooled[:, 1:], dim=1) - pooled[:, 0]


# ---------------------------------------------------------------------------------------------
# Reductions (MATH.md#reductions).
# ---------------------------------------------------------------------------------------------


def _reduce_cross_entropy(loss_map, valid, reduction):
    """'mean' divides by the number of non-ignored pixels; all ignored gives 0 with zero grad."""
    if reduction == "none":
        return loss_map
    total = loss_map.sum()
    if reduction == "sum":
        return total
    return total / valid.sum().clamp(min=1).to(total.dtype)


def _mean(values):
    """The mean, and 0 (with a zero gradient) over no values at all (MATH.md#empty)."""
    return values.sum() / max(values.numel(), 1)


def _reduce_distillation(loss_map, mask, reduction):
    """'mean' is over all B·H·W pixels: masked pixels count in the denominator, as in MiB."""
    if mask is not None:
        loss_map = loss_map * mask.to(loss_map.dtype)
    if reduction == "none":
        return loss_map
    if reduction == "sum":
        return loss_map.sum()
    return _mean(loss_map)


# ---------------------------------------------------------------------------------------------
# The backend contract (DEVELOPERS.md): one function for every logit loss.
# ---------------------------------------------------------------------------------------------


def logit_losses(x, target, y, log_gamma, mask, *, old_classes, ce, kd, alpha, ignore_index, reduction, size=None):
    """Both terms of MATH.md#logit-losses in one call; see DEVELOPERS.md for the canonical arguments.

    With ``size=(H, W)``, literally the losses of ``upsample(x, size)`` and ``upsample(y, size)``
    (MATH.md#upsampling), interpolated in the computation dtype; ``log_gamma`` is the caller's.
    """
    x = upsample(_upcast(x), size)
    B, _, H, W = x.shape
    zeros = x.new_zeros((B, H, W)) if reduction == "none" else x.new_zeros(())

    if ce == "none":
        ce_loss = zeros
    else:
        loss_map, valid = _cross_entropy_map(x, target, old_classes, ignore_index, ce == "unbiased")
        ce_loss = _reduce_cross_entropy(loss_map, valid, reduction)

    if kd == "none":
        kd_loss = zeros.clone()
    else:
        y = upsample(_upcast(y).to(x.dtype), size)
        if kd == "plain":
            loss_map = _kd_map(x, y, alpha)
        elif kd == "unbiased":
            loss_map = _unbiased_kd_map(x, y, alpha)
        else:  # balanced
            loss_map = _unbiased_kd_map(x, y, alpha, log_gamma=log_gamma)
        kd_loss = _reduce_distillation(loss_map, mask, reduction)
    return ce_loss, kd_loss


# ---------------------------------------------------------------------------------------------
# Convenience forms with the public signatures (no backend, no validation).
# ---------------------------------------------------------------------------------------------


def unbiased_cross_entropy(x, t, old_classes, *, ignore_index=255, reduction="mean", size=None):
    return logit_losses(
        x,
        t,
        None,
        None,
        None,
        old_classes=old_classes,
        ce="unbiased",
        kd="none",
        alpha=1.0,
        ignore_index=ignore_index,
        reduction=reduction,
        size=size,
    )[0]


def _distillation(x, y, kd, *, alpha, mask, reduction, log_gamma=None, size=None):
    return logit_losses(
        x,
        None,
        y,
        log_gamma,
        mask,
        old_classes=y.shape[1],
        ce="none",
        kd=kd,
        alpha=alpha,
        ignore_index=255,
        reduction=reduction,
        size=size,
    )[1]


def knowledge_distillation(x, y, *, alpha=1.0, mask=None, reduction="mean", size=None):
    return _distillation(x, y, "plain", alpha=alpha, mask=mask, reduction=reduction, size=size)


def unbiased_knowledge_distillation(x, y, *, alpha=1.0, mask=None, reduction="mean", size=None):
    return _distillation(x, y, "unbiased", alpha=alpha, mask=mask, reduction=reduction, size=size)


def balanced_knowledge_distillation(x, y, *, alpha=1.0, mask=None, reduction="mean", gamma=None, size=None):
    """gamma, when not given, comes from ``y`` as given (at its own resolution, MATH.md#upsampling)."""
    log_gamma = balanced_log_gamma(y) if gamma is None else torch.log(gamma)
    return _distillation(x, y, "balanced", alpha=alpha, mask=mask, reduction=reduction, log_gamma=log_gamma, size=size)


def incremental_loss(
    x, t, y, *, old_classes, ce="unbiased", kd="unbiased", alpha=1.0, mask=None, ignore_index=255, size=None
):
    """MATH.md#incremental-loss: (ce, kd), both reduced with 'mean'."""
    log_gamma = balanced_log_gamma(y) if kd == "balanced" else None
    return logit_losses(
        x,
        t,
        y,
        log_gamma,
        mask,
        old_classes=old_classes,
        ce=ce,
        kd=kd,
        alpha=alpha,
        ignore_index=ignore_index,
        reduction="mean",
        size=size,
    )


# ---------------------------------------------------------------------------------------------
# Attentive spatial/channel weighting (MATH.md#feature-losses).
# ---------------------------------------------------------------------------------------------


def spatial_attention(m):
    """MATH.md#ad / CAF eq. 6: Ŝ = S / ||S||_F with S = sum_c m_c^2, and Ŝ = 0 where the norm is 0.

    Written so that an all-zero map has finite (zero) gradients; a NaN or infinite norm is not zero, so
    a NaN or +inf feature reaches every Ŝ of its image (RELIABILITY.md#numerics).
    """
    s = (m * m).sum(dim=1)
    sq_norm = (s * s).sum(dim=(1, 2))
    nonzero = sq_norm != 0
    norm = torch.sqrt(torch.where(nonzero, sq_norm, torch.ones_like(sq_norm)))
    return torch.where(nonzero.view(-1, 1, 1), s / norm.view(-1, 1, 1), torch.zeros_like(s))


def _attend(m, channel_attention, detach_spatial):
    s_hat = spatial_attention(m)
    if detach_spatial:
        s_hat = s_hat.detach()
    return (channel_attention[:, :, None, None] * s_hat[:, None] + 1) * m


def attentive_distillation(f, g, a, b, *, reduction="mean", detach_spatial=False):
    """MATH.md#ad / CAF eq. 7–8: mean (or sum) of (AD(f) - AD(g))^2, in the student's (f's) computation
    dtype: a wider teacher (g, b; MATH.md#teacher-dtype) is read in it."""
    f, a = _upcast(f), _upcast(a)
    g, b = g.to(f.dtype), b.to(f.dtype)
    diff = _attend(f, a, detach_spatial) - _attend(g, b, detach_spatial)
    squared = diff * diff
    return _mean(squared) if reduction == "mean" else squared.sum()


def structured_attention(v, a_ch, a_sp):
    """MATH.md#sab: (1 + a_ch ⊗ a_sp) * v, returned in v's dtype."""
    out = (1 + _upcast(a_ch)[:, :, None, None] * _upcast(a_sp)[:, None]) * _upcast(v)
    return out.to(v.dtype)


# ---------------------------------------------------------------------------------------------
# PLOP's Local POD (MATH.md#local-pod).
# ---------------------------------------------------------------------------------------------


def merge_new_channels(x, old_channels):
    """MATH.md#local-pod-logits: the channels from ``old_channels`` on added into channel 0, the rest dropped."""
    background = x[:, :1] + x[:, old_channels:].sum(dim=1, keepdim=True)
    return torch.cat([background, x[:, 1:old_channels]], dim=1)


def _pod_embedding(e, scales):
    """Every scale's width-pooled (B, C, s, h_s, s) and height-pooled (B, C, s, s, w_s) cell means of
    ``e`` (B, C, H, W), flattened and concatenated per image (MATH.md#local-pod)."""
    B, C, H, W = e.shape
    parts = []
    for s in scales:
        h, w = H // s, W // s
        cells = e[:, :, : s * h, : s * w].reshape(B, C, s, h, s, w)  # [b, c, i, row in cell, j, column in cell]
        parts.append(cells.mean(dim=5).flatten(1))
        parts.append(cells.mean(dim=3).flatten(1))
    return torch.cat(parts, dim=1)


def local_pod(new, old, *, scales=(1, 2, 4), reduction="mean"):
    """MATH.md#local-pod: per image the L2 distance of the multi-scale pooled squared features;
    mean (or sum) over the batch, or the (B,) distances for "none". With more channels in ``new``
    than in ``old`` (logits), the new classes are first merged into the background."""
    new, old = _upcast(new), _upcast(old)
    if new.shape[1] > old.shape[1]:
        new = merge_new_channels(new, old.shape[1])
    distances = torch.linalg.vector_norm(_pod_embedding(new.square() - old.square(), scales), dim=1)
    if reduction == "none":
        return distances
    return _mean(distances) if reduction == "mean" else distances.sum()


# ---------------------------------------------------------------------------------------------
# Entropy pseudo-labels (PLOP; MATH.md#pseudo-labels). No gradient: labels and counts.
# ---------------------------------------------------------------------------------------------


def pseudo_background(t, old_classes, ignore_index):
    """Background pixels: label < Co and not the ignore label (MATH.md#pseudo-labels)."""
    return (t.long() < old_classes) & ~ignored(t, ignore_index)


def predicted_class_and_entropy(y, size=None):
    """k̂ (argmax of the logits, lowest index among ties) and u = H(softmax) / log Co of upsample(y, size)."""
    with torch.no_grad():
        logits = upsample(_upcast(y), size)
        old_classes = logits.shape[1]
        p = torch.softmax(logits, dim=1)
        entropy = -torch.special.xlogy(p, p).sum(dim=1)  # p log p = 0 at p = 0
        scale = 1 / math.log(old_classes) if old_classes > 1 else 0.0
        return logits.argmax(dim=1), entropy * scale


def entropy_pseudo_labels(y, t, thresholds, *, ignore_index=255, size=None):
    """MATH.md#pseudo-labels: (new labels (B, H, W) int64, adaptive factor (B,) float32)."""
    predicted, u = predicted_class_and_entropy(y, size)
    background = pseudo_background(t, y.shape[1], ignore_index)
    confident = background & (u < thresholds.to(u.dtype)[predicted])
    not_confident = torch.full_like(predicted, ignore_index)
    labels = torch.where(background, torch.where(confident, predicted, not_confident), t.long())
    counts = (confident.sum(dim=(1, 2)), background.sum(dim=(1, 2)))
    factor = counts[0].double() / (counts[1].double() + 1e-6)
    return labels, factor.float()


def entropy_pseudo_labels_(y, t, thresholds, *, ignore_index=255, size=None):
    """:func:`entropy_pseudo_labels` written into ``t`` (int64); returns the adaptive factor."""
    labels, factor = entropy_pseudo_labels(y, t, thresholds, ignore_index=ignore_index, size=size)
    t.copy_(labels)
    return factor


def entropy_bins(u, bins):
    """min(floor(u * bins), bins - 1), and 0 below 0 (MATH.md#entropy-histogram)."""
    return (u * bins).floor().clamp(0, bins - 1).long()


def entropy_histogram(y, t, *, bins=100, ignore_index=255, size=None):
    """MATH.md#entropy-histogram: int64 (Co, bins) counts of the background pixels by (k̂, entropy bin)."""
    predicted, u = predicted_class_and_entropy(y, size)
    background = pseudo_background(t, y.shape[1], ignore_index)
    cells = predicted[background] * bins + entropy_bins(u[background], bins)
    return torch.bincount(cells, minlength=y.shape[1] * bins).view(y.shape[1], bins)


def histogram_medians(hist):
    """MATH.md#histogram-median: (Co,) float32 medians of u from an (Co, bins) histogram, 0 for an empty row."""
    counts = hist.double()
    bins = counts.shape[1]
    half = counts.sum(dim=1) / 2
    cumulative = counts.cumsum(dim=1)
    # The first bin whose cumulative count reaches half: the number of bins below half.
    j = (cumulative < half[:, None]).sum(dim=1).clamp(max=bins - 1)
    below = cumulative.gather(1, j[:, None]).squeeze(1) - counts.gather(1, j[:, None]).squeeze(1)
    in_bin = counts.gather(1, j[:, None]).squeeze(1)
    median = (j + (half - below) / in_bin.clamp(min=1)) / bins
    return torch.where(half > 0, median, torch.zeros_like(median)).float()


# ---------------------------------------------------------------------------------------------
# Sigmoid losses with composed targets (MATH.md#sigmoid-losses): SSUL's and DKD's BCE.
# ---------------------------------------------------------------------------------------------

__all__ += ["sigmoid_losses", "sigmoid_pseudo_labels"]


def sigmoid_pseudo_labels(target, y, *, threshold, background, ignore_index):
    """MATH.md#sigmoid-pseudo: a label below ``background`` becomes the old model's argmax class k when
    k >= background and sigmoid(y_k) >= threshold. Returns int64 labels; ignored pixels stay ignored."""
    eligible = ~ignored(target, ignore_index) & (target.long() < background)
    scores, best = y.max(dim=1)  # the first maximum on ties
    confident = (best >= background) & (torch.sigmoid(scores) >= threshold)
    return torch.where(eligible & confident, best, target.long())


def _softplus_exact(z):
    """log(1 + exp(z)) without F.softplus's linear cut-off at z > 20 (an absolute error of e^-20)."""
    return torch.clamp(z, min=0) + torch.log1p(torch.exp(-z.abs()))


def _composed_targets(x, target, y, *, negative_channels, label_channels_from, ignore_index, labels):
    """MATH.md#sigmoid-notation: the dense B×C×H×W targets (0 | sigmoid(y) | one-hot of ``labels``)."""
    C = x.shape[1]
    targets = torch.zeros_like(x)
    targets[:, negative_channels:label_channels_from] = torch.sigmoid(y[:, negative_channels:label_channels_from])
    if label_channels_from < C:
        classes = torch.arange(label_channels_from, C, device=x.device).view(1, -1, 1, 1)
        valid = ~ignored(target, ignore_index)
        targets[:, label_channels_from:] = ((labels.unsqueeze(1) == classes) & valid.unsqueeze(1)).to(x.dtype)
    return targets


def sigmoid_losses(
    x,
    target,
    y,
    pos_weight,
    channel_weight,
    *,
    negative_channels,
    label_channels_from,
    pseudo_threshold,
    pseudo_background,
    ignore_index,
    ignored_pixels,
    reduction,
    size=None,
):
    """MATH.md#sigmoid-losses: (label, soft, negative) terms of the BCE with composed targets.

    The backend contract (DEVELOPERS.md): ``target`` (B, H, W) or None when there are no label
    channels; ``y`` (B, Co, h', w') or None when there are neither soft channels nor pseudo-labels;
    ``pos_weight``, ``channel_weight`` (C,) in the computation dtype, or None (all ones).
    """
    x = upsample(_upcast(x), size)
    B, C, H, W = x.shape
    if y is not None:
        y = upsample(_upcast(y).to(x.dtype), size)
    labels = None
    if target is not None:
        labels = target.long()
        if pseudo_threshold is not None:
            labels = sigmoid_pseudo_labels(
                target, y, threshold=pseudo_threshold, background=pseudo_background, ignore_index=ignore_index
            )
    targets = _composed_targets(
        x,
        target,
        y,
        negative_channels=negative_channels,
        label_channels_from=label_channels_from,
        ignore_index=ignore_index,
        labels=labels,
    )
    positive_scale = 1.0 if pos_weight is None else pos_weight.to(x.dtype).view(1, -1, 1, 1)
    elementwise = (1 - targets) * x + (1 + (positive_scale - 1) * targets) * _softplus_exact(-x)
    if channel_weight is not None:
        elementwise = elementwise * channel_weight.to(x.dtype).view(1, -1, 1, 1)

    label_map = elementwise[:, label_channels_from:].sum(dim=1)
    counted = torch.ones((B, H, W), dtype=torch.bool, device=x.device)
    if target is not None and ignored_pixels == "skip":
        counted = ~ignored(target, ignore_index)
        label_map = torch.where(counted, label_map, torch.zeros_like(label_map))
    soft_map = elementwise[:, negative_channels:label_channels_from].sum(dim=1)
    negative_map = elementwise[:, :negative_channels].sum(dim=1)
    if reduction == "none":
        return label_map, soft_map, negative_map
    if reduction == "sum":
        return label_map.sum(), soft_map.sum(), negative_map.sum()
    return _reduce_cross_entropy(label_map, counted, "mean"), _mean(soft_map), _mean(negative_map)
