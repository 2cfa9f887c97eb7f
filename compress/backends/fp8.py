"""fp8: modelopt's E4M3 per-tensor weights and activations; one flavour (symmetric, TensorRT's)."""

from __future__ import annotations

from flowpress.compress.backends.base import Backend
from flowpress.compress.config import Fp8Config

FP8 = Backend(
    name="fp8",
    config=Fp8Config,
    quantizer="flowpress.compress.modelopt:quantize_modelopt",
    library="flowpress.compress.modelopt:import_modelopt",
    flavour="tensorrt",
    opset=19,
    flavours=("tensorrt",),
    runtimes=("onnxruntime",),
    e4m3=True,
)
