"""Calibration: the model's own inputs captured along seeded FP trajectories."""

from calibration.capture import CalibrationConfig, CalibrationSet, calibration_labels, capture

__all__ = ["CalibrationConfig", "CalibrationSet", "calibration_labels", "capture"]
