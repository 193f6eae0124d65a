"""Every compiled op once, forward and backward, on small odd shapes, checked against the float64 reference.

    python3 tools/gpu_smoke.py [--backend cuda|cpu|cuda_emulator]

Made to run under compute-sanitizer (tools/gpu_check.py): few, small launches that still reach
every kernel instantiation (float32, float64, bfloat16, float16; pixel counts that take the
one-pixel-per-thread tails and multiples of 16 that take the packed loads; every loss mode and
reduction; the logit losses with size=; gradient subsets), and a result check so that it is a
useful smoke test on its own.
The ops are called through the backend contract of DEVELOPERS.md (``incseg_fast.ops.OpBackend``)
and compared with ``incseg_fast.reference`` run on float64 copies of the same values, at the
parity suites' tolerances (``incseg_fast.vocabulary.RTOL``). ``--backend cpu`` or ``cuda_emulator``
runs the same script on CPU tensors (to check the script itself without a GPU).
Prints one line per case and a verdict; exits 1 on any mismatch, error or missing CUDA kernel.
"""

import argparse
import itertools
import os
import sys
import traceback

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the in-place build
from incseg_fast import ops, reference  # noqa: E402
from incseg_fast.vocabulary import CE_MODES, KD_MODES, REDUCTIONS, RTOL  # noqa: E402

DTYPES = (torch.float32, torch.float64, torch.bfloat16, torch.float16)
LABEL_DTYPES = (torch.int64, torch.int32, torch.uint8)
IGNORE_INDEX = 255
# (B, C, Co, H, W): H*W odd (one pixel per thread, tails) and a multiple of 16 (packed loads).
LOGIT_SHAPES = ((2, 7, 4, 9, 13), (2, 21, 16, 8, 16))
FEATURE_SHAPES = ((2, 9, 7, 11), (2, 16, 8, 16))
FAMILIES = {
    "logit losses": ("logit_losses_fwd", "logit_losses_bwd"),
    "attentive distillation": ("attentive_distillation_forward", "attentive_distillation_backward"),
    "structured attention": ("structured_attention", "structured_attention_backward"),
}


class Mismatch(AssertionError):
    pass


def _close(actual, expected, rtol, what):
    if actual is None or expected is None:
        if (actual is None) != (expected is None):
            raise Mismatch(f"{what}: gradient {'missing' if actual is None else 'unexpected'}")
        return 0.0
    if tuple(actual.shape) != tuple(expected.shape):
        raise Mismatch(f"{what}: shape {tuple(actual.shape)} != {tuple(expected.shape)}")
    actual = actual.detach().to(device="cpu", dtype=torch.float64)
    expected = expected.detach().to(device="cpu", dtype=torch.float64)
    if not torch.isfinite(actual).all():
        raise Mismatch(f"{what}: non-finite values")
    scale = expected.abs().max().item() if expected.numel() else 0.0
    error = (actual - expected).abs().max().item() if expected.numel() else 0.0
    if error > rtol * scale:
        raise Mismatch(f"{what}: max error {error:.3e} > {rtol:.0e} * scale {scale:.3e}")
    return error / scale if scale > 0 else error


def _leaves(values, dtype, device, wanted):
    """The same values as leaves of ``dtype`` on ``device``, and as float64 CPU leaves (from the rounded values)."""
    low = [v.to(dtype).to(device).requires_grad_(w) for v, w in zip(values, wanted, strict=True)]
    exact = [t.detach().to("cpu", torch.float64).requires_grad_(w) for t, w in zip(low, wanted, strict=True)]
    return low, exact


def _backward(outputs, upstream):
    pairs = [(o, u) for o, u in zip(outputs, upstream, strict=True) if o.requires_grad]
    if pairs:
        torch.autograd.backward([o for o, _ in pairs], [u.to(o.device, o.dtype) for o, u in pairs])


def logit_case(backend, device, generator, dtype, shape, ce, kd, reduction, label_dtype, with_mask, low_res=None):
    """low_res = ((h, w), (h', w')): x and y at those resolutions, the losses taken with size=(H, W)."""
    B, C, Co, H, W = shape
    (h, w), (yh, yw) = low_res or ((H, W), (H, W))
    x = 3 * torch.randn((B, C, h, w), generator=generator, dtype=torch.float64)
    y = 2 * torch.randn((B, Co, yh, yw), generator=generator, dtype=torch.float64)
    (x_low,), (x_exact,) = _leaves([x], dtype, device, [True])
    y_low = y.to(dtype).to(device) if kd != "none" else None
    y_exact = y_low.to("cpu", torch.float64) if y_low is not None else None
    target = None
    if ce != "none":
        labels = torch.randint(0, C, (B, H, W), generator=generator)
        ignored = torch.rand((B, H, W), generator=generator) < 0.2
        target = torch.where(ignored, torch.full_like(labels, IGNORE_INDEX), labels).to(label_dtype)
    accumulate = torch.float64 if dtype == torch.float64 else torch.float32
    gamma = (0.2 + 2 * torch.rand((B,), generator=generator, dtype=torch.float64)) if kd == "balanced" else None
    mask = torch.rand((B, H, W), generator=generator, dtype=torch.float64) if with_mask else None
    options = dict(old_classes=Co, ce=ce, kd=kd, alpha=0.7, ignore_index=IGNORE_INDEX, reduction=reduction)
    if low_res is not None:
        options["size"] = (H, W)
    loss_shape = (B, H, W) if reduction == "none" else ()
    upstream = [torch.randn(loss_shape, generator=generator, dtype=torch.float64) for _ in range(2)]

    def on_device(t, dt=None):
        return None if t is None else t.to(device, dt or t.dtype)

    actual = backend.logit_losses(
        x_low, on_device(target), y_low, on_device(gamma, accumulate), on_device(mask, accumulate), **options
    )
    expected = reference.logit_losses(x_exact, target, y_exact, gamma, mask, **options)
    _backward(actual, upstream)
    _backward(expected, upstream)
    rtol = RTOL[dtype]
    errors = [_close(a, e, rtol, name) for a, e, name in zip(actual, expected, ("ce_loss", "kd_loss"), strict=True)]
    errors.append(_close(x_low.grad, x_exact.grad, rtol, "dL/dx"))
    return max(errors)


def attentive_case(backend, device, generator, dtype, shape, reduction, detach_spatial, wanted):
    B, C, H, W = shape
    f = torch.randn(shape, generator=generator, dtype=torch.float64)
    values = [
        f,
        f + 0.1 * torch.randn(shape, generator=generator, dtype=torch.float64),
        torch.rand((B, C), generator=generator, dtype=torch.float64),
        torch.rand((B, C), generator=generator, dtype=torch.float64),
    ]
    low, exact = _leaves(values, dtype, device, wanted)
    upstream = [torch.tensor(1000.0, dtype=torch.float64)]  # CAF's lambda_AD
    actual = backend.attentive_distillation(*low, reduction=reduction, detach_spatial=detach_spatial)
    expected = reference.attentive_distillation(*exact, reduction=reduction, detach_spatial=detach_spatial)
    _backward([actual], upstream)
    _backward([expected], upstream)
    rtol = RTOL[dtype]
    errors = [_close(actual, expected, rtol, "loss")]
    errors += [_close(a.grad, e.grad, rtol, f"dL/d{name}") for a, e, name in zip(low, exact, "fgab", strict=True)]
    return max(errors)


def structured_case(backend, device, generator, dtype, shape, wanted):
    B, C, H, W = shape
    values = [
        torch.randn(shape, generator=generator, dtype=torch.float64),
        torch.randn((B, C), generator=generator, dtype=torch.float64),
        torch.randn((B, H, W), generator=generator, dtype=torch.float64),
    ]
    low, exact = _leaves(values, dtype, device, wanted)
    upstream = [torch.randn(shape, generator=generator, dtype=torch.float64)]
    actual = backend.structured_attention(*low)
    expected = reference.structured_attention(*exact)
    _backward([actual], upstream)
    _backward([expected], upstream)
    rtol = RTOL[dtype]
    errors = [_close(actual, expected, rtol, "out")]
    errors += [
        _close(a.grad, e.grad, rtol, f"dL/d{name}")
        for a, e, name in zip(low, exact, ("v", "a_ch", "a_sp"), strict=True)
    ]
    return max(errors)


def cases():
    """(family, description, function, keyword arguments) of every call."""
    modes = [(ce, kd) for ce, kd in itertools.product(CE_MODES, KD_MODES) if (ce, kd) != ("none", "none")]
    for dtype, shape in itertools.product(DTYPES, LOGIT_SHAPES):
        for i, (ce, kd) in enumerate(modes):
            reduction, label_dtype = REDUCTIONS[i % 3], LABEL_DTYPES[i % 3]
            with_mask = kd != "none" and i % 2 == 0
            yield (
                "logit losses",
                f"{str(dtype)[6:]} {shape} ce={ce} kd={kd} {reduction} {str(label_dtype)[6:]}"
                f"{' mask' if with_mask else ''}",
                logit_case,
                dict(
                    dtype=dtype,
                    shape=shape,
                    ce=ce,
                    kd=kd,
                    reduction=reduction,
                    label_dtype=label_dtype,
                    with_mask=with_mask,
                ),
            )
    # size=: the upsampled forward and the gather backward; 19 channels take the CUDA gather's 8-channel
    # groups across Co and a tail, x's 9 x 17 elements two blocks, and y has its own resolution.
    for i, dtype in enumerate(DTYPES):
        ce, kd = modes[(5 * i) % len(modes)]
        yield (
            "logit losses",
            f"{str(dtype)[6:]} size=(37, 70) x 9x17 y 5x6 ce={ce} kd={kd} {REDUCTIONS[i % 3]}",
            logit_case,
            dict(
                dtype=dtype,
                shape=(2, 19, 11, 37, 70),
                ce=ce,
                kd=kd,
                reduction=REDUCTIONS[i % 3],
                label_dtype=torch.int64,
                with_mask=kd != "none",
                low_res=((9, 17), (5, 6)),
            ),
        )
    for shape in ((2, 5, 5, 7, 9), (2, 5, 1, 7, 9)):  # the C == Co and Co == 1 edges
        yield (
            "logit losses",
            f"float32 {shape} ce=unbiased kd=unbiased mean",
            logit_case,
            dict(
                dtype=torch.float32,
                shape=shape,
                ce="unbiased",
                kd="unbiased",
                reduction="mean",
                label_dtype=torch.int64,
                with_mask=False,
            ),
        )
    subsets = ((True, True, True, True), (True, False, True, False), (False, True, False, True))
    for i, (dtype, shape) in enumerate(itertools.product(DTYPES, FEATURE_SHAPES)):
        for j, (reduction, detach) in enumerate(itertools.product(("mean", "sum"), (False, True))):
            wanted = subsets[(i + j) % len(subsets)]
            yield (
                "attentive distillation",
                f"{str(dtype)[6:]} {shape} {reduction} detach_spatial={detach} "
                f"grads={''.join(n for n, w in zip('fgab', wanted, strict=True) if w)}",
                attentive_case,
                dict(dtype=dtype, shape=shape, reduction=reduction, detach_spatial=detach, wanted=wanted),
            )
    for i, (dtype, shape) in enumerate(itertools.product(DTYPES, FEATURE_SHAPES)):
        wanted = ((True, True, True), (False, True, True), (True, False, False))[i % 3]
        yield (
            "structured attention",
            f"{str(dtype)[6:]} {shape} grads="
            f"{','.join(n for n, w in zip(('v', 'a_ch', 'a_sp'), wanted, strict=True) if w)}",
            structured_case,
            dict(dtype=dtype, shape=shape, wanted=wanted),
        )


def missing_kernels(namespace, dispatch_key):
    """{family: [ops without a kernel for dispatch_key]}, only families with missing ones."""
    missing = {}
    for family, names in FAMILIES.items():
        absent = [
            n for n in names if not torch._C._dispatch_has_kernel_for_dispatch_key(f"{namespace}::{n}", dispatch_key)
        ]
        if absent:
            missing[family] = absent
    return missing


def main(argv=None):
    parser = argparse.ArgumentParser(prog="tools/gpu_smoke.py", description=__doc__.split("\n")[0])
    parser.add_argument("--backend", choices=("cuda", "cpu", "cuda_emulator"), default="cuda")
    args = parser.parse_args(argv)
    if not ops.HAS_EXTENSION:
        print(f"gpu-smoke: FAIL: incseg_fast._C is not built ({ops.IMPORT_ERROR})")
        return 1
    if args.backend == "cuda" and not torch.cuda.is_available():
        print("gpu-smoke: FAIL: --backend cuda needs a CUDA device")
        return 1
    backend = ops.CUDA_EMULATOR if args.backend == "cuda_emulator" else ops.COMPILED
    device = "cuda" if args.backend == "cuda" else "cpu"
    missing = missing_kernels(backend.namespace, "CUDA" if device == "cuda" else "CPU")
    for family, names in missing.items():
        print(f"MISSING {family}: no {device.upper()} kernel for {', '.join(names)} (its calls are skipped)")

    generator = torch.Generator().manual_seed(20261121)
    passed = failed = 0
    worst = {}
    for family, description, function, kwargs in cases():
        if family in missing:
            continue
        try:
            error = function(backend, device, generator, **kwargs)
            if device == "cuda":
                torch.cuda.synchronize()  # a kernel fault surfaces here, attributed to this case
        except Exception as exception:  # report every case, then fail
            failed += 1
            detail = str(exception) if isinstance(exception, Mismatch) else traceback.format_exc(limit=3)
            print(f"FAIL  {family}: {description}: {detail.strip()}")
            continue
        passed += 1
        worst[family] = max(worst.get(family, 0.0), error)
        print(f"ok    {family}: {description} (max rel err {error:.1e})")
    for family, error in worst.items():
        print(f"{family}: worst relative error {error:.1e}")
    ok = failed == 0 and not missing and passed > 0
    print(
        f"gpu-smoke: {'PASS' if ok else 'FAIL'}: backend {args.backend}, {passed} cases passed, {failed} failed"
        f"{', missing kernels for ' + ', '.join(missing) if missing else ''}"
    )
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
