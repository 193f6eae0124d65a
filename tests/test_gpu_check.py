"""tools/gpu_check.py without a GPU: the plan and its budgets, the prebuilt extension's manifest, the
ncu and compute-sanitizer parsers, how a failing step command is reported, and that every test file
with GPU tests is in the plan (so that the list cannot drift)."""

import ast
import glob
import hashlib
import json
import os
import subprocess
import sys
import time

import pytest
import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "tools"))
import gpu_check  # noqa: E402
import gpu_load  # noqa: E402
import gpu_plan  # noqa: E402
import gpu_results  # noqa: E402
import gpu_smoke  # noqa: E402
import ncu_report  # noqa: E402

from incseg_fast.bench import cases as bench_cases  # noqa: E402

L2_BYTES = 50 * 2**20  # an H100's L2


# ---------------------------------------------------------------------------------------------
# The plan and its budgets.
# ---------------------------------------------------------------------------------------------


def simulate(building, overrun_s=0):
    """[(step, limit)] and the seconds taken when every step runs its whole limit plus overrun_s."""
    left, ran = gpu_plan.BUDGET_S, []
    for step in gpu_plan.STEPS:
        limit = gpu_plan.step_limit(step.name, left, building)
        if limit:
            left -= limit + overrun_s
        ran.append((step.name, limit))
    return ran, gpu_plan.BUDGET_S - left


@pytest.mark.parametrize("building", [False, True])
def test_every_required_step_gets_at_least_its_minimum_when_all_take_their_limit(building):
    ran, taken = simulate(building)
    for name, limit in ran:
        if not gpu_plan.STEP[name].optional:
            assert limit >= gpu_plan.STEP[name].minimum_s, (name, limit)
    assert dict(ran)["load-or-build"] == (
        gpu_plan.BUILD_BUDGET_S if building else gpu_plan.STEP["load-or-build"].budget_s
    )
    assert taken <= gpu_plan.BUDGET_S


@pytest.mark.parametrize("building", [False, True])
def test_the_check_ends_inside_the_deadline_even_when_every_step_overruns(building):
    _, taken = simulate(building, overrun_s=gpu_plan.GRACE_S)
    assert taken <= gpu_plan.BUDGET_S + gpu_plan.GRACE_S
    assert gpu_plan.START_S + gpu_plan.BUDGET_S + gpu_plan.GRACE_S <= gpu_plan.DEADLINE_S


def test_budgets_add_up_inside_the_total():
    worst = gpu_plan.worst_cases()
    assert worst["prebuilt"] <= gpu_plan.BUDGET_S and worst["build"] <= gpu_plan.BUDGET_S
    required = [s for s in gpu_plan.STEPS if not s.optional]
    assert worst["prebuilt"] == sum(s.budget_s for s in required)


def test_step_limit_keeps_the_later_minimums_and_skips_a_step_below_its_own():
    later = sum(s.minimum_s for s in gpu_plan.required_after("tests"))
    assert gpu_plan.step_limit("tests", 1000) == gpu_plan.STEP["tests"].budget_s
    assert gpu_plan.step_limit("tests", later + 50) == 50
    assert gpu_plan.step_limit("tests", later + gpu_plan.STEP["tests"].minimum_s - 1) == 0
    assert gpu_plan.step_limit("bench compiled", 100) == 100  # the optional step takes what is left
    assert gpu_plan.step_limit("bench compiled", gpu_plan.STEP["bench compiled"].minimum_s - 1) == 0


def test_the_optional_steps_come_last():
    optional = [s.name for s in gpu_plan.STEPS if s.optional]
    assert optional == [s.name for s in gpu_plan.STEPS[-len(optional) :]] == ["train step", "bench compiled"]


def test_an_optional_step_with_a_budget_takes_the_rest_up_to_it():
    budget = gpu_plan.STEP["train step"].budget_s
    assert gpu_plan.step_limit("train step", budget + 200) == budget
    assert gpu_plan.step_limit("train step", budget - 10) == budget - 10
    assert gpu_plan.step_limit("train step", gpu_plan.STEP["train step"].minimum_s - 1) == 0


def test_the_train_step_command_writes_train_step_json(tmp_path):
    gpu = gpu_plan.Target(out=str(tmp_path), python="python3", dry=False)
    argv = gpu_plan.train_step_command(gpu, 70).argv
    assert argv[argv.index("--ops") + 1] == "train_step" and argv[argv.index("--device") + 1] == "cuda"
    assert argv[argv.index("--json") + 1] == str(tmp_path / "train_step.json")
    dry = gpu_plan.train_step_command(gpu_plan.Target(out=str(tmp_path), python="python3", dry=True), 70).argv
    assert "--quick" in dry and dry[dry.index("--device") + 1] == "cpu"


def test_every_summary_label_leaves_a_space_before_its_text():
    parts = [part for part, *_ in gpu_plan.SMOKE_PARTS] + list(gpu_plan.SANITIZERS)
    labels = [s.name for s in gpu_plan.STEPS] + ["  " + part for part in parts] + ["device", "versions", "verdict"]
    assert max(len(label) for label in labels) < gpu_check.LABEL


def test_plan_prints_every_step_budget_file_and_case(capsys):
    assert gpu_check.main(["--plan"]) == 0
    plan = capsys.readouterr().out
    for step in gpu_plan.STEPS:
        assert f"\n{step.name:<16}" in plan
    for name in gpu_plan.TEST_FILES:
        assert f"  {name}\n" in plan
    assert "incremental_loss-ade512_b24-bf16" in plan and "compute-sanitizer --tool racecheck" in plan
    assert f"< {gpu_plan.DEADLINE_S} s" in plan


def test_out_files_fit_the_device_return_and_name_what_the_commands_write():
    assert len(gpu_plan.OUT_FILES) <= 8
    target = gpu_plan.Target("python3", "OUT")
    written = [gpu_plan.bench_command(target, d, 1).argv for d in ("fp32", "bf16")]
    written.append(gpu_plan.bench_command(target, "fp32", 1, compiled=True).argv)
    written.append(gpu_plan.train_step_command(target, 1).argv)
    written = [os.path.basename(argv[argv.index("--json") + 1]) for argv in written]
    junit = [w for w in gpu_plan.tests_command(target).argv if w.startswith("--junitxml=")]
    written.append(os.path.basename(junit[0].split("=", 1)[1]))
    assert set(written) | {"summary.txt", "gpu_check.log", "ncu.csv"} == set(gpu_plan.OUT_FILES)


def test_benchmark_plan_names_real_cases_providers_and_sizes_beyond_l2():
    assert gpu_plan.FUSED_UPSAMPLING == bench_cases.FUSED_UPSAMPLING
    assert gpu_plan.GPU_BACKENDS == bench_cases.BACKENDS_FOR_DEVICE["cuda"]
    names = gpu_plan.bench_case_names(gpu_plan.BENCH_OPS, gpu_plan.BENCH_SIZES, "bf16")
    assert {name.split("-")[0] for name in names} == set(gpu_plan.BENCH_OPS)
    for size in (bench_cases.SIZES[s] for s in gpu_plan.BENCH_SIZES):
        B, C = size.dims[:2]
        H, W = size.dims[-3:-1] if size.kind == "upsampled" else size.dims[-2:]
        assert B * C * H * W * 2 > L2_BYTES, size.name  # even in bf16
    assert {s.dims[0] for s in map(bench_cases.SIZES.get, gpu_plan.BENCH_SIZES) if s.kind != "features"} == {24}
    for op, size, dtypes in gpu_plan.NCU_CASES:
        assert bench_cases.select_cases(ops=[op], sizes=[size], dtype_name=dtypes[0], device="cuda"), (op, size)


def test_commands_never_take_the_compiled_provider_outside_the_optional_step():
    target = gpu_plan.Target("python3", "OUT")
    for dtype in ("fp32", "bf16"):
        argv = gpu_plan.bench_command(target, dtype, 1).argv
        assert "compiled" not in argv[argv.index("--providers") + 1].split(",")
    argv = gpu_plan.bench_command(target, "fp32", 1, compiled=True).argv
    assert argv[argv.index("--providers") + 1].split(",")[0] == "compiled"


def test_the_tiny_smoke_reaches_every_op_family_in_every_dtype_with_and_without_size():
    tiny = list(gpu_smoke.tiny_cases())
    for family in gpu_smoke.FAMILIES:
        assert {c[3]["dtype"] for c in tiny if c[0] == family} == set(gpu_smoke.TINY_DTYPES), family
    for dtype in gpu_smoke.TINY_DTYPES:
        logit = [c[3] for c in tiny if c[0] == "logit losses" and c[3]["dtype"] == dtype]
        assert any("low_res" in k for k in logit) and any("low_res" not in k for k in logit)
        shapes = [k["shape"] for k in logit if "low_res" not in k]
        assert {(H * W) % 16 == 0 for *_, H, W in shapes} == {True, False}  # packed loads and tails


def test_the_smoke_runs_on_cpu_tensors_and_filters_dtypes(capsys):
    assert gpu_smoke.main(["--tiny", "--backend", "cuda_emulator", "--dtypes", "bfloat16"]) == 0
    assert (
        capsys.readouterr().out.splitlines()[-1] == "gpu-smoke: PASS: backend cuda_emulator, 11 cases passed, 0 failed"
    )
    if not torch.cuda.is_available():
        assert gpu_smoke.main(["--tiny", "--backend", "cuda", "--dtypes", "float32"]) == 1
        assert "FAIL  backend cuda: --backend cuda needs a CUDA device" in capsys.readouterr().out


@pytest.mark.parametrize("option", [["--backend", "cuda,gpu"], ["--dtypes", "bf16"]])
def test_the_smoke_names_an_unknown_backend_or_dtype(capsys, option):
    with pytest.raises(SystemExit) as exit_:
        gpu_smoke.main(option)
    assert exit_.value.code == 2 and f"unknown {option[1].split(',')[-1]}" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------------
# Every test file with GPU tests is in the plan, and its GPU tests are selected.
# ---------------------------------------------------------------------------------------------

GPU_BACKEND_NAMES = {"cuda", "triton"}
GPU_BACKEND_LISTS = {"FUSED_BACKENDS", "PARITY_BACKENDS", "BACKENDS"}  # incseg_fast.vocabulary, parity_support


def _call_name(node):
    func = node.func
    return func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", None)


def _names_a_gpu_backend(node):
    """Whether parameter values name a GPU backend (a dict's keys are not values)."""
    keys = {id(k) for n in ast.walk(node) if isinstance(n, ast.Dict) for k in n.keys}
    return any(
        (isinstance(n, ast.Constant) and n.value in GPU_BACKEND_NAMES and id(n) not in keys)
        or (isinstance(n, ast.Name) and n.id in GPU_BACKEND_LISTS)
        for n in ast.walk(node)
    )


def _parametrized(function):
    """The argument names a test's own parametrize decorators give values to."""
    names = []
    for decorator in function.decorator_list:
        if isinstance(decorator, ast.Call) and _call_name(decorator) == "parametrize" and decorator.args:
            first = decorator.args[0]
            names += first.value.replace(" ", "").split(",") if isinstance(first, ast.Constant) else []
    return names


def _requires_gpu(node):
    """skipif(not torch.cuda.is_available(), ...)"""
    if _call_name(node) != "skipif" or not node.args:
        return False
    condition = node.args[0]
    return isinstance(condition, ast.UnaryOp) and "cuda.is_available" in ast.unparse(condition.operand)


def gpu_tests(source):
    """(whether the file has GPU parametrisations or tests, [test functions that need a GPU by name]):
    cuda/triton parameters or fixture params, tests taking conftest's `backend` fixture (every fused
    backend) in a file without its own, tests named test_gpu_*, and skipif(not cuda available)."""
    tree = ast.parse(source)
    functions = [n for n in ast.walk(tree) if isinstance(n, ast.FunctionDef)]
    own_backend = any(f.name == "backend" for f in functions)
    found = False
    needing = []
    for function in functions:
        if not function.name.startswith("test_"):
            continue
        if function.name.startswith("test_gpu_") or any(
            isinstance(d, ast.Call) and _requires_gpu(d) for d in function.decorator_list
        ):
            needing.append(function.name)
        takes_fixture = "backend" in [a.arg for a in function.args.args] and "backend" not in _parametrized(function)
        found |= takes_fixture and not own_backend
    for call in (n for n in ast.walk(tree) if isinstance(n, ast.Call)):
        if _call_name(call) == "parametrize" and len(call.args) > 1:
            found |= _names_a_gpu_backend(call.args[1])
        if _call_name(call) == "fixture":
            found |= any(k.arg == "params" and _names_a_gpu_backend(k.value) for k in call.keywords)
        found |= _requires_gpu(call)
    return found or bool(needing), needing


def test_the_scan_recognises_each_way_a_test_is_marked_for_the_gpu():
    def marked(source):
        return gpu_tests(source)[0]

    assert marked("@pytest.mark.parametrize('backend', ['cpu', 'cuda'])\ndef test_a(backend): pass")
    assert marked("@pytest.fixture(params=[CUDA_EMULATOR, 'triton'])\ndef be(request): pass")
    assert marked("@pytest.mark.parametrize('backend', FUSED_BACKENDS)\ndef test_a(backend): pass")
    assert marked("def test_a(backend): pass")  # conftest's fixture
    assert marked("def test_gpu_speed(): pass")
    assert marked("@pytest.mark.skipif(not torch.cuda.is_available(), reason='x')\ndef test_a(): pass")
    assert not marked(
        "@pytest.fixture(params=['reference', 'cpu'])\ndef backend(request): pass\ndef test_a(backend): pass"
    )
    assert not marked("@pytest.mark.skipif(torch.cuda.is_available(), reason='x')\ndef test_a(): pass")
    assert not marked("@pytest.mark.parametrize('backend', ['cuda_emulator'])\ndef test_a(backend): pass")
    assert not marked("@pytest.mark.parametrize('manifest', [{'cuda': '12.8'}])\ndef test_a(manifest): pass")


@pytest.fixture(scope="module")
def selected_ids():
    """The test ids the tests step selects (pytest --collect-only with its files and -k)."""
    command = [sys.executable, "-m", "pytest", "--collect-only", "-q", "-p", "no:cacheprovider", "-p", "no:xdist"]
    command += [*gpu_plan.TEST_FILES, "-k", gpu_plan.TEST_SELECTION]
    result = subprocess.run(command, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert result.returncode == 0, result.stdout[-2000:] + result.stderr[-2000:]
    return [line for line in result.stdout.splitlines() if "::" in line]


def test_every_test_file_with_gpu_tests_is_in_the_plan_and_its_gpu_tests_selected(selected_ids):
    missing, unselected = [], []
    for path in sorted(glob.glob(os.path.join(ROOT, "tests", "test_*.py"))):
        name = os.path.relpath(path, ROOT)
        with open(path) as f:
            has_gpu_tests, needing = gpu_tests(f.read())
        if has_gpu_tests and name not in gpu_plan.TEST_FILES:
            missing.append(name)
        # a test that needs a GPU by its name or a skip must be in the -k selection
        unselected += [f"{name}::{f}" for f in needing if not any(i.startswith(f"{name}::{f}") for i in selected_ids)]
    assert not missing, f"test files with GPU tests missing from gpu_plan.TEST_FILES: {missing}"
    assert not unselected, f"GPU tests that gpu_plan.TEST_SELECTION leaves out: {unselected}"


def test_each_planned_file_contributes_gpu_tests_and_no_emulator_ones(selected_ids):
    for name in gpu_plan.TEST_FILES:
        assert any(i.startswith(name + "::") for i in selected_ids), f"-k selects nothing in {name}"
    assert not [i for i in selected_ids if "[cuda_emulator" in i or "-cuda_emulator" in i]


@pytest.mark.skipif(torch.cuda.is_available(), reason="the dry run's Triton interpreter stands in for a GPU")
def test_the_dry_runs_selection_runs_some_tests(tmp_path):
    """make gpu-dry-run runs a few tests of the same selection: they exist and pass here."""
    target = gpu_plan.Target(sys.executable, str(tmp_path), dry=True, xdist=False)
    command = gpu_plan.tests_command(target)
    result = subprocess.run(command.argv, cwd=ROOT, env=dict(os.environ, **command.env), capture_output=True, text=True)
    assert result.returncode == 0, result.stdout[-2000:]
    total, failures, errors, skipped, _ = gpu_results.junit_counts(str(tmp_path / "tests.xml"))
    assert total - skipped > 0 and failures == errors == 0


# ---------------------------------------------------------------------------------------------
# The prebuilt extension.
# ---------------------------------------------------------------------------------------------


def write_prebuilt(root, data=b"\x7fELF...", **manifest_changes):
    """A prebuilt folder for torch 2.11.0 and CUDA 13 (sm_80, sm_90), its manifest changed as asked."""
    folder = root / gpu_load.folder_name("2.11.0+cu130", "13.0")
    folder.mkdir(parents=True)
    (folder / gpu_load.LIBRARY).write_bytes(data)
    manifest = {"torch": "2.11.0", "cuda": "13.0", "archs": ["8.0", "9.0"], "sha256": hashlib.sha256(data).hexdigest()}
    (folder / gpu_load.MANIFEST).write_text(json.dumps(dict(manifest, **manifest_changes)))
    return folder


def test_a_matching_prebuilt_is_found(tmp_path):
    folder = write_prebuilt(tmp_path)
    assert folder.name == "torch-2.11.0-cu13"
    library, why_not = gpu_load.match_prebuilt(str(tmp_path), "2.11.0+cu130", "13.0", "9.0")
    assert (library, why_not) == (str(folder / gpu_load.LIBRARY), None)
    assert gpu_load.match_prebuilt(str(tmp_path), "2.11.0+cu130", "13.2", "8.0")[0] is not None  # same major


@pytest.mark.parametrize(
    "torch_version, cuda, arch, manifest, why",
    [
        ("2.11.1+cu130", "13.0", "9.0", {}, "no prebuilt/torch-2.11.1-cu13/_C.abi3.so"),
        ("2.11.0+cu126", "12.6", "9.0", {}, "no prebuilt/torch-2.11.0-cu12/_C.abi3.so"),
        ("2.11.0+cu130", "13.0", "9.0", {"torch": "2.10.0"}, "built for torch 2.10.0, running 2.11.0+cu130"),
        ("2.11.0+cu130", "13.0", "9.0", {"cuda": "12.8"}, "built for CUDA 12.8, torch has CUDA 13.0"),
        ("2.11.0+cu130", "13.0", "10.0", {}, "built for archs 8.0, 9.0, the device is 10.0"),
        ("2.11.0+cu130", "13.0", "9.0", {"sha256": "0" * 64}, "_C.abi3.so's sha256 is not the manifest's"),
        ("2.11.0+cpu", None, None, {}, "torch 2.11.0+cpu has no CUDA"),
    ],
)
def test_a_prebuilt_that_does_not_match_means_a_build(tmp_path, torch_version, cuda, arch, manifest, why):
    write_prebuilt(tmp_path / "prebuilt", **manifest)
    library, why_not = gpu_load.match_prebuilt(str(tmp_path / "prebuilt"), torch_version, cuda, arch)
    assert library is None and why_not.startswith(why), why_not


def test_an_unreadable_manifest_means_a_build(tmp_path):
    folder = write_prebuilt(tmp_path)
    (folder / gpu_load.MANIFEST).write_text('{"torch": "2.11.0"')
    library, why_not = gpu_load.match_prebuilt(str(tmp_path), "2.11.0+cu130", "13.0", "9.0")
    assert library is None and "is unreadable (JSONDecodeError" in why_not


def test_installing_a_prebuilt_replaces_every_other_extension(tmp_path):
    folder = write_prebuilt(tmp_path / "prebuilt", data=b"prebuilt")
    package = tmp_path / "incseg_fast"
    package.mkdir()
    (package / "_C.cpython-312-x86_64-linux-gnu.so").write_bytes(b"old")
    (package / "_C.abi3.so").write_bytes(b"older")
    (package / "other.so").write_bytes(b"kept")
    installed = gpu_load.install_prebuilt(str(folder / gpu_load.LIBRARY), str(package))
    assert sorted(os.listdir(package)) == ["_C.abi3.so", "other.so"]
    assert (package / "_C.abi3.so").read_bytes() == b"prebuilt" and installed == str(package / "_C.abi3.so")


# ---------------------------------------------------------------------------------------------
# Parsers: ncu's CSV, compute-sanitizer's summary, nvcc's version.
# ---------------------------------------------------------------------------------------------

NCU_HEADER = (
    '"ID","Process ID","Process Name","Host Name","Kernel Name","Context","Stream","Block Size","Grid Size",'
    '"Device","CC","Section Name","Metric Name","Metric Unit","Metric Value"'
)
FORWARD = "void incseg::run_on_device<incseg::logit::LogitForwardKernel<float, (bool)1>>(T1)"
NCU_VALUES = {
    FORWARD: [
        ("dram__bytes_read.sum", "byte", "176,160,768"),
        ("dram__bytes_write.sum", "byte", "1,048,576"),
        ("dram__throughput.avg.pct_of_peak_sustained_elapsed", "%", "88.41"),
        ("gpu__time_duration.sum", "nsecond", "70,464"),
        ("launch__registers_per_thread", "register/thread", "64"),
        ("sm__warps_active.avg.pct_of_peak_sustained_active", "%", "71.2"),
    ],
    "_logit_losses_bwd_kernel": [
        ("dram__bytes_read.sum", "Mbyte", "352.32"),
        ("dram__bytes_write.sum", "Mbyte", "176.16"),
        ("gpu__time_duration.sum", "usecond", "211.5"),
        ("launch__registers_per_thread", "register/thread", "128"),
        ("sm__inst_executed.sum", "inst", "12"),  # a metric the report does not use
    ],
}


def ncu_output():
    lines = ["==PROF== Connected to process 4242 (/usr/bin/python3.12)", "ok    incremental_loss-voc512-fp32 cuda"]
    lines.append('==PROF== Profiling "run_on_device" - 0: 0%....50%....100% - 9 passes')
    lines.append(NCU_HEADER)
    for index, (kernel, metrics) in enumerate(NCU_VALUES.items()):
        head = f'"{index}","4242","python3.12","127.0.0.1","{kernel}","1","7","(128, 1, 1)","(2048, 8, 1)","0","9.0"'
        lines += [f'{head},"Command line profiler metrics","{m}","{u}","{v}"' for m, u, v in metrics]
    lines.append("ncu-workload: PASS: 0 calls failed")
    return "\n".join(lines) + "\n"


def test_ncu_csv_gives_one_record_per_launch_in_base_units():
    forward, backward = ncu_report.parse(ncu_output())
    assert forward["kernel"] == FORWARD and forward["grid"] == "(2048, 8, 1)"
    assert forward["read_bytes"] == 176_160_768 and forward["write_bytes"] == 1_048_576
    assert forward["time_s"] == pytest.approx(70.464e-6)
    assert (forward["dram_pct"], forward["registers"], forward["occupancy_pct"]) == (88.41, 64, 71.2)
    assert backward["read_bytes"] == pytest.approx(352.32e6) and backward["time_s"] == pytest.approx(211.5e-6)
    assert "dram_pct" not in backward and "sm__inst_executed.sum" not in backward


def test_ncu_csv_of_a_version_with_other_columns():
    text = (
        '"ID","Process ID","Process Name","Host Name","Kernel Name","Kernel Time","Context","Stream",'
        '"Section Name","Metric Name","Metric Unit","Metric Value"\n'
        '"3","1","python3","h","_ad_bwd_kernel","2026-Dec-06 09:00:00","1","7","Command line profiler metrics",'
        '"dram__bytes_write.sum","Kbyte","2,048.5"\n'
    )
    assert ncu_report.parse(text) == [
        {"id": 3, "kernel": "_ad_bwd_kernel", "grid": "", "block": "", "write_bytes": pytest.approx(2_048_500)}
    ]


def test_ncu_table_shows_the_achieved_rate_and_the_short_kernel_names():
    lines = ncu_report.format_table(ncu_report.parse(ncu_output()))
    assert lines[1].split() == [
        "LogitForwardKernel<float,",
        "(bool)1>",
        "70.5",
        "176.2",
        "1.0",
        "2515",
        "88",
        "64",
        "71",
    ]
    assert lines[2].split()[:4] == ["_logit_losses_bwd_kernel", "211.5", "352.3", "176.2"]
    assert lines[2].split()[-3:] == ["-", "128", "-"]  # not reported: shown as such
    assert ncu_report.format_table(ncu_report.parse(ncu_output()), limit=1)[-1].startswith("  ... and 1 more")


def test_ncu_output_without_a_table_or_with_an_unknown_unit():
    assert ncu_report.parse("==PROF== Disconnected from process 4242\n==ERROR== LibraryNotLoaded\n") == []
    with pytest.raises(ValueError, match="unknown unit 'furlong'"):
        ncu_report.parse(ncu_output().replace('"byte","176,160,768"', '"furlong","176,160,768"'))


@pytest.mark.parametrize(
    "output, clean, summary",
    [
        ("gpu-smoke: PASS\n========= ERROR SUMMARY: 0 errors\n", True, "0 errors"),
        ("========= Invalid __global__ read of size 4\n========= ERROR SUMMARY: 2 errors\n", False, "2 errors"),
        ("========= RACECHECK SUMMARY: 0 hazards displayed (0 errors, 0 warnings)\n", True, "0 hazards displayed"),
        ("========= RACECHECK SUMMARY: 3 hazards displayed (1 error, 2 warnings)\n", False, "3 hazards displayed"),
        ("gpu-smoke: PASS\n", False, "no error summary"),
    ],
)
def test_sanitizer_verdict(output, clean, summary):
    found_clean, found = gpu_results.sanitizer_verdict(output)
    assert found_clean == clean and found.startswith(summary)


def test_nvcc_must_match_torchs_cuda_major():
    nvcc = "nvcc: NVIDIA (R) Cuda compiler driver\nCuda compilation tools, release 13.0, V13.0.48\n"
    assert gpu_results.cuda_major_mismatch(nvcc, "13.0") is None
    assert gpu_results.cuda_major_mismatch(nvcc, "12.8") == "nvcc is CUDA 13.0, torch is CUDA 12.8"
    assert gpu_results.cuda_major_mismatch(nvcc, None) == "torch has no CUDA"
    assert gpu_results.cuda_major_mismatch("garbage", "13.0") == "nvcc's version is unknown"


def test_preflight_names_each_missing_piece():
    nvcc = "Cuda compilation tools, release 13.0, V13.0.48"
    tools = {"compute-sanitizer": "/usr/local/cuda/bin/compute-sanitizer", "ncu": None, "ninja": "/usr/bin/ninja"}
    modules = {"pytest": True, "xdist": False}
    assert gpu_results.preflight_problems(tools, modules, nvcc, "13.0") == [
        "ncu not found",
        "pytest-xdist not importable",
    ]
    everything = {name: "/bin/" + name for name in tools}
    assert gpu_results.preflight_problems(everything, {"pytest": True, "xdist": True}, nvcc, "13.0") == []
    assert gpu_results.preflight_problems(everything, {"pytest": True}, None, "13.0") == ["nvcc not found"]
    assert gpu_results.preflight_problems(everything, {}, nvcc, "12.8") == ["nvcc is CUDA 13.0, torch is CUDA 12.8"]


# ---------------------------------------------------------------------------------------------
# How steps report: a failing command fails its step; a missing tool is named, not a crash.
# ---------------------------------------------------------------------------------------------


@pytest.fixture
def check(tmp_path):
    made = gpu_check.Check(str(tmp_path), budget_s=600, dry=False)
    yield made
    made.log.close()


def _python(code):
    return gpu_plan.Command([sys.executable, "-c", code])


@pytest.mark.parametrize(
    "code, failed", [("print('gpu-smoke: PASS: 3 cases')", []), ("raise SystemExit(3)", ["smoke"])]
)
def test_a_step_fails_when_its_command_fails(check, monkeypatch, code, failed):
    parts = [("cuda", _python("print('gpu-smoke: PASS: 7 cases')")), ("triton fp32", _python(code))]
    monkeypatch.setattr(gpu_plan, "smoke_commands", lambda target: parts)
    gpu_check.smoke(check)
    assert check.failed == failed
    assert check.lines[0] == f"{'smoke':<{gpu_check.LABEL}}{'FAIL: 1' if failed else 'ok: 2'} of 2 passed, in parallel"
    assert check.lines[2].startswith(f"{'  triton fp32':<{gpu_check.LABEL}}{'FAIL' if failed else 'ok'}")


def test_commands_past_their_limit_are_interrupted_together(check):
    """SIGINT reaches every late command at the limit (a Python program stops at once); one that ended
    in time is not counted as late."""
    sleeper = _python("import time; time.sleep(60)")
    begin = time.monotonic()
    results = check.run_together("tests", [sleeper, _python("print('done')"), sleeper], 2)
    assert time.monotonic() - begin < 12
    assert [timed_out for *_, timed_out in results] == [True, False, True]
    assert [status != 0 for status, *_ in results] == [True, False, True]
    assert results[1][1] == "done\n" and results[1][2] < 2


def test_missing_tools_are_named_and_their_steps_fail_without_running(check):
    check.found = {"compute-sanitizer": False, "ncu": False}
    gpu_check.sanitizers(check)
    gpu_check.ncu(check)
    assert check.failed == ["sanitizers", "ncu"]
    assert "compute-sanitizer not found" in check.lines[0] and "ncu not found" in check.lines[1]


GPU_INFO = {"torch": "2.11.0+cu130", "cuda": "13.0", "capability": "9.0"}


@pytest.fixture
def repository(tmp_path, monkeypatch):
    """A repository with a matching prebuilt extension and an older build in incseg_fast/."""
    root = tmp_path / "repository"
    write_prebuilt(root / "prebuilt", data=b"prebuilt")
    (root / "incseg_fast").mkdir()
    (root / "incseg_fast" / "_C.cpython-312-x86_64-linux-gnu.so").write_bytes(b"older")
    monkeypatch.setattr(gpu_check, "ROOT", str(root))
    return root


def _extension(has_cuda_kernels):
    return lambda check: {"has_extension": True, "has_cuda_kernels": has_cuda_kernels, "import_error": None}


def test_load_or_build_installs_a_matching_prebuilt_and_says_so(check, monkeypatch, repository):
    monkeypatch.setattr(gpu_check, "extension_info", _extension(True))
    assert gpu_check.load_or_build(check, GPU_INFO)
    assert check.lines == [
        f"{'load-or-build':<{gpu_check.LABEL}}ok: prebuilt prebuilt/torch-2.11.0-cu13/_C.abi3.so (manifest matches, "
        "sha256 ok); HAS_CUDA_KERNELS true"
    ]
    assert os.listdir(repository / "incseg_fast") == ["_C.abi3.so"]


@pytest.mark.parametrize(
    "capability, has_cuda_kernels, why",
    [
        ("10.0", True, "built for archs 8.0, 9.0, the device is 10.0"),
        ("9.0", False, "the prebuilt extension does not load with CUDA kernels"),
    ],
)
def test_load_or_build_builds_for_the_device_when_the_prebuilt_will_not_do(
    check, monkeypatch, repository, capability, has_cuda_kernels, why
):
    built = []
    monkeypatch.setattr(gpu_check, "extension_info", _extension(has_cuda_kernels))
    monkeypatch.setattr(gpu_check, "build", lambda check, command, why_not: built.append((command, why_not)) or True)
    assert gpu_check.load_or_build(check, dict(GPU_INFO, capability=capability))
    ((command, why_not),) = built
    assert why_not.startswith(why) and command.env["TORCH_CUDA_ARCH_LIST"] == capability
    assert "_C.abi3.so" not in os.listdir(repository / "incseg_fast")  # a prebuilt that failed is not left


def test_ncu_step_puts_the_parsed_table_in_the_summary_and_the_csv_in_out(check, monkeypatch, tmp_path):
    check.found = {"ncu": True}
    (tmp_path / "ncu_output.txt").write_text(ncu_output())
    show = f"print(open({str(tmp_path / 'ncu_output.txt')!r}).read(), end='')"
    monkeypatch.setattr(gpu_plan, "ncu_command", lambda target: _python(show))
    gpu_check.ncu(check)
    assert check.failed == []
    assert check.lines[0].startswith(f"{'ncu':<{gpu_check.LABEL}}ok: 2 launches profiled; ncu-workload: PASS")
    assert check.lines[2].split()[0] == "LogitForwardKernel<float,"
    assert (tmp_path / "ncu.csv").read_text().splitlines()[0] == NCU_HEADER


def test_sanitizer_step_needs_a_clean_summary_from_every_tool(check, monkeypatch):
    check.found = {"compute-sanitizer": True}
    clean = "gpu-smoke: PASS\n========= ERROR SUMMARY: 0 errors"
    outputs = {"racecheck": "gpu-smoke: PASS\n========= RACECHECK SUMMARY: 1 hazard displayed (1 error, 0 warnings)"}
    monkeypatch.setattr(
        gpu_plan, "sanitizer_command", lambda target, tool: _python(f"print({outputs.get(tool, clean)!r})")
    )
    gpu_check.sanitizers(check)
    assert check.failed == ["sanitizers"]
    assert check.lines[0].startswith(f"{'sanitizers':<{gpu_check.LABEL}}FAIL: 3 of 4 passed")
    tools = [line for line in check.lines[1:] if not line.startswith(" " * gpu_check.LABEL)]
    verdicts = {line.split()[0]: line.split()[1] for line in tools}
    assert verdicts == {"memcheck": "ok:", "racecheck": "FAIL:", "synccheck": "ok:", "initcheck": "ok:"}


def test_refuses_to_start_without_out_or_a_gpu(capsys, tmp_path):
    assert gpu_check.main([]) == 2
    if not torch.cuda.is_available():
        assert gpu_check.main([str(tmp_path / "out")]) == 2
        assert "make gpu-dry-run" in capsys.readouterr().out
        assert not (tmp_path / "out").exists()
