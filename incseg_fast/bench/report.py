"""Benchmark report: every op and size through every provider, interleaved in one process.

    python -m incseg_fast.bench [--quick] [--ops a,b] [--sizes voc,ade] [--dtype fp32|bf16]
                                [--providers eager,compiled,cpu] [--max-seconds S]
                                [--json PATH] [--markdown PATH] [--bisect-batch]

Providers: the eager reference (``incseg_fast.reference``), ``torch.compile(reference)`` and
each fused backend available for the device (the public API with ``backend=...``). For each
case the providers run round-robin, one repetition each in turn, so that load from other
processes hits them alike and their ratios stay comparable. Per provider: median time of the
forward (autograd on, as in training) and of forward+backward, the peak extra memory of
forward+backward beyond the inputs, the achieved bandwidth of forward+backward on the minimal
bytes (inputs read once, gradients written once) against the measured copy bandwidth, and the
max relative error of outputs and gradients against the reference run in float64.
Progress goes to stderr, the report to stdout.

``--ops train_step`` (asked for by name only: it trains a ResNet-101) adds the whole training step of
``incseg_fast.bench.train_step``, for the settings voc15-5 and ade100-50 (``--sizes`` takes them too).
"""

import argparse
import functools
import json
import sys
import time

import torch

from incseg_fast._errors import OneLineParser
from incseg_fast.bench import cases as bench_cases
from incseg_fast.bench import measure
from incseg_fast.bench import train_step as bench_train_step
from incseg_fast.vocabulary import CPU_ISAS

TRAIN_STEP = "train_step"

# incremental_loss fwd+bwd: (baseline provider, least speedup of every fused provider) per size.
INCREMENTAL_LOSS_SPEEDUPS = {
    "voc": (("compiled", 2.0), ("eager", 10.0), (bench_cases.MIB_COMPILED, 3.5)),
    "ade": ((bench_cases.MIB_COMPILED, 4.0),),
}
COPY_SHARE = 0.4  # incremental_loss voc fwd+bwd: minimal bytes / time >= this share of the copy bandwidth
LOGIT_OPS_MEMORY_LIMIT = 1.25  # fused fwd+bwd peak extra memory <= 1.25 x logits
# The fused upsampling (size=): fwd+bwd >= 2x interpolate + the fused loss (and, on a GPU, >= 4x
# compiled), peak extra memory <= 0.35 x one full-resolution logits tensor.
UPSAMPLING_SPEEDUP = 2.0
UPSAMPLING_SPEEDUP_VS_COMPILED_GPU = 4.0
UPSAMPLING_MEMORY_LIMIT = 0.35
# The slowest fwd+bwd repetition over the fastest beyond which the machine was too noisy to quote.
NOISE_RATIO = 2.0


def _log(message):
    print(f"[bench {time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def _names(text):
    return [n for n in text.split(",") if n] if text else None


PROVIDERS_HELP = f"""providers (the columns of each case):
  eager       the reference (incseg_fast.reference): plain PyTorch, run eagerly
  compiled    torch.compile of the reference (compiled on first use: most of a --quick run's time)
  {bench_cases.MIB}, {bench_cases.MIB_COMPILED}
              MiB's loss code as MiB writes it (incseg_fast/bench/mib.py), eager and torch.compile'd:
              what a user runs today (the ops MiB has: UNCE, KD, UNKD)
  cpu, cuda, triton
              the fused backends available for --device, through the public API (backend=...);
              for the upsampled ops: F.interpolate to the labels' size, then the fused loss
  {", ".join("cpu" + bench_cases.CPU_ISA_SEPARATOR + isa for isa in CPU_ISAS)}
              backend cpu with its kernels' baseline, AVX2 or AVX-512 copy: one for each copy this
              CPU has besides the one "cpu" runs (incseg_fast.cpu_isa)
  cpu{bench_cases.FUSED_UPSAMPLING}, cuda{bench_cases.FUSED_UPSAMPLING}, triton{bench_cases.FUSED_UPSAMPLING}
              the upsampled ops only: the fused loss with size=, which upsamples without
              materialising the full-resolution logits (MATH.md#upsampling)"""


def parse_args(argv, prog="python -m incseg_fast.bench"):
    parser = OneLineParser(
        prog=prog,
        description=__doc__.split("\n")[0],
        epilog=PROVIDERS_HELP,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument(
        "--quick",
        action="store_true",
        help="small odd sizes and few repetitions, a smoke test: about 100 s on a 2-core machine, most of it "
        "compiling the 'compiled' provider (--providers without it: about 15 s)",
    )
    known_ops = [*bench_cases.OPS, TRAIN_STEP]
    known_sizes = [*bench_cases.SIZES, *bench_train_step.SETTINGS]
    parser.add_argument(
        "--ops", type=_names, help=f"comma-separated, from {','.join(known_ops)} (train_step only when named)"
    )
    parser.add_argument("--sizes", type=_names, help=f"comma-separated, from {','.join(known_sizes)}")
    parser.add_argument(
        "--dtype",
        choices=("fp32", "bf16"),
        help="run every case in this dtype only (default: fp32, and voc512 in fp32 and bf16)",
    )
    parser.add_argument(
        "--device",
        choices=("cpu", "cuda"),
        default="cuda" if torch.cuda.is_available() else "cpu",
        help="where the tensors live, and so which fused backends run (default: cuda when a GPU is visible, else cpu)",
    )
    parser.add_argument(
        "--providers",
        type=_names,
        help="comma-separated subset of the providers below (default: all that run on --device)",
    )
    parser.add_argument(
        "--reps", type=int, help="timed repetitions per provider (default 15, quick 3; train_step: 3, quick 1)"
    )
    parser.add_argument(
        "--warmup",
        type=int,
        help="untimed calls per provider first, compilation included (default 2, quick 1; train_step 1)",
    )
    parser.add_argument(
        "--bisect-batch",
        action="store_true",
        help="train_step on CUDA: also find the largest batch that fits in 24/40/80 GB by running steps (minutes)",
    )
    parser.add_argument(
        "--max-seconds",
        type=float,
        metavar="S",
        help="start no new case after S seconds; the report covers the cases measured "
        "and lists the others (a time budget, e.g. for tools/gpu_check.py; an interrupt "
        "(Ctrl-C, SIGINT) also stops it with a report of the cases measured)",
    )
    parser.add_argument("--json", metavar="PATH", help="also write the results as JSON")
    parser.add_argument("--markdown", metavar="PATH", help="also write the tables as Markdown")
    args = parser.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device")
    args.step_reps = args.reps or (1 if args.quick else 3)
    args.step_warmup = args.warmup or 1
    args.reps = args.reps or (3 if args.quick else 15)
    args.warmup = args.warmup if args.warmup is not None else (1 if args.quick else 2)
    for option, chosen, known in (("--ops", args.ops, known_ops), ("--sizes", args.sizes, known_sizes)):
        unknown = sorted(set(chosen or ()) - set(known))
        if unknown:
            parser.error(f"{option}: unknown {', '.join(unknown)} (choose from {', '.join(known)})")
    if args.reps < 1 or args.warmup < 1:
        parser.error("--reps and --warmup must be at least 1")
    if args.max_seconds is not None and args.max_seconds < 0:
        parser.error("--max-seconds must not be negative")
    return args


# ---------------------------------------------------------------------------------------------
# Measuring one case.
# ---------------------------------------------------------------------------------------------


def measure_case(case, provider_names, *, reps, warmup):
    device = case.device
    inputs = case.make_inputs()
    reference_values = measure.outputs_and_grads(case.op.reference, inputs.converted(torch.float64))
    outputs = bench_cases.run_forward(case.op.reference, inputs)
    record = {
        "op": case.op.name,
        "size": case.size.name,
        "dims": case.size.describe(),
        "dtype": case.dtype_name,
        "primary_bytes": inputs.unit(),
        "bytes_fwd": bench_cases.minimal_bytes(inputs, outputs, backward=False),
        "bytes_fwd_bwd": bench_cases.minimal_bytes(inputs, outputs, backward=True),
        "providers": {},
    }
    del outputs

    running = []
    for name, fn in bench_cases.providers(case.op, device, provider_names):
        result = record["providers"][name] = {"fwd_s": [], "fwd_bwd_s": []}
        _log(f"{case.name}: {name}: warm-up ({warmup} calls{', compiling' if name == 'compiled' else ''})")
        try:
            for _ in range(warmup):
                inputs.clear_grads()
                bench_cases.run_forward_backward(fn, inputs)
            inputs.clear_grads()
            result["max_rel_err"] = measure.max_relative_error(measure.outputs_and_grads(fn, inputs), reference_values)
        except Exception as error:  # a provider that fails is reported as failed, not skipped
            result["error"] = f"{type(error).__name__}: {error}".splitlines()[0][:200]
            _log(f"{case.name}: {name}: FAILED {result['error']}")
            continue
        running.append((name, fn))

    _log(f"{case.name}: timing {', '.join(n for n, _ in running)} interleaved, {reps} reps")
    for rep in range(reps):
        start = rep % len(running) if running else 0
        for name, fn in running[start:] + running[:start]:
            result = record["providers"][name]
            result["fwd_s"].append(measure.time_call(functools.partial(bench_cases.run_forward, fn, inputs), device))
            inputs.clear_grads()
            result["fwd_bwd_s"].append(
                measure.time_call(functools.partial(bench_cases.run_forward_backward, fn, inputs), device)
            )
            inputs.clear_grads()

    for name, fn in running:
        result = record["providers"][name]
        result["fwd_median_s"] = measure.median(result["fwd_s"])
        result["fwd_bwd_median_s"] = measure.median(result["fwd_bwd_s"])
        result["peak_extra_bytes"] = measure.forward_backward_peak(fn, inputs, device)
    return record


# ---------------------------------------------------------------------------------------------
# Formatting.
# ---------------------------------------------------------------------------------------------


def speedups(record):
    """{fused: {"eager": {"fwd": x, "fwd_bwd": x}, "compiled": {...}, ...}}: baseline time / fused time,
    for each of bench_cases.BASELINE_PROVIDERS the case has."""
    results = record["providers"]
    out = {}
    for name, result in results.items():
        if name in bench_cases.BASELINE_PROVIDERS or "fwd_median_s" not in result:
            continue
        out[name] = {}
        for baseline in bench_cases.BASELINE_PROVIDERS:
            base = results.get(baseline, {})
            if "fwd_median_s" in base:
                out[name][baseline] = {
                    phase: base[f"{phase}_median_s"] / result[f"{phase}_median_s"] for phase in ("fwd", "fwd_bwd")
                }
    return out


def format_case(record, copy_bytes_per_s):
    mib = 2**20
    lines = [
        f"{record['op']}  {record['size']} ({record['dims']})  {record['dtype']}  "
        f"[unit tensor {record['primary_bytes'] / mib:.1f} MiB, "
        f"minimal fwd+bwd traffic {record['bytes_fwd_bwd'] / mib:.1f} MiB]",
        f"  {'provider':<10}{'fwd ms':>10}{'fwd+bwd ms':>12}{'(min)':>9}{'peak MiB':>10}{'peak/unit':>10}"
        f"{'GB/s':>8}{'%copy':>7}{'max rel err':>13}",
    ]
    for name, result in record["providers"].items():
        if "error" in result:
            lines.append(f"  {name:<10}FAILED: {result['error']}")
            continue
        bandwidth = record["bytes_fwd_bwd"] / result["fwd_bwd_median_s"]
        lines.append(
            f"  {name:<10}{result['fwd_median_s'] * 1e3:>10.2f}{result['fwd_bwd_median_s'] * 1e3:>12.2f}"
            f"{min(result['fwd_bwd_s']) * 1e3:>9.2f}"
            f"{result['peak_extra_bytes'] / mib:>10.1f}{result['peak_extra_bytes'] / record['primary_bytes']:>10.2f}"
            f"{bandwidth / 1e9:>8.2f}{100 * bandwidth / copy_bytes_per_s:>6.0f}%{result['max_rel_err']:>13.1e}"
        )
    for name, by_baseline in record.get("speedups", {}).items():
        parts = [
            f"{by_baseline[b]['fwd_bwd']:.2f}x vs {b} (fwd {by_baseline[b]['fwd']:.2f}x)"
            for b in bench_cases.BASELINE_PROVIDERS
            if b in by_baseline
        ]
        if parts:
            lines.append(f"  {name} fwd+bwd speedup: " + ", ".join(parts))
    return "\n".join(lines)


def noisy_measurements(records):
    """The measurements whose repetitions disagree, one phrase each: a forward slower than the
    forward+backward that contains it, or fwd+bwd repetitions more than NOISE_RATIO apart."""
    found = []
    for record in records:
        for name, result in record["providers"].items():
            if "fwd_median_s" not in result:
                continue
            where = f"{record['op']} {record['size']} {record['dtype']} {name}"
            forward, both = result["fwd_median_s"] * 1e3, result["fwd_bwd_median_s"] * 1e3
            if forward > both:
                found.append(f"{where}: fwd {forward:.2f} ms > fwd+bwd {both:.2f} ms")
            fastest, slowest = min(result["fwd_bwd_s"]), max(result["fwd_bwd_s"])
            if slowest > NOISE_RATIO * fastest:
                found.append(f"{where}: fwd+bwd repetitions {fastest * 1e3:.2f} to {slowest * 1e3:.2f} ms")
    return found


def format_noise(noisy):
    """The report's warning when repetitions disagree (empty when they agree)."""
    if not noisy:
        return ""
    shown = "; ".join(noisy[:5]) + (f"; and {len(noisy) - 5} more" if len(noisy) > 5 else "")
    return (
        f"the machine was noisy: the repetitions of {len(noisy)} measurement(s) disagree ({shown}). "
        "Other work competed for the cores or memory (see the load averages): do not quote these "
        "figures; rerun on an idle machine, or with more --reps"
    )


def format_markdown(records, copy_bytes_per_s, verdicts):
    """The per-case figures and the target verdicts as Markdown tables (for docs/BENCHMARKS.md)."""
    lines = [
        "| op | size | dtype | provider | fwd ms | fwd+bwd ms | fwd+bwd min ms | peak extra MiB (x unit) "
        "| GB/s (% copy) | max rel err | fwd+bwd speedup vs " + " / ".join(bench_cases.BASELINE_PROVIDERS) + " |",
        "|---|---|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for record in records:
        for name, result in record["providers"].items():
            head = f"| {record['op']} | {record['size']} | {record['dtype']} | {name} |"
            if "error" in result:
                lines.append(f"{head} failed: {result['error']} | | | | | | |")
                continue
            bandwidth = record["bytes_fwd_bwd"] / result["fwd_bwd_median_s"]
            speedup = record["speedups"].get(name, {})
            ratios = " / ".join(
                f"{speedup[b]['fwd_bwd']:.2f}x" if b in speedup else "-" for b in bench_cases.BASELINE_PROVIDERS
            )
            lines.append(
                f"{head} {result['fwd_median_s'] * 1e3:.1f} | {result['fwd_bwd_median_s'] * 1e3:.1f} | "
                f"{min(result['fwd_bwd_s']) * 1e3:.1f} | "
                f"{result['peak_extra_bytes'] / 2**20:.1f} "
                f"({result['peak_extra_bytes'] / record['primary_bytes']:.2f}) | "
                f"{bandwidth / 1e9:.2f} ({100 * bandwidth / copy_bytes_per_s:.0f}%) | {result['max_rel_err']:.1e} | "
                f"{ratios if speedup else ''} |"
            )
    if verdicts:
        lines += ["", "| target | value | verdict |", "|---|---:|---|"]
        lines += [f"| {description} | {detail} | {verdict} |" for description, verdict, detail in verdicts]
    return "\n".join(lines) + "\n"


def _find(records, op, size):
    return [r for r in records if r["op"] == op and r["size"] == size]


def _speed_judged(record):
    """The speedups the speed targets judge: every fused provider but the CPU kernels' scalar copy, which
    is there as the floor the vectorised copies are measured against."""
    scalar_copy = "cpu" + bench_cases.CPU_ISA_SEPARATOR + "baseline"
    return [(name, by_baseline) for name, by_baseline in record["speedups"].items() if name != scalar_copy]


def evaluate_targets(records):
    """The speed and memory targets (BENCHMARKS.md), each as (description, verdict, detail) for every fused backend."""
    verdicts = []

    def judge(description, ok, detail):
        verdicts.append((description, "met" if ok else "NOT met", detail))

    for size, goals in INCREMENTAL_LOSS_SPEEDUPS.items():
        for record in _find(records, "incremental_loss", size):
            for name, by_baseline in _speed_judged(record):
                for baseline, goal in goals:
                    if baseline in by_baseline:
                        value = by_baseline[baseline]["fwd_bwd"]
                        judge(
                            f"incremental_loss {size} {record['dtype']} fwd+bwd, {name} >= {goal:g}x {baseline}",
                            value >= goal,
                            f"{value:.2f}x",
                        )
    for record in _find(records, "incremental_loss", "voc"):
        for name, _ in _speed_judged(record):
            share = record["bytes_fwd_bwd"] / record["providers"][name]["fwd_bwd_median_s"] / record["copy_bytes_per_s"]
            judge(
                f"incremental_loss voc {record['dtype']} fwd+bwd, {name} >= {COPY_SHARE:.0%} of copy bandwidth",
                share >= COPY_SHARE,
                f"{share:.0%}",
            )
    for size in ("feat2048", "feat256"):
        for record in _find(records, "attentive_distillation", size):
            for name, by_baseline in _speed_judged(record):
                if "compiled" in by_baseline:
                    value = by_baseline["compiled"]["fwd_bwd"]
                    judge(
                        f"attentive_distillation {size} {record['dtype']} fwd+bwd, {name} >= 1.5x compiled",
                        value >= 1.5,
                        f"{value:.2f}x",
                    )
    _judge_upsampling(records, judge)
    for record in records:
        # The memory target is about the real sizes; a smoke-test size has too few channels.
        if bench_cases.OPS[record["op"]].kind != "logits" or bench_cases.SIZES[record["size"]].quick:
            continue
        for name in record["speedups"]:
            ratio = record["providers"][name]["peak_extra_bytes"] / record["primary_bytes"]
            judge(
                f"{record['op']} {record['size']} {record['dtype']} peak extra memory, {name} "
                f"<= {LOGIT_OPS_MEMORY_LIMIT}x logits",
                ratio <= LOGIT_OPS_MEMORY_LIMIT,
                f"{ratio:.2f}x",
            )
    return verdicts


def _judge_upsampling(records, judge):
    """The fused upsampling's targets for every fused backend b with both providers: b-size against
    b, and against compiled on a GPU."""
    for record in records:
        if bench_cases.OPS[record["op"]].kind != "upsampled" or bench_cases.SIZES[record["size"]].quick:
            continue
        results = record["providers"]
        head = f"{record['op']} {record['size']} {record['dtype']}"
        for name, fused in results.items():
            backend = name.removesuffix(bench_cases.FUSED_UPSAMPLING)
            if backend == name or "fwd_median_s" not in fused:
                continue
            plain = results.get(backend, {})
            if "fwd_median_s" in plain:
                value = plain["fwd_bwd_median_s"] / fused["fwd_bwd_median_s"]
                goal = UPSAMPLING_SPEEDUP
                judge(f"{head} fwd+bwd, {name} >= {goal:g}x interpolate + fused loss", value >= goal, f"{value:.2f}x")
            compiled = results.get("compiled", {})
            if backend != "cpu" and "fwd_median_s" in compiled:
                value = compiled["fwd_bwd_median_s"] / fused["fwd_bwd_median_s"]
                goal = UPSAMPLING_SPEEDUP_VS_COMPILED_GPU
                judge(f"{head} fwd+bwd, {name} >= {goal:g}x compiled", value >= goal, f"{value:.2f}x")
            ratio = fused["peak_extra_bytes"] / record["primary_bytes"]
            judge(
                f"{head} peak extra memory, {name} <= {UPSAMPLING_MEMORY_LIMIT}x full-resolution logits",
                ratio <= UPSAMPLING_MEMORY_LIMIT,
                f"{ratio:.2f}x",
            )


def format_header(info, args, copy_bytes_per_s, fused):
    lines = [
        "incseg_fast benchmark report",
        f"{info['date_utc']}; machine: {info['cpu']}, {info['cores']} cores; torch {info['torch']}, "
        f"{info['torch_threads']} intra-op threads; python {info['python']}",
    ]
    if "gpu" in info:
        lines.append(f"gpu: {info['gpu']}")
    lines += [
        f"device {args.device}; dtype {args.dtype or 'fp32 (voc512 also bf16)'}; "
        f"{args.warmup} warm-up + {args.reps} timed reps per provider, interleaved; "
        f"times are medians ((min): the fastest fwd+bwd repetition)",
        f"copy bandwidth ({args.device}, 256 MiB tensor, read+write): {copy_bytes_per_s / 1e9:.1f} GB/s",
        f"fused backends for {args.device} tensors: {', '.join(fused) or 'none available'}",
        f"load average at start: {' '.join(f'{v:.2f}' for v in info['load_average'])}",
    ]
    if args.device == "cpu":
        lines.append(
            "peak memory: torch.profiler allocator events replayed in order (self-check on known allocations passed)"
        )
    else:
        lines.append("peak memory: torch.cuda.max_memory_allocated minus the memory allocated before")
    return "\n".join(lines)


def select(args):
    """The op cases, then the train_step cases, that --ops, --sizes, --dtype and --quick pick."""
    ops, sizes = args.ops, args.sizes
    op_names = None if ops is None else [n for n in ops if n != TRAIN_STEP]
    selected = []
    if op_names != []:
        selected = bench_cases.select_cases(
            ops=op_names,
            sizes=None if sizes is None else [n for n in sizes if n in bench_cases.SIZES],
            dtype_name=args.dtype,
            device=args.device,
            quick=args.quick,
        )
    if ops is not None and TRAIN_STEP in ops:
        selected += bench_train_step.select_cases(
            settings=None if sizes is None else [n for n in sizes if n in bench_train_step.SETTINGS],
            dtype_name=args.dtype,
            device=args.device,
            quick=args.quick,
        )
    return selected


def measure_train_step(case, args):
    """One train_step case through its providers (those of --providers, and mib always)."""
    providers = None if args.providers is None else [p for p in args.providers if p in bench_train_step.PROVIDERS]
    return bench_train_step.measure_case(
        case, providers, reps=args.step_reps, warmup=args.step_warmup, bisect=args.bisect_batch, log=_log
    )


def main(argv=None, prog="python -m incseg_fast.bench"):
    started = time.monotonic()
    args = parse_args(argv, prog)
    selected = select(args)
    if not selected:
        raise SystemExit("no case matches --ops/--sizes on this device")
    if args.device == "cpu":
        measure.check_peak_counter()
    info = measure.machine(args.device)
    _log("measuring copy bandwidth")
    copy_bytes_per_s = measure.copy_bandwidth(args.device)
    fused = bench_cases.fused_backends(args.device)
    print(format_header(info, args, copy_bytes_per_s, fused), flush=True)
    if any(isinstance(case, bench_train_step.StepCase) for case in selected):
        print(bench_train_step.method(args.device, reps=args.step_reps, warmup=args.step_warmup), flush=True)

    records, step_records, failed_cases, done, interrupted = [], [], [], 0, False
    try:
        for case in selected:
            if args.max_seconds is not None and time.monotonic() - started >= args.max_seconds:
                break
            try:
                if isinstance(case, bench_train_step.StepCase):
                    step_records.append(measure_train_step(case, args))
                    print("\n" + bench_train_step.format_case(step_records[-1]), flush=True)
                    done += 1
                    continue
                record = measure_case(case, args.providers, reps=args.reps, warmup=args.warmup)
            except torch.OutOfMemoryError as error:  # a size too large for this device: the others still run
                failed_cases.append({"case": case.name, "error": f"OutOfMemoryError: {error}".splitlines()[0][:200]})
                _log(f"{case.name}: FAILED, out of memory")
                torch.cuda.empty_cache()
                done += 1
                continue
            done += 1
            record["speedups"] = speedups(record)
            record["copy_bytes_per_s"] = copy_bytes_per_s
            records.append(record)
            print("\n" + format_case(record, copy_bytes_per_s), flush=True)
    except KeyboardInterrupt:  # the cases measured so far are still reported and written
        interrupted = True
        _log("interrupted: reporting the cases measured so far")

    for failed in failed_cases:
        print(f"\nfailed: {failed['case']}: {failed['error']}")
    not_measured = [case.name for case in selected[done:]]
    if not_measured:
        why = "interrupted" if interrupted else f"--max-seconds {args.max_seconds:g} spent"
        print(f"\nnot measured ({why}): {', '.join(not_measured)}")
    verdicts = evaluate_targets(records) + bench_train_step.evaluate_targets(step_records)
    if verdicts:
        print("\ntargets (docs/BENCHMARKS.md, for this device):")
        for description, verdict, detail in verdicts:
            print(f"  {verdict:<8} {description}: {detail}")
    end_load = measure.machine(args.device)["load_average"]
    print(f"\nload average at end: {' '.join(f'{v:.2f}' for v in end_load)}")
    noisy = noisy_measurements(records)
    if noisy:
        print("\n" + format_noise(noisy))

    if args.markdown:
        with open(args.markdown, "w") as f:
            if records:
                f.write(format_markdown(records, copy_bytes_per_s, evaluate_targets(records)))
            if step_records:
                f.write(bench_train_step.format_markdown(step_records, bench_train_step.evaluate_targets(step_records)))
            if noisy:
                f.write("\n" + format_noise(noisy) + "\n")
        _log(f"wrote {args.markdown}")
    if args.json:
        with open(args.json, "w") as f:
            json.dump(
                {
                    "machine": info,
                    "load_average_end": end_load,
                    "args": vars(args),
                    "copy_bytes_per_s": copy_bytes_per_s,
                    "fused_backends": fused,
                    "cases": records,
                    "train_step_cases": step_records,
                    "failed_cases": failed_cases,
                    "not_measured": not_measured,
                    "noisy": noisy,
                    "targets": [dict(zip(("target", "verdict", "value"), v, strict=True)) for v in verdicts],
                },
                f,
                indent=1,
            )
        _log(f"wrote {args.json}")
    return 130 if interrupted else 0


if __name__ == "__main__":
    sys.exit(main())
