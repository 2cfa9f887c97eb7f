"""Bias correction: quantized weights shift each layer's output by a mean that rounding and
clipping leave behind (per output channel, and larger with 7-bit weights clipped by MSE).  Over
the calibration inputs, the mean of (FP layer - quantized layer) on the quantized model's own
activations is added to the layer's bias (Nagel et al.'s empirical bias correction; NNCF's fast
bias correction does the same per layer)."""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from flowpress.calibration import CalibrationSet

BIAS_CORRECTION_BATCH = 256


@torch.no_grad()
def bias_shifts(module: Any, layers: list[str], calib: CalibrationSet) -> dict[str, Tensor]:
    """For each of `layers` (names inside module.model) that has a bias: the per-output-channel
    mean of FP minus quantized output over every calibration input, both from the input the
    quantized model feeds that layer.  `module` is the fake-quant step model as it runs now."""
    modules = dict(module.model.named_modules())
    sums: dict[str, Tensor] = {}
    counts: dict[str, int] = {}

    def record(name: str):  # noqa: ANN202
        def hook(layer: Any, inputs: tuple[Tensor, ...], output: Tensor) -> None:
            x = inputs[0]
            if isinstance(layer, nn.Conv2d):
                fp = F.conv2d(x, layer.weight, layer.bias, layer.stride, layer.padding, layer.dilation, layer.groups)
                diff = (fp - output).transpose(0, 1).flatten(1)
            else:
                diff = (F.linear(x, layer.weight, layer.bias) - output).flatten(0, -2).T
            sums[name] = sums.get(name, 0) + diff.double().sum(1)
            counts[name] = counts.get(name, 0) + diff.shape[1]

        return hook

    hooks = [
        modules[name].register_forward_hook(record(name))
        for name in layers
        if modules[name].bias is not None and getattr(modules[name], "padding_mode", "zeros") == "zeros"
    ]
    try:
        for x, step, cond, _ in calib.batches(BIAS_CORRECTION_BATCH):
            module(x, step, cond)
    finally:
        for hook in hooks:
            hook.remove()
    return {name: (sums[name] / counts[name]).float() for name in sums}
