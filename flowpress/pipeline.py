"""Stage chaining: recipe -> model -> calibration -> quantize -> export -> engine -> compare."""

from __future__ import annotations

import dataclasses
import json
import platform
import shutil
import tempfile
import time
from contextlib import contextmanager
from importlib import metadata
from pathlib import Path
from typing import Any

import numpy as np
import torch

from calibration import CalibrationSet, capture
from compress import (
    PORTABLE_WEIGHT_BITS,
    QuantizedModel,
    SensitivityConfig,
    layer_sensitivity,
    quantize,
    set_output_quant,
    set_weight_bits,
    weight_bits_of,
)
from engines import (
    CompareConfig,
    Comparison,
    Engine,
    EngineVelocity,
    OrtEngine,
    TorchEngine,
    compare,
    interleaved_step_times,
    judge,
    recommend,
    report_dict,
    write_report,
)
from engines.isa import HostIsa, host_isa
from engines.openvino import OpenVinoEngine
from engines.portability import check_engine_host, host_figures, host_record, resolve_portable
from export import (
    ExportConfig,
    StepModel,
    build_ort_engine,
    check_parity,
    export_onnx,
    float_weight_ops,
    qdq_types,
)
from export.openvino import export_openvino, overflow_fix
from flowpress.mixed import EngineCheck, SearchResult, gated_search
from flowpress.recipe import Recipe, TeacherRecipe, load_teacher_recipe, to_dict
from flowpress.rundir import (
    read_manifest,
    record_outputs,
    run_lock,
    staged_run,
    tree_hashes,
    verify_inputs,
    verify_run,
    write_json,
)
from models import DiffusersVelocity, load_digits, load_model
from models.classifier import ClassifierConfig, DigitClassifier, classifier_accuracy, load_classifier, train_classifier
from models.teacher import train_teacher
from sampling import EngineParityError, FlowpressError, Schedule, noise_for_seeds, sample

# the CPU engines' latency: interleaved rounds of LATENCY_SETTLE untimed + LATENCY_BLOCK timed
# forwards per runtime (engines/compare.py interleaved_step_times says why rounds must be long)
LATENCY_BLOCK, LATENCY_SETTLE = 10, 3

# ||ORT - fake-quant|| / ||fake-quant - FP|| per forward (ort-cpu, optimizations off / on):
# measured 0.40 / 0.83 on the default UNet, 0.07 / 0.42 on the DiT, 0.09 / 1.05 on the tests'
# tiny UNet (rounding flips amplify through chained
# quantizers); a broken export (wrong scale or axis) lands far above 2.  fp8 (tensorrt
# placement, E4M3): 0.18 / 0.18 on the default UNet, 0.03 / 0.03 on the DiT, 0.07 / 0.07 on the tiny UNet.
PARITY_MAX_NOISE_RATIO = 2.0
PACKAGES = (
    "torch",
    "onnx",
    "onnxruntime",
    "onnxscript",
    "nvidia-modelopt",
    "brevitas",
    "diffusers",
    "openvino",
    "nncf",
    "numpy",
    "scikit-learn",
)


class Timer:
    def __init__(self) -> None:
        self.seconds: dict[str, float] = {}

    @contextmanager
    def stage(self, name: str):  # noqa: ANN201
        start = time.perf_counter()
        yield
        self.seconds[name] = round(time.perf_counter() - start, 3)


def versions() -> dict[str, str]:
    found = {"python": platform.python_version()}
    for name in PACKAGES:
        try:
            found[name] = metadata.version(name)
        except metadata.PackageNotFoundError:
            found[name] = "missing"
    return found


# ---------------------------------------------------------------- teacher and classifier


def ensure_classifier(path: str, progress: bool = True) -> DigitClassifier:
    if not (Path(path) / "model.safetensors").is_file():
        print(f"[flowpress] classifier missing at {path}: training it (about half a minute)")
        train_classifier(ClassifierConfig(out=path), progress)
    return load_classifier(path)


@torch.no_grad()
def teacher_accuracy(
    model: DiffusersVelocity, classifier: DigitClassifier, n: int, steps: int, guidance: float
) -> float:
    """Fraction of n samples (steps Euler steps, labels cycling 0..9) recognised as their class."""
    labels = torch.arange(n) % 10
    finals = []
    for start in range(0, n, 100):
        chunk = list(range(start, min(n, start + 100)))
        traj = sample(
            model,
            noise_for_seeds(chunk, model.sample_shape),
            labels[chunk],
            Schedule(steps),
            guidance,
            model.null_label,
        )
        finals.append(traj.final.clamp(-1, 1))
    return classifier_accuracy(classifier, torch.cat(finals), labels)


def run_teacher(recipe: TeacherRecipe, progress: bool = True) -> dict[str, Any]:
    """Train the teacher (and the classifier when missing), then measure the teacher's bar."""
    classifier = ensure_classifier(recipe.classifier.path, progress)
    config = recipe.teacher
    out = train_teacher(config, progress)
    model = load_model(out)
    accuracy = teacher_accuracy(model, classifier, config.eval_samples, config.eval_steps, config.eval_guidance)
    meta_path = out / "flowpress.json"
    meta = json.loads(meta_path.read_text())
    meta["eval"] = {
        "classifier_acc": accuracy,
        "samples": config.eval_samples,
        "steps": config.eval_steps,
        "guidance": config.eval_guidance,
    }
    meta_path.write_text(json.dumps(meta, indent=2) + "\n")
    print(
        f"[flowpress] teacher {out}: {accuracy:.1%} of {config.eval_samples} samples ({config.eval_steps} Euler steps, guidance {config.eval_guidance}) recognised as their class"
    )
    return meta


def ensure_model(recipe: Recipe, progress: bool = True) -> DiffusersVelocity:
    path = Path(recipe.model.path)
    if not path.exists() and recipe.model.teacher_recipe:
        print(f"[flowpress] model missing at {path}: training it with {recipe.model.teacher_recipe}")
        teacher = load_teacher_recipe(recipe.model.teacher_recipe)
        if Path(teacher.teacher.out) != path:
            raise FlowpressError(
                f"{recipe.model.teacher_recipe}: teacher.out {teacher.teacher.out!r} differs from model.path {str(path)!r}"
            )
        run_teacher(teacher, progress)
    return load_model(path, recipe.model.time_scale)


# ---------------------------------------------------------------- quantize, end to end


def _parity_feeds(calib: CalibrationSet, n: int = 32) -> dict[str, torch.Tensor]:
    """n calibration inputs spread over all steps, as engine feeds."""
    index = torch.linspace(0, len(calib) - 1, n).long()
    feeds = {"x": calib.x[index], "step": calib.step[index]}
    if calib.cond is not None:
        feeds["class_labels"] = calib.cond[index]
    return feeds


def export_checked(
    qmodel: QuantizedModel,
    schedule: Schedule,
    flavour: str,
    path: Path,
    calib: CalibrationSet,
    opset: int = 19,
    levels: tuple[str, ...] = ("disabled", "all"),
) -> dict[str, Any]:
    """Export one Q/DQ flavour and check it against the torch fake-quant model it came from
    (onnxruntime optimizations `levels`: 'disabled' runs float kernels, 'all' the host's
    integer kernels)."""
    export_onnx(qmodel.fp_module, schedule, path, ExportConfig(flavour=flavour, opset=opset), qmodel)  # type: ignore[arg-type]
    set_output_quant(qmodel, flavour == "ort-cpu")
    reference, fp = StepModel(qmodel.module, schedule).eval(), StepModel(qmodel.fp_module, schedule).eval()
    try:
        parity = check_parity(path, reference, _parity_feeds(calib), fp, PARITY_MAX_NOISE_RATIO, levels=levels)
    finally:
        set_output_quant(qmodel, True)
    return {
        "flavour": flavour,
        "qdq_types": qdq_types(path),
        "weight_bits": weight_bits_of(qmodel) if qmodel.config.precision == "int8" else None,
        "parity_levels": list(levels),
        "parity": [dataclasses.asdict(p) for p in parity],
        "float_weight_ops": float_weight_ops(path),
    }


def _parity_failure(
    err: EngineParityError, qmodel: QuantizedModel, schedule: Schedule, calib: CalibrationSet, host: HostIsa, name: str
) -> EngineParityError:
    """The one-line reason an exported graph fails its parity check here, and what passes instead."""
    measured = "; ".join(f"{p.optimization}: {p.noise_ratio:.3f}" for p in err.results if p.noise_ratio is not None)  # type: ignore[attr-defined]
    bits = weight_bits_of(qmodel)
    float_ok = err.results[-1].optimization != "disabled"  # type: ignore[attr-defined]
    if not float_ok:
        return EngineParityError(
            f"{name}: the Q/DQ graph disagrees with the fake-quant model even on float kernels ({err}); "
            "an export defect, not this host: report it with the recipe"
        )
    if qmodel.config.precision == "int8" and bits == 8 and host.int8_saturates:
        with tempfile.TemporaryDirectory(prefix="flowpress-portable-") as tmp:
            set_weight_bits(qmodel, PORTABLE_WEIGHT_BITS)
            try:
                portable = export_checked(qmodel, schedule, "ort-cpu", Path(tmp) / "m.onnx", calib)
                alternative = f"7-bit weights measured noise ratio {portable['parity'][-1]['noise_ratio']:.3f} here"
            except EngineParityError:
                alternative = "7-bit weights failed too"
            finally:
                set_weight_bits(qmodel, bits)
        return EngineParityError(
            f"{name}: onnxruntime's int8 kernels on this {host.isa_class} host (no VNNI) saturate 8-bit weights "
            f"(noise ratio vs fake-quant {measured}; limit {PARITY_MAX_NOISE_RATIO}); {alternative}: set "
            "engine.portable: true (or remove engine.portable: false), or use engine.runtime: openvino"
        )
    return EngineParityError(
        f"{name}: onnxruntime's integer kernels on this {host.isa_class} host disagree with the graph's float "
        f"kernels (noise ratio vs fake-quant {measured}; limit {PARITY_MAX_NOISE_RATIO}); try engine.portable: true "
        "or engine.runtime: openvino"
    )


def _parity_feeds_of(run: Path) -> dict[str, torch.Tensor]:
    """The parity feeds of a finished run's stored calibration inputs."""
    return _parity_feeds(CalibrationSet.load(run / "calibration" / "inputs.safetensors"))


def _build_engine(
    recipe: Recipe,
    model: DiffusersVelocity,
    qmodel: QuantizedModel,
    calib: CalibrationSet,
    run: Path,
    timer: Timer,
    host: HostIsa,
) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Export (parity-checked Q/DQ flavours) and build the engines into `run`; returns
    (exports, engine manifest). Rebuilding into the same run overwrites the files.

    The CPU engines take the run's int8 weight bits (7 where portable); the tensorrt graph for
    GPUs keeps 8 and is checked on float kernels only where this host's int8 kernels saturate.
    The int8 form not shipped is exported as model.w<bits>.onnx for the report's comparison."""
    schedule = recipe.sampling.schedule()
    portable = resolve_portable(recipe.engine.portable, host)
    int8 = recipe.quantize.precision == "int8"
    bits = weight_bits_of(qmodel)
    with timer.stage("export"):
        export_onnx(model, schedule, run / "fp32.onnx")
        fp_feeds = {k: v[:8] for k, v in _parity_feeds(calib).items()}
        check_parity(run / "fp32.onnx", StepModel(model, schedule).eval(), fp_feeds)
        flavour = recipe.export.flavour
        opset = recipe.export.opset
        try:
            exports = [export_checked(qmodel, schedule, flavour, run / "model.onnx", calib, opset)]
        except EngineParityError as err:
            raise _parity_failure(err, qmodel, schedule, calib, host, f"{recipe.name}: model.onnx") from None
        if recipe.quantize.precision != "fp8":  # fp8 has one flavour (symmetric E4M3)
            other = "tensorrt" if flavour == "ort-cpu" else "ort-cpu"
            levels = ("disabled",) if other == "tensorrt" and host.int8_saturates else ("disabled", "all")
            if other == "tensorrt":
                set_weight_bits(qmodel, 8)
            try:
                exports.append(
                    export_checked(qmodel, schedule, other, run / f"model.{other}.onnx", calib, opset, levels)
                )
            finally:
                set_weight_bits(qmodel, bits)
        if int8 and flavour == "ort-cpu":  # the other weight range, for the report's comparison
            alternative = 8 if bits == PORTABLE_WEIGHT_BITS else PORTABLE_WEIGHT_BITS
            set_weight_bits(qmodel, alternative)
            try:
                path = run / f"model.w{alternative}.onnx"
                exports.append(export_checked(qmodel, schedule, flavour, path, calib, opset, ("disabled",)))
            finally:
                set_weight_bits(qmodel, bits)
    with timer.stage("engine"):
        (run / "engine").mkdir(exist_ok=True)
        ort_facts = build_ort_engine(run / "model.onnx", run / "engine" / "model.opt.onnx")
        engine_manifest: dict[str, Any] = {
            "runtime": "onnxruntime",
            "provider": "CPUExecutionProvider",
            "precision": recipe.quantize.precision,
            "flavour": flavour,
            "source": "model.onnx",
            "file": "engine/model.opt.onnx",
            **ort_facts,
            "schedule": schedule.as_dict(),
            "onnxruntime": metadata.version("onnxruntime"),
            "portable": portable,
            "int8_weights": f"{bits}-bit" if int8 else None,
        }
        if recipe.quantize.precision == "w4a8":
            from compress.w4a8 import engine_note

            engine_manifest["weights"] = engine_note(recipe.quantize)
        ov_main = recipe.engine.openvino
        precisions = [ov_main.precision] if recipe.engine.runtime == "openvino" else []
        if recipe.engine.candidates:  # every CPU engine flowpress can build, for the recommendation
            precisions += [p for p in ("int8", "bf16") if p not in precisions]
        if precisions:
            export_onnx(qmodel.fp_module, schedule, run / "engine" / "prepared_fp32.onnx")
            for precision in precisions:
                ov_config = dataclasses.replace(ov_main, precision=precision)
                xml = _ov_xml(run, precision)
                export_openvino(run / "engine" / "prepared_fp32.onnx", xml, ov_config, calib, portable)
                engine_manifest[f"openvino-{precision}"] = {
                    "version": metadata.version("openvino"),
                    "precision": precision,
                    "inference_precision_hint": ov_config.inference_hint,
                    "nncf_preset": ("transformer" if ov_config.transformer else "default")
                    if precision == "int8"
                    else None,
                    "overflow_fix": overflow_fix(portable) if precision == "int8" else None,
                    "source": "the FP graph with temporal tables and split shortcuts, quantized by NNCF on calibration/"
                    if precision == "int8"
                    else "the FP graph with temporal tables",
                    "static_batch": "compiled per batch size at load",
                }
            (run / "engine" / "prepared_fp32.onnx").unlink()
        engine_manifest["validated_on"] = host_record(host)
        engines = {name: engine for name, (engine, _) in _cpu_engines(recipe, run, schedule).items()}
        fp = OrtEngine(run / "fp32.onnx", schedule, "ort-fp32", optimization="disabled")
        engine_manifest["host_check"] = {
            "feeds": "32 calibration inputs spread over the steps (calibration/inputs.safetensors)",
            "figures": host_figures(engines, fp, _parity_feeds(calib)),
        }
        (run / "engine" / "engine.json").write_text(json.dumps(engine_manifest, indent=2) + "\n")
    return exports, engine_manifest


def _mixed_precision(
    recipe: Recipe,
    model: DiffusersVelocity,
    classifier: DigitClassifier,
    qmodel: QuantizedModel,
    calib: CalibrationSet,
    run: Path,
    timer: Timer,
    progress: bool,
) -> tuple[list[dict[str, Any]], dict[str, Any], dict[str, Any], SearchResult]:
    """Rank layers by trajectory sensitivity, then keep them in full precision one at a time
    until the gate passes; returns (exports, engine manifest, report, search) of the confirmed
    assignment and raises FlowpressError when none passes."""
    config = recipe.quantize.mixed_precision
    schedule = recipe.sampling.schedule()
    names = [name for name in qmodel.layers if config.allows(name)]
    if not names:
        raise FlowpressError(
            f"{recipe.name}: quantize.mixed_precision.candidates {list(config.candidates)} match no quantized layer; "
            "use module names as listed under quantized_layers in a run's manifest.json"
        )
    with timer.stage("sensitivity"):
        set_output_quant(qmodel, recipe.export.flavour == "ort-cpu")  # as the engine runs it
        sensitivity = SensitivityConfig(
            schedule,
            config.sensitivity_samples,
            config.sensitivity_seed_base,
            recipe.compare.batch_size,
            recipe.sampling.guidance,
            model.null_label,
        )
        ranking = layer_sensitivity(model, qmodel, sensitivity, progress, names)
        set_output_quant(qmodel, True)
    check = EngineCheck(
        EngineVelocity(TorchEngine(model, schedule, "torch-fp32")),
        compare_config(recipe, model.null_label),
        config.check_samples,
        schedule,
        classifier,
        _real_features(classifier),
        model.sample_shape,
        model.num_classes or 0,
        run / ".search",
        recipe.compare.latency_runs,
    )
    found: dict[str, Any] = {}

    def confirm(search: SearchResult) -> bool:
        shutil.rmtree(run / ".search", ignore_errors=True)
        found["exports"], found["engine"] = _build_engine(recipe, model, qmodel, calib, run, timer, host_isa())
        found["report"] = _compare_stage(recipe, model, classifier, run, timer, progress, search)
        return bool(found["report"]["gate"]["passed"])

    with timer.stage("mixed_precision"):
        search = gated_search(qmodel, ranking, config, check, confirm, lambda line: print(f"[flowpress] {line}"))
    return found["exports"], found["engine"], found["report"], search


def _real_features(classifier: DigitClassifier) -> np.ndarray:
    """Classifier features of every real digit: the Frechet distance's reference."""
    real = load_digits("all").images
    with torch.no_grad():
        return torch.cat([classifier.embed(chunk) for chunk in real.split(256)]).numpy()


def run_quantize(recipe: Recipe, runs_root: str | Path = "runs", progress: bool = True) -> tuple[Path, dict[str, Any]]:
    """The whole chain into runs/<name>/; returns (run dir, report). The gate decides the exit code."""
    timer = Timer()
    schedule = recipe.sampling.schedule()
    final_dir = Path(runs_root) / recipe.name
    if recipe.quantize.mixed_precision.enabled and recipe.engine.runtime != "onnxruntime":
        raise FlowpressError(
            f"{recipe.name}: quantize.mixed_precision needs engine.runtime 'onnxruntime' (OpenVINO int8 engines "
            "are quantized by NNCF, not from flowpress's layers); disable one of them"
        )
    with timer.stage("load"):
        model = ensure_model(recipe, progress)
        classifier = ensure_classifier(recipe.classifier.path, progress)
    if not model.num_classes:
        raise FlowpressError(
            f"{recipe.model.path}: flowpress compares class-conditional models for now (num_class_embeds is unset)"
        )
    guidance, null = recipe.sampling.guidance, model.null_label
    with run_lock(final_dir, "quantize"), staged_run(final_dir) as run:
        with timer.stage("calibrate"):
            calib = capture(model, model.sample_shape, model.num_classes, schedule, recipe.calibration, guidance, null)
            (run / "calibration").mkdir()
            calib.save(run / "calibration" / "inputs.safetensors")
        with timer.stage("quantize"):
            qmodel = quantize(model, recipe.quantize, calib)
            host = host_isa()
            portable = resolve_portable(recipe.engine.portable, host)
            set_weight_bits(qmodel, PORTABLE_WEIGHT_BITS if portable else 8)
        search = None
        if recipe.quantize.mixed_precision.enabled:
            exports, engine_manifest, report, search = _mixed_precision(
                recipe, model, classifier, qmodel, calib, run, timer, progress
            )
        else:
            exports, engine_manifest = _build_engine(recipe, model, qmodel, calib, run, timer, host)
            report = _compare_stage(recipe, model, classifier, run, timer, progress)
        manifest = {
            "recipe": to_dict(recipe),
            "versions": versions(),
            "schedule": schedule.as_dict(),
            "calibration": {
                "seeds": [
                    recipe.calibration.seed_base,
                    recipe.calibration.seed_base + recipe.calibration.n_samples - 1,
                ],
                "inputs": len(calib),
            },
            "precision": recipe.quantize.precision,
            "ort_engine": {k: engine_manifest[k] for k in ("file", "qdq_types", "disabled_optimizers", "int8_weights")},
            "host": engine_manifest["validated_on"],
            "quantized_layers": sorted(qmodel.layers),
            "full_precision_fallback": search.fallback_layers if search is not None else [],
            "temporal_modules": {"mode": recipe.quantize.temporal, "modules": qmodel.temporal_modules},
            "exports": exports,
            **({"reconstruction": qmodel.reconstruction} if qmodel.reconstruction else {}),
            "inputs": {
                "model": tree_hashes(Path(recipe.model.path)),
                "classifier": tree_hashes(Path(recipe.classifier.path)),
            },
            "stage_seconds": timer.seconds,
        }
        manifest["outputs"] = tree_hashes(run)
        write_json(run / "manifest.json", manifest)
    return final_dir, report


def compare_config(recipe: Recipe, null_label: int | None) -> CompareConfig:
    """The recipe's compare section, sampler guidance and gate as a CompareConfig."""
    return CompareConfig(
        n_samples=recipe.compare.n_samples,
        seed_base=recipe.compare.seed_base,
        batch_size=recipe.compare.batch_size,
        guidance=recipe.sampling.guidance,
        null_label=null_label,
        gate=recipe.gate,
    )


def _compare_stage(
    recipe: Recipe,
    model: DiffusersVelocity,
    classifier: DigitClassifier,
    run: Path,
    timer: Timer,
    progress: bool,
    search: SearchResult | None = None,
) -> dict[str, Any]:
    schedule = recipe.sampling.schedule()
    config = compare_config(recipe, model.null_label)
    reference = TorchEngine(model, schedule, "torch-fp32")
    candidates = _cpu_engines(recipe, run, schedule)
    main = f"openvino-{recipe.engine.openvino.precision}" if recipe.engine.runtime == "openvino" else _ort_name(recipe)
    engine, engine_files = candidates[main]
    engine_manifest = json.loads((run / "engine" / "engine.json").read_text())
    with timer.stage("host_check"):
        fp_graph = OrtEngine(run / "fp32.onnx", schedule, "ort-fp32", optimization="disabled")
        revalidated = check_engine_host(
            engine_manifest,
            {name: e for name, (e, _) in candidates.items()},
            fp_graph,
            lambda: _parity_feeds_of(run),
            f"{recipe.name}: engine/",
        )
    real_features = _real_features(classifier)
    with timer.stage("compare"):
        comparison = compare(
            reference, engine, config, classifier, real_features, model.sample_shape, model.num_classes, progress
        )
    with timer.stage("latency"):
        runtimes: dict[str, Engine] = {
            "torch_fp32": reference,
            "ort_fp32": OrtEngine(run / "fp32.onnx", schedule, "ort-fp32"),
            "engine": engine,
        }
        runtimes.update({name.replace("-", "_"): e for name, (e, _) in candidates.items() if name != main})
        latency: dict[str, dict[str, float]] = {name: {} for name in runtimes}
        for batch in (1, 8):  # interleaved: a slow spell of the host does not pick the recommendation
            times = interleaved_step_times(
                runtimes, batch, model.sample_shape, recipe.compare.latency_runs, 3, LATENCY_BLOCK, LATENCY_SETTLE
            )
            for name, t in times.items():
                latency[name][f"b{batch}"] = float(np.median(t))
    with timer.stage("judge"):
        engines = []
        for name, (candidate, files) in candidates.items():
            judged = (
                {"final": comparison.final, "quality": comparison.quality["engine"], "gate": comparison.gate}
                if name == main
                else judge(comparison, candidate, config, classifier, real_features, model.sample_shape)
            )
            ms = latency["engine" if name == main else name.replace("-", "_")]
            engines.append(
                {
                    "engine": name,
                    "final_psnr_db": judged["final"]["psnr_db"],
                    "classifier_acc": judged["quality"]["classifier_acc"],
                    "fd": judged["quality"]["fd"],
                    "ms_b1": ms["b1"],
                    "ms_b8": ms["b8"],
                    "size_bytes": sum(f.stat().st_size for f in files),
                    "gate_passed": judged["gate"]["passed"],
                }
            )
        forms = _weight_forms(engine_manifest, run, schedule, comparison, config, classifier, real_features, model)
    sizes = {
        "fp32_onnx": (run / "fp32.onnx").stat().st_size,
        "engine": sum(f.stat().st_size for f in engine_files),
    }
    extra: dict[str, Any] = {
        "recipe": recipe.name,
        "precision": recipe.quantize.precision,
        "flavour": recipe.export.flavour,
        "engine": engine.name,
        "schedule": {"n_steps": schedule.n_steps, "method": schedule.method, "guidance": recipe.sampling.guidance},
        "latency_note": "median ms of one model forward at batch 1 / 8 (the sampler runs 2x batch under guidance), "
        f"{recipe.compare.latency_runs} runs after warm-up, the runtimes timed interleaved (rounds of "
        f"{LATENCY_SETTLE} untimed + {LATENCY_BLOCK} timed forwards each), {torch.get_num_threads()} torch threads",
    }
    extra["host"] = {"isa": host_record(), "validated_on": engine_manifest["validated_on"], "revalidated": revalidated}
    if forms is not None:
        extra["weight_forms"] = forms
    extra["cpu_engines"] = engines
    extra["recommendation"] = recommend(engines)
    report = report_dict(comparison, latency, sizes, extra)
    if search is not None:  # the assignment being confirmed: its gate is this compare's
        search.passed = bool(report["gate"]["passed"])
        search.confirmed[len(search.fallback_layers)] = search.passed
        report["mixed_precision"] = search.report()
    write_report(run, comparison, report, f"{recipe.name}: {engine.name} vs FP")
    return report


def _weight_forms(
    engine_manifest: dict[str, Any],
    run: Path,
    schedule: Schedule,
    comparison: Comparison,
    config: CompareConfig,
    classifier: DigitClassifier,
    real_features: np.ndarray,
    model: DiffusersVelocity,
) -> dict[str, Any] | None:
    """The int8 engine's final fidelity with 8-bit weights (exact on VNNI / AMX / ARM dot-product
    hosts) beside 7-bit (exact on every x86 host): the shipped form as its engine ran, the other
    as its Q/DQ graph computes on float kernels (the quantized math, exactly, on any host)."""
    shipped = engine_manifest.get("int8_weights")
    others = sorted(run.glob("model.w*.onnx"))
    if shipped is None or not others:
        return None
    other = others[0]
    emulated = OrtEngine(other, schedule, f"ort-int8-{other.stem[6:]}", optimization="disabled")
    judged = judge(comparison, emulated, config, classifier, real_features, model.sample_shape)
    exact_on = {"8-bit": "x86 with VNNI or AMX, ARM with dot-product", "7-bit": "every x86 host"}
    other_bits = f"{other.stem[len('model.w') :]}-bit"
    return {
        "shipped": shipped,
        "forms": {
            shipped: {
                "final_psnr_db": comparison.final["psnr_db"],
                "exact_on": exact_on[shipped],
                "measured": "the shipped onnxruntime engine on this host",
            },
            other_bits: {
                "final_psnr_db": judged["final"]["psnr_db"],
                "exact_on": exact_on[other_bits],
                "measured": f"{other.name} on float kernels (onnxruntime optimizations off)",
            },
        },
    }


def _ov_xml(run: Path, precision: str) -> Path:
    return run / "engine" / f"openvino-{precision}" / "model.xml"


def _ort_name(recipe: Recipe) -> str:
    return f"ort-{recipe.quantize.precision}"


def _cpu_engines(recipe: Recipe, run: Path, schedule: Schedule) -> dict[str, tuple[Engine, list[Path]]]:
    """The run's CPU engines by name (ort-int8, openvino-<precision>) with the files they ship as."""
    opt = run / "engine" / "model.opt.onnx"
    name = _ort_name(recipe)
    found: dict[str, tuple[Engine, list[Path]]] = {name: (OrtEngine(opt, schedule, name), [opt])}
    for precision in ("int8", "bf16", "f32"):
        xml = _ov_xml(run, precision)
        if xml.is_file():
            hint = dataclasses.replace(recipe.engine.openvino, precision=precision).inference_hint
            engine = OpenVinoEngine(xml, schedule, hint, f"openvino-{precision}")
            found[f"openvino-{precision}"] = (engine, [xml, xml.with_suffix(".bin")])
    return found


REPORT_FILES = ("report.json", "report.md", "samples.npz", "samples.png", "trajectory_error.png")


def run_compare(recipe: Recipe, runs_root: str | Path = "runs", progress: bool = True) -> tuple[Path, dict[str, Any]]:
    """Re-run the compare stage on an existing run directory (staged, then swapped in); the run's
    files and the model checkpoint are checked against manifest.json first."""
    final_dir = Path(runs_root) / recipe.name
    fix = f"rerun `make quantize RECIPE=...` for {recipe.name} (its old report is left in place)"
    with run_lock(final_dir, "compare"):
        manifest = read_manifest(final_dir, fix)
        verify_run(final_dir, manifest, fix=fix)
        verify_inputs(manifest.get("inputs", {}).get("model", {}), Path(recipe.model.path), "model checkpoint", fix)
        built = manifest.get("schedule", {})
        schedule = recipe.sampling.schedule()
        if (built.get("n_steps"), built.get("method")) != (schedule.n_steps, schedule.method):
            raise FlowpressError(
                f"{final_dir}: the run was built for the {built.get('n_steps')}-step {built.get('method')} schedule, "
                f"the recipe asks for {schedule.n_steps}-step {schedule.method}; {fix}"
            )
        model = ensure_model(recipe, progress)
        classifier = ensure_classifier(recipe.classifier.path, progress)
        timer = Timer()
        with staged_run(final_dir) as run:
            shutil.copytree(final_dir, run, dirs_exist_ok=True)
            report = _compare_stage(recipe, model, classifier, run, timer, progress)
            manifest = record_outputs(run, manifest, REPORT_FILES)
            manifest["stage_seconds"] = {**manifest.get("stage_seconds", {}), **timer.seconds}
            write_json(run / "manifest.json", manifest)
    return final_dir, report


def summary_lines(report: dict[str, Any]) -> list[str]:
    q, lat = report["quality"], report["latency_ms"]
    lines = [
        f"final PSNR vs FP {report['final']['psnr_db']:.2f} dB, rel L2 {report['final']['rel_l2']:.4f}",
        f"classifier acc FP {q['reference']['classifier_acc']:.3f} / engine {q['engine']['classifier_acc']:.3f}; "
        f"FD FP {q['reference']['fd']:.3f} / engine {q['engine']['fd']:.3f}",
        "ms per forward b8: " + ", ".join(f"{k} {v['b8']:.2f}" for k, v in lat.items()),
    ]
    for check in report["gate"]["checks"]:
        status = "ok" if check["passed"] else "FAILED"
        lines.append(f"gate {check['name']} = {check['value']:.4g} {check['op']} {check['threshold']:g}: {status}")
    mixed = report.get("mixed_precision")
    if mixed is not None:
        layers = ", ".join(mixed["fallback_layers"]) or "none"
        lines.append(f"mixed precision: {len(mixed['fallback_layers'])} layer(s) kept in full precision: {layers}")
        total = mixed["total_cost"]
        lines.append(
            f"mixed precision cost: engine +{total['size_bytes']:,} bytes, "
            + ", ".join(f"{b} {v:+.2f} ms" for b, v in total["latency_ms"].items())
        )
    lines.append("gate: PASSED" if report["gate"]["passed"] else "gate: FAILED")
    for e in report.get("cpu_engines", []):
        lines.append(
            f"cpu engine {e['engine']}: {e['final_psnr_db']:.2f} dB, acc {e['classifier_acc']:.3f}, "
            f"{e['ms_b8']:.2f} ms b8, gate {'pass' if e['gate_passed'] else 'FAIL'}"
        )
    if "recommendation" in report:
        rec = report["recommendation"]
        lines.append(f"recommended engine: {rec['engine'] or 'none'} ({rec['reason']})")
    return lines
