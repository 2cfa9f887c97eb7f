"""Capture the model's own inputs along seeded full-precision sampling trajectories."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

import torch
from torch import Tensor

from flowpress.errors import FlowpressError
from flowpress.ranks import run_sharded, shard
from flowpress.sampling import ModelCall, Sampler, StepFn, batch_cond, noise_for_seeds, sample

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

    x: (K, C, H, W) inputs (batch doubled under guidance); step: (K,) index of the sampler
    evaluation each came from; cond: the conditioning inputs by name, (K, ...) each;
    times: (n_evaluations,) what each step index stands for (the sampler's model_times).
    """

    x: Tensor
    step: Tensor
    cond: dict[str, Tensor]
    times: Tensor

    def subset(self, index: Tensor) -> CalibrationSet:
        return CalibrationSet(self.x[index], self.step[index], batch_cond(self.cond, index), self.times)

    def __len__(self) -> int:
        return int(self.x.shape[0])

    def batches(self, batch_size: int) -> Iterator[tuple[Tensor, Tensor, dict[str, Tensor], int]]:
        """(x, step, cond, k) batches, step by step: every row of a batch is at step k."""
        for k in torch.unique(self.step).tolist():
            index = torch.nonzero(self.step == k).flatten()
            for chunk in index.split(batch_size):
                yield self.x[chunk], self.step[chunk], batch_cond(self.cond, chunk), int(k)

    def feeds(self, n: int) -> tuple[Tensor, Tensor, dict[str, Tensor]]:
        """n inputs spread evenly over the set (over all steps): (x, step, cond)."""
        index = torch.linspace(0, len(self) - 1, n).long()
        return self.x[index], self.step[index], batch_cond(self.cond, index)

    def save(self, path: str | Path) -> Path:
        from safetensors.torch import save_file

        tensors = {"x": self.x, "step": self.step, "times": self.times}
        tensors |= {f"cond.{name}": value for name, value in self.cond.items()}
        tensors = {k: v.contiguous() for k, v in tensors.items()}
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

        try:
            tensors = load_file(str(path))
            cond = {k.removeprefix("cond."): v for k, v in tensors.items() if k.startswith("cond.")}
            return cls(tensors["x"], tensors["step"], cond, tensors["times"])
        except Exception as err:  # a truncated or foreign file: safetensors' own error, or a missing key
            reason = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
            raise FlowpressError(f"{path}: not a calibration set ({reason}); rerun `make quantize`") from None


def capture(
    model: StepFn,
    sampler: Sampler,
    shape: tuple[int, ...],
    cond: dict[str, Tensor],
    config: CalibrationConfig,
    guidance: float = 1.0,
    null: dict[str, Tensor] | None = None,
    progress: bool = False,
) -> CalibrationSet:
    """Run the FP sampler from seeded noise and keep what the network saw at every step.

    cond: the conditioning of the config.n_samples trajectories, (n_samples, ...) per name;
    progress: a bar over the model calls (trajectories x steps), with its ETA.  Under torchrun each
    rank samples its share of the batches of config.batch_size seeds; every rank gets the whole set."""
    from tqdm import tqdm

    seeds = list(range(config.seed_base, config.seed_base + config.n_samples))
    starts = range(0, config.n_samples, config.batch_size)
    mine = len(shard(starts))
    bar = tqdm(total=mine * sampler.n_steps, desc="FP trajectories", disable=not progress or mine == 0)

    def trajectories(start: int) -> tuple[Tensor, Tensor, dict[str, Tensor]]:
        """What the network saw along one batch of seeds, call after call."""
        calls: list[ModelCall] = []

        def keep(call: ModelCall) -> None:
            calls.append(call)
            bar.update()

        chunk = seeds[start : start + config.batch_size]
        rows = batch_cond(cond, slice(start, start + len(chunk)))
        sample(sampler, model, noise_for_seeds(chunk, shape), rows, guidance, null, keep, chunk)
        for c in calls:
            if not (bool(torch.isfinite(c.model_out).all()) and bool(torch.isfinite(c.model_x).all())):
                raise FlowpressError(
                    f"calibration: the FP model's inputs or outputs hold NaN / Inf at sampler step {c.step}; check "
                    "the model's weights and the recipe's sampling settings before quantizing"
                )
        x = torch.cat([c.model_x for c in calls])
        step = torch.cat([c.model_step for c in calls])
        return x, step, {name: torch.cat([c.model_cond[name] for c in calls]) for name in cond}

    with bar:
        batches = run_sharded(starts, trajectories)  # the batches of every rank, in seed order
    x = torch.cat([b[0] for b in batches])
    step = torch.cat([b[1] for b in batches])
    cond_out = {name: torch.cat([b[2][name] for b in batches]) for name in cond}
    full = CalibrationSet(x, step, cond_out, sampler.model_times)
    return select(full, config, sampler.n_steps)


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
