"""Compression: post-training quantization (modelopt), later brevitas and distillation."""

from compress.quantize import TEMPORAL_LAYERS, LayerQuant, QuantConfig, QuantizedModel, quantize, set_output_quant

__all__ = ["TEMPORAL_LAYERS", "LayerQuant", "QuantConfig", "QuantizedModel", "quantize", "set_output_quant"]
