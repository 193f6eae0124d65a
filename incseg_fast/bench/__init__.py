"""Benchmarks of the fused ops against eager and compiled PyTorch: speed, memory, bandwidth, error.

``cases`` (what is measured: every op at the sizes of the papers' workloads, for each provider),
``measure`` (timing, peak memory, copy bandwidth, error against the float64 reference) and
``report`` (the interleaved report: ``python -m incseg_fast.bench`` = ``incseg-fast bench``). The
repository's pytest-benchmark suite (``benchmarks/``) uses the same cases and measurements.
"""
