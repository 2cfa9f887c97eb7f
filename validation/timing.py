"""Wall time of engine forwards: one engine alone, or several interleaved so that a slow spell
of a shared host lands on all of them."""

from __future__ import annotations

import time
from collections.abc import Callable

import numpy as np
import torch

from flowpress.engines.base import Engine
from flowpress.sampling import Cond

ConditionFn = Callable[[int], Cond]  # batch -> conditioning inputs of that many rows


def step_times_ms(
    engine: Engine, batch: int, shape: tuple[int, ...], condition: ConditionFn, runs: int, warmup: int
) -> np.ndarray:
    """Wall ms of `runs` engine forwards at `batch` after `warmup`, cycling through the steps."""
    x = torch.randn(batch, *shape, generator=torch.Generator().manual_seed(0))
    cond = condition(batch)
    times = []
    with torch.no_grad():
        for i in range(warmup + runs):
            step = torch.full((batch,), i % engine.schedule.n_steps, dtype=torch.int64)
            start = time.perf_counter()
            engine(x, step, cond)
            if i >= warmup:
                times.append((time.perf_counter() - start) * 1000)
    return np.array(times)


def median_step_ms(
    engine: Engine, batch: int, shape: tuple[int, ...], condition: ConditionFn, runs: int = 20, warmup: int = 3
) -> float:
    """Median wall time of one engine forward at `batch` over `runs` timed calls after warm-up."""
    return float(np.median(step_times_ms(engine, batch, shape, condition, runs, warmup)))


def interleaved_step_times(
    engines: dict[str, Engine],
    batch: int,
    shape: tuple[int, ...],
    condition: ConditionFn,
    runs: int,
    warmup: int,
    block: int,
    settle: int,
) -> dict[str, np.ndarray]:
    """Wall ms of `runs` forwards per engine at `batch`, timed in rounds: each round gives every
    engine `settle` untimed forwards and then `block` timed ones; the engine order rotates each
    round.  After a switch of runtime an engine's first forwards run cold, so a round must be
    long enough to be measured warm (bench.md / results/ show the figures)."""
    x = torch.randn(batch, *shape, generator=torch.Generator().manual_seed(0))
    cond = condition(batch)
    names = list(engines)
    times: dict[str, list[float]] = {name: [] for name in names}
    counts = dict.fromkeys(names, 0)

    def forward(name: str) -> float:
        engine = engines[name]
        step = torch.full((batch,), counts[name] % engine.schedule.n_steps, dtype=torch.int64)
        counts[name] += 1
        start = time.perf_counter()
        engine(x, step, cond)
        return (time.perf_counter() - start) * 1000

    with torch.no_grad():
        for name in names:
            for _ in range(warmup):
                forward(name)
        rounds = -(-runs // block)
        for r in range(rounds):
            for name in names[r % len(names) :] + names[: r % len(names)]:
                for _ in range(settle):
                    forward(name)
                times[name] += [forward(name) for _ in range(min(block, runs - len(times[name])))]
    return {name: np.array(t) for name, t in times.items()}
