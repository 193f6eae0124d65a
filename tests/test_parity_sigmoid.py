"""The sigmoid losses with composed targets (MATH.md#sigmoid-losses): the reference against SSUL's and
DKD's losses written the way their code computes them (dense one-hot targets, BCEWithLogitsLoss), and
every fused backend against the reference on fresh random inputs.

The "as they do" formulations below are ours, written from the two papers' published training code:
SSUL (clovaai/SSUL: utils/loss.py BCEWithLogitsLossWithIgnoreIndex, main.py's pseudo-labelling) and
DKD (cvlab-yonsei/DKD: models/loss.py WBCELoss, KDLoss, ACLoss and trainer_voc.py's combination).
"""

import pytest
import torch
import torch.nn.functional as F

from incseg_fast import reference

IGNORE = 255


def _assert_close(actual, expected, rtol, what):
    actual = actual.detach().to(device="cpu", dtype=torch.float64)
    expected = expected.detach().to(device="cpu", dtype=torch.float64)
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    assert torch.isfinite(actual).all(), f"{what}: non-finite values"
    scale = expected.abs().max().item()
    error = (actual - expected).abs().max().item()
    assert error <= rtol * scale, f"{what}: max error {error:.3e} > {rtol:.0e} * scale {scale:.3e}"


def _labels(generator, shape, classes, ignore_fraction=0.2):
    """Labels drawn from ``classes`` (a list), with about ignore_fraction ignored pixels."""
    choice = torch.randint(0, len(classes), shape, generator=generator)
    labels = torch.tensor(classes)[choice]
    ignored = torch.rand(shape, generator=generator) < ignore_fraction
    return torch.where(ignored, torch.full_like(labels, IGNORE), labels)


# ---------------------------------------------------------------------------------------------
# SSUL, as its code computes it
# ---------------------------------------------------------------------------------------------


def ssul_pseudo_labels(labels, old_logits, *, fg_idx, threshold):
    """main.py: a background (or unknown) pixel takes the old model's confident foreground class."""
    scores, predicted = torch.max(torch.sigmoid(old_logits), dim=1)
    return torch.where((labels <= fg_idx) & (predicted > fg_idx) & (scores >= threshold), predicted, labels)


def ssul_bce(inputs, labels, reduction):
    """utils/loss.py's BCE with ignore index: one-hot with an extra class for ignored pixels, dropped."""
    C = inputs.shape[1]
    with_ignore_class = torch.where(labels != IGNORE, labels, torch.full_like(labels, C))
    targets = F.one_hot(with_ignore_class, C + 1).to(inputs.dtype).permute(0, 3, 1, 2)[:, :C]
    loss = F.binary_cross_entropy_with_logits(inputs, targets, reduction="none").sum(dim=1)
    has_positive = targets.sum(dim=1) != 0
    if reduction == "mean":
        return torch.masked_select(loss, has_positive).mean()
    if reduction == "sum":
        return torch.masked_select(loss, has_positive).sum()
    return loss * targets.sum(dim=1)


# ---------------------------------------------------------------------------------------------
# DKD, as its code computes it (channel 0: the auxiliary "unknown" classifier; class c: channel c)
# ---------------------------------------------------------------------------------------------


def dkd_terms(logit, logit_old, label, *, n_old, pos_weight):
    """trainer_voc.py's step t > 0: (WBCE, KD, AC), each a per-channel mean over N, H, W, summed."""
    n_new = logit.shape[1] - 1 - n_old
    new_logit = logit[:, -n_new:]
    target = torch.zeros_like(new_logit)
    for cls in label.unique():
        if int(cls) in (0, IGNORE):
            continue
        target[:, int(cls) - (n_old + 1)] = (label == int(cls)).to(target.dtype)
    weights = torch.full((n_new,), float(pos_weight), dtype=logit.dtype)
    N, C, H, W = new_logit.shape
    wbce = torch.nn.BCEWithLogitsLoss(pos_weight=weights, reduction="none")(
        new_logit.permute(0, 2, 3, 1).reshape(-1, C), target.permute(0, 2, 3, 1).reshape(-1, C)
    )
    wbce = wbce.reshape(N, H, W, C).permute(0, 3, 1, 2).mean(dim=[0, 2, 3])
    kd = torch.nn.BCEWithLogitsLoss(reduction="none")(logit[:, 1 : n_old + 1], logit_old[:, 1:].sigmoid())
    ac = torch.nn.BCEWithLogitsLoss(reduction="none")(logit[:, 0:1], torch.zeros_like(logit[:, 0:1]))
    return wbce.sum(), kd.mean(dim=[0, 2, 3]).sum(), ac.mean(dim=[0, 2, 3]).sum()


def _reference(x, t, y, **options):
    defaults = dict(
        negative_channels=0,
        label_channels_from=0,
        pseudo_threshold=None,
        pseudo_background=1,
        ignore_index=IGNORE,
        ignored_pixels="skip",
        reduction="mean",
        size=None,
        pos_weight=None,
        channel_weight=None,
    )
    defaults.update(options)
    pos_weight, channel_weight = defaults.pop("pos_weight"), defaults.pop("channel_weight")
    return reference.sigmoid_losses(x, t, y, pos_weight, channel_weight, **defaults)


@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
@pytest.mark.parametrize("unknown", [False, True])
def test_reference_is_ssul(generator, reduction, unknown):
    """SSUL's loss with its pseudo-labels (and with its 'unknown' channel: fg_idx = 1)."""
    B, C, Co, H, W = 2, 8, 6, 9, 11
    fg_idx = 1 if unknown else 0
    x = 3 * torch.randn((B, C, H, W), generator=generator, dtype=torch.float64)
    y = 3 * torch.randn((B, Co, H, W), generator=generator, dtype=torch.float64)
    t = _labels(generator, (B, H, W), list(range(fg_idx + 1)) * 3 + list(range(Co, C)))
    pseudo = ssul_pseudo_labels(t, y, fg_idx=fg_idx, threshold=0.7)
    assert (pseudo != t).any() and (pseudo == t).any(), "the inputs must exercise both branches"
    expected = ssul_bce(x, pseudo, reduction)
    label, soft, negative = _reference(x, t, y, pseudo_threshold=0.7, pseudo_background=fg_idx + 1, reduction=reduction)
    _assert_close(label, expected, 1e-12, "SSUL")
    assert soft.abs().max() == 0 and negative.abs().max() == 0


def test_reference_is_ssul_upsampled(generator):
    """Both models' logits upsampled to the labels' resolution first, as SSUL's network does."""
    B, C, Co, H, W = 2, 6, 4, 13, 17
    x = torch.randn((B, C, 5, 6), generator=generator, dtype=torch.float64)
    y = 3 * torch.randn((B, Co, 4, 7), generator=generator, dtype=torch.float64)
    t = _labels(generator, (B, H, W), [0, 0, 4, 5])
    up = dict(size=(H, W), mode="bilinear", align_corners=False)
    expected = ssul_bce(
        F.interpolate(x, **up), ssul_pseudo_labels(t, F.interpolate(y, **up), fg_idx=0, threshold=0.6), "mean"
    )
    label, _, _ = _reference(x, t, y, pseudo_threshold=0.6, size=(H, W))
    _assert_close(label, expected, 1e-12, "SSUL with size=")


@pytest.mark.parametrize("pos_weight", [1.0, 2.5])
@pytest.mark.parametrize("upsampled", [False, True])
def test_reference_is_dkd(generator, pos_weight, upsampled):
    """DKD's three logit terms: WBCE on the new channels, KD on the old ones, AC on channel 0."""
    B, n_old, n_new, H, W = 2, 5, 3, 9, 11
    C, Co = 1 + n_old + n_new, 1 + n_old
    low = (5, 6) if upsampled else (H, W)
    x = 3 * torch.randn((B, C, *low), generator=generator, dtype=torch.float64)
    y = 3 * torch.randn((B, Co, *low), generator=generator, dtype=torch.float64)
    t = _labels(generator, (B, H, W), [0] + list(range(Co, C)))
    up = dict(size=(H, W), mode="bilinear", align_corners=False)
    xu, yu = (F.interpolate(x, **up), F.interpolate(y, **up)) if upsampled else (x, y)
    expected = dkd_terms(xu, yu, t, n_old=n_old, pos_weight=pos_weight)
    weights = torch.ones(C, dtype=torch.float64)
    weights[Co:] = pos_weight
    actual = _reference(
        x,
        t,
        y,
        negative_channels=1,
        label_channels_from=Co,
        ignored_pixels="negative",
        pos_weight=weights,
        size=(H, W) if upsampled else None,
    )
    for name, a, e in zip(("WBCE", "KD", "AC"), actual, expected, strict=True):
        _assert_close(a, e, 1e-12, f"DKD {name}")


def test_reference_gradient_is_bce(generator):
    """dL/dx of the reference equals torch's BCE-with-logits gradient with weights (MATH.md#sigmoid-bce)."""
    B, C, H, W = 2, 5, 7, 6
    x = (4 * torch.randn((B, C, H, W), generator=generator, dtype=torch.float64)).requires_grad_()
    y = torch.randn((B, 3, H, W), generator=generator, dtype=torch.float64)
    t = _labels(generator, (B, H, W), [0, 3, 4])
    pos = 0.5 + torch.rand(C, generator=generator, dtype=torch.float64)
    channel = 0.5 + torch.rand(C, generator=generator, dtype=torch.float64)
    label, soft, negative = _reference(
        x, t, y, negative_channels=1, label_channels_from=3, pos_weight=pos, channel_weight=channel, reduction="sum"
    )
    (label + 2 * soft - 3 * negative).backward()
    targets = torch.zeros_like(x)
    targets[:, 1:3] = torch.sigmoid(y[:, 1:3])
    valid = t != IGNORE
    for c in (3, 4):
        targets[:, c] = (t == c).to(x.dtype)
    term_scale = torch.tensor([-3.0, 2.0, 2.0, 1.0, 1.0], dtype=torch.float64).view(1, -1, 1, 1)
    pixel_scale = torch.ones_like(x)
    pixel_scale[:, 3:] = valid.unsqueeze(1).to(x.dtype)
    p = torch.sigmoid(x.detach())
    expected = channel.view(1, -1, 1, 1) * (pos.view(1, -1, 1, 1) * targets * (p - 1) + (1 - targets) * p)
    _assert_close(x.grad, expected * term_scale * pixel_scale, 1e-12, "dL/dx")
