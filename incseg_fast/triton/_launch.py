"""How the Triton kernels of this package are launched: tiles, grids, compile options, scalar arguments.

Every kernel works on a (BLOCK_C, BLOCK_P) tile: BLOCK_P contiguous pixels of one image (the
fastest axis of NCHW, so loads coalesce along W) by BLOCK_C channels, reduced over channels in
registers. The grid is (pixel blocks, batch), with a channel-group axis for the attention ops
(channel_groups). The values are fixed defaults (no autotune): the ops are memory-bound, and
autotuning is slow under the interpreter.
"""

import functools
import os
import struct

import torch
import triton
import triton.language as tl

# Every launch passes enable_fp_fusion=FP_FUSION: no multiply-add contraction, so a product such as
# alpha * y is rounded before it is subtracted, as in the forward's maximum (and on the CPU, built
# with -ffp-contract=off). aot_check fails on any fma.f32 in the compiled kernels.
FP_FUSION = False

# On a GPU: 8 channels x 512 pixels per tile with 4 warps. When H*W is a multiple of 16 Triton
# lays 4 contiguous float32 pixels per thread (128-bit loads) x 32 threads x 4 warps along the pixel
# axis, so each thread holds all 8 channels of its pixels and the channel reductions stay in
# registers. 16-bit logits pack 8 pixels in a 128-bit load: their tile is 4 channels x 1024 pixels,
# again 32 values per thread and every channel of a pixel in one thread (8 x 512 split each warp's
# pixels across 2 warps' channels, reduced through shared memory, and the bf16 forward spilled).
# Registers per kernel: python tools/triton_check.py (make cuda-check); 16 x 512 float32 tiles
# reached 255 registers and spilled. VOC's 21 channels take three 8-channel tiles, ADE's 151 nineteen.
# float64 halves the pixels to bound register use.
# Not tuned on hardware: no GPU was available when these were chosen (see docs/TRITON.md).
GPU_BLOCK_C = 8
GPU_BLOCK_P = 512
GPU_NUM_WARPS = 4
GPU_16BIT_BLOCK_C = 4
GPU_16BIT_BLOCK_P = 1024
# Under the interpreter programs run one after another in numpy: small pixel blocks keep the tests
# fast; the channel tile is the GPU's, so the same multi-tile paths run.
INTERPRETER_BLOCK_C = 8
INTERPRETER_BLOCK_P = 32
INTERPRETER_GATHER_BLOCK_P = 128
# Few enough that tests with C > 16 run the channel-split (grouped) attention paths.
INTERPRETER_PROGRAMS_WANTED = 4
INTERPRETER_MIN_GROUP_CHANNELS = 16
GPU_MIN_GROUP_CHANNELS = 32


def interpreter():
    return os.environ.get("TRITON_INTERPRET") == "1"


@functools.cache
def _multiprocessors(device_index):
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def _programs_wanted(device):
    """Programs that keep every multiprocessor busy: two per SM on a GPU, a few under the interpreter."""
    if interpreter() or device.type != "cuda":
        return INTERPRETER_PROGRAMS_WANTED
    return 2 * _multiprocessors(device.index if device.index is not None else torch.cuda.current_device())


def gpu_tile(dtype):
    """(BLOCK_C, BLOCK_P, num_warps) on a GPU for maps of ``dtype`` with enough pixel blocks."""
    if dtype in (torch.float16, torch.bfloat16):
        return GPU_16BIT_BLOCK_C, GPU_16BIT_BLOCK_P, GPU_NUM_WARPS
    if dtype == torch.float64:
        return GPU_BLOCK_C, GPU_BLOCK_P // 2, GPU_NUM_WARPS
    return GPU_BLOCK_C, GPU_BLOCK_P, GPU_NUM_WARPS


def tiles(channels, pixels, batch, dtype, device):
    """(BLOCK_C, BLOCK_P, num_warps) for ``batch`` maps of ``channels`` x ``pixels`` of ``dtype``."""
    if interpreter():
        block_c, block_p, num_warps = INTERPRETER_BLOCK_C, INTERPRETER_BLOCK_P, 1
    else:
        block_c, block_p, num_warps = gpu_tile(dtype)
        if dtype != torch.float64:
            # Too few pixel blocks for the GPU (ADE at 128 x 128, say): halve the block and its warps
            # together, which keeps each thread's pixels and channels and so its register use.
            while num_warps > 1 and triton.cdiv(pixels, block_p) * batch < _programs_wanted(device):
                block_p //= 2
                num_warps //= 2
    block_c = min(block_c, triton.next_power_of_2(max(channels, 1)))
    block_p = min(block_p, max(16, triton.next_power_of_2(max(pixels, 1))))
    return block_c, block_p, num_warps


def gather_tiles(channels, pixels):
    """(BLOCK_C, BLOCK_P, num_warps) for kernels that interpolate each value from four addresses (the
    logit losses with size=): one pixel per thread on a GPU, where there are no contiguous packs to
    load and four pixels' taps spilled registers (python -m incseg_fast.triton.aot_check); 128-pixel
    blocks under the interpreter (fewer, larger numpy steps)."""
    if interpreter():
        block_c, block_p, num_warps = INTERPRETER_BLOCK_C, INTERPRETER_GATHER_BLOCK_P, 1
    else:
        block_c, block_p, num_warps = GPU_BLOCK_C, 32 * GPU_NUM_WARPS, GPU_NUM_WARPS
    block_c = min(block_c, triton.next_power_of_2(max(channels, 1)))
    block_p = min(block_p, max(16, triton.next_power_of_2(max(pixels, 1))))
    return block_c, block_p, num_warps


def channel_groups(channels, block_c, programs, device):
    """(channels per program, groups) splitting the channels across programs when the pixel blocks
    alone (``programs`` of them) are too few, as for deep features on small maps (2048 x 32 x 32).

    A group has at least 32 channels (16 under the interpreter; a multiple of ``block_c``), which
    bounds the per-group partial sums the attention kernels write to a small fraction of what they read.
    """
    min_channels = INTERPRETER_MIN_GROUP_CHANNELS if interpreter() else GPU_MIN_GROUP_CHANNELS
    most = max(1, triton.cdiv(channels, min_channels))
    groups = min(most, max(1, triton.cdiv(2 * _programs_wanted(device), programs)))
    per_group = triton.cdiv(triton.cdiv(channels, groups), block_c) * block_c
    return per_group, triton.cdiv(channels, per_group)


def reduction_block(parts):
    """Block of the one program that adds up ``parts`` per-program partials."""
    cap = 64 if interpreter() else 1024
    return min(cap, max(16, triton.next_power_of_2(parts)))


def accumulator_dtype(dtype):
    """float32 accumulation, float64 for float64 inputs (as torch and tl dtypes)."""
    if dtype == torch.float64:
        return torch.float64, tl.float64
    return torch.float32, tl.float32


def check_device(*tensors):
    """The kernels take CUDA tensors, or CPU tensors under the interpreter."""
    for tensor in tensors:
        if tensor is None:
            continue
        if tensor.device.type == "cuda" or (tensor.device.type == "cpu" and interpreter()):
            continue
        raise ValueError(
            f"the triton backend needs CUDA tensors (or CPU tensors with TRITON_INTERPRET=1), got {tensor.device}"
        )


def lowest(dtype):
    """NEG, the kernels' stand-in for -inf in running maxima and in lanes outside a set (so that
    exp(old_max - new_max) never computes inf - inf): the dtype's lowest finite value, below or equal
    to every finite logit. (It was -1e30, above logits of -1e36: their maximum came out -1e30, every
    exp 0 and the losses NaN.)"""
    return torch.finfo(dtype).min


def split_float(value):
    """Triton passes Python floats as float32: (high, low) float32 parts whose float64 sum is ``value``
    to ~48 bits, so float64 runs see alpha at (almost) full precision without a device tensor."""
    high = struct.unpack("f", struct.pack("f", value))[0]
    return high, value - high
