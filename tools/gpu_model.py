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

Shapes: voc512 (C=21, Co=16) and ade512 (C=151, Co=101) at 512 x 512; the size= kernels with logits
at stride 8 (64 x 64); the attention kernels on features of 2048 channels at 64 x 64 (a 512 input at
stride 8). Incremental loss modes (unbiased CE and KD, int64 labels, no mask); attention with
gradients to f (g frozen). No GPU was used: the first GPU run holds this against `ncu`.
"""

import argparse
import dataclasses
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
SIZE, STRIDE, FEATURES = 512, 8, (2048, 64 * 64)


def logit_cases(batch, shape, dtype):
    C, Co = LOGIT_SHAPES[shape]
    t, s = DTYPES[dtype]
    k = 16 // s
    pixels = batch * SIZE * SIZE
    inputs = (C + Co) * s + LABEL_BYTES
    old = LoopSpec("c = 1; c < in.Co;", pixels * (Co - 1), 128, 2, k)
    new = LoopSpec("c = in.Co; c < in.C;", pixels * (C - Co), 128, 1, k)
    stats = 4 * STAT_BYTES
    low = (SIZE // STRIDE) ** 2 / SIZE**2  # low-resolution samples per output pixel
    gather_visits = (2 * STRIDE) ** 2  # output pixels whose taps read one low-resolution element
    return [
        KernelCase("logit forward", f"LogitForwardKernel<{t}, SamePixels<{t}, {t}, {k}>>", shape, dtype,
                   pixels / k, pixels, inputs + stats, inputs, [old, new]),
        KernelCase("logit backward", f"LogitBackwardKernel<{t}, {t}, {k}>", shape, dtype,
                   pixels / k, pixels, inputs + stats + C * s, inputs + C * s, [old, new]),
        KernelCase("size= forward", f"LogitForwardKernel<{t}, UpsampledPixel<{t}, {t}>>", shape + "_s8", dtype,
                   pixels, pixels, (C + Co) * s * low + LABEL_BYTES + stats, (C + Co) * s * low + LABEL_BYTES,
                   [LoopSpec("c = 1; c < in.Co;", pixels * (Co - 1), 8 * s, 8),
                    LoopSpec("c = in.Co; c < in.C;", pixels * (C - Co), 8 * s, 4)]),
        KernelCase("size= backward", f"UpsampledBackwardKernel<{t}, {t}>", shape + "_s8", dtype,
                   pixels * low * math.ceil(C / 8), pixels, (C + Co + C) * s * low + LABEL_BYTES + stats,
                   (C + Co + C) * s * low + LABEL_BYTES,
                   [LoopSpec("X < col_end", pixels * low * math.ceil(C / 8) * gather_visits * 8, fixed=8)]),
    ]  # fmt: skip


def attention_cases(batch, dtype):
    C, HW = FEATURES
    t, s = DTYPES[dtype]
    k = 16 // s
    pixels = batch * HW
    groups = attention_groups(batch, C, HW, k)
    partials = C * STAT_BYTES / (WARP * k)  # per-warp channel partials, per pixel

    def loop(packs_per_channel):  # the feature passes' channel loop
        return [LoopSpec("c < s.c_end", pixels * C, 128, packs_per_channel, k)]

    shape = f"feat{C}x64"
    return [
        KernelCase("AD moments (fwd)", f"MomentsKernel<{t}, {t}, {k}>", shape, dtype, pixels / k * groups, pixels,
                   2 * C * s + groups * 8 * 8, 2 * C * s, loop(2)),
        KernelCase("AD feature grad (bwd)", f"FeatureGradKernel<{t}, {t}, {k}>", shape, dtype, pixels / k * groups,
                   pixels, 3 * C * s + 5 * STAT_BYTES + partials, 3 * C * s, loop(2)),
        KernelCase("structured fwd", f"StructuredForwardKernel<{t}, {k}>", shape, dtype, pixels / k * groups,
                   pixels, 2 * C * s + STAT_BYTES, 2 * C * s + STAT_BYTES, loop(1)),
        KernelCase("structured bwd", f"StructuredBackwardKernel<{t}, {k}>", shape, dtype, pixels / k * groups,
                   pixels, 3 * C * s + STAT_BYTES * (1 + groups) + partials, 3 * C * s + STAT_BYTES, loop(2)),
    ]  # fmt: skip


def attention_groups(batch, channels, pixels, pack):
    """Channel groups of a feature pass: plan_attention's rule (attention_kernels.cuh), repeated here."""
    grid_x = math.ceil(pixels / (BLOCK_THREADS * pack))
    wanted = math.ceil(1024 / (grid_x * batch))
    most = max(1, min(channels // 128, 65535 // batch))
    group_channels = math.ceil(channels / min(wanted, most))
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
    return Row(case, registers, resident_warps(registers), per_element, seconds, bound,
               bytes_moved / HBM_BYTES_PER_S / seconds)  # fmt: skip


def format_table(rows):
    lines = [
        "| kernel | shape | dtype | regs | warps/SM | instr/elem (inner loops) | B/px (min) | time ms | bound "
        "| roofline |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        c = r.case
        loops = " / ".join(f"{x:.0f}" for x in r.per_element)
        lines.append(
            f"| {c.label} | {c.shape} | {c.dtype} | {r.registers} | {r.warps} | {loops} | "
            f"{c.bytes_per_pixel:.0f} ({c.min_bytes_per_pixel:.0f}) | {r.seconds * 1e3:.3f} | {r.bound} | "
            f"{r.roofline:.0%} |"
        )
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

    cases = [c for shape in LOGIT_SHAPES for dtype in DTYPES for c in logit_cases(args.batch, shape, dtype)]
    cases += [c for dtype in DTYPES for c in attention_cases(args.batch, dtype)]
    rows = [model_row(c, functions[c.kernel], registers[c.kernel], source_text) for c in cases]
    print(f"Modelled H100 (sm_90 SASS, nvcc), batch {args.batch}: max(bytes / 3.0 TB/s, warp instructions / "
          f"{ISSUE_RATE:.3g} per s)\n")  # fmt: skip
    print(format_table(rows))
    return 0


if __name__ == "__main__":
    sys.exit(main())
