"""Fixed-schedule ODE samplers for velocity models, with classifier-free guidance."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Literal, Protocol

import torch
from torch import Tensor

from sampling.errors import FlowpressError

Method = Literal["euler", "heun"]


class VelocityFn(Protocol):
    def __call__(self, x: Tensor, t: Tensor, cond: Tensor | None) -> Tensor: ...


def interpolate(x0: Tensor, eps: Tensor, t: Tensor) -> Tensor:
    """x_t = (1 - t) x0 + t eps.  x0, eps: (B, ...); t: (B,) in [0, 1]."""
    t = t.reshape(-1, *([1] * (x0.dim() - 1)))
    return (1 - t) * x0 + t * eps


def target_velocity(x0: Tensor, eps: Tensor) -> Tensor:
    """v = d x_t / dt = eps - x0."""
    return eps - x0


@dataclass(frozen=True)
class Schedule:
    """A fixed grid t_0 = 1 > t_1 > ... > t_n = 0; `step` k means grid point t_k."""

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
    def evaluated_steps(self) -> list[int]:
        """Grid indices where the model is evaluated (Heun also evaluates at t_{k+1})."""
        if self.method == "euler":
            return list(range(self.n_steps))
        return list(range(self.n_steps + 1))

    def as_dict(self) -> dict[str, object]:
        return {"n_steps": self.n_steps, "method": self.method, "times": self.times.tolist()}


@dataclass(frozen=True)
class ModelCall:
    """One model evaluation inside the sampler, as the per-step callback sees it.

    step: grid index of the evaluation point; t: its time; x_t: (B, C, H, W) state.
    model_x / model_t / model_cond: what the network actually received (batch doubled
    under guidance); model_v: the network's raw output; v: the (guided) velocity used.
    """

    step: int
    t: float
    x_t: Tensor
    model_x: Tensor
    model_t: Tensor
    model_cond: Tensor | None
    model_v: Tensor
    v: Tensor


@dataclass(frozen=True)
class Trajectory:
    """times: (n+1,); xs: (n+1, B, C, H, W) states on the grid, xs[-1] is the sample."""

    times: Tensor
    xs: Tensor
    cond: Tensor | None

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


def guided(
    model: VelocityFn, guidance: float, null_cond: int | None
) -> Callable[[Tensor, Tensor, Tensor | None], tuple[Tensor, Tensor, Tensor, Tensor | None, Tensor]]:
    """Wrap `model` with classifier-free guidance v = v_u + w (v_c - v_u).

    Returns a function giving (v, model_x, model_t, model_cond, model_v).
    """

    def call(x: Tensor, t: Tensor, cond: Tensor | None):
        if guidance == 1.0 or cond is None:
            v = model(x, t, cond)
            return v, x, t, cond, v
        if null_cond is None:
            raise FlowpressError("sampling: guidance != 1 needs a null condition (the model's null_label)")
        model_x = torch.cat([x, x])
        model_t = torch.cat([t, t])
        model_cond = torch.cat([cond, torch.full_like(cond, null_cond)])
        model_v = model(model_x, model_t, model_cond)
        v_c, v_u = model_v.chunk(2)
        return v_u + guidance * (v_c - v_u), model_x, model_t, model_cond, model_v

    return call


@torch.no_grad()
def sample(
    model: VelocityFn,
    noise: Tensor,
    cond: Tensor | None,
    schedule: Schedule,
    guidance: float = 1.0,
    null_cond: int | None = None,
    callback: Callable[[ModelCall], None] | None = None,
) -> Trajectory:
    """Integrate dx/dt = v from t = 1 (noise: (B, C, H, W)) to t = 0 on `schedule`."""
    times = schedule.times
    velocity = guided(model, guidance, null_cond)
    batch = noise.shape[0]

    def evaluate(x: Tensor, step: int) -> Tensor:
        t = torch.full((batch,), float(times[step]), dtype=noise.dtype, device=noise.device)
        v, mx, mt, mc, mv = velocity(x, t, cond)
        if callback is not None:
            callback(ModelCall(step, float(times[step]), x, mx, mt, mc, mv, v))
        return v

    x = noise
    xs = [x]
    for k in range(schedule.n_steps):
        dt = times[k + 1] - times[k]
        v = evaluate(x, k)
        if schedule.method == "euler":
            x = x + dt * v
        else:
            x_euler = x + dt * v
            v_next = evaluate(x_euler, k + 1)
            x = x + dt * 0.5 * (v + v_next)
        xs.append(x)
    return Trajectory(times=times, xs=torch.stack(xs), cond=cond)
