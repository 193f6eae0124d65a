"""A model of the H100 time of the hot CUDA kernels, from their code and their sm_90 SASS: `make gpu-model`.

    python tools/gpu_model.py [--batch 24]

Compiles csrc/cuda/*.cu for sm_90 (the release flags of tools/cuda_check.py, `--keep`), reads each
kernel's registers (ptxas -v) and its SASS (nvdisasm -gi of the kept cubin), and prints per kernel,
shape and dtype:

- regs, warps/SM: registers per thread, and the warps of 128-thread blocks an sm_90 SM holds with them
  (65536 registers allocated 256 per warp, at most 64 warps and 32 blocks; no kernel here is
  limited by shared memory).
- instr/elem: SASS instructions per element of the kernel's inner loops: the instructions from a
  loop's label to its back-branch (both sides of any branch inside) divided by the elements one
  iteration handles (channels per iteration, from the loop's loads, times pixels per thread). A loop
  is named by the source line of its back-branch (the `for` statement); where the compiler made
  several copies of one loop, the copy with the most loads is taken (the one with distillation on).
- B/px, min: DRAM bytes per pixel the code moves (what each thread loads and stores, each byte once:
  reuse across threads is assumed to hit the cache), and the least any implementation must move
  (every input read once, every output written once, no saved state).
- time: max(bytes / 3.0 TB/s, warp instructions / issue rate), the issue rate being 132 SMs x 4
  schedulers x 1 warp instruction per clock x 1.755 GHz. Warp instructions: the inner loops'
  instructions times their iterations, plus every instruction outside them once per thread (all
  branches counted), over 32 threads. `roofline` = bytes / 3.0 TB/s over that time.
- waves: the grid's blocks over the blocks the GPU holds at once (132 SMs x blocks per SM from the
  registers); a fraction above a whole number is a part-filled last wave, which the time ignores.
- interpolate rows: PyTorch's F.interpolate of x and y and its backward, by their bytes alone; a
  second table sets the size= kernels (forward and backward) against interpolate + the fused loss.

Shapes: voc512 (C=21, Co=16) and ade512 (C=151, Co=101) at 512 x 512; the size= kernels with logits
at strides 8 and 16 (64 x 64, 32 x 32); the attention kernels on features of 2048 channels at 64 x 64
(a 512 input at stride 8), their channel groups sized from the modelled occupancy as the CUDA glue
sizes them from the runtime's. Incremental loss modes (unbiased CE and KD, y at x's resolution, int64
labels, no mask); attention with gradients to f (g frozen). No GPU was used: the first GPU run holds
this against `ncu`.
"""

import argparse
import dataclasses
import fractions
import math
import os
import re
import shutil
import subprocess
import sys
import tempfile

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import cuda_check  # noqa: E402  (the nvcc flags, tools and parsers of make cuda-check)

ROOT = cuda_check.ROOT
ARCH = "90"

HBM_BYTES_PER_S = 3.0e12
SMS, SCHEDULERS_PER_SM, CLOCK_HZ = 132, 4, 1.755e9
ISSUE_RATE = SMS * SCHEDULERS_PER_SM * CLOCK_HZ  # warp instructions per second
WARP = 32
REGISTERS_PER_SM, REGISTER_UNIT, MAX_WARPS_PER_SM, MAX_BLOCKS_PER_SM = 65536, 256, 64, 32
BLOCK_THREADS = 128
LABEL_BYTES, STAT_BYTES = 8, 4  # int64 labels; float32 statistics (4 per pixel)


def resident_warps(registers, block_threads=BLOCK_THREADS):
    """Warps of one kernel an sm_90 SM holds at once, limited by registers, warps and blocks."""
    warps_per_block = block_threads // WARP
    per_warp = math.ceil(registers * WARP / REGISTER_UNIT) * REGISTER_UNIT
    blocks = min(
        REGISTERS_PER_SM // per_warp // warps_per_block, MAX_BLOCKS_PER_SM, MAX_WARPS_PER_SM // warps_per_block
    )
    return blocks * warps_per_block


def modelled_seconds(bytes_moved, warp_instructions):
    """max(memory time, issue time): (seconds, "memory" or "issue")."""
    memory, issue = bytes_moved / HBM_BYTES_PER_S, warp_instructions / ISSUE_RATE
    return (memory, "memory") if memory >= issue else (issue, "issue")


# --------------------------------------------------------------------------------------------------
# SASS: functions, their instructions and their loops
# --------------------------------------------------------------------------------------------------

_LABEL = re.compile(r"^(\.L_x_\d+):")
_BRANCH_TARGET = re.compile(r"`\((\.L_x_\d+)\)")
_LOAD_BITS = {"128": 128, "64": 64, "U16": 16, "S16": 16, "U8": 8, "S8": 8}


@dataclasses.dataclass
class Loop:
    first: int  # index of the loop label's first instruction
    last: int  # index of the back-branch
    source: tuple  # (file, line) of the back-branch
    loads: dict  # {bits: global loads in the body}

    @property
    def instructions(self):
        return self.last - self.first + 1


def load_bits(opcode):
    """The width of a global load (LDG), e.g. `LDG.E.128` -> 128; None for any other instruction."""
    parts = opcode.split(".")
    if parts[0] != "LDG":
        return None
    return next((_LOAD_BITS[p] for p in parts[1:] if p in _LOAD_BITS), 32)


def parse_sass(text):
    """`nvdisasm -c -gi` output -> {mangled function: (instructions, labels)}; an instruction is
    (opcode, branch target label or None, innermost (file, line) or None); labels map to indices."""
    functions = {}
    current = None
    source, in_source_block = None, False
    for line in text.splitlines():
        if m := cuda_check._SASS_FUNCTION.match(line):
            current = functions.setdefault(m.group(1), ([], {}))
            source, in_source_block = None, False
        elif current is None:
            continue
        elif m := _LABEL.match(line):
            current[1][m.group(1)] = len(current[0])
        elif m := cuda_check._SASS_SOURCE.match(line):
            if not in_source_block:
                source = (os.path.normpath(m.group(1)), int(m.group(2)))
            in_source_block = True
        else:
            in_source_block = False
            if m := cuda_check._SASS_INSTRUCTION.match(line):
                opcode = m.group(1)
                target = _BRANCH_TARGET.search(line) if opcode.startswith("BRA") else None
                current[0].append((opcode, target.group(1) if target else None, source))
    return functions


def innermost_loops(instructions, labels):
    """The loops (a branch back to an earlier label) that hold no other loop."""
    loops = []
    for i, (_, target, source) in enumerate(instructions):
        first = labels.get(target)
        if first is not None and first <= i:
            loads = {}
            for opcode, _, _ in instructions[first : i + 1]:
                if bits := load_bits(opcode):
                    loads[bits] = loads.get(bits, 0) + 1
            loops.append(Loop(first, i, source, loads))
    return [a for a in loops if not any(b is not a and a.first <= b.first and b.last <= a.last for b in loops)]


# --------------------------------------------------------------------------------------------------
# The kernels: what each thread moves and how many times each loop runs, from the code
# --------------------------------------------------------------------------------------------------


@dataclasses.dataclass
class LoopSpec:
    statement: str  # text on the loop's `for` line
    elements: float  # the elements (pixel x channel values) the loop handles, over all threads
    load_bits: int = 0  # width of the loads that count its channels per iteration
    loads_per_channel: int = 0  # such loads per channel (x and y rows, or interpolation samples)
    pixels: int = 1  # pixels per thread: elements per channel
    fixed: int = 0  # elements per iteration, where the code fixes it (then no loads are counted)


@dataclasses.dataclass
class KernelCase:
    label: str  # what the row is called
    kernel: str  # its short name in ptxas's report
    shape: str
    dtype: str
    threads: float
    pixels: float  # pixels the bytes are counted over
    bytes_per_pixel: float
    min_bytes_per_pixel: float
    loops: list


DTYPES = {"fp32": ("float", 4), "bf16": ("BFloat16", 2)}
LOGIT_SHAPES = {"voc512": (21, 16), "ade512": (151, 101)}
SIZE, STRIDES, FEATURES = 512, (8, 16), (2048, 64 * 64)
CELL_CHANNELS, CELL_STRIP_ROWS = 8, 4  # kCellChannels (fp32, bf16) and kStripRows of logit_losses_kernels.cuh


def logit_cases(batch, shape, dtype):
    C, Co = LOGIT_SHAPES[shape]
    t, s = DTYPES[dtype]
    k = 16 // s
    pixels = batch * SIZE * SIZE
    inputs = (C + Co) * s + LABEL_BYTES
    old = LoopSpec("c = 1; c < in.Co;", pixels * (Co - 1), 128, 2, k)
    new = LoopSpec("c = in.Co; c < in.C;", pixels * (C - Co), 128, 1, k)
    stats = 4 * STAT_BYTES
    return [
        KernelCase("logit forward", f"LogitForwardKernel<{t}, SamePixels<{t}, {t}, {k}>>", shape, dtype,
                   pixels / k, pixels, inputs + stats, inputs, [old, new]),
        KernelCase("logit backward", f"LogitBackwardKernel<{t}, {t}, {k}>", shape, dtype,
                   pixels / k, pixels, inputs + stats + C * s, inputs + C * s, [old, new]),
    ]  # fmt: skip


def upsampled_cases(batch, shape, dtype, stride):
    """The size= kernels with logits at 1/stride of the output: the forward, and the backward's
    kernels: UpsampledCellKernel over the old channels (y at x's resolution) and over the new ones
    (one thread per strip of CELL_STRIP_ROWS rows of a stride x stride cell and group of CELL_CHANNELS
    channels, which the last group of each range pads), then UpsampledGatherKernel (one thread per
    element of dL/dx: two row cells x their strips, three loads each)."""
    C, Co = LOGIT_SHAPES[shape]
    t, s = DTYPES[dtype]
    pixels = batch * SIZE * SIZE
    low_side = SIZE // stride
    low = low_side**2 / SIZE**2  # low-resolution samples per output pixel
    stats = 4 * STAT_BYTES
    strips = cell_strips(low_side, SIZE)
    corner_sums = C * strips * 4 * STAT_BYTES * low  # bytes per output pixel, written once and read once
    per_pixel = LABEL_BYTES + stats  # each cell kernel reads them
    name = f"{shape}_s{stride}"
    cells = batch * low_side**2 * strips
    cases = [
        KernelCase("size= forward", f"LogitForwardKernel<{t}, UpsampledPixel<{t}, {t}>>", name, dtype,
                   pixels, pixels, (C + Co) * s * low + LABEL_BYTES + stats, (C + Co) * s * low + LABEL_BYTES,
                   [LoopSpec("c = 1; c < in.Co;", pixels * (Co - 1), 8 * s, 8),
                    LoopSpec("c = in.Co; c < in.C;", pixels * (C - Co), 8 * s, 4)]),
    ]  # fmt: skip
    least = (C + Co + C) * s * low + LABEL_BYTES  # the whole backward's, on its first row
    for label, kernel, channels, read in (("old", 0, Co, 2 * Co), ("new", 2, C - Co, C - Co)):
        groups = math.ceil(channels / CELL_CHANNELS)
        cases.append(
            KernelCase(f"size= backward: {label} cells", f"UpsampledCellKernel<{t}, {t}, (CellChannels){kernel}>", name,
                       dtype, cells * groups, pixels, read * s * low + per_pixel + corner_sums * channels / C,
                       least if label == "old" else 0,
                       [LoopSpec("X < col_end", pixels * groups * CELL_CHANNELS, fixed=CELL_CHANNELS)])
        )  # fmt: skip
    cases.append(
        KernelCase("size= backward: gather", f"UpsampledGatherKernel<{t}, {t}>", name, dtype,
                   batch * C * low_side**2, pixels, corner_sums + C * s * low, 0,
                   [LoopSpec("strip < grad.cell_strips", batch * C * low_side**2 * 2 * strips, fixed=1)])
    )  # fmt: skip
    return cases


def cell_strips(low, out):
    """Strips per row cell of the size= backward: cell_strips (logit_losses_kernels.cuh), repeated here."""
    return math.ceil(math.ceil(out / low) / CELL_STRIP_ROWS)


def interpolate_cases(batch, shape, dtype, stride):
    """F.interpolate of x and y to the output, and its backward for x: memory-bound PyTorch kernels,
    modelled by their bytes alone (each element read and written once)."""
    C, Co = LOGIT_SHAPES[shape]
    _, s = DTYPES[dtype]
    pixels = batch * SIZE * SIZE
    low = (SIZE // stride) ** 2 / SIZE**2
    name = f"{shape}_s{stride}"
    return [
        KernelCase("interpolate x, y", "", name, dtype, 0, pixels, (C + Co) * s * (1 + low), 0, []),
        KernelCase("interpolate backward", "", name, dtype, 0, pixels, C * s * (1 + low), 0, []),
    ]


def attention_cases(batch, dtype, registers):
    """The attention feature passes; `registers` (by kernel short name) size their channel groups, as
    the CUDA glue does from the occupancy the runtime reports."""
    C, HW = FEATURES
    t, s = DTYPES[dtype]
    k = 16 // s
    pixels = batch * HW
    partials = C * STAT_BYTES / (WARP * k)  # per-warp channel partials, per pixel

    def loop(packs_per_channel):  # the feature passes' channel loop
        return [LoopSpec("c < s.c_end", pixels * C, 128, packs_per_channel, k)]

    def case(label, kernel, bytes_per_pixel, min_bytes, packs_per_channel):
        groups = attention_groups(batch, C, HW, k, registers[kernel])
        return KernelCase(label, kernel, f"feat{C}x64", dtype, pixels / k * groups, pixels,
                          bytes_per_pixel(groups), min_bytes, loop(packs_per_channel))  # fmt: skip

    return [
        case("AD moments (fwd)", f"MomentsKernel<{t}, {t}, {k}>", lambda g: 2 * C * s + g * 8 * 8, 2 * C * s, 2),
        case("AD feature grad (bwd)", f"FeatureGradKernel<{t}, {t}, {k}>",
             lambda g: 3 * C * s + 5 * STAT_BYTES + partials, 3 * C * s, 2),
        case("structured fwd", f"StructuredForwardKernel<{t}, {k}>", lambda g: 2 * C * s + STAT_BYTES,
             2 * C * s + STAT_BYTES, 1),
        case("structured bwd", f"StructuredBackwardKernel<{t}, {k}>",
             lambda g: 3 * C * s + STAT_BYTES * (1 + g) + partials, 3 * C * s + STAT_BYTES, 2),
    ]  # fmt: skip


def resident_blocks(registers):
    """128-thread blocks of a kernel of `registers` registers that the modelled H100 holds at once."""
    return SMS * resident_warps(registers) // (BLOCK_THREADS // WARP)


def channel_groups(blocks, resident, most):
    """channel_groups of attention_kernels.cuh, repeated here: none while `blocks` fill a wave; else of
    1 to `most` groups the count whose waves take least time, ceil(groups * blocks / resident) /
    groups, the fewest on a tie."""
    if blocks >= resident:
        return 1
    return min(range(1, most + 1), key=lambda g: (fractions.Fraction(-(-g * blocks // resident), g), g))


def attention_groups(batch, channels, pixels, pack, registers):
    """Channel groups of a feature pass: plan_attention's rule (attention_kernels.cuh), repeated here."""
    blocks = math.ceil(pixels / (BLOCK_THREADS * pack)) * batch
    most = max(1, min(channels // 128, 65535 // batch))
    group_channels = math.ceil(channels / channel_groups(blocks, resident_blocks(registers), most))
    return math.ceil(channels / group_channels)


# --------------------------------------------------------------------------------------------------
# The model
# --------------------------------------------------------------------------------------------------


@dataclasses.dataclass
class Row:
    case: KernelCase
    registers: int
    warps: int
    per_element: list  # instructions per element of each inner loop
    seconds: float
    bound: str
    roofline: float
    waves: float = 0.0  # the grid's blocks over those the GPU holds at once (0: not modelled)


def match_loop(loops, spec, source_text):
    """The loop of `spec` among a kernel's innermost loops: its back-branch on a line holding the
    statement; of several copies, the one with the most loads of the spec's width."""
    found = [
        loop
        for loop in loops
        if loop.source is not None
        and spec.statement in source_text(*loop.source)
        and "for (" in source_text(*loop.source)
    ]
    if not found:
        raise LookupError(f"no loop on a line with `{spec.statement}`")
    return max(found, key=lambda loop: (loop.loads.get(spec.load_bits, 0), loop.instructions))


def elements_per_iteration(loop, spec):
    if spec.fixed:
        return spec.fixed
    loads = loop.loads.get(spec.load_bits, 0)
    if loads == 0 or loads % spec.loads_per_channel:
        raise ValueError(f"loop `{spec.statement}`: {loads} loads of {spec.load_bits} bits, not whole channels")
    return loads // spec.loads_per_channel * spec.pixels


def memory_row(case):
    """A row of a PyTorch kernel modelled by its bytes alone."""
    seconds = case.bytes_per_pixel * case.pixels / HBM_BYTES_PER_S
    return Row(case, 0, 0, [], seconds, "memory", 1.0)


def model_row(case, function, registers, source_text):
    """One table row from a kernel's SASS (instructions, labels) and registers."""
    instructions, labels = function
    loops = innermost_loops(instructions, labels)
    matched = [(match_loop(loops, spec, source_text), spec) for spec in case.loops]
    in_loops = sum(loop.instructions for loop, _ in matched)
    thread_instructions = (len(instructions) - in_loops) * case.threads
    per_element = []
    for loop, spec in matched:
        elements = elements_per_iteration(loop, spec)
        per_element.append(loop.instructions / elements)
        thread_instructions += loop.instructions * spec.elements / elements
    bytes_moved = case.bytes_per_pixel * case.pixels
    seconds, bound = modelled_seconds(bytes_moved, thread_instructions / WARP)
    waves = math.ceil(case.threads / BLOCK_THREADS) / resident_blocks(registers)
    return Row(case, registers, resident_warps(registers), per_element, seconds, bound,
               bytes_moved / HBM_BYTES_PER_S / seconds, waves)  # fmt: skip


def format_table(rows):
    lines = [
        "| kernel | shape | dtype | regs | warps/SM | instr/elem (inner loops) | B/px (min) | time ms | bound "
        "| roofline | waves |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        c = r.case
        loops = " / ".join(f"{x:.0f}" for x in r.per_element) or "-"
        regs, warps = (r.registers, r.warps) if c.kernel else ("-", "-")
        lines.append(
            f"| {c.label} | {c.shape} | {c.dtype} | {regs} | {warps} | {loops} | "
            f"{c.bytes_per_pixel:.0f} ({c.min_bytes_per_pixel:.0f}) | {r.seconds * 1e3:.3f} | {r.bound} | "
            f"{r.roofline:.0%} | {f'{r.waves:.2f}' if r.waves else '-'} |"
        )
    return "\n".join(lines)


def format_comparison(rows):
    """size= (forward + the backward's kernels) against interpolate + the fused loss at full resolution
    (interpolate x and y, the logit forward and backward, interpolate's backward), per shape and dtype."""
    seconds = {(r.case.label, r.case.shape, r.case.dtype): r.seconds for r in rows}
    lines = ["| shape | dtype | size= fwd + bwd ms | interpolate + fused ms | ratio |", "|---|---|---|---|---|"]
    for label, shape, dtype in seconds:
        if label != "size= forward":
            continue
        full = shape.split("_")[0]
        fused = sum(t for (k, sh, dt), t in seconds.items() if k.startswith("size=") and (sh, dt) == (shape, dtype))
        unfused = seconds[("interpolate x, y", shape, dtype)] + seconds[("interpolate backward", shape, dtype)]
        unfused += seconds[("logit forward", full, dtype)] + seconds[("logit backward", full, dtype)]
        lines.append(f"| {shape} | {dtype} | {fused * 1e3:.3f} | {unfused * 1e3:.3f} | {fused / unfused:.2f} |")
    return "\n".join(lines)


def compile_sm90(path, nvcc, nvdisasm, tmp):
    """(registers by kernel short name, SASS functions by short name) of one .cu for sm_90."""
    keep = os.path.join(tmp, os.path.basename(path) + ".keep")
    os.makedirs(keep)
    command = [nvcc, "-c", path, "-o", os.path.join(keep, "out.o"), "-I", os.path.join(ROOT, "csrc"),
               *cuda_check.BUILD_NVCC_FLAGS, *cuda_check._nvcc_flags_from_torch(), "-Xptxas", "-v",
               "--keep", "--keep-dir", keep, "-gencode", f"arch=compute_{ARCH},code=sm_{ARCH}"]  # fmt: skip
    result = subprocess.run(command, capture_output=True, text=True, cwd=ROOT)
    if result.returncode != 0:
        raise RuntimeError(f"nvcc failed on {path}:\n{result.stderr[-2000:]}")
    kernels = [f for f in cuda_check.parse_ptxas(result.stdout + result.stderr) if f["entry"]]
    cubin = cuda_check.kept_cubins(keep, [ARCH])[f"sm_{ARCH}"]
    sass = parse_sass(subprocess.run([nvdisasm, "-c", "-gi", cubin], capture_output=True, text=True, check=True).stdout)
    names = cuda_check._demangle(list(sass) + [f["name"] for f in kernels])
    registers = {cuda_check._short_name(names[f["name"]]): f["registers"] for f in kernels}
    return registers, {cuda_check._short_name(names[n]): function for n, function in sass.items()}


def main(argv=None):
    parser = argparse.ArgumentParser(prog="tools/gpu_model.py", description=__doc__.split("\n")[0])
    parser.add_argument("--batch", type=int, default=24, help="images per batch (default 24)")
    args = parser.parse_args(argv)
    if args.batch < 1:
        parser.error(f"--batch must be at least 1, got {args.batch}")
    nvcc = shutil.which("nvcc")
    if nvcc is None:
        print("gpu-model: nvcc is not on PATH", file=sys.stderr)
        return 2
    nvdisasm = cuda_check.find_nvdisasm(nvcc)
    if nvdisasm is None:
        print("gpu-model: no nvdisasm (CUDA toolkit, or Triton's copy: pip install triton)", file=sys.stderr)
        return 2
    registers, functions = {}, {}
    with tempfile.TemporaryDirectory(prefix="incseg_gpu_model_") as tmp:
        for name in ("logit_losses_kernels.cu", "attention_kernels.cu"):
            r, f = compile_sm90(os.path.join(ROOT, "csrc", "cuda", name), nvcc, nvdisasm, tmp)
            registers.update(r)
            functions.update(f)
    files = {}

    def source_text(path, line):
        if path not in files:
            with open(path) as f:
                files[path] = f.read().splitlines()
        return files[path][line - 1] if 0 < line <= len(files[path]) else ""

    cases = []
    for shape in LOGIT_SHAPES:
        for dtype in DTYPES:
            cases += logit_cases(args.batch, shape, dtype)
            for stride in STRIDES:
                cases += upsampled_cases(args.batch, shape, dtype, stride)
                cases += interpolate_cases(args.batch, shape, dtype, stride)
    cases += [c for dtype in DTYPES for c in attention_cases(args.batch, dtype, registers)]
    rows = [model_row(c, functions[c.kernel], registers[c.kernel], source_text) if c.kernel else memory_row(c)
            for c in cases]  # fmt: skip
    print(f"Modelled H100 (sm_90 SASS, nvcc), batch {args.batch}: max(bytes / 3.0 TB/s, warp instructions / "
          f"{ISSUE_RATE:.3g} per s)\n")  # fmt: skip
    print(format_table(rows))
    print()
    print(format_comparison(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
