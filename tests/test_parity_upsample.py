"""size=: the logit losses of bilinearly upsampled logits (MATH.md#upsampling), every backend against
the reference (F.interpolate, then the loss) on float64 copies: values and dL/dx at the logits' own
resolution, every ce x kd x reduction, odd sizes (h or w of 1, H not a multiple of h, factors 4 to
32), ignored pixels, masks, alpha != 1, random upstream gradients, and low-precision dtypes."""

import itertools

import pytest
import torch
from parity_support import ONE_HOT_ALPHA, RTOL, device_for, interpreted, one_hot_teacher

import incseg_fast as isf
from incseg_fast import _backends, losses, reference
from incseg_fast.vocabulary import CE_MODES, KD_MODES, REDUCTIONS

IGNORE = 255

# (h, w) of x, (h', w') of y, and the output (H, W): factors from 1 to 32, odd and non-multiple sizes.
SHAPES = {
    "odd": ((3, 5), (4, 6), (29, 41)),
    "h_and_w_of_1": ((1, 4), (2, 1), (17, 64)),
    "factor_4_and_32": ((2, 2), (2, 2), (8, 64)),
    "y_at_output_resolution": ((5, 3), (11, 13), (11, 13)),
}
# Several row bands with carry rows, and output rows wider than one CPU tile (512 pixels).
WIDE = ((9, 20), (5, 7), (40, 600))


def _inputs(generator, shape, *, batch=2, channels=6, old_classes=3, dtype=torch.float32):
    (h, w), (yh, yw), (H, W) = shape
    x = (3 * torch.randn((batch, channels, h, w), generator=generator, dtype=torch.float64)).to(dtype)
    y = (2 * torch.randn((batch, old_classes, yh, yw), generator=generator, dtype=torch.float64)).to(dtype)
    t = torch.randint(0, channels, (batch, H, W), generator=generator)
    t = torch.where(torch.rand((batch, H, W), generator=generator) < 0.2, torch.full_like(t, IGNORE), t)
    mask = torch.rand((batch, H, W), generator=generator, dtype=torch.float64)
    gamma = 0.2 + 2 * torch.rand((batch,), generator=generator, dtype=torch.float64)
    return x, y, t, mask, gamma, (H, W)


def _assert_close(actual, expected, rtol, what):
    """|actual - expected| <= rtol * max|expected|, on a reference that is not identically zero."""
    assert actual.shape == expected.shape, f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    actual = actual.detach().to(device="cpu", dtype=torch.float64)
    expected = expected.detach().to(device="cpu", dtype=torch.float64)
    assert torch.isfinite(actual).all(), f"{what}: non-finite values"
    scale = expected.abs().max().item()
    assert scale > 0, f"{what}: the reference is zero, the test would prove nothing"
    error = (actual - expected).abs().max().item()
    assert error <= rtol * scale, f"{what}: max error {error:.3e} > {rtol:.0e} * scale {scale:.3e}"


def _contract(backend, generator, shape, *, ce, kd, reduction, dtype=torch.float32, with_mask=True, one_hot=False):
    """The backend's logit_losses with size= against the reference's on float64 copies (with one_hot,
    parity_support's one-hot teacher at |alpha * y| ~ 1e4)."""
    x, y, t, mask, gamma, size = _inputs(generator, shape, dtype=dtype)
    alpha = 0.7
    if one_hot:
        y, alpha = one_hot_teacher(y), ONE_HOT_ALPHA
    device = device_for(backend)
    acc = torch.float64 if dtype == torch.float64 else torch.float32
    modes = dict(old_classes=y.shape[1], ce=ce, kd=kd, alpha=alpha, ignore_index=IGNORE, reduction=reduction)

    def run(module, x, y, gamma, mask, device, float_dtype):
        return module.logit_losses(
            x,
            t.to(device) if ce != "none" else None,
            y.to(device=device, dtype=float_dtype) if kd != "none" else None,
            gamma.to(device=device, dtype=acc if float_dtype != torch.float64 else float_dtype)
            if kd == "balanced"
            else None,
            mask.to(device=device, dtype=acc if float_dtype != torch.float64 else float_dtype)
            if with_mask and kd != "none"
            else None,
            size=size,
            **modes,
        )

    xb = x.to(device).clone().requires_grad_()
    outputs = run(_backends.resolve(backend, xb.device), xb, y, gamma, mask, device, dtype)
    xr = x.detach().to(torch.float64).clone().requires_grad_()
    expected = run(reference, xr, y, gamma, mask, "cpu", torch.float64)
    upstream = [torch.randn(e.shape, generator=generator, dtype=torch.float64) for e in expected]
    rtol = RTOL[dtype]
    for name, out, ref, mode in zip(("ce", "kd"), outputs, expected, (ce, kd), strict=True):
        assert out.dtype == acc
        if mode == "none":
            assert out.abs().max().item() == 0.0
        else:
            _assert_close(out, ref, rtol, f"{name} loss ({ce}, {kd}, {reduction})")
    sum((o * u.to(device=device, dtype=o.dtype)).sum() for o, u in zip(outputs, upstream, strict=True)).backward()
    sum((e * u).sum() for e, u in zip(expected, upstream, strict=True)).backward()
    assert xb.grad.shape == x.shape and xb.grad.dtype == dtype
    _assert_close(xb.grad, xr.grad, rtol, f"dL/dx ({ce}, {kd}, {reduction})")
    return xb.grad


@pytest.mark.parametrize("ce,kd,reduction", list(itertools.product(CE_MODES, KD_MODES, REDUCTIONS)))
def test_every_mode(backend, generator, ce, kd, reduction):
    if ce == "none" and kd == "none":
        pytest.skip("no loss: nothing to compare")
    _contract(backend, generator, SHAPES["odd"], ce=ce, kd=kd, reduction=reduction)


@pytest.mark.parametrize("shape", list(SHAPES), ids=list(SHAPES))
@pytest.mark.parametrize("ce,kd", [("unbiased", "balanced"), ("plain", "plain"), ("unbiased", "unbiased")])
def test_odd_sizes(backend, generator, shape, ce, kd):
    _contract(backend, generator, SHAPES[shape], ce=ce, kd=kd, reduction="none")


@pytest.mark.parametrize("kd", ["unbiased", "balanced", "plain"])
def test_one_hot_teacher_at_large_scaled_logits(backend, generator, kd):
    _contract(backend, generator, SHAPES["odd"], ce="unbiased", kd=kd, reduction="none", one_hot=True)


def test_wide_rows_and_row_bands(backend, generator):
    if interpreted(backend):
        pytest.skip("too large for the Triton interpreter")
    for reduction in ("mean", "none"):
        _contract(backend, generator, WIDE, ce="unbiased", kd="balanced", reduction=reduction)


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_dtypes(backend, generator, dtype, reduction):
    _contract(backend, generator, SHAPES["odd"], ce="unbiased", kd="unbiased", reduction=reduction, dtype=dtype)
    _contract(backend, generator, SHAPES["odd"], ce="plain", kd="plain", reduction=reduction, dtype=dtype)


def test_cpu_result_does_not_depend_on_the_thread_count(generator):
    """The CPU backward gathers each element of dL/dx in one fixed order (bands fixed by the shapes)."""
    if _backends.unavailable_reason("cpu") is not None:
        pytest.skip("the compiled extension is not built")
    results = []
    before = torch.get_num_threads()
    try:
        for threads in (1, 2, 3):
            torch.set_num_threads(threads)
            x, y, t, mask, _, size = _inputs(torch.Generator().manual_seed(7), WIDE)
            x.requires_grad_()
            ce, kd = isf.incremental_loss(x, t, y, old_classes=3, kd="balanced", mask=mask, size=size, backend="cpu")
            (ce + 0.3 * kd).backward()
            results.append((ce.detach(), kd.detach(), x.grad))
    finally:
        torch.set_num_threads(before)
    for other in results[1:]:
        for a, b in zip(results[0], other, strict=True):
            assert torch.equal(a, b)


# ---------------------------------------------------------------------------------------------
# The public API and the drop-in modules
# ---------------------------------------------------------------------------------------------


def _as_reference_input(value):
    """A float64 CPU copy of a floating tensor, a CPU copy of any other tensor, other values as they are."""
    if not torch.is_tensor(value):
        return value
    return value.cpu().double() if value.is_floating_point() else value.cpu()


def test_public_functions(backend, generator):
    device = device_for(backend)
    x, y, t, mask, _, size = _inputs(generator, SHAPES["odd"])
    x, y, t, mask = x.to(device), y.to(device), t.to(device), mask.to(device)
    calls = {
        "unbiased_cross_entropy": ((x, t, 3), dict(reduction="sum")),
        "knowledge_distillation": ((x, y), dict(alpha=0.8, mask=mask)),
        "unbiased_knowledge_distillation": ((x, y), dict(reduction="none")),
        "balanced_knowledge_distillation": ((x, y), dict(mask=mask > 0.3)),
        "incremental_loss": ((x, t, y), dict(old_classes=3, kd="balanced", alpha=1.3)),
    }
    for name, (args, kwargs) in calls.items():
        ours = getattr(isf, name)(*args, size=size, backend=backend, **kwargs)
        ref_args = [_as_reference_input(a) for a in args]
        ref_kwargs = {k: _as_reference_input(v) for k, v in kwargs.items()}
        expected = getattr(reference, name)(*ref_args, size=size, **ref_kwargs)
        pairs = zip(*((v if isinstance(v, tuple) else (v,)) for v in (ours, expected)), strict=True)
        for o, e in pairs:
            _assert_close(o, e, RTOL[torch.float32], name)


def test_drop_in_modules(backend, generator):
    device = device_for(backend)
    x, y, t, mask, _, size = _inputs(generator, SHAPES["odd"])
    x, y, t = x.to(device), y.to(device), t.to(device)
    ce = losses.UnbiasedCrossEntropy(old_cl=3, backend=backend)(x, t, size=size)
    _assert_close(ce, reference.unbiased_cross_entropy(x.double().cpu(), t.cpu(), 3, size=size), 1e-5, "UNCE")
    kd = losses.UnbiasedKnowledgeDistillationLoss(alpha=0.5, backend=backend)(x, y, size=size)
    expected = reference.unbiased_knowledge_distillation(x.double().cpu(), y.double().cpu(), alpha=0.5, size=size)
    _assert_close(kd, expected, 1e-5, "UNKD")
    with pytest.raises(ValueError, match="targets"):
        losses.UnbiasedCrossEntropy(old_cl=3, backend=backend)(x, t[:, :-1], size=size)


def test_gamma_comes_from_the_teacher_as_given(generator):
    """BKD's gamma is the softmax-mass ratio of the spatial mean of y at y's own resolution. For an
    integer factor the mean of the upsampled y is the same (every sample's weights sum to the factor);
    otherwise the border samples weigh slightly differently, and so does gamma: the API uses the former."""
    x, y, _, _, _, size = _inputs(generator, SHAPES["odd"], dtype=torch.float64)
    low = reference.balanced_log_gamma(y).exp()
    high = reference.balanced_log_gamma(reference.upsample(y, size)).exp()
    assert (low - high).abs().max().item() > 1e-5 * low.abs().max().item()
    integer_factor = reference.balanced_log_gamma(reference.upsample(y, (4 * y.shape[2], 8 * y.shape[3]))).exp()
    torch.testing.assert_close(integer_factor, low, rtol=1e-12, atol=0)
    for backend in ("reference", "cpu"):
        if _backends.unavailable_reason(backend) is not None:
            continue
        ours = isf.balanced_knowledge_distillation(x, y, size=size, backend=backend)
        with_low = reference.balanced_knowledge_distillation(x, y, size=size, gamma=low)
        with_high = reference.balanced_knowledge_distillation(x, y, size=size, gamma=high)
        assert abs(ours.item() - with_low.item()) <= 1e-10 * abs(with_low.item())
        assert abs(with_low.item() - with_high.item()) > 1e-8 * abs(with_low.item())


# ---------------------------------------------------------------------------------------------
# Errors name the argument; the op itself checks too
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "size,match",
    [
        ((29, -1), "size"),
        ((0, 41), "size"),
        ((2, 41), "downsampling"),
        ((29,), "size"),
        ("29x41", "size"),
        ((29.0, 41), "size"),
    ],
)
def test_bad_size(generator, size, match):
    x, y, t, _, _, _ = _inputs(generator, SHAPES["odd"])
    with pytest.raises((ValueError, TypeError), match=match):
        isf.incremental_loss(x, t, y, old_classes=3, size=size, backend="reference")


def test_inconsistent_shapes_name_the_argument(generator):
    x, y, t, mask, _, size = _inputs(generator, SHAPES["odd"])
    with pytest.raises(ValueError, match=r"^t must have shape \(B, H, W\) = \(2, 29, 41\)"):
        isf.incremental_loss(x, t[:, :-1], y, old_classes=3, size=size)
    with pytest.raises(ValueError, match="^mask must have shape"):
        isf.knowledge_distillation(x, y, mask=mask[:, :, :-1], size=size)
    with pytest.raises(ValueError, match="^y must have a resolution"):
        isf.knowledge_distillation(x, torch.randn(2, 3, 30, 5), size=size)
    with pytest.raises(ValueError, match="^y must have x's batch size"):
        isf.knowledge_distillation(x, y[:1], size=size)


def test_op_checks_size(generator):
    if _backends.unavailable_reason("cpu") is not None:
        pytest.skip("the compiled extension is not built")
    x, y, t, _, _, (H, W) = _inputs(generator, SHAPES["odd"])
    modes = dict(old_classes=3, ce="unbiased", kd="plain", alpha=1.0, ignore_index=IGNORE, reduction="mean")
    op = torch.ops.incseg_fast.logit_losses_fwd
    for size, match in (([2, W], "downsampling"), ([H, 0], "size"), ([H], "size")):
        with pytest.raises(ValueError, match=match):
            op(x, t, y, None, None, size=size, **modes)
    with pytest.raises(ValueError, match="target must be"):
        op(x, t[:, :-1], y, None, None, size=[H, W], **modes)
    with pytest.raises(ValueError, match="y must have a resolution"):
        op(x, t, torch.randn(2, 3, H + 1, 5), None, None, size=[H, W], **modes)


NAMESPACES = {"cpu": "incseg_fast", "cuda": "incseg_fast", "triton": "incseg_fast_triton"}


def test_opcheck(backend, generator):
    """Schema, fake kernel (shapes from size), autograd registration, for the op with size=."""
    namespace = NAMESPACES.get(backend, "incseg_fast_cuda_emulator")
    if backend == "triton":
        isf._backends.resolve("triton", torch.device(device_for(backend)))  # registers the Triton kernels
    device = device_for(backend)
    x, y, t, mask, gamma, size = _inputs(generator, ((2, 3), (3, 2), (7, 9)))
    x, y, t, mask, gamma = x.to(device), y.to(device), t.to(device), mask.float().to(device), gamma.float().to(device)
    ops = getattr(torch.ops, namespace)
    for reduction in ("mean", "none"):
        modes = dict(
            old_classes=3,
            ce="unbiased",
            kd="balanced",
            alpha=0.8,
            ignore_index=IGNORE,
            reduction=reduction,
            size=list(size),
        )
        args = (x.requires_grad_(), t, y, gamma, mask)
        torch.library.opcheck(ops.logit_losses_fwd.default, args, modes)
        ce, kd, stats, count = ops.logit_losses_fwd(*args, **modes)
        assert stats.shape == (2, 4, *size) and ce.shape == ((2, *size) if reduction == "none" else ())
        grads = (torch.randn_like(ce), torch.randn_like(kd))
        torch.library.opcheck(
            ops.logit_losses_bwd.default, (*grads, x.detach(), t, y, gamma, mask, stats, count), modes
        )
