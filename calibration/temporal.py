"""Temporal-feature discovery and cache (TFMQ-DM's finite-set insight, done exactly).

On a fixed schedule the network sees finitely many (t, class) pairs, so every module whose
output depends only on them (time projection, time-embedding MLP, each block's time
projection, DiT's adaLN timestep/label embeddings) can be computed once in full precision and
gathered from a table by key = step * n_cond + class (step alone without classes; a module that
reads text embeddings is never temporal).  The MLPs then leave the engine entirely and carry no
quantization error.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import Tensor, nn

from flowpress.errors import FlowpressError
from flowpress.models import DiffusersDenoiser, StepModel, copy_sharing_weights
from flowpress.sampling import Sampler


class _Key:
    """Shared holder of the current (B,) int64 table key, set by CachedStepModel.evaluate."""

    key: Tensor | None = None


class TableLookup(nn.Module):
    """Replaces a temporal module: ignores its inputs, returns table[key] ((B, ...) features), or
    a tuple of such when the module returned a tuple (PixArt's adaLN-single gives two)."""

    def __init__(self, table: Tensor | tuple[Tensor, ...], holder: _Key, source: str):
        super().__init__()
        self.parts = len(table) if isinstance(table, tuple) else 0
        for i, part in enumerate(table if isinstance(table, tuple) else (table,)):
            self.register_buffer(f"table_{i}" if self.parts else "table", part)
        self.holder = holder
        self.source = source

    def tables(self) -> list[Tensor]:
        names = [f"table_{i}" for i in range(self.parts)] if self.parts else ["table"]
        return [getattr(self, name) for name in names]

    def forward(self, *args: object, **kwargs: object) -> Tensor | tuple[Tensor, ...]:
        if self.holder.key is None:
            raise FlowpressError(f"temporal table {self.source}: called outside CachedStepModel.evaluate")
        found = []
        for table in self.tables():
            features = table[self.holder.key]
            found.append(features.float() if features.dtype != torch.float32 else features)  # float16: half_tables
        return tuple(found) if self.parts else found[0]


def _outputs(value: object) -> list[Tensor]:
    if isinstance(value, Tensor):
        return [value]
    if isinstance(value, (tuple, list)):
        return [v for item in value for v in _outputs(item)]
    return []


def _probe_conditions(model: DiffusersDenoiser, n: int) -> tuple[dict[str, Tensor], dict[str, Tensor]]:
    """Two conditionings of n rows: the same class labels, different embeddings (seeded), so that a
    module reading the text is not taken for a temporal one."""
    gen = torch.Generator().manual_seed(1)
    runs: list[dict[str, Tensor]] = [{}, {}]
    for name, value in model.example_condition(n).items():
        for cond in runs:
            if name == "class_labels":
                cond[name] = torch.arange(n) % (model.num_classes or 1)
            elif value.is_floating_point():
                cond[name] = torch.randn(value.shape, generator=gen)
            else:
                cond[name] = torch.ones_like(value)  # attention masks: every token
    return runs[0], runs[1]


@torch.no_grad()
def discover_temporal(model: DiffusersDenoiser, times: Tensor) -> list[str]:
    """Names of the outermost modules whose outputs depend only on (t, class), not on x or on any
    other conditioning (text embeddings).

    Runs the model twice with different x (and embeddings) and the same (t, class) and keeps every
    module whose every call returned identical tensors; of those, the ones whose parent is not temporal.
    """
    names = {module: name for name, module in model.named_modules() if name}
    calls: dict[str, list[list[list[Tensor]]]] = {}

    current = {"run": 0}

    def hook(module: nn.Module, _args: object, output: object) -> None:
        calls.setdefault(names[module], [[], []])[current["run"]].append(_outputs(output))

    handles = [m.register_forward_hook(hook) for m in names]
    n = 4
    t = times[torch.arange(n) % len(times)]
    conds = _probe_conditions(model, n)
    gen = torch.Generator().manual_seed(0)
    try:
        for run in (0, 1):
            current["run"] = run
            model(torch.randn(n, *model.sample_shape, generator=gen), t, conds[run])
    finally:
        for handle in handles:
            handle.remove()

    def same(a: list[list[Tensor]], b: list[list[Tensor]]) -> bool:
        return len(a) == len(b) > 0 and all(
            len(x) == len(y) > 0 and all(u.shape == v.shape and torch.equal(u, v) for u, v in zip(x, y, strict=True))
            for x, y in zip(a, b, strict=True)
        )

    def per_sample(a: list[list[Tensor]]) -> bool:  # a table is gathered by row: (B, ...) outputs only
        return all(u.dim() > 0 and u.shape[0] == n for x in a for u in x)

    # rotary position tables (Flux's pos_embed) repeat for every row and every step: not per sample,
    # they stay in the graph, where the exporter folds them into constants
    temporal = {name for name, (a, b) in calls.items() if same(a, b) and per_sample(a)}
    return sorted(name for name in temporal if name.rpartition(".")[0] not in temporal)


@dataclass(frozen=True)
class TemporalTable:
    """times: (n,) the sampler's model times; n_cond: classes incl. null (1 if unconditional);
    tables[name]: (n * n_cond, ...) output of module `name` for key step * n_cond + class."""

    times: Tensor
    n_cond: int
    tables: dict[str, Tensor | tuple[Tensor, ...]]


TABLE_LIMIT_BYTES = 512 << 20  # beyond this the tables outweigh what they save: keep the modules in the graph
TABLE_CHUNK = 128  # (step, class) rows per forward while building


@torch.no_grad()
def build_table(model: DiffusersDenoiser, times: Tensor, names: list[str]) -> TemporalTable:
    """Run the FP model on every (step, class) pair, TABLE_CHUNK rows at a time, and keep the
    temporal modules' outputs; tables past TABLE_LIMIT_BYTES are refused before they are built."""
    n_cond = (model.num_classes + 1) if model.num_classes else 1
    steps = torch.arange(len(times)).repeat_interleave(n_cond)
    cond = model.example_condition(len(steps))  # the temporal modules ignore all but (t, class)
    if model.num_classes:
        cond["class_labels"] = torch.arange(n_cond).repeat(len(times))
    modules = dict(model.named_modules())
    chunks: dict[str, list[tuple[Tensor, ...]]] = {name: [] for name in names}
    tupled: dict[str, bool] = {}
    handles = []
    for name in names:

        def hook(_m: nn.Module, _a: object, output: object, name: str = name) -> None:
            if isinstance(output, tuple) and output and all(isinstance(o, Tensor) for o in output):
                parts, tupled[name] = tuple(o.detach().clone() for o in output), True
            elif isinstance(output, Tensor):
                parts, tupled[name] = (output.detach().clone(),), False
            else:
                raise FlowpressError(
                    f"temporal cache: module {name} returns {type(output).__name__}, not tensors; set quantize.temporal to 'fp'"
                )
            if len(chunks[name]) < chunk_index[0] + 1:
                chunks[name].append(parts)

        handles.append(modules[name].register_forward_hook(hook))
    chunk_index = [0]
    try:
        for index, start in enumerate(range(0, len(steps), TABLE_CHUNK)):
            chunk_index[0] = index
            rows = slice(start, start + TABLE_CHUNK)
            model(
                torch.zeros(len(steps[rows]), *model.sample_shape),
                times[steps[rows]],
                {k: v[rows] for k, v in cond.items()},
            )
            if index == 0:
                per_row = sum(p.element_size() * p[0].numel() for c in chunks.values() for p in c[0])
                if per_row * len(steps) > TABLE_LIMIT_BYTES:
                    raise FlowpressError(
                        f"temporal cache: the tables would take {per_row * len(steps) / 2**20:.0f} MB ({len(times)} steps x "
                        f"{n_cond} classes); set quantize.temporal: fp (the time modules stay in the graph, unquantized)"
                    )
    finally:
        for handle in handles:
            handle.remove()
    captured: dict[str, Tensor | tuple[Tensor, ...]] = {}
    for name, parts in chunks.items():
        joined = tuple(torch.cat([c[i] for c in parts]) for i in range(len(parts[0])))
        captured[name] = joined if tupled[name] else joined[0]
    return TemporalTable(times.clone(), n_cond, captured)


def half_tables(model: nn.Module) -> None:
    """Store every TableLookup's tables in float16 (half the engine bytes); lookups still return
    float32, so the graph gathers float16 rows and casts them."""
    for module in model.modules():
        if isinstance(module, TableLookup):
            for name, buffer in list(module.named_buffers(recurse=False)):
                setattr(module, name, buffer.half())


class CachedStepModel(StepModel):
    """A step model over a copy of `model` whose temporal modules are table lookups keyed by
    (step, class): the exported graph gathers from the tables, no time MLP is left in it."""

    def __init__(self, model: DiffusersDenoiser, sampler: Sampler, names: list[str] | None = None):
        times = sampler.model_times
        names = discover_temporal(model, times) if names is None else names
        if not names:
            raise FlowpressError(
                "temporal cache: no module depends only on (t, class); set quantize.temporal to 'int8'"
            )
        table = build_table(model, times, names)
        super().__init__(copy_sharing_weights(model), sampler)
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
