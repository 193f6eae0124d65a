"""Everything that needs a GPU, in one call on a bare GPU machine: `make gpu-check OUT=<folder>`.

    python3 tools/gpu_check.py OUT [--budget-s 420]

Run it with the python3 whose torch has CUDA (not .venv, which has the CPU build); it installs
nothing and needs no network. It stops at once, before building anything, when OUT is missing,
torch does not import or torch.cuda.is_available() is false. Otherwise, in order:

  1. device and versions: GPU name, compute capability, SMs, memory, driver; python, torch, CUDA,
     Triton, nvcc and compute-sanitizer versions;
  2. build: `python3 setup.py build_ext --inplace` for the local GPU only (TORCH_CUDA_ARCH_LIST from
     the device, MAX_JOBS=16, INCSEG_FORCE_CUDA=1 so that a missing toolkit fails loudly), then
     checks that incseg_fast.ops.HAS_CUDA_KERNELS is true;
  3. tests: the parity, op and Triton suites, their cuda/triton/gpu parametrisations (TEST_SELECTION);
  4. compute-sanitizer memcheck on tools/gpu_smoke.py (every op of the cuda backend, forward and
     backward, checked against the float64 reference), with torch's caching allocator off so that
     every tensor is its own allocation and an out-of-bounds access cannot land in a neighbour;
  5. the benchmark report on CUDA, float32 then bfloat16 (BENCH_SIZES).

Later steps run even when an earlier one failed, where they can (nothing runs without a build).
Each step gets a share of a total time budget (--budget-s, default 420 s, so that the whole check
ends inside 8 minutes on an H100 whatever happens); a step that runs out is interrupted (SIGINT:
pytest and the benchmark report still write their reports), and the benchmark report is told its
share (--max-seconds) so that it stops starting cases in time.
OUT receives at most 7 files, no folders: summary.txt (printed last), gpu_check.log (every
command and its output), tests.xml (JUnit), bench_{fp32,bf16}.{json,md}.
Exit status: 0 when every step passed, 1 when one failed, 2 when nothing could run.
"""

import argparse
import datetime
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import xml.etree.ElementTree as ElementTree

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

TEST_FILES = [
    "tests/test_parity_logit_losses.py",
    "tests/test_parity_attention.py",
    "tests/test_ops_logit_losses.py",
    "tests/test_ops_attention.py",
    "tests/test_triton_ops.py",
    "tests/test_compile_training_step.py",
]
# Parametrisations by backend name: "cuda" (not the CPU emulation "cuda_emulator", which `make test`
# runs), "triton" (every test of test_triton_ops.py and the triton backend of the parity suites) and
# tests named for the GPU (test_gpu_*).
TEST_SELECTION = "(cuda and not cuda_emulator) or triton or gpu"
BENCH_SIZES = "voc512,ade,feat2048x64,voc512_s8,voc512_s16"  # the last two: the fused upsampling (size=)
MAX_JOBS = "16"
LABEL = 12  # width of the step labels in the summary
BUDGET_S = 420  # all steps; a step's overrun is taken from the later ones, so only the last adds GRACE_S
GRACE_S = 15  # from the interrupt at a step's limit to killing it
# Per step: (most seconds it may take, seconds kept for it while earlier steps run).
PLAN = {
    "build": (300, 60),
    "tests": (240, 60),
    "sanitizer": (150, 45),
    "bench fp32": (200, 60),
    "bench bf16": (200, 60),
}

DEVICE_INFO = r"""
import json, platform, torch
p = torch.cuda.get_device_properties(0)
info = {"name": p.name, "capability": f"{p.major}.{p.minor}", "sms": p.multi_processor_count,
        "memory_gib": round(p.total_memory / 2**30, 1), "device_count": torch.cuda.device_count(),
        "python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda}
try:
    import triton
    info["triton"] = triton.__version__
except Exception as error:
    info["triton"] = f"not importable ({type(error).__name__})"
from torch.utils.cpp_extension import CUDA_HOME
info["cuda_home"] = CUDA_HOME
print(json.dumps(info))
"""

EXTENSION_INFO = r"""
import json, torch
import incseg_fast
from incseg_fast import ops
names = [n for n in torch._C._dispatch_get_all_op_names() if n.startswith("incseg_fast::")]
print(json.dumps({
    "file": getattr(getattr(ops, "_C", None), "__file__", None),
    "has_extension": ops.HAS_EXTENSION, "import_error": ops.IMPORT_ERROR,
    "has_cuda_kernels": ops.HAS_CUDA_KERNELS, "backends": incseg_fast.available_backends(),
    "without_cuda_kernel": sorted(n for n in names if not torch._C._dispatch_has_kernel_for_dispatch_key(n, "CUDA")),
}))
"""


def _first_line(text):
    lines = [line.strip() for line in (text or "").splitlines() if line.strip()]
    return lines[0] if lines else ""


def _quick(command):
    """Output of a short command, or None when it cannot run."""
    try:
        result = subprocess.run(command, capture_output=True, text=True, timeout=60, cwd=ROOT)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return result.stdout + result.stderr if result.returncode == 0 else None


def _remove(*paths):
    for path in paths:
        if os.path.exists(path):
            os.remove(path)


def _tool(name, cuda_home):
    """A CUDA tool from PATH, else from the toolkit torch builds with."""
    found = shutil.which(name)
    for candidate in [os.path.join(cuda_home, "bin", name), os.path.join(cuda_home, name, name)] if cuda_home else []:
        if found is None and os.path.isfile(candidate) and os.access(candidate, os.X_OK):
            found = candidate
    return found


class Check:
    def __init__(self, out, budget_s):
        self.out = out
        self.begin = time.monotonic()
        self.deadline = self.begin + budget_s
        self.budget_s = budget_s
        self.log = open(os.path.join(out, "gpu_check.log"), "w")
        self.lines = []  # the summary
        self.failed = []  # names of the steps that failed

    def note(self, message):
        """A progress line on stdout and in the log."""
        line = f"[gpu-check {time.monotonic() - self.begin:5.0f} s] {message}"
        print(line, flush=True)
        self.log.write(line + "\n")
        self.log.flush()

    def summary(self, label, text):
        """A line of the summary: a step's label, or none for a continuation line."""
        self.lines.append(f"{label:<{LABEL}}{text}" if label else f"{'':<{LABEL}}{text}")

    def fail(self, step):
        if step not in self.failed:
            self.failed.append(step)

    def limit(self, step, later, share=None):
        """Seconds `step` may take: its cap, what is left after the reserves of the `later` steps, and
        at most `share` of what is left."""
        left = self.deadline - time.monotonic()
        limit = min(PLAN[step][0], left - sum(PLAN[s][1] for s in later))
        if share is not None:
            limit = min(limit, left * share)
        return max(int(limit), 10)

    def run(self, step, command, limit, env=None):
        """Runs `command` in its own process group for at most `limit` seconds (then SIGINT, and SIGKILL
        GRACE_S later); its output goes to the log. Returns (exit status, output, seconds, timed out)."""
        shown = [word if "\n" not in word else "<script>" for word in command]
        self.note(f"{step}: {' '.join(shown)}  (limit {limit} s)")
        if "<script>" in shown:
            self.log.write("".join(word for word in command if "\n" in word).strip() + "\n")
        environment = dict(os.environ, **(env or {}))
        environment.pop("TRITON_INTERPRET", None)  # Triton runs on the GPU here
        begin = time.monotonic()
        timed_out = False
        with tempfile.TemporaryFile("w+", errors="replace") as output:
            process = subprocess.Popen(
                command,
                cwd=ROOT,
                env=environment,
                stdout=output,
                stderr=subprocess.STDOUT,
                stdin=subprocess.DEVNULL,
                text=True,
                start_new_session=True,
            )
            try:
                status = process.wait(timeout=max(limit, 1))
            except subprocess.TimeoutExpired:
                timed_out = True
                self._signal(process, signal.SIGINT)
                try:
                    status = process.wait(timeout=GRACE_S)
                except subprocess.TimeoutExpired:
                    self._signal(process, signal.SIGKILL)
                    status = process.wait()
            self._signal(process, signal.SIGKILL)  # what the command left running in its group
            output.seek(0)
            text = output.read()
        seconds = time.monotonic() - begin
        self.log.write(text if text.endswith("\n") or not text else text + "\n")
        self.note(f"{step}: exit status {status}{', TIMED OUT' if timed_out else ''} after {seconds:.0f} s")
        return status, text, seconds, timed_out

    @staticmethod
    def _signal(process, sig):
        try:
            os.killpg(process.pid, sig)
        except (ProcessLookupError, PermissionError):
            pass


# ---------------------------------------------------------------------------------------------
# The steps.
# ---------------------------------------------------------------------------------------------


def record_environment(check):
    status, text, _, _ = check.run("device", [sys.executable, "-c", DEVICE_INFO], 120)
    try:
        info = json.loads(text.strip().splitlines()[-1])
    except (ValueError, IndexError):
        check.summary("device", f"FAIL: could not query the device (exit status {status}; see gpu_check.log)")
        check.fail("device")
        return None
    driver = _first_line(_quick(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"]))
    nvcc = _tool("nvcc", info.get("cuda_home"))
    nvcc_version = _quick([nvcc, "--version"]) if nvcc else None
    info["nvcc"] = nvcc_version.strip().splitlines()[-1] if nvcc_version else "not found"
    info["nvcc_path"] = nvcc
    sanitizer = _tool("compute-sanitizer", info.get("cuda_home"))
    info["compute_sanitizer_path"] = sanitizer
    sanitizer_version = _quick([sanitizer, "--version"]) if sanitizer else None
    info["compute_sanitizer"] = sanitizer_version.strip().splitlines()[-1] if sanitizer_version else "not found"
    info["driver"] = driver or "unknown"
    check.log.write(json.dumps(info, indent=1) + "\n")
    others = f" (device 0 of {info['device_count']})" if info["device_count"] > 1 else ""
    check.summary(
        "device",
        f"{info['name']}{others}, sm_{info['capability'].replace('.', '')}, {info['sms']} SMs, "
        f"{info['memory_gib']} GiB; driver {info['driver']}",
    )
    check.summary(
        "versions", f"python {info['python']}, torch {info['torch']} (CUDA {info['cuda']}), triton {info['triton']}"
    )
    check.summary("", f"nvcc: {info['nvcc']}; compute-sanitizer: {info['compute_sanitizer']}")
    return info


def build(check, info):
    arch_list = info["capability"]
    env = {"TORCH_CUDA_ARCH_LIST": arch_list, "MAX_JOBS": MAX_JOBS, "INCSEG_FORCE_CUDA": "1"}
    status, text, seconds, timed_out = check.run(
        "build",
        [sys.executable, "setup.py", "build_ext", "--inplace"],
        check.limit("build", ["tests", "sanitizer", "bench fp32", "bench bf16"]),
        env,
    )
    how = f"TORCH_CUDA_ARCH_LIST={arch_list}, MAX_JOBS={MAX_JOBS}; {seconds:.0f} s"
    if status != 0:
        errors = [line for line in text.splitlines() if "error" in line.lower()][:3]
        check.summary("build", f"FAIL ({'timed out, ' if timed_out else ''}exit status {status}; {how})")
        for line in errors:
            check.summary("", f"{line.strip()[:150]}")
        check.fail("build")
        return False
    _, text, _, _ = check.run("extension", [sys.executable, "-c", EXTENSION_INFO], 120)
    try:
        ext = json.loads(text.strip().splitlines()[-1])
    except (ValueError, IndexError):
        check.summary("build", f"FAIL: built, but incseg_fast does not import ({how}; see gpu_check.log)")
        check.fail("build")
        return False
    if not ext["has_extension"]:
        check.summary("build", f"FAIL: built, but incseg_fast._C does not load: {ext['import_error']} ({how})")
        check.fail("build")
        return False
    backends = ", ".join(ext["backends"])
    if ext["has_cuda_kernels"]:
        check.summary("build", f"ok ({how}); HAS_CUDA_KERNELS true; backends {backends}")
    else:
        check.summary("build", f"FAIL: built ({how}) but HAS_CUDA_KERNELS is false; backends {backends}")
        missing = ", ".join(name.split("::")[-1] for name in ext["without_cuda_kernel"])
        check.summary("", f"no CUDA kernel: {missing[:200]}")
        check.fail("build")
    return True


def junit_counts(path):
    """(tests, failures, errors, skipped, failed test ids) from a JUnit XML file, or None."""
    try:
        root = ElementTree.parse(path).getroot()
    except (OSError, ElementTree.ParseError):
        return None
    suites = [root] if root.tag == "testsuite" else root.findall("testsuite")
    counts = [sum(int(s.get(key, 0)) for s in suites) for key in ("tests", "failures", "errors", "skipped")]
    failed = []
    for case in root.iter("testcase"):
        if case.find("failure") is not None or case.find("error") is not None:
            failed.append(f"{case.get('classname', '').replace('.', '/')}.py::{case.get('name')}")
    return (*counts, failed)


def tests(check):
    xml = os.path.join(check.out, "tests.xml")
    _remove(xml)
    command = [
        sys.executable,
        "-m",
        "pytest",
        "-q",
        "-rfEs",
        "-p",
        "no:cacheprovider",
        *TEST_FILES,
        "-k",
        TEST_SELECTION,
        f"--junitxml={xml}",
    ]
    status, text, seconds, timed_out = check.run(
        "tests", command, check.limit("tests", ["sanitizer", "bench fp32", "bench bf16"])
    )
    counts = junit_counts(xml)
    if counts is None:
        check.summary(
            "tests",
            f"FAIL: no JUnit report (exit status {status}{', timed out' if timed_out else ''}; "
            f"{seconds:.0f} s): {_first_line(text[-500:])[:120]}",
        )
        check.fail("tests")
        return
    total, failures, errors, skipped, failed_ids = counts
    passed = total - failures - errors - skipped
    ok = status == 0 and not timed_out and failures == errors == 0 and passed > 0
    verdict = "ok" if ok else "FAIL"
    extra = ", TIMED OUT (interrupted)" if timed_out else ("" if status in (0, 1) else f", exit status {status}")
    check.summary(
        "tests",
        f"{verdict}: {passed} passed, {failures} failed, {errors} errors, {skipped} skipped "
        f"of {total} ({seconds:.0f} s{extra})",
    )
    for test_id in failed_ids[:6]:
        check.summary("", f"failed: {test_id[:140]}")
    if len(failed_ids) > 6:
        check.summary("", f"... and {len(failed_ids) - 6} more (tests.xml)")
    if not ok:
        check.fail("tests")


def sanitizer(check, info):
    tool = info.get("compute_sanitizer_path")
    if tool is None:
        check.summary("sanitizer", "FAIL: compute-sanitizer not found (PATH, CUDA_HOME/bin)")
        check.fail("sanitizer")
        return
    command = [
        tool,
        "--tool",
        "memcheck",
        "--error-exitcode",
        "1",
        "--print-limit",
        "20",
        sys.executable,
        "tools/gpu_smoke.py",
    ]
    status, text, seconds, timed_out = check.run(
        "sanitizer",
        command,
        check.limit("sanitizer", ["bench fp32", "bench bf16"]),
        {"PYTORCH_NO_CUDA_MEMORY_CACHING": "1"},
    )
    errors = [line for line in text.splitlines() if "ERROR SUMMARY:" in line]
    smoke = [line for line in text.splitlines() if line.startswith("gpu-smoke:")]
    memcheck = errors[-1].split("ERROR SUMMARY:")[-1].strip() if errors else "no error summary"
    clean = bool(errors) and memcheck.startswith("0 error")
    smoke_ok = bool(smoke) and "PASS" in smoke[-1]
    ok = status == 0 and clean and smoke_ok and not timed_out
    check.summary(
        "sanitizer",
        f"{'ok' if ok else 'FAIL'}: memcheck {memcheck}; "
        f"{smoke[-1] if smoke else 'gpu-smoke did not finish'} "
        f"({seconds:.0f} s{', TIMED OUT' if timed_out else ''})",
    )
    if not ok:
        for line in [s for s in text.splitlines() if s.startswith(("FAIL", "MISSING", "========= Invalid"))][:4]:
            check.summary("", f"{line.strip()[:150]}")
        check.fail("sanitizer")


def bench(check, dtype, later, share):
    step = f"bench {dtype}"
    limit = check.limit(step, later, share)
    if limit < 30:
        check.summary(step, f"FAIL: not run, {limit} s left of the budget")
        check.fail(step)
        return
    json_path, markdown_path = (os.path.join(check.out, f"bench_{dtype}.{ext}") for ext in ("json", "md"))
    _remove(json_path, markdown_path)  # a report left by an earlier run must not be read as this one's
    # --dtype also for fp32: without it voc512 runs in bf16 as well. --max-seconds: the report starts
    # no case after that; one still running at the limit is interrupted and the report keeps the others.
    command = [
        sys.executable,
        "-m",
        "incseg_fast.bench",
        "--device",
        "cuda",
        "--sizes",
        BENCH_SIZES,
        "--dtype",
        dtype,
        "--json",
        json_path,
        "--markdown",
        markdown_path,
        "--max-seconds",
        str(max(limit - 20, 1)),
    ]
    status, text, seconds, timed_out = check.run(step, command, limit)
    try:
        with open(json_path) as f:
            results = json.load(f)
    except (OSError, ValueError):
        check.summary(
            step,
            f"FAIL: no JSON report (exit status {status}{', timed out' if timed_out else ''}; "
            f"{seconds:.0f} s): {_first_line(text[-400:])[:120]}",
        )
        check.fail(step)
        return
    failed_providers = [
        f"{c['op']}-{c['size']}-{c['dtype']} {name}"
        for c in results["cases"]
        for name, r in c["providers"].items()
        if "error" in r
    ]
    # Running out of the time budget leaves cases unmeasured (listed), which is not a failure; a
    # provider that raised, or a report that crashed, is.
    ok = (status == 0 or timed_out) and not failed_providers and bool(results["cases"])
    skipped = results.get("not_measured", [])
    check.summary(
        step,
        f"{'ok' if ok else 'FAIL'}: {len(results['cases'])} cases measured"
        f"{f', {len(skipped)} not (time budget)' if skipped else ''}; "
        f"copy {results['copy_bytes_per_s'] / 1e9:.0f} GB/s ({seconds:.0f} s)",
    )
    check.lines += bench_table(results)
    for item in failed_providers[:4]:
        check.summary("", f"provider failed: {item}")
    if not ok:
        check.fail(step)


def bench_table(results):
    """fwd+bwd median per provider, with the fused providers' speedup over torch.compile."""
    providers = []
    for case in results["cases"]:
        providers += [p for p in case["providers"] if p not in providers]
    width = max([len(f"{c['op']} {c['size']} {c['dtype']}") for c in results["cases"]] + [36]) + 2
    lines = [f"  {'fwd+bwd ms (x: speedup vs compiled)':<{width}}" + "".join(f"{p:>15}" for p in providers)]
    for case in results["cases"]:
        cells = []
        compiled = case["providers"].get("compiled", {}).get("fwd_bwd_median_s")
        for p in providers:
            r = case["providers"].get(p, {})
            if "error" in r:
                cells.append("FAILED")
            elif "fwd_bwd_median_s" not in r:
                cells.append("-")
            elif p in ("eager", "compiled") or not compiled:
                cells.append(f"{r['fwd_bwd_median_s'] * 1e3:.2f}")
            else:
                cells.append(f"{r['fwd_bwd_median_s'] * 1e3:.2f} ({compiled / r['fwd_bwd_median_s']:.1f}x)")
        lines.append(
            f"  {case['op'] + ' ' + case['size'] + ' ' + case['dtype']:<{width}}" + "".join(f"{c:>15}" for c in cells)
        )
    targets = results.get("targets", [])
    missed = [t for t in targets if t["verdict"] != "met"]
    if targets:
        lines.append(
            f"  targets: {len(targets) - len(missed)} met, {len(missed)} not met"
            + (": " + "; ".join(f"{t['target']} ({t['value']})" for t in missed[:3]) if missed else "")
        )
    return lines


def main(argv=None):
    parser = argparse.ArgumentParser(prog="tools/gpu_check.py", description=__doc__.split("\n")[0])
    parser.add_argument("out", nargs="?", help="folder for the results (created)")
    parser.add_argument(
        "--budget-s", type=float, default=BUDGET_S, help=f"total seconds for all steps (default {BUDGET_S})"
    )
    args = parser.parse_args(argv)
    if not args.out:
        print("gpu-check: no OUT folder given (make gpu-check OUT=<folder>); nothing run", flush=True)
        return 2
    try:
        import torch
    except ImportError as error:
        print(
            f"gpu-check: {sys.executable} cannot import torch ({error}); run it with the python3 that has "
            f"the CUDA build of torch; nothing run",
            flush=True,
        )
        return 2
    if not torch.cuda.is_available():
        print(
            f"gpu-check: no CUDA device: torch.cuda.is_available() is false (torch {torch.__version__}, "
            f"CUDA {torch.version.cuda}, {sys.executable}); nothing built or run",
            flush=True,
        )
        return 2

    # A process started with SIGINT ignored (a background job of a non-interactive shell) passes that
    # on to its children, and Python then never raises KeyboardInterrupt: handle SIGINT here, so the
    # steps start with the default disposition and the interrupt at the end of a step's time works.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    out = os.path.abspath(args.out)
    os.makedirs(out, exist_ok=True)
    check = Check(out, args.budget_s)
    started = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    check.note(f"results in {out}; budget {args.budget_s:.0f} s")
    info = record_environment(check)
    if info is None:
        built = False
    else:
        built = build(check, info)
    if built:
        tests(check)
        sanitizer(check, info)
        bench(check, "fp32", ["bench bf16"], share=0.5)
        bench(check, "bf16", [], share=None)
    else:
        for step in ("tests", "sanitizer", "bench fp32", "bench bf16"):
            check.summary(step, "not run (no build)")

    total = time.monotonic() - check.begin
    verdict = "PASS" if not check.failed else f"FAIL ({', '.join(check.failed)})"
    head = [f"incseg_fast gpu-check, {started}, {total:.0f} s (budget {args.budget_s:.0f} s)"]
    files = sorted(set(os.listdir(out)) | {"summary.txt"})
    tail = [f"{'verdict':<{LABEL}}{verdict}", f"{'files':<{LABEL}}{out}: {' '.join(files)}"]
    text = "\n".join(head + check.lines + tail) + "\n"
    with open(os.path.join(out, "summary.txt"), "w") as f:
        f.write(text)
    check.log.write("\n" + text)
    check.log.close()
    print("\n" + text, end="", flush=True)
    return 0 if not check.failed else 1


if __name__ == "__main__":
    sys.exit(main())
