"""Temporal-feature discovery and cache (TFMQ-DM's finite-set insight, done exactly).

On a fixed schedule the network sees finitely many (t, class) pairs, so every module whose
output depends only on them (time projection, time-embedding MLP, each block's time
projection, DiT's adaLN timestep/label embeddings) can be computed once in full precision and
gathered from a table by key = step * n_cond + class.  The MLPs then leave the engine
entirely and carry no quantization error.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass

import torch
from torch import Tensor, nn

from flowpress.errors import FlowpressError
from flowpress.models import DiffusersVelocity, StepModel
from flowpress.sampling import Sampler


class _Key:
    """Shared holder of the current (B,) int64 table key, set by CachedStepModel.evaluate."""

    key: Tensor | None = None


class TableLookup(nn.Module):
    """Replaces a temporal module: ignores its inputs, returns table[key] ((B, ...) features)."""

    table: Tensor

    def __init__(self, table: Tensor, holder: _Key, source: str):
        super().__init__()
        self.register_buffer("table", table)
        self.holder = holder
        self.source = source

    def forward(self, *args: object, **kwargs: object) -> Tensor:
        if self.holder.key is None:
            raise FlowpressError(f"temporal table {self.source}: called outside CachedStepModel.evaluate")
        features = self.table[self.holder.key]
        return features.float() if features.dtype != torch.float32 else features  # float16 tables: see half_tables


def _outputs(value: object) -> list[Tensor]:
    if isinstance(value, Tensor):
        return [value]
    if isinstance(value, (tuple, list)):
        return [v for item in value for v in _outputs(item)]
    return []


@torch.no_grad()
def discover_temporal(model: DiffusersVelocity, times: Tensor) -> list[str]:
    """Names of the outermost modules whose outputs depend only on (t, class), not on x.

    Runs the model twice with different x and the same (t, class) and keeps every module whose
    every call returned identical tensors; of those, the ones whose parent is not temporal.
    """
    names = {module: name for name, module in model.named_modules() if name}
    calls: dict[str, list[list[list[Tensor]]]] = {}

    current = {"run": 0}

    def hook(module: nn.Module, _args: object, output: object) -> None:
        calls.setdefault(names[module], [[], []])[current["run"]].append(_outputs(output))

    handles = [m.register_forward_hook(hook) for m in names]
    n = 4
    t = times[torch.arange(n) % len(times)]
    cond = model.class_condition(torch.arange(n) % model.num_classes if model.num_classes else None)
    gen = torch.Generator().manual_seed(0)
    try:
        for run in (0, 1):
            current["run"] = run
            model(torch.randn(n, *model.sample_shape, generator=gen), t, cond)
    finally:
        for handle in handles:
            handle.remove()

    def same(a: list[list[Tensor]], b: list[list[Tensor]]) -> bool:
        return len(a) == len(b) > 0 and all(
            len(x) == len(y) > 0 and all(u.shape == v.shape and torch.equal(u, v) for u, v in zip(x, y, strict=True))
            for x, y in zip(a, b, strict=True)
        )

    temporal = {name for name, (a, b) in calls.items() if same(a, b)}
    return sorted(name for name in temporal if name.rpartition(".")[0] not in temporal)


@dataclass(frozen=True)
class TemporalTable:
    """times: (n,) the sampler's model times; n_cond: classes incl. null (1 if unconditional);
    tables[name]: (n * n_cond, ...) output of module `name` for key step * n_cond + class."""

    times: Tensor
    n_cond: int
    tables: dict[str, Tensor]


@torch.no_grad()
def build_table(model: DiffusersVelocity, times: Tensor, names: list[str]) -> TemporalTable:
    """Run the FP model once on every (step, class) pair and keep the temporal modules' outputs."""
    n_cond = (model.num_classes + 1) if model.num_classes else 1
    steps = torch.arange(len(times)).repeat_interleave(n_cond)
    cond = model.class_condition(torch.arange(n_cond).repeat(len(times)) if model.num_classes else None)
    modules = dict(model.named_modules())
    captured: dict[str, Tensor] = {}
    handles = []
    for name in names:

        def hook(_m: nn.Module, _a: object, output: object, name: str = name) -> None:
            if name not in captured:
                if not isinstance(output, Tensor):
                    raise FlowpressError(f"temporal cache: module {name} returns {type(output).__name__}, not a tensor")
                captured[name] = output.detach().clone()

        handles.append(modules[name].register_forward_hook(hook))
    try:
        model(torch.zeros(len(steps), *model.sample_shape), times[steps], cond)
    finally:
        for handle in handles:
            handle.remove()
    return TemporalTable(times.clone(), n_cond, captured)


def half_tables(model: nn.Module) -> None:
    """Store every TableLookup's table in float16 (half the engine bytes); lookups still return
    float32, so the graph gathers float16 rows and casts them."""
    for module in model.modules():
        if isinstance(module, TableLookup):
            module.table = module.table.half()


class CachedStepModel(StepModel):
    """A step model over a copy of `model` whose temporal modules are table lookups keyed by
    (step, class): the exported graph gathers from the tables, no time MLP is left in it."""

    def __init__(self, model: DiffusersVelocity, sampler: Sampler, names: list[str] | None = None):
        times = sampler.model_times
        names = discover_temporal(model, times) if names is None else names
        if not names:
            raise FlowpressError(
                "temporal cache: no module depends only on (t, class); set quantize.temporal to 'int8'"
            )
        table = build_table(model, times, names)
        super().__init__(copy.deepcopy(model), sampler)
        self.table = table
        self.temporal_modules = names
        self._key = _Key()
        for name in names:
            parent_name, _, child = name.rpartition(".")
            parent = self.model.get_submodule(parent_name) if parent_name else self.model
            setattr(parent, child, TableLookup(table.tables[name], self._key, name))

    def evaluate(self, x: Tensor, step: Tensor, cond: dict[str, Tensor]) -> Tensor:
        labels = cond.get("class_labels")
        self._key.key = step if labels is None else step * self.table.n_cond + labels
        try:
            return self.model(x, self.times[step], cond)
        finally:
            self._key.key = None
