"""AdaRound inside BRECQ-style blocks, as Q-Diffusion and TFMQ-DM run it: the rounding of each
block's quantized layers learned to reproduce the full-precision block output, on inputs that
come from the already quantized blocks before it (compress/w4a8.py builds the layers).

Rounding: brevitas' LearnedRound with the hard-sigmoid rectifier h(v), started at rounding to
nearest; a block is the outermost module of BLOCK_TYPES holding quantized layers (a lone layer
is its own block).  With the temporal modules quantized they are one more block, learned first
against the sum of its outputs' errors (TFMQ-DM's TIAR).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from flowpress.calibration import CalibrationSet
from flowpress.compress.config import W4A8Config
from flowpress.errors import FlowpressError
from flowpress.models import StepModel
from flowpress.sampling import batch_cond

# AdaRound's rectified sigmoid stretch and its regulariser schedule (as BRECQ / Q-Diffusion):
# temperature beta from 20 to 2, annealing after a 20% warm-up without the rounding term.
ZETA, GAMMA = 1.1, -0.1
BETA_START, BETA_END, WARMUP = 20.0, 2.0, 0.2
# Diffusers modules reconstructed as one block (their quantized layers' roundings jointly).
BLOCK_TYPES = ("ResnetBlock2D", "Attention", "BasicTransformerBlock", "Downsample2D", "Upsample2D", "PatchEmbed")


class _Stop(Exception):
    """Raised by a capture hook once the block of interest has run (skips the rest of the net)."""


def rounding_of(quant: Any) -> Any:
    """The brevitas LearnedRoundSte of a quant layer (its `value` is AdaRound's V)."""
    return quant.weight_quant.tensor_quant.int_quant.float_to_int_impl


def soft_rounding(quant: Any) -> Tensor:
    """AdaRound's h(V) in [0, 1], per weight."""
    value = rounding_of(quant).value
    return torch.clamp(torch.sigmoid(value) * (ZETA - GAMMA) + GAMMA, 0.0, 1.0)


def set_soft(layers: list[nn.Module], soft: bool) -> None:
    """Soft (training: floor + h(V)) or hardened (eval: floor + [h(V) > 0.5]) rounding."""
    for quant in layers:
        rounding_of(quant).train(soft)


@dataclass
class _Inputs:
    """Captured calls of one block: args / kwargs batched along dim 0, plus the table keys."""

    args: list[Any]
    kwargs: dict[str, Any]
    key: Tensor | None

    def take(self, index: Tensor) -> tuple[list[Any], dict[str, Any], Tensor | None]:
        def pick(value: Any) -> Any:
            return value[index] if isinstance(value, Tensor) else value

        key = None if self.key is None else self.key[index]
        return [pick(a) for a in self.args], {k: pick(v) for k, v in self.kwargs.items()}, key


def _cat(chunks: list[Any]) -> Any:
    first = chunks[0]
    return torch.cat(chunks) if isinstance(first, Tensor) and first.dim() > 0 else first


def _holder(module: nn.Module) -> Any:
    """The temporal-cache key holder of a CachedStepModel (None for other models)."""
    return getattr(module, "_key", None)


@torch.no_grad()
def _capture(model: StepModel, block: nn.Module, recon: CalibrationSet, batch_size: int, want: str) -> _Inputs | Tensor:
    """Run `model` on `recon` and keep `block`'s inputs (want='inputs') or output ('output')."""
    args_chunks: list[list[Any]] = []
    kwargs_chunks: list[dict[str, Any]] = []
    keys: list[Tensor] = []
    outputs: list[Tensor] = []
    holder = _holder(model)

    def pre_hook(_m: nn.Module, args: tuple, kwargs: dict) -> None:
        args_chunks.append([a.detach().clone() if isinstance(a, Tensor) else a for a in args])
        kwargs_chunks.append({k: v.detach().clone() if isinstance(v, Tensor) else v for k, v in kwargs.items()})
        if holder is not None and holder.key is not None:
            keys.append(holder.key.clone())
        if want == "inputs":
            raise _Stop

    def hook(_m: nn.Module, _args: tuple, output: Any) -> None:
        if not isinstance(output, Tensor):
            raise FlowpressError(f"w4a8: block {type(_m).__name__} returns {type(output).__name__}, not a tensor")
        outputs.append(output.detach().clone())
        raise _Stop

    handle = (
        block.register_forward_pre_hook(pre_hook, with_kwargs=True)
        if want == "inputs"
        else block.register_forward_hook(hook)
    )
    try:
        for x, step, cond, _k in recon.batches(batch_size):
            try:
                model.run(x, step, cond)
            except _Stop:
                pass
            finally:
                if holder is not None:
                    holder.key = None
    finally:
        handle.remove()
    if want == "output":
        return torch.cat(outputs)
    args = [_cat([c[i] for c in args_chunks]) for i in range(len(args_chunks[0]))]
    kwargs = {k: _cat([c[k] for c in kwargs_chunks]) for k in kwargs_chunks[0]}
    return _Inputs(args, kwargs, torch.cat(keys) if keys else None)


def _beta(progress: float) -> float:
    """AdaRound's linear temperature decay after the warm-up (progress in [0, 1])."""
    rel = (progress - WARMUP) / (1.0 - WARMUP)
    return BETA_END + (BETA_START - BETA_END) * max(0.0, 1.0 - rel)


def _round_loss(layers: list[nn.Module], beta: float) -> Tensor:
    return sum((1.0 - (2.0 * soft_rounding(q) - 1.0).abs().pow(beta)).sum() for q in layers)  # type: ignore[return-value]


def reconstruct(
    layers: list[nn.Module],
    loss_fn: Callable[[Tensor], Tensor],
    n: int,
    config: W4A8Config,
    seed: int = 0,
) -> tuple[float, float]:
    """Learn the roundings of `layers` (AdaRound) to minimise loss_fn(batch index) + rounding term.

    loss_fn(index) returns the reconstruction error of a batch drawn from the n captured
    inputs.  Returns (error with rounding to nearest, error with the learned rounding), both
    over all n inputs with hardened rounding — the gain this block got.  Where the hardened
    learned rounding does worse than nearest on those inputs (the soft-to-hard gap of a short
    run), the block goes back to rounding to nearest: learning never costs a block accuracy.
    """
    params: list[Tensor] = [rounding_of(q).value for q in layers]
    nearest = [p.detach().clone() for p in params]
    for p in params:
        p.requires_grad_(True)

    @torch.no_grad()
    def hard_error() -> float:
        set_soft(layers, False)
        index = torch.arange(n)
        return float(sum(loss_fn(chunk) * len(chunk) for chunk in index.split(config.recon_batch_size))) / n

    before = hard_error()
    optimizer = torch.optim.Adam(params, lr=config.recon_lr)
    gen = torch.Generator().manual_seed(seed)
    set_soft(layers, True)
    iters = config.recon_iters
    for it in range(iters):
        index = torch.randint(0, n, (min(config.recon_batch_size, n),), generator=gen)
        loss = loss_fn(index)
        progress = it / max(iters - 1, 1)
        if progress >= WARMUP:
            loss = loss + config.round_loss_weight * _round_loss(layers, _beta(progress))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        optimizer.step()
    for p in params:
        p.requires_grad_(False)
    after = hard_error()
    if after > before:
        with torch.no_grad():
            for p, init in zip(params, nearest, strict=True):
                p.copy_(init)
    return before, after


@torch.no_grad()
def call_order(model: StepModel, names: list[str], calib: CalibrationSet) -> list[str]:
    """The named modules of `model`'s denoiser in the order one forward pass first calls them."""
    modules = dict(model.model.named_modules())
    order: list[str] = []
    handles = [
        modules[n].register_forward_pre_hook(lambda _m, _a, n=n: order.append(n) if n not in order else None)
        for n in names
    ]
    try:
        x, step, cond, _ = next(calib.batches(2))
        model.run(x, step, cond)
    finally:
        for handle in handles:
            handle.remove()
    return order


def _blocks(qmodule: StepModel, quant_names: list[str], recon: CalibrationSet) -> list[tuple[str, list[str]]]:
    """(block name, its quantized layer names) in the order the forward pass first calls them.

    A block is the outermost module of a BLOCK_TYPES class holding quantized layers; any layer
    outside such a module is a block by itself.
    """
    modules = dict(qmodule.model.named_modules())
    owner: dict[str, str] = {}
    for name in quant_names:
        parts = name.split(".")
        block = name
        for i in range(1, len(parts)):
            prefix = ".".join(parts[:i])
            if type(modules[prefix]).__name__ in BLOCK_TYPES:
                block = prefix
                break
        owner[name] = block
    order = call_order(qmodule, list(dict.fromkeys(owner.values())), recon)
    return [(b, [n for n in quant_names if owner[n] == b]) for b in order]


def frozen(module: nn.Module) -> None:
    for p in module.parameters():
        p.requires_grad_(False)


def _tiar(
    qmodule: StepModel,
    fp_module: StepModel,
    temporal: list[str],
    layers: list[nn.Module],
    recon: CalibrationSet,
    config: W4A8Config,
) -> tuple[float, float]:
    """TFMQ-DM's TIAR: the temporal modules' roundings against the sum of their outputs' MSE."""

    def outputs(model: StepModel, x: Tensor, step: Tensor, cond: dict[str, Tensor]) -> list[Tensor]:
        mods = dict(model.model.named_modules())
        found: list[Tensor] = []
        handles = [mods[n].register_forward_hook(lambda _m, _a, out: found.append(out)) for n in temporal]
        try:
            model.run(x, step, cond)
        finally:
            for handle in handles:
                handle.remove()
        return found

    with torch.no_grad():
        targets = [
            torch.cat(chunk)
            for chunk in zip(
                *(outputs(fp_module, x, s, c) for x, s, c, _ in recon.batches(config.recon_batch_size)), strict=True
            )
        ]

    def loss_fn(index: Tensor) -> Tensor:
        got = outputs(qmodule, recon.x[index], recon.step[index], batch_cond(recon.cond, index))
        return sum((g - target[index]).pow(2).flatten(1).sum(1).mean() for g, target in zip(got, targets, strict=True))  # type: ignore[return-value]

    return reconstruct(layers, loss_fn, len(recon), config)


def _block_loss(q_block: nn.Module, inputs: _Inputs, target: Tensor, holder: Any) -> Callable[[Tensor], Tensor]:
    """Squared error of the quantized block's output on captured inputs `index`, summed over
    features and averaged over the batch (BRECQ's reconstruction loss)."""

    def loss_fn(index: Tensor) -> Tensor:
        args, kwargs, key = inputs.take(index)
        if holder is not None:
            holder.key = key
        try:
            out = q_block(*args, **kwargs)
        finally:
            if holder is not None:
                holder.key = None
        return (out - target[index]).pow(2).flatten(1).sum(1).mean()

    return loss_fn


def recon_set(calib: CalibrationSet, n: int, seed: int = 0) -> CalibrationSet:
    """n calibration inputs drawn without replacement (seeded), kept in step order."""
    if n >= len(calib):
        return calib
    index = torch.randperm(len(calib), generator=torch.Generator().manual_seed(seed))[:n]
    return calib.subset(index.sort().values)


def reconstruct_all(
    qmodule: StepModel,
    fp_module: StepModel,
    names: list[str],
    quant: dict[str, nn.Module],
    temporal: list[str],
    recon: CalibrationSet,
    config: W4A8Config,
) -> dict[str, tuple[float, float]]:
    """The temporal block (TIAR) when quantized, then every block in forward order."""
    gains: dict[str, tuple[float, float]] = {}
    done: set[str] = set()
    if config.recon_iters > 0:
        temporal_layers = [n for n in names if any(n == t or n.startswith(t + ".") for t in temporal)]
        if temporal_layers:  # temporal == 'int8': the temporal block first, on its own loss
            gains["temporal"] = _tiar(qmodule, fp_module, temporal, [quant[n] for n in temporal_layers], recon, config)
            done.update(temporal_layers)
        for block_name, block_layers in _blocks(qmodule, names, recon):
            todo = [n for n in block_layers if n not in done]
            if not todo:
                continue
            q_block, fp_block = qmodule.model.get_submodule(block_name), fp_module.model.get_submodule(block_name)
            inputs = _capture(qmodule, q_block, recon, config.calib_batch_size, "inputs")
            target = _capture(fp_module, fp_block, recon, config.calib_batch_size, "output")
            assert isinstance(inputs, _Inputs) and isinstance(target, Tensor)
            loss_fn = _block_loss(q_block, inputs, target, _holder(qmodule))
            gains[block_name] = reconstruct([quant[n] for n in todo], loss_fn, len(recon), config, seed=len(gains))
            done.update(todo)
    return gains
