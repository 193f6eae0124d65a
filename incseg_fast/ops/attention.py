"""Fake kernels, autograd and contract wrappers of the attention ops (MATH.md#feature-losses),
written once for every namespace.

The forward op of attentive distillation returns, besides the loss, the small per-pixel state its
backward needs (the normalised spatial maps Ŝ_f, Ŝ_g and their difference, 1/N per image and, when
the spatial map is differentiated, P = dL/dŜ per unit of upstream gradient), so the backward reads
the features once more and never recomputes a reduction over the whole image. Every implementation
family saves the same state in the same layout (csrc/ops.cpp).
"""

import torch

from ..vocabulary import accumulation_dtype

__all__ = ["register", "attentive_distillation", "structured_attention"]


def _empty_unless(wanted, like, shape=None, dtype=None):
    """The fake of an optional output: `like`-shaped when wanted, else the empty tensor the kernel returns."""
    shape = like.shape if shape is None else shape
    return like.new_empty(shape if wanted else (0,), dtype=dtype or like.dtype)


# ---- attentive distillation (MATH.md#ad) ----


def _attentive_distillation_forward_fake(f, g, a, b, reduction, save_spatial_grad):
    batch, _, height, width = f.shape
    acc = accumulation_dtype(f.dtype)
    loss = f.new_empty((), dtype=acc)
    spatial = f.new_empty((3, batch, height, width), dtype=acc)
    inv_norm = f.new_empty((2, batch), dtype=acc)
    pixel_grad = _empty_unless(save_spatial_grad, spatial, shape=(2, batch, height, width))
    return loss, spatial, inv_norm, pixel_grad


def _attentive_distillation_backward_fake(
    grad_loss, f, g, a, b, spatial, inv_norm, pixel_grad, reduction, spatial_chain, output_mask
):
    return tuple(_empty_unless(wanted, like) for wanted, like in zip(output_mask, (f, g, a, b), strict=True))


def _attentive_distillation_setup_context(ctx, inputs, output):
    f, g, a, b, reduction, save_spatial_grad = inputs
    _, spatial, inv_norm, pixel_grad = output
    ctx.mark_non_differentiable(spatial, inv_norm, pixel_grad)
    ctx.save_for_backward(f, g, a, b, spatial, inv_norm, pixel_grad)
    ctx.reduction = reduction
    ctx.spatial_chain = save_spatial_grad


def _attentive_distillation_backward(ops):
    def backward(ctx, grad_loss, *_state_grads):
        f, g, a, b, spatial, inv_norm, pixel_grad = ctx.saved_tensors
        output_mask = list(ctx.needs_input_grad[:4])
        grads = ops.attentive_distillation_backward(
            grad_loss, f, g, a, b, spatial, inv_norm, pixel_grad, ctx.reduction, ctx.spatial_chain, output_mask
        )
        return (*(grad if wanted else None for grad, wanted in zip(grads, output_mask, strict=True)), None, None)

    return backward


def attentive_distillation(ops, f, g, a, b, *, reduction, detach_spatial):
    """Backend contract (DEVELOPERS.md): mean or sum of ((a ⊗ Ŝ_f + 1) f - (b ⊗ Ŝ_g + 1) g)^2.

    Returns a 0-dim float32 tensor (float64 for float64 inputs), differentiable w.r.t. f, g, a, b.
    """
    # The forward saves dL/dŜ only when a backward through the spatial map can follow.
    save_spatial_grad = not detach_spatial and torch.is_grad_enabled() and (f.requires_grad or g.requires_grad)
    loss, _, _, _ = ops.attentive_distillation_forward(f, g, a, b, reduction, save_spatial_grad)
    return loss


# ---- structured attention (MATH.md#sab) ----


def _structured_attention_fake(v, a_ch, a_sp):
    return torch.empty_like(v, memory_format=torch.contiguous_format)


def _structured_attention_backward_fake(grad_out, v, a_ch, a_sp, output_mask):
    return tuple(_empty_unless(wanted, like) for wanted, like in zip(output_mask, (v, a_ch, a_sp), strict=True))


def _structured_attention_setup_context(ctx, inputs, output):
    ctx.save_for_backward(*inputs)


def _structured_attention_backward(ops):
    def backward(ctx, grad_out):
        v, a_ch, a_sp = ctx.saved_tensors
        output_mask = list(ctx.needs_input_grad)
        grads = ops.structured_attention_backward(grad_out, v, a_ch, a_sp, output_mask)
        return tuple(grad if wanted else None for grad, wanted in zip(grads, output_mask, strict=True))

    return backward


def structured_attention(ops, v, a_ch, a_sp):
    """Backend contract (DEVELOPERS.md): (1 + a_ch[:, :, None, None] * a_sp[:, None]) * v in v's dtype."""
    return ops.structured_attention(v, a_ch, a_sp)


def register(namespace):
    """Fake kernels and autograd for ``namespace``'s attention ops (once per namespace)."""
    ops = getattr(torch.ops, namespace)
    fakes = {
        "attentive_distillation_forward": _attentive_distillation_forward_fake,
        "attentive_distillation_backward": _attentive_distillation_backward_fake,
        "structured_attention": _structured_attention_fake,
        "structured_attention_backward": _structured_attention_backward_fake,
    }
    for name, fake in fakes.items():
        torch.library.register_fake(f"{namespace}::{name}", fake)
    torch.library.register_autograd(
        f"{namespace}::attentive_distillation_forward",
        _attentive_distillation_backward(ops),
        setup_context=_attentive_distillation_setup_context,
    )
    torch.library.register_autograd(
        f"{namespace}::structured_attention",
        _structured_attention_backward(ops),
        setup_context=_structured_attention_setup_context,
    )
