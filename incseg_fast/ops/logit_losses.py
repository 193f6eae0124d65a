"""Fake kernels, autograd and the contract wrapper of the logit-loss ops, written once for every namespace.

``<namespace>::logit_losses_fwd`` returns ``(ce_loss, kd_loss, stats, valid_count)``; the last two
are what ``logit_losses_bwd`` needs (per-pixel log-normalisers (B, 4, H, W) and the number of
non-ignored pixels), so the backward is one fused pass over the logits. The schemas are in
csrc/ops.cpp; every implementation family (compiled, Triton) has the same ones in its own namespace.

With ``size=[H, W]`` (MATH.md#upsampling) the ops compute the losses of the bilinear upsampling of x
(B, C, h, w) and y (B, Co, h', w') to H, W: everything per pixel (losses, stats) is (B, ·, H, W)
and the gradient is x's own (B, C, h, w).
"""

import torch

from ..vocabulary import accumulation_dtype

__all__ = ["register", "logit_losses"]

NUM_STATS = 4  # rows of the saved per-pixel statistics: lse, lse_old, lse_bg, lse of alpha*y
_MODE_KEYS = ("old_classes", "ce", "kd", "alpha", "ignore_index", "reduction", "size")


def _output_resolution(x, size):
    """(H, W): the resolution of the per-pixel losses and statistics, size= when given, else x's own."""
    return tuple(x.shape[2:]) if size is None else tuple(size)


def _forward_fake(x, target, y, log_gamma, mask, *, old_classes, ce, kd, alpha, ignore_index, reduction, size=None):
    dtype = accumulation_dtype(x.dtype)
    H, W = _output_resolution(x, size)
    B = x.shape[0]
    shape = (B, H, W) if reduction == "none" else ()
    return (
        x.new_empty(shape, dtype=dtype),
        x.new_empty(shape, dtype=dtype),
        x.new_empty((B, NUM_STATS, H, W), dtype=dtype),
        x.new_empty((), dtype=torch.int64),
    )


def _backward_fake(
    grad_ce,
    grad_kd,
    x,
    target,
    y,
    log_gamma,
    mask,
    stats,
    valid_count,
    *,
    old_classes,
    ce,
    kd,
    alpha,
    ignore_index,
    reduction,
    size=None,
):
    return torch.empty_like(x, memory_format=torch.contiguous_format)


def _setup_context(ctx, inputs, keyword_only_inputs, output):
    x, target, y, log_gamma, mask = inputs
    ce_loss, _, stats, valid_count = output
    ctx.save_for_backward(x, target, y, log_gamma, mask, stats, valid_count)
    ctx.modes = {key: keyword_only_inputs[key] for key in _MODE_KEYS}
    ctx.loss_shape = ce_loss.shape
    # The statistics are internal: no gradient flows to them, and none should be materialised
    # (a zero (B, 4, H, W) tensor per backward otherwise). An unused loss then arrives as None.
    ctx.mark_non_differentiable(stats, valid_count)
    ctx.set_materialize_grads(False)


def _autograd_backward(ops):
    def backward(ctx, grad_ce, grad_kd, _grad_stats, _grad_valid_count):
        x, target, y, log_gamma, mask, stats, valid_count = ctx.saved_tensors
        if not ctx.needs_input_grad[0] or (grad_ce is None and grad_kd is None):
            return None, None, None, None, None
        zeros = None
        if grad_ce is None or grad_kd is None:
            zeros = torch.zeros(ctx.loss_shape, dtype=accumulation_dtype(x.dtype), device=x.device)
        grad_x = ops.logit_losses_bwd(
            zeros if grad_ce is None else grad_ce,
            zeros if grad_kd is None else grad_kd,
            x,
            target,
            y,
            log_gamma,
            mask,
            stats,
            valid_count,
            **ctx.modes,
        )
        return grad_x, None, None, None, None

    return backward


def register(namespace):
    """Fake kernels and autograd for ``namespace``'s logit-loss ops (once per namespace)."""
    ops = getattr(torch.ops, namespace)
    torch.library.register_fake(f"{namespace}::logit_losses_fwd", _forward_fake)
    torch.library.register_fake(f"{namespace}::logit_losses_bwd", _backward_fake)
    torch.library.register_autograd(
        f"{namespace}::logit_losses_fwd", _autograd_backward(ops), setup_context=_setup_context
    )


def logit_losses(ops, x, target, y, log_gamma, mask, *, old_classes, ce, kd, alpha, ignore_index, reduction, size=None):
    """The backend contract of DEVELOPERS.md on ``ops`` (a torch.ops namespace); returns ``(ce_loss, kd_loss)``."""
    ce_loss, kd_loss, _, _ = ops.logit_losses_fwd(
        x,
        target,
        y,
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
    return ce_loss, kd_loss
