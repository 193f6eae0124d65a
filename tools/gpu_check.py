"""Everything that needs a GPU, in one call on a bare GPU machine: `make gpu-check OUT=<folder>`.

    python3 tools/gpu_check.py OUT [--budget-s 440]     on a GPU machine
    python3 tools/gpu_check.py --plan                  the steps, budgets, commands, files and cases
    python3 tools/gpu_check.py --dry-run OUT           every step's command on this CPU (make gpu-dry-run)

Run it with the python3 whose torch has CUDA (not .venv, which has the CPU build); it installs
nothing and needs no network. It stops at once, before building anything, when OUT is missing,
torch does not import or torch.cuda.is_available() is false. Otherwise it runs the steps of
tools/gpu_plan.py in order (--plan prints them): preflight, load-or-build (the prebuilt extension
of `make gpu-prebuild` when it matches, else a build for this GPU), smoke, the benchmarks without
torch.compile, the tests in parallel, the compute-sanitizer tools, ncu, and, on what time is left,
the benchmarks against torch.compile. Later steps run even when an earlier one failed, where they
can (nothing runs without an extension). Each step gets its budget, cut so that the later ones
keep their minimums; a step that runs out is interrupted (SIGINT: pytest and the benchmark report
still write their reports). The whole check ends inside 8 minutes on an H100 whatever happens.

--dry-run runs the same steps on the CPU: the CUDA emulator and the Triton interpreter stand in for
the GPU, at tiny sizes and a few tests; the compute-sanitizer and ncu steps run their program
without the tool and print the exact command they would run. Its exit status is 1 when any step
command failed, so a typo fails CI rather than a GPU run.
OUT receives summary.txt (one screen, printed last), gpu_check.log (every command and its output),
tests.xml (JUnit), bench_{fp32,bf16,compiled}.json and ncu.csv.
Exit status: 0 when every step passed, 1 when one failed, 2 when nothing could run.
"""

import argparse
import dataclasses
import datetime
import glob
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path[:0] = [os.path.join(ROOT, "tools"), ROOT]  # the plan's modules, and the in-place build for --plan
import gpu_load  # noqa: E402
import gpu_plan  # noqa: E402
import gpu_results  # noqa: E402
import ncu_report  # noqa: E402

LABEL = 15  # width of the step labels in the summary
DRY_SLOWDOWN = 5  # the dry run's budgets: this machine's CPU standing in for an H100

DEVICE_INFO = r"""
import importlib.util, json, platform, torch
info = {"python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda,
        "modules": {m: importlib.util.find_spec(m) is not None for m in ("pytest", "xdist")}}
if torch.cuda.is_available():
    p = torch.cuda.get_device_properties(0)
    info.update(name=p.name, capability=f"{p.major}.{p.minor}", sms=p.multi_processor_count,
                memory_gib=round(p.total_memory / 2**30, 1), device_count=torch.cuda.device_count())
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


def _last_json(text):
    try:
        return json.loads(text.strip().splitlines()[-1])
    except (ValueError, IndexError):
        return None


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
    """A CUDA tool from PATH, else from the toolkit torch builds with, else the newest Nsight Compute."""
    candidates = [os.path.join(cuda_home, "bin", name), os.path.join(cuda_home, name, name)] if cuda_home else []
    candidates += sorted(glob.glob(f"/opt/nvidia/nsight-compute/*/{name}"), reverse=True)
    found = shutil.which(name)
    for candidate in candidates:
        if found is None and os.path.isfile(candidate) and os.access(candidate, os.X_OK):
            found = candidate
    return found


class Check:
    def __init__(self, out, budget_s, dry):
        self.out = out
        self.dry = dry
        self.begin = time.monotonic()
        self.deadline = self.begin + budget_s
        self.budget_s = budget_s
        self.log = open(os.path.join(out, "gpu_check.log"), "w")
        self.lines = []  # the summary
        self.failed = []  # names of the steps that failed
        self.target = gpu_plan.Target(sys.executable, out, dry=dry)
        self.found = {}  # tool -> found (preflight)
        self.building = False

    def gpu_target(self):
        """The target a GPU run would have: what the dry run shows as the commands it would run."""
        return dataclasses.replace(self.target, dry=False)

    def seconds(self, budget_s):
        """A fixed budget, longer in the dry run."""
        return budget_s * (DRY_SLOWDOWN if self.dry else 1)

    def note(self, message):
        """A progress line on stdout and in the log."""
        line = f"[gpu-check {time.monotonic() - self.begin:5.0f} s] {message}"
        print(line, flush=True)
        self.log.write(line + "\n")
        self.log.flush()

    def summary(self, label, text):
        """A line of the summary: a step's label, or none for a continuation line."""
        self.lines.append(f"{label or '':<{LABEL}}{text}")

    def fail(self, step):
        if step not in self.failed:
            self.failed.append(step)

    def limit(self, step):
        """Seconds `step` may take now (gpu_plan.step_limit; the dry run's budgets are DRY_SLOWDOWN
        times longer), or 0 with a summary line when it must not run."""
        scale = DRY_SLOWDOWN if self.dry else 1
        left = (self.deadline - time.monotonic()) / scale
        limit = gpu_plan.step_limit(step, left, self.building) * scale
        if limit == 0:
            optional = gpu_plan.STEP[step].optional
            self.summary(step, f"{'skipped' if optional else 'FAIL: not run'}: {left * scale:.0f} s left of the budget")
            if not optional:
                self.fail(step)
        return limit

    def run(self, step, command, limit):
        """Runs a gpu_plan.Command for at most `limit` seconds; see run_together."""
        return self.run_together(step, [command], limit)[0]

    def run_together(self, step, commands, limit):
        """Runs the commands side by side, each in its own process group, for at most `limit` seconds
        (then SIGINT, and SIGKILL GRACE_S later); their output goes to the log. The dry run leaves the
        tool prefix (command.wraps) off. Returns [(exit status, output, seconds, timed out)]."""
        started = [self._start(step, command, limit) for command in commands]
        processes = [process for process, _, _ in started]
        ended = self._wait(processes, {}, time.monotonic() + max(limit, 1))
        late = [process for process in processes if process not in ended]
        for process in late:  # pytest and the benchmark report still write their reports
            self._signal(process, signal.SIGINT)
        ended = self._wait(processes, ended, time.monotonic() + gpu_plan.GRACE_S)
        results = []
        for process, output, begin in started:
            self._signal(process, signal.SIGKILL)  # what is still running of it: all of it when late
            status = process.wait()
            output.seek(0)
            text = output.read()
            output.close()
            seconds = ended.get(process, time.monotonic()) - begin
            timed_out = process in late
            self.log.write(text if text.endswith("\n") or not text else text + "\n")
            self.note(f"{step}: exit status {status}{', TIMED OUT' if timed_out else ''} after {seconds:.0f} s")
            results.append((status, text, seconds, timed_out))
        return results

    def _start(self, step, command, limit):
        """(process, its output file, start time) of a command, in a process group of its own."""
        argv = command.argv if self.dry else (command.wraps or []) + command.argv
        self.note(f"{step}: {' '.join('<script>' if chr(10) in w else w for w in argv)}  (limit {limit} s)")
        for script in [word for word in argv if "\n" in word]:
            self.log.write(script.strip() + "\n")
        environment = dict(os.environ)
        environment.pop("TRITON_INTERPRET", None)  # Triton runs on the GPU, unless the dry run says
        environment.update(command.env)
        output = tempfile.TemporaryFile("w+", errors="replace")
        process = subprocess.Popen(
            argv,
            cwd=ROOT,
            env=environment,
            stdout=output,
            stderr=subprocess.STDOUT,
            stdin=subprocess.DEVNULL,
            text=True,
            start_new_session=True,
        )
        return process, output, time.monotonic()

    @staticmethod
    def _wait(processes, ended, until):
        """{process: when it ended} for those that ended by `until` (`ended`: those known already)."""
        ended = dict(ended)
        while len(ended) < len(processes) and time.monotonic() < until:
            for process in processes:
                if process not in ended and process.poll() is not None:
                    ended[process] = time.monotonic()
            time.sleep(0.05)
        return ended

    @staticmethod
    def _signal(process, sig):
        try:
            os.killpg(process.pid, sig)
        except (ProcessLookupError, PermissionError):
            pass


# ---------------------------------------------------------------------------------------------
# The steps.
# ---------------------------------------------------------------------------------------------


def preflight(check):
    """Device, versions and tools (into check.target); None when the device cannot be queried."""
    command = gpu_plan.Command([sys.executable, "-c", DEVICE_INFO])
    status, text, _, _ = check.run("preflight", command, check.limit("preflight"))
    info = _last_json(text)
    if info is None:
        check.summary("preflight", f"FAIL: could not query torch (exit status {status}; see gpu_check.log)")
        check.fail("preflight")
        return None
    nvcc = _tool("nvcc", info["cuda_home"])
    nvcc_version = _quick([nvcc, "--version"]) if nvcc else None
    release = [line for line in (nvcc_version or "").splitlines() if "release" in line]
    info["nvcc"] = release[0].strip() if release else "not found"
    info["driver"] = _first_line(_quick(["nvidia-smi", "--query-gpu=driver_version", "--format=csv,noheader"]))
    tools = {name: _tool(name, info["cuda_home"]) for name in ("compute-sanitizer", "ncu", "ninja")}
    check.found = {name: path is not None for name, path in tools.items()}
    check.target = gpu_plan.Target(
        sys.executable,
        check.out,
        dry=check.dry,
        xdist=info["modules"]["xdist"],
        sanitizer=tools["compute-sanitizer"] or "compute-sanitizer",
        ncu=tools["ncu"] or "ncu",
    )
    check.log.write(json.dumps({**info, "tools": tools}, indent=1) + "\n")
    if "name" in info:
        others = f" (device 0 of {info['device_count']})" if info["device_count"] > 1 else ""
        check.summary(
            "device",
            f"{info['name']}{others}, sm_{info['capability'].replace('.', '')}, {info['sms']} SMs, "
            f"{info['memory_gib']} GiB; driver {info['driver'] or 'unknown'}",
        )
    check.summary(
        "versions", f"python {info['python']}, torch {info['torch']} (CUDA {info['cuda']}), triton {info['triton']}"
    )
    check.summary("", f"nvcc: {info['nvcc']}")
    problems = gpu_results.preflight_problems(tools, info["modules"], nvcc_version, info["cuda"])
    if not problems:
        check.summary(
            "preflight",
            "ok: nvcc matches torch's CUDA major; ninja, pytest, pytest-xdist, compute-sanitizer, ncu present",
        )
    elif check.dry:  # this machine has no GPU tools: what a GPU machine lacking them would report
        check.summary("preflight", f"ok (dry run; on a GPU machine this would FAIL: {'; '.join(problems)})")
    else:
        check.summary("preflight", f"FAIL: {'; '.join(problems)}")
        check.fail("preflight")
    return info


def extension_info(check):
    """What incseg_fast.ops reports of the extension, or None when it does not import."""
    command = gpu_plan.Command([sys.executable, "-c", EXTENSION_INFO])
    _, text, _, _ = check.run("extension", command, check.seconds(gpu_plan.STEP["load-or-build"].budget_s))
    return _last_json(text)


def load_or_build(check, info):
    """The prebuilt extension when it matches, else a build; True when an extension loads."""
    step = "load-or-build"
    library, why_not = gpu_load.match_prebuilt(
        os.path.join(ROOT, "prebuilt"), info["torch"], info["cuda"], info.get("capability")
    )
    if library is not None:
        installed = gpu_load.install_prebuilt(library, os.path.join(ROOT, "incseg_fast"))
        check.note(f"{step}: installed {os.path.relpath(library, ROOT)} as {os.path.relpath(installed, ROOT)}")
        ext = extension_info(check)
        if ext and ext["has_extension"] and ext["has_cuda_kernels"]:
            check.summary(
                step,
                f"ok: prebuilt {os.path.relpath(library, ROOT)} (manifest matches, sha256 ok); "
                f"HAS_CUDA_KERNELS {str(ext['has_cuda_kernels']).lower()}",
            )
            return True
        why_not = f"the prebuilt extension does not load with CUDA kernels ({ext and ext['import_error']})"
        _remove(installed)
    check.note(f"{step}: no prebuilt extension: {why_not}")
    if check.dry:  # the extension of make setup, and the build a GPU machine would run
        command = gpu_plan.build_command(check.gpu_target(), "<device arch>")
        ext = extension_info(check)
        ok = bool(ext and ext["has_extension"])
        check.summary(
            step,
            f"{'ok' if ok else 'FAIL'} (dry run): no prebuilt ({why_not}); the local build "
            f"{'loads' if ok else 'does not load'}; would run: {gpu_plan.shown(command)}",
        )
        if not ok:
            check.fail(step)
        return ok
    return build(check, gpu_plan.build_command(check.target, info["capability"]), why_not)


def build(check, command, why_not):
    step = "load-or-build"
    check.building = True
    limit = check.limit(step)
    if limit == 0:
        return False
    # The step's limit covers the extension's check after the build too.
    extension_s = check.seconds(gpu_plan.STEP["load-or-build"].budget_s)
    status, text, seconds, timed_out = check.run(step, command, max(limit - extension_s, 1))
    how = f"no prebuilt ({why_not}); {' '.join(f'{k}={v}' for k, v in command.env.items())}; {seconds:.0f} s"
    if status != 0:
        check.summary(step, f"FAIL: build {'timed out, ' if timed_out else ''}exit status {status} ({how})")
        for line in [line for line in text.splitlines() if "error" in line.lower()][:3]:
            check.summary("", f"{line.strip()[:150]}")
        check.fail(step)
        return False
    ext = extension_info(check)
    if ext is None or not ext["has_extension"]:
        error = ext["import_error"] if ext else "incseg_fast does not import; see gpu_check.log"
        check.summary(step, f"FAIL: built, but incseg_fast._C does not load: {error} ({how})")
        check.fail(step)
        return False
    backends = ", ".join(ext["backends"])
    if ext["has_cuda_kernels"]:
        check.summary(step, f"ok: built ({how}); HAS_CUDA_KERNELS true; backends {backends}")
    else:
        check.summary(step, f"FAIL: built ({how}) but HAS_CUDA_KERNELS is false; backends {backends}")
        missing = ", ".join(name.split("::")[-1] for name in ext["without_cuda_kernel"])
        check.summary("", f"no CUDA kernel: {missing[:200]}")
        check.fail(step)
    return True


def smoke(check):
    limit = check.limit("smoke")
    if limit == 0:
        return
    parts = gpu_plan.smoke_commands(check.target)
    results = check.run_together("smoke", [command for _, command in parts], limit)
    report_parts(
        check,
        "smoke",
        [(part, gpu_results.smoke_result(result)) for (part, _), result in zip(parts, results, strict=True)],
    )


def report_parts(check, step, parts):
    """A step's line (how many of its parallel parts passed), then each part's lines: [(part, (ok, lines))]."""
    passed = sum(ok for _, (ok, _) in parts)
    check.summary(
        step,
        f"{'ok' if passed == len(parts) else 'FAIL'}{' (dry run)' if check.dry else ''}: "
        f"{passed} of {len(parts)} passed, in parallel",
    )
    for part, (_, lines) in parts:
        check.summary(f"  {part}", lines[0])
        for line in lines[1:]:
            check.summary("", line)
    if passed < len(parts):
        check.fail(step)


def tests(check):
    limit = check.limit("tests")
    if limit == 0:
        return
    xml = os.path.join(check.out, "tests.xml")
    _remove(xml)
    status, text, seconds, timed_out = check.run("tests", gpu_plan.tests_command(check.target), limit)
    counts = gpu_results.junit_counts(xml)
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
    extra = ", TIMED OUT (interrupted)" if timed_out else ("" if status in (0, 1) else f", exit status {status}")
    serial = "" if check.target.xdist else "; pytest-xdist missing: ran without -n"
    check.summary(
        "tests",
        f"{'ok' if ok else 'FAIL'}: {passed} passed, {failures} failed, {errors} errors, {skipped} skipped "
        f"of {total} ({seconds:.0f} s{extra}{serial})",
    )
    for test_id in failed_ids[:6]:
        check.summary("", f"failed: {test_id[:140]}")
    if len(failed_ids) > 6:
        check.summary("", f"... and {len(failed_ids) - 6} more (tests.xml)")
    if not ok:
        check.fail("tests")


def sanitizers(check):
    step = "sanitizers"
    limit = check.limit(step)
    if limit == 0:
        return
    commands = [gpu_plan.sanitizer_command(check.target, tool) for tool in gpu_plan.SANITIZERS]
    if not check.found.get("compute-sanitizer") and not check.dry:
        check.summary(step, "FAIL: compute-sanitizer not found (PATH, CUDA_HOME/bin)")
        check.fail(step)
        return
    results = check.run_together(step, commands, limit)
    report_parts(
        check,
        step,
        [
            (tool, sanitizer_result(check, tool, result))
            for tool, result in zip(gpu_plan.SANITIZERS, results, strict=True)
        ],
    )


def sanitizer_result(check, tool, result):
    """(ok, summary lines) of one compute-sanitizer tool's run; the dry run's ran the program alone."""
    smoke_ok, smoke_lines = gpu_results.smoke_result(result)
    smoke = smoke_lines[0].split(": ", 1)[1]  # without its own verdict
    if check.dry:
        absent = "" if check.found.get("compute-sanitizer") else "compute-sanitizer not found here; "
        shown = gpu_plan.shown(gpu_plan.sanitizer_command(check.gpu_target(), tool))
        verdict = f"{'ok' if smoke_ok else 'FAIL'} ({absent}without the tool: {smoke}); would run: {shown}"
        return smoke_ok, [verdict] + smoke_lines[1:]
    clean, tool_summary = gpu_results.sanitizer_verdict(result[1])
    lines = [f"{'ok' if smoke_ok and clean else 'FAIL'}: {tool_summary}; {smoke}"] + smoke_lines[1:]
    if not clean:
        lines += [s.strip()[:150] for s in result[1].splitlines() if s.startswith("========= ")][:3]
    return smoke_ok and clean, lines


def ncu(check):
    step = "ncu"
    limit = check.limit(step)
    if limit == 0:
        return
    command = gpu_plan.ncu_command(check.target)
    if not check.found.get("ncu") and not check.dry:
        check.summary(step, "FAIL: ncu not found (PATH, CUDA_HOME/bin)")
        check.fail(step)
        return
    csv_path = os.path.join(check.out, "ncu.csv")
    _remove(csv_path)
    status, text, seconds, timed_out = check.run(step, command, limit)
    workload = [line for line in text.splitlines() if line.startswith("ncu-workload:")]
    workload_ok = bool(workload) and "PASS" in workload[-1]
    if check.dry:
        ok = status == 0 and workload_ok
        absent = "" if check.found.get("ncu") else "ncu not found here; "
        shown = gpu_plan.shown(gpu_plan.ncu_command(check.gpu_target()))
        check.summary(
            step,
            f"{'ok' if ok else 'FAIL'} (dry run: {absent}the workload {'passed' if ok else 'FAILED'}"
            f" without ncu); would run: {shown}",
        )
    else:
        with open(csv_path, "w") as f:
            f.write("\n".join(line for line in text.splitlines() if line.startswith('"')) + "\n")
        try:
            kernels = ncu_report.parse(text)
        except ValueError as error:
            kernels, workload = [], [f"ncu output not understood: {error}"]
        ok = status == 0 and workload_ok and bool(kernels) and not timed_out
        check.summary(
            step,
            f"{'ok' if ok else 'FAIL'}: {len(kernels)} launches profiled; "
            f"{workload[-1] if workload else 'the workload did not finish'} "
            f"({seconds:.0f} s{', TIMED OUT' if timed_out else ''})",
        )
        check.lines += ncu_report.format_table(kernels)
    if not ok:
        for line in [s for s in text.splitlines() if s.startswith(("FAIL", "==ERROR==", "Traceback"))][:3]:
            check.summary("", f"{line.strip()[:150]}")
        check.fail(step)


def bench(check, dtype, compiled=False):
    step = "bench compiled" if compiled else f"bench {dtype}"
    limit = check.limit(step)
    if limit == 0:
        return
    json_path = gpu_plan.bench_json(check.target, "compiled" if compiled else dtype)
    _remove(json_path)  # a report left by an earlier run must not be read as this one's
    # --max-seconds: the report starts no case after that; one still running at the limit is
    # interrupted and the report keeps the others.
    command = gpu_plan.bench_command(check.target, dtype, max(limit - 20, 1), compiled)
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
    problems = gpu_results.bench_problems(results, command)
    # Running out of the time budget leaves cases unmeasured (listed), which is not a failure; a
    # provider that raised or is missing, or a report that crashed, is.
    ok = (status == 0 or timed_out) and not problems and bool(results["cases"])
    skipped = results.get("not_measured", [])
    check.summary(
        step,
        f"{'ok' if ok else 'FAIL'}{' (dry run)' if check.dry else ''}: {len(results['cases'])} cases measured"
        f"{f', {len(skipped)} not (time budget)' if skipped else ''}; "
        f"copy {results['copy_bytes_per_s'] / 1e9:.0f} GB/s ({seconds:.0f} s)",
    )
    check.lines += gpu_results.bench_table(results)
    for item in problems[:4]:
        check.summary("", item)
    if not ok:
        check.fail(step)


def train_step(check):
    """The whole training step per loss provider (optional: on the time the others left)."""
    step = "train step"
    limit = check.limit(step)
    if limit == 0:
        return
    json_path = gpu_plan.train_step_json(check.target)
    _remove(json_path)
    command = gpu_plan.train_step_command(check.target, max(limit - 30, 1))
    status, text, seconds, timed_out = check.run(step, command, limit)
    try:
        with open(json_path) as f:
            records = json.load(f)["train_step_cases"]
    except (OSError, ValueError, KeyError):
        check.summary(step, f"FAIL: no JSON report (exit status {status}; {seconds:.0f} s): {_first_line(text[-400:])}")
        check.fail(step)
        return
    from incseg_fast.bench import train_step as bench_train_step

    # A provider that disagrees with MiB's loss raises (AgreementError): the report then exits non-zero.
    ok = (status == 0 or timed_out) and bool(records)
    check.summary(step, f"{'ok' if ok else 'FAIL'}: {len(records)} settings measured ({seconds:.0f} s)")
    for record in records:
        check.lines += bench_train_step.format_case(record).splitlines()
    if not ok:
        check.fail(step)


def run_steps(check):
    info = preflight(check)
    ready = info is not None and load_or_build(check, info)
    if not ready:
        for step in gpu_plan.STEPS[2:]:
            check.summary(step.name, "not run (no extension)")
        return
    smoke(check)
    bench(check, "fp32")
    bench(check, "bf16")
    tests(check)
    sanitizers(check)
    ncu(check)
    train_step(check)
    bench(check, "fp32", compiled=True)


def start_gpu_check(args):
    """None when the GPU check can start, else its exit status (after saying why not)."""
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
    if not args.dry_run and not torch.cuda.is_available():
        print(
            f"gpu-check: no CUDA device: torch.cuda.is_available() is false (torch {torch.__version__}, "
            f"CUDA {torch.version.cuda}, {sys.executable}); nothing built or run (make gpu-dry-run runs the "
            f"steps on the CPU)",
            flush=True,
        )
        return 2
    return None


def main(argv=None):
    parser = argparse.ArgumentParser(prog="tools/gpu_check.py", description=__doc__.split("\n")[0])
    parser.add_argument("out", nargs="?", help="folder for the results (created)")
    parser.add_argument("--plan", action="store_true", help="print the steps, budgets, commands and cases; run nothing")
    parser.add_argument("--dry-run", action="store_true", help="run every step's command on the CPU (no GPU)")
    parser.add_argument(
        "--budget-s",
        type=float,
        default=gpu_plan.BUDGET_S,
        help=f"total seconds for all steps (default {gpu_plan.BUDGET_S}; the dry run's are "
        f"{DRY_SLOWDOWN} times longer)",
    )
    args = parser.parse_args(argv)
    if args.plan:
        print(gpu_plan.format_plan(gpu_plan.Target("python3", "OUT")))
        return 0
    refused = start_gpu_check(args)
    if refused is not None:
        return refused

    # A process started with SIGINT ignored (a background job of a non-interactive shell) passes that
    # on to its children, and Python then never raises KeyboardInterrupt: handle SIGINT here, so the
    # steps start with the default disposition and the interrupt at the end of a step's time works.
    signal.signal(signal.SIGINT, signal.default_int_handler)
    out = os.path.abspath(args.out)
    os.makedirs(out, exist_ok=True)
    check = Check(out, args.budget_s * (DRY_SLOWDOWN if args.dry_run else 1), args.dry_run)
    started = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    check.note(f"results in {out}; budget {check.budget_s:.0f} s{'; DRY RUN on the CPU' if args.dry_run else ''}")
    run_steps(check)

    total = time.monotonic() - check.begin
    verdict = "PASS" if not check.failed else f"FAIL ({', '.join(check.failed)})"
    kind = "gpu-dry-run" if args.dry_run else "gpu-check"
    head = [f"incseg_fast {kind}, {started}, {total:.0f} s (budget {check.budget_s:.0f} s)"]
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
