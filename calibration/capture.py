"""Capture the model's own inputs along seeded full-precision sampling trajectories."""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from sampling import FlowpressError, ModelCall, Schedule, VelocityFn, noise_for_seeds, sample


@dataclass(frozen=True)
class CalibrationConfig:
    """n_samples trajectories from seeds seed_base, seed_base + 1, ...; labels cycle over classes."""

    n_samples: int = 64
    seed_base: int = 100_000
    batch_size: int = 64

    def __post_init__(self) -> None:
        if self.n_samples < 1 or self.batch_size < 1:
            raise FlowpressError(
                f"calibration: n_samples and batch_size must be >= 1, got {self.n_samples}, {self.batch_size}"
            )


@dataclass(frozen=True)
class CalibrationSet:
    """Every network input seen along the FP trajectories, flat.

    x: (K, C, H, W) inputs (batch doubled under guidance); t: (K,) their times;
    cond: (K,) int64 or None; step: (K,) grid index of the sampler step each came from.
    """

    x: Tensor
    t: Tensor
    cond: Tensor | None
    step: Tensor

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

        tensors = {"x": self.x.contiguous(), "t": self.t.contiguous(), "step": self.step.contiguous()}
        if self.cond is not None:
            tensors["cond"] = self.cond.contiguous()
        save_file(tensors, str(path))
        return Path(path)

    @classmethod
    def load(cls, path: str | Path) -> CalibrationSet:
        from safetensors.torch import load_file

        tensors = load_file(str(path))
        return cls(tensors["x"], tensors["t"], tensors.get("cond"), tensors["step"])


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
    x = torch.cat([c.model_x for c in calls])
    t = torch.cat([c.model_t for c in calls])
    step = torch.cat([torch.full((c.model_x.shape[0],), c.step, dtype=torch.int64) for c in calls])
    cond_out = None if labels is None else torch.cat([c.model_cond for c in calls])  # type: ignore[misc]
    return CalibrationSet(x, t, cond_out, step)
