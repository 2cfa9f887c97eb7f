"""int8: modelopt's per-channel weights and per-tensor activations (per sampler step where the
kernels allow), in both Q/DQ flavours, the host-portable weight forms, every CPU runtime."""

from __future__ import annotations

from flowpress.compress.backends.base import Backend
from flowpress.compress.config import Int8Config

# what an int8 first try of a scheduler-driven UNet keeps in full precision, as modelopt's diffusers
# example does: int8 on an ε-prediction UNet's input, output and shortcut convs costs dB there
# (results/ablation-pipelines.md)
UNET_FLOAT_LAYERS = ("*conv_in", "*conv_out", "*conv_shortcut")

INT8 = Backend(
    name="int8",
    config=Int8Config,
    quantizer="flowpress.compress.modelopt:quantize_modelopt",
    library="flowpress.compress.modelopt:import_modelopt",
    flavour="ort-cpu",
    opset=20,
    flavours=("ort-cpu", "tensorrt"),
    weight_forms=True,
    first_try_float_layers=UNET_FLOAT_LAYERS,
)
