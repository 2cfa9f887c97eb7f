"""Models: the Denoiser protocol, the diffusers adapter, StepModel, small builders."""

from flowpress.models.build import DiTSpec, UNetSpec, build_dit, build_unet
from flowpress.models.step import StepModel, as_feeds
from flowpress.models.velocity import (
    Denoiser,
    DiffusersVelocity,
    check_velocity_model,
    load_model,
    save_model,
)

__all__ = [
    "DiTSpec",
    "Denoiser",
    "DiffusersVelocity",
    "StepModel",
    "UNetSpec",
    "as_feeds",
    "build_dit",
    "build_unet",
    "check_velocity_model",
    "load_model",
    "save_model",
]
