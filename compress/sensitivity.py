"""Per-layer sensitivity along the sampling trajectory, and the mixed-precision switch.

Sensitivity of a layer = how much closer the final sample of the fake-quant model comes to
the full-precision one when only that layer is kept in full precision (leave-one-out), on
seeded samples driven through the whole sampler.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import Tensor

from flowpress.compress.model import QuantizedModel
from flowpress.errors import FlowpressError
from flowpress.models import StepModel
from flowpress.ranks import run_sharded, shard
from flowpress.sampling import Cond, Sampler, batch_cond, noise_for_seeds, sample

QUANTIZERS = ("input_quantizer", "weight_quantizer", "output_quantizer")


@dataclass(frozen=True)
class SensitivityConfig:
    """Seeded samples driven through `sampler`; cond: their conditioning, (n_samples, ...) per name."""

    sampler: Sampler
    cond: Cond = field(default_factory=dict)
    n_samples: int = 32
    seed_base: int = 200000
    batch_size: int = 32
    guidance: float = 1.0
    null: Cond | None = None


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


def disable_layer_quant(module: StepModel, name: str) -> list[Any]:
    """Switch off the modelopt quantizers (input, weight, output) of layer `name`; returns the
    ones that were on, for `enable_quantizers` (a Linear's output quantizer exists but is off)."""
    layer = dict(module.model.named_modules())[name]
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
def _finals(model: StepModel, config: SensitivityConfig) -> Tensor:
    seeds = list(range(config.seed_base, config.seed_base + config.n_samples))
    finals = []
    for start in range(0, config.n_samples, config.batch_size):
        chunk = seeds[start : start + config.batch_size]
        cond = batch_cond(config.cond, slice(start, start + len(chunk)))
        noise = noise_for_seeds(chunk, model.sample_shape)
        traj = sample(config.sampler, model.run, noise, cond, config.guidance, config.null, seeds=chunk)
        finals.append(traj.final.clamp(-1, 1))
    return torch.cat(finals)


@torch.no_grad()
def layer_sensitivity(
    fp_model: StepModel,
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

    fp_model.eval()
    reference = _finals(fp_model, config)

    def mse_of(model: StepModel) -> float:
        return float((_finals(model, config) - reference).double().pow(2).mean())

    baseline = mse_of(qmodel.module)
    baseline_db = final_psnr_db(baseline)
    names = list(qmodel.layers) if names is None else [n for n in names if n in qmodel.layers]

    def left_out(name: str) -> LayerSensitivity:
        switched = disable_layer_quant(qmodel.module, name)
        try:
            mse = mse_of(qmodel.module)
        finally:
            enable_quantizers(switched)
        return LayerSensitivity(name, mse, final_psnr_db(mse), final_psnr_db(mse) - baseline_db)

    with tqdm(total=len(shard(names)), desc="sensitivity", disable=not progress) as bar:
        found = run_sharded(names, left_out, bar.update)  # under torchrun each rank measures its share
    found.sort(key=lambda layer: layer.final_mse)
    return Sensitivity(baseline, baseline_db, tuple(found), config.n_samples)
