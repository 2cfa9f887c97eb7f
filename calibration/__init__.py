"""Calibration: the model's own inputs along seeded FP trajectories; the temporal-feature cache."""

from calibration.capture import CalibrationConfig, CalibrationSet, calibration_labels, capture, select
from calibration.temporal import CachedVelocity, TemporalTable, build_table, discover_temporal

__all__ = [
    "CachedVelocity",
    "CalibrationConfig",
    "CalibrationSet",
    "TemporalTable",
    "build_table",
    "calibration_labels",
    "capture",
    "discover_temporal",
    "select",
]
