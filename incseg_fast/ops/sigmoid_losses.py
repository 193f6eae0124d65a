"""Fake kernels, autograd and the contract wrapper of the sigmoid-loss ops (MATH.md#sigmoid-losses).

``<namespace>::sigmoid_losses_fwd`` returns ``(label_loss, soft_loss, negative_loss, label_count)``;
``label_count`` (the pixels the label term counts, the "mean"'s denominator) is what
``sigmoid_losses_bwd`` needs besides the inputs, so the backward is one pass over the logits that
recomputes every target. The schemas are in csrc/ops.cpp.
"""

import torch

from ..vocabulary import accumulation_dtype

__all__ = ["register", "sigmoid_losses", "SIGMOID_OPTION_KEYS"]

SIGMOID_OPTION_KEYS = (
    "negative_channels",
    "label_channels_from",
    "pseudo_threshold",
    "pseudo_background",
    "ignore_index",
    "ignored_pixels",
    "reduction",
    "size",
)


def _forward_fake(x, target, y, pos_weight, channel_weight, **options):
    dtype = accumulation_dtype(x.dtype)
    size = options.get("size")
    H, W = tuple(x.shape[2:]) if size is None else tuple(size)
    shape = (x.shape[0], H, W) if options["reduction"] == "none" else ()
    losses = tuple(x.new_empty(shape, dtype=dtype) for _ in range(3))
    return (*losses, x.new_empty((), dtype=torch.int64))


def _backward_fake(
    grad_label, grad_soft, grad_negative, x, target, y, pos_weight, channel_weight, label_count, **options
):
    return torch.empty_like(x, memory_format=torch.contiguous_format)


def _setup_context(ctx, inputs, keyword_only_inputs, output):
    x, target, y, pos_weight, channel_weight = inputs
    label_loss, _, _, label_count = output
    ctx.save_for_backward(x, target, y, pos_weight, channel_weight, label_count)
    ctx.options = {key: keyword_only_inputs.get(key) for key in SIGMOID_OPTION_KEYS}
    ctx.loss_shape = label_loss.shape
    ctx.mark_non_differentiable(label_count)
    ctx.set_materialize_grads(False)


def _autograd_backward(ops):
    def backward(ctx, grad_label, grad_soft, grad_negative, _grad_count):
        x, target, y, pos_weight, channel_weight, label_count = ctx.saved_tensors
        grads = (grad_label, grad_soft, grad_negative)
        if not ctx.needs_input_grad[0] or all(g is None for g in grads):
            return None, None, None, None, None
        zeros = torch.zeros(ctx.loss_shape, dtype=accumulation_dtype(x.dtype), device=x.device)
        grad_x = ops.sigmoid_losses_bwd(
            *(zeros if g is None else g for g in grads),
            x,
            target,
            y,
            pos_weight,
            channel_weight,
            label_count,
            **ctx.options,
        )
        return grad_x, None, None, None, None

    return backward


def register(namespace):
    """Fake kernels and autograd for ``namespace``'s sigmoid-loss ops (once per namespace)."""
    ops = getattr(torch.ops, namespace)
    torch.library.register_fake(f"{namespace}::sigmoid_losses_fwd", _forward_fake)
    torch.library.register_fake(f"{namespace}::sigmoid_losses_bwd", _backward_fake)
    torch.library.register_autograd(
        f"{namespace}::sigmoid_losses_fwd", _autograd_backward(ops), setup_context=_setup_context
    )


def sigmoid_losses(ops, x, target, y, pos_weight, channel_weight, **options):
    """The backend contract (DEVELOPERS.md) on ``ops``; returns ``(label_loss, soft_loss, negative_loss)``."""
    label_loss, soft_loss, negative_loss, _ = ops.sigmoid_losses_fwd(
        x, target, y, pos_weight, channel_weight, **options
    )
    return label_loss, soft_loss, negative_loss
