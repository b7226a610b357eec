"""`cryosift bench`: the benchmark protocol of SPEC.md (B1-B5) on simulated data."""

from cryosift.bench.protocol import BENCHMARKS, DatasetSpec, benchmark_settings
from cryosift.bench.runner import run_benchmarks

__all__ = ["BENCHMARKS", "DatasetSpec", "benchmark_settings", "run_benchmarks"]
