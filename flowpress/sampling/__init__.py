"""Sampling: fixed schedules that pass the step index, classifier-free guidance, trajectories."""

from flowpress.sampling.core import (
    Cond,
    Guided,
    ModelCall,
    Sampler,
    Schedule,
    StepFn,
    Trajectory,
    batch_cond,
    interpolate,
    noise_for_seeds,
    sample,
    target_velocity,
)

__all__ = [
    "Cond",
    "Guided",
    "ModelCall",
    "Sampler",
    "Schedule",
    "StepFn",
    "Trajectory",
    "batch_cond",
    "interpolate",
    "noise_for_seeds",
    "sample",
    "target_velocity",
]
