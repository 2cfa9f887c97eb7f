"""Whole sampling loops timed interleaved across a model's variants (per-step timing is
flowpress.validation.timing.interleaved_step_times)."""

from __future__ import annotations

import time

import numpy as np
import torch

from benchmarks.bench.variants import Built
from flowpress.sampling import Cond, sample
from flowpress.validation.timing import ConditionFn


def model_batch(batch: int, guidance: float, cond: Cond) -> int:
    """Rows the network sees per sampler step: doubled under classifier-free guidance."""
    return batch * (2 if guidance != 1.0 and cond else 1)


def interleaved_loop_seconds(
    built: dict[str, Built],
    batch: int,
    shape: tuple[int, ...],
    condition: ConditionFn,
    guidance: float,
    null: Cond,
    loops: int,
    settle: int = 0,
) -> dict[str, float]:
    """Median seconds of one whole sampling loop per engine (its own steps and guidance), one
    loop of each engine per round after an untimed round; `settle` untimed forwards at the
    loop's batch warm an engine before each of its loops."""
    noise = torch.randn(batch, *shape, generator=torch.Generator().manual_seed(0))
    cond = condition(batch)
    times: dict[str, list[float]] = {name: [] for name in built}
    with torch.no_grad():
        for i in range(loops + 1):
            for name, b in built.items():
                own_guidance = guidance if b.guidance is None else b.guidance
                doubled = model_batch(batch, own_guidance, cond) // batch
                for _ in range(settle):
                    b.engine(
                        noise.repeat(doubled, *([1] * len(shape))),
                        torch.zeros(batch * doubled, dtype=torch.int64),
                        {k: v.repeat(doubled, *([1] * (v.dim() - 1))) for k, v in cond.items()},
                    )
                start = time.perf_counter()
                sample(b.engine.schedule, b.engine, noise, cond, own_guidance, null)
                if i:
                    times[name].append(time.perf_counter() - start)
    return {name: float(np.median(t)) for name, t in times.items()}
