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
from flowpress.ranks import run_sharded

BIAS_CORRECTION_BATCH = 256


@torch.no_grad()
def bias_shifts(module: Any, layers: list[str], calib: CalibrationSet) -> dict[str, Tensor]:
    """For each of `layers` (names inside module.model) that has a bias: the per-output-channel
    mean of FP minus quantized output over every calibration input, both from the input the
    quantized model feeds that layer.  `module` is the fake-quant step model as it runs now.
    Under torchrun each rank measures its share of the batches; the sums are added in batch order
    on every rank, as one process adds them."""
    modules = dict(module.model.named_modules())
    sums: dict[str, Tensor] = {}  # of the batch being run
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

    def measured(batch: tuple[Tensor, Tensor, dict[str, Tensor], int]) -> tuple[dict[str, Tensor], dict[str, int]]:
        sums.clear()
        counts.clear()
        module(*batch[:3])
        return dict(sums), dict(counts)

    try:
        per_batch = run_sharded(list(calib.batches(BIAS_CORRECTION_BATCH)), measured)
    finally:
        for hook in hooks:
            hook.remove()
    total: dict[str, Any] = {}
    count: dict[str, int] = {}
    for batch_sums, batch_counts in per_batch:
        for name, value in batch_sums.items():
            total[name] = total.get(name, 0) + value
            count[name] = count.get(name, 0) + batch_counts[name]
    return {name: (total[name] / count[name]).float() for name in total}
