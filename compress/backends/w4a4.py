"""W4A4: SVDQuant-style smoothed int4 residual weights beside a float16 low-rank branch, int4
activations with dynamic per-token group scales."""

from __future__ import annotations

from flowpress.compress.backends.base import Backend
from flowpress.compress.config import W4A4Config

W4A4 = Backend(
    name="w4a4",
    config=W4A4Config,
    quantizer="flowpress.compress.svdquant:quantize",
    flavour="ort-cpu",
    opset=21,
    flavours=("ort-cpu", "tensorrt"),
    low_rank=True,
    note="flowpress.compress.svdquant:engine_note",
)
