"""What the output of each gpu-check step means: pure functions from a command's output or report
to a verdict and summary lines (tools/gpu_check.py runs the steps; tests/test_gpu_check.py tests these)."""

import xml.etree.ElementTree as ElementTree

import gpu_plan


def cuda_major_mismatch(nvcc_version_text, torch_cuda):
    """Why nvcc cannot build for this torch (nvcc's 'release X.Y' has another major), or None."""
    words = (nvcc_version_text or "").replace(",", " ").split()
    release = words[words.index("release") + 1] if "release" in words[:-1] else None
    if not torch_cuda:
        return "torch has no CUDA"
    if release is None:
        return "nvcc's version is unknown"
    if release.split(".")[0] != torch_cuda.split(".")[0]:
        return f"nvcc is CUDA {release}, torch is CUDA {torch_cuda}"
    return None


PACKAGES = {"pytest": "pytest", "xdist": "pytest-xdist"}  # the modules gpu_check.DEVICE_INFO looks for -> packages


def preflight_problems(tools, modules, nvcc_version, torch_cuda):
    """What the GPU steps lack, each named: tools not found ({name: path or None}), modules not
    importable ({module: found}), no nvcc or one of another CUDA major than torch's."""
    problems = [f"{name} not found" for name, path in tools.items() if path is None]
    problems += [f"{PACKAGES[module]} not importable" for module, found in modules.items() if not found]
    mismatch = cuda_major_mismatch(nvcc_version, torch_cuda) if nvcc_version else "nvcc not found"
    return problems + ([mismatch] if mismatch else [])


def smoke_result(result):
    """(ok, summary lines) of one gpu_smoke.py run."""
    status, text, seconds, timed_out = result
    verdict = [line for line in text.splitlines() if line.startswith("gpu-smoke:")]
    ok = status == 0 and not timed_out and bool(verdict) and "PASS" in verdict[-1]
    lines = [
        f"{'ok' if ok else 'FAIL'}: {verdict[-1] if verdict else 'gpu-smoke did not finish'} "
        f"({seconds:.0f} s{', TIMED OUT' if timed_out else ''})"
    ]
    if not ok:
        lines += [s.strip()[:150] for s in text.splitlines() if s.startswith(("FAIL", "MISSING", "Traceback"))][:4]
    return ok, lines


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


def sanitizer_verdict(text):
    """(clean, the tool's summary) from compute-sanitizer's output: its last '... SUMMARY:' line
    ('ERROR SUMMARY: 0 errors'; racecheck: 'RACECHECK SUMMARY: 0 hazards displayed (0 errors, ...)')."""
    summaries = [line.split("SUMMARY:", 1)[1].strip() for line in text.splitlines() if "SUMMARY:" in line]
    if not summaries:
        return False, "no error summary"
    return summaries[-1].startswith(("0 errors", "0 hazards")), summaries[-1]


def bench_problems(results, command):
    """Cases that failed (out of memory), providers that failed, and providers asked for (--providers)
    that a case lacks."""
    asked = command.argv[command.argv.index("--providers") + 1].split(",")
    problems = [f"case failed: {failed['case']}: {failed['error'][:100]}" for failed in results.get("failed_cases", [])]
    for case in results["cases"]:
        head = f"{case['op']}-{case['size']}-{case['dtype']}"
        problems += [f"provider failed: {head} {name}" for name, r in case["providers"].items() if "error" in r]
        upsampled = case["op"] == "incremental_loss_upsampled"
        expected = [p for p in asked if upsampled or not p.endswith(gpu_plan.FUSED_UPSAMPLING)]
        problems += [f"provider missing: {head} {name}" for name in expected if name not in case["providers"]]
    return problems


def bench_table(results):
    """fwd+bwd median per provider, with the fused providers' speedup over the baseline (eager or compiled)."""
    providers = []
    for case in results["cases"]:
        providers += [p for p in case["providers"] if p not in providers]
    width = max([len(f"{c['op']} {c['size']} {c['dtype']}") for c in results["cases"]] + [36]) + 2
    baseline = "compiled" if "compiled" in providers else "eager"
    lines = [f"  {f'fwd+bwd ms (x: speedup vs {baseline})':<{width}}" + "".join(f"{p:>15}" for p in providers)]
    for case in results["cases"]:
        cells = []
        base = case["providers"].get(baseline, {}).get("fwd_bwd_median_s")
        for p in providers:
            r = case["providers"].get(p, {})
            if "error" in r:
                cells.append("FAILED")
            elif "fwd_bwd_median_s" not in r:
                cells.append("-")
            elif p in ("eager", "compiled") or not base:
                cells.append(f"{r['fwd_bwd_median_s'] * 1e3:.2f}")
            else:
                cells.append(f"{r['fwd_bwd_median_s'] * 1e3:.2f} ({base / r['fwd_bwd_median_s']:.1f}x)")
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
