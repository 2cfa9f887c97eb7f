"""A diffusers scheduler as a flowpress sampler: set_timesteps once, one model call per entry of
its timesteps with that entry's index as the step, scheduler.step between calls.

The scheduler owns the time convention and the prediction type (epsilon, v_prediction, sample,
flow): flowpress hands it the (guided) network output unchanged.  Stochastic schedulers draw
their step noise from one generator per sample, seeded as the sample's initial noise and
continued after it — what a diffusers pipeline does with `generator=[torch.Generator().manual_seed(s)
for s in seeds]` — so FP and engine trajectories share their noise and a drop-in pipeline
reproduces them.
"""

from __future__ import annotations

import copy
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor

from flowpress.errors import FlowpressError
from flowpress.sampling.core import Cond, Guided, ModelCall, Trajectory

# --scheduler names -> diffusers classes (built from the model's own scheduler config)
SCHEDULERS = {
    "ddim": "DDIMScheduler",
    "ddpm": "DDPMScheduler",
    "dpm-solver++": "DPMSolverMultistepScheduler",
    "euler": "EulerDiscreteScheduler",
    "euler-ancestral": "EulerAncestralDiscreteScheduler",
    "heun": "HeunDiscreteScheduler",
    "pndm": "PNDMScheduler",
    "flow-euler": "FlowMatchEulerDiscreteScheduler",
}
STOCHASTIC = ("DDPMScheduler", "EulerAncestralDiscreteScheduler")


def scheduler_named(name: str, base: Any) -> Any:
    """The scheduler `name` (a key of SCHEDULERS) built from `base`'s config (its training
    schedule, prediction type and so on carry over)."""
    import diffusers

    if name not in SCHEDULERS:
        raise FlowpressError(
            f"--scheduler {name!r}: choose one of {', '.join(SCHEDULERS)} (or leave it: the model's own)"
        )
    cls = getattr(diffusers, SCHEDULERS[name])
    return cls.from_config(base.config)


class DiffusersSampler:
    """`n_inference` steps of a configured diffusers scheduler (its config is read, never mutated);
    options: what else its pipeline hands set_timesteps (Flux: the sigmas and the resolution's shift mu)."""

    def __init__(self, scheduler: Any, n_inference: int, options: dict[str, Any] | None = None):
        if isinstance(n_inference, bool) or not isinstance(n_inference, int) or n_inference < 1:
            raise FlowpressError(f"sampling.steps must be an integer >= 1, got {n_inference!r}")
        self.scheduler = scheduler
        self.n_inference = n_inference
        self.options = dict(options or {})
        self.name = type(scheduler).__name__
        self.prediction_type = str(getattr(scheduler.config, "prediction_type", "flow"))
        self._timesteps = self._fresh().timesteps.clone()

    def _fresh(self) -> Any:
        scheduler = copy.deepcopy(self.scheduler)
        scheduler.set_timesteps(self.n_inference, **self.options)
        return scheduler

    @property
    def n_steps(self) -> int:
        return len(self._timesteps)

    @property
    def n_evaluations(self) -> int:
        return len(self._timesteps)

    @property
    def model_times(self) -> Tensor:
        return self._timesteps.float()

    @property
    def state_times(self) -> list[float]:
        return [float(t) for t in self._timesteps] + [0.0]

    @property
    def stochastic(self) -> bool:
        return self.name in STOCHASTIC

    def as_dict(self) -> dict[str, object]:
        return {
            "sampler": "diffusers",
            "scheduler": self.name,
            "n_steps": self.n_inference,
            "method": self.name,
            "prediction_type": self.prediction_type,
            "timesteps": self.model_times.tolist(),
            "config": dict(self.scheduler.config),
        }

    @torch.no_grad()
    def sample(
        self,
        model: Guided,
        noise: Tensor,
        cond: Cond,
        callback: Callable[[ModelCall], None] | None = None,
        seeds: Sequence[int] | None = None,
    ) -> Trajectory:
        scheduler = self._fresh()
        batch = noise.shape[0]
        generators = None
        if self.stochastic:
            seeds = list(seeds) if seeds is not None else list(range(batch))
            generators = [torch.Generator().manual_seed(int(s)) for s in seeds]
            for generator, row in zip(generators, noise, strict=True):  # advance past the initial noise
                torch.randn(tuple(row.shape), generator=generator)
        x = noise * getattr(scheduler, "init_noise_sigma", 1.0)  # flow-matching schedulers have neither
        scale = getattr(scheduler, "scale_model_input", None)
        xs = [x]
        for k, t in enumerate(scheduler.timesteps):
            step = torch.full((batch,), k, dtype=torch.int64, device=noise.device)
            out, call = model(scale(x, t) if scale is not None else x, step, cond)
            if callback is not None:
                callback(call)
            kwargs = {"generator": generators} if generators is not None else {}
            x = scheduler.step(out, t, x, **kwargs).prev_sample
            xs.append(x)
        return Trajectory(xs=torch.stack(xs), cond=cond)


@dataclass(frozen=True)
class RecordedSchedule:
    """A run's schedule as its manifest recorded it: enough for an engine (its step table), not for
    sampling (that needs the scheduler: load the model)."""

    method: str
    n_steps: int
    timesteps: tuple[float, ...]

    @property
    def n_evaluations(self) -> int:
        return len(self.timesteps)

    @property
    def model_times(self) -> Tensor:
        return torch.tensor(self.timesteps, dtype=torch.float32)

    @property
    def state_times(self) -> list[float]:
        return [*self.timesteps, 0.0]

    def as_dict(self) -> dict[str, object]:
        return {
            "sampler": "diffusers",
            "method": self.method,
            "n_steps": self.n_steps,
            "timesteps": list(self.timesteps),
        }

    def sample(self, *args: object, **kwargs: object) -> Trajectory:
        raise FlowpressError("a recorded schedule cannot sample: load the run's model (flowpress.load_pipeline)")


def schedule_from_dict(record: dict[str, Any]) -> Any:
    """The sampler a manifest's `schedule` describes: flowpress's flow Schedule, or a RecordedSchedule."""
    from flowpress.sampling.core import Schedule

    if record.get("sampler", "flow") == "flow":
        return Schedule(int(record["n_steps"]), record.get("method", "euler"))
    return RecordedSchedule(str(record["method"]), int(record["n_steps"]), tuple(float(t) for t in record["timesteps"]))
