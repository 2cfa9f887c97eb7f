"""Calibration: the model's own inputs along seeded FP trajectories; the temporal-feature cache."""

from flowpress.calibration.capture import CalibrationConfig, CalibrationSet, capture, select
from flowpress.calibration.temporal import CachedStepModel, TemporalTable, build_table, discover_temporal

__all__ = [
    "CachedStepModel",
    "CalibrationConfig",
    "CalibrationSet",
    "TemporalTable",
    "build_table",
    "capture",
    "discover_temporal",
    "select",
]
