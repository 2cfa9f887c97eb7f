"""What a precision's backend says about itself (compress/backends/<precision>.py fill it in)."""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Any, Literal

Flavour = Literal["ort-cpu", "tensorrt"]


def _function(reference: str) -> Any:
    module, _, name = reference.partition(":")
    return getattr(importlib.import_module(module), name)


@dataclass(frozen=True)
class Backend:
    """One precision end to end.

    name: the recipe's `quantize.precision`; config: its config class; quantizer: 'module:function'
    of the function that fake-quantizes a prepared model (fp_module, temporal modules, calibration,
    config, progress), imported when called: the quantizers import the model types, which ask the
    backends for their traits (weight forms, E4M3).
    flavour / opset: the export defaults of a first try (`--model`); flavours: the Q/DQ flavours
    it writes (the run's own and its twin for the other runtime family); runtimes: the CPU
    runtimes a recipe's `engine.runtime` may judge it on (OpenVINO's engines are NNCF's, built from
    the FP graph).
    e4m3: Q/DQ in float8 E4M3 (TensorRT's symmetric placement only); low_rank: each layer adds a
    float16 low-rank branch (export/lowrank.py); weight_forms: 8 / 7-bit / U8U8 int8 weights, the
    host-portable forms of engines/portability.py (the other range is exported for the report,
    and OpenVINO can run the Q/DQ graph on its int8 kernels).
    first_try_float_layers: module patterns a first try of a scheduler-driven UNet keeps in full
    precision.  parity_fix: what to change when the host's integer kernels disagree with the
    graph.  note: 'module:function' of the engine manifest's sentence on how the weights are stored
    (none: the Q/DQ types say it).  extra: (module, pyproject extra) the quantizer needs beyond
    the core install, checked before any work (flowpress.extras).  library: 'module:function' that
    imports the quantizer's own library (seconds for modelopt): the run calls it while it loads, so
    that the quantize stage times quantization."""

    name: str
    config: type
    quantizer: str
    flavour: Flavour
    opset: int
    flavours: tuple[Flavour, ...]
    runtimes: tuple[str, ...] = ("onnxruntime", "openvino")
    e4m3: bool = False
    low_rank: bool = False
    weight_forms: bool = False
    first_try_float_layers: tuple[str, ...] = ()
    parity_fix: str = "try engine.portable: true or engine.runtime: openvino"
    note: str | None = None
    extra: tuple[str, str] | None = None
    library: str | None = None

    def quantize(self, fp_module: Any, temporal: list[str], calib: Any, config: Any, progress: bool) -> Any:
        """The QuantizedModel of a prepared model (compress.quantize prepares it)."""
        return _function(self.quantizer)(fp_module, temporal, calib, config, progress)

    def load_library(self) -> None:
        if self.library is not None:
            _function(self.library)()

    def engine_note(self, config: Any) -> str | None:
        return str(_function(self.note)(config)) if self.note is not None else None

    def twin(self, flavour: Flavour) -> Flavour | None:
        """The other flavour this precision writes beside `flavour`, or None."""
        return next((f for f in self.flavours if f != flavour), None)
