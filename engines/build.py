"""The one way flowpress builds a CPU engine from a quantized model: export the Q/DQ graph,
check it against the fake-quant model it came from, save it as onnxruntime optimizes it.
`make quantize`, the mixed-precision search, the ablation and the bench all build through here."""

from __future__ import annotations

import dataclasses
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from torch import Tensor

from flowpress.calibration import CalibrationSet
from flowpress.compress import (
    PORTABLE_WEIGHT_BITS,
    QuantizedModel,
    backend_of,
    set_output_quant,
    set_step_scales,
    weight_bits_of,
    weight_form_of,
    weights_in,
)
from flowpress.engines.isa import HostIsa
from flowpress.errors import EngineParityError
from flowpress.export import (
    ExportConfig,
    Parity,
    check_parity,
    export_onnx,
    float_weight_ops,
    qdq_types,
    save_ort_engine,
)
from flowpress.models import as_feeds

# ||ORT - fake-quant|| / ||fake-quant - FP|| per forward: rounding flips amplify through chained
# quantizers, so a faithful graph lands near 1 (0.1-1.1 measured on the digits models and the
# tests' tiny UNet, optimizations off / on); a wrong scale or axis lands far above 2.
PARITY_MAX_NOISE_RATIO = 2.0
PARITY_FEEDS = 32


def parity_feeds(calib: CalibrationSet, n: int = PARITY_FEEDS) -> dict[str, Tensor]:
    """n calibration inputs spread over all steps, as engine feeds."""
    return as_feeds(*calib.feeds(n))


@dataclass(frozen=True)
class ExportedGraph:
    """A Q/DQ graph and how it was checked: levels are onnxruntime optimization levels ('disabled'
    runs float kernels — the quantized math exactly; 'all' the host's integer kernels)."""

    path: Path
    flavour: str
    qdq_types: list[str]
    weight_bits: int | None
    levels: tuple[str, ...]
    parity: tuple[Parity, ...]
    float_weight_ops: list[str]

    def as_dict(self) -> dict[str, Any]:
        return {
            "file": self.path.name,
            "flavour": self.flavour,
            "qdq_types": self.qdq_types,
            "weight_bits": self.weight_bits,
            "parity_levels": list(self.levels),
            "parity": [dataclasses.asdict(p) for p in self.parity],
            "float_weight_ops": self.float_weight_ops,
        }


def export_checked(
    qmodel: QuantizedModel,
    path: Path,
    calib: CalibrationSet,
    flavour: str,
    opset: int = 19,
    levels: tuple[str, ...] = ("disabled", "all"),
    source: Path | None = None,
) -> ExportedGraph:
    """Export one Q/DQ flavour and check it against the torch fake-quant model it came from
    (source: the prepared FP graph at `opset`, export_onnx's)."""
    export_onnx(qmodel.fp_module, path, ExportConfig(flavour=flavour, opset=opset), qmodel, source)  # type: ignore[arg-type]
    set_output_quant(qmodel, flavour == "ort-cpu")
    set_step_scales(qmodel, flavour == "ort-cpu")  # the TensorRT graph's scales are static
    try:
        parity = check_parity(
            path, qmodel.module, parity_feeds(calib), qmodel.fp_module, PARITY_MAX_NOISE_RATIO, levels=levels
        )
    finally:
        set_output_quant(qmodel, True)
        set_step_scales(qmodel, True)
    bits = weight_bits_of(qmodel) if backend_of(qmodel.config).weight_forms else None
    return ExportedGraph(Path(path), flavour, qdq_types(path), bits, levels, tuple(parity), float_weight_ops(path))


def build_ort(
    qmodel: QuantizedModel,
    calib: CalibrationSet,
    graph: Path,
    engine: Path,
    flavour: str,
    opset: int,
    host: HostIsa,
    name: str,
    source: Path | None = None,
) -> tuple[ExportedGraph, dict[str, Any]]:
    """export_checked + save_ort_engine: (the checked graph, the engine's facts).  A parity
    failure on integer kernels becomes the one-line reason for this host (parity_failure)."""
    try:
        exported = export_checked(qmodel, graph, calib, flavour, opset, source=source)
    except EngineParityError as err:
        raise parity_failure(err, qmodel, calib, host, name) from None
    return exported, save_ort_engine(graph, engine)


def parity_failure(
    err: EngineParityError, qmodel: QuantizedModel, calib: CalibrationSet, host: HostIsa, name: str
) -> EngineParityError:
    """The one-line reason an exported graph fails its parity check here, and what passes instead."""
    results: tuple[Parity, ...] = err.results  # type: ignore[assignment]
    measured = "; ".join(f"{p.optimization}: {p.noise_ratio:.3f}" for p in results if p.noise_ratio is not None)
    bits, unsigned = weight_form_of(qmodel)
    if results[-1].optimization == "disabled":
        return EngineParityError(
            f"{name}: the Q/DQ graph disagrees with the fake-quant model even on float kernels ({err}); "
            "an export defect, not this host: report it with the recipe"
        )
    backend = backend_of(qmodel.config)
    if backend.weight_forms and bits == 8 and not unsigned and host.int8_saturates:
        with tempfile.TemporaryDirectory(prefix="flowpress-portable-") as tmp:
            try:
                with weights_in(qmodel, PORTABLE_WEIGHT_BITS):
                    portable = export_checked(qmodel, Path(tmp) / "m.onnx", calib, "ort-cpu")
                alternative = f"7-bit weights measured noise ratio {portable.parity[-1].noise_ratio:.3f} here"
            except EngineParityError:
                alternative = "7-bit weights failed too"
        return EngineParityError(
            f"{name}: onnxruntime's int8 kernels on this {host.isa_class} host (no VNNI) saturate 8-bit weights "
            f"(noise ratio vs fake-quant {measured}; limit {PARITY_MAX_NOISE_RATIO}); {alternative}: set "
            "engine.portable: true (or remove engine.portable: false; engine.portable_weights: u8u8 keeps "
            "8-bit weights, exact in onnxruntime's slower U8U8 kernels), or use engine.runtime: openvino"
        )
    fix = backend.parity_fix
    return EngineParityError(
        f"{name}: onnxruntime's integer kernels on this {host.isa_class} host disagree with the graph's float "
        f"kernels (noise ratio vs fake-quant {measured}; limit {PARITY_MAX_NOISE_RATIO}); {fix}"
    )
