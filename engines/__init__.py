"""Engines: runtimes behind one protocol, the engine-driven sampler, compare / report / gate."""

from engines.base import Engine, EngineVelocity, OrtEngine, TorchEngine, check_steps
from engines.compare import (
    CompareConfig,
    Comparison,
    GateConfig,
    compare,
    frechet_distance,
    interleaved_step_times,
    judge,
    median_step_ms,
    psnr_db,
    quality,
    recommend,
    rel_l2,
    step_times_ms,
)
from engines.report import report_dict, write_report

__all__ = [
    "CompareConfig",
    "Comparison",
    "Engine",
    "EngineVelocity",
    "GateConfig",
    "OrtEngine",
    "TorchEngine",
    "check_steps",
    "compare",
    "frechet_distance",
    "interleaved_step_times",
    "judge",
    "median_step_ms",
    "psnr_db",
    "quality",
    "recommend",
    "rel_l2",
    "step_times_ms",
    "report_dict",
    "write_report",
]
