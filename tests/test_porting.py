"""docs/PORTING.md, step by step: a MiB-style training loop ported as the guide says trains the
same model as the unported loop.

The unported loop is the MiB pattern written here in plain PyTorch: the model upsamples its
logits to the image size inside ``forward``, both models' logits are upsampled, and the losses
(the reference path's, the math of MiB's) take the full-resolution logits, cross-entropy with
``reduction="none"`` and ``.mean()``. The ported loop changes what the guide changes: the import,
``upsample=False`` and ``size=`` in training, nothing in validation.
"""

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from incseg_fast import reference
from incseg_fast.losses import UnbiasedCrossEntropy, UnbiasedKnowledgeDistillationLoss

IGNORE = 255
OLD_CLASSES, CLASSES = 4, 6


class TinySegmenter(nn.Module):
    """A network at output stride 4 that, like MiB's IncrementalSegmentationModule, upsamples its
    logits to the image size in ``forward`` (PORTING.md, step 2: ``upsample=False`` skips it)."""

    def __init__(self, classes, seed):
        super().__init__()
        torch.manual_seed(seed)
        self.body = nn.Sequential(nn.Conv2d(3, 8, 3, stride=2, padding=1), nn.ReLU(), nn.Conv2d(8, 8, 3, stride=2))
        self.head = nn.Conv2d(8, classes, 1)

    def forward(self, images, upsample=True):
        logits = self.head(self.body(images))
        if upsample:
            logits = F.interpolate(logits, size=images.shape[-2:], mode="bilinear", align_corners=False)
        return logits


def _batches(steps, generator):
    for _ in range(steps):
        images = torch.randn(2, 3, 37, 41, generator=generator)
        labels = torch.randint(0, CLASSES, (2, 37, 41), generator=generator)
        labels[torch.rand(labels.shape, generator=generator) < 0.16] = IGNORE
        yield images, labels


def _unported_loss(model, old_model, images, labels):
    outputs = model(images)  # full resolution: upsampled inside forward
    with torch.no_grad():
        outputs_old = old_model(images)
    ce = reference.unbiased_cross_entropy(outputs, labels, OLD_CLASSES, ignore_index=IGNORE, reduction="none")
    kd = reference.unbiased_knowledge_distillation(outputs, outputs_old)
    return ce.mean() + 10 * kd


def _ported_loss(model, old_model, images, labels, criterion, lkd):
    outputs = model(images, upsample=False)  # the network's resolution: the losses upsample (size=)
    with torch.no_grad():
        outputs_old = old_model(images, upsample=False)
    size = labels.shape[-2:]
    return criterion(outputs, labels, size=size).mean() + 10 * lkd(outputs, outputs_old, size=size)


def _train(loss_of, steps=6):
    old_model = TinySegmenter(OLD_CLASSES, seed=1).eval()
    model = TinySegmenter(CLASSES, seed=2)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1, momentum=0.9)
    losses = []
    for images, labels in _batches(steps, torch.Generator().manual_seed(3)):
        loss = loss_of(model, old_model, images, labels)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    return model, losses


@pytest.mark.parametrize("backend", ["auto", "reference"])
def test_the_ported_loop_trains_the_unported_loop_s_model(backend, one_thread):
    criterion = UnbiasedCrossEntropy(old_cl=OLD_CLASSES, ignore_index=IGNORE, reduction="none", backend=backend)
    lkd = UnbiasedKnowledgeDistillationLoss(alpha=1.0, backend=backend)
    unported, unported_losses = _train(_unported_loss)
    ported, ported_losses = _train(lambda *args: _ported_loss(*args, criterion, lkd))
    assert ported_losses == pytest.approx(unported_losses, rel=1e-5)
    for name, parameter in ported.named_parameters():
        torch.testing.assert_close(parameter, dict(unported.named_parameters())[name], rtol=1e-4, atol=1e-6)

    # validation is unchanged: forward upsamples by default, and the argmax is at full resolution
    images, labels = next(_batches(1, torch.Generator().manual_seed(9)))
    with torch.no_grad():
        predicted = ported(images).argmax(1)
    assert predicted.shape == labels.shape
    assert (predicted == unported(images).argmax(1)).float().mean() > 0.99


def test_reduction_mean_divides_by_the_valid_pixels(one_thread):
    """MiB's reduction='none' then .mean() divides by every pixel; 'mean' by the non-ignored ones."""
    images, labels = next(_batches(1, torch.Generator().manual_seed(4)))
    logits = TinySegmenter(CLASSES, seed=2)(images, upsample=False)
    size = labels.shape[-2:]
    per_pixel = UnbiasedCrossEntropy(old_cl=OLD_CLASSES, reduction="none")(logits, labels, size=size)
    mean = UnbiasedCrossEntropy(old_cl=OLD_CLASSES, reduction="mean")(logits, labels, size=size)
    valid = (labels != IGNORE).float().mean()
    torch.testing.assert_close(mean * valid, per_pixel.mean())
    assert 1.1 < (mean / per_pixel.mean()).item() < 1.3  # about 16 % of the pixels are ignored


def test_plop_s_mask_makes_pixels_ignored(one_thread):
    images, labels = next(_batches(1, torch.Generator().manual_seed(5)))
    logits = TinySegmenter(CLASSES, seed=2)(images, upsample=False)
    mask = torch.rand(labels.shape, generator=torch.Generator().manual_seed(6)) < 0.3
    criterion = UnbiasedCrossEntropy(old_cl=OLD_CLASSES, reduction="none")
    ported = criterion(logits, labels, mask=mask, size=labels.shape[-2:])
    unported = reference.unbiased_cross_entropy(
        F.interpolate(logits, size=labels.shape[-2:], mode="bilinear", align_corners=False),
        labels.masked_fill(mask, IGNORE),
        OLD_CLASSES,
        reduction="none",
    )
    torch.testing.assert_close(ported, unported, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("backend", ["auto", "reference"])
def test_under_autocast_the_float32_teacher_goes_in_as_it_is(backend, one_thread):
    """MiB's loop (PORTING.md, step 4): the old model outside autocast (float32), the new one inside
    (bfloat16); the teacher's logits go to the losses uncast (MATH.md#teacher-dtype)."""
    old_model = TinySegmenter(OLD_CLASSES, seed=1).eval()
    model = TinySegmenter(CLASSES, seed=2)
    images, labels = next(_batches(1, torch.Generator().manual_seed(7)))
    criterion = UnbiasedCrossEntropy(old_cl=OLD_CLASSES, reduction="none", backend=backend)
    lkd = UnbiasedKnowledgeDistillationLoss(backend=backend)
    with torch.no_grad():
        outputs_old = old_model(images, upsample=False)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        outputs = model(images, upsample=False)
        size = labels.shape[-2:]
        loss = criterion(outputs, labels, size=size).mean()
        kd = lkd(outputs, outputs_old, size=size)
        loss = loss + 10 * kd
    loss.backward()
    full_precision = _unported_loss(copy.deepcopy(model), old_model, images, labels)
    assert outputs.dtype == torch.bfloat16 and outputs_old.dtype == torch.float32 and loss.dtype == torch.float32
    assert loss.item() == pytest.approx(full_precision.item(), rel=3e-2)
    # the float32 teacher as it is, not rounded to bfloat16: the reference on the same bfloat16 logits
    upsampled = (
        F.interpolate(v.double(), size=size, mode="bilinear", align_corners=False) for v in (outputs, outputs_old)
    )
    assert kd.item() == pytest.approx(reference.unbiased_knowledge_distillation(*upsampled).item(), rel=1e-4)
    assert all(torch.isfinite(p.grad).all() for p in model.parameters())
