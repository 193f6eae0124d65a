"""Behaviour of the CUDA kernels themselves, beyond the shared parity suites.

Runs on the CPU through the emulator (backend "cuda_emulator": the same kernel bodies, thread by
thread) and, where there is a GPU, on the GPU ("cuda"). The parity suites already compare every
mode, dtype and shape with the float64 reference; here: both load paths (16-byte packs and single
pixels), streaming log-sum-exp edge cases, determinism, and what a direct op call does with input
the public API would have rejected.
"""

import pytest
import torch

from incseg_fast import _backends, ops, reference
from incseg_fast.vocabulary import CUDA_EMULATOR, RTOL


@pytest.fixture(params=[CUDA_EMULATOR, "cuda"])
def device_ops(request):
    """(torch.ops namespace, device) of the CUDA kernels: emulated on the CPU, or on the GPU."""
    reason = _backends.unavailable_reason(request.param)
    if reason is not None:
        pytest.skip(reason)
    if request.param == "cuda":
        return torch.ops.incseg_fast, "cuda"
    return torch.ops.incseg_fast_cuda_emulator, "cpu"


def _inputs(generator, B=2, C=9, Co=5, H=8, W=8, dtype=torch.float32):
    x = (3 * torch.randn(B, C, H, W, generator=generator, dtype=torch.float64)).to(dtype)
    y = (2 * torch.randn(B, Co, H, W, generator=generator, dtype=torch.float64)).to(dtype)
    t = torch.randint(0, C, (B, H, W), generator=generator)
    t[torch.rand(B, H, W, generator=generator) < 0.2] = 255
    return x, y, t


def _run(ops_namespace, device, x, t, y, *, ce="unbiased", kd="unbiased", reduction="mean", old_classes=None):
    modes = dict(old_classes=old_classes or y.shape[1], ce=ce, kd=kd, alpha=0.9, ignore_index=255, reduction=reduction)
    x, t, y = x.to(device), t.to(device), y.to(device)
    ce_loss, kd_loss, stats, count = ops_namespace.logit_losses_fwd(x, t, y, None, None, **modes)
    shape = ce_loss.shape
    grad_ce = torch.linspace(0.5, 1.5, max(1, ce_loss.numel()), dtype=ce_loss.dtype, device=device).reshape(shape)
    grad_kd = torch.linspace(-1.0, 2.0, max(1, kd_loss.numel()), dtype=kd_loss.dtype, device=device).reshape(shape)
    grad_x = ops_namespace.logit_losses_bwd(grad_ce, grad_kd, x, t, y, None, None, stats, count, **modes)
    return ce_loss, kd_loss, grad_x, (grad_ce, grad_kd)


def _reference(x, t, y, upstream, *, ce="unbiased", kd="unbiased", reduction="mean"):
    x64 = x.double().requires_grad_()
    ce_loss, kd_loss = reference.logit_losses(
        x64,
        t,
        y.double(),
        None,
        None,
        old_classes=y.shape[1],
        ce=ce,
        kd=kd,
        alpha=0.9,
        ignore_index=255,
        reduction=reduction,
    )
    grad_ce, grad_kd = (u.cpu().double() for u in upstream)
    (grad_x,) = torch.autograd.grad((ce_loss * grad_ce).sum() + (kd_loss * grad_kd).sum(), x64)
    return ce_loss, kd_loss, grad_x


def _assert_close(actual, expected, rtol, what):
    actual, expected = actual.detach().cpu().double(), expected.detach().cpu().double()
    scale = expected.abs().max().item()
    error = (actual - expected).abs().max().item()
    assert error <= rtol * scale, f"{what}: max error {error:.3e} > {rtol:.0e} * {scale:.3e}"


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_packed_and_single_pixel_loads_agree_with_the_reference(device_ops, generator, dtype, reduction):
    """H*W = 64 takes the 16-byte packs; the same values one element off alignment take single pixels."""
    ops_namespace, device = device_ops
    x, y, t = _inputs(generator, dtype=dtype)
    storage = torch.empty(x.numel() + 1, dtype=dtype)
    misaligned = storage[1:].view_as(x).copy_(x)  # 2-8 bytes past a 16-byte boundary
    results = []
    for logits in (x, misaligned):
        ce_loss, kd_loss, grad_x, upstream = _run(ops_namespace, device, logits, t, y, reduction=reduction)
        expected = _reference(x, t, y, upstream, reduction=reduction)
        for actual, wanted, what in zip((ce_loss, kd_loss, grad_x), expected, ("ce", "kd", "dL/dx"), strict=True):
            _assert_close(actual, wanted, RTOL[dtype], what)
        results.append((ce_loss, kd_loss, grad_x))
    torch.testing.assert_close(results[0][2], results[1][2], rtol=RTOL[dtype], atol=0)


def test_streaming_logsumexp_edges(device_ops, generator):
    """-inf logits in the new classes (a masked class), a whole -inf new set, and maxima that grow
    at the last channel (every running sum rescaled) match the reference."""
    ops_namespace, device = device_ops
    x, y, t = _inputs(generator, C=12, Co=5)
    x[:, 7] = float("-inf")
    x[1, 5:] = float("-inf")
    x[0, 4] = 60.0  # the old set's maximum arrives at its last channel
    y[:, -1] = 40.0  # and the teacher's
    t[1][(t[1] >= 5) & (t[1] != 255)] = 1  # no label on a -inf class
    t[0][t[0] == 7] = 2
    ce_loss, kd_loss, grad_x, upstream = _run(ops_namespace, device, x, t, y, kd="unbiased")
    expected = _reference(x, t, y, upstream)
    for actual, wanted, what in zip((ce_loss, kd_loss, grad_x), expected, ("ce", "kd", "dL/dx"), strict=True):
        assert torch.isfinite(actual).all(), what
        _assert_close(actual, wanted, RTOL[torch.float32], what)


def test_results_are_deterministic(device_ops, generator):
    ops_namespace, device = device_ops
    x, y, t = _inputs(generator, B=3, C=21, Co=16, H=33, W=40)
    first = _run(ops_namespace, device, x, t, y)
    second = _run(ops_namespace, device, x, t, y)
    for a, b in zip(first[:3], second[:3], strict=True):
        assert torch.equal(a, b)


def test_direct_call_with_a_bad_label_gives_nan_not_a_wrong_loss(device_ops, generator):
    """The public API rejects such labels; a direct op call must not read out of bounds or look fine."""
    ops_namespace, device = device_ops
    x, y, t = _inputs(generator)
    t[0, 0, 0] = 40
    ce_loss, kd_loss, grad_x, _ = _run(ops_namespace, device, x, t, y, reduction="none")
    assert torch.isnan(ce_loss[0, 0, 0]) and torch.isfinite(ce_loss.flatten()[1:]).all()
    assert torch.isnan(grad_x[0, :, 0, 0]).all() and torch.isfinite(grad_x[1]).all()
    assert torch.isfinite(kd_loss).all()


def test_batch_beyond_the_grid_limit_is_a_clear_error(device_ops):
    ops_namespace, device = device_ops
    x = torch.zeros(65536, 2, 1, 1, device=device)
    with pytest.raises(ValueError, match="at most 65535 images"):
        ops_namespace.logit_losses_fwd(
            x,
            None,
            x[:, :1],
            None,
            None,
            old_classes=1,
            ce="none",
            kd="plain",
            alpha=1.0,
            ignore_index=255,
            reduction="sum",
        )


def test_emulator_backend_is_hidden_from_auto_and_listing():
    assert CUDA_EMULATOR not in _backends.available_backends()
    assert _backends.resolve("auto", torch.device("cpu")) is not ops.CUDA_EMULATOR


# ---- size= (MATH.md#upsampling): the forward through UpsampledPixel, the gather backward ----


def _upsampled_inputs(generator, *, B=2, C=19, Co=11, x_size=(9, 17), y_size=(5, 6), size=(37, 70), dtype):
    x = (3 * torch.randn(B, C, *x_size, generator=generator, dtype=torch.float64)).to(dtype)
    y = (2 * torch.randn(B, Co, *y_size, generator=generator, dtype=torch.float64)).to(dtype)
    t = torch.randint(0, C, (B, *size), generator=generator)
    t[torch.rand(B, *size, generator=generator) < 0.2] = 255
    mask = torch.rand(B, *size, generator=generator, dtype=torch.float64).float()
    return x, y, t, mask


def _run_upsampled(ops_namespace, device, x, t, y, mask, size, *, kd="balanced", reduction="mean"):
    """Forward and backward of the op with size=, and the float64 reference of the same (interpolate,
    then the loss) with the same upstream gradients; returns (ours, reference) triples."""
    gamma = reference.balanced_log_gamma(y).float() if kd == "balanced" else None
    modes = dict(old_classes=y.shape[1], ce="unbiased", kd=kd, alpha=0.9, ignore_index=255, reduction=reduction)
    on_device = [v.to(device) if v is not None else None for v in (x, t, y, gamma, mask)]
    ce_loss, kd_loss, stats, count = ops_namespace.logit_losses_fwd(*on_device, size=list(size), **modes)
    generator = torch.Generator().manual_seed(7)
    grad_ce, grad_kd = (0.5 + torch.rand(ce_loss.shape, generator=generator, dtype=ce_loss.dtype) for _ in range(2))
    grad_x = ops_namespace.logit_losses_bwd(
        grad_ce.to(device), grad_kd.to(device), *on_device, stats, count, size=list(size), **modes
    )

    x64 = x.double().requires_grad_()
    upsample = torch.nn.Upsample(size=tuple(size), mode="bilinear", align_corners=False)
    expected = reference.logit_losses(
        upsample(x64), t, upsample(y.double()), None if gamma is None else gamma.double(), mask.double(), **modes
    )
    (expected_grad,) = torch.autograd.grad(
        (expected[0] * grad_ce.double()).sum() + (expected[1] * grad_kd.double()).sum(), x64
    )
    return (ce_loss, kd_loss, grad_x), (*expected, expected_grad)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
@pytest.mark.parametrize("reduction", ["mean", "none"])
def test_upsampled_channel_groups_pixel_blocks_and_teacher_resolution(device_ops, generator, dtype, reduction):
    """C = 19, Co = 11: the backward's 8-channel groups are [0, 8), [8, 16) across Co and the tail
    [16, 19); x's 9 x 17 = 153 elements take two 128-thread blocks; y has its own 5 x 6; the output
    37 x 70 is no multiple of either."""
    ops_namespace, device = device_ops
    x, y, t, mask = _upsampled_inputs(generator, dtype=dtype)
    ours, expected = _run_upsampled(ops_namespace, device, x, t, y, mask, (37, 70), reduction=reduction)
    assert ours[2].shape == x.shape and ours[2].dtype == dtype
    for actual, wanted, what in zip(ours, expected, ("ce", "kd", "dL/dx"), strict=True):
        _assert_close(actual, wanted, RTOL[dtype], what)


@pytest.mark.parametrize(
    "x_size,y_size,size",
    [((1, 1), (1, 2), (7, 5)), ((2, 3), (2, 3), (64, 96)), ((3, 2), (4, 4), (4, 4)), ((4, 5), (2, 2), (128, 80))],
)
def test_upsampled_edges_single_pixel_factor_32_identity_and_mixed(device_ops, generator, x_size, y_size, size):
    """A 1 x 1 map (every output reads one sample), factor 32 on both axes, H = h (the identity
    along rows), and factors 32 and 16 with y at factor 64 and 40."""
    ops_namespace, device = device_ops
    x, y, t, mask = _upsampled_inputs(
        generator, C=6, Co=3, x_size=x_size, y_size=y_size, size=size, dtype=torch.float32
    )
    ours, expected = _run_upsampled(ops_namespace, device, x, t, y, mask, size, kd="unbiased", reduction="sum")
    for actual, wanted, what in zip(ours, expected, ("ce", "kd", "dL/dx"), strict=True):
        _assert_close(actual, wanted, RTOL[torch.float32], what)


def test_upsampled_gradient_is_deterministic(device_ops, generator):
    """The gather sums each element's output pixels in a fixed order: the same bits run to run."""
    ops_namespace, device = device_ops
    x, y, t, mask = _upsampled_inputs(
        generator, B=3, C=21, Co=16, x_size=(12, 16), y_size=(12, 16), size=(96, 128), dtype=torch.float32
    )
    first, _ = _run_upsampled(ops_namespace, device, x, t, y, mask, (96, 128))
    second, _ = _run_upsampled(ops_namespace, device, x, t, y, mask, (96, 128))
    for a, b in zip(first, second, strict=True):
        assert torch.equal(a, b)
