"""Segmentation metrics from one confusion matrix (DATA.md#protocol)."""

import torch

__all__ = ["ConfusionMatrix"]


def _mean_percent(values):
    return float(values.mean()) * 100.0 if values.numel() else None


class ConfusionMatrix:
    """Accumulates a (num_classes, num_classes) matrix, rows = ground truth, columns = prediction.

    Pixels whose target is `ignore_index` are skipped. The matrix stays on the device of the
    first update (int64 counts, exact for any dataset size).
    """

    def __init__(self, num_classes, ignore_index=255):
        if not isinstance(num_classes, int) or isinstance(num_classes, bool) or num_classes < 1:
            raise ValueError(f"num_classes must be a positive int, got {num_classes!r}")
        if not isinstance(ignore_index, int) or isinstance(ignore_index, bool):
            raise TypeError(f"ignore_index must be an int, got {type(ignore_index).__name__}")
        if 0 <= ignore_index < num_classes:
            raise ValueError(f"ignore_index ({ignore_index}) must not be a class id in [0, {num_classes})")
        self.num_classes = num_classes
        self.ignore_index = ignore_index
        self.matrix = torch.zeros(num_classes, num_classes, dtype=torch.long)

    def reset(self):
        self.matrix.zero_()

    def update(self, pred, target):
        """Adds a batch: `pred` and `target` integer tensors of the same shape (e.g. (B, H, W))."""
        for name, tensor in (("pred", pred), ("target", target)):
            if not isinstance(tensor, torch.Tensor):
                raise TypeError(f"{name} must be a torch.Tensor, got {type(tensor).__name__}")
            if tensor.dtype.is_floating_point or tensor.dtype.is_complex or tensor.dtype == torch.bool:
                raise TypeError(f"{name} must be an integer tensor of class ids, got {tensor.dtype}")
        if pred.shape != target.shape:
            raise ValueError(f"pred {tuple(pred.shape)} and target {tuple(target.shape)} must have the same shape")
        n = self.num_classes
        target = target.reshape(-1).long()
        pred = pred.reshape(-1).long().to(target.device)
        valid = target != self.ignore_index
        target, pred = target[valid], pred[valid]
        if target.numel() and (target.min() < 0 or target.max() >= n):
            raise ValueError(f"target holds ids outside [0, {n}) other than ignore_index={self.ignore_index}")
        if pred.numel() and (pred.min() < 0 or pred.max() >= n):
            raise ValueError(f"pred holds ids outside [0, {n}) at non-ignored pixels")
        counts = torch.bincount(target * n + pred, minlength=n * n).reshape(n, n)
        if self.matrix.device != counts.device:
            self.matrix = self.matrix.to(counts.device)
        self.matrix += counts

    def compute(self, old_classes):
        """Metrics in percent. IoU is None for a class that never occurs (neither in the ground
        truth nor in the predictions); mIoUs average the classes that occur: "old" the ids below
        `old_classes` (the step-0 classes, background included), "new" the rest. A group with no
        occurring class gives None."""
        if not isinstance(old_classes, int) or isinstance(old_classes, bool):
            raise TypeError(f"old_classes must be an int, got {type(old_classes).__name__}")
        if not 0 <= old_classes <= self.num_classes:
            raise ValueError(f"old_classes must be in [0, {self.num_classes}], got {old_classes}")
        mat = self.matrix.double().cpu()
        tp = mat.diagonal()
        gt = mat.sum(1)
        union = gt + mat.sum(0) - tp
        occurs = union > 0
        iou = torch.where(occurs, tp / union.clamp(min=1), torch.zeros_like(tp))
        is_old = torch.arange(self.num_classes) < old_classes
        total = mat.sum()
        present = gt > 0
        return {
            "iou": [float(v) * 100.0 if o else None for v, o in zip(iou, occurs.tolist(), strict=True)],
            "miou_all": _mean_percent(iou[occurs]),
            "miou_old": _mean_percent(iou[occurs & is_old]),
            "miou_new": _mean_percent(iou[occurs & ~is_old]),
            "mpa": float(tp.sum() / total) * 100.0 if total > 0 else None,
            "mca": _mean_percent(tp[present] / gt[present]),
        }
