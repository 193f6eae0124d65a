"""Fake kernels, autograd and the contract wrapper of Local POD (MATH.md#local-pod), written once for every namespace.

The forward op returns, besides the loss, 1/ℓ per image; the backward gets it and both inputs back
and pools again (per plane on the CPU, per call on CUDA and Triton), so the pooled differences P
(B, C, Σ_s s²(h_s + w_s)) never outlive a call. Only the new features are differentiated (the old
ones come from the frozen model).
"""

import torch

from ..vocabulary import accumulation_dtype

__all__ = ["register", "local_pod", "pooled_size"]


def pooled_size(height, width, scales):
    """Pooled values per image and channel: Σ_s s² (⌊H/s⌋ + ⌊W/s⌋) (csrc/common/pod_math.h's layout)."""
    return sum(s * s * (height // s + width // s) for s in scales)


def _forward_fake(new, old, scales, reduction):
    batch = new.shape[0]
    acc = accumulation_dtype(new.dtype)
    loss = new.new_empty((batch,) if reduction == "none" else (), dtype=acc)
    return loss, new.new_empty((batch,), dtype=acc)


def _backward_fake(grad_loss, new, old, inv_norm, scales, reduction):
    return torch.empty_like(new, memory_format=torch.contiguous_format)


def _setup_context(ctx, inputs, output):
    new, old, scales, reduction = inputs
    _, inv_norm = output
    ctx.mark_non_differentiable(inv_norm)
    ctx.save_for_backward(new, old, inv_norm)
    ctx.scales = scales
    ctx.reduction = reduction


def _backward(ops):
    def backward(ctx, grad_loss, *_state_grads):
        new, old, inv_norm = ctx.saved_tensors
        grad_new = None
        if ctx.needs_input_grad[0]:
            grad_new = ops.local_pod_backward(grad_loss, new, old, inv_norm, ctx.scales, ctx.reduction)
        return grad_new, None, None, None

    return backward


def local_pod(ops, new, old, *, scales, reduction):
    """Backend contract (DEVELOPERS.md): one layer's Local POD of equal-shaped ``new`` and ``old``,
    differentiable w.r.t. ``new``; float32 (float64 for float64 features)."""
    loss, _ = ops.local_pod_forward(new, old.detach(), list(scales), reduction)
    return loss


def register(namespace):
    """Fake kernels and autograd for ``namespace``'s Local POD ops (once per namespace)."""
    torch.library.register_fake(f"{namespace}::local_pod_forward", _forward_fake)
    torch.library.register_fake(f"{namespace}::local_pod_backward", _backward_fake)
    torch.library.register_autograd(
        f"{namespace}::local_pod_forward", _backward(ops=getattr(torch.ops, namespace)), setup_context=_setup_context
    )
