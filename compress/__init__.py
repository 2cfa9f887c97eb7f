"""Compression: post-training quantization (modelopt), shortcut splitting, per-layer sensitivity."""

from compress.quantize import (
    PORTABLE_WEIGHT_BITS,
    LayerQuant,
    QuantConfig,
    QuantizedModel,
    layer_quants,
    per_step_absmax,
    prepare,
    quantize,
    set_output_quant,
    set_weight_bits,
    weight_bits_of,
)
from compress.sensitivity import (
    LayerSensitivity,
    MixedPrecisionConfig,
    Sensitivity,
    SensitivityConfig,
    keep_full_precision,
    layer_sensitivity,
)
from compress.shortcut import SplitConv2d, split_shortcuts

__all__ = [
    "LayerQuant",
    "LayerSensitivity",
    "MixedPrecisionConfig",
    "QuantConfig",
    "QuantizedModel",
    "Sensitivity",
    "SensitivityConfig",
    "SplitConv2d",
    "keep_full_precision",
    "layer_quants",
    "layer_sensitivity",
    "per_step_absmax",
    "prepare",
    "quantize",
    "set_output_quant",
    "set_weight_bits",
    "weight_bits_of",
    "PORTABLE_WEIGHT_BITS",
    "split_shortcuts",
]
