"""The plan of `make gpu-check` (tools/gpu_check.py): its steps in order, each one's time budget, and
the command each step runs, on a GPU and, for `make gpu-dry-run`, on this machine's CPU.

    python3 tools/gpu_check.py --plan      prints it (no GPU needed)

Budgets are wall-clock seconds on an H100. A step gets at most its budget, and never so much that a
later required step would be left less than its minimum; a step that runs out is interrupted
(SIGINT, then SIGKILL GRACE_S later) and the later steps still run. A step offered less than its
minimum is not run. The optional step runs only on what the others left. With a prebuilt extension
the required budgets add up to at most BUDGET_S; when gpu-check must build, the build's budget and
the minimums of the steps after it do too. So the whole check ends by BUDGET_S + GRACE_S, inside
DEADLINE_S whatever happens.
"""

import dataclasses
import os

BUDGET_S = 440
GRACE_S = 15  # from the interrupt at a step's limit to killing it
DEADLINE_S = 480  # the check must end within 8 minutes of its start on an H100, start-up included
START_S = 10  # python and torch start-up before the first step, counted from the command's start
BUILD_BUDGET_S = 240  # load-or-build when no prebuilt extension matches
MAX_JOBS = "16"
XDIST_WORKERS = "16"


@dataclasses.dataclass(frozen=True)
class Step:
    name: str
    budget_s: int  # the most it may take
    minimum_s: int  # kept for it while earlier steps run; offered less, it does not run
    what: str
    optional: bool = False  # runs only on the time the required steps left


STEPS = (
    Step(
        "preflight",
        20,
        10,
        "device and versions; nvcc major == torch's CUDA major, ninja, pytest, "
        "pytest-xdist, compute-sanitizer, ncu (each missing one named)",
    ),
    Step(
        "load-or-build",
        20,
        15,
        "prebuilt/torch-<version>-cu<major>/_C.abi3.so if its manifest matches "
        f"(torch, CUDA major, the device's arch, sha256), else setup.py build_ext ({BUILD_BUDGET_S} s)",
    ),
    Step(
        "smoke",
        45,
        20,
        "tools/gpu_smoke.py --tiny: every op forward and backward, cuda and triton, fp32/bf16/fp16, against "
        "float64 (4 processes in parallel)",
    ),
    Step("bench fp32", 55, 20, "incseg_fast.bench, eager and the fused providers (no torch.compile)"),
    Step("bench bf16", 45, 15, "the same in bf16"),
    Step("tests", 110, 45, f"pytest -n {XDIST_WORKERS} (pytest-xdist) over TEST_FILES -k TEST_SELECTION"),
    Step(
        "sanitizers",
        75,
        35,
        "compute-sanitizer memcheck, racecheck, synccheck, initcheck in parallel, "
        "each on tools/gpu_smoke.py --tiny --backend cuda",
    ),
    Step(
        "ncu",
        55,
        20,
        "ncu --csv on tools/ncu_workload.py: per kernel time, DRAM bytes, % of peak, registers, occupancy",
    ),
    Step(
        "train step",
        100,
        45,
        "incseg_fast.bench --ops train_step: a whole DeepLabV3-ResNet-101 training step at batch 24, 512 x 512, "
        "VOC 15-5 then ADE 100-50, MiB's loss code against the fused losses",
        optional=True,
    ),
    Step(
        "bench compiled", 0, 60, "torch.compile against the fused providers (compiling takes most of it)", optional=True
    ),
)
STEP = {step.name: step for step in STEPS}

# Every test file with cuda/triton/gpu parametrisations (tests/test_gpu_check.py keeps this complete).
TEST_FILES = (
    "tests/test_parity_logit_losses.py",
    "tests/test_parity_attention.py",
    "tests/test_parity_upsample.py",
    "tests/test_cuda_kernels.py",
    "tests/test_triton_ops.py",
    "tests/test_numerics_regressions.py",
    "tests/test_properties.py",
    "tests/test_hostile_inputs.py",
    "tests/test_compile_training_step.py",
    "tests/test_validation.py",
    "tests/test_bench_train_step.py",
    "tests/test_parity_pod.py",
    "tests/test_parity_pseudo_labels.py",
    "tests/test_parity_sigmoid.py",
    "tests/test_ops_sigmoid.py",
)
# Parametrisations by backend name: "cuda" (not the CPU emulation "cuda_emulator", which `make test`
# runs), "triton" (every test of test_triton_ops.py and the triton backend elsewhere) and tests
# named for the GPU (test_gpu_*).
TEST_SELECTION = "(cuda and not cuda_emulator) or triton or gpu"
# What make gpu-dry-run runs of that selection: a few quick tests (the Triton interpreter is slow).
DRY_TEST_SELECTION = "test_streaming_logsumexp_edges or test_one_hot_teacher_at_large_scaled_logits_is_exact"

BENCH_OPS = ("incremental_loss", "incremental_loss_upsampled", "attentive_distillation", "structured_attention")
BENCH_SIZES = ("voc512_b24", "ade512_b24", "voc512_s16_b24", "feat2048x64")
COMPILED_OPS = ("incremental_loss", "incremental_loss_upsampled")
COMPILED_SIZES = ("voc512_b24", "voc512_s16_b24")
DRY_BENCH_SIZES = ("quick_logits", "quick_upsampled", "quick_features")
GPU_BACKENDS = ("cuda", "triton")
FUSED_UPSAMPLING = "-size"  # incseg_fast.bench.cases.FUSED_UPSAMPLING (checked by the tests)

# (part, backend, dtype) of each smoke process (gpu_smoke.py --tiny; None: every dtype of --tiny).
SMOKE_PARTS = (
    ("cuda", "cuda", None),
    ("triton fp32", "triton", "float32"),
    ("triton bf16", "triton", "bfloat16"),
    ("triton fp16", "triton", "float16"),
)

SANITIZERS = ("memcheck", "racecheck", "synccheck", "initcheck")
# Every tensor its own allocation, so that an out-of-bounds access cannot land in a pooled neighbour
# and initcheck sees each allocation as new.
NO_CACHING = {"PYTORCH_NO_CUDA_MEMORY_CACHING": "1"}
SANITIZER_ENV = {"memcheck": NO_CACHING, "initcheck": NO_CACHING}

# (op, size, dtypes) profiled by ncu (tools/ncu_workload.py), through each of GPU_BACKENDS.
NCU_CASES = (
    ("incremental_loss", "voc512", ("fp32", "bf16")),
    ("incremental_loss_upsampled", "voc512_s8", ("fp32", "bf16")),
    ("attentive_distillation", "feat2048x64", ("fp32",)),
    ("structured_attention", "feat2048x64", ("fp32",)),
)
NCU_METRICS = (
    "gpu__time_duration.sum",
    "dram__bytes_read.sum",
    "dram__bytes_write.sum",
    "dram__throughput.avg.pct_of_peak_sustained_elapsed",
    "launch__registers_per_thread",
    "sm__warps_active.avg.pct_of_peak_sustained_active",
)
# Our kernels only: the CUDA ones live in namespace incseg, the Triton ones are named _*_kernel.
NCU_KERNELS = r"regex:incseg::|^_\w+_kernel"
NCU_LAUNCH_COUNT = "80"

# What OUT receives (the device machine returns at most 8 files).
OUT_FILES = (
    "summary.txt",
    "gpu_check.log",
    "tests.xml",
    "bench_fp32.json",
    "bench_bf16.json",
    "bench_compiled.json",
    "train_step.json",
    "ncu.csv",
)


@dataclasses.dataclass(frozen=True)
class Target:
    """Where the commands run: the python, OUT, whether this is the CPU dry run, and the tools found."""

    python: str
    out: str
    dry: bool = False
    xdist: bool = True
    sanitizer: str = "compute-sanitizer"
    ncu: str = "ncu"


@dataclasses.dataclass(frozen=True)
class Command:
    argv: list
    env: dict = dataclasses.field(default_factory=dict)
    wraps: list = None  # the tool prefix (sanitizer, ncu) that the dry run leaves off and prints


def interpreter_env(target):
    """Under the dry run Triton runs in its interpreter on CPU tensors."""
    return {"TRITON_INTERPRET": "1"} if target.dry else {}


def build_command(target, arch):
    env = {"TORCH_CUDA_ARCH_LIST": arch, "MAX_JOBS": MAX_JOBS, "INCSEG_FORCE_CUDA": "1"}
    return Command([target.python, "setup.py", "build_ext", "--inplace"], env)


def smoke_commands(target):
    """[(part, Command)] run side by side: the cuda backend, and the Triton backend one dtype per process
    (compiling each kernel on first use takes most of its time)."""
    parts = []
    for part, backend, dtype in SMOKE_PARTS:
        argv = [target.python, "tools/gpu_smoke.py", "--tiny", "--backend"]
        argv.append("cuda_emulator" if target.dry and backend == "cuda" else backend)
        argv += ["--dtypes", dtype] if dtype else []
        parts.append((part, Command(argv, interpreter_env(target))))
    return parts


def bench_providers(backends, compiled=False):
    """The report's providers: the baseline, each backend, and each backend with the fused upsampling."""
    return ["compiled" if compiled else "eager", *backends, *(b + FUSED_UPSAMPLING for b in backends)]


def bench_command(target, dtype, max_seconds, compiled=False):
    """The benchmark report in `dtype` (bench_<dtype>.json, or bench_compiled.json); the dry run takes
    the quick sizes on CPU, and eager for compiled (compiling takes minutes on a small CPU)."""
    ops, sizes = (COMPILED_OPS, COMPILED_SIZES) if compiled else (BENCH_OPS, BENCH_SIZES)
    backends = ("cpu",) if target.dry else GPU_BACKENDS
    argv = [target.python, "-m", "incseg_fast.bench", "--device", "cpu" if target.dry else "cuda"]
    argv += ["--ops", ",".join(ops), "--sizes", ",".join(DRY_BENCH_SIZES if target.dry else sizes)]
    argv += ["--dtype", dtype, "--providers", ",".join(bench_providers(backends, compiled and not target.dry))]
    argv += ["--json", bench_json(target, "compiled" if compiled else dtype), "--max-seconds", str(max_seconds)]
    return Command(argv + (["--reps", "2", "--warmup", "1"] if target.dry else []))


# The whole training step (incseg_fast/bench/train_step.py) on the GPU: the papers' batch, no torch.compile
# (its compile time would take the step's budget), the largest batch not searched (minutes).
TRAIN_STEP_SETTINGS = ("voc15-5", "ade100-50")
TRAIN_STEP_PROVIDERS = ("mib", "fused", "fused+size")


def train_step_command(target, max_seconds):
    """The benchmark report's train_step case into train_step.json; the dry run takes its quick (tiny
    network) shape on the CPU."""
    argv = [target.python, "-m", "incseg_fast.bench", "--device", "cpu" if target.dry else "cuda"]
    argv += ["--ops", "train_step", "--sizes", ",".join(TRAIN_STEP_SETTINGS)]
    argv += ["--providers", ",".join(TRAIN_STEP_PROVIDERS), "--dtype", "fp32"]
    argv += ["--json", train_step_json(target)]
    argv += ["--max-seconds", str(max_seconds)]
    return Command(argv + (["--quick"] if target.dry else []))


def bench_case_names(ops, sizes, dtype):
    """The benchmark report's cases for these ops and sizes on a GPU (each op at the sizes of its kind)."""
    from incseg_fast.bench import cases  # torch: imported only where the names are wanted

    return [case.name for case in cases.select_cases(ops=ops, sizes=sizes, dtype_name=dtype, device="cuda")]


def bench_json(target, name):
    return os.path.join(target.out, f"bench_{name}.json")


def train_step_json(target):
    return os.path.join(target.out, "train_step.json")


def tests_command(target):
    argv = [target.python, "-m", "pytest", "-q", "-rfEs", "-p", "no:cacheprovider"]
    if target.xdist:
        argv += ["-n", "2" if target.dry else XDIST_WORKERS]
    selection = f"({TEST_SELECTION}) and ({DRY_TEST_SELECTION})" if target.dry else TEST_SELECTION
    argv += [*TEST_FILES, "-k", selection, f"--junitxml={os.path.join(target.out, 'tests.xml')}"]
    return Command(argv, interpreter_env(target))


def sanitizer_command(target, tool):
    wrap = [target.sanitizer, "--tool", tool, "--error-exitcode", "1", "--print-limit", "20"]
    backend = "cuda_emulator" if target.dry else "cuda"
    return Command(
        [target.python, "tools/gpu_smoke.py", "--tiny", "--backend", backend], SANITIZER_ENV.get(tool, {}), wrap
    )


def ncu_command(target):
    wrap = [target.ncu, "--csv", "--print-units", "base", "--clock-control", "none", "--target-processes", "all"]
    wrap += ["--kernel-name-base", "demangled", "--kernel-name", NCU_KERNELS, "--launch-count", NCU_LAUNCH_COUNT]
    wrap += ["--metrics", ",".join(NCU_METRICS)]
    argv = [target.python, "tools/ncu_workload.py"]
    argv += ["--device", "cpu", "--backend", "cpu", "--quick"] if target.dry else ["--backend", ",".join(GPU_BACKENDS)]
    return Command(argv, {}, wrap)


def shown(command):
    """The command line as a shell would take it (env first, the tool prefix included)."""
    words = [f"{k}={v}" for k, v in command.env.items()] + (command.wraps or []) + command.argv
    return " ".join(_quote(w) for w in words)


def _quote(word):
    return f"'{word}'" if any(c in word for c in " ()|\\^*") else word


# ---------------------------------------------------------------------------------------------
# Budgets.
# ---------------------------------------------------------------------------------------------


def required_after(name):
    """The required steps after `name`."""
    names = [s.name for s in STEPS]
    return [s for s in STEPS[names.index(name) + 1 :] if not s.optional]


def step_limit(name, left_s, building=False):
    """Seconds step `name` may take with `left_s` of the budget left, or 0 when it must not run (less
    than its minimum). An optional step takes what is left, up to its budget where it has one (0: no
    cap); load-or-build has BUILD_BUDGET_S when
    `building`."""
    step = STEP[name]
    kept = sum(s.minimum_s for s in required_after(name))
    budget = BUILD_BUDGET_S if (building and name == "load-or-build") else step.budget_s
    limit = min(budget or left_s, left_s - kept)  # an optional step without a budget takes the rest
    return int(limit) if limit >= step.minimum_s else 0


def worst_cases():
    """{"prebuilt": s, "build": s}: the most the required steps can take in each case (budgets; with a
    build, the build's budget and the minimums after it)."""
    required = [s for s in STEPS if not s.optional]
    prebuilt = sum(s.budget_s for s in required)
    before = sum(s.budget_s for s in required[: [s.name for s in required].index("load-or-build")])
    build = before + BUILD_BUDGET_S + sum(s.minimum_s for s in required_after("load-or-build"))
    return {"prebuilt": prebuilt, "build": build}


def format_plan(target):
    """The plan as printed by `gpu_check.py --plan` (torch is imported for the benchmark cases)."""
    lines = [
        f"gpu-check plan: budget {BUDGET_S} s, a step's overrun cut {GRACE_S} s after its limit; "
        f"ends by {START_S + BUDGET_S + GRACE_S} s < {DEADLINE_S} s on an H100 whatever happens",
        f"{'step':<16}{'budget s':>9}{'min s':>7}  what",
    ]
    for step in STEPS:
        budget = str(step.budget_s) if step.budget_s else "rest"
        budget = f"<={budget}" if step.optional and step.budget_s else budget
        lines.append(f"{step.name:<16}{budget:>9}{step.minimum_s:>7}  {step.what}")
    cases = worst_cases()
    lines.append(
        f"required steps: at most {cases['prebuilt']} s with a prebuilt extension, {cases['build']} s "
        f"when building (later steps then get their minimums); the optional steps run on the rest"
    )
    lines += ["", "commands (on the GPU):"]
    lines += [f"  build:      {shown(build_command(target, '<device arch>'))}"]
    lines += [f"  smoke:      {shown(command)}" for _, command in smoke_commands(target)]
    for dtype in ("fp32", "bf16"):
        lines.append(f"  bench {dtype}: {shown(bench_command(target, dtype, '<limit - 20>'))}")
    lines.append(f"  tests:      {shown(tests_command(target))}")
    lines += [f"  {tool + ':':<11} {shown(sanitizer_command(target, tool))}" for tool in SANITIZERS]
    lines.append(f"  ncu:        {shown(ncu_command(target))}")
    lines.append(f"  train step: {shown(train_step_command(target, '<limit - 30>'))}")
    lines.append(f"  compiled:   {shown(bench_command(target, 'fp32', '<limit - 20>', compiled=True))}")
    lines += ["", "test files:"] + [f"  {name}" for name in TEST_FILES]
    for dtype in ("fp32", "bf16"):
        lines.append(f"bench {dtype} cases: {', '.join(bench_case_names(BENCH_OPS, BENCH_SIZES, dtype))}")
    lines.append(f"compiled cases:   {', '.join(bench_case_names(COMPILED_OPS, COMPILED_SIZES, 'fp32'))}")
    lines.append(
        "ncu cases:  "
        + "; ".join(f"{op} {size} {'/'.join(dtypes)}" for op, size, dtypes in NCU_CASES)
        + f" (through {', '.join(GPU_BACKENDS)}; at most {NCU_LAUNCH_COUNT} launches)"
    )
    lines.append(f"OUT gets:   {' '.join(OUT_FILES)}")
    return "\n".join(lines)
