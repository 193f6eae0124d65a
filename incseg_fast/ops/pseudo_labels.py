"""Fake kernels and contract wrappers of the entropy pseudo-label ops (MATH.md#pseudo-labels), written
once for every namespace. The ops return labels and counts: they have no autograd formula."""

import torch

__all__ = ["register", "entropy_pseudo_labels", "entropy_pseudo_labels_", "entropy_histogram"]


def _entropy_pseudo_labels_fake(y, labels, thresholds, *, ignore_index, size=None):
    return labels.new_empty(labels.shape, dtype=torch.int64), labels.new_empty((y.shape[0],), dtype=torch.float32)


def _entropy_pseudo_labels_in_place_fake(y, labels, thresholds, *, ignore_index, size=None):
    return labels.new_empty((y.shape[0],), dtype=torch.float32)


def _entropy_histogram_fake(y, labels, *, bins, ignore_index, size=None):
    return labels.new_empty((y.shape[1], bins), dtype=torch.int64)


def entropy_pseudo_labels(ops, y, t, thresholds, *, ignore_index, size):
    """Backend contract (DEVELOPERS.md): (new labels (B, H, W) int64, adaptive factor (B,) float32)."""
    return ops.entropy_pseudo_labels(y, t, thresholds, ignore_index=ignore_index, size=size)


def entropy_pseudo_labels_(ops, y, t, thresholds, *, ignore_index, size):
    """Backend contract (DEVELOPERS.md): the new labels written into t (int64, contiguous); returns the
    adaptive factor (B,) float32."""
    return ops.entropy_pseudo_labels_(y, t, thresholds, ignore_index=ignore_index, size=size)


def entropy_histogram(ops, y, t, *, bins, ignore_index, size):
    """Backend contract (DEVELOPERS.md): int64 (Co, bins) counts of the background pixels."""
    return ops.entropy_histogram(y, t, bins=bins, ignore_index=ignore_index, size=size)


def register(namespace):
    """Fake kernels for ``namespace``'s pseudo-label ops (once per namespace)."""
    torch.library.register_fake(f"{namespace}::entropy_pseudo_labels", _entropy_pseudo_labels_fake)
    torch.library.register_fake(f"{namespace}::entropy_pseudo_labels_", _entropy_pseudo_labels_in_place_fake)
    torch.library.register_fake(f"{namespace}::entropy_histogram", _entropy_histogram_fake)
