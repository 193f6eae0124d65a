"""Compile the Triton kernels of this package for a CUDA GPU, on a machine without one.

    python -m incseg_fast.triton.aot_check [--arch 90] [--quick]

Triton ships ptxas, so this runs the real (non-interpreter) compiler on every kernel variant the
wrappers launch, catching what the interpreter does not check (types, layouts, constexpr branches),
and prints each kernel's registers and spill stack from the cubin (cuobjdump -res-usage). Pointer
arguments and H*W are compiled as 16-divisible, the specialisation Triton's JIT picks for
contiguous maps with H*W % 16 == 0. Every kernel is compiled with the launchers' options
(``enable_fp_fusion=False``), and its PTX must round every float32 product before it is added or
subtracted (``contracted_products``). Run it without TRITON_INTERPRET (the interpreter replaces the
kernels at import). Exit status 1 if any kernel fails to compile or its PTX has a contracted product.
tools/triton_check.py (``make cuda-check``) adds the registers and spills of nvcc's ptxas.
"""

import argparse
import itertools
import os
import re
import subprocess
import sys
import tempfile

import torch
import triton
import triton.language as tl
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource

from ..vocabulary import CE_MODES, KD_MODES, WIDER_TEACHER_DTYPE
from . import _launch, attention, logit_losses_upsampled, pod, pseudo_labels, sigmoid_losses
from .logit_losses import _finish_reduction_kernel, _logit_losses_bwd_kernel, _logit_losses_fwd_kernel

_TL_NAMES = {torch.float32: "fp32", torch.float64: "fp64", torch.bfloat16: "bf16", torch.float16: "fp16"}
_FLOAT_SCALARS = {"alpha_high", "alpha_low", "inv_log_hi", "inv_log_lo", "threshold_high", "threshold_low"}
# The attention kernels' pointers to data of the inputs' dtype, and those to float32 partials.
_ATTENTION_DATA_POINTERS = (
    "v_ptr",
    "a_ch_ptr",
    "a_sp_ptr",
    "out_ptr",
    "grad_out_ptr",
    "grad_v_ptr",
    "f_ptr",
    "g_ptr",
    "a_ptr",
    "b_ptr",
    "grad_f_ptr",
    "grad_g_ptr",
)
_ATTENTION_ACC_POINTERS = {
    "spatial_part_ptr",
    "spatial_ptr",
    "loss_part_ptr",
    "p_part_ptr",
    "grad_ptr",
    "sgrad_ptr",
    "grad_a_part_ptr",
    "grad_b_part_ptr",
    "grad_a_ch_part_ptr",
    "grad_a_sp_part_ptr",
}


def _resources(cubin):
    cuobjdump = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    with tempfile.NamedTemporaryFile(suffix=".cubin") as handle:
        handle.write(cubin)
        handle.flush()
        report = subprocess.run([cuobjdump, "-res-usage", handle.name], capture_output=True, text=True).stdout
    match = re.search(r"REG:(\d+)\s+STACK:(\d+)\s+SHARED:(\d+)", report)
    return "registers {} stack {} shared {}".format(*match.groups()) if match else "resources unknown"


def compile_kernel(kernel, pointer_types, constexprs, arch, num_warps, **options):
    """The compiled kernel (``.asm["ptx"]``, ``.asm["cubin"]``) for GPUTarget("cuda", arch), with the
    launchers' options (``enable_fp_fusion``) unless ``options`` (Triton's) say otherwise."""
    names = kernel.arg_names
    signature = {}
    for name in names:
        if name in constexprs:
            signature[name] = "constexpr"
        elif name.endswith("_ptr"):
            signature[name] = "*" + pointer_types.get(name, "fp32")
        else:
            signature[name] = "fp32" if name in _FLOAT_SCALARS else "i32"
    aligned = [name for name in names if name not in constexprs and (name.endswith("_ptr") or name == "HW")]
    source = ASTSource(
        kernel,
        signature,
        constexprs={(names.index(name),): value for name, value in constexprs.items()},
        attrs={(names.index(name),): [["tt.divisibility", 16]] for name in aligned},
    )
    options = {"num_warps": num_warps, "enable_fp_fusion": _launch.FP_FUSION, **options}
    return triton.compile(source, target=GPUTarget("cuda", arch, 32), options=options)


# What an unrounded float32 product looks like in PTX: a fused multiply-add without .ftz, or a
# multiply/add/subtract without a rounding modifier (which ptxas may contract unless given
# --fmad=false). The kernels need every product rounded (alpha * y against the rounded maximum:
# logit_math's teacher_probability). Allowed: fma.rn.ftz.f32, libdevice's own arithmetic (the
# polynomial of logf, linked with Triton's flush-to-zero reflection, enable_reflect_ftz), which
# never contracts a product of this package; float64 (libdevice's exp and log use fma.rn.f64, and
# float64 meets its tolerance either way).
_CONTRACTED = re.compile(
    r"^\s*(?:@!?%p\d+\s+)?(?:(?:fma|mad)(?:\.r[nzmp])?(?:\.sat)?\.f32|(?:mul|add|sub)(?:\.sat)?\.f32)\s"
)


def contracted_products(ptx):
    """The PTX instructions of ``ptx`` that add a float32 product without rounding it first."""
    return [line.strip() for line in ptx.splitlines() if _CONTRACTED.match(line)]


def _gpu_tiles(dtype, halved):
    """(BLOCK_C, BLOCK_P, num_warps): _launch's default tile for ``dtype``, and with ``halved`` the
    smaller pixel blocks (and warps) that _launch.tiles picks for small maps."""
    block_c, block_p, num_warps = _launch.gpu_tile(dtype)
    yield block_c, block_p, num_warps
    while halved and num_warps > 1:
        block_p, num_warps = block_p // 2, num_warps // 2
        yield block_c, block_p, num_warps


def _logit_loss_variants(quick):
    """(ce, kd, reduction, dtype, target type, (BLOCK_C, BLOCK_P, num_warps))."""
    # Every mode with "mean"; "none" (per-pixel stores instead of partial sums) once per CE and KD mode.
    modes = [(ce, kd, "mean") for ce in CE_MODES for kd in KD_MODES if (ce, kd) != ("none", "none")]
    modes += [("unbiased", "unbiased", "none"), ("plain", "plain", "none"), ("none", "balanced", "none")]
    if quick:
        modes = [("unbiased", "balanced", "mean"), ("plain", "plain", "mean"), ("none", "unbiased", "mean")]
    (float32_tile,) = _gpu_tiles(torch.float32, halved=False)
    for ce, kd, reduction in modes:
        yield ce, kd, reduction, torch.float32, "i64", float32_tile
    for tile in _gpu_tiles(torch.bfloat16, halved=not quick):
        yield "unbiased", "unbiased", "mean", torch.bfloat16, "i64", tile
    if not quick:
        yield "plain", "plain", "none", torch.bfloat16, "i64", next(_gpu_tiles(torch.bfloat16, halved=False))
        yield "unbiased", "balanced", "sum", torch.float16, "u8", next(_gpu_tiles(torch.float16, halved=False))
        yield "plain", "unbiased", "mean", torch.float32, "i32", float32_tile
        yield "unbiased", "balanced", "mean", torch.float64, "i64", next(_gpu_tiles(torch.float64, halved=False))
        for tile in list(_gpu_tiles(torch.float32, halved=True))[1:]:
            yield "unbiased", "balanced", "mean", torch.float32, "i64", tile


# (ce, kd, reduction, dtype) of the size= kernels: the forward with UPSAMPLE and the gather backward.
def _upsampled_variants(quick):
    yield "unbiased", "balanced", "mean", torch.float32
    if not quick:
        yield "plain", "plain", "none", torch.float32
        yield "none", "unbiased", "sum", torch.float32
        yield "unbiased", "none", "mean", torch.bfloat16
        yield "unbiased", "balanced", "mean", torch.float64


def _logit_pointers(dtype, target_type):
    acc_name = _TL_NAMES[torch.float64 if dtype == torch.float64 else torch.float32]
    pointers = {
        name: acc_name
        for name in ("ce_ptr", "kd_ptr", "stats_ptr", "grad_ce_ptr", "grad_kd_ptr", "log_gamma_ptr", "mask_ptr")
    }
    pointers.update(x_ptr=_TL_NAMES[dtype], y_ptr=_TL_NAMES[dtype], grad_x_ptr=_TL_NAMES[dtype], target_ptr=target_type)
    return pointers


def _logit_constexprs(ce, kd, reduction, dtype):
    """The constexprs the forward and backward kernels share, and the backward's own."""
    acc_torch, acc = _launch.accumulator_dtype(dtype)
    shared = dict(
        CE=ce,
        KD=kd,
        HAS_MASK=kd != "none",
        PER_PIXEL=reduction == "none",
        ACC=acc,
        NEG=_launch.lowest(acc_torch),
    )
    backward = dict(MEAN=reduction == "mean")
    return shared, backward


def _logit_kernels(quick):
    """The logit-loss variants: (label, kernel, pointer types, constexprs, num_warps)."""
    for ce, kd, reduction, dtype, target_type, (block_c, block_p, num_warps) in _logit_loss_variants(quick):
        pointers = _logit_pointers(dtype, target_type)
        shared, backward = _logit_constexprs(ce, kd, reduction, dtype)
        constexprs = dict(shared, BLOCK_C=block_c, BLOCK_P=block_p)
        label = (
            f"logit_losses ce={ce} kd={kd} reduction={reduction} {dtype} target {target_type} "
            f"{block_c}x{block_p} {num_warps} warps"
        )
        yield (
            f"{label} forward",
            _logit_losses_fwd_kernel,
            dict(pointers, count_ptr="i32"),
            dict(constexprs, UPSAMPLE=False),
            num_warps,
        )
        yield (
            f"{label} backward",
            _logit_losses_bwd_kernel,
            dict(pointers, count_ptr="i64"),
            dict(constexprs, **backward),
            num_warps,
        )
    yield from _wider_teacher_logit_kernels(quick)
    for ce, kd, reduction, dtype in _upsampled_variants(quick):
        pointers = _logit_pointers(dtype, "i64")
        shared, backward = _logit_constexprs(ce, kd, reduction, dtype)
        forward_c, forward_p, forward_warps = _launch.gather_tiles(_launch.GPU_BLOCK_C, _launch.GPU_BLOCK_P)
        cols = 32  # factor 16: 32 column readers per element
        block_c, block_e, num_warps = logit_losses_upsampled.tiles(_launch.GPU_BLOCK_C, cols, dtype)
        label = f"logit_losses size= ce={ce} kd={kd} reduction={reduction} {dtype}"
        yield (
            f"{label} forward {forward_c}x{forward_p}",
            _logit_losses_fwd_kernel,
            dict(pointers, count_ptr="i32"),
            dict(shared, UPSAMPLE=True, BLOCK_C=forward_c, BLOCK_P=forward_p),
            forward_warps,
        )
        yield (
            f"{label} backward (gather) {block_c}x{block_e}x{cols}",
            logit_losses_upsampled._upsampled_bwd_kernel,
            dict(pointers, count_ptr="i64"),
            dict(shared, BLOCK_C=block_c, BLOCK_E=block_e, COLS=cols, **backward),
            num_warps,
        )


def _wider_teacher_logit_kernels(quick):
    """The teacher in a wider dtype than x (MATH.md#teacher-dtype): y_ptr of its own type, every pair."""
    for dtype, teacher_dtype in WIDER_TEACHER_DTYPE.items() if not quick else ():
        pointers = dict(_logit_pointers(dtype, "i64"), y_ptr=_TL_NAMES[teacher_dtype])
        shared, backward = _logit_constexprs("unbiased", "balanced", "mean", dtype)
        block_c, block_p, num_warps = next(_gpu_tiles(dtype, halved=False))
        constexprs = dict(shared, BLOCK_C=block_c, BLOCK_P=block_p)
        label = f"logit_losses kd=balanced {dtype} teacher {teacher_dtype} {block_c}x{block_p} {num_warps} warps"
        yield (
            f"{label} forward",
            _logit_losses_fwd_kernel,
            dict(pointers, count_ptr="i32"),
            dict(constexprs, UPSAMPLE=False),
            num_warps,
        )
        yield (
            f"{label} backward",
            _logit_losses_bwd_kernel,
            dict(pointers, count_ptr="i64"),
            dict(constexprs, **backward),
            num_warps,
        )


def _attention_kernels(quick):
    """The attention variants: (label, kernel, pointer types, constexprs, num_warps)."""
    for dtype in (torch.bfloat16,) if quick else (torch.float32, torch.bfloat16):
        pointers = {name: "fp32" for name in _ATTENTION_ACC_POINTERS}
        for name in _ATTENTION_DATA_POINTERS:
            pointers[name] = _TL_NAMES[dtype]
        for (block_c, block_p, num_warps), (kernel, flags) in itertools.product(
            _gpu_tiles(dtype, halved=not quick and dtype == torch.float32),
            (
                (attention._structured_attention_fwd_kernel, {}),
                (attention._structured_attention_bwd_kernel, dict(NEED_V=True, NEED_CH=True, NEED_SP=True)),
                (attention._ad_spatial_kernel, {}),
                (attention._ad_loss_kernel, dict(SAVE_P=True)),
                (attention._ad_bwd_kernel, dict(SPATIAL=True, NEED_F=True, NEED_G=True, NEED_A=True, NEED_B=True)),
                (attention._ad_bwd_kernel, dict(SPATIAL=False, NEED_F=True, NEED_G=False, NEED_A=True, NEED_B=False)),
            ),
        ):
            tiles = dict(ACC=tl.float32, BLOCK_C=block_c, BLOCK_P=block_p)
            label = f"{kernel.fn.__name__} {flags or ''} {dtype} {block_c}x{block_p} {num_warps} warps"
            yield label, kernel, pointers, dict(tiles, **flags), num_warps
    if not quick:  # the old features in float32 for bfloat16 new ones (MATH.md#teacher-dtype)
        pointers = {name: "fp32" for name in _ATTENTION_ACC_POINTERS}
        pointers.update(
            {name: "bf16" for name in _ATTENTION_DATA_POINTERS}, g_ptr="fp32", b_ptr="fp32", grad_g_ptr="fp32"
        )
        block_c, block_p, num_warps = next(_gpu_tiles(torch.bfloat16, halved=False))
        tiles = dict(ACC=tl.float32, BLOCK_C=block_c, BLOCK_P=block_p)
        for kernel, flags in (
            (attention._ad_spatial_kernel, {}),
            (attention._ad_loss_kernel, dict(SAVE_P=True)),
            (attention._ad_bwd_kernel, dict(SPATIAL=True, NEED_F=True, NEED_G=True, NEED_A=True, NEED_B=True)),
        ):
            label = f"{kernel.fn.__name__} {flags or ''} bfloat16 teacher float32 {block_c}x{block_p} {num_warps} warps"
            yield label, kernel, pointers, dict(tiles, **flags), num_warps


def _pod_kernels(quick):
    """Local POD's variants on DeepLab's 33 x 33 maps: the pooling at scales 1 and 4, and the backward."""
    for dtype in (torch.bfloat16,) if quick else (torch.float32, torch.bfloat16, torch.float64):
        acc_torch, acc = _launch.accumulator_dtype(dtype)
        data, acc_name = _TL_NAMES[dtype], _TL_NAMES[acc_torch]
        pooling = dict(new_ptr=data, old_ptr=data, pooled_ptr=acc_name)
        for s in (1, 4):
            block_r, block_s, block_w = pod.pool_blocks(33, 33, s)
            label = f"_pool_kernel scale {s} {dtype} {block_r}x{block_s}x{block_w}"
            yield (
                label,
                pod._pool_kernel,
                pooling,
                dict(ACC=acc, BLOCK_R=block_r, BLOCK_S=block_s, BLOCK_W=block_w),
                4,
            )
        block_r, block_w = pod.grad_blocks(33, 33)
        gradient = dict(new_ptr=data, pooled_ptr=acc_name, geometry_ptr="i32", weight_ptr=acc_name, grad_ptr=data)
        constexprs = dict(ACC=acc, BLOCK_R=block_r, BLOCK_W=block_w)
        yield f"_grad_kernel {dtype} {block_r}x{block_w}", pod._grad_kernel, gradient, constexprs, 4


def _pseudo_label_kernels(quick):
    """The entropy pseudo-label variants: each logits dtype, with and without size= (int64 labels)."""
    for dtype, upsample in itertools.product(
        (torch.bfloat16,) if quick else (torch.float32, torch.bfloat16, torch.float64), (False, True)
    ):
        _, acc_tl = _launch.accumulator_dtype(dtype)
        acc_name = _TL_NAMES[torch.float64 if dtype == torch.float64 else torch.float32]
        # the launcher's tiles (pseudo_labels._geometry) for a large image
        _, block_p, num_warps = _launch.gather_tiles(1, 1 << 20) if upsample else _launch.gpu_tile(dtype)
        pointers = {
            "y_ptr": _TL_NAMES[dtype],
            "labels_ptr": "i64",
            "thresholds_ptr": acc_name,
            "out_ptr": "i64",
            "counts_ptr": "i32",
            "histogram_ptr": "i32",
        }
        for kernel in (pseudo_labels._pseudo_labels_kernel, pseudo_labels._entropy_histogram_kernel):
            label = f"{kernel.fn.__name__} UPSAMPLE={upsample} {dtype} {block_p} pixels {num_warps} warps"
            yield label, kernel, pointers, dict(UPSAMPLE=upsample, ACC=acc_tl, BLOCK_P=block_p), num_warps


def _sigmoid_kernels(quick):
    """The sigmoid-loss variants (every target kind and pseudo-labels on): forward, backward, gather."""
    for dtype in (torch.float32,) if quick else (torch.float32, torch.bfloat16, torch.float64):
        acc_torch, acc = _launch.accumulator_dtype(dtype)
        acc_name = _TL_NAMES[acc_torch]
        pointers = {name: acc_name for name in ("pos_ptr", "weight_ptr", "label_ptr", "soft_ptr", "negative_ptr")}
        pointers.update({f"grad_{term}_ptr": acc_name for term in ("label", "soft", "negative")})
        pointers.update(x_ptr=_TL_NAMES[dtype], y_ptr=_TL_NAMES[dtype], grad_x_ptr=_TL_NAMES[dtype], target_ptr="i64")
        flags = dict(HAS_TARGET=True, PSEUDO=True, SKIP_IGNORED=True, ACC=acc)
        for upsample in (False, True):
            _, block_p, num_warps = _launch.gather_tiles(1, 1 << 20) if upsample else _launch.gpu_tile(dtype)
            label = f"sigmoid_losses {dtype} size={'yes' if upsample else 'no'}"
            forward = dict(flags, UPSAMPLE=upsample, BLOCK_P=block_p)
            yield f"{label} forward {block_p}", sigmoid_losses._sigmoid_fwd_kernel, pointers, forward, num_warps
            if upsample:
                block_c, block_e, cols, warps = sigmoid_losses.gather_tiles(_launch.GPU_BLOCK_C, 32, dtype)
            else:
                (block_c, block_e, warps), cols = sigmoid_losses.gpu_backward_tile(dtype), 1
            for per_pixel in (False, True):
                backward = dict(flags, UPSAMPLE=upsample, PER_PIXEL=per_pixel, BLOCK_C=block_c, BLOCK_E=block_e)
                yield (
                    f"{label} backward per_pixel={per_pixel} {block_c}x{block_e}x{cols}",
                    sigmoid_losses._sigmoid_bwd_kernel,
                    pointers,
                    dict(backward, COLS=cols),
                    warps,
                )


def kernels(quick):
    """(label, kernel, pointer types, constexprs, num_warps) for each variant the wrappers launch."""
    yield from _logit_kernels(quick)
    yield from _sigmoid_kernels(quick)
    for reduce in (True, False):
        yield (
            f"_finish_reduction_kernel REDUCE={reduce}",
            _finish_reduction_kernel,
            {"count_part_ptr": "i32", "count_ptr": "i64"},
            dict(REDUCE=reduce, MEAN=reduce, ACC=tl.float32, BLOCK=1024),
            _launch.GPU_NUM_WARPS,
        )
    yield from _attention_kernels(quick)
    yield from _pod_kernels(quick)
    yield from _pseudo_label_kernels(quick)


def compiled_kernels(quick, arch, **options):
    """(label, compiled kernel or the exception that stopped it) for each variant, in order."""
    for label, kernel, pointers, constexprs, num_warps in kernels(quick):
        try:
            yield label, compile_kernel(kernel, pointers, constexprs, arch, num_warps, **options)
        except Exception as error:  # report every failing variant, then fail
            yield label, error


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--arch", type=int, default=90, help="CUDA compute capability x 10 (90: H100/H200)")
    parser.add_argument("--quick", action="store_true", help="a representative subset of the variants")
    args = parser.parse_args(argv)
    if _launch.interpreter():
        parser.error("unset TRITON_INTERPRET: the interpreter replaces the kernels at import")
    failures = 0
    for label, compiled in compiled_kernels(args.quick, args.arch):
        if isinstance(compiled, Exception):
            failures += 1
            print(f"FAIL {label}: {type(compiled).__name__}: {compiled}", flush=True)
            continue
        contracted = contracted_products(compiled.asm["ptx"])
        if contracted:
            failures += 1
            print(f"FAIL {label}: {len(contracted)} unrounded float32 products in the PTX, e.g. {contracted[0]}")
        else:
            print(f"ok   {label}: {_resources(compiled.asm['cubin'])}", flush=True)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
