"""Per-layer sensitivity along the sampling trajectory, and the mixed-precision switch.

Sensitivity of a layer = how much closer the final sample of the fake-quant model comes to
the full-precision one when only that layer is kept in full precision (leave-one-out), on
seeded samples driven through the whole sampler.
"""

from __future__ import annotations

import fnmatch
import math
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import torch
from torch import Tensor, nn

from sampling import FlowpressError, Schedule, noise_for_seeds, sample

if TYPE_CHECKING:
    from compress.quantize import QuantizedModel

QUANTIZERS = ("input_quantizer", "weight_quantizer", "output_quantizer")


@dataclass(frozen=True)
class MixedPrecisionConfig:
    """quantize.mixed_precision: keep the most trajectory-sensitive layers in full precision,
    one at a time, until the recipe's gate passes on the exported engine.

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
class SensitivityConfig:
    """Seeded samples (labels cycling over the classes) driven through `schedule`."""

    schedule: Schedule
    n_samples: int = 32
    seed_base: int = 200000
    batch_size: int = 32
    guidance: float = 1.0
    null_label: int | None = None


@dataclass(frozen=True)
class LayerSensitivity:
    """final_mse / final_psnr_db: fake-quant model with only `name` in full precision vs FP;
    gain_db: final_psnr_db minus the all-quantized model's."""

    name: str
    final_mse: float
    final_psnr_db: float
    gain_db: float


@dataclass(frozen=True)
class Sensitivity:
    """layers: most sensitive first (largest gain from keeping the layer in full precision)."""

    baseline_mse: float
    baseline_psnr_db: float
    layers: tuple[LayerSensitivity, ...]
    n_samples: int

    @property
    def order(self) -> list[str]:
        return [layer.name for layer in self.layers]


def final_psnr_db(mse: float) -> float:
    """PSNR over the [-1, 1] data range (peak-to-peak 2), as compare reports it."""
    return math.inf if mse == 0 else 10 * math.log10(4.0 / mse)


def disable_layer_quant(module: nn.Module, name: str) -> list[Any]:
    """Switch off the modelopt quantizers (input, weight, output) of layer `name`; returns the
    ones that were on, for `enable_quantizers` (a Linear's output quantizer exists but is off)."""
    layer = dict(module.named_modules())[name]
    switched = []
    for attr in QUANTIZERS:
        quantizer: Any = getattr(layer, attr, None)
        if quantizer is not None and quantizer.is_enabled:
            quantizer.disable()
            switched.append(quantizer)
    return switched


def enable_quantizers(quantizers: list[Any]) -> None:
    for quantizer in quantizers:
        quantizer.enable()


def keep_full_precision(qmodel: QuantizedModel, name: str) -> None:
    """Fall back on layer `name`, in place: its quantizers go off in the torch model and it
    leaves qmodel.layers, so the exporter places no Q/DQ on it."""
    if name not in qmodel.layers:
        raise FlowpressError(f"mixed precision: {name!r} is not a quantized layer of this model")
    disable_layer_quant(qmodel.module, name)
    del qmodel.layers[name]


@torch.no_grad()
def _finals(model: nn.Module, config: SensitivityConfig, num_classes: int | None, shape: tuple[int, ...]) -> Tensor:
    seeds = list(range(config.seed_base, config.seed_base + config.n_samples))
    labels = torch.arange(config.n_samples) % num_classes if num_classes else None
    finals = []
    for start in range(0, config.n_samples, config.batch_size):
        chunk = seeds[start : start + config.batch_size]
        cond = None if labels is None else labels[start : start + len(chunk)]
        traj = sample(model, noise_for_seeds(chunk, shape), cond, config.schedule, config.guidance, config.null_label)
        finals.append(traj.final.clamp(-1, 1))
    return torch.cat(finals)


@torch.no_grad()
def layer_sensitivity(
    fp_model: nn.Module,
    qmodel: QuantizedModel,
    config: SensitivityConfig,
    progress: bool = False,
    names: list[str] | None = None,
) -> Sensitivity:
    """Rank qmodel.layers (or `names` among them) by the final-sample error left when only
    that layer is in full precision.

    Leave-one-out (only this layer in FP) rather than one-in (only this layer quantized):
    the search asks "which layer, taken out of the quantized model, helps most", and an
    error measured with every other layer quantized includes how this layer's error
    compounds with theirs along the trajectory — what the fallback actually removes.
    The quantizers are toggled on the calibrated model, so nothing is re-calibrated.
    """
    from tqdm import tqdm

    shape = tuple(fp_model.sample_shape)  # type: ignore[arg-type]
    num_classes = getattr(fp_model, "num_classes", None)
    fp_model.eval()
    reference = _finals(fp_model, config, num_classes, shape)

    def mse_of(model: nn.Module) -> float:
        return float((_finals(model, config, num_classes, shape) - reference).double().pow(2).mean())

    baseline = mse_of(qmodel.module)
    baseline_db = final_psnr_db(baseline)
    found = []
    names = list(qmodel.layers) if names is None else [n for n in names if n in qmodel.layers]
    for name in tqdm(names, desc="sensitivity", disable=not progress):
        switched = disable_layer_quant(qmodel.module, name)
        try:
            mse = mse_of(qmodel.module)
        finally:
            enable_quantizers(switched)
        found.append(LayerSensitivity(name, mse, final_psnr_db(mse), final_psnr_db(mse) - baseline_db))
    found.sort(key=lambda layer: layer.final_mse)
    return Sensitivity(baseline, baseline_db, tuple(found), config.n_samples)
