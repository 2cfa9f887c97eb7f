"""Models: the Denoiser protocol, the diffusers adapter, StepModel, small builders."""

from flowpress.models.build import DiTSpec, UNetSpec, build_dit, build_unet
from flowpress.models.conditioning import (
    ClassConditioner,
    Conditioner,
    Conditions,
    NoConditioner,
    PromptConditioner,
    read_prompts,
)
from flowpress.models.load import LoadedModel, load_source
from flowpress.models.step import (
    StepModel,
    as_feeds,
    copy_sharing_weights,
    release_weights,
    rows_by_step,
    run_by_step,
)
from flowpress.models.velocity import (
    Denoiser,
    DiffusersDenoiser,
    check_velocity_model,
    load_model,
    save_model,
)

__all__ = [
    "ClassConditioner",
    "Conditioner",
    "Conditions",
    "LoadedModel",
    "NoConditioner",
    "PromptConditioner",
    "load_source",
    "read_prompts",
    "DiTSpec",
    "Denoiser",
    "DiffusersDenoiser",
    "StepModel",
    "UNetSpec",
    "as_feeds",
    "copy_sharing_weights",
    "release_weights",
    "rows_by_step",
    "run_by_step",
    "build_dit",
    "build_unet",
    "check_velocity_model",
    "load_model",
    "save_model",
]
