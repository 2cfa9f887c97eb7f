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
TIAR); with 'cache' they are FP tables and with 'fp' they are not quantized.  The
reconstruction itself is compress/reconstruct.py.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import Tensor, nn

from flowpress.calibration import CalibrationSet
from flowpress.compress.amax import activation_amax
from flowpress.compress.config import W4A8Config
from flowpress.compress.model import LayerQuant, QuantizedModel, quantizable_layers, replace_module
from flowpress.compress.reconstruct import (
    GAMMA,
    ZETA,
    call_order,
    frozen,
    recon_set,
    reconstruct_all,
    rounding_of,
    set_soft,
)
from flowpress.errors import FlowpressError
from flowpress.extras import need
from flowpress.models import StepModel

WEIGHT_BITS = 4


def _quantizers(group_size: int | None, bits: int = WEIGHT_BITS) -> tuple[type, type]:
    """(weight quantizer, activation quantizer) brevitas injector classes; `bits`-bit weights."""
    need("brevitas", "lowbit", "W4A8 (brevitas)")
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
    need("brevitas", "lowbit", "W4A8 (brevitas)")
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
    rounding_of(quant).value.copy_(value)


def quantize(
    fp_module: StepModel, temporal: list[str], calib: CalibrationSet, config: W4A8Config, progress: bool = False
) -> QuantizedModel:
    """The backend's entry (compress/backends/w4a8.py): learned rounding runs with gradients on."""
    with torch.enable_grad():
        return quantize_w4a8(fp_module, temporal, calib, config)


def quantize_w4a8(
    fp_module: StepModel, temporal: list[str], calib: CalibrationSet, config: W4A8Config
) -> QuantizedModel:
    """Fake-quantize a copy of the prepared `fp_module` to W4A8 and learn its weight rounding."""
    names = quantizable_layers(fp_module, config, temporal)
    amax = activation_amax(fp_module, names, calib, config)
    edges = _edge_layers(fp_module, names, calib) if config.edge_weight_bits is not None else set()
    qmodule = copy.deepcopy(fp_module)
    for name in names:
        layer = qmodule.model.get_submodule(name)
        bits = config.edge_weight_bits if name in edges and config.edge_weight_bits is not None else WEIGHT_BITS
        replace_module(qmodule.model, name, _quant_layer(layer, amax[f"{name}.input"], config.weight_group_size, bits))
    qmodule.eval()
    frozen(qmodule)
    frozen(fp_module)
    quant = {n: qmodule.model.get_submodule(n) for n in names}
    recon = recon_set(calib, config.recon_samples)
    # Reconstruction runs small tensors: on a shared 2-core machine one thread was many times
    # faster than two (OpenMP threads spinning against other processes).
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        gains = reconstruct_all(qmodule, fp_module, names, quant, temporal, recon, config)
    finally:
        torch.set_num_threads(threads)
    set_soft(list(quant.values()), False)
    layers = {n: layer_quant(quant[n], config) for n in names}
    reconstruction = {
        b: {"nearest": e0, "learned": e1, "kept": "learned" if e1 <= e0 else "nearest"} for b, (e0, e1) in gains.items()
    }
    return QuantizedModel(qmodule, fp_module, layers, config, temporal, reconstruction)


def _edge_layers(fp_module: StepModel, names: list[str], calib: CalibrationSet) -> set[str]:
    """The first and the last of `names` the forward pass calls (the network's input and output
    layers among the quantized ones)."""
    order = call_order(fp_module, names, calib)
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
