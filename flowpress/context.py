"""What a run needs once: the recipe, the model, its sampler, conditioning and evaluator, the host."""

from __future__ import annotations

import platform
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path

from flowpress.engines import CompareConfig, Evaluator
from flowpress.engines.isa import HostIsa, host_isa
from flowpress.errors import FlowpressError
from flowpress.evaluator import load_evaluator
from flowpress.models import DiffusersVelocity, StepModel, load_model
from flowpress.recipe import Recipe
from flowpress.sampling import Cond, Schedule

PACKAGES = (
    "torch",
    "onnx",
    "onnxruntime",
    "onnxscript",
    "nvidia-modelopt",
    "brevitas",
    "diffusers",
    "openvino",
    "nncf",
    "numpy",
)


class Timer:
    """Wall seconds per named stage."""

    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}

    @contextmanager
    def stage(self, name: str) -> Iterator[None]:
        start = time.perf_counter()
        yield
        self.seconds[name] = round(time.perf_counter() - start, 3)


def versions() -> dict[str, str]:
    found = {"python": platform.python_version()}
    for name in PACKAGES:
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            found[name] = "missing"
    return found


@dataclass
class RunContext:
    """Built once per run: the model and its FP step model on the recipe's sampler (the schedule
    is built here and nowhere else), the evaluator, the host."""

    recipe: Recipe
    model: DiffusersVelocity
    sampler: Schedule
    fp: StepModel
    evaluator: Evaluator | None
    host: HostIsa
    timer: Timer = field(default_factory=Timer)

    @classmethod
    def load(cls, recipe: Recipe) -> RunContext:
        model = load_model(Path(recipe.model.path), recipe.model.time_scale)
        sampler = recipe.sampling.schedule()
        evaluator = load_evaluator(recipe.evaluator)
        measured = evaluator.metrics if evaluator is not None else {}
        unknown = sorted(set(recipe.gate.metrics) - set(measured))
        if unknown:
            raise FlowpressError(
                f"{recipe.name}: gate.metrics.{unknown[0]}: the recipe's evaluator measures "
                f"{sorted(measured) or 'nothing (no evaluator)'}; bound one of those or remove it"
            )
        return cls(recipe, model, sampler, StepModel(model, sampler).eval(), evaluator, host_isa())

    @property
    def shape(self) -> tuple[int, int, int]:
        return self.model.sample_shape

    @property
    def null(self) -> Cond:
        return self.model.null_condition()

    def cond(self, n: int, offset: int = 0) -> Cond:
        """The conditioning of samples offset.. offset+n-1: classes cycling (sample i draws class i % classes)."""
        return self.model.cycling_condition(n, offset)

    def condition(self, batch: int) -> Cond:
        """Conditioning of a timing batch (class 0)."""
        return self.model.example_condition(batch)

    @property
    def compare_config(self) -> CompareConfig:
        section = self.recipe.compare
        return CompareConfig(
            section.n_samples, section.seed_base, section.batch_size, self.recipe.sampling.guidance, self.recipe.gate
        )
