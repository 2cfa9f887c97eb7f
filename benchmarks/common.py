"""What the bench and the ablation share: the FP trajectories every engine is measured against,
an engine sampled from the same noise, onnxruntime's quantize_static as its users run it, and
the int8 weight form `make quantize` ships on a host."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from flowpress.calibration import CalibrationSet
from flowpress.compress import QuantizedModel, set_weight_bits
from flowpress.engines import Engine, TorchEngine
from flowpress.engines.isa import HostIsa
from flowpress.engines.portability import int8_weight_form, resolve_portable
from flowpress.models import Conditions, DiffusersDenoiser, StepModel, as_feeds
from flowpress.recipe import Recipe
from flowpress.sampling import Cond, Sampler, batch_cond, noise_for_seeds, sample


@dataclass
class Reference:
    """FP trajectories of seeds 0..N-1: xs (n+1, N, C, H, W), their conditioning (N rows), noise,
    and the prompts behind the conditioning of a text model (None otherwise)."""

    xs: Tensor
    cond: Cond
    noise: Tensor
    prompts: tuple[str, ...] | None = None

    def __len__(self) -> int:
        return int(self.noise.shape[0])

    def described(self) -> dict[str, Any]:
        """The conditioning as an evaluator receives it (with the prompts of a text model)."""
        return Conditions(self.cond, self.prompts).described()


@torch.no_grad()
def fp_reference(
    model: DiffusersDenoiser,
    sampler: Sampler,
    guidance: float,
    n: int,
    batch: int,
    conditions: Conditions | None = None,
    null: Cond | None = None,
) -> Reference:
    """FP (torch) trajectories of seeds 0..n-1 in chunks of `batch`, conditioned by `conditions`
    and guided against `null` (by default the model's classes cycling and its null class)."""
    reference = TorchEngine(StepModel(model, sampler), sampler, "torch-fp32")
    conditions = conditions or Conditions(model.cycling_condition(n))
    cond = conditions.model
    noise = noise_for_seeds(range(n), model.sample_shape)
    null = model.null_condition() if null is None else null
    chunks = [
        sample(sampler, reference, noise[s : s + batch], batch_cond(cond, slice(s, s + batch)), guidance, null).xs
        for s in range(0, n, batch)
    ]
    return Reference(torch.cat(chunks, dim=1), cond, noise, conditions.prompts)


@torch.no_grad()
def sample_engine(engine: Engine, ref: Reference, guidance: float, null: Cond | None, batch: int) -> Tensor:
    """(n+1, N, C, H, W) trajectories of `engine` (on its own schedule) from the reference's noise and conditioning."""
    chunks = [
        sample(
            engine.schedule, engine, ref.noise[s : s + batch], batch_cond(ref.cond, slice(s, s + batch)), guidance, null
        ).xs
        for s in range(0, len(ref), batch)
    ]
    return torch.cat(chunks, dim=1)


def ort_quantize_static(fp32: Path, calib: CalibrationSet, out: Path, op_types: tuple[str, ...] | None = None) -> Path:
    """onnxruntime's quantize_static (MinMax, QDQ, U8S8, per channel) of the FP graph `fp32` on
    `calib`'s inputs; op_types limits what it quantizes (None: its default)."""
    from onnxruntime.quantization import (
        CalibrationDataReader,
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quantize_static,
    )

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.rows = iter(range(0, len(calib), 32))

        def get_next(self) -> dict[str, np.ndarray] | None:
            start = next(self.rows, None)
            if start is None:
                return None
            picked = calib.subset(torch.arange(start, min(start + 32, len(calib))))
            return {name: value.numpy() for name, value in as_feeds(picked.x, picked.step, picked.cond).items()}

    quantize_static(
        str(fp32), str(out), Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
        activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8, calibrate_method=CalibrationMethod.MinMax,
        op_types_to_quantize=list(op_types) if op_types else None,
    )  # fmt: skip
    return out


def int8_form(qmodel: QuantizedModel, recipe: Recipe, host: HostIsa) -> bool:
    """Give `qmodel` the int8 weight form `make quantize` gives it on `host` (7-bit or U8U8 where
    portable, a no-op for fp8 / w4a8); returns whether the recipe's engines are portable there."""
    engine = recipe.engine
    set_weight_bits(qmodel, *int8_weight_form(engine.portable, engine.portable_weights, host))
    return resolve_portable(engine.portable, host)
