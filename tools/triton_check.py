"""Check the Triton kernels for a GPU without one: `make cuda-check` (after tools/cuda_check.py).

    python tools/triton_check.py [--arch 90] [--quick] [--jobs N]

Every kernel variant the Triton launchers use (incseg_fast.triton.aot_check's list) is compiled by
Triton for sm_<arch> with the launchers' options (the real compiler, not the interpreter), then

1. its PTX must round every float32 product before adding it (aot_check.contracted_products: the
   kernels are compiled with enable_fp_fusion=False, so alpha * y is rounded as in the forward's
   maximum, as on the CPU and in the CUDA kernels);
2. nvcc's ptxas (the one tools/cuda_check.py uses) assembles that PTX with `-v --fmad=false`: the
   registers, stack frame and spill bytes of each kernel, printed per kernel. A kernel fails if it
   spills at the 255-register ceiling (it needs more registers than a thread has) or spills more
   than SPILL_TOLERANCE bytes; every spill and every kernel at the ceiling is flagged. (CUDA 13's
   ptxas caps a 128-thread kernel at 168 registers, three blocks per SM, and may spill a few bytes
   to stay there: a trade of its own for occupancy, which CUDA 12.8's makes without spilling.)

One line per kernel and a final verdict; the exit status is non-zero on any failure. Needs ptxas on
PATH (next to nvcc; --ptxas names another, e.g. the one bundled with the GPU machines' Triton) and
Triton; no GPU. The PTX is generated for the PTX ISA version of that ptxas.
"""

import argparse
import concurrent.futures
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
REGISTER_CEILING = 255  # per thread, on every architecture Triton compiles for
SPILL_TOLERANCE = 16  # bytes stored or loaded by a kernel below the ceiling (ptxas's occupancy trade)

sys.path.insert(0, ROOT)  # this checkout's package, even where another one is installed

from cuda_check import parse_ptxas  # noqa: E402  (tools/, next to this file)


def _ptx_version(ptxas):
    """The newest PTX ISA version ``ptxas`` reads, in Triton's notation (13.0 -> 90)."""
    from triton.backends.nvidia.compiler import ptx_get_version

    report = subprocess.run([ptxas, "--version"], capture_output=True, text=True, check=True).stdout
    return ptx_get_version(re.search(r"release (\d+\.\d+)", report).group(1))


def _assemble(ptxas, ptx, tmp, index):
    """ptxas -v on one kernel's PTX: (exit status, its report, the kernel's record or None)."""
    source = os.path.join(tmp, f"kernel{index}.ptx")
    with open(source, "w") as handle:
        handle.write(ptx)
    target = re.search(r"^\.target\s+(\w+)", ptx, re.MULTILINE).group(1)
    command = [ptxas, "-v", "--fmad=false", "--gpu-name", target, source, "-o", source + ".cubin"]
    result = subprocess.run(command, capture_output=True, text=True)
    report = result.stdout + result.stderr
    entries = [f for f in parse_ptxas(report) if f["entry"]]
    return result.returncode, report, entries[0] if entries else None


def _verdict(label, contracted, assembled):
    """(problems, table line) of one kernel."""
    status, report, record = assembled
    problems = []
    if contracted:
        problems.append(f"{len(contracted)} unrounded float32 products in the PTX, e.g. {contracted[0]}")
    if status != 0 or record is None:
        problems.append(f"ptxas exit status {status}: {report.strip()[-400:]}")
        return problems, f"  {'-':>5}{'-':>9}{'-':>15}  {label}"
    spilled = max(record["spill_stores"], record["spill_loads"])
    at_ceiling = record["registers"] >= REGISTER_CEILING
    if spilled and (at_ceiling or spilled > SPILL_TOLERANCE):
        problems.append(f"spills {record['spill_stores']} B stored, {record['spill_loads']} B loaded")
    flag = "  <-- spill" if spilled else ""
    if at_ceiling:
        flag += f"  <-- at the {REGISTER_CEILING}-register ceiling"
    line = (
        f"  {record['registers']:>5}{record['stack']:>9}{record['spill_stores']:>8}/{record['spill_loads']:<6}"
        f"  {label}{flag}"
    )
    return problems, line


def main(argv=None):
    parser = argparse.ArgumentParser(prog="tools/triton_check.py", description=__doc__.split("\n")[0])
    parser.add_argument("--arch", type=int, default=90, help="CUDA compute capability x 10 (default 90)")
    parser.add_argument("--quick", action="store_true", help="a representative subset of the variants")
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 1, help="ptxas runs at once")
    parser.add_argument("--ptxas", default="ptxas", help="the ptxas to assemble with (default: the one on PATH)")
    args = parser.parse_args(argv)
    ptxas = shutil.which(args.ptxas)
    if ptxas is None:
        print(f"triton-check: FAIL: ptxas not found: {args.ptxas} (CUDA's is next to nvcc)", file=sys.stderr)
        return 2
    os.environ.pop("TRITON_INTERPRET", None)  # read when the kernels are decorated, at this import
    try:
        from incseg_fast.triton import aot_check
    except ImportError as error:
        print(f"triton-check: FAIL: {sys.executable} cannot import triton: {error}", file=sys.stderr)
        return 2

    begin = time.monotonic()
    ptx_version = _ptx_version(ptxas)
    print(f"triton-check: Triton kernels for sm_{args.arch}, PTX {ptx_version / 10:.1f}, {ptxas}", flush=True)
    rows, failures = [], []
    with tempfile.TemporaryDirectory(prefix="incseg_triton_check_") as tmp:
        with concurrent.futures.ThreadPoolExecutor(max_workers=max(1, args.jobs)) as pool:
            compiled = aot_check.compiled_kernels(args.quick, args.arch, ptx_version=ptx_version)
            for index, (label, kernel) in enumerate(compiled):
                if isinstance(kernel, Exception):
                    failures.append(f"{label}: {type(kernel).__name__}: {kernel}")
                    continue
                ptx = kernel.asm["ptx"]
                rows.append((label, aot_check.contracted_products(ptx), pool.submit(_assemble, ptxas, ptx, tmp, index)))
            print(f"  {'regs':>5}{'stack B':>9}{'spill st/ld B':>15}  kernel")
            for label, contracted, assembled in rows:
                problems, line = _verdict(label, contracted, assembled.result())
                print(line)
                failures += [f"{label}: {problem}" for problem in problems]
    seconds = time.monotonic() - begin
    for failure in failures:
        print(f"FAIL  {failure}")
    verdict = f"FAIL ({len(failures)} problems" if failures else "PASS (no register-bound spill, no unrounded product"
    print(f"triton-check: {verdict}; {len(rows)} kernels compiled; {seconds:.1f} s)")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
