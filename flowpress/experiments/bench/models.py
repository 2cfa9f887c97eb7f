"""The networks the bench measures: a recipe's model or a seeded random DiT; their FLOPs."""

from __future__ import annotations

import torch

from flowpress.experiments.bench.config import BenchModel, RandomDit
from flowpress.models import DiffusersDenoiser, DiTSpec, build_dit, load_model
from flowpress.recipe import Recipe


def build_random_dit(spec: RandomDit) -> DiffusersDenoiser:
    """A DiT of `spec`'s size with weights drawn from torch's generator seeded by spec.seed."""
    torch.manual_seed(spec.seed)
    dit = DiTSpec(layers=spec.layers, heads=spec.heads, head_dim=spec.head_dim, patch_size=spec.patch_size)
    shape = (spec.channels, spec.sample_size, spec.sample_size)
    return build_dit(dit, shape, spec.num_classes, 1000.0).eval()


def load_bench_model(spec: BenchModel, recipe: Recipe) -> DiffusersDenoiser:
    """The FP model of one bench entry: its random DiT, else the recipe's model."""
    model = (
        build_random_dit(spec.random_dit) if spec.random_dit else load_model(recipe.model.path, recipe.model.time_scale)
    )
    return model.eval()


def forward_flops(model: DiffusersDenoiser, batch: int) -> float:
    """Multiply-add FLOPs (2 per MAC) of one FP forward at `batch`, counted by torch."""
    from torch.utils.flop_counter import FlopCounterMode

    x = torch.zeros(batch, *model.sample_shape)
    t = torch.full((batch,), 0.5)
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model(x, t, model.example_condition(batch))
    return float(counter.get_total_flops())
