"""Check the CUDA code without a GPU: `make cuda-check`.

    python tools/cuda_check.py [--archs 80,90] [--jobs N] [FILE ...]

1. Every csrc/cuda/*.cu (the kernel launchers, nvcc only) is compiled for each architecture with
   the build's device flags (setup.py) and `-Werror all-warnings`; ptxas's resource report
   (`-Xptxas -v`) gives, for every kernel, its registers, shared memory, stack frame and spill
   bytes, printed per kernel. Any warning, any spill or a compile error fails the check.
   Each architecture's SASS (nvdisasm of the cubins nvcc keeps, with line info) gives every
   kernel's global stores by width. A packed kernel (one whose threads own 16-byte packs of pixels:
   PACKED_TEMPLATES below) must store 128 bits at a time; its only narrower stores may be the per-warp
   partials of common/grid.h's warp_sum_to (one value per warp by design, told apart by the line
   the store comes from). Any other store narrower than 128 bits there fails the check.
2. Every csrc/cuda/*.cpp (the torch glue, compiled by the host compiler) gets a syntax-only compile
   with CUDA enabled (-DINCSEG_WITH_CUDA), `-Wall -Wextra -Werror`, against torch's, CUDA's and
   Python's headers, so the `#if defined(INCSEG_WITH_CUDA)` half of the glue, which a CPU build never
   compiles, is checked too.

Files run in parallel (one job per file, --jobs of them at once). One summary line per file and a
final verdict; the exit status is non-zero on any failure. FILE arguments replace the default set.
Needs nvcc on PATH and a Python that imports torch (any build: only its headers are used).
"""

import argparse
import concurrent.futures
import glob
import importlib.util
import os
import re
import shlex
import shutil
import subprocess
import sys
import sysconfig
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# The device flags of setup.py's release build (keep the two in step), plus the flags torch's
# BuildExtension adds to every nvcc command (torch.utils.cpp_extension.COMMON_NVCC_FLAGS).
BUILD_NVCC_FLAGS = ["-O3", "-DNDEBUG", "-lineinfo", "-std=c++20"]
FALLBACK_TORCH_NVCC_FLAGS = [
    "-D__CUDA_NO_HALF_OPERATORS__",
    "-D__CUDA_NO_HALF_CONVERSIONS__",
    "-D__CUDA_NO_BFLOAT16_CONVERSIONS__",
    "-D__CUDA_NO_HALF2_OPERATORS__",
    "--expt-relaxed-constexpr",
]
GLUE_FLAGS = [
    "-fsyntax-only",
    "-std=c++20",
    "-fopenmp",
    "-Wall",
    "-Wextra",
    "-Werror",
    "-DINCSEG_WITH_CUDA",
    "-DTORCH_API_INCLUDE_EXTENSION_H",
    "-DTORCH_EXTENSION_NAME=_C",
]

# CUDA builds of torch generate c10/cuda/impl/cuda_cmake_macros.h at build time; the CPU wheel
# ships the c10/cuda headers without it. This is its whole content in a CUDA build; the check puts
# it in a temporary include directory so that the glue's <c10/cuda/...> includes resolve.
CUDA_CMAKE_MACROS_H = "#pragma once\n#define C10_CUDA_BUILD_SHARED_LIBS\n"

_ENTRY = re.compile(r"Compiling entry function '(\S+)' for '(sm_\w+)'")
_PROPERTIES = re.compile(r"Function properties for (\S+)")
_FRAME = re.compile(r"(\d+) bytes stack frame, (\d+) bytes spill stores, (\d+) bytes spill loads")
_USED = re.compile(r"Used (\d+) registers")
_SMEM = re.compile(r"(\d+) bytes smem")
_WARNING = re.compile(r"\bwarning\b", re.IGNORECASE)

# nvdisasm -c -gi: a function starts at its `.text.<mangled>:` label; `//## File "f", line n` lines
# (innermost first, then the lines it was inlined at) say where the instructions below come from.
_SASS_FUNCTION = re.compile(r"^\.text\.(\S+):\s*$")
_SASS_SOURCE = re.compile(r'^\s*//## File "([^"]+)", line (\d+)')
_SASS_INSTRUCTION = re.compile(r"^\s*/\*[0-9a-f]+\*/\s+(?:@!?U?P[T0-9]+\s+)?([A-Z][A-Z0-9_.]*)")
_STORE_BITS = {"128": 128, "64": 64, "U16": 16, "S16": 16, "U8": 8, "S8": 8}  # no width suffix: 32 bits
STORE_WIDTHS = (128, 64, 32, 16, 8)

# Kernels whose threads own kVec pixels (a 16-byte pack of each channel row) when the last template
# argument of one of these templates in their name is above 1; LogitForwardKernel's pixels are its
# SamePixels source's. Kernels with one pixel or one value per thread by design are not listed.
PACKED_TEMPLATES = (
    "LogitBackwardKernel",
    "SamePixels",
    "MomentsKernel",
    "SpatialEnergyKernel",
    "DirectLossKernel",
    "FeatureGradKernel",
    "StructuredForwardKernel",
    "StructuredBackwardKernel",
)
_PACKED = re.compile(r"(?:^|[<, ])(" + "|".join(PACKED_TEMPLATES) + r")<(?:[^<>]*, )?(\d+)>")
# The per-warp partial sums: one value per warp, stored by lane 0 (common/grid.h).
WARP_SUM_FILE, WARP_SUM_SIGNATURE = "common/grid.h", "void warp_sum_to("


def _nvcc_flags_from_torch():
    try:
        from torch.utils.cpp_extension import COMMON_NVCC_FLAGS
    except ImportError:
        return list(FALLBACK_TORCH_NVCC_FLAGS)
    return list(COMMON_NVCC_FLAGS)


def _short_name(demangled):
    """`void incseg::run_on_device<incseg::logit::K<float, 4>>(incseg::logit::K<float, 4>)` ->
    `K<float, 4>`: no return type, parameters, namespaces, nor launch.cuh's run_on_device wrapper."""
    name = demangled.strip()
    if name.endswith(")"):  # cut the parameter list at its matching parenthesis
        depth = 0
        for i in range(len(name) - 1, -1, -1):
            depth += {")": 1, "(": -1}.get(name[i], 0)
            if depth == 0:
                name = name[:i]
                break
    name = name.replace("(anonymous namespace)::", "")
    name = re.sub(r"\b[A-Za-z_]\w*::", "", name)
    while "> >" in name:  # c++filt's pre-C++11 spelling
        name = name.replace("> >", ">>")
    if name.startswith("void "):
        name = name[len("void ") :]
    if name.startswith("run_on_device<") and name.endswith(">"):  # launch.cuh's wrapper of a kernel body
        name = name[len("run_on_device<") : -1]
    return name


def _demangle(names):
    """Demangled names, through c++filt or cu++filt; the mangled ones where neither is installed."""
    names = sorted(set(names))
    tool = shutil.which("cu++filt") or shutil.which("c++filt")
    if not names or tool is None:
        return {n: n for n in names}
    result = subprocess.run([tool], input="\n".join(names) + "\n", capture_output=True, text=True)
    lines = result.stdout.splitlines()
    if result.returncode != 0 or len(lines) != len(names):
        return {n: n for n in names}
    return dict(zip(names, lines, strict=True))


def pixels_per_thread(short_name):
    """A packed kernel template's pixels per thread (`LogitBackwardKernel<float, 4>` -> 4); None for others."""
    m = _PACKED.search(short_name)
    return int(m.group(2)) if m else None


def store_bits(opcode):
    """The width in bits of a global (STG) or generic (ST) store opcode, e.g. `STG.E.128` -> 128; None for
    any other instruction (shared and local stores included)."""
    parts = opcode.split(".")
    if parts[0] not in ("STG", "ST"):
        return None
    return next((_STORE_BITS[p] for p in parts[1:] if p in _STORE_BITS), 32)


def parse_sass_stores(text):
    """`nvdisasm -c -gi` output -> {mangled function: [(bits, file, line)]}: every global store, its width
    and the innermost source line it was compiled from (file None where the SASS has no line info)."""
    stores = {}
    function, source, in_source_block = None, (None, 0), False
    for line in text.splitlines():
        if m := _SASS_FUNCTION.match(line):
            function, source, in_source_block = m.group(1), (None, 0), False
            stores.setdefault(function, [])
        elif m := _SASS_SOURCE.match(line):
            if not in_source_block:  # the first line of a block is the innermost location
                source = (os.path.normpath(m.group(1)), int(m.group(2)))
            in_source_block = True
        else:
            in_source_block = False
            m = _SASS_INSTRUCTION.match(line)
            if function is not None and m and (bits := store_bits(m.group(1))):
                stores[function].append((bits, *source))
    return stores


def function_lines(text, signature):
    """The line numbers (1-based) of the function whose definition line contains `signature`, through its
    closing brace at column 0."""
    lines = text.splitlines()
    first = next(i for i, line in enumerate(lines) if signature in line)
    last = next(i for i in range(first, len(lines)) if lines[i].rstrip() == "}")
    return range(first + 1, last + 2)


def count_stores(stores, warp_sum_lines):
    """[(bits, file, line)] -> ({bits: count} of the stores that are not per-warp partials, per-warp count)."""
    counts = dict.fromkeys(STORE_WIDTHS, 0)
    warp = 0
    for bits, file, line in stores:
        if file is not None and file.endswith(os.sep + WARP_SUM_FILE) and line in warp_sum_lines:
            warp += 1
        else:
            counts[bits] += 1
    return counts, warp


def unmatched_packed_templates(kernels):
    """The names in PACKED_TEMPLATES that no kernel record's short name uses with more than one pixel per
    thread: a renamed kernel would otherwise leave the store rule silently unchecked."""
    used = {m.group(1) for k in kernels for m in _PACKED.finditer(k["short"]) if int(m.group(2)) > 1}
    return [name for name in PACKED_TEMPLATES if name not in used]


def narrow_packed_stores(record):
    """The stores narrower than 128 bits of a packed kernel's record (0 for other kernels)."""
    if (pixels_per_thread(record["short"]) or 1) == 1:
        return 0
    return sum(n for bits, n in record["stores"].items() if bits < 128)


def parse_ptxas(text):
    """ptxas -v output -> [{"name", "arch", "registers", "smem", "stack", "spill_stores", "spill_loads",
    "entry"}], one per kernel and architecture (and per non-inlined device function, entry False)."""
    functions = {}
    entry = arch = None
    target = None
    for line in text.splitlines():
        if m := _ENTRY.search(line):
            entry, arch = m.groups()
            functions[(entry, arch)] = {
                "name": entry,
                "arch": arch,
                "entry": True,
                "registers": 0,
                "smem": 0,
                "stack": 0,
                "spill_stores": 0,
                "spill_loads": 0,
            }
        elif m := _PROPERTIES.search(line):
            target = (m.group(1), arch)
            functions.setdefault(
                target,
                {
                    "name": m.group(1),
                    "arch": arch,
                    "entry": False,
                    "registers": 0,
                    "smem": 0,
                    "stack": 0,
                    "spill_stores": 0,
                    "spill_loads": 0,
                },
            )
        elif (m := _FRAME.search(line)) and target in functions:
            record = functions[target]
            record["stack"], record["spill_stores"], record["spill_loads"] = map(int, m.groups())
        elif (m := _USED.search(line)) and (entry, arch) in functions:
            record = functions[(entry, arch)]
            record["registers"] = int(m.group(1))
            if s := _SMEM.search(line):
                record["smem"] = int(s.group(1))
    return list(functions.values())


def _warnings(text):
    return [
        line
        for line in text.splitlines()
        if _WARNING.search(line) and "ptxas info" not in line and not line.startswith("Remark")
    ]


def find_nvdisasm(nvcc):
    """nvdisasm from PATH, the toolkit of nvcc, or the copy Triton ships (a dev requirement); None if none."""
    candidates = [shutil.which("nvdisasm"), os.path.join(os.path.dirname(os.path.realpath(nvcc)), "nvdisasm")]
    if os.environ.get("CUDA_HOME"):
        candidates.append(os.path.join(os.environ["CUDA_HOME"], "bin", "nvdisasm"))
    spec = importlib.util.find_spec("triton")
    if spec is not None and spec.submodule_search_locations:
        for location in spec.submodule_search_locations:
            candidates.append(os.path.join(location, "backends", "nvidia", "bin", "nvdisasm"))
    return next((c for c in candidates if c and os.access(c, os.X_OK)), None)


def kept_cubins(keep_dir, archs):
    """{"sm_XX": path} of the cubins `nvcc --keep` left: `<file>.compute_XX.cubin`, or `<file>.cubin` when
    it compiled for one architecture only."""
    found = {}
    for cubin in sorted(glob.glob(os.path.join(keep_dir, "*.cubin"))):
        m = re.search(r"\.(?:compute|sm)_(\d+)a?\.cubin$", cubin)
        if m or len(archs) == 1:
            found["sm_" + (m.group(1) if m else archs[0])] = cubin
    return found


def sass_stores(keep_dir, archs, nvdisasm):
    """{(mangled kernel, "sm_XX"): [(bits, file, line)]} from the cubins nvcc kept, or a problem string."""
    found = {}
    cubins = kept_cubins(keep_dir, archs)
    if sorted(cubins) != sorted(f"sm_{a}" for a in archs):
        return f"nvcc kept cubins for {', '.join(sorted(cubins)) or 'no architecture'}"
    for arch, cubin in cubins.items():
        result = subprocess.run([nvdisasm, "-c", "-gi", cubin], capture_output=True, text=True)
        if result.returncode != 0:
            return f"nvdisasm failed on {os.path.basename(cubin)}: {result.stderr.strip()[:200]}"
        for name, stores in parse_sass_stores(result.stdout).items():
            found[(name, arch)] = stores
    return found


def _store_columns(f):
    if "stores" not in f:
        return " " * 31
    return " " + "".join(f"{f['stores'][bits]:>5}" for bits in STORE_WIDTHS) + f"{f['warp_stores']:>5}"


def check_kernels(path, archs, nvcc, nvdisasm, torch_flags, tmp):
    """Compile one .cu for every arch; returns (ok, summary, details, kernel records)."""
    begin = time.monotonic()
    obj = os.path.join(tmp, os.path.basename(path) + ".o")
    keep_dir = os.path.join(tmp, os.path.basename(path) + ".keep")
    os.makedirs(keep_dir)
    command = [
        nvcc,
        "-c",
        path,
        "-o",
        obj,
        "-I",
        os.path.join(ROOT, "csrc"),
        *BUILD_NVCC_FLAGS,
        *torch_flags,
        "-Werror",
        "all-warnings",
        "-Xptxas",
        "-v",
        "--keep",
        "--keep-dir",
        keep_dir,
    ]
    for arch in archs:
        command += ["-gencode", f"arch=compute_{arch},code=sm_{arch}"]
    result = subprocess.run(command, capture_output=True, text=True, cwd=ROOT)
    output = result.stdout + result.stderr
    seconds = time.monotonic() - begin
    functions = parse_ptxas(output)
    names = _demangle(f["name"] for f in functions)
    for f in functions:
        f["short"] = _short_name(names[f["name"]])
    functions.sort(key=lambda f: (not f["entry"], f["short"], f["arch"]))
    kernels = [f for f in functions if f["entry"]]
    spilling = [f for f in functions if f["spill_stores"] or f["spill_loads"]]
    warnings = _warnings(output)
    problems = []
    if result.returncode == 0:
        stores = sass_stores(keep_dir, archs, nvdisasm)
        if isinstance(stores, str):
            problems.append(stores)
            stores = {}
        with open(os.path.join(ROOT, "csrc", WARP_SUM_FILE)) as source:
            warp_sum_lines = function_lines(source.read(), WARP_SUM_SIGNATURE)
        for f in kernels:
            if (f["name"], f["arch"]) in stores:
                f["stores"], f["warp_stores"] = count_stores(stores[(f["name"], f["arch"])], warp_sum_lines)
            else:
                problems.append(f"no SASS for {f['short']} ({f['arch']})")
    narrow = [f for f in kernels if "stores" in f and narrow_packed_stores(f)]

    count = len({f["name"] for f in kernels})
    lines = [f"{_rel(path)}  ({count} kernel{'' if count == 1 else 's'})"]
    if functions:
        widths = "".join(f"{'st' + str(bits):>5}" for bits in STORE_WIDTHS)
        lines.append(f"  {'arch':<7}{'regs':>5}{'smem B':>8}{'stack B':>9}{'spill st/ld B':>15} {widths} warp  kernel")
    for f in functions:
        flag = "  <-- SPILL" if f in spilling else ""
        flag += "  <-- NARROW STORES IN A PACKED KERNEL" if f in narrow else ""
        kind = "" if f["entry"] else "  (device function)"
        lines.append(
            f"  {f['arch']:<7}{f['registers']:>5}{f['smem']:>8}{f['stack']:>9}"
            f"{f['spill_stores']:>8}/{f['spill_loads']:<6}{_store_columns(f)}  {f['short']}{kind}{flag}"
        )
    if result.returncode != 0:
        problems.append(f"nvcc exit status {result.returncode}")
    if warnings:
        problems.append(f"{len(warnings)} warning line(s)")
    if spilling:
        problems.append(
            "spills in "
            + ", ".join(
                sorted(
                    {
                        f"{f['short']} ({f['arch']}: {f['spill_stores']} B stored, {f['spill_loads']} B loaded)"
                        for f in spilling
                    }
                )
            )
        )
    if narrow:
        problems.append(
            "stores narrower than 128 bits in packed kernels: "
            + ", ".join(f"{f['short']} ({f['arch']}: {narrow_packed_stores(f)})" for f in narrow)
        )
    # a file that launches kernels must show them (else the report was not parsed); build_info.cu launches none
    with open(path, encoding="utf-8") as source:
        launches = "run_on_device" in source.read()
    if result.returncode == 0 and launches and not kernels:
        problems.append("no kernel in ptxas's report")
    if problems or result.returncode != 0:
        diagnostics = [line for line in output.splitlines() if "ptxas info" not in line and not _FRAME.search(line)]
        if diagnostics:
            lines.append("  compiler output (without ptxas info):")
            lines += ["    " + line for line in diagnostics[:60]]
            if len(diagnostics) > 60:
                lines.append(f"    ... {len(diagnostics) - 60} more lines")
    archs_text = ",".join(f"sm_{a}" for a in archs)
    if problems:
        summary = f"FAIL  {_rel(path)}: " + "; ".join(problems) + f" ({seconds:.1f} s)"
    else:
        most = max((f["registers"] for f in kernels), default=0)
        packed = len({f["name"] for f in kernels if (pixels_per_thread(f["short"]) or 1) > 1})
        summary = (
            f"ok    {_rel(path)}: {count} kernel{'' if count == 1 else 's'} x {archs_text}, no warning, "
            f"no spill, at most {most} registers, {packed} packed kernels store 128 bits at a time ({seconds:.1f} s)"
        )
    return not problems, summary, lines, kernels


def check_glue(path, compiler, includes):
    """Syntax-check one glue .cpp with INCSEG_WITH_CUDA; returns (ok, summary, details)."""
    begin = time.monotonic()
    command = [compiler, *GLUE_FLAGS, "-I", os.path.join(ROOT, "csrc")]
    for directory in includes:
        command += ["-isystem", directory]
    result = subprocess.run(command + [path], capture_output=True, text=True, cwd=ROOT)
    seconds = time.monotonic() - begin
    output = (result.stdout + result.stderr).splitlines()
    if result.returncode == 0 and not output:
        return (
            True,
            f"ok    {_rel(path)}: host syntax check with INCSEG_WITH_CUDA, no warning ({seconds:.1f} s)",
            [],
            [],
        )
    lines = [f"{_rel(path)}: {compiler} -fsyntax-only -DINCSEG_WITH_CUDA"] + ["    " + line for line in output[:60]]
    if len(output) > 60:
        lines.append(f"    ... {len(output) - 60} more lines")
    reason = f"exit status {result.returncode}" if result.returncode else "compiler output"
    return False, f"FAIL  {_rel(path)}: host syntax check ({reason}; {seconds:.1f} s)", lines, []


def _rel(path):
    return os.path.relpath(path, ROOT) if os.path.abspath(path).startswith(ROOT + os.sep) else path


def _cuda_includes(nvcc, tmp):
    """The include directories nvcc itself passes to the host compiler (from `nvcc --dryrun`; nvcc
    may be a wrapper script outside the toolkit, and CUDA 13 keeps CCCL in include/cccl)."""
    empty = os.path.join(tmp, "empty.cu")
    open(empty, "w").close()
    result = subprocess.run([nvcc, "--dryrun", "-c", empty, "-o", empty + ".o"], capture_output=True, text=True)
    found = []
    for line in (result.stdout + result.stderr).splitlines():
        m = re.match(r"#\$ (?:SYSTEM_)?INCLUDES=(.*)", line.strip())
        if m:
            words = shlex.split(m.group(1))
            found += [w[2:] if w.startswith("-I") else w for w in words if w not in ("-I", "-isystem")]
    found = [os.path.normpath(d) for d in found if d and os.path.isdir(d)]
    if not found:  # an older nvcc: the toolkit's include directory next to its bin/
        home = os.environ.get("CUDA_HOME") or os.path.dirname(os.path.dirname(os.path.realpath(nvcc)))
        found = [os.path.join(home, "include")]
    return list(dict.fromkeys(found))


def _glue_includes(nvcc, tmp, macros_dir):
    from torch.utils.cpp_extension import include_paths

    return [macros_dir, *include_paths(), *_cuda_includes(nvcc, tmp), sysconfig.get_paths()["include"]]


def main(argv=None):
    parser = argparse.ArgumentParser(prog="tools/cuda_check.py", description=__doc__.split("\n")[0])
    parser.add_argument("files", nargs="*", help="files to check (default: csrc/cuda/*.cu and csrc/cuda/*.cpp)")
    parser.add_argument("--archs", default="80,90", help="compute capabilities, comma-separated (default 80,90)")
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 1, help="files compiled at once")
    args = parser.parse_args(argv)
    archs = [a.strip().replace(".", "") for a in args.archs.split(",") if a.strip()]

    nvcc = shutil.which("nvcc")
    if nvcc is None:
        print("cuda-check: FAIL: nvcc is not on PATH", file=sys.stderr)
        return 2
    nvdisasm = find_nvdisasm(nvcc)
    if nvdisasm is None:
        print("cuda-check: FAIL: no nvdisasm (CUDA toolkit, or Triton's copy: pip install triton)", file=sys.stderr)
        return 2
    try:
        import torch  # noqa: F401  (its headers and nvcc flags)
    except ImportError:
        print(f"cuda-check: FAIL: {sys.executable} cannot import torch (its headers are needed)", file=sys.stderr)
        return 2
    files = args.files or sorted(
        glob.glob(os.path.join(ROOT, "csrc/cuda/*.cu")) + glob.glob(os.path.join(ROOT, "csrc/cuda/*.cpp"))
    )
    files = [os.path.abspath(f) for f in files]
    unknown = [f for f in files if not f.endswith((".cu", ".cpp"))]
    if unknown or not files:
        print(f"cuda-check: FAIL: nothing to check or not a .cu/.cpp file: {' '.join(unknown)}", file=sys.stderr)
        return 2

    begin = time.monotonic()
    version = subprocess.run([nvcc, "--version"], capture_output=True, text=True).stdout.strip().splitlines()
    compiler = os.environ.get("CXX", "c++")
    print(
        f"cuda-check: {len(files)} files, {version[-1] if version else nvcc}; host compiler {compiler}; "
        f"archs {','.join('sm_' + a for a in archs)}; {args.jobs} jobs",
        flush=True,
    )
    with tempfile.TemporaryDirectory(prefix="incseg_cuda_check_") as tmp:
        macros_dir = os.path.join(tmp, "include")
        os.makedirs(os.path.join(macros_dir, "c10/cuda/impl"))
        with open(os.path.join(macros_dir, "c10/cuda/impl/cuda_cmake_macros.h"), "w") as f:
            f.write(CUDA_CMAKE_MACROS_H)
        includes = _glue_includes(nvcc, tmp, macros_dir)
        torch_flags = _nvcc_flags_from_torch()
        with concurrent.futures.ThreadPoolExecutor(max_workers=max(1, args.jobs)) as pool:
            futures = [
                pool.submit(check_kernels, f, archs, nvcc, nvdisasm, torch_flags, tmp)
                if f.endswith(".cu")
                else pool.submit(check_glue, f, compiler, includes)
                for f in files
            ]
            results = [future.result() for future in futures]

    for _, _, details, _ in results:
        if details:
            print("\n" + "\n".join(details))
    print()
    for _, summary, _, _ in results:
        print(summary)
    failed = sum(not ok for ok, _, _, _ in results)
    if not args.files and (stale := unmatched_packed_templates([k for *_, kernels in results for k in kernels])):
        print(f"FAIL  PACKED_TEMPLATES names no compiled kernel: {', '.join(stale)} (renamed? update the list)")
        failed += 1
    seconds = time.monotonic() - begin
    if failed:
        print(f"cuda-check: FAIL ({failed} of {len(files)} files; {seconds:.1f} s)")
        return 1
    print(f"cuda-check: PASS ({len(files)} files; {seconds:.1f} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
