"""The whole training step: what a user gains from the fused losses in one SGD step of MiB's step 1.

One step of the trainer's DeepLabV3 (``incseg_fast.models.IncrementalSegmenter``, random weights, output
stride 16): the old model's forward under ``no_grad`` (frozen, eval mode), the new model's forward,
the loss stage (MiB's step-1 objective UNCE + lambda_kd * UNKD, lambda_kd = 10), the backward and
``torch.optim.SGD``'s update. The providers differ in the loss stage only:

- ``mib``: the logits upsampled with ``F.interpolate``, then MiB's loss chain (``bench/mib.py``);
- ``compiled``: ``torch.compile`` of that loss stage (interpolate + MiB's chain) only;
- ``fused``: ``F.interpolate``, then the fused loss (``backend="auto"``);
- ``fused+size``: the fused loss with ``size=``, no full-resolution logits.

The loss stage runs on a detached copy of the new model's logits; its gradient is then fed to the
network's backward (``x.backward(dL/dx)``). This is the same arithmetic as one backward (autograd
would pass the same gradient) and lets the step time the loss stage alone.

Figures per provider: the median step time after warm-up, the loss stage's time inside it, the
peak memory of the step and the loss stage's own peak, the largest batch that fits in 24/40/80 GB.
On CPU every provider runs in a fresh subprocess (so no provider inherits another's allocator
state); on CUDA in this process, one after the other. The first step's loss and gradient norm of
every provider must agree with the ``mib`` provider's (:func:`check_agreement`; the benchmark fails
otherwise).
"""

import contextlib
import dataclasses
import json
import math
import statistics
import subprocess
import sys
import time

import torch

from incseg_fast.bench import cases as bench_cases
from incseg_fast.bench import measure
from incseg_fast.vocabulary import RTOL

MIB_LAMBDA_KD = 10.0  # MiB's lambda_kd (the trainer's "mib" method)
# MiB's step-1 optimiser as the trainer runs it (SGD, lr_incremental of the VOC/ADE presets).
SGD_SETTINGS = {"lr": 0.001, "momentum": 0.9, "weight_decay": 1e-4}
GB = 10**9
MIB = 2**20
FIT_BUDGETS_GB = (24, 40, 80)
# The papers' training resolution: the CPU's computed largest batches are given at this size.
PAPERS_IMAGE = 512


@dataclasses.dataclass(frozen=True)
class Setting:
    """A task: its classes (old ones first) at step 1."""

    name: str
    classes: int
    old_classes: int


SETTINGS = {s.name: s for s in (Setting("voc15-5", 21, 16), Setting("ade100-50", 151, 101))}


@dataclasses.dataclass(frozen=True)
class Shape:
    batch: int
    image: int
    backbone: str = "resnet101"


# CPU: what this 2-core machine runs in seconds; CUDA: the papers' batch at 512 x 512; quick: a smoke test.
SHAPES = {"cpu": Shape(2, 256), "cuda": Shape(24, PAPERS_IMAGE), "quick": Shape(2, 64, "tiny")}


def _interpolated_mib(x, t, y, size):
    return bench_cases.mib_incremental_loss_upsampled(x, t, y, size)


def _fused(x, t, y, size):
    return bench_cases.fused_incremental_loss_upsampled(x, t, y, size, backend="auto", fused_upsampling=False)


def _fused_size(x, t, y, size):
    return bench_cases.fused_incremental_loss_upsampled(x, t, y, size, backend="auto", fused_upsampling=True)


def loss_stages():
    """Provider name -> loss stage ``(x, t, y, size) -> (ce, kd)`` on the logits at the network's resolution."""
    return {
        "mib": _interpolated_mib,
        "compiled": bench_cases._compiled(_interpolated_mib),
        "fused": _fused,
        "fused+size": _fused_size,
    }


PROVIDERS = ("mib", "compiled", "fused", "fused+size")
REFERENCE_PROVIDER = "mib"


@dataclasses.dataclass(frozen=True)
class StepCase:
    setting: Setting
    shape: Shape
    dtype_name: str  # "fp32", or "bf16": the step under bf16 autocast
    device: str

    @property
    def name(self):
        return f"train_step-{self.setting.name}-{self.dtype_name}"

    @property
    def autocast_dtype(self):
        return None if self.dtype_name == "fp32" else bench_cases.DTYPES[self.dtype_name]

    def to_json(self):
        return {
            "setting": self.setting.name,
            "shape": dataclasses.asdict(self.shape),
            "dtype": self.dtype_name,
            "device": self.device,
        }

    @classmethod
    def from_json(cls, data):
        return cls(SETTINGS[data["setting"]], Shape(**data["shape"]), data["dtype"], data["device"])


def select_cases(*, settings=None, dtype_name=None, device="cpu", quick=False):
    unknown = sorted(set(settings or ()) - set(SETTINGS))
    if unknown:
        raise ValueError(f"settings: unknown {unknown}; choose from {sorted(SETTINGS)}")
    shape = SHAPES["quick" if quick else device]
    chosen = [s for s in SETTINGS.values() if settings is None or s.name in settings]
    return [StepCase(s, shape, dtype_name or "fp32", device) for s in chosen]


# ---------------------------------------------------------------------------------------------
# One step.
# ---------------------------------------------------------------------------------------------


class Step:
    """The models, optimiser and batch of a case, seeded so that every provider starts alike."""

    def __init__(self, case, loss_stage, *, batch=None, seed=0):
        from incseg_fast.models import IncrementalSegmenter

        setting, shape = case.setting, case.shape
        batch = batch or shape.batch
        torch.manual_seed(seed)
        old = IncrementalSegmenter(shape.backbone, [setting.old_classes], output_stride=16)
        student = IncrementalSegmenter(shape.backbone, [setting.old_classes], output_stride=16)
        student.load_state_dict(old.state_dict())  # the new model starts from the old one, as at step 1
        student.classifier.add_step(setting.classes - setting.old_classes)
        student.classifier.balanced_init()
        self.old = old.to(case.device).eval().requires_grad_(False)
        self.student = student.to(case.device).train()
        self.optimizer = torch.optim.SGD(self.student.parameters(), **SGD_SETTINGS)
        generator = torch.Generator().manual_seed(seed + 1)
        size = (shape.image, shape.image)
        self.images = torch.randn((batch, 3, *size), generator=generator).to(case.device)
        labels = bench_cases._labels(batch, setting.classes, *size, generator)
        self.labels = labels.to(case.device)
        self.case, self.loss_stage = case, loss_stage

    def _autocast(self):
        dtype = self.case.autocast_dtype
        return torch.autocast(self.case.device, dtype=dtype, enabled=dtype is not None)

    def run(self, clock=None):
        """One SGD step; returns (loss, ce, kd, gradient norm of the new model's parameters before
        the update). ``clock(phase)`` is called as the loss stage begins ("loss") and ends ("network")."""
        clock = clock or (lambda phase: None)
        self.optimizer.zero_grad(set_to_none=True)
        with self._autocast():
            with torch.no_grad():
                y = self.old(self.images, upsample=False)["logits"]
            x = self.student(self.images, upsample=False)["logits"]
            clock("loss")
            with torch.profiler.record_function(LOSS_STAGE_MARK):
                x_leaf = x.detach().requires_grad_()
                ce, kd = self.loss_stage(x_leaf, self.labels, y.to(x.dtype), tuple(self.labels.shape[-2:]))
                loss = ce + MIB_LAMBDA_KD * kd
        with torch.profiler.record_function(LOSS_STAGE_MARK):
            loss.backward()
        clock("network")
        x.backward(x_leaf.grad)
        grads = [p.grad for p in self.student.parameters() if p.grad is not None]
        grad_norm = torch.linalg.vector_norm(torch.stack([torch.linalg.vector_norm(g.float()) for g in grads]))
        self.optimizer.step()
        return loss.item(), ce.item(), kd.item(), grad_norm.item()

    def state_bytes(self):
        """Bytes that a step does not allocate: both models' weights and buffers, and the SGD
        momentum; the new model's gradients, which each step allocates anew, are given apart."""
        params = sum(p.numel() * p.element_size() for p in self.student.parameters())
        weights = sum(t.numel() * t.element_size() for m in (self.old, self.student) for t in m.state_dict().values())
        return {"state_bytes": weights + params, "grad_bytes": params}


LOSS_STAGE_MARK = "incseg_fast.train_step.loss_stage"


def _synchronize(device):
    if device == "cuda":
        torch.cuda.synchronize()


def timed_step(step):
    """(step seconds, loss stage seconds) of one step."""
    device = step.case.device
    marks = {}

    def clock(phase):
        _synchronize(device)
        marks[phase] = time.perf_counter()

    _synchronize(device)
    begin = time.perf_counter()
    step.run(clock)
    _synchronize(device)
    return time.perf_counter() - begin, marks["network"] - marks["loss"]


# ---------------------------------------------------------------------------------------------
# Memory of one step.
# ---------------------------------------------------------------------------------------------


def _cpu_step_memory(step):
    """Peak bytes of one step replayed from the allocator's events (measure.py's method): the largest
    rise above the lowest level reached before it (a step frees tensors made before it, e.g. the last
    step's gradients, so the level can fall below its start); and the loss stage's own peak: the
    most it held above what was live when it began."""
    with measure._quiet_stderr(), torch.profiler.profile(profile_memory=True) as prof:
        step.run()
    events = list(prof.profiler.kineto_results.events())
    marks = [e for e in events if e.name() == LOSS_STAGE_MARK]
    begin = min(e.start_ns() for e in marks)
    end = max(e.start_ns() + e.duration_ns() for e in marks)
    allocations = [e for e in events if e.name() == "[memory]" and e.device_type() == measure.DeviceType.CPU]
    allocations.sort(key=lambda e: e.start_ns())
    live = lowest = peak = loss_peak = 0
    live_at_loss = None
    for event in allocations:
        if live_at_loss is None and event.start_ns() >= begin:
            live_at_loss = loss_peak = live
        live += event.nbytes()
        lowest = min(lowest, live)
        peak = max(peak, live - lowest)
        if live_at_loss is not None and event.start_ns() <= end:
            loss_peak = max(loss_peak, live)
    return {"peak_bytes": peak, "live_at_loss_bytes": live_at_loss, "loss_extra_bytes": loss_peak - live_at_loss}


def _cuda_step_memory(step):
    """The same figures from the CUDA allocator's counters, read and reset at the loss stage's bounds."""
    torch.cuda.synchronize()
    before = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    seen = {}

    def clock(phase):
        torch.cuda.synchronize()
        seen[phase] = (torch.cuda.max_memory_allocated(), torch.cuda.memory_allocated())
        torch.cuda.reset_peak_memory_stats()

    step.run(clock)
    torch.cuda.synchronize()
    peaks = [seen["loss"][0], seen["network"][0], torch.cuda.max_memory_allocated()]
    live_at_loss = seen["loss"][1]
    return {
        "peak_bytes": max(peaks) - before,
        "live_at_loss_bytes": live_at_loss - before,
        "loss_extra_bytes": seen["network"][0] - live_at_loss,
    }


def step_memory(step):
    return _cuda_step_memory(step) if step.case.device == "cuda" else _cpu_step_memory(step)


# ---------------------------------------------------------------------------------------------
# One provider, and every provider of a case.
# ---------------------------------------------------------------------------------------------


@contextlib.contextmanager
def _exact_float32():
    """CUDA's float32 as float32 for the agreement step: no TF32 (which rounds convolution inputs to
    10 mantissa bits) and deterministic cuDNN kernels, so that providers differ only by their loss
    stage's rounding. The timed steps run with the user's settings. No effect on CPU."""
    saved = (torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32, torch.backends.cudnn.deterministic)
    torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = False
    torch.backends.cudnn.deterministic = True
    try:
        yield
    finally:
        (
            torch.backends.cuda.matmul.allow_tf32,
            torch.backends.cudnn.allow_tf32,
            torch.backends.cudnn.deterministic,
        ) = saved


def run_provider(case, provider, *, reps, warmup, stages=None):
    """Every figure of one provider in this process: the first step (from the seeded weights, before
    any update) gives the loss and gradient norm that :func:`check_agreement` compares and is the
    first of ``warmup`` untimed steps; then one step measures the memory, then ``reps`` are timed."""
    step = Step(case, (stages or loss_stages())[provider])
    with _exact_float32():
        loss, ce, kd, grad_norm = step.run()
    for _ in range(warmup - 1):
        step.run()
    memory = step_memory(step)  # an untimed step: the profiler slows it
    samples = [timed_step(step) for _ in range(reps)]
    result = {
        "first_step": {"loss": loss, "ce": ce, "kd": kd, "grad_norm": grad_norm},
        "step_s": [s for s, _ in samples],
        "loss_stage_s": [s for _, s in samples],
        "step_median_s": statistics.median(s for s, _ in samples),
        "loss_stage_median_s": statistics.median(s for _, s in samples),
        **step.state_bytes(),
        **memory,
    }
    return result


def _run_provider_in_subprocess(case, provider, *, reps, warmup):
    """run_provider in a fresh Python process (CPU): no allocator cache or compiled code of
    another provider around. Its progress goes to stderr, the result as JSON on stdout's last line."""
    job = {"case": case.to_json(), "provider": provider, "reps": reps, "warmup": warmup}
    command = [sys.executable, "-m", "incseg_fast.bench.train_step", json.dumps(job)]
    done = subprocess.run(command, capture_output=True, text=True, check=False)
    if done.returncode != 0:
        lines = done.stderr.strip().splitlines() or ["(no output)"]
        raise RuntimeError(f"{case.name} {provider}: worker failed: {lines[-1]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def computed_largest_batches(case, result):
    """The largest batch per budget, computed (not run): the step's peak less the gradients is taken
    as proportional to batch and pixels, and scaled from the measured image size to 512 x 512; the
    models, their gradients and the momentum come on top. A caching allocator's fragmentation is
    not included, so the figures are upper bounds."""
    pixels = (PAPERS_IMAGE / case.shape.image) ** 2
    per_image = (result["peak_bytes"] - result["grad_bytes"]) / case.shape.batch * pixels
    fixed = result["state_bytes"] + result["grad_bytes"]
    return {str(gb): max(0, math.floor((gb * GB - fixed) / per_image)) for gb in FIT_BUDGETS_GB}


def largest_fitting(fits_batch, start):
    """The largest batch b >= 0 with ``fits_batch(b)`` true, for a ``fits_batch`` that is true up to
    some b and false beyond: doubling from ``start`` until it fails, then bisection."""
    lo, hi = 0, max(start, 1)
    while fits_batch(hi):
        lo, hi = hi, 2 * hi
    while hi - lo > 1:
        mid = (lo + hi) // 2
        lo, hi = (mid, hi) if fits_batch(mid) else (lo, mid)
    return lo


def _cuda_reserved_peak(case, stage, batch):
    """Bytes the CUDA caching allocator reserves at most in a step at ``batch`` (after a first step
    has made the momentum), or infinity when the device runs out of memory."""
    step = None
    try:
        torch.cuda.empty_cache()
        step = Step(case, stage, batch=batch)
        step.run()
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        step.run()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_reserved()
    except torch.OutOfMemoryError:
        return math.inf
    finally:
        del step
        torch.cuda.empty_cache()


def bisected_largest_batches(case, provider, log=None, budgets_gb=FIT_BUDGETS_GB):
    """CUDA: the largest batch per budget found by running steps (bisection on the reserved peak, one
    memoised run per batch shared by the budgets). Budgets above the device's memory are capped by
    it. The compiled provider is compiled with dynamic shapes here, so that each batch does not
    recompile."""
    stage = torch.compile(_interpolated_mib, dynamic=True) if provider == "compiled" else loss_stages()[provider]
    peaks = {}

    def reserved(batch):
        if batch not in peaks:
            peaks[batch] = 0 if batch == 0 else _cuda_reserved_peak(case, stage, batch)
            if log:
                log(f"{case.name}: {provider}: batch {batch}: reserved peak {peaks[batch] / GB:.1f} GB")
        return peaks[batch]

    total = torch.cuda.get_device_properties(0).total_memory
    found = {str(gb): largest_fitting(lambda b, gb=gb: reserved(b) <= gb * GB, case.shape.batch) for gb in budgets_gb}
    return {
        "largest_batch": found,
        "device_bytes": total,
        "capped": [str(gb) for gb in budgets_gb if gb * GB > total],
    }


def fits(case, results, *, bisect=False, log=None):
    """Per provider: the computed largest batches, and on CUDA with ``bisect`` the bisected ones."""
    out = {}
    for name, result in results.items():
        out[name] = {"computed": computed_largest_batches(case, result)}
        if bisect and case.device == "cuda":
            out[name]["bisected"] = bisected_largest_batches(case, name, log)
    return out


class AgreementError(RuntimeError):
    """A provider's first step differs from the mib provider's beyond rounding."""


def check_agreement(case, results):
    """Every provider's first-step loss and gradient norm against the mib provider's, within the
    rounding of the case's dtype (vocabulary.RTOL: float32 1e-5, bf16 autocast 1e-2). Records the
    relative differences in each result; raises AgreementError naming each provider that differs."""
    rtol = RTOL[case.autocast_dtype or torch.float32]
    reference = results[REFERENCE_PROVIDER]["first_step"]
    wrong = []
    for name, result in results.items():
        first = result["first_step"]
        differences = {
            key: abs(first[key] - reference[key]) / max(abs(reference[key]), 1e-30) for key in ("loss", "grad_norm")
        }
        result["agreement"] = differences
        if not all(math.isfinite(first[key]) and d <= rtol for key, d in differences.items()):
            wrong.append(
                f"{name}: loss {first['loss']:.8g} vs {reference['loss']:.8g}, "
                f"gradient norm {first['grad_norm']:.8g} vs {reference['grad_norm']:.8g}"
            )
    if wrong:
        raise AgreementError(
            f"{case.name}: first step differs from {REFERENCE_PROVIDER}'s beyond rtol {rtol:g}: " + "; ".join(wrong)
        )


def measure_case(case, provider_names=None, *, reps, warmup, isolate=None, stages=None, bisect=False, log=None):
    """Every provider of ``case`` (the mib provider always, as the reference of the agreement
    check). ``isolate``: a fresh subprocess per provider (default: on CPU). Raises AgreementError
    when a provider's first step disagrees with mib's."""
    isolate = case.device == "cpu" if isolate is None else isolate
    names = [REFERENCE_PROVIDER] + [p for p in (provider_names or PROVIDERS) if p != REFERENCE_PROVIDER]
    stages = stages or loss_stages()
    unknown = sorted(set(names) - set(stages))
    if unknown:
        raise ValueError(f"providers: unknown {unknown}; choose from {sorted(stages)}")
    results = {}
    for name in names:
        if log:
            log(f"{case.name}: {name}: {'fresh process, ' if isolate else ''}{warmup} warm-up + {reps} steps")
        if isolate:
            results[name] = _run_provider_in_subprocess(case, name, reps=reps, warmup=warmup)
        else:
            results[name] = run_provider(case, name, reps=reps, warmup=warmup, stages=stages)
            if case.device == "cuda":
                torch.cuda.empty_cache()
    check_agreement(case, results)
    record = {"case": case.name, **case.to_json(), "providers": results}
    record["fits"] = fits(case, results, bisect=bisect, log=log)
    return record


# ---------------------------------------------------------------------------------------------
# Targets and formatting.
# ---------------------------------------------------------------------------------------------

# ADE 100-50: fused+size's whole-step peak <= 0.6 of mib's, its step >= 1.3x faster than mib's and
# faster than compiled's. VOC 15-5: the fused providers no worse than mib in memory or time.
ADE_MEMORY_SHARE = 0.6
ADE_SPEEDUP = 1.3
HEADLINE = "fused+size"


def _breakdown(result):
    """Where a provider's time and memory go: the loss stage's and the network's."""
    step, loss = result["step_median_s"], result["loss_stage_median_s"]
    return (
        f"step {step * 1e3:.0f} ms = loss stage {loss * 1e3:.0f} + network {(step - loss) * 1e3:.0f}; "
        f"peak {result['peak_bytes'] / MIB:.0f} MiB, loss stage {result['loss_extra_bytes'] / MIB:.0f} MiB "
        f"above the network's {result['live_at_loss_bytes'] / MIB:.0f} MiB"
    )


def evaluate_targets(records):
    """(description, verdict, detail) per target; the detail says where time and memory go."""
    verdicts = []
    for record in records:
        results, head = record["providers"], f"train_step {record['setting']} {record['dtype']}"
        goals = []
        if record["setting"] == "ade100-50" and HEADLINE in results:
            goals.append((HEADLINE, "peak memory", ADE_MEMORY_SHARE, REFERENCE_PROVIDER))
            goals.append((HEADLINE, "step time", ADE_SPEEDUP, REFERENCE_PROVIDER))
            if "compiled" in results:
                goals.append((HEADLINE, "step time", 1.0, "compiled"))
        elif record["setting"] == "voc15-5":
            for name in ("fused", HEADLINE):
                if name in results:
                    goals += [
                        (name, "peak memory", 1.0, REFERENCE_PROVIDER),
                        (name, "step time", 1.0, REFERENCE_PROVIDER),
                    ]
        for name, figure, goal, baseline in goals:
            ours, theirs = results[name], results[baseline]
            if figure == "peak memory":
                value = ours["peak_bytes"] / theirs["peak_bytes"]
                description, ok = f"{head}: {name} peak memory <= {goal:g} x {baseline}'s", value <= goal
                shown = f"{value:.2f}"
            else:
                value = theirs["step_median_s"] / ours["step_median_s"]
                description, ok = f"{head}: {name} step >= {goal:g}x faster than {baseline}", value >= goal
                shown = f"{value:.2f}x"
            detail = shown if ok else f"{shown} ({name}: {_breakdown(ours)}; {baseline}: {_breakdown(theirs)})"
            verdicts.append((description, "met" if ok else "NOT met", detail))
    return verdicts


def _fit_text(fit):
    text = "/".join(str(fit["computed"][str(gb)]) for gb in FIT_BUDGETS_GB)
    if "bisected" in fit:
        found = fit["bisected"]
        text += " (run: " + "/".join(str(found["largest_batch"][str(gb)]) for gb in FIT_BUDGETS_GB) + ")"
    return text


def _rows(record):
    for name, result in record["providers"].items():
        step, loss = result["step_median_s"], result["loss_stage_median_s"]
        loss_bytes = result["loss_extra_bytes"]
        yield (
            name,
            result,
            {
                "step": f"{step * 1e3:.0f}",
                "loss": f"{loss * 1e3:.0f} ({loss / step:.0%})",
                "peak": f"{result['peak_bytes'] / MIB:.0f}",
                "loss_mem": f"{loss_bytes / MIB:.0f} ({loss_bytes / result['peak_bytes']:.0%})",
                "agree": f"{result['agreement']['loss']:.0e} / {result['agreement']['grad_norm']:.0e}",
                "fits": _fit_text(record["fits"][name]),
            },
        )


def _title(record):
    s, shape = SETTINGS[record["setting"]], record["shape"]
    return (
        f"train_step {s.name} ({s.classes} classes, {s.old_classes} old) {record['dtype']}: DeepLabV3-"
        f"{shape['backbone']} output stride 16, batch {shape['batch']} at {shape['image']}x{shape['image']}, "
        f"old model in no_grad, SGD step"
    )


def method(device, *, reps, warmup):
    """How the train_step figures are taken, for the report's header."""
    where = "each provider in a fresh process" if device == "cpu" else "the providers one after the other"
    memory = (
        "torch.profiler allocator events of one step (bench/measure.py's method)"
        if device == "cpu"
        else "torch.cuda.max_memory_allocated of one step"
    )
    return (
        f"train_step: {where}; {warmup} warm-up + {reps} timed steps, median; peak memory: {memory}, beyond the "
        f"models and the momentum; largest batch at 512²: computed from the per-image memory"
    )


def format_case(record):
    mib = record["providers"][REFERENCE_PROVIDER]
    lines = [
        _title(record),
        f"  {'provider':<11}{'step ms':>9}{'loss stage ms':>15}{'peak MiB':>10}{'loss stage MiB':>16}"
        f"{'vs mib: time, memory':>22}{'rel diff loss/grad':>20}  largest batch 24/40/80 GB at 512²",
    ]
    for name, result, row in _rows(record):
        versus = (
            f"{mib['step_median_s'] / result['step_median_s']:.2f}x, {result['peak_bytes'] / mib['peak_bytes']:.2f}"
        )
        lines.append(
            f"  {name:<11}{row['step']:>9}{row['loss']:>15}{row['peak']:>10}{row['loss_mem']:>16}"
            f"{versus:>22}{row['agree']:>20}  {row['fits']}"
        )
    return "\n".join(lines)


def format_markdown(records, verdicts):
    lines = [
        "| case | provider | step ms | loss stage ms (share) | peak MiB | loss stage MiB (share of peak) "
        "| speedup vs mib | memory vs mib | largest batch 24/40/80 GB at 512² (computed) |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for record in records:
        mib = record["providers"][REFERENCE_PROVIDER]
        for name, result, row in _rows(record):
            lines.append(
                f"| {record['setting']} {record['dtype']} | {name} | {row['step']} | {row['loss']} | {row['peak']} "
                f"| {row['loss_mem']} | {mib['step_median_s'] / result['step_median_s']:.2f}x "
                f"| {result['peak_bytes'] / mib['peak_bytes']:.2f} | {row['fits']} |"
            )
    if verdicts:
        lines += ["", "| target | value | verdict |", "|---|---|---|"]
        lines += [f"| {d} | {detail} | {v} |" for d, v, detail in verdicts]
    return "\n".join(lines) + "\n"


def main(argv=None):
    """The subprocess worker: ``python -m incseg_fast.bench.train_step JOB_JSON``."""
    job = json.loads((argv or sys.argv[1:])[0])
    case = StepCase.from_json(job["case"])
    print(json.dumps(run_provider(case, job["provider"], reps=job["reps"], warmup=job["warmup"])), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
