"""The networks the bench measures: a recipe's model or a seeded random DiT; their FLOPs."""

from __future__ import annotations

from typing import Any

import torch

from benchmarks.bench.config import BenchModel, RandomDit
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


def forward_flops(model: DiffusersDenoiser, batch: int) -> dict[str, float]:
    """Multiply-add FLOPs (2 per MAC) of one FP forward at `batch`, counted by torch: "total", and
    "linear", those of the layers with weights (Linear / Conv GEMMs; the rest is attention)."""
    from torch.utils.flop_counter import FlopCounterMode, sdpa_flop_count

    def cpu_attention(query: Any, key: Any, value: Any, *args: Any, out_shape: Any = None, **kwargs: Any) -> int:
        return int(sdpa_flop_count(query, key, value))

    # torch's counter has no entry for the CPU attention kernel: without one a DiT's attention
    # counted 0 FLOPs (8.1 of 80.8 GFLOP on the bench's speed-dit at batch 8)
    mapping = {torch.ops.aten._scaled_dot_product_flash_attention_for_cpu: cpu_attention}
    x = torch.zeros(batch, *model.sample_shape)
    t = torch.full((batch,), 0.5)
    with FlopCounterMode(display=False, custom_mapping=mapping) as counter, torch.no_grad():
        model(x, t, model.example_condition(batch))
    per_op = counter.get_flop_counts().get("Global", {})
    linear = sum(n for op, n in per_op.items() if str(op).split(".")[1] in WEIGHT_GEMMS)
    return {"total": float(counter.get_total_flops()), "linear": float(linear)}


# aten ops that multiply by a layer's weight (nn.Linear, nn.Conv*): FlopCounterMode's names
WEIGHT_GEMMS = ("addmm", "mm", "convolution", "_convolution")
