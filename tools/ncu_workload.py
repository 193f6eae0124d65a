"""What tools/gpu_check.py runs under `ncu`: each case of gpu_plan.NCU_CASES once, forward and backward,
through each fused backend, with no warm-up (ncu measures every launch on its own).

    python3 tools/ncu_workload.py [--backend cuda,triton] [--device cuda] [--quick]

The "upsampled" ops run with size= (the fused upsampling, bench provider "<backend>-size").
`--device cpu --backend cpu --quick` runs the same calls on CPU tensors at the benchmark's quick
sizes (make gpu-dry-run). Prints one line per call; exits 1 when a call fails.
"""

import argparse
import os
import sys
import traceback

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # the in-place build
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
import gpu_plan  # noqa: E402

from incseg_fast.bench import cases as bench_cases  # noqa: E402

QUICK_SIZE = {size.kind: size for size in bench_cases.SIZES.values() if size.quick}


def calls(backends, device, quick):
    """(case, provider name, provider) of every call, in order."""
    for op_name, size_name, dtype_names in gpu_plan.NCU_CASES:
        op = bench_cases.OPS[op_name]
        size = QUICK_SIZE[op.kind] if quick else bench_cases.SIZES[size_name]
        for dtype_name in dtype_names:
            case = bench_cases.Case(op, size, dtype_name, device)
            wanted = [b + bench_cases.FUSED_UPSAMPLING if op.kind == "upsampled" else b for b in backends]
            found = dict(bench_cases.providers(op, device, wanted))
            for name in wanted:
                yield case, name, found.get(name)


def main(argv=None):
    parser = argparse.ArgumentParser(prog="tools/ncu_workload.py", description=__doc__.split("\n")[0])
    parser.add_argument("--backend", default="cuda,triton", help="comma-separated fused backends")
    parser.add_argument("--device", choices=("cuda", "cpu"), default="cuda")
    parser.add_argument("--quick", action="store_true", help="the benchmark's quick sizes")
    args = parser.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device")
    failed = 0
    for case, name, provider in calls([b for b in args.backend.split(",") if b], args.device, args.quick):
        if provider is None:
            print(f"FAIL  {case.name} {name}: no such provider on {args.device}", flush=True)
            failed += 1
            continue
        try:
            inputs = case.make_inputs()
            bench_cases.run_forward_backward(provider, inputs)
            if args.device == "cuda":
                torch.cuda.synchronize()
        except Exception:  # report every call, then fail
            print(f"FAIL  {case.name} {name}: {traceback.format_exc(limit=2).strip()}", flush=True)
            failed += 1
            continue
        print(f"ok    {case.name} {name}", flush=True)
    print(f"ncu-workload: {'PASS' if failed == 0 else 'FAIL'}: {failed} calls failed")
    return 0 if failed == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
