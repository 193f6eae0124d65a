"""Every compiled op once, forward and backward, on small odd shapes, checked against the float64 reference.

    python3 tools/gpu_smoke.py [--backend cuda,triton,cpu,cuda_emulator] [--tiny] [--dtypes float32,...]

Made to run under compute-sanitizer (tools/gpu_check.py): few, small launches that still reach
every kernel instantiation (float32, float64, bfloat16, float16; pixel counts that take the
one-pixel-per-thread tails and multiples of 16 that take the packed loads; every loss mode and
reduction; the logit losses with size=; gradient subsets), and a result check so that it is a
useful smoke test on its own. ``--tiny`` keeps every op and kernel, forward and backward, in
float32, bfloat16 and float16 on one odd and one packed shape, with one loss mode each: what the
slower compute-sanitizer tools and the first compilation of each Triton kernel can afford.
The ops are called through the backend contract of DEVELOPERS.md (``incseg_fast.ops.OpBackend``)
and compared with ``incseg_fast.reference`` run on float64 copies of the same values, at the
parity suites' tolerances (``incseg_fast.vocabulary.RTOL``). ``--backend`` takes a comma-separated
list, run in turn; ``cpu``, ``cuda_emulator`` and ``triton`` under ``TRITON_INTERPRET=1`` run on
CPU tensors (to check the script itself without a GPU).
Prints one line per case and a verdict per backend; exits 1 on any mismatch, error or missing kernel.
"""

import argparse
import itertools
import os
import sys
import traceback

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the in-place build
from incseg_fast import _backends, ops, reference  # noqa: E402
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
    "local pod": ("local_pod_forward", "local_pod_backward"),
    "sigmoid losses": ("sigmoid_losses_fwd", "sigmoid_losses_bwd"),
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
    log_gamma = (
        (0.2 + 2 * torch.rand((B,), generator=generator, dtype=torch.float64)).log() if kd == "balanced" else None
    )
    mask = torch.rand((B, H, W), generator=generator, dtype=torch.float64) if with_mask else None
    options = dict(old_classes=Co, ce=ce, kd=kd, alpha=0.7, ignore_index=IGNORE_INDEX, reduction=reduction)
    if low_res is not None:
        options["size"] = (H, W)
    loss_shape = (B, H, W) if reduction == "none" else ()
    upstream = [torch.randn(loss_shape, generator=generator, dtype=torch.float64) for _ in range(2)]

    def on_device(t, dt=None):
        return None if t is None else t.to(device, dt or t.dtype)

    actual = backend.logit_losses(
        x_low, on_device(target), y_low, on_device(log_gamma, accumulate), on_device(mask, accumulate), **options
    )
    expected = reference.logit_losses(x_exact, target, y_exact, log_gamma, mask, **options)
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


def pod_case(backend, device, generator, dtype, shape, reduction):
    new_values = torch.randn(shape, generator=generator, dtype=torch.float64)
    old_values = torch.randn(shape, generator=generator, dtype=torch.float64)
    (new,), (new_exact,) = _leaves([new_values], dtype, device, [True])
    old = old_values.to(dtype).to(device)
    upstream = [torch.randn((shape[0],) if reduction == "none" else (), generator=generator, dtype=torch.float64)]
    actual = backend.local_pod(new, old, scales=(1, 2, 4), reduction=reduction)
    expected = reference.local_pod(new_exact, old.to("cpu", torch.float64), scales=(1, 2, 4), reduction=reduction)
    _backward([actual], upstream)
    _backward([expected], upstream)
    rtol = RTOL[dtype]
    return max(_close(actual, expected, rtol, "loss"), _close(new.grad, new_exact.grad, rtol, "dL/dnew"))


def sigmoid_case(backend, device, generator, dtype, shape, form, reduction, low_res=None):
    """MATH.md#sigmoid-losses in SSUL's form (pseudo-labels, ignored pixels skipped) or DKD's (a negative
    channel, soft targets on the old classes, ignored pixels as negatives), with weights != 1."""
    B, C, Co, H, W = shape
    (h, w), (yh, yw) = low_res or ((H, W), (H, W))
    x = 3 * torch.randn((B, C, h, w), generator=generator, dtype=torch.float64)
    y = 3 * torch.randn((B, Co, yh, yw), generator=generator, dtype=torch.float64)
    (x_low,), (x_exact,) = _leaves([x], dtype, device, [True])
    y_low = y.to(dtype).to(device)
    labels = torch.randint(0, C, (B, H, W), generator=generator)
    target = torch.where(torch.rand((B, H, W), generator=generator) < 0.2, IGNORE_INDEX, labels)
    accumulate = torch.float64 if dtype == torch.float64 else torch.float32
    pos_weight, channel_weight = (
        0.5 + 2 * torch.rand((C,), generator=generator, dtype=torch.float64) for _ in range(2)
    )
    layout = (0, 0) if form == "ssul" else (1, Co)
    options = dict(
        negative_channels=layout[0],
        label_channels_from=layout[1],
        pseudo_threshold=0.6 if form == "ssul" else None,
        pseudo_background=2,
        ignore_index=IGNORE_INDEX,
        ignored_pixels="skip" if form == "ssul" else "negative",
        reduction=reduction,
        size=(H, W) if low_res else None,
    )
    loss_shape = (B, H, W) if reduction == "none" else ()
    upstream = [torch.randn(loss_shape, generator=generator, dtype=torch.float64) for _ in range(3)]
    weights = [pos_weight.to(device, accumulate), channel_weight.to(device, accumulate)]
    actual = backend.sigmoid_losses(x_low, target.to(device), y_low, *weights, **options)
    expected = reference.sigmoid_losses(
        x_exact, target, y_low.to("cpu", torch.float64), pos_weight, channel_weight, **options
    )
    _backward(actual, upstream)
    _backward(expected, upstream)
    rtol = RTOL[dtype]
    names = ("label_loss", "soft_loss", "negative_loss")
    errors = [_close(a, e, rtol, name) for a, e, name in zip(actual, expected, names, strict=True)]
    errors.append(_close(x_low.grad, x_exact.grad, rtol, "dL/dx"))
    return max(errors)


def _name(dtype):
    return str(dtype)[6:]


def _logit(dtype, shape, ce, kd, reduction, label_dtype, with_mask, low_res=None):
    """A logit-losses case (family, description, function, keyword arguments)."""
    where = f"size={shape[3:]} x {low_res[0][0]}x{low_res[0][1]} y {low_res[1][0]}x{low_res[1][1]}" if low_res else ""
    return (
        "logit losses",
        f"{_name(dtype)} {where or shape} ce={ce} kd={kd} {reduction} {_name(label_dtype)}"
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
            **({"low_res": low_res} if low_res else {}),
        ),
    )


def _attentive(dtype, shape, reduction, detach, wanted):
    grads = "".join(n for n, w in zip("fgab", wanted, strict=True) if w)
    return (
        "attentive distillation",
        f"{_name(dtype)} {shape} {reduction} detach_spatial={detach} grads={grads}",
        attentive_case,
        dict(dtype=dtype, shape=shape, reduction=reduction, detach_spatial=detach, wanted=wanted),
    )


def _structured(dtype, shape, wanted):
    grads = ",".join(n for n, w in zip(("v", "a_ch", "a_sp"), wanted, strict=True) if w)
    return (
        "structured attention",
        f"{_name(dtype)} {shape} grads={grads}",
        structured_case,
        dict(dtype=dtype, shape=shape, wanted=wanted),
    )


def _pod(dtype, shape, reduction):
    return (
        "local pod",
        f"{_name(dtype)} {shape} {reduction}",
        pod_case,
        dict(dtype=dtype, shape=shape, reduction=reduction),
    )


def _sigmoid(dtype, shape, form, reduction, low_res=None):
    where = f"size={shape[3:]} x {low_res[0][0]}x{low_res[0][1]} y {low_res[1][0]}x{low_res[1][1]}" if low_res else ""
    return (
        "sigmoid losses",
        f"{_name(dtype)} {where or shape} {form} {reduction}",
        sigmoid_case,
        dict(dtype=dtype, shape=shape, form=form, reduction=reduction, **({"low_res": low_res} if low_res else {})),
    )


# size=: the upsampled forward and the gather backward; 19 channels take the CUDA gather's 8-channel
# groups across Co and a tail, x's 9 x 17 elements two blocks, and y has its own resolution.
UPSAMPLED_SHAPE = (2, 19, 11, 37, 70)
UPSAMPLED_LOW_RES = ((9, 17), (5, 6))


def cases():
    """(family, description, function, keyword arguments) of every call."""
    modes = [(ce, kd) for ce, kd in itertools.product(CE_MODES, KD_MODES) if (ce, kd) != ("none", "none")]
    for dtype, shape in itertools.product(DTYPES, LOGIT_SHAPES):
        for i, (ce, kd) in enumerate(modes):
            yield _logit(dtype, shape, ce, kd, REDUCTIONS[i % 3], LABEL_DTYPES[i % 3], kd != "none" and i % 2 == 0)
    for i, dtype in enumerate(DTYPES):
        ce, kd = modes[(5 * i) % len(modes)]
        yield _logit(dtype, UPSAMPLED_SHAPE, ce, kd, REDUCTIONS[i % 3], torch.int64, kd != "none", UPSAMPLED_LOW_RES)
    for shape in ((2, 5, 5, 7, 9), (2, 5, 1, 7, 9)):  # the C == Co and Co == 1 edges
        yield _logit(torch.float32, shape, "unbiased", "unbiased", "mean", torch.int64, False)
    subsets = ((True, True, True, True), (True, False, True, False), (False, True, False, True))
    for i, (dtype, shape) in enumerate(itertools.product(DTYPES, FEATURE_SHAPES)):
        for j, (reduction, detach) in enumerate(itertools.product(("mean", "sum"), (False, True))):
            yield _attentive(dtype, shape, reduction, detach, subsets[(i + j) % len(subsets)])
    for i, (dtype, shape) in enumerate(itertools.product(DTYPES, FEATURE_SHAPES)):
        yield _structured(dtype, shape, ((True, True, True), (False, True, True), (True, False, False))[i % 3])
    for i, (dtype, shape) in enumerate(itertools.product(DTYPES, FEATURE_SHAPES)):
        yield _pod(dtype, shape, REDUCTIONS[i % 3])

    for i, (dtype, form) in enumerate(itertools.product(DTYPES, ("ssul", "dkd"))):
        yield _sigmoid(dtype, LOGIT_SHAPES[i % 2], form, REDUCTIONS[i % 3])
        yield _sigmoid(dtype, UPSAMPLED_SHAPE, form, REDUCTIONS[(i + 1) % 3], UPSAMPLED_LOW_RES)


TINY_DTYPES = (torch.float32, torch.bfloat16, torch.float16)
# The same channel groups, blocks and teacher resolution on fewer output pixels (the Triton
# interpreter takes seconds per upsampled call).
TINY_UPSAMPLED_SHAPE = (2, 19, 11, 13, 23)


def tiny_cases():
    """Every op and kernel, forward and backward, once per dtype of TINY_DTYPES: the logit losses on
    the odd shape and the packed one (two mode pairs, both with a mask) and with size=, the attention
    ops on both shapes with every gradient, Local POD on both shapes."""
    for dtype in TINY_DTYPES:
        odd, packed = LOGIT_SHAPES
        yield _logit(dtype, odd, "unbiased", "unbiased", "mean", torch.int64, True)
        yield _logit(dtype, packed, "plain", "balanced", "none", torch.int32, True)
        yield _logit(dtype, TINY_UPSAMPLED_SHAPE, "unbiased", "unbiased", "sum", torch.int64, True, UPSAMPLED_LOW_RES)
        for shape in FEATURE_SHAPES:
            yield _attentive(dtype, shape, "mean", False, (True, True, True, True))
            yield _structured(dtype, shape, (True, True, True))
            yield _pod(dtype, shape, "mean")

        yield _sigmoid(dtype, LOGIT_SHAPES[0], "ssul", "mean")
        yield _sigmoid(dtype, TINY_UPSAMPLED_SHAPE, "dkd", "none", UPSAMPLED_LOW_RES)


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


BACKENDS = ("cuda", "triton", "cpu", "cuda_emulator")


def backend_and_device(name):
    """(OpBackend, device) of a backend name; ValueError when it cannot run here."""
    if name == "cuda":
        if not torch.cuda.is_available():
            raise ValueError("--backend cuda needs a CUDA device")
        return ops.COMPILED, "cuda"
    if name == "triton":  # on CPU tensors only under TRITON_INTERPRET=1 (resolve says so)
        device = "cuda" if torch.cuda.is_available() else "cpu"
        return _backends.resolve("triton", torch.device(device)), device
    return (ops.CUDA_EMULATOR if name == "cuda_emulator" else ops.COMPILED), "cpu"


def run_backend(name, selected_cases):
    """Runs the cases on one backend, one line each; returns (passed, failed, families without kernels)."""
    try:
        backend, device = backend_and_device(name)
    except (ValueError, RuntimeError) as error:
        print(f"FAIL  backend {name}: {error}")
        return 0, 1, {}
    missing = missing_kernels(backend.namespace, "CUDA" if device == "cuda" else "CPU")
    for family, names in missing.items():
        print(f"MISSING {name} {family}: no {device.upper()} kernel for {', '.join(names)} (its calls are skipped)")
    generator = torch.Generator().manual_seed(20261121)
    passed = failed = 0
    worst = {}
    for family, description, function, kwargs in selected_cases:
        if family in missing:
            continue
        try:
            error = function(backend, device, generator, **kwargs)
            if device == "cuda":
                torch.cuda.synchronize()  # a kernel fault surfaces here, attributed to this case
        except Exception as exception:  # report every case, then fail
            failed += 1
            detail = str(exception) if isinstance(exception, Mismatch) else traceback.format_exc(limit=3)
            print(f"FAIL  {name} {family}: {description}: {detail.strip()}")
            continue
        passed += 1
        worst[family] = max(worst.get(family, 0.0), error)
        print(f"ok    {name} {family}: {description} (max rel err {error:.1e})")
    for family, error in worst.items():
        print(f"{name} {family}: worst relative error {error:.1e}")
    return passed, failed, missing


def _names_from(choices):
    """An argparse type: a comma-separated, non-empty list of names from ``choices``."""

    def parse(text):
        names = [n for n in text.split(",") if n]
        unknown = [n for n in names if n not in choices]
        if unknown or not names:
            raise argparse.ArgumentTypeError(
                f"unknown {', '.join(unknown) or 'empty list'} (choose from {', '.join(choices)})"
            )
        return names

    return parse


DTYPE_NAMES = {_name(dtype): dtype for dtype in DTYPES}


def _dtype_list(text):
    return [DTYPE_NAMES[n] for n in _names_from(list(DTYPE_NAMES))(text)]


def main(argv=None):
    parser = argparse.ArgumentParser(prog="tools/gpu_smoke.py", description=__doc__.split("\n")[0])
    parser.add_argument(
        "--backend", type=_names_from(BACKENDS), default=["cuda"], help=f"comma-separated, from {','.join(BACKENDS)}"
    )
    parser.add_argument("--tiny", action="store_true", help="every op and kernel once per dtype (tiny_cases)")
    parser.add_argument(
        "--dtypes", type=_dtype_list, help=f"comma-separated, from {','.join(DTYPE_NAMES)} (default: all)"
    )
    args = parser.parse_args(argv)
    if not ops.HAS_EXTENSION:
        print(f"gpu-smoke: FAIL: incseg_fast._C is not built ({ops.IMPORT_ERROR})")
        return 1
    selected = [
        c for c in (tiny_cases() if args.tiny else cases()) if args.dtypes is None or c[3]["dtype"] in args.dtypes
    ]
    passed = failed = 0
    missing = []
    for name in args.backend:
        backend_passed, backend_failed, backend_missing = run_backend(name, selected)
        passed, failed = passed + backend_passed, failed + backend_failed
        missing += [f"{name} {family}" for family in backend_missing]
    ok = failed == 0 and not missing and passed > 0
    print(
        f"gpu-smoke: {'PASS' if ok else 'FAIL'}: backend {','.join(args.backend)}, {passed} cases passed, "
        f"{failed} failed{', missing kernels for ' + ', '.join(missing) if missing else ''}"
    )
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
