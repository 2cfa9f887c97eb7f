"""Every engine the bench compares, for one model: the peers as a user builds them by hand, and
flowpress's engines as `make quantize` builds them on this host (through flowpress.engines.build)."""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from benchmarks.bench.config import BenchConfig, BenchModel
from benchmarks.bench.models import forward_flops
from benchmarks.common import int8_form, ort_quantize_static
from flowpress.calibration import CalibrationConfig, CalibrationSet, capture
from flowpress.compress import QuantizedModel, quantize, weight_form_name, weight_form_of, weights_in
from flowpress.engines import Engine, OrtEngine, TorchEngine
from flowpress.engines.build import build_ort, export_checked
from flowpress.engines.isa import HostIsa, host_isa
from flowpress.engines.openvino import OpenVinoEngine
from flowpress.errors import FlowpressError
from flowpress.export import export_onnx
from flowpress.export.openvino import OpenVinoConfig, export_openvino, overflow_fix
from flowpress.models import DiffusersDenoiser, StepModel, load_source
from flowpress.recipe import Recipe, load_recipe
from flowpress.sampling import Sampler


@dataclass
class Built:
    """One variant's engine and the files it ships as."""

    engine: Engine
    files: list[Path] = field(default_factory=list)
    guidance: float | None = None  # None: the model's; a student samples with its own


Loader = Callable[[], Built]


def calibrate(model: DiffusersDenoiser, sampler: Sampler, config: CalibrationConfig, guidance: float) -> CalibrationSet:
    """flowpress's calibration set: the FP model's inputs along seeded trajectories, classes cycling."""
    step_model = StepModel(model, sampler).eval()
    cond = model.cycling_condition(config.n_samples)
    return capture(step_model, sampler, model.sample_shape, cond, config, guidance, model.null_condition())


def ir_files(xml: Path) -> list[Path]:
    return [xml, xml.with_suffix(".bin")]


def ours_ort(
    qmodel: QuantizedModel, recipe: Recipe, calib: CalibrationSet, workdir: Path, stem: str, host: HostIsa, name: str
) -> Path:
    """The onnxruntime engine `make quantize` builds from `recipe`: parity-checked Q/DQ export,
    saved as onnxruntime optimizes it (the one engine builder, flowpress.engines.build)."""
    engine = workdir / f"{stem}.opt.onnx"
    build_ort(qmodel, calib, workdir / f"{stem}.onnx", engine, recipe.export.flavour, recipe.export.opset, host, name)
    return engine


def build_variants(
    model: DiffusersDenoiser,
    spec: BenchModel,
    schedule: Sampler,
    guidance: float,
    config: BenchConfig,
    workdir: Path,
    host: HostIsa | None = None,
) -> dict[str, Any]:
    """Write every variant's engine files into workdir; returns loaders (name -> () -> Built) and
    the int8 weight form flowpress's engines took on `host` (default: this one).  The peers stay
    as a user builds them: NNCF's and quantize_static's defaults, never portable."""
    host = host or host_isa()
    recipe = load_recipe(spec.recipe)
    if spec.portable_weights is not None:
        recipe = dataclasses.replace(
            recipe, engine=dataclasses.replace(recipe.engine, portable_weights=spec.portable_weights)
        )
    calib = calibrate(model, schedule, recipe.calibration, guidance)
    # the peers calibrate on the same inputs, shuffled (every step equally often, as random-t
    # draws would): the rows then differ only in what each method does with them
    peer_calib = calib.subset(torch.randperm(len(calib), generator=torch.Generator().manual_seed(0)))
    qmodel = quantize(model, recipe.quantize, calib, schedule)
    portable = int8_form(qmodel, recipe, host)
    int8 = recipe.quantize.precision == "int8"
    # variant -> portable, for flowpress's engines with int8 weights
    portable_of: dict[str, bool] = {}
    fp_step_model = StepModel(model, schedule).eval()
    fp32 = export_onnx(fp_step_model, workdir / "fp32.onnx")
    prepared = export_onnx(qmodel.fp_module, workdir / "prepared_fp32.onnx")
    threads = config.threads
    loaders: dict[str, Loader] = {}
    want = set(config.variants)
    if "torch-fp32" in want:
        loaders["torch-fp32"] = lambda: Built(TorchEngine(fp_step_model, schedule, "torch-fp32"))
    if "ort-fp32" in want:
        loaders["ort-fp32"] = lambda: Built(OrtEngine(fp32, schedule, "ort-fp32", threads), [fp32])
    if "ort-quantize-static" in want:
        static = ort_quantize_static(fp32, peer_calib, workdir / "ort_static.onnx", ("Conv", "MatMul", "Gemm"))
        loaders["ort-quantize-static"] = lambda: Built(
            OrtEngine(static, schedule, "ort-quantize-static", threads), [static]
        )
    if "ov-bf16" in want:
        ov_plain = export_openvino(fp32, workdir / "ov-default" / "model.xml", OpenVinoConfig("f32"))
        loaders["ov-bf16"] = lambda: Built(
            OpenVinoEngine(ov_plain, schedule, None, "ov-bf16", threads), ir_files(ov_plain)
        )
    if "ov-nncf-default" in want:
        nncf_default = export_openvino(
            fp32, workdir / "ov-nncf-default" / "model.xml", OpenVinoConfig("int8", transformer=False), peer_calib
        )
        loaders["ov-nncf-default"] = lambda: Built(
            OpenVinoEngine(nncf_default, schedule, None, "ov-nncf-default", threads), ir_files(nncf_default)
        )
    if "flowpress-ort-int8" in want:
        opt = ours_ort(qmodel, recipe, calib, workdir, "model", host, f"bench {spec.name}: flowpress-ort-int8")
        if int8:
            portable_of["flowpress-ort-int8"] = portable
        loaders["flowpress-ort-int8"] = lambda: Built(OrtEngine(opt, schedule, "flowpress-ort-int8", threads), [opt])
    # the portable twins: the same calibration and quantizer, the form that is exact on every x86 host
    twins = int8 and not portable
    if twins and "flowpress-ort-int8-portable" in want:
        portable_recipe = dataclasses.replace(recipe, engine=dataclasses.replace(recipe.engine, portable=True))
        int8_form(qmodel, portable_recipe, host)
        twin = ours_ort(
            qmodel, portable_recipe, calib, workdir, "portable", host, f"bench {spec.name}: flowpress-ort-int8-portable"
        )
        int8_form(qmodel, recipe, host)
        portable_of["flowpress-ort-int8-portable"] = True
        loaders["flowpress-ort-int8-portable"] = functools.partial(
            _ort_built, twin, schedule, "flowpress-ort-int8-portable", threads
        )
    for variant, other_recipe in (("flowpress-fp8", spec.fp8_recipe), ("flowpress-w4a8", spec.w4a8_recipe)):
        if variant in want and other_recipe:
            other = load_recipe(other_recipe)
            other_calib = (
                calib
                if other.calibration == recipe.calibration
                else calibrate(model, schedule, other.calibration, guidance)
            )
            other_qmodel = quantize(model, other.quantize, other_calib, schedule)
            int8_form(other_qmodel, other, host)  # fp8 / w4a8 keep their weights: a no-op
            path = ours_ort(other_qmodel, other, other_calib, workdir, variant, host, f"bench {spec.name}: {variant}")
            loaders[variant] = functools.partial(_ort_built, path, schedule, variant, threads)
    student_flops = {}
    if "student" in want and spec.student_recipe:
        loaders["student"], student, portable_of["student"] = build_student(
            spec.student_recipe, model, threads, workdir / "student", host
        )
        student_flops = {b: forward_flops(student, b) for b in config.batches}
    ov_int8 = dataclasses.replace(recipe.engine.openvino, precision="int8")
    ov_forms = {"flowpress-ov-int8": portable, **({"flowpress-ov-int8-portable": True} if twins else {})}
    for variant, ov_portable in ov_forms.items():
        if variant in want:
            xml = export_openvino(prepared, workdir / variant / "model.xml", ov_int8, calib, portable=ov_portable)
            portable_of[variant] = ov_portable
            loaders[variant] = functools.partial(_ov_built, xml, schedule, ov_int8.inference_hint, variant, threads)
    if int8 and "flowpress-ov-qdq" in want and not host.int8_saturates:
        # make quantize's openvino-qdq: OpenVINO on flowpress's own Q/DQ graph, signed 8-bit
        # weights (exact only where the int8 kernels do not saturate: VNNI, AMX)
        qdq = workdir / "model.tensorrt.onnx"
        with weights_in(qmodel, 8):
            export_checked(qmodel, qdq, calib, "tensorrt", recipe.export.opset, ("disabled", "all"))
        xml = export_openvino(
            qdq, workdir / "flowpress-ov-qdq" / "model.xml", dataclasses.replace(ov_int8, precision="f32")
        )
        portable_of["flowpress-ov-qdq"] = False
        loaders["flowpress-ov-qdq"] = functools.partial(
            _ov_built, xml, schedule, ov_int8.inference_hint, "flowpress-ov-qdq", threads
        )
    if "flowpress-ov-bf16" in want:
        ours_bf16 = export_openvino(prepared, workdir / "ov-bf16" / "model.xml", OpenVinoConfig("bf16"))
        loaders["flowpress-ov-bf16"] = lambda: Built(
            OpenVinoEngine(ours_bf16, schedule, "bf16", "flowpress-ov-bf16", threads), ir_files(ours_bf16)
        )
    return {
        "loaders": loaders,
        "calib_inputs": len(calib),
        "student_flops": student_flops,
        "portable_of": portable_of,
        "int8": {
            "isa_class": host.isa_class,
            "emulated": host.emulated,
            "portable": portable,
            "int8_weights": weight_form_name(*weight_form_of(qmodel)) if int8 else None,
            "overflow_fix": overflow_fix(portable),
        },
    }


def build_student(
    recipe_path: str, teacher: DiffusersDenoiser, threads: int, workdir: Path, host: HostIsa
) -> tuple[Loader, DiffusersDenoiser, bool]:
    """The distilled student as flowpress ships it: its own recipe's calibration (one-step
    inputs) into OpenVINO int8 (portable as its recipe resolves on `host`), sampled with its own
    schedule and guidance.  Returns (loader, student, portable)."""
    recipe = load_recipe(recipe_path)
    source = load_source(recipe.model.path, recipe.model.time_scale, recipe.model.scheduler)
    student = source.denoiser.eval()
    if (student.sample_shape, student.num_classes) != (teacher.sample_shape, teacher.num_classes):
        raise FlowpressError(
            f"bench student_recipe {recipe_path}: its model takes {student.sample_shape} with "
            f"{student.num_classes} classes, the teacher {teacher.sample_shape} with {teacher.num_classes}; "
            "name the student distilled from this model (`make distill`)"
        )
    schedule = source.sampler(recipe.sampling.steps, recipe.sampling.method)  # the student's own sampler
    calib = calibrate(student, schedule, recipe.calibration, recipe.sampling.guidance)
    qmodel = quantize(student, recipe.quantize, calib, schedule)
    portable = int8_form(qmodel, recipe, host)
    workdir.mkdir(parents=True, exist_ok=True)
    prepared = export_onnx(qmodel.fp_module, workdir / "prepared_fp32.onnx")
    config = dataclasses.replace(recipe.engine.openvino, precision="int8")
    xml = export_openvino(prepared, workdir / "ov-int8" / "model.xml", config, calib, portable=portable)

    def loader() -> Built:
        engine = OpenVinoEngine(xml, schedule, config.inference_hint, "student", threads)
        return Built(engine, ir_files(xml), recipe.sampling.guidance)

    return loader, student, portable


def _ort_built(path: Path, schedule: Sampler, name: str, threads: int) -> Built:
    return Built(OrtEngine(path, schedule, name, threads), [path])


def _ov_built(xml: Path, schedule: Sampler, hint: str | None, name: str, threads: int) -> Built:
    return Built(OpenVinoEngine(xml, schedule, hint, name, threads), ir_files(xml))
