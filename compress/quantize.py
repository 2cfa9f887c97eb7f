"""Post-training quantization with nvidia-modelopt, calibrated on the trajectory set."""

from __future__ import annotations

import copy
import fnmatch
from dataclasses import dataclass, field, replace
from typing import Any, Literal

import torch
from torch import Tensor, nn

from calibration import CachedVelocity, CalibrationSet, discover_temporal
from calibration.temporal import half_tables
from compress.sensitivity import MixedPrecisionConfig
from compress.shortcut import split_shortcuts
from models import DiffusersVelocity
from sampling import FlowpressError

Precision = Literal["int8", "fp8", "w4a8"]
Temporal = Literal["cache", "fp", "int8"]
Amax = Literal["max", "mse", "perstep-max", "perstep-mean", "perstep-percentile"]


@dataclass(frozen=True)
class QuantConfig:
    """W8A8 (or W8A<activation_bits>): weights symmetric int8 per output channel,
    activations per tensor.

    precision: 'int8' as above, or 'fp8': E4M3 weights and activations, both per tensor
      (modelopt's FP8_DEFAULT_CFG: num_bits (4, 3), scale = amax / 448), exported in the
      `tensorrt` flavour only (no Conv output quantizers; `conv_output_quant` is int8-only).

    temporal: what happens to the modules that depend only on (t, class) — 'cache': gathered
      from full-precision tables by step (they leave the engine); 'fp': kept in the graph in
      full precision; 'int8': quantized like everything else.
    amax: 'max' (modelopt's max calibrator over all calibration inputs); 'mse': per tensor,
      the clipping range in [0.3, 1] x max whose quantization error on the calibration
      activations is least (the scale search of PTQ4DM / Q-Diffusion); or per-step
      statistics — each activation's abs-max recorded per sampler step, then reduced over
      steps by max, mean or the `percentile`-th percentile.
    split_shortcuts: Q-Diffusion's shortcut splitting: a UNet decoder's 1x1 shortcut conv on
      the concatenation [h, skip] becomes two convs with their own input quantizers.
    conv_output_quant: also quantize Conv outputs, so onnxruntime can fuse DQ-Conv-Q into
      an integer QLinearConv (the `ort-cpu` flavour needs it; `tensorrt` does not).
    exclude: module-name patterns (fnmatch) left in full precision.
    table_dtype: storage of the temporal tables (temporal='cache'); 'float16' halves them in
      the engine (gathered, then cast to float32), which the W4A8 engines need to stay small.

    precision 'w4a8' (brevitas, compress/w4a8.py): int4 weights, per output channel
    (weight_group_size None) or per group of weight_group_size input channels; 8-bit
    activations per tensor (amax as above); rounding learned by block reconstruction —
    recon_iters Adam steps (lr recon_lr, batch recon_batch_size) per block on recon_samples
    calibration inputs, rounding regulariser weight round_loss_weight (AdaRound / BRECQ).
    recon_iters 0 is round-to-nearest.  Conv outputs are not quantized in w4a8 (int4 weights
    have no integer Conv kernel on CPU to fuse into), so conv_output_quant does not apply.
    mixed_precision: the gated search that adds layers to the full-precision set (see
      compress/sensitivity.py); applied by the pipeline after quantize, not by quantize.
    """

    precision: Precision = "int8"
    temporal: Temporal = "cache"
    amax: Amax = "max"
    percentile: float = 90.0
    activation_bits: int = 8
    split_shortcuts: bool = True
    conv_output_quant: bool = True
    exclude: tuple[str, ...] = ()
    calib_batch_size: int = 64
    table_dtype: Literal["float32", "float16"] = "float32"
    weight_group_size: int | None = None
    recon_iters: int = 500
    recon_samples: int = 256
    recon_batch_size: int = 32
    recon_lr: float = 1e-3
    round_loss_weight: float = 0.01
    mixed_precision: MixedPrecisionConfig = field(default_factory=MixedPrecisionConfig)

    def __post_init__(self) -> None:
        if self.precision not in ("int8", "fp8", "w4a8"):
            raise FlowpressError(f"quantize.precision must be 'int8', 'fp8' or 'w4a8', got {self.precision!r}")
        if self.weight_group_size is not None and self.weight_group_size < 2:
            raise FlowpressError(f"quantize.weight_group_size must be >= 2 or null, got {self.weight_group_size}")
        if self.precision != "w4a8" and self.weight_group_size is not None:
            raise FlowpressError("quantize.weight_group_size applies to precision 'w4a8' only; remove it or set null")
        if self.recon_iters < 0 or self.recon_samples < 1 or self.recon_batch_size < 1 or self.recon_lr <= 0:
            raise FlowpressError(
                "quantize: recon_iters must be >= 0, recon_samples and recon_batch_size >= 1, recon_lr > 0"
            )
        if self.precision == "fp8" and self.activation_bits != 8:
            raise FlowpressError(
                f"quantize.activation_bits is {self.activation_bits} but fp8 is E4M3 (8 bits); drop the key"
            )
        if not 2 <= self.activation_bits <= 8:
            raise FlowpressError(f"quantize.activation_bits must be in 2..8, got {self.activation_bits}")
        if not 0 < self.percentile <= 100:
            raise FlowpressError(f"quantize.percentile must be in (0, 100], got {self.percentile}")
        if self.mixed_precision.enabled and self.precision != "int8":
            raise FlowpressError(
                f"quantize.mixed_precision searches int8 layers only, got precision {self.precision!r}; "
                "set precision: int8 or mixed_precision.enabled: false"
            )


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
    """

    kind: Literal["conv", "linear"]
    input_amax: float
    weight_amax: Tensor
    output_amax: float | None
    activation_bits: int = 8
    precision: Precision = "int8"
    weight_bits: int = 8
    weight_int: Tensor | None = None
    weight_scale: Tensor | None = None
    group_size: int | None = None


@dataclass
class QuantizedModel:
    """module: the fake-quant torch model (modelopt, or brevitas for w4a8); fp_module: the same
    structure in full precision (temporal tables, split shortcuts) — what gets exported;
    layers: per-layer amax; reconstruction (w4a8): per block, its output error over the
    reconstruction inputs with nearest and with learned rounding."""

    module: nn.Module
    fp_module: nn.Module
    layers: dict[str, LayerQuant]
    config: QuantConfig
    temporal_modules: list[str]
    reconstruction: dict[str, dict[str, float]] = field(default_factory=dict)


def prepare(model: DiffusersVelocity, config: QuantConfig, times: Tensor) -> tuple[nn.Module, list[str]]:
    """The FP model the quantizer and exporter see: temporal tables and split shortcuts applied.

    Returns (module, temporal module names).
    """
    temporal = discover_temporal(model, times)
    prepared: DiffusersVelocity = (
        CachedVelocity(model, times, temporal) if config.temporal == "cache" else copy.deepcopy(model)
    )
    if config.split_shortcuts:
        split_shortcuts(prepared)
    if config.table_dtype == "float16" and isinstance(prepared, CachedVelocity):
        half_tables(prepared)
    return prepared.eval(), temporal


def _patterns(config: QuantConfig, temporal: list[str]) -> tuple[str, ...]:
    extra = tuple(p for name in temporal for p in (name, f"{name}.*")) if config.temporal == "fp" else ()
    return config.exclude + extra


def _modelopt_config(config: QuantConfig, exclude: tuple[str, ...]) -> dict:
    """modelopt's quant_cfg: Conv2d / Linear weights and inputs (int8, or E4M3 as in FP8_DEFAULT_CFG,
    whose LLM-specific exclusions do not apply here), everything else off."""
    fp8 = config.precision == "fp8"
    act = {"num_bits": (4, 3) if fp8 else config.activation_bits, "axis": None}
    weight = {"num_bits": (4, 3), "axis": None} if fp8 else {"num_bits": 8, "axis": 0}
    quant_cfg: list[dict] = [{"quantizer_name": "*", "enable": False}]
    for parent in ("nn.Conv2d", "nn.Linear"):
        quant_cfg.append({"quantizer_name": "*weight_quantizer", "parent_class": parent, "cfg": weight})
        quant_cfg.append({"quantizer_name": "*input_quantizer", "parent_class": parent, "cfg": act})
    if config.conv_output_quant and not fp8:
        quant_cfg.append({"quantizer_name": "*output_quantizer", "parent_class": "nn.Conv2d", "cfg": act})
    for pattern in exclude:
        quant_cfg.append({"quantizer_name": pattern if pattern.endswith("*") else f"{pattern}.*", "enable": False})
    return {"quant_cfg": quant_cfg, "algorithm": "max"}


def _excluded(name: str, patterns: tuple[str, ...]) -> bool:
    return any(fnmatch.fnmatch(name, p) for p in patterns)


@torch.no_grad()
def quantize(model: DiffusersVelocity, config: QuantConfig, calib: CalibrationSet) -> QuantizedModel:
    """Fake-quantize a prepared copy of `model` with modelopt (int8) or brevitas (w4a8),
    calibrated on `calib`."""
    fp_module, temporal = prepare(model, config, calib.times)
    if config.precision == "w4a8":
        from compress.w4a8 import quantize_w4a8

        with torch.enable_grad():
            return quantize_w4a8(fp_module, temporal, calib, config)
    import modelopt.torch.quantization as mtq

    exclude = _patterns(config, temporal)
    qmodule = copy.deepcopy(fp_module)

    def forward_loop(m: nn.Module) -> None:
        for x, t, cond, _step in calib.batches(config.calib_batch_size):
            m(x, t, cond)

    mtq.quantize(qmodule, _modelopt_config(config, exclude), forward_loop)
    layers = layer_quants(qmodule, exclude, config.activation_bits, config.precision)
    if not layers:
        raise FlowpressError("quantize: no Conv2d or Linear layer was quantized; check quantize.exclude in the recipe")
    if config.amax == "mse":
        _apply_mse_amax(fp_module, qmodule, layers, calib, config)
        layers = layer_quants(qmodule, exclude, config.activation_bits, config.precision)
    elif config.amax != "max":
        _apply_per_step_amax(fp_module, qmodule, layers, calib, config)
        layers = layer_quants(qmodule, exclude, config.activation_bits, config.precision)
    return QuantizedModel(qmodule, fp_module, layers, config, temporal)


def layer_quants(
    qmodule: nn.Module, exclude: tuple[str, ...] = (), bits: int = 8, precision: Precision = "int8"
) -> dict[str, LayerQuant]:
    """Per-layer amax of every Conv2d / Linear whose input and weight quantizers are on."""
    layers: dict[str, LayerQuant] = {}
    for name, module in qmodule.named_modules():
        if not isinstance(module, (nn.Conv2d, nn.Linear)) or _excluded(name, exclude):
            continue
        inq: Any = getattr(module, "input_quantizer", None)
        wq: Any = getattr(module, "weight_quantizer", None)
        if inq is None or wq is None or not (inq.is_enabled and wq.is_enabled) or inq.amax is None or wq.amax is None:
            continue
        outq: Any = getattr(module, "output_quantizer", None)
        output_amax = float(outq.amax) if outq is not None and outq.is_enabled and outq.amax is not None else None
        layers[name] = LayerQuant(
            kind="conv" if isinstance(module, nn.Conv2d) else "linear",
            input_amax=float(inq.amax),
            weight_amax=wq.amax.detach().flatten().expand(module.weight.shape[0]).clone(),
            output_amax=output_amax,
            activation_bits=bits,
            precision=precision,
        )
    return layers


@torch.no_grad()
def per_step_absmax(
    fp_module: nn.Module, names: list[str], calib: CalibrationSet, batch_size: int
) -> dict[str, Tensor]:
    """abs-max of each named layer's input and output at every calibration step.

    Returns {f"{name}.input": (S,), f"{name}.output": (S,)}, S = distinct steps in calib, in
    step order; the step comes from calib.batches, never from counting calls.
    """
    modules = dict(fp_module.named_modules())
    steps = torch.unique(calib.step).tolist()
    stats = {f"{n}.{io}": torch.zeros(len(steps)) for n in names for io in ("input", "output")}
    current = {"s": 0}

    def hook(name: str):  # noqa: ANN202
        def record(_m: nn.Module, args: tuple, output: Tensor) -> None:
            s = current["s"]
            stats[f"{name}.input"][s] = max(float(stats[f"{name}.input"][s]), float(args[0].abs().max()))
            stats[f"{name}.output"][s] = max(float(stats[f"{name}.output"][s]), float(output.abs().max()))

        return record

    handles = [modules[n].register_forward_hook(hook(n)) for n in names]
    try:
        for x, t, cond, step in calib.batches(batch_size):
            current["s"] = steps.index(step)
            fp_module(x, t, cond)
    finally:
        for handle in handles:
            handle.remove()
    return stats


@torch.no_grad()
def activation_samples(
    fp_module: nn.Module, names: list[str], calib: CalibrationSet, batch_size: int, per_batch: int = 4096
) -> dict[str, Tensor]:
    """A seeded random subsample of each named layer's input and output values over `calib`."""
    modules = dict(fp_module.named_modules())
    gen = torch.Generator().manual_seed(0)
    found: dict[str, list[Tensor]] = {f"{n}.{io}": [] for n in names for io in ("input", "output")}

    def keep(key: str, values: Tensor) -> None:
        flat = values.detach().flatten()
        found[key].append(flat[torch.randint(0, flat.numel(), (min(per_batch, flat.numel()),), generator=gen)])

    def hook(name: str):  # noqa: ANN202
        def record(_m: nn.Module, args: tuple, output: Tensor) -> None:
            keep(f"{name}.input", args[0])
            keep(f"{name}.output", output)

        return record

    handles = [modules[n].register_forward_hook(hook(n)) for n in names]
    try:
        for x, t, cond, _step in calib.batches(batch_size):
            fp_module(x, t, cond)
    finally:
        for handle in handles:
            handle.remove()
    return {k: torch.cat(v) for k, v in found.items()}


E4M3_MAX = 448.0  # largest finite float8 e4m3fn value


def fake_quant(values: Tensor, amax: float, bits: int = 8, precision: Precision = "int8") -> Tensor:
    """values seen through a symmetric per-tensor quantizer of range amax (modelopt's rounding:
    round-half-even to the int grid, or the E4M3 cast with saturation)."""
    if precision == "fp8":
        scale = max(float(amax), 1e-12) / E4M3_MAX
        return (values / scale).clamp(-E4M3_MAX, E4M3_MAX).to(torch.float8_e4m3fn).float() * scale
    qmax = 2 ** (bits - 1) - 1
    scale = max(float(amax), 1e-12) / qmax
    return torch.clamp(torch.round(values / scale), -qmax - 1, qmax) * scale


def mse_amax(values: Tensor, amax: float, bits: int, candidates: int = 36, precision: Precision = "int8") -> float:
    """The clipping range alpha * amax, alpha in [0.3, 1], minimising the fake-quant MSE of `values`."""
    alphas = torch.linspace(0.3, 1.0, candidates)
    errors = []
    for alpha in alphas:
        quantized = fake_quant(values, float(alpha) * amax, bits, precision)
        errors.append(float((quantized - values).pow(2).mean()))
    return float(alphas[int(torch.tensor(errors).argmin())]) * amax


def _apply_mse_amax(
    fp_module: nn.Module, qmodule: nn.Module, layers: dict[str, LayerQuant], calib: CalibrationSet, config: QuantConfig
) -> None:
    samples = activation_samples(fp_module, list(layers), calib, config.calib_batch_size)
    modules = dict(qmodule.named_modules())
    for name, layer in layers.items():
        module: Any = modules[name]
        bits, precision = config.activation_bits, config.precision
        module.input_quantizer.amax = torch.tensor(
            mse_amax(samples[f"{name}.input"], layer.input_amax, bits, precision=precision)
        )
        if layer.output_amax is not None:
            module.output_quantizer.amax = torch.tensor(
                mse_amax(samples[f"{name}.output"], layer.output_amax, bits, precision=precision)
            )


def _apply_per_step_amax(
    fp_module: nn.Module, qmodule: nn.Module, layers: dict[str, LayerQuant], calib: CalibrationSet, config: QuantConfig
) -> None:
    stats = per_step_absmax(fp_module, list(layers), calib, config.calib_batch_size)

    def reduce(values: Tensor) -> float:
        if config.amax == "perstep-max":
            return float(values.max())
        if config.amax == "perstep-mean":
            return float(values.mean())
        return float(torch.quantile(values, config.percentile / 100.0))

    modules = dict(qmodule.named_modules())
    for name, layer in layers.items():
        module: Any = modules[name]
        module.input_quantizer.amax = torch.tensor(reduce(stats[f"{name}.input"]))
        if layer.output_amax is not None:
            module.output_quantizer.amax = torch.tensor(reduce(stats[f"{name}.output"]))


PORTABLE_WEIGHT_BITS = 7  # |w| <= 63: u8 x s8 pair sums fit int16 on every x86 host (engines/isa.py)


def set_weight_bits(qmodel: QuantizedModel, bits: int) -> None:
    """Quantize the int8 layers' weights to `bits` bits (8, or PORTABLE_WEIGHT_BITS) in the torch
    model and in what the exporter writes: the same per-channel amax, scale amax / (2^(bits-1) - 1),
    so a 7-bit weight is calibrated as such, not an 8-bit one clipped."""
    if qmodel.config.precision != "int8":
        return
    if bits not in (8, PORTABLE_WEIGHT_BITS):
        raise FlowpressError(f"quantize: int8 weights have 8 or {PORTABLE_WEIGHT_BITS} bits, got {bits}")
    for name, module in qmodel.module.named_modules():
        weight_quantizer: Any = getattr(module, "weight_quantizer", None)
        if weight_quantizer is not None and name in qmodel.layers:
            weight_quantizer.num_bits = bits
    qmodel.layers = {name: replace(layer, weight_bits=bits) for name, layer in qmodel.layers.items()}


def weight_bits_of(qmodel: QuantizedModel) -> int:
    """The weight bits of the int8 layers (8 or PORTABLE_WEIGHT_BITS)."""
    return min((layer.weight_bits for layer in qmodel.layers.values()), default=8)


def set_output_quant(qmodel: QuantizedModel, enabled: bool) -> None:
    """Switch the Conv output quantizers (calibrated either way) on or off in the torch model."""
    for name, module in qmodel.module.named_modules():
        outq: Any = getattr(module, "output_quantizer", None)
        if outq is not None and name in qmodel.layers and qmodel.layers[name].output_amax is not None:
            outq.enable() if enabled else outq.disable()
