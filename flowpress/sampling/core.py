"""Fixed-schedule samplers that hand the model the step index, and classifier-free guidance.

Every model call inside flowpress is `model(x, step, cond)`: x (B, C, H, W), step (B,) int64
index of the evaluation on the sampler's fixed schedule, cond a dict of the denoiser's
conditioning inputs (e.g. {"class_labels": (B,)}; {} when unconditional).  The network's own
timestep for step k is the schedule's business (`model_times`), looked up once where the model
is wrapped (flowpress.models.StepModel), never guessed back from a float.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Literal, Protocol

import torch
from torch import Tensor

from flowpress.errors import FlowpressError

Method = Literal["euler", "heun"]
Cond = dict[str, Tensor]


class StepFn(Protocol):
    def __call__(self, x: Tensor, step: Tensor, cond: Cond) -> Tensor: ...


def interpolate(x0: Tensor, eps: Tensor, t: Tensor) -> Tensor:
    """x_t = (1 - t) x0 + t eps.  x0, eps: (B, ...); t: (B,) in [0, 1]."""
    t = t.reshape(-1, *([1] * (x0.dim() - 1)))
    return (1 - t) * x0 + t * eps


def target_velocity(x0: Tensor, eps: Tensor) -> Tensor:
    """v = d x_t / dt = eps - x0."""
    return eps - x0


@dataclass(frozen=True)
class ModelCall:
    """One model evaluation inside the sampler, as the per-step callback sees it.

    step: index of the evaluation; x_t: (B, C, H, W) state; model_x / model_step / model_cond:
    what the network received (batch doubled under guidance); model_out: its raw output;
    out: the (guided) output the sampler used."""

    step: int
    x_t: Tensor
    model_x: Tensor
    model_step: Tensor
    model_cond: Cond
    model_out: Tensor
    out: Tensor


@dataclass(frozen=True)
class Trajectory:
    """xs: (n+1, B, C, H, W) states after each sampler step, xs[0] the noise, xs[-1] the sample."""

    xs: Tensor
    cond: Cond

    @property
    def final(self) -> Tensor:
        return self.xs[-1]


def noise_for_seeds(seeds: Sequence[int], shape: Sequence[int]) -> Tensor:
    """(N, *shape) standard normal noise; row i depends only on seeds[i]."""
    rows = []
    for seed in seeds:
        gen = torch.Generator().manual_seed(int(seed))
        rows.append(torch.randn(tuple(shape), generator=gen))
    return torch.stack(rows)


def batch_cond(cond: Cond, index: slice | Tensor) -> Cond:
    """The rows `index` of every conditioning tensor."""
    return {name: value[index] for name, value in cond.items()}


class Guided:
    """Classifier-free guidance around a step model: out = out_null + w (out_cond - out_null).

    null: the conditioning of "no condition" as (1, ...) tensors (the null class, an empty
    prompt's embeddings), expanded to the batch; guidance 1 or an empty cond calls the model once.
    """

    def __init__(self, model: StepFn, guidance: float, null: Cond | None):
        if guidance < 0:
            raise FlowpressError(f"sampling: guidance must be >= 0, got {guidance}")
        self.model, self.guidance, self.null = model, float(guidance), null

    def __call__(self, x: Tensor, step: Tensor, cond: Cond) -> tuple[Tensor, ModelCall]:
        if self.guidance == 1.0 or not cond:
            out = self.model(x, step, cond)
            return out, ModelCall(int(step[0]), x, x, step, cond, out, out)
        if not self.null:
            raise FlowpressError("sampling: guidance != 1 needs the model's null condition")
        model_x, model_step = torch.cat([x, x]), torch.cat([step, step])
        model_cond = {
            name: torch.cat([value, self.null[name].expand_as(value).to(value.device)]) for name, value in cond.items()
        }
        model_out = self.model(model_x, model_step, model_cond)
        out_cond, out_null = model_out.chunk(2)
        out = out_null + self.guidance * (out_cond - out_null)
        return out, ModelCall(int(step[0]), x, model_x, model_step, model_cond, model_out, out)


class Sampler(Protocol):
    """A fixed schedule that drives a step model from noise to a sample."""

    @property
    def n_steps(self) -> int:
        """Sampler steps from noise to sample (a trajectory has n_steps + 1 states)."""
        ...

    @property
    def n_evaluations(self) -> int:
        """Distinct step indices the model is called with (the rows of an engine's tables)."""
        ...

    @property
    def model_times(self) -> Tensor:
        """(n_evaluations,) the time each step index stands for, in the sampler's units."""
        ...

    @property
    def state_times(self) -> list[float]:
        """(n_steps + 1) the time of each state of a trajectory, the noise first."""
        ...

    def sample(
        self,
        model: Guided,
        noise: Tensor,
        cond: Cond,
        callback: Callable[[ModelCall], None] | None = None,
        seeds: Sequence[int] | None = None,
    ) -> Trajectory:
        """seeds: the noise rows' seeds, for samplers that draw more noise (stochastic schedulers)."""
        ...

    def as_dict(self) -> dict[str, object]: ...


@dataclass(frozen=True)
class Schedule:
    """flowpress's rectified-flow sampler: the grid t_0 = 1 > t_1 > ... > t_n = 0, Euler or Heun.

    Time convention: t = 1 is noise, t = 0 is data, x_t = (1 - t) x0 + t eps, v = eps - x0,
    dx/dt = v integrated from 1 down to 0.  Step k is grid point t_k (Heun also evaluates t_n)."""

    n_steps: int
    method: Method = "euler"

    def __post_init__(self) -> None:
        if isinstance(self.n_steps, bool) or not isinstance(self.n_steps, int) or self.n_steps < 1:
            raise FlowpressError(f"sampling.steps must be an integer >= 1, got {self.n_steps!r}")
        if self.method not in ("euler", "heun"):
            raise FlowpressError(f"sampling.method must be 'euler' or 'heun', got {self.method!r}")

    @property
    def times(self) -> Tensor:
        """(n_steps + 1,) float32 grid from 1 to 0."""
        return torch.linspace(1.0, 0.0, self.n_steps + 1, dtype=torch.float64).float()

    @property
    def n_evaluations(self) -> int:
        return self.n_steps + (1 if self.method == "heun" else 0)

    @property
    def model_times(self) -> Tensor:
        return self.times[: self.n_evaluations]

    @property
    def state_times(self) -> list[float]:
        return self.times.tolist()

    def as_dict(self) -> dict[str, object]:
        return {"sampler": "flow", "n_steps": self.n_steps, "method": self.method, "times": self.times.tolist()}

    @torch.no_grad()
    def sample(
        self,
        model: Guided,
        noise: Tensor,
        cond: Cond,
        callback: Callable[[ModelCall], None] | None = None,
        seeds: Sequence[int] | None = None,
    ) -> Trajectory:
        """Integrate dx/dt = v from t = 1 (noise: (B, C, H, W)) to t = 0 (deterministic: seeds unused)."""
        times = self.times
        batch = noise.shape[0]

        def evaluate(x: Tensor, k: int) -> Tensor:
            step = torch.full((batch,), k, dtype=torch.int64, device=noise.device)
            v, call = model(x, step, cond)
            if callback is not None:
                callback(call)
            return v

        x = noise
        xs = [x]
        for k in range(self.n_steps):
            dt = times[k + 1] - times[k]
            v = evaluate(x, k)
            if self.method == "euler":
                x = x + dt * v
            else:
                v_next = evaluate(x + dt * v, k + 1)
                x = x + dt * 0.5 * (v + v_next)
            xs.append(x)
        return Trajectory(xs=torch.stack(xs), cond=cond)


def sample(
    sampler: Sampler,
    model: StepFn,
    noise: Tensor,
    cond: Cond,
    guidance: float = 1.0,
    null: Cond | None = None,
    callback: Callable[[ModelCall], None] | None = None,
    seeds: Sequence[int] | None = None,
) -> Trajectory:
    """Run `sampler` on `model` under classifier-free guidance from `noise` (rows seeded by `seeds`)."""
    return sampler.sample(Guided(model, guidance, null), noise, cond, callback, seeds)
