"""Quantization configs, one per precision (a recipe's `quantize:` picks one by `precision`)."""

from __future__ import annotations

import fnmatch
from dataclasses import dataclass, field
from typing import Literal

from flowpress.errors import FlowpressError

Temporal = Literal["cache", "fp", "int8"]
Amax = Literal["max", "mse", "perstep-max", "perstep-mean", "perstep-percentile"]


@dataclass(frozen=True)
class MixedPrecisionConfig:
    """quantize.mixed_precision (int8): keep the most trajectory-sensitive layers in full
    precision, one at a time, until the recipe's gate passes on the exported engine.

    max_fallback: the most layers kept in full precision before the search gives up.
    sensitivity_samples / sensitivity_seed_base: seeded samples of the sensitivity ranking
      (torch fake-quant); the default seeds are disjoint from calibration and compare seeds.
    check_samples: the first compare seeds each candidate engine is checked on before the
      full compare (compare.n_samples) confirms it.
    candidates: module-name patterns (fnmatch) of the layers that may fall back; empty: all.
    """

    enabled: bool = False
    max_fallback: int = 8
    sensitivity_samples: int = 32
    sensitivity_seed_base: int = 200000
    check_samples: int = 100
    candidates: tuple[str, ...] = ()

    def allows(self, name: str) -> bool:
        return not self.candidates or any(fnmatch.fnmatch(name, p) for p in self.candidates)

    def __post_init__(self) -> None:
        if self.max_fallback < 1:
            raise FlowpressError(f"quantize.mixed_precision.max_fallback must be >= 1, got {self.max_fallback}")
        if self.sensitivity_samples < 1 or self.check_samples < 2:
            raise FlowpressError(
                "quantize.mixed_precision: sensitivity_samples must be >= 1 and check_samples >= 2, "
                f"got {self.sensitivity_samples}, {self.check_samples}"
            )


@dataclass(frozen=True)
class _Common:
    """What every precision shares.

    temporal: the modules that depend only on (t, class) — 'cache': gathered from
      full-precision tables by step (they leave the engine); 'fp': kept in the graph in full
      precision; 'int8': quantized like everything else.
    amax: activation ranges — 'max' over all calibration inputs; 'mse': the clipping range in
      [0.3, 1] x max with the least quantization error on the calibration activations (PTQ4DM /
      Q-Diffusion's search); or per-step statistics — each activation's abs-max per sampler
      step, reduced over steps by max, mean or the `percentile`-th percentile.
    split_shortcuts: Q-Diffusion's shortcut splitting: a UNet decoder's 1x1 shortcut conv on
      the concatenation [h, skip] becomes two convs with their own input quantizers.
    exclude: module-name patterns (fnmatch) left in full precision.
    table_dtype: storage of the temporal tables (temporal 'cache'); 'float16' halves them.
    """

    temporal: Temporal = "cache"
    amax: Amax = "max"
    percentile: float = 90.0
    split_shortcuts: bool = True
    exclude: tuple[str, ...] = ()
    calib_batch_size: int = 64
    table_dtype: Literal["float32", "float16"] = "float32"

    def __post_init__(self) -> None:
        if not 0 < self.percentile <= 100:
            raise FlowpressError(f"quantize.percentile must be in (0, 100], got {self.percentile}")
        if self.calib_batch_size < 1:
            raise FlowpressError(f"quantize.calib_batch_size must be >= 1, got {self.calib_batch_size}")


@dataclass(frozen=True)
class Int8Config(_Common):
    """W8A<activation_bits> with modelopt: weights symmetric int8 per output channel,
    activations per tensor.  conv_output_quant: also quantize Conv outputs, so onnxruntime fuses
    DQ-Conv-Q into an integer QLinearConv (the `ort-cpu` flavour needs it).
    step_scales: input scales per sampler step (TDQ's idea, without its MLP) for every Linear,
    every bias-free Conv and the layers reading x_t: the abs-max of that step's calibration inputs,
    gathered by the engine's step input in the onnxruntime graph (its integer kernels take a
    run-time scale); the other layers, the TensorRT graph and OpenVINO keep the static `amax`
    scales.  A batch must hold one step.
    weight_clip: the per-channel weight range of the portable 7-bit form (engine.portable): 'max'
    (the channel's largest weight) or 'mse' (alpha * max, alpha in [0.6, 1], with the least weight
    error: on a grid twice as coarse, one outlier weight costs the rest of its channel more);
    8-bit weights keep the max.
    bias_correction: add to each quantized layer's bias the mean of (FP - quantized) output per
    channel over the calibration inputs, measured for the weight form the engine ships (it
    corrects the mean shift that clipping and rounding of the weights leave; compress/bias.py)."""

    precision: Literal["int8"] = "int8"
    activation_bits: int = 8
    conv_output_quant: bool = True
    step_scales: bool = False
    weight_clip: Literal["max", "mse"] = "max"
    bias_correction: bool = False
    mixed_precision: MixedPrecisionConfig = field(default_factory=MixedPrecisionConfig)

    def __post_init__(self) -> None:
        super().__post_init__()
        if not 2 <= self.activation_bits <= 8:
            raise FlowpressError(f"quantize.activation_bits must be in 2..8, got {self.activation_bits}")
        if self.step_scales and self.mixed_precision.enabled:
            raise FlowpressError("quantize: step_scales and mixed_precision together are not supported; turn one off")
        if self.bias_correction and self.mixed_precision.enabled:
            raise FlowpressError(
                "quantize: bias_correction and mixed_precision together are not supported; turn one off"
            )


@dataclass(frozen=True)
class Fp8Config(_Common):
    """E4M3 weights and activations, both per tensor (modelopt's FP8_DEFAULT_CFG: scale =
    amax / 448), exported in the `tensorrt` flavour only (no Conv output quantizers)."""

    precision: Literal["fp8"] = "fp8"
    activation_bits: Literal[8] = 8  # E4M3 is 8 bits; kept so every config answers it

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.activation_bits != 8:
            raise FlowpressError(
                f"quantize.activation_bits is {self.activation_bits} but fp8 is E4M3 (8 bits); drop the key"
            )


@dataclass(frozen=True)
class W4A8Config(_Common):
    """W4A8 with brevitas (compress/w4a8.py): int4 weights per output channel (weight_group_size
    None) or per group of weight_group_size input channels; 8-bit activations per tensor;
    rounding learned by block reconstruction — recon_iters Adam steps (lr recon_lr, batch
    recon_batch_size) per block on recon_samples calibration inputs, rounding regulariser
    weight round_loss_weight (AdaRound / BRECQ); recon_iters 0 is round-to-nearest.
    edge_weight_bits: the first and the last quantized layer (forward order: the network's input
    and output layers) get weights of this many bits, per output channel, as BRECQ and
    Q-Diffusion keep them at 8; null: 4 bits like the rest.  The default, 7, is exact on every
    x86 host: onnxruntime runs an 8-bit Linear edge as MatMulIntegerToFloat, whose u8 x s8 pair
    sums saturate int16 on AVX2 without VNNI (the digits recipes, validated here, use 8)."""

    precision: Literal["w4a8"] = "w4a8"
    activation_bits: int = 8
    weight_group_size: int | None = None
    recon_iters: int = 500
    recon_samples: int = 256
    recon_batch_size: int = 32
    recon_lr: float = 1e-3
    round_loss_weight: float = 0.01
    edge_weight_bits: int | None = 7

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.weight_group_size is not None and self.weight_group_size < 2:
            raise FlowpressError(f"quantize.weight_group_size must be >= 2 or null, got {self.weight_group_size}")
        if self.recon_iters < 0 or self.recon_samples < 1 or self.recon_batch_size < 1 or self.recon_lr <= 0:
            raise FlowpressError(
                "quantize: recon_iters must be >= 0, recon_samples and recon_batch_size >= 1, recon_lr > 0"
            )
        if not 2 <= self.activation_bits <= 8:
            raise FlowpressError(f"quantize.activation_bits must be in 2..8, got {self.activation_bits}")
        if self.edge_weight_bits is not None and not 4 <= self.edge_weight_bits <= 8:
            raise FlowpressError(f"quantize.edge_weight_bits must be in 4..8 or null, got {self.edge_weight_bits}")


@dataclass(frozen=True)
class W4A4Config(_Common):
    """W4A4 with a 16-bit low-rank branch, SVDQuant-style (compress/svdquant.py): each layer's
    input channels are smoothed (x / s, W * s with s_j = amax(x_j)^smooth_alpha /
    amax(W_j)^(1 - smooth_alpha), SmoothQuant's migration), the top `rank` singular directions of
    the smoothed weight stay in float16 as two thin layers, and the residual is quantized to int4
    (round to nearest; per output channel, or per group of weight_group_size input channels);
    activations are int4 with one dynamic scale per token and group of activation_group_size
    channels (SVDQuant: 64), computed in the graph.  smooth_alpha 0 turns smoothing off, rank 0
    the branch.  The `amax` key does not apply (scales are dynamic): setting it is an error."""

    precision: Literal["w4a4"] = "w4a4"
    activation_bits: Literal[4] = 4
    rank: int = 8
    smooth_alpha: float = 0.5
    weight_group_size: int | None = None
    activation_group_size: int = 64

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.activation_bits != 4:
            raise FlowpressError(f"quantize.activation_bits is {self.activation_bits} but w4a4 is 4 bits; drop the key")
        if self.amax != "max":
            raise FlowpressError(
                f"quantize.amax: {self.amax} does not apply to w4a4 (its activation scales are computed per token "
                "and channel group at run time); drop the key"
            )
        if self.rank < 0:
            raise FlowpressError(f"quantize.rank must be >= 0, got {self.rank}")
        if not 0.0 <= self.smooth_alpha <= 1.0:
            raise FlowpressError(f"quantize.smooth_alpha must be in [0, 1], got {self.smooth_alpha}")
        if self.weight_group_size is not None and self.weight_group_size < 2:
            raise FlowpressError(f"quantize.weight_group_size must be >= 2 or null, got {self.weight_group_size}")
        if self.activation_group_size < 1:
            raise FlowpressError(f"quantize.activation_group_size must be >= 1, got {self.activation_group_size}")


QuantConfig = Int8Config | Fp8Config | W4A8Config | W4A4Config
PRECISIONS: dict[str, type] = {"int8": Int8Config, "fp8": Fp8Config, "w4a8": W4A8Config, "w4a4": W4A4Config}
