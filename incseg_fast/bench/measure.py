"""Measurements: wall time, peak extra memory, copy bandwidth, error against float64, machine.

On CPU, torch keeps no peak-memory counter, so ``peak_extra_bytes`` replays the allocator's
events recorded by ``torch.profiler`` (``profile_memory=True``): the CPU allocator reports each
allocation made while profiling with its size, and each free of such a block with minus its size
(frees of blocks allocated before the region, like the inputs, are not reported). The running
sum of those events in time order is the number of live bytes allocated inside the region; its
maximum is the peak. ``check_peak_counter`` verifies this on allocations of known sizes.
"""

import contextlib
import os
import platform
import statistics
import sys
import time

import torch
from torch._C._autograd import DeviceType
from torch.profiler import ProfilerActivity, profile

from incseg_fast.bench.cases import run_forward_backward

# ---------------------------------------------------------------------------------------------
# Time.
# ---------------------------------------------------------------------------------------------


def time_call(fn, device):
    """Seconds one call of ``fn()`` takes (CUDA: between events, after the queue drained)."""
    if device == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        torch.cuda.synchronize()
        start.record()
        fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) / 1e3
    begin = time.perf_counter()
    fn()
    return time.perf_counter() - begin


def median(values):
    return statistics.median(values)


# ---------------------------------------------------------------------------------------------
# Memory.
# ---------------------------------------------------------------------------------------------


@contextlib.contextmanager
def _quiet_stderr():
    """Kineto writes a line to the stderr file descriptor at each profiler start and stop."""
    sys.stderr.flush()
    saved = os.dup(2)
    try:
        with open(os.devnull, "w") as devnull:
            os.dup2(devnull.fileno(), 2)
            yield
    finally:
        os.dup2(saved, 2)
        os.close(saved)


def _cpu_peak_extra_bytes(fn):
    with _quiet_stderr(), profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    events = [
        e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]" and e.device_type() == DeviceType.CPU
    ]
    events.sort(key=lambda e: e.start_ns())  # stable: equal stamps keep the recorded order
    live = peak = 0
    for event in events:
        live += event.nbytes()
        peak = max(peak, live)
    return peak


def peak_extra_bytes(fn, device):
    """Peak of the bytes allocated by ``fn()`` and live at the same time, not counting memory
    that existed before the call (the inputs). Outputs kept alive (gradients) count."""
    if device == "cuda":
        torch.cuda.synchronize()
        before = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()
        fn()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - before
    return _cpu_peak_extra_bytes(fn)


def check_peak_counter():
    """Check the CPU counter on known allocations: 4 MB and 2 MB live together, the 4 MB block
    freed, then 0.8 MB: the peak is exactly 6 MB. Raises if the counter is wrong."""
    kept = []

    def region():
        first = torch.empty(1_000_000, dtype=torch.float32)
        kept.append(torch.empty(500_000, dtype=torch.float32))
        del first
        kept.append(torch.empty(200_000, dtype=torch.float32))

    expected = 6_000_000
    measured = _cpu_peak_extra_bytes(region)
    if measured != expected:
        raise RuntimeError(f"CPU peak-memory counter is wrong: measured {measured} B, expected {expected} B")
    return measured


def forward_backward_peak(fn, inputs, device):
    inputs.clear_grads()
    peak = peak_extra_bytes(lambda: run_forward_backward(fn, inputs), device)
    inputs.clear_grads()
    return peak


# ---------------------------------------------------------------------------------------------
# Bandwidth.
# ---------------------------------------------------------------------------------------------


def copy_bandwidth(device, nbytes=256 * 2**20, reps=10):
    """Bytes per second of ``dst.copy_(src)`` on a large float32 tensor (read + write)."""
    src = torch.randn(nbytes // 4, device=device)
    dst = torch.empty_like(src)
    for _ in range(2):
        dst.copy_(src)
    seconds = median([time_call(lambda: dst.copy_(src), device) for _ in range(reps)])
    return 2 * nbytes / seconds


# ---------------------------------------------------------------------------------------------
# Error.
# ---------------------------------------------------------------------------------------------


def outputs_and_grads(fn, inputs):
    inputs.clear_grads()
    outputs = run_forward_backward(fn, inputs)
    values = [o.detach() for o in outputs] + [t.grad for t in inputs.grad_tensors()]
    inputs.clear_grads()
    return values


def max_relative_error(values, reference_values):
    """Max over outputs and gradients of max|value - reference| / max|reference|."""
    worst = 0.0
    for value, ref in zip(values, reference_values, strict=True):
        if value is None:
            raise RuntimeError("a provider returned no gradient where the reference has one")
        scale = ref.abs().max().item()
        diff = (value.double() - ref).abs().max().item()
        worst = max(worst, diff / scale if scale > 0 else diff)
    return worst


# ---------------------------------------------------------------------------------------------
# The machine.
# ---------------------------------------------------------------------------------------------


_VECTOR_FLAGS = ("avx2", "avx512f", "avx512_bf16", "amx_tile")


def _cpu_model():
    """The CPU's name and its vector extensions of interest, from /proc/cpuinfo (Linux)."""
    name, flags = platform.processor() or "unknown CPU", []
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                key, _, value = line.partition(":")
                if key.strip() == "model name":
                    name = value.strip()
                elif key.strip() == "flags":
                    flags = [flag for flag in _VECTOR_FLAGS if flag in value.split()]
                    break
    except OSError:
        pass
    return f"{name} ({' '.join(flags)})" if flags else name


def machine(device):
    info = {
        "cpu": _cpu_model(),
        "cores": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "load_average": os.getloadavg(),
        "date_utc": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "device": device,
    }
    if device == "cuda":
        info["gpu"] = torch.cuda.get_device_name()
    return info
