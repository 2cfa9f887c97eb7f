"""Capture the model's own inputs along seeded full-precision sampling trajectories."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
from torch import Tensor

from sampling import FlowpressError, ModelCall, Schedule, VelocityFn, noise_for_seeds, sample

Strategy = Literal["all", "naive", "uniform", "ndtc"]


@dataclass(frozen=True)
class CalibrationConfig:
    """n_samples FP trajectories from seeds seed_base, seed_base + 1, ... (labels cycle over
    classes), then `budget` of their network inputs kept by `strategy`:

    - all: every step, budget split evenly over the steps (None keeps everything);
    - naive: the first step only (pure noise: the common mistake, kept as a baseline);
    - uniform (Q-Diffusion): `uniform_steps` evenly spaced steps, equal inputs per step;
    - ndtc (PTQ4DM): each input's step drawn from N(ndtc_mean * n, ndtc_std * n) over the
      step index (0 = noisiest), clamped; 0.4 / 0.4 follow the released code, which is what
      was run for the paper's numbers (its Eq. 15 says N(0.5T, sqrt(0.5T))).
    """

    n_samples: int = 64
    seed_base: int = 100_000
    batch_size: int = 64
    strategy: Strategy = "all"
    budget: int | None = None
    uniform_steps: int = 10
    ndtc_mean: float = 0.4
    ndtc_std: float = 0.4

    def __post_init__(self) -> None:
        if self.n_samples < 1 or self.batch_size < 1:
            raise FlowpressError(
                f"calibration: n_samples and batch_size must be >= 1, got {self.n_samples}, {self.batch_size}"
            )
        if self.strategy not in ("all", "naive", "uniform", "ndtc"):
            raise FlowpressError(f"calibration.strategy must be all, naive, uniform or ndtc, got {self.strategy!r}")
        if self.budget is not None and self.budget < 1:
            raise FlowpressError(f"calibration.budget must be >= 1 or null, got {self.budget}")


@dataclass(frozen=True)
class CalibrationSet:
    """Every network input seen along the FP trajectories, flat.

    x: (K, C, H, W) inputs (batch doubled under guidance); t: (K,) their times;
    cond: (K,) int64 or None; step: (K,) grid index of the sampler step each came from;
    times: (n + 1,) the schedule's grid.
    """

    x: Tensor
    t: Tensor
    cond: Tensor | None
    step: Tensor
    times: Tensor

    def subset(self, index: Tensor) -> CalibrationSet:
        cond = None if self.cond is None else self.cond[index]
        return CalibrationSet(self.x[index], self.t[index], cond, self.step[index], self.times)

    def __len__(self) -> int:
        return int(self.x.shape[0])

    def batches(self, batch_size: int) -> Iterator[tuple[Tensor, Tensor, Tensor | None, int]]:
        """(x, t, cond, step) batches, step by step; the step index is explicit, never counted."""
        for step in torch.unique(self.step).tolist():
            index = torch.nonzero(self.step == step).flatten()
            for chunk in index.split(batch_size):
                cond = None if self.cond is None else self.cond[chunk]
                yield self.x[chunk], self.t[chunk], cond, int(step)

    def save(self, path: str | Path) -> Path:
        from safetensors.torch import save_file

        tensors = {"x": self.x, "t": self.t, "step": self.step, "times": self.times}
        tensors = {k: v.contiguous() for k, v in tensors.items()}
        if self.cond is not None:
            tensors["cond"] = self.cond.contiguous()
        try:
            save_file(tensors, str(path))
        except Exception as err:  # safetensors reports a failed write (full disk, permissions) as its own error
            reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            raise FlowpressError(
                f"{path}: cannot write the calibration set ({reason}); free space or make the directory writable"
            ) from None
        return Path(path)

    @classmethod
    def load(cls, path: str | Path) -> CalibrationSet:
        from safetensors.torch import load_file

        tensors = load_file(str(path))
        return cls(tensors["x"], tensors["t"], tensors.get("cond"), tensors["step"], tensors["times"])


def calibration_labels(n: int, num_classes: int | None) -> Tensor | None:
    return None if not num_classes else torch.arange(n, dtype=torch.int64) % num_classes


def capture(
    model: VelocityFn,
    sample_shape: tuple[int, ...],
    num_classes: int | None,
    schedule: Schedule,
    config: CalibrationConfig,
    guidance: float = 1.0,
    null_cond: int | None = None,
) -> CalibrationSet:
    """Run the FP sampler from seeded noise and keep what the network saw at every step."""
    seeds = list(range(config.seed_base, config.seed_base + config.n_samples))
    labels = calibration_labels(config.n_samples, num_classes)
    calls: list[ModelCall] = []
    for start in range(0, config.n_samples, config.batch_size):
        chunk = seeds[start : start + config.batch_size]
        cond = None if labels is None else labels[start : start + len(chunk)]
        sample(model, noise_for_seeds(chunk, sample_shape), cond, schedule, guidance, null_cond, calls.append)
    for c in calls:
        if not (bool(torch.isfinite(c.model_v).all()) and bool(torch.isfinite(c.model_x).all())):
            raise FlowpressError(
                f"calibration: the FP model's inputs or outputs hold NaN / Inf at sampler step {c.step}; check the "
                "model's weights and the recipe's sampling settings before quantizing"
            )
    x = torch.cat([c.model_x for c in calls])
    t = torch.cat([c.model_t for c in calls])
    step = torch.cat([torch.full((c.model_x.shape[0],), c.step, dtype=torch.int64) for c in calls])
    cond_out = None if labels is None else torch.cat([c.model_cond for c in calls])  # type: ignore[misc]
    full = CalibrationSet(x, t, cond_out, step, schedule.times)
    return select(full, config, schedule.n_steps)


def select(calib: CalibrationSet, config: CalibrationConfig, n_steps: int) -> CalibrationSet:
    """Keep `config.budget` inputs by `config.strategy` (seeded by config.seed_base)."""
    if config.strategy == "all" and config.budget is None:
        return calib
    gen = torch.Generator().manual_seed(config.seed_base)
    budget = config.budget if config.budget is not None else len(calib)
    available = torch.unique(calib.step)
    if config.strategy == "all":
        steps = available
        quota = _spread(budget, len(steps))
    elif config.strategy == "naive":
        steps, quota = available[:1], [budget]
    elif config.strategy == "uniform":
        k = min(config.uniform_steps, len(available))
        steps = available[torch.linspace(0, len(available) - 1, k).round().long()]
        quota = _spread(budget, k)
    else:
        draws = torch.normal(config.ndtc_mean * n_steps, config.ndtc_std * n_steps, (budget,), generator=gen)
        drawn = draws.round().clamp(0, int(available.max())).long()
        steps, counts = torch.unique(drawn, return_counts=True)
        quota = counts.tolist()
    chosen = []
    for step, n in zip(steps.tolist(), quota, strict=True):
        pool = torch.nonzero(calib.step == step).flatten()
        if n > len(pool):
            raise FlowpressError(
                f"calibration: strategy {config.strategy} wants {n} inputs at step {step} but only {len(pool)} were "
                "captured; raise calibration.n_samples or lower calibration.budget"
            )
        chosen.append(pool[torch.randperm(len(pool), generator=gen)[:n]])
    return calib.subset(torch.cat(chosen))


def _spread(total: int, parts: int) -> list[int]:
    base, extra = divmod(total, parts)
    return [base + (i < extra) for i in range(parts)]
