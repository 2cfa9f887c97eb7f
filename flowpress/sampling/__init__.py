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
from flowpress.sampling.schedulers import (
    SCHEDULERS,
    DiffusersSampler,
    RecordedSchedule,
    schedule_from_dict,
    scheduler_named,
)

__all__ = [
    "SCHEDULERS",
    "DiffusersSampler",
    "RecordedSchedule",
    "schedule_from_dict",
    "scheduler_named",
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
