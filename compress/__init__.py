"""Compression: post-training quantization (modelopt), shortcut splitting."""

from compress.quantize import (
    LayerQuant,
    QuantConfig,
    QuantizedModel,
    layer_quants,
    per_step_absmax,
    prepare,
    quantize,
    set_output_quant,
)
from compress.shortcut import SplitConv2d, split_shortcuts

__all__ = [
    "LayerQuant",
    "QuantConfig",
    "QuantizedModel",
    "SplitConv2d",
    "layer_quants",
    "per_step_absmax",
    "prepare",
    "quantize",
    "set_output_quant",
    "split_shortcuts",
]
