"""The sigmoid losses with composed targets (MATH.md#sigmoid-losses): the reference against SSUL's and
DKD's losses written the way their code computes them (dense one-hot targets, BCEWithLogitsLoss:
incseg_fast/bench/sigmoid_papers.py, ours, written from SSUL's utils/loss.py and main.py and DKD's
models/loss.py and trainer), and every fused backend against the reference on fresh random inputs.
"""

import pytest
import torch
import torch.nn.functional as F
from parity_support import RTOL, device_for

import incseg_fast as isf
from incseg_fast import reference
from incseg_fast.bench.sigmoid_papers import dkd_terms, ssul_bce, ssul_pseudo_labels

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


# ---------------------------------------------------------------------------------------------
# Every backend against the float64 reference
# ---------------------------------------------------------------------------------------------


def _parity(backend, x, t, y, generator, **options):
    """isf.sigmoid_losses on ``backend`` against the reference on float64 copies: the three losses and
    dL/dx for random upstream gradients."""
    device = device_for(backend)
    rtol = RTOL[x.dtype]
    xb = x.to(device).requires_grad_()
    moved = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in options.items()}
    outputs = isf.sigmoid_losses(
        xb, None if t is None else t.to(device), None if y is None else y.to(device), backend=backend, **moved
    )
    xr = x.detach().to(torch.float64).requires_grad_()
    expected = isf.sigmoid_losses(xr, t, None if y is None else y.to(torch.float64), backend="reference", **options)
    upstream = [torch.randn(e.shape, generator=generator, dtype=torch.float64) for e in expected]
    accumulation = torch.float64 if x.dtype == torch.float64 else torch.float32
    for name, out, ref in zip(("label", "soft", "negative"), outputs, expected, strict=True):
        assert out.dtype == accumulation, f"{name}: dtype {out.dtype}"
        _assert_close(out, ref, rtol, f"{name} loss")
    sum((o * u.to(device=device, dtype=o.dtype)).sum() for o, u in zip(outputs, upstream, strict=True)).backward()
    sum((r * u).sum() for r, u in zip(expected, upstream, strict=True)).backward()
    assert xb.grad.dtype == x.dtype and xb.grad.shape == x.shape
    _assert_close(xb.grad, xr.grad, rtol, "dL/dx")


def _inputs(
    generator, *, B=2, C=9, Co=6, H=11, W=13, low=None, y_low=None, dtype=torch.float32, classes=None, scale=3.0
):
    low = low or (H, W)
    x = (scale * torch.randn((B, C, *low), generator=generator, dtype=torch.float64)).to(dtype)
    y = (scale * torch.randn((B, Co, *(y_low or low)), generator=generator, dtype=torch.float64)).to(dtype)
    t = _labels(generator, (B, H, W), classes if classes is not None else list(range(C)))
    return x, t, y


def _weights(generator, C):
    return 0.5 + 2 * torch.rand(C, generator=generator, dtype=torch.float64)


DTYPES = [torch.float32, torch.float64, torch.bfloat16, torch.float16]


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_ssul_parity(backend, generator, dtype, reduction):
    """SSUL's form: every channel label-supervised, pseudo-labels, ignored pixels skipped."""
    x, t, y = _inputs(generator, dtype=dtype, classes=[0, 1, 0, 1, 6, 7, 8])
    _parity(
        backend,
        x,
        t,
        y,
        generator,
        pseudo_threshold=0.6,
        pseudo_background=2,
        pos_weight=_weights(generator, 9),
        channel_weight=_weights(generator, 9),
        reduction=reduction,
    )


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("reduction", ["mean", "sum", "none"])
def test_dkd_parity(backend, generator, dtype, reduction):
    """DKD's form: a negative channel, soft targets on the old classes, labels on the new ones,
    ignored pixels as negatives."""
    x, t, y = _inputs(generator, dtype=dtype, classes=[0, 6, 7, 8])
    _parity(
        backend,
        x,
        t,
        y,
        generator,
        negative_channels=1,
        label_channels_from=6,
        pos_weight=_weights(generator, 9),
        channel_weight=_weights(generator, 9),
        ignored_pixels="negative",
        reduction=reduction,
    )


@pytest.mark.parametrize("label_dtype", [torch.int32, torch.uint8])
@pytest.mark.parametrize("ignored_pixels", ["skip", "negative"])
def test_every_term_and_label_dtype(backend, generator, label_dtype, ignored_pixels):
    """Soft targets and pseudo-labels together, all three terms, narrow label dtypes."""
    x, t, y = _inputs(generator, C=8, Co=5, H=7, W=9)
    _parity(
        backend,
        x,
        t.to(label_dtype),
        y,
        generator,
        negative_channels=2,
        label_channels_from=4,
        pseudo_threshold=0.5,
        ignored_pixels=ignored_pixels,
        reduction="mean",
    )


@pytest.mark.parametrize("reduction", ["mean", "none"])
@pytest.mark.parametrize("form", ["ssul", "dkd"])
def test_upsampled_parity(backend, generator, reduction, form):
    """size= at non-integer scales, x and y each at its own resolution."""
    x, t, y = _inputs(generator, H=29, W=41, low=(5, 7), y_low=(4, 9))
    options = (
        dict(pseudo_threshold=0.6)
        if form == "ssul"
        else dict(negative_channels=1, label_channels_from=6, ignored_pixels="negative")
    )
    _parity(backend, x, t, y, generator, size=(29, 41), pos_weight=1.7, reduction=reduction, **options)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_extreme_logits(backend, generator, dtype):
    """Logits and teacher logits at ±80: softplus and the sigmoid stay finite and exact."""
    x, t, y = _inputs(generator, dtype=dtype)
    x = (80 * torch.sign(x.double())).to(dtype)
    y = (80 * torch.sign(y.double())).to(dtype)
    _parity(backend, x, t, y, generator, negative_channels=1, label_channels_from=4, reduction="sum")


def test_all_pixels_ignored_mean_is_zero(backend, generator):
    """MATH.md#sigmoid-reductions: the label mean over no counted pixel is 0, with a zero gradient."""
    x, t, _ = _inputs(generator, H=3, W=5)
    t = torch.full_like(t, IGNORE)
    xb = x.to(device_for(backend)).requires_grad_()
    label, _, _ = isf.sigmoid_losses(xb, t.to(xb.device), backend=backend)
    label.backward()
    assert label.item() == 0.0 and xb.grad.abs().max().item() == 0.0
