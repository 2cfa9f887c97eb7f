"""W4A8: brevitas's learned-rounding int4 weights (ONNX INT4, opset 21), int8 activations."""

from __future__ import annotations

from flowpress.compress.backends.base import Backend
from flowpress.compress.config import W4A8Config

W4A8 = Backend(
    name="w4a8",
    config=W4A8Config,
    quantizer="flowpress.compress.w4a8:quantize",
    flavour="ort-cpu",
    opset=21,
    flavours=("ort-cpu", "tensorrt"),
    extra=("brevitas", "lowbit"),
    parity_fix="set quantize.edge_weight_bits: 7 (8-bit edge layers saturate where int8 kernels have no VNNI)",
    note="flowpress.compress.w4a8:engine_note",
)
