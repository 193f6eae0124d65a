"""Benchmarks for incseg_fast: a pytest-benchmark suite and ``python -m benchmarks.report``.

Both use the cases of ``benchmarks.cases`` and the measurements of ``benchmarks.measure``.
"""
