"""quantize(model, config, calib, sampler): one entry; the config's backend quantizes."""

from __future__ import annotations

from flowpress.calibration import CalibrationSet
from flowpress.compress.backends import backend_of
from flowpress.compress.config import QuantConfig
from flowpress.compress.model import QuantizedModel, prepare
from flowpress.models import DiffusersDenoiser
from flowpress.sampling import Sampler


def quantize(
    model: DiffusersDenoiser, config: QuantConfig, calib: CalibrationSet, sampler: Sampler, progress: bool = False
) -> QuantizedModel:
    """Fake-quantize a prepared copy of `model` (temporal tables and split shortcuts for
    `sampler`'s schedule) as `config` says, calibrated on `calib` (progress: a bar where it is long)."""
    fp_module, temporal = prepare(model, config, sampler)
    return backend_of(config).quantize(fp_module, temporal, calib, config, progress)  # type: ignore[no-any-return]
