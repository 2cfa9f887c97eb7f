"""quantize(model, config, calib, sampler): one entry, a registry from config type to handler."""

from __future__ import annotations

from collections.abc import Callable

import torch

from flowpress.calibration import CalibrationSet
from flowpress.compress.config import Fp8Config, Int8Config, QuantConfig, W4A4Config, W4A8Config
from flowpress.compress.model import QuantizedModel, prepare
from flowpress.models import DiffusersDenoiser, StepModel
from flowpress.sampling import Sampler

Handler = Callable[[StepModel, list[str], CalibrationSet, QuantConfig, bool], QuantizedModel]


def _modelopt(
    fp_module: StepModel, temporal: list[str], calib: CalibrationSet, config: QuantConfig, progress: bool
) -> QuantizedModel:
    from flowpress.compress.modelopt import quantize_modelopt

    assert isinstance(config, Int8Config | Fp8Config)
    return quantize_modelopt(fp_module, temporal, calib, config, progress)


def _brevitas(
    fp_module: StepModel, temporal: list[str], calib: CalibrationSet, config: QuantConfig, progress: bool
) -> QuantizedModel:
    from flowpress.compress.w4a8 import quantize_w4a8

    assert isinstance(config, W4A8Config)
    with torch.enable_grad():
        return quantize_w4a8(fp_module, temporal, calib, config)


def _svdquant(
    fp_module: StepModel, temporal: list[str], calib: CalibrationSet, config: QuantConfig, progress: bool
) -> QuantizedModel:
    from flowpress.compress.svdquant import quantize_w4a4

    assert isinstance(config, W4A4Config)
    return quantize_w4a4(fp_module, temporal, calib, config)


HANDLERS: dict[type, Handler] = {
    Int8Config: _modelopt,
    Fp8Config: _modelopt,
    W4A8Config: _brevitas,
    W4A4Config: _svdquant,
}


def quantize(
    model: DiffusersDenoiser, config: QuantConfig, calib: CalibrationSet, sampler: Sampler, progress: bool = False
) -> QuantizedModel:
    """Fake-quantize a prepared copy of `model` (temporal tables and split shortcuts for
    `sampler`'s schedule) as `config` says, calibrated on `calib` (progress: a bar where it is long)."""
    fp_module, temporal = prepare(model, config, sampler)
    return HANDLERS[type(config)](fp_module, temporal, calib, config, progress)
