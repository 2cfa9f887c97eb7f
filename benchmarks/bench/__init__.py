"""`python -m benchmarks bench`: every CPU engine flowpress builds beside the engines a user builds by hand,
for speed (per step, whole loop) and fidelity (final PSNR against the FP trajectory)."""

from benchmarks.bench.config import load_bench_config
from benchmarks.bench.run import run_bench

__all__ = ["load_bench_config", "run_bench"]
