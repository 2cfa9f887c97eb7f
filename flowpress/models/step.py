"""StepModel: the engine-facing network, (x, step, *cond) -> out on a fixed schedule."""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import TypeVar

import torch
from torch import Tensor, nn

from flowpress.sampling import Cond, Sampler

M = TypeVar("M", bound=nn.Module)


def rows_by_step(step: Tensor) -> list[Tensor]:
    """The row indices of each distinct step in a batch, in step order (one group when uniform)."""
    flat = step.reshape(-1)
    if bool((flat == flat[0]).all()):
        return [torch.arange(flat.numel())]
    return [(flat == k).nonzero().flatten() for k in torch.unique(flat)]


def run_by_step(fn: Callable[[Tensor, Tensor, Cond], Tensor], x: Tensor, step: Tensor, cond: Cond) -> Tensor:
    """fn(x, step, cond) on each step's rows (rows_by_step), reassembled in row order."""
    groups = rows_by_step(step)
    if len(groups) == 1:
        return fn(x, step, cond)
    out: Tensor | None = None
    for rows in groups:
        part = fn(x[rows], step[rows], {name: value[rows] for name, value in cond.items()})
        out = part.new_empty((x.shape[0], *part.shape[1:])) if out is None else out
        out[rows] = part
    assert out is not None
    return out


def as_feeds(x: Tensor, step: Tensor, cond: Cond) -> dict[str, Tensor]:
    """An engine's inputs by graph input name: x, step, then the conditioning."""
    return {"x": x, "step": step, **cond}


class StepModel(nn.Module):
    """out = model(x, times[step], cond) with the sampler's step table baked in.

    `model` is a Denoiser; its layer names (net.*) are what quantization and export key on.
    forward takes the conditioning tensors positionally in `cond_names` order (as an exported
    graph takes its inputs) or as one dict; `run(x, step, cond)` takes the dict.  A step outside the
    sampler's evaluations gives NaN for that sample (a negative index would otherwise wrap
    around the tables), so an exported graph refuses it even when fed directly.

    per_step: set on a fake-quant copy whose quantization depends on the step (per-step
    activation scales): called with a batch's step index before the network runs and with None
    after; a batch that mixes steps then runs one step at a time.
    """

    times: Tensor
    per_step: Callable[[int | None], None] | None = None

    def __init__(self, model: nn.Module, sampler: Sampler):
        super().__init__()
        self.model = model
        self.register_buffer("times", sampler.model_times.clone())
        self.n_evaluations = sampler.n_evaluations
        self.cond_names: tuple[str, ...] = tuple(getattr(model, "cond_names", ()))
        self.sample_shape: tuple[int, int, int] = model.sample_shape  # type: ignore[assignment]

    def evaluate(self, x: Tensor, step: Tensor, cond: Cond) -> Tensor:
        return self.model(x, self.times[step], cond)

    def forward(self, x: Tensor, step: Tensor, *cond: Tensor | Cond) -> Tensor:
        """cond: the conditioning tensors in cond_names order (as an exported graph takes them),
        or one dict by name (as the sampler passes it)."""
        by_name = (
            cond[0] if len(cond) == 1 and isinstance(cond[0], dict) else dict(zip(self.cond_names, cond, strict=True))
        )
        out = self.evaluate(x, step, by_name) if self.per_step is None else self._by_step(x, step, by_name)  # type: ignore[arg-type]
        valid = ((step >= 0) & (step < self.n_evaluations)).reshape(-1, *([1] * (out.dim() - 1)))
        # out + 0 is out exactly; NaN where the step is off the schedule (shapes stay static in the graph)
        return out + torch.where(valid, 0.0, float("nan"))

    def _by_step(self, x: Tensor, step: Tensor, cond: Cond) -> Tensor:
        per_step = self.per_step
        assert per_step is not None

        def one_step(x: Tensor, step: Tensor, cond: Cond) -> Tensor:
            per_step(int(step.reshape(-1)[0]))
            return self.evaluate(x, step, cond)

        try:
            return run_by_step(one_step, x, step, cond)
        finally:
            per_step(None)

    def example_inputs(self, batch: int = 2) -> tuple[Tensor, ...]:
        """(x, step, *cond) of `batch` rows, for tracing an export: zeros, steps 0 and the last."""
        step = torch.linspace(0, self.n_evaluations - 1, batch).round().long()
        cond = self.model.example_condition(batch)  # type: ignore[operator]
        return (torch.zeros(batch, *self.sample_shape), step, *(cond[name] for name in self.cond_names))

    def run(self, x: Tensor, step: Tensor, cond: Cond) -> Tensor:
        """forward with the conditioning by name."""
        return self(x, step, *(cond[name] for name in self.cond_names))


WEIGHT_LAYERS = (nn.Conv1d, nn.Conv2d, nn.Linear, nn.Embedding)


def copy_sharing_weights(module: M) -> M:
    """A deep copy of `module` whose Conv / Linear / Embedding weights are the original's own
    tensors: at 0.6-12B parameters a second copy of the weights is the difference between a run
    that fits and one the OOM killer ends.  Biases, norms and buffers are copied (bias correction
    changes a quantized copy's biases); nothing may change a weight of either in place."""
    shared = {id(m.weight): m.weight for m in module.modules() if isinstance(m, WEIGHT_LAYERS)}
    return copy.deepcopy(module, shared)


def release_weights(*modules: nn.Module) -> None:
    """Free the parameters and buffers of `modules` (and of every copy sharing them,
    copy_sharing_weights): each becomes an empty tensor, so a module used afterwards fails loudly
    instead of computing with stale weights.  For large models, once their graphs are on disk."""
    import gc

    for module in modules:
        for tensor in [*module.parameters(), *module.buffers()]:
            tensor.data = torch.empty(0, dtype=tensor.dtype)
    gc.collect()
