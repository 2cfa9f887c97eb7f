"""W4A8 with brevitas: 4-bit weights (per output channel or per group), 8-bit activations,
weight rounding learned by block reconstruction (AdaRound inside BRECQ-style blocks, as
Q-Diffusion and TFMQ-DM run it), calibrated on the trajectory set.

Weights: symmetric narrow int4 ([-7, 7]) with a float scale from the abs-max of each output
channel (or of each group of `weight_group_size` consecutive input channels at one output
channel and kernel position).  Rounding: brevitas' LearnedRound with the hard-sigmoid
rectifier h(v) (AdaRound), initialised so that h(v) is the fractional part of w / scale —
i.e. rounding to nearest when hardened — then optimised block by block to reproduce the
full-precision block output on inputs that come from the already quantized blocks before it.
Activations: the input of every Conv2d / Linear, per tensor, signed int8, with the amax of
W4A8Config.amax computed on the FP model (the same statistics the int8 path uses).

When the temporal modules stay in the graph quantized (W4A8Config.temporal == 'int8') they
form one more block, reconstructed first against the sum of its outputs' errors (TFMQ-DM's
TIAR); with 'cache' they are FP tables and with 'fp' they are not quantized.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from flowpress.calibration import CalibrationSet
from flowpress.compress.amax import activation_amax
from flowpress.compress.config import W4A8Config
from flowpress.compress.model import LayerQuant, QuantizedModel, excluded_patterns, is_excluded
from flowpress.errors import FlowpressError
from flowpress.models import StepModel
from flowpress.sampling import batch_cond

WEIGHT_BITS = 4
WEIGHT_QMAX = 2 ** (WEIGHT_BITS - 1) - 1  # narrow range: [-7, 7]
# AdaRound's rectified sigmoid stretch and its regulariser schedule (as BRECQ / Q-Diffusion):
# temperature beta from 20 to 2, annealing after a 20% warm-up without the rounding term.
ZETA, GAMMA = 1.1, -0.1
BETA_START, BETA_END, WARMUP = 20.0, 2.0, 0.2
# Diffusers modules reconstructed as one block (their quantized layers' roundings jointly).
BLOCK_TYPES = ("ResnetBlock2D", "Attention", "BasicTransformerBlock", "Downsample2D", "Upsample2D", "PatchEmbed")


class _Stop(Exception):
    """Raised by a capture hook once the block of interest has run (skips the rest of the net)."""


def _quantizers(group_size: int | None, bits: int = WEIGHT_BITS) -> tuple[type, type]:
    """(weight quantizer, activation quantizer) brevitas injector classes; `bits`-bit weights."""
    from brevitas.inject.enum import FloatToIntImplType, LearnedRoundImplType, ScalingImplType, ScalingPerOutputType
    from brevitas.proxy.groupwise_int_parameter_quant import GroupwiseWeightQuantProxyFromInjector
    from brevitas.quant.scaled_int import Int8ActPerTensorFloat, Int8WeightPerChannelFloat

    class Int4WeightPerChannelLearnedRound(Int8WeightPerChannelFloat):
        bit_width = bits
        float_to_int_impl_type = FloatToIntImplType.LEARNED_ROUND
        learned_round_impl_type = LearnedRoundImplType.HARD_SIGMOID
        learned_round_zeta = ZETA
        learned_round_gamma = GAMMA

    weight_quant: type = Int4WeightPerChannelLearnedRound
    if group_size is not None:

        class Int4WeightPerGroupLearnedRound(Int4WeightPerChannelLearnedRound):
            proxy_class = GroupwiseWeightQuantProxyFromInjector
            scaling_per_output_type = ScalingPerOutputType.GROUP

        weight_quant = Int4WeightPerGroupLearnedRound

    class Int8ActPerTensorConst(Int8ActPerTensorFloat):
        scaling_impl_type = ScalingImplType.CONST  # amax set per layer from our calibration

    return weight_quant, Int8ActPerTensorConst


def _quant_layer(layer: Any, input_amax: float, group_size: int | None, bits: int = WEIGHT_BITS) -> nn.Module:
    """A brevitas QuantConv2d / QuantLinear with `layer`'s `bits`-bit weights; input scale amax / 127.

    A layer whose input channels are not a multiple of group_size (a 1-channel conv_in), or
    whose weights are not 4-bit, is quantized per output channel instead; `quant.group_size`
    and `quant.weight_bits` record which.
    """
    from brevitas.nn import QuantConv2d, QuantLinear

    in_channels = layer.weight.shape[1]
    if group_size is not None and (in_channels % group_size != 0 or bits != WEIGHT_BITS):
        group_size = None
    weight_quant, act_quant = _quantizers(group_size, bits)
    # brevitas' signed 8-bit activation scale is threshold / 128; ours (and the exporter's) is amax / 127
    act = {"input_quant": act_quant, "input_scaling_init": max(input_amax, 1e-12) * 128 / 127}
    if group_size is not None:
        act["weight_group_size"] = group_size
    if isinstance(layer, nn.Conv2d):
        if layer.groups != 1 or layer.padding_mode != "zeros":
            raise FlowpressError(f"w4a8: grouped or non-zero-padded Conv2d is not supported ({layer})")
        quant: Any = QuantConv2d(
            layer.in_channels,
            layer.out_channels,
            layer.kernel_size,
            layer.stride,
            layer.padding,  # type: ignore[arg-type]
            layer.dilation,
            bias=layer.bias is not None,
            weight_quant=weight_quant,
            **act,
        )
    else:
        assert isinstance(layer, nn.Linear)
        quant = QuantLinear(
            layer.in_features, layer.out_features, bias=layer.bias is not None, weight_quant=weight_quant, **act
        )
    with torch.no_grad():
        quant.weight.copy_(layer.weight)
        if layer.bias is not None:
            quant.bias.copy_(layer.bias)
    quant.group_size = group_size
    quant.weight_bits = bits
    _init_rounding(quant)
    return quant.eval()


def _rounding(quant: Any) -> Any:
    """The brevitas LearnedRoundSte of a quant layer (its `value` is AdaRound's V)."""
    return quant.weight_quant.tensor_quant.int_quant.float_to_int_impl


def _scale_like_weight(quant: Any) -> Tensor:
    """The weight quantizer's scale broadcast to the weight's shape (groups expanded)."""
    scale = quant.quant_weight().scale.detach()
    weight = quant.weight
    if scale.shape == weight.shape:
        return scale
    if scale.dim() == weight.dim() + 1:  # brevitas' grouped view (C_out, n_groups, 1, ...)
        scale = scale.squeeze(2).repeat_interleave(quant.group_size, dim=1)
        return scale[:, : weight.shape[1]]
    return scale.expand_as(weight)


@torch.no_grad()
def _init_rounding(quant: Any) -> None:
    """V such that h(V) = frac(w / scale): hardened (h > 0.5 rounds up) this is round-to-nearest."""
    ratio = quant.weight / _scale_like_weight(quant)
    rest = (ratio - torch.floor(ratio)).clamp(0.0, 1.0 - 1e-6)
    value = -torch.log((ZETA - GAMMA) / (rest - GAMMA) - 1.0)
    _rounding(quant).value.copy_(value)


def soft_rounding(quant: Any) -> Tensor:
    """AdaRound's h(V) in [0, 1], per weight."""
    value = _rounding(quant).value
    return torch.clamp(torch.sigmoid(value) * (ZETA - GAMMA) + GAMMA, 0.0, 1.0)


def _set_soft(layers: list[nn.Module], soft: bool) -> None:
    """Soft (training: floor + h(V)) or hardened (eval: floor + [h(V) > 0.5]) rounding."""
    for quant in layers:
        _rounding(quant).train(soft)


def _replace(module: nn.Module, name: str, new: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(module.get_submodule(parent_name) if parent_name else module, child, new)


# ------------------------------------------------------------------------- reconstruction


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
    params: list[Tensor] = [_rounding(q).value for q in layers]
    nearest = [p.detach().clone() for p in params]
    for p in params:
        p.requires_grad_(True)

    @torch.no_grad()
    def hard_error() -> float:
        _set_soft(layers, False)
        index = torch.arange(n)
        return float(sum(loss_fn(chunk) * len(chunk) for chunk in index.split(config.recon_batch_size))) / n

    before = hard_error()
    optimizer = torch.optim.Adam(params, lr=config.recon_lr)
    gen = torch.Generator().manual_seed(seed)
    _set_soft(layers, True)
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
    order: list[str] = []
    handles = []
    for block in dict.fromkeys(owner.values()):

        def pre(_m: nn.Module, _a: tuple, block: str = block) -> None:
            if block not in order:
                order.append(block)

        handles.append(modules[block].register_forward_pre_hook(pre))
    try:
        with torch.no_grad():
            x, step, cond, _ = next(recon.batches(2))
            qmodule.run(x, step, cond)
    finally:
        for handle in handles:
            handle.remove()
    return [(b, [n for n in quant_names if owner[n] == b]) for b in order]


def _frozen(module: nn.Module) -> None:
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


def _recon_set(calib: CalibrationSet, n: int, seed: int = 0) -> CalibrationSet:
    """n calibration inputs drawn without replacement (seeded), kept in step order."""
    if n >= len(calib):
        return calib
    index = torch.randperm(len(calib), generator=torch.Generator().manual_seed(seed))[:n]
    return calib.subset(index.sort().values)


def quantize_w4a8(
    fp_module: StepModel, temporal: list[str], calib: CalibrationSet, config: W4A8Config
) -> QuantizedModel:
    """Fake-quantize a copy of the prepared `fp_module` to W4A8 and learn its weight rounding."""
    exclude = excluded_patterns(config, temporal)
    names = [
        n
        for n, m in fp_module.model.named_modules()
        if type(m) in (nn.Conv2d, nn.Linear) and not is_excluded(n, exclude) and not isinstance(m, nn.LazyLinear)
    ]
    if not names:
        raise FlowpressError("quantize: no Conv2d or Linear layer was quantized; check quantize.exclude in the recipe")
    amax = activation_amax(fp_module, names, calib, config)
    edges = _edge_layers(fp_module, names, calib) if config.edge_weight_bits is not None else set()
    qmodule = copy.deepcopy(fp_module)
    for name in names:
        layer = qmodule.model.get_submodule(name)
        bits = config.edge_weight_bits if name in edges and config.edge_weight_bits is not None else WEIGHT_BITS
        _replace(qmodule.model, name, _quant_layer(layer, amax[f"{name}.input"], config.weight_group_size, bits))
    qmodule.eval()
    _frozen(qmodule)
    _frozen(fp_module)
    quant = {n: qmodule.model.get_submodule(n) for n in names}
    recon = _recon_set(calib, config.recon_samples)
    # Reconstruction runs small tensors: on this shared 2-core machine one thread took 7 s
    # where two took 170 s (OpenMP threads spinning against other processes).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        gains = _reconstruct_all(qmodule, fp_module, names, quant, temporal, recon, config)
    finally:
        torch.set_num_threads(threads)
    _set_soft(list(quant.values()), False)
    layers = {n: layer_quant(quant[n], config) for n in names}
    reconstruction = {
        b: {"nearest": e0, "learned": e1, "kept": "learned" if e1 <= e0 else "nearest"} for b, (e0, e1) in gains.items()
    }
    return QuantizedModel(qmodule, fp_module, layers, config, temporal, reconstruction)


def _reconstruct_all(
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


@torch.no_grad()
def _edge_layers(fp_module: StepModel, names: list[str], calib: CalibrationSet) -> set[str]:
    """The first and the last of `names` the forward pass calls (the network's input and output
    layers among the quantized ones)."""
    modules = dict(fp_module.model.named_modules())
    order: list[str] = []
    handles = [
        modules[n].register_forward_pre_hook(lambda _m, _a, n=n: order.append(n) if n not in order else None)
        for n in names
    ]
    try:
        x, step, cond, _ = next(calib.batches(2))
        fp_module.run(x, step, cond)
    finally:
        for handle in handles:
            handle.remove()
    return {order[0], order[-1]} if order else set()


@torch.no_grad()
def quantized_weight(quant: Any) -> tuple[Tensor, Tensor]:
    """(integer weights in [-qmax, qmax] (7 for 4-bit) with the layer's shape as int8, scale
    broadcast to that shape)."""
    scale = _scale_like_weight(quant)
    value = quant.quant_weight().value.detach()
    w_int = torch.round(value / scale)
    if float((w_int * scale - value).abs().max()) > 1e-5 * float(value.abs().max() + 1e-12):
        raise FlowpressError("w4a8: brevitas weights are not integer multiples of their scales; cannot export them")
    qmax = 2 ** (quant.weight_bits - 1) - 1
    return w_int.clamp(-qmax, qmax).to(torch.int8), scale


def layer_quant(quant: Any, config: W4A8Config) -> LayerQuant:
    """What the exporter needs: int4 weights and their scales (per channel, or per group along
    the input channels), the input amax."""
    w_int, scale = quantized_weight(quant)
    group = quant.group_size
    block_scale = scale.flatten(1)[:, 0] if group is None else scale[:, ::group].contiguous()
    input_scale = float(quant.input_quant.scale())
    return LayerQuant(
        kind="conv" if w_int.dim() == 4 else "linear",
        input_amax=input_scale * 127.0,
        weight_amax=(scale.flatten(1).amax(1) * (2 ** (quant.weight_bits - 1) - 1)).clone(),
        output_amax=None,
        activation_bits=config.activation_bits,
        precision="w4a8",
        weight_bits=quant.weight_bits,
        weight_int=w_int,
        weight_scale=block_scale,
        group_size=group,
    )


def engine_note(config: W4A8Config) -> str:
    """The manifest's one-line statement of how the weights are stored."""
    group = (
        "per output channel"
        if config.weight_group_size is None
        else f"per group of {config.weight_group_size} input channels (DequantizeLinear block_size)"
    )
    return (
        f"int4 weights stored as ONNX INT4 (opset 21 DequantizeLinear), scales float32 {group}; "
        "activations int8 per tensor"
    )
