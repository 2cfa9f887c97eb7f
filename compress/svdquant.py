"""W4A4 with a 16-bit low-rank branch, as SVDQuant (nunchaku / deepcompressor) builds it.

For a Conv2d / Linear with input x and weight W (C_out, C_in, ...):
1. smooth: s_j = amax(x_j)^alpha / amax(W[:, j])^(1 - alpha) per input channel (SmoothQuant's
   migration, amax over the calibration trajectories); x^ = x / s, W^ = W * s.
2. low rank: the top-r singular directions of W^ (flattened to (C_out, C_in * k)) stay in
   float16 as two thin layers, `down` (a Conv2d / Linear to r channels, W^'s kernel) and `up`
   (1x1 / Linear back to C_out); they absorb the weight's outliers.
3. residual R = W^ - up @ down, quantized to int4 (round to nearest, symmetric, [-7, 7]) per
   output channel or per group of input channels.
4. activations: x^ quantized to int4 with one dynamic scale per token and group of channels
   (amax / 7 of the group, computed at run time: no calibrated range).
y = layer(Q(x^); Q(R)) + up(down(x^)) + bias.  The exporter (export/lowrank.py) writes the same
graph: INT4 DequantizeLinear weights, dynamic blocked INT4 Q/DQ on x^, float16 branch weights.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from flowpress.calibration import CalibrationSet
from flowpress.compress.amax import hooked_pass
from flowpress.compress.config import W4A4Config
from flowpress.compress.model import LayerQuant, QuantizedModel, quantizable_layers, replace_module
from flowpress.errors import FlowpressError
from flowpress.models import StepModel

QMAX = 7  # symmetric int4: weights and activations in [-7, 7] (scale amax / 7; the activation clamp
# at -8 is QuantizeLinear's INT4 saturation, which a value of at most amax never reaches)
EPS = 1e-8  # the smallest dynamic activation scale (an all-zero group quantizes to zeros)


def channel_axis(x: Tensor, conv: bool) -> int:
    return 1 if conv else x.dim() - 1


def quantize_groups(x: Tensor, group: int, conv: bool) -> Tensor:
    """x through int4 with one scale (amax / 7) per token and `group` consecutive channels."""
    if conv:  # (N, C, H, W) -> (N, C / g, g, H * W): groups along the channels of each pixel
        view = x.reshape(x.shape[0], x.shape[1] // group, group, -1)
        axis = 2
    else:  # (..., C) -> (N, T, C / g, g)
        view = x.reshape(x.shape[0], -1, x.shape[-1] // group, group)
        axis = 3
    scale = torch.clamp(view.abs().amax(dim=axis, keepdim=True) / QMAX, min=EPS)
    return (torch.clamp(torch.round(view / scale), -QMAX - 1, QMAX) * scale).reshape(x.shape)


class SVDQuantLayer(nn.Module):
    """The fake-quant W4A4 layer: y = layer(Q(x * inv_smooth); Q(R)) + up(down(x * inv_smooth))."""

    inv_smooth: Tensor
    down: Tensor
    up: Tensor
    weight_int: Tensor
    weight_scale: Tensor
    bias: Tensor | None

    def __init__(self, layer: nn.Conv2d | nn.Linear, smooth: Tensor, config: W4A4Config) -> None:
        super().__init__()
        self.conv = isinstance(layer, nn.Conv2d)
        if self.conv and (layer.groups != 1 or layer.padding_mode != "zeros"):  # type: ignore[union-attr]
            raise FlowpressError(f"w4a4: grouped or non-zero-padded Conv2d is not supported ({layer})")
        self.conv_args: dict[str, Any] = (
            {"stride": layer.stride, "padding": layer.padding, "dilation": layer.dilation} if self.conv else {}
        )
        weight = layer.weight.detach().float()
        c_out, c_in = weight.shape[:2]
        shape = (1, -1, *[1] * (weight.dim() - 2))
        smoothed = weight * smooth.reshape(shape)
        flat = smoothed.reshape(c_out, -1)
        rank = min(config.rank, *flat.shape)
        u, s, vh = torch.linalg.svd(flat.double(), full_matrices=False)
        root = s[:rank].sqrt()
        down = (root[:, None] * vh[:rank]).to(torch.float16)
        up = (u[:, :rank] * root).to(torch.float16)
        residual = (flat.double() - up.double() @ down.double()).float().reshape(weight.shape)
        self.group = (
            config.weight_group_size if config.weight_group_size and c_in % config.weight_group_size == 0 else None
        )
        self.act_group = config.activation_group_size if c_in % config.activation_group_size == 0 else c_in
        w_int, scale = _quantize_residual(residual, self.group)
        self.register_buffer("inv_smooth", (1.0 / smooth).float())
        self.register_buffer("down", down.reshape(rank, *weight.shape[1:]))
        self.register_buffer("up", up.reshape(c_out, rank, *[1] * (weight.dim() - 2)))
        self.register_buffer("weight_int", w_int)
        self.register_buffer("weight_scale", scale)
        self.register_buffer("bias", None if layer.bias is None else layer.bias.detach().float().clone())
        self.rank = rank

    def weight_dq(self) -> Tensor:
        if self.group is None:
            scale = self.weight_scale.reshape(-1, *[1] * (self.weight_int.dim() - 1))
        else:
            scale = self.weight_scale.repeat_interleave(self.group, dim=1)
        return self.weight_int.float() * scale

    def _layer(self, x: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
        return F.conv2d(x, weight, bias, **self.conv_args) if self.conv else F.linear(x, weight, bias)

    def forward(self, x: Tensor) -> Tensor:
        axis = channel_axis(x, self.conv)
        shape = [1] * x.dim()
        shape[axis] = -1
        smoothed = x * self.inv_smooth.reshape(shape)
        y = self._layer(quantize_groups(smoothed, self.act_group, self.conv), self.weight_dq(), self.bias)
        if self.rank:
            low = self._layer(smoothed, self.down.float(), None)
            y = y + (F.conv2d(low, self.up.float()) if self.conv else F.linear(low, self.up.float()))
        return y


def _quantize_residual(residual: Tensor, group: int | None) -> tuple[Tensor, Tensor]:
    """(int4 values as int8 in [-7, 7], float scales): per output channel (C_out,), or per group
    of `group` input channels (C_out, C_in / group, *kernel) — the exporter's layouts."""
    if group is None:
        scale = residual.abs().flatten(1).amax(1).clamp(min=1e-12) / QMAX
        w_int = torch.round(residual / scale.reshape(-1, *[1] * (residual.dim() - 1)))
    else:
        c_out, c_in = residual.shape[:2]
        view = residual.reshape(c_out, c_in // group, group, *residual.shape[2:])
        scale = view.abs().amax(2).clamp(min=1e-12) / QMAX
        w_int = torch.round(view / scale.unsqueeze(2)).reshape(residual.shape)
    return w_int.clamp(-QMAX, QMAX).to(torch.int8), scale


@torch.no_grad()
def channel_amax(fp_module: StepModel, names: list[str], calib: CalibrationSet, batch_size: int) -> dict[str, Tensor]:
    """abs-max of each named layer's input per input channel over the calibration set."""
    modules = dict(fp_module.model.named_modules())
    found: dict[str, Tensor] = {}

    def hook(name: str):  # noqa: ANN202
        conv = isinstance(modules[name], nn.Conv2d)

        def record(_m: nn.Module, args: tuple) -> None:
            x = args[0].detach()
            axis = channel_axis(x, conv)
            amax = x.abs().transpose(0, axis).reshape(x.shape[axis], -1).amax(1)
            found[name] = amax if name not in found else torch.maximum(found[name], amax)

        return record

    hooked_pass(fp_module, calib, batch_size, {n: hook(n) for n in names}, pre=True)
    return found


def smoothing(layer: nn.Conv2d | nn.Linear, x_amax: Tensor, alpha: float) -> Tensor:
    """SmoothQuant's per-input-channel factor s_j = amax(x_j)^alpha / amax(W[:, j])^(1 - alpha)."""
    if alpha == 0.0:
        return torch.ones_like(x_amax)
    w_amax = layer.weight.detach().abs().transpose(0, 1).reshape(x_amax.numel(), -1).amax(1)
    s = x_amax.clamp(min=1e-5).pow(alpha) / w_amax.clamp(min=1e-5).pow(1.0 - alpha)
    return s.clamp(min=1e-4, max=1e4)


@torch.no_grad()
def quantize(
    fp_module: StepModel, temporal: list[str], calib: CalibrationSet, config: W4A4Config, progress: bool = False
) -> QuantizedModel:
    """The backend's entry (compress/backends/w4a4.py)."""
    return quantize_w4a4(fp_module, temporal, calib, config)


def quantize_w4a4(
    fp_module: StepModel, temporal: list[str], calib: CalibrationSet, config: W4A4Config
) -> QuantizedModel:
    """A copy of the prepared `fp_module` with every Conv2d / Linear (bar config.exclude) as a
    W4A4 layer with its low-rank branch; smoothing factors from `calib`."""
    names = quantizable_layers(fp_module, config, temporal)
    x_amax = channel_amax(fp_module, names, calib, config.calib_batch_size)
    qmodule = copy.deepcopy(fp_module)
    layers = {}
    for name in names:
        layer: Any = qmodule.model.get_submodule(name)
        if name not in x_amax:
            raise FlowpressError(f"w4a4: layer {name} never ran on the calibration set; exclude it (quantize.exclude)")
        quant = SVDQuantLayer(layer, smoothing(layer, x_amax[name], config.smooth_alpha), config)
        replace_module(qmodule.model, name, quant)
        layers[name] = layer_quant(quant)
    return QuantizedModel(qmodule.eval(), fp_module, layers, config, temporal)


def layer_quant(quant: SVDQuantLayer) -> LayerQuant:
    """What the exporter needs: the int4 residual and its scales, the smoothing, the branch."""
    return LayerQuant(
        kind="conv" if quant.conv else "linear",
        input_amax=0.0,  # dynamic
        weight_amax=quant.weight_scale.flatten(1).amax(1) * QMAX if quant.group else quant.weight_scale * QMAX,
        output_amax=None,
        activation_bits=4,
        precision="w4a4",
        weight_bits=4,
        weight_int=quant.weight_int,
        weight_scale=quant.weight_scale,
        group_size=quant.group,
        inv_smooth=quant.inv_smooth,
        lowrank=(quant.down, quant.up) if quant.rank else None,
        activation_group=quant.act_group,
    )


def engine_note(config: W4A4Config) -> str:
    """The manifest's one-line statement of how the weights are stored."""
    group = "per output channel" if config.weight_group_size is None else f"per group of {config.weight_group_size}"
    return (
        f"int4 residual weights (ONNX INT4, {group}) after smoothing (alpha {config.smooth_alpha}), a float16 "
        f"rank-{config.rank} branch; activations int4 with dynamic scales per token and "
        f"{config.activation_group_size} channels (blocked QuantizeLinear)"
    )
