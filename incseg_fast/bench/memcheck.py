"""Cross-check of the CPU peak-memory figure against the kernel's peak-RSS counter.

    python -m incseg_fast.bench.memcheck [--ops a,b] [--sizes voc,...] [--quick]

The report's CPU peak comes from the allocator events that ``torch.profiler`` records, which
miss memory that does not go through torch's allocator (a kernel's own ``malloc``/``new``).
This tool measures each fwd+bwd a second way: it makes glibc serve every block of 64 KiB or
more with its own ``mmap`` and give it back on free (``mallopt``; by default glibc keeps freed
memory for reuse, which hides it from RSS), resets the peak RSS (``/proc/self/clear_refs``),
and reads the growth of ``VmHWM`` over the RSS before the call. The two figures agree when
nothing allocates behind torch's back. Linux with glibc only; the changed allocation policy
slows everything, so this is for memory, never for timing.
"""

import argparse
import ctypes
import functools
import sys

from incseg_fast.bench import cases as bench_cases
from incseg_fast.bench import measure

M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter; setting it also stops its dynamic adjustment
MMAP_THRESHOLD_BYTES = 64 * 1024


def _status_bytes(field):
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field):
                return int(line.split()[1]) * 1024
    raise RuntimeError(f"/proc/self/status has no {field}")


def rss_peak_extra_bytes(fn):
    """Growth of the peak resident set during ``fn()`` over the resident set before it."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # resets VmHWM to the current RSS
    before = _status_bytes("VmRSS:")
    fn()
    return _status_bytes("VmHWM:") - before


def main(argv=None):
    parser = argparse.ArgumentParser(prog="python -m incseg_fast.bench.memcheck", description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--ops", type=lambda s: s.split(","))
    parser.add_argument("--sizes", type=lambda s: s.split(","))
    parser.add_argument("--providers", type=lambda s: s.split(","))
    args = parser.parse_args(argv)
    libc = ctypes.CDLL("libc.so.6")
    if libc.mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD_BYTES) != 1:
        raise SystemExit("mallopt(M_MMAP_THRESHOLD) failed: this check needs glibc")

    print(f"{'case':<45}{'provider':<10}{'profiler MiB':>14}{'peak-RSS MiB':>14}")
    for case in bench_cases.select_cases(ops=args.ops, sizes=args.sizes, quick=args.quick):
        inputs = case.make_inputs()
        for name, fn in bench_cases.providers(case.op, "cpu", args.providers):
            for _ in range(2):  # compile, and let caches settle
                inputs.clear_grads()
                bench_cases.run_forward_backward(fn, inputs)
            profiled = measure.forward_backward_peak(fn, inputs, "cpu")
            inputs.clear_grads()
            resident = rss_peak_extra_bytes(functools.partial(bench_cases.run_forward_backward, fn, inputs))
            inputs.clear_grads()
            print(f"{case.name:<45}{name:<10}{profiled / 2**20:>14.1f}{resident / 2**20:>14.1f}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
