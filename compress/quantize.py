"""Post-training quantization with nvidia-modelopt, calibrated on the trajectory set."""

from __future__ import annotations

import copy
import fnmatch
from dataclasses import dataclass
from typing import Any, Literal

import torch
from torch import Tensor, nn

from calibration import CalibrationSet
from sampling import FlowpressError

# Everything that depends only on t (or on the class) stays in full precision.
TEMPORAL_LAYERS = ("*time_embedding*", "*time_emb_proj*", "*time_proj*", "*class_embedding*")


@dataclass(frozen=True)
class QuantConfig:
    """W8A8: weights symmetric int8 per output channel, activations per tensor.

    conv_output_quant: also quantize Conv outputs, so onnxruntime can fuse DQ-Conv-Q into
    an integer QLinearConv (the `ort-cpu` flavour needs it; `tensorrt` does not).
    """

    precision: Literal["int8"] = "int8"
    exclude: tuple[str, ...] = TEMPORAL_LAYERS
    conv_output_quant: bool = True
    calib_batch_size: int = 64

    def __post_init__(self) -> None:
        if self.precision != "int8":
            raise FlowpressError(f"quantize: precision {self.precision!r} is not supported yet; use 'int8'")


@dataclass(frozen=True)
class LayerQuant:
    """What the exporter needs for one quantized Conv2d / Linear.

    input_amax: scalar; weight_amax: (C_out,); output_amax: scalar or None.
    Scales are amax / 127 and the integer range is [-128, 127] (modelopt's convention).
    """

    kind: Literal["conv", "linear"]
    input_amax: float
    weight_amax: Tensor
    output_amax: float | None


@dataclass
class QuantizedModel:
    """module: the fake-quant torch model (modelopt); layers: its per-layer amax values."""

    module: nn.Module
    layers: dict[str, LayerQuant]
    config: QuantConfig


def _modelopt_config(config: QuantConfig) -> dict:
    int8 = {"num_bits": 8, "axis": None}
    quant_cfg: list[dict] = [{"quantizer_name": "*", "enable": False}]
    for parent in ("nn.Conv2d", "nn.Linear"):
        quant_cfg.append(
            {"quantizer_name": "*weight_quantizer", "parent_class": parent, "cfg": {"num_bits": 8, "axis": 0}}
        )
        quant_cfg.append({"quantizer_name": "*input_quantizer", "parent_class": parent, "cfg": int8})
    if config.conv_output_quant:
        quant_cfg.append({"quantizer_name": "*output_quantizer", "parent_class": "nn.Conv2d", "cfg": int8})
    for pattern in config.exclude:
        quant_cfg.append({"quantizer_name": f"{pattern}", "enable": False})
    return {"quant_cfg": quant_cfg, "algorithm": "max"}


def _excluded(name: str, patterns: tuple[str, ...]) -> bool:
    return any(fnmatch.fnmatch(name + ".", p if p.endswith("*") else p + ".*") for p in patterns)


@torch.no_grad()
def quantize(model: nn.Module, config: QuantConfig, calib: CalibrationSet) -> QuantizedModel:
    """Fake-quantize a copy of `model` with modelopt, calibrated on every step of `calib`."""
    import modelopt.torch.quantization as mtq

    qmodel = copy.deepcopy(model).eval()

    def forward_loop(m: nn.Module) -> None:
        for x, t, cond, _step in calib.batches(config.calib_batch_size):
            m(x, t, cond)

    mtq.quantize(qmodel, _modelopt_config(config), forward_loop)
    layers: dict[str, LayerQuant] = {}
    for name, module in qmodel.named_modules():
        if not isinstance(module, (nn.Conv2d, nn.Linear)) or _excluded(name, config.exclude):
            continue
        inq: Any = module.input_quantizer
        wq: Any = module.weight_quantizer
        if not (inq.is_enabled and wq.is_enabled) or inq.amax is None or wq.amax is None:
            continue
        outq = getattr(module, "output_quantizer", None)
        output_amax = float(outq.amax) if outq is not None and outq.is_enabled and outq.amax is not None else None
        layers[name] = LayerQuant(
            kind="conv" if isinstance(module, nn.Conv2d) else "linear",
            input_amax=float(inq.amax),
            weight_amax=wq.amax.detach().flatten().clone(),
            output_amax=output_amax,
        )
    if not layers:
        raise FlowpressError("quantize: no Conv2d or Linear layer was quantized; check quantize.exclude in the recipe")
    return QuantizedModel(qmodel, layers, config)


def set_output_quant(qmodel: QuantizedModel, enabled: bool) -> None:
    """Switch the Conv output quantizers (calibrated either way) on or off in the torch model."""
    for name, module in qmodel.module.named_modules():
        outq = getattr(module, "output_quantizer", None)
        if outq is not None and name in qmodel.layers and qmodel.layers[name].output_amax is not None:
            outq.enable() if enabled else outq.disable()
