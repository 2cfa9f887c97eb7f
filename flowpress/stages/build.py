"""The export + engine stages of a run: Q/DQ graphs checked for parity, the onnxruntime engine,
the OpenVINO engines, and engine.json (what was built, where it was validated)."""

from __future__ import annotations

import dataclasses
from collections.abc import Callable
from importlib import metadata
from pathlib import Path
from typing import Any

from flowpress.calibration import CalibrationSet
from flowpress.compress import (
    PORTABLE_WEIGHT_BITS,
    QuantizedModel,
    backend_of,
    set_weight_bits,
    weight_form_name,
    weight_form_of,
    weights_in,
)
from flowpress.context import RunContext
from flowpress.engines import Engine, OrtEngine
from flowpress.engines.build import build_ort, export_checked, parity_feeds
from flowpress.engines.openvino import OpenVinoEngine
from flowpress.engines.portability import host_figures, host_record, int8_weight_form, resolve_portable
from flowpress.export import ExportConfig, check_parity, export_onnx
from flowpress.export.graphfile import graph_files, remove_graph
from flowpress.export.openvino import OpenVinoConfig, OvPrecision, export_openvino, overflow_fix
from flowpress.rundir import write_json
from flowpress.sampling import Sampler

# openvino-qdq: OpenVINO running flowpress's own Q/DQ graph (the TensorRT placement: inputs and
# weights, static ranges), where openvino-int8 is NNCF's quantization of the FP graph
QDQ = "qdq"


def ov_xml(run: Path, precision: str) -> Path:
    return run / "engine" / f"openvino-{precision}" / "model.xml"


def ort_name(ctx: RunContext) -> str:
    return f"ort-{ctx.recipe.quantize.precision}"


def main_engine(ctx: RunContext) -> str:
    """The engine the recipe's gate judges: ort-<precision> or openvino-<precision>."""
    engine = ctx.recipe.engine
    return f"openvino-{engine.openvino.precision}" if engine.runtime == "openvino" else ort_name(ctx)


def cpu_engines(ctx: RunContext, run: Path, one_at_a_time: bool = False) -> dict[str, tuple[Engine, list[Path]]]:
    """The run's CPU engines by name (ort-<precision>, openvino-<precision>) with the files they ship
    as; one_at_a_time (large models): each runtime is released as soon as it has loaded (its files
    checked), to load again when used, so that no two are ever in memory together."""

    def loaded(engine: Engine) -> Engine:
        release = getattr(engine, "release", None)
        if one_at_a_time and release is not None:
            release()
        return engine

    opt = run / "engine" / "model.opt.onnx"
    name = ort_name(ctx)
    found: dict[str, tuple[Engine, list[Path]]] = {name: (loaded(OrtEngine(opt, ctx.sampler, name)), graph_files(opt))}
    for precision in ("int8", "bf16", "f32", QDQ):
        xml = ov_xml(run, precision)
        if xml.is_file():
            engine = loaded(ov_engine(run, precision, ctx.recipe.engine.openvino, ctx.sampler))
            found[f"openvino-{precision}"] = (engine, [xml, xml.with_suffix(".bin")])
    return found


def ov_engine(run: Path, precision: str, config: OpenVinoConfig, sampler: Sampler) -> OpenVinoEngine:
    """The run's openvino-<precision> engine, compiled with its precision hint (openvino-qdq runs
    int8 kernels, its float parts as an int8 IR's)."""
    runs_as: OvPrecision = "int8" if precision == QDQ else precision  # type: ignore[assignment]
    hint = dataclasses.replace(config, precision=runs_as).inference_hint
    return OpenVinoEngine(ov_xml(run, precision), sampler, hint, f"openvino-{precision}")


def weight_form(ctx: RunContext, qmodel: QuantizedModel) -> None:
    """Set the int8 weights to the form the CPU engines ship on this host (7-bit or U8U8 where portable)."""
    engine = ctx.recipe.engine
    set_weight_bits(qmodel, *int8_weight_form(engine.portable, engine.portable_weights, ctx.host))


def build_engines(
    ctx: RunContext,
    qmodel: QuantizedModel,
    calib: CalibrationSet,
    run: Path,
    release: Callable[[], None] | None = None,
) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Export (parity-checked Q/DQ flavours) and build the engines into `run`; returns
    (exports, engine manifest).  Rebuilding into the same run overwrites the files.  Every graph
    the engines need is exported first; then `release` (when given) frees the torch models and
    the engines are built from the files alone."""
    recipe, timer, host = ctx.recipe, ctx.timer, ctx.host
    portable = resolve_portable(recipe.engine.portable, host)
    backend = backend_of(recipe.quantize)
    bits, unsigned = weight_form_of(qmodel)
    precisions = _openvino_precisions(ctx, large=release is not None)
    prepared = run / "engine" / "prepared_fp32.onnx"
    with timer.stage("export"):
        exports, ort_facts, source = _export_graphs(ctx, qmodel, calib, run)
        if source != prepared:
            remove_graph(source)
            if precisions:
                with timer.stage("export_openvino_source"):
                    export_onnx(qmodel.fp_module, prepared)
    if release is not None:
        release()
    with timer.stage("engine"):
        manifest: dict[str, Any] = {
            "runtime": "onnxruntime",
            "provider": "CPUExecutionProvider",
            "precision": recipe.quantize.precision,
            "flavour": recipe.export.flavour,
            "source": "model.onnx",
            "file": "engine/model.opt.onnx",
            **ort_facts,
            "schedule": ctx.sampler.as_dict(),
            "onnxruntime": metadata.version("onnxruntime"),
            "portable": portable,
            "int8_weights": weight_form_name(bits, unsigned) if backend.weight_forms else None,
        }
        if qmodel.step_scales is not None:
            manifest["activation_scales"] = "per sampler step, gathered by the step input (one step per batch)"
        note = backend.engine_note(recipe.quantize)
        if note is not None:
            manifest["weights"] = note
        for precision in precisions:
            manifest[f"openvino-{precision}"] = _nncf_engine(ctx, run, prepared, precision, calib, portable)
        if recipe.engine.candidates and "int8" not in precisions:
            manifest["openvino-int8"] = {"skipped": NNCF_SKIPPED}
        if prepared.is_file():
            remove_graph(prepared)
        qdq = run / ("model.onnx" if recipe.export.flavour == "tensorrt" else "model.tensorrt.onnx")
        if backend.weight_forms and recipe.engine.candidates and qdq.is_file() and not host.int8_saturates:
            # its weights are signed 8-bit: exact only where the int8 kernels do not saturate (VNNI, AMX)
            manifest[f"openvino-{QDQ}"] = _openvino_qdq(ctx, run, qdq)
        manifest["validated_on"] = host_record(host)
        engines = {name: engine for name, (engine, _) in cpu_engines(ctx, run, one_at_a_time=True).items()}
        fp = OrtEngine(run / "fp32.onnx", ctx.sampler, "ort-fp32", optimization="disabled")
        manifest["host_check"] = {
            "feeds": "32 calibration inputs spread over the steps (calibration/inputs.safetensors)",
            "figures": host_figures(engines, fp, parity_feeds(calib)),
        }
        write_json(run / "engine" / "engine.json", manifest)
    return exports, manifest


def _export_graphs(
    ctx: RunContext, qmodel: QuantizedModel, calib: CalibrationSet, run: Path
) -> tuple[list[dict[str, Any]], dict[str, Any], Path]:
    """fp32.onnx, the recipe's Q/DQ graph and its onnxruntime engine, and the twins, each checked
    against the model it came from; returns (the exports' records, the engine's facts, the
    prepared FP graph the Q/DQ graphs were placed on: engine/prepared_fp32.onnx, OpenVINO's
    source, at the default opset, else a scratch graph beside it, for the caller to remove).

    The CPU engines take the run's int8 weight form (7-bit or U8U8 where portable); the twin of the
    other flavour (the tensorrt graph for GPUs) keeps signed 8-bit and is checked on float kernels
    only where this host's int8 kernels saturate.  The other weight range (8 where 7 ships, else 7)
    is exported as model.w<bits>.onnx for the report's comparison."""
    recipe, timer, host = ctx.recipe, ctx.timer, ctx.host
    backend = backend_of(recipe.quantize)
    bits, unsigned = weight_form_of(qmodel)
    flavour, opset = recipe.export.flavour, recipe.export.opset
    with timer.stage("export_fp32"):
        export_onnx(ctx.fp, run / "fp32.onnx")
        check_parity(run / "fp32.onnx", ctx.fp, {k: v[:8] for k, v in parity_feeds(calib).items()})
    (run / "engine").mkdir(exist_ok=True)
    with timer.stage("export_qdq"):
        opsets_match = opset == ExportConfig().opset
        source = run / "engine" / ("prepared_fp32.onnx" if opsets_match else f"prepared_opset{opset}.onnx")
        export_onnx(qmodel.fp_module, source, ExportConfig(opset=opset))  # traced once, every Q/DQ graph placed on it
        main, ort_facts = build_ort(
            qmodel, calib, run / "model.onnx", run / "engine" / "model.opt.onnx", flavour, opset, host,
            f"{recipe.name}: model.onnx", source,
        )  # fmt: skip
    exports = [main.as_dict()]
    with timer.stage("export_twins"):
        other = backend.twin(flavour)
        if other is not None:
            levels = ("disabled",) if other == "tensorrt" and host.int8_saturates else ("disabled", "all")
            with weights_in(qmodel, *((8, False) if other == "tensorrt" else (bits, unsigned))):
                exports.append(
                    export_checked(qmodel, run / f"model.{other}.onnx", calib, other, opset, levels, source).as_dict()
                )
        if backend.weight_forms and flavour == "ort-cpu":
            alternative = 8 if bits == PORTABLE_WEIGHT_BITS else PORTABLE_WEIGHT_BITS
            with weights_in(qmodel, alternative):
                path = run / f"model.w{alternative}.onnx"
                exports.append(export_checked(qmodel, path, calib, flavour, opset, ("disabled",), source).as_dict())
    return exports, ort_facts, source


NNCF_SKIPPED = (
    "not built: the model is large (its torch weights are released before the engines) and NNCF's int8 "
    "calibration holds several copies of its weights; engine.runtime: openvino with precision int8 builds it"
)


def _openvino_precisions(ctx: RunContext, large: bool) -> list[OvPrecision]:
    """The OpenVINO engines NNCF / OpenVINO build from the FP graph: the recipe's runtime, and with
    engine.candidates every CPU engine flowpress can build, for the recommendation (for a large
    model, the candidates leave out NNCF's int8: NNCF_SKIPPED)."""
    engine = ctx.recipe.engine
    precisions: list[OvPrecision] = [engine.openvino.precision] if engine.runtime == "openvino" else []
    if engine.candidates:
        precisions += [p for p in (("bf16",) if large else ("int8", "bf16")) if p not in precisions]  # type: ignore[misc]
    return precisions


def _nncf_engine(
    ctx: RunContext, run: Path, prepared: Path, precision: OvPrecision, calib: CalibrationSet, portable: bool
) -> dict[str, Any]:
    """Build openvino-<precision> from the prepared FP graph (NNCF's int8 on the calibration set,
    or bf16 / f32); returns its engine-manifest record."""
    ov_config = dataclasses.replace(ctx.recipe.engine.openvino, precision=precision)
    exclude = ctx.recipe.quantize.exclude
    export_openvino(prepared, ov_xml(run, precision), ov_config, calib, portable, exclude)
    int8 = precision == "int8"  # OpenVINO's own int8 (NNCF), whatever the run's precision
    return {
        "version": metadata.version("openvino"),
        "precision": precision,
        "inference_precision_hint": ov_config.inference_hint,
        "nncf_preset": ("transformer" if ov_config.transformer else "default") if int8 else None,
        "overflow_fix": overflow_fix(portable) if int8 else None,
        "smooth_quant": ov_config.smooth_quant if int8 else None,
        "float_layers": list(exclude) if int8 else None,
        "source": "the FP graph with temporal tables and split shortcuts, quantized by NNCF on calibration/"
        if int8
        else "the FP graph with temporal tables",
        "static_batch": "compiled per batch size at load",
    }


def _openvino_qdq(ctx: RunContext, run: Path, qdq: Path) -> dict[str, Any]:
    """openvino-qdq: OpenVINO running flowpress's own Q/DQ graph on its int8 kernels; its record."""
    ov_main = ctx.recipe.engine.openvino
    export_openvino(qdq, ov_xml(run, QDQ), dataclasses.replace(ov_main, precision="f32"))
    return {
        "version": metadata.version("openvino"),
        "precision": "int8",
        "inference_precision_hint": dataclasses.replace(ov_main, precision="int8").inference_hint,
        "source": f"{qdq.name}: flowpress's own Q/DQ graph (inputs and 8-bit weights, static ranges), "
        "run on OpenVINO's int8 kernels",
        "static_batch": "compiled per batch size at load",
    }
