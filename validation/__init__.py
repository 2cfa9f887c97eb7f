"""Validation: an engine against the FP trajectory, step by step (compare), the metrics, the gate,
the evaluator protocol, latency, and the report of a run."""

from flowpress.validation.compare import (
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
from flowpress.validation.metrics import frechet_distance, psnr_db, rel_l2, ssim
from flowpress.validation.timing import interleaved_step_times, median_step_ms, step_times_ms

__all__ = [
    "CompareConfig",
    "Comparison",
    "Evaluator",
    "FpReference",
    "GateConfig",
    "MetricBound",
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
