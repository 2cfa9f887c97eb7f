"""What quantization produces and the exporter consumes: the prepared step model, per-layer
quantization records, and the switches the engine forms need (weight bits, Conv outputs)."""

from __future__ import annotations

import fnmatch
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field, replace
from typing import Any, Literal

import torch
from torch import Tensor, nn

from flowpress.calibration import CachedStepModel, CalibrationSet, discover_temporal
from flowpress.calibration.temporal import half_tables
from flowpress.compress.config import Int8Config, QuantConfig
from flowpress.compress.shortcut import split_shortcuts
from flowpress.errors import FlowpressError
from flowpress.models import DiffusersDenoiser, StepModel, copy_sharing_weights
from flowpress.sampling import Sampler

PORTABLE_WEIGHT_BITS = 7  # |w| <= 63 (narrow range): u8 x s8 pair sums fit int16 on every x86 host (engines/isa.py)
UNSIGNED_ZERO_POINT = 128  # 8-bit weights stored as uint8 (w + 128): onnxruntime's exact U8U8 kernels


@dataclass(frozen=True)
class LayerQuant:
    """What the exporter needs for one quantized Conv2d / Linear.

    input_amax: scalar; weight_amax: (C_out,); output_amax: scalar or None.
    int8: scales are amax / (2^(bits-1) - 1) and the integer range is [-2^(bits-1), 2^(bits-1) - 1]
    (modelopt's convention).  fp8: scales are amax / 448 (E4M3's largest finite value); the
    per-tensor weight amax is repeated over C_out, so both precisions export one layout.
    Learned (W4A8) weights come as integers instead of being rounded by the exporter:
    weight_int: int8 values in [-7, 7], the torch weight's shape; weight_scale: (C_out,) per
    channel, or (C_out, C_in / group_size, *kernel) per group along the input channels.
    W4A4 (compress/svdquant.py) adds inv_smooth (C_in,), the factor the input is multiplied by
    before both branches; lowrank: the float16 (down, up) weights of the rank-r branch, or None;
    activation_group: channels per dynamic int4 activation scale (input_amax is unused).
    input_amax_steps (int8 with step_scales): (S,) input abs-max per sampler step, which the
    onnxruntime graph gathers by its step input; input_amax stays the static range (the TensorRT
    graph's).
    weight_unsigned (8-bit int8 weights): the onnxruntime graph stores them as uint8 with zero point
    UNSIGNED_ZERO_POINT, the same values, so onnxruntime multiplies with its U8U8 kernels (exact on
    every host, engines/isa.py); the TensorRT graph keeps int8.
    bias_shift (int8 with bias_correction): (C_out,) added to the layer's bias, in the torch model
    and in every exported graph, for the weight bits set now (compress/bias.py).
    """

    kind: Literal["conv", "linear"]
    input_amax: float
    weight_amax: Tensor
    output_amax: float | None
    activation_bits: int = 8
    precision: Literal["int8", "fp8", "w4a8", "w4a4"] = "int8"
    weight_bits: int = 8
    weight_int: Tensor | None = None
    weight_scale: Tensor | None = None
    group_size: int | None = None
    inv_smooth: Tensor | None = None
    lowrank: tuple[Tensor, Tensor] | None = None
    activation_group: int | None = None
    input_amax_steps: Tensor | None = None
    weight_unsigned: bool = False
    bias_shift: Tensor | None = None


@dataclass
class QuantizedModel:
    """module: the fake-quant step model (modelopt, or brevitas for w4a8); fp_module: the same
    structure in full precision (temporal tables, split shortcuts) — what gets exported;
    layers: per-layer records, keyed by name inside the denoiser (module.model), e.g.
    'net.down_blocks.0.resnets.0.conv1'; reconstruction (w4a8): per block, its output error
    over the reconstruction inputs with nearest and with learned rounding, and which it kept;
    step_scales (int8 with step_scales): what switches `module`'s quantizers to a step's ranges
    (set as module.per_step while on, set_step_scales); bias_calibration (int8 with
    bias_correction): the inputs correct_biases measures each weight form's shifts over, and
    bias_shifts_by_bits those shifts by weight bits."""

    module: StepModel
    fp_module: StepModel
    layers: dict[str, LayerQuant]
    config: QuantConfig
    temporal_modules: list[str]
    reconstruction: dict[str, dict[str, float | str]] = field(default_factory=dict)
    step_scales: StepScales | None = None
    bias_calibration: CalibrationSet | None = None
    bias_shifts_by_bits: dict[int, dict[str, Tensor]] = field(default_factory=dict)


class StepScales:
    """Switches a fake-quant step model's input quantizers to the ranges of one sampler step (its
    StepModel.per_step): tables maps each layer to its (S,) input abs-max per step; None restores
    the static ranges.  A step off the schedule takes the nearest end (the step model's output is
    NaN there anyway)."""

    def __init__(self, module: StepModel, tables: dict[str, Tensor], static: dict[str, Tensor]):
        self.module = module
        self.tables = tables
        self.static = static

    def __call__(self, step: int | None) -> None:
        modules = layer_modules(self.module)
        for name, table in self.tables.items():
            quantizer: Any = modules[name].input_quantizer
            quantizer.amax = self.static[name] if step is None else table[min(max(step, 0), len(table) - 1)]


def prepare(model: DiffusersDenoiser, config: QuantConfig, sampler: Sampler) -> tuple[StepModel, list[str]]:
    """The FP step model the quantizer and exporter see: temporal tables and split shortcuts
    applied to a copy of `model`.  Returns (step model, temporal module names)."""
    temporal = discover_temporal(model, sampler.model_times)
    prepared = (
        CachedStepModel(model, sampler, temporal)
        if config.temporal == "cache"
        else StepModel(copy_sharing_weights(model), sampler)
    )
    if config.split_shortcuts:
        assert isinstance(prepared.model, DiffusersDenoiser)
        split_shortcuts(prepared.model)
    if config.table_dtype == "float16" and isinstance(prepared, CachedStepModel):
        half_tables(prepared)
    return prepared.eval(), temporal


def excluded_patterns(config: QuantConfig, temporal: list[str]) -> tuple[str, ...]:
    """config.exclude, plus the temporal modules when they stay in full precision."""
    extra = tuple(p for name in temporal for p in (name, f"{name}.*")) if config.temporal == "fp" else ()
    return config.exclude + extra


def is_excluded(name: str, patterns: tuple[str, ...]) -> bool:
    return any(fnmatch.fnmatch(name, p) for p in patterns)


def quantizable_layers(fp_module: StepModel, config: QuantConfig, temporal: list[str]) -> list[str]:
    """The Conv2d / Linear layers of the denoiser that config.exclude (and temporal 'fp') leave
    to quantize, by name; none is a one-line error."""
    exclude = excluded_patterns(config, temporal)
    names = [
        n
        for n, m in fp_module.model.named_modules()
        if type(m) in (nn.Conv2d, nn.Linear) and not is_excluded(n, exclude)
    ]
    if not names:
        raise FlowpressError("quantize: no Conv2d or Linear layer was quantized; check quantize.exclude in the recipe")
    return names


def replace_module(module: nn.Module, name: str, new: nn.Module) -> None:
    """Put `new` where `module`'s submodule `name` was."""
    parent_name, _, child = name.rpartition(".")
    setattr(module.get_submodule(parent_name) if parent_name else module, child, new)


def set_weight_bits(qmodel: QuantizedModel, bits: int, unsigned: bool = False) -> None:
    """Quantize the int8 layers' weights to `bits` bits (8, or PORTABLE_WEIGHT_BITS) in the torch
    model and in what the exporter writes: the same per-channel amax, scale amax / (2^(bits-1) - 1),
    so a 7-bit weight is calibrated as such, not an 8-bit one clipped; with weight_clip 'mse' the
    7-bit ranges are the per-channel clipping with the least weight error.  unsigned (8 bits
    only): the onnxruntime graph stores the same weights as uint8 (LayerQuant.weight_unsigned)."""
    from flowpress.compress.backends import backend_of

    if not backend_of(qmodel.config).weight_forms:
        return
    if bits not in (8, PORTABLE_WEIGHT_BITS):
        raise FlowpressError(f"quantize: int8 weights have 8 or {PORTABLE_WEIGHT_BITS} bits, got {bits}")
    if unsigned and bits != 8:
        raise FlowpressError(f"quantize: unsigned (U8U8) int8 weights have 8 bits, got {bits}")
    from flowpress.compress.amax import weight_mse_amax

    clip = bits != 8 and isinstance(qmodel.config, Int8Config) and qmodel.config.weight_clip == "mse"
    for name, module in qmodel.module.model.named_modules():
        weight_quantizer: Any = getattr(module, "weight_quantizer", None)
        if weight_quantizer is None or name not in qmodel.layers:
            continue
        weight_quantizer.num_bits = bits
        weight_quantizer.narrow_range = True  # [-qmax, qmax]: a clipped range never rounds to -2^(bits-1)
        weight = module.weight.detach()
        amax = weight_mse_amax(weight, bits) if clip else weight.flatten(1).abs().amax(1)
        weight_quantizer.amax = amax.reshape(weight_quantizer.amax.shape).to(weight_quantizer.amax.dtype)
        qmodel.layers[name] = replace(
            qmodel.layers[name], weight_bits=bits, weight_amax=amax.clone(), weight_unsigned=unsigned
        )
    correct_biases(qmodel)


@torch.no_grad()
def correct_biases(qmodel: QuantizedModel) -> None:
    """Give every quantized layer with a bias the shift compress/bias.py measures over
    qmodel.bias_calibration for the weight bits set now (measured once per bits): the torch
    model's bias becomes the FP bias plus that shift, and the layer record carries it for the
    exporter.  Without bias_calibration (bias_correction off) a no-op."""
    if qmodel.bias_calibration is None:
        return
    from flowpress.compress.bias import bias_shifts

    modules: dict[str, Any] = layer_modules(qmodel.module)
    fp_modules: dict[str, Any] = layer_modules(qmodel.fp_module)
    for name, layer in qmodel.layers.items():  # back to the FP biases before measuring
        if layer.bias_shift is not None:
            modules[name].bias.copy_(fp_modules[name].bias)
    bits = weight_bits_of(qmodel)
    if bits not in qmodel.bias_shifts_by_bits:
        qmodel.bias_shifts_by_bits[bits] = bias_shifts(qmodel.module, list(qmodel.layers), qmodel.bias_calibration)
    for name, shift in qmodel.bias_shifts_by_bits[bits].items():
        if name in qmodel.layers:
            modules[name].bias.copy_(fp_modules[name].bias + shift)
    for name in qmodel.layers:
        qmodel.layers[name] = replace(qmodel.layers[name], bias_shift=qmodel.bias_shifts_by_bits[bits].get(name))


def weight_bits_of(qmodel: QuantizedModel) -> int:
    """The weight bits of the int8 layers (8 or PORTABLE_WEIGHT_BITS)."""
    return min((layer.weight_bits for layer in qmodel.layers.values()), default=8)


def weight_form_of(qmodel: QuantizedModel) -> tuple[int, bool]:
    """(bits, unsigned) of the int8 layers' weights, as set_weight_bits takes them."""
    return weight_bits_of(qmodel), any(layer.weight_unsigned for layer in qmodel.layers.values())


@contextmanager
def weights_in(qmodel: QuantizedModel, bits: int, unsigned: bool = False) -> Iterator[None]:
    """The int8 layers' weights in (bits, unsigned) inside the block (set_weight_bits), back in
    the form they had after it, also when the block raises."""
    before = weight_form_of(qmodel)
    if (bits, unsigned) == before:
        yield
        return
    set_weight_bits(qmodel, bits, unsigned)
    try:
        yield
    finally:
        set_weight_bits(qmodel, *before)


def weight_form_name(bits: int, unsigned: bool) -> str:
    """How reports and engine.json name an int8 weight form: '7-bit', '8-bit', '8-bit u8u8'."""
    return f"{bits}-bit u8u8" if unsigned else f"{bits}-bit"


def set_output_quant(qmodel: QuantizedModel, enabled: bool) -> None:
    """Switch the Conv output quantizers (calibrated either way) on or off in the torch model."""
    for name, module in qmodel.module.model.named_modules():
        output_quantizer: Any = getattr(module, "output_quantizer", None)
        if output_quantizer is not None and name in qmodel.layers and qmodel.layers[name].output_amax is not None:
            output_quantizer.enable() if enabled else output_quantizer.disable()


def set_step_scales(qmodel: QuantizedModel, enabled: bool) -> None:
    """Let the torch model use its per-step activation ranges (the onnxruntime graph's) or the
    static ones (the TensorRT graph's); nothing for a model quantized without step_scales."""
    if qmodel.step_scales is not None:
        qmodel.module.per_step = qmodel.step_scales if enabled else None


def layer_modules(module: StepModel) -> dict[str, nn.Module]:
    """The denoiser's modules by the names QuantizedModel.layers uses."""
    return dict(module.model.named_modules())
