"""Compression: per-precision quantization (modelopt int8 / fp8, brevitas W4A8, SVDQuant-style W4A4), shortcut
splitting, per-layer sensitivity; SlimFlow distillation lives in compress.slimflow."""

from flowpress.compress.backends import BACKENDS, Backend, backend_named, backend_of
from flowpress.compress.config import (
    PRECISIONS,
    Fp8Config,
    Int8Config,
    MixedPrecisionConfig,
    QuantConfig,
    W4A4Config,
    W4A8Config,
)
from flowpress.compress.model import (
    PORTABLE_WEIGHT_BITS,
    LayerQuant,
    QuantizedModel,
    prepare,
    set_output_quant,
    set_step_scales,
    set_weight_bits,
    weight_bits_of,
    weight_form_name,
    weight_form_of,
    weights_in,
)
from flowpress.compress.quantize import quantize
from flowpress.compress.sensitivity import (
    LayerSensitivity,
    Sensitivity,
    SensitivityConfig,
    keep_full_precision,
    layer_sensitivity,
)
from flowpress.compress.shortcut import SplitConv2d, split_shortcuts

__all__ = [
    "BACKENDS",
    "PORTABLE_WEIGHT_BITS",
    "PRECISIONS",
    "Fp8Config",
    "Int8Config",
    "LayerQuant",
    "LayerSensitivity",
    "MixedPrecisionConfig",
    "QuantConfig",
    "QuantizedModel",
    "Sensitivity",
    "SensitivityConfig",
    "SplitConv2d",
    "W4A4Config",
    "Backend",
    "W4A8Config",
    "backend_named",
    "backend_of",
    "keep_full_precision",
    "layer_sensitivity",
    "prepare",
    "quantize",
    "set_output_quant",
    "set_step_scales",
    "set_weight_bits",
    "split_shortcuts",
    "weight_bits_of",
    "weight_form_name",
    "weight_form_of",
    "weights_in",
]
