"""Sampling: the time convention, Euler/Heun over a fixed schedule, CFG, trajectories.

Time convention (the only place it is written): t = 1 is noise, t = 0 is data,
x_t = (1 - t) * x0 + t * eps, target velocity v = eps - x0, and sampling integrates
dx/dt = v from t = 1 down to t = 0.
"""

from sampling.core import (
    ModelCall,
    Schedule,
    Trajectory,
    VelocityFn,
    guided,
    interpolate,
    noise_for_seeds,
    sample,
    target_velocity,
)
from sampling.errors import EngineParityError, FlowpressError

__all__ = [
    "EngineParityError",
    "FlowpressError",
    "ModelCall",
    "Schedule",
    "Trajectory",
    "VelocityFn",
    "guided",
    "interpolate",
    "noise_for_seeds",
    "sample",
    "target_velocity",
]
