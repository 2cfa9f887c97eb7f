"""Engines: runtimes behind one protocol, host-ISA checks, compare / report / gate."""

from flowpress.engines.base import Engine, OrtEngine, TorchEngine, check_steps
from flowpress.engines.compare import (
    CompareConfig,
    Comparison,
    Evaluator,
    FpReference,
    GateConfig,
    MetricBound,
    compare,
    evaluate_gate,
    fp_reference,
    judge,
    recommend,
)
from flowpress.engines.metrics import frechet_distance, psnr_db, rel_l2, ssim
from flowpress.engines.timing import interleaved_step_times, median_step_ms, step_times_ms

__all__ = [
    "CompareConfig",
    "Comparison",
    "Engine",
    "Evaluator",
    "FpReference",
    "GateConfig",
    "MetricBound",
    "OrtEngine",
    "TorchEngine",
    "check_steps",
    "compare",
    "evaluate_gate",
    "fp_reference",
    "frechet_distance",
    "interleaved_step_times",
    "judge",
    "median_step_ms",
    "psnr_db",
    "recommend",
    "rel_l2",
    "ssim",
    "step_times_ms",
]
