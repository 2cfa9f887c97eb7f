"""Stage chaining: recipe -> model -> calibration -> quantize -> export -> engines -> compare,
written into runs/<name>/ (staged, locked, hashed: flowpress/rundir.py)."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from flowpress.calibration import CalibrationSet, capture
from flowpress.compress import QuantizedModel, quantize
from flowpress.compress.backends import backend_of
from flowpress.context import RunContext, Timer, versions
from flowpress.errors import FlowpressError
from flowpress.export.graphfile import large_bytes
from flowpress.files import sha256_file
from flowpress.models import LoadedModel, release_weights
from flowpress.plan import MemoryPlan, check_memory, plan_memory
from flowpress.ranks import agree, alone, barrier, broadcast, dist_info, init_distributed
from flowpress.recipe import Recipe, need_extras
from flowpress.rundir import (
    read_manifest,
    record_outputs,
    reported_failures,
    run_lock,
    staged_run,
    tree_hashes,
    verify_inputs,
    verify_run,
    write_json,
)
from flowpress.schema import to_dict
from flowpress.stages.build import build_engines, weight_form
from flowpress.stages.compare import compare_stage, measure_torch_side
from flowpress.validation.report import Report

REPORT_FILES = ("report.json", "report.md", "samples.npz", "samples.png", "trajectory_error.png")


def run_quantize(
    recipe: Recipe,
    runs_root: str | Path = "runs",
    progress: bool = True,
    loaded: LoadedModel | None = None,
    timer: Timer | None = None,
) -> tuple[Path, Report | None]:
    """The whole chain into runs/<name>/; returns (run dir, report).  The gate decides the exit code.
    Under torchrun (or --nproc-per-node) the ranks share the sampling, rank 0 alone builds, writes
    and reports (the others return no report).
    loaded: the recipe's model when the caller has loaded it already (--model reads its config),
    in `timer`'s 'load' stage after checking its plan."""
    final_dir = Path(runs_root) / recipe.name
    dist = init_distributed(cpu=True)  # quantize's torch models run on the CPU, on a GPU host too
    progress = progress and dist.main  # under torchrun, rank 0 speaks and writes
    timer = timer or Timer(announce=progress)
    with reported_failures(final_dir, lambda: timer.failed_in):
        engine = recipe.engine
        need_extras(engine, recipe.quantize)  # a missing extra fails here, before the model loads
        nncf = engine.runtime == "openvino" and engine.openvino.precision == "int8"
        plan = plan_memory(Path(recipe.model.path), engine.candidates or engine.runtime == "openvino", nncf)
        if loaded is None:
            if progress:
                print(f"[flowpress] {plan.line()}", flush=True)
            check_memory(plan, Path(recipe.model.path))
            with timer.stage("load"):
                ctx = RunContext.load(recipe, timer)
                backend_of(recipe.quantize).load_library()
        else:
            ctx = RunContext.load(recipe, timer, loaded)
            backend_of(recipe.quantize).load_library()
        _same_inputs(recipe)
        with _written_by_rank0(final_dir) as run:
            with timer.stage("calibrate"):
                calib = _calibrate(ctx, run, progress)
            with timer.stage("quantize"):
                qmodel = quantize(ctx.model, recipe.quantize, calib, ctx.sampler, progress)
                weight_form(ctx, qmodel)
            search, released = None, False
            mixed = getattr(recipe.quantize, "mixed_precision", None)
            if mixed is not None and mixed.enabled:
                from flowpress.stages.mixed import mixed_precision

                exports, engine_manifest, report, search = mixed_precision(ctx, qmodel, calib, run, progress)
            else:
                torch_side = measure_torch_side(ctx, progress)
                released = plan.denoiser_fp32_bytes > large_bytes()  # its graphs on disk, the engines need no torch
                release = (lambda: release_weights(ctx.model, qmodel.module, qmodel.fp_module)) if released else None
                exports, engine_manifest = _built_by_rank0(ctx, qmodel, calib, run, release)
                report = compare_stage(ctx, run, progress, torch_side=torch_side, one_at_a_time=released)
            if dist.main:
                manifest = _run_manifest(ctx, calib, qmodel, exports, engine_manifest, search, plan, released)
                manifest["outputs"] = tree_hashes(run)
                write_json(run / "manifest.json", manifest)
    return final_dir, report


def _same_inputs(recipe: Recipe) -> None:
    """Under torchrun, every rank must run the same recipe on the same model files with the same
    flowpress: one line before any work where one differs (a node with another copy of them)."""
    if dist_info().world == 1:
        return
    facts = {
        "recipe": json.dumps(to_dict(recipe), sort_keys=True),
        "model (its files' hashes)": json.dumps(tree_hashes(Path(recipe.model.path)), sort_keys=True),
    }
    facts = {k: hashlib.sha256(v.encode()).hexdigest() for k, v in facts.items()}
    facts["flowpress (its source files' hash)"] = _source_hash()
    agree(facts, "start every rank with the same recipe, model files and flowpress")


def _source_hash() -> str:
    """sha256 over flowpress's own Python files (its version is the code each rank runs)."""
    digest, package = hashlib.sha256(), Path(__file__).resolve().parent.parent
    sources = sorted(
        Path(f) / n for f, _, names in os.walk(package, followlinks=True) for n in names if n.endswith(".py")
    )
    for path in sources:  # os.walk follows the symlinked layers (compress/, export/, ...); rglob does not
        digest.update(str(path.relative_to(package)).encode() + b"\0" + path.read_bytes())
    return digest.hexdigest()


@contextmanager
def _written_by_rank0(final: Path) -> Iterator[Path]:
    """run_lock + staged_run on rank 0, which alone writes the run; the other ranks get the staged
    directory's path (they read the engines rank 0 builds there) and write nothing."""
    if dist_info().main:
        with run_lock(final, "quantize"), staged_run(final) as run:
            broadcast(str(run))
            yield run
            barrier()  # the other ranks are done with its files before it becomes the run
        return
    run = Path(broadcast(""))
    yield run
    barrier()


def _built_by_rank0(
    ctx: RunContext, qmodel: QuantizedModel, calib: CalibrationSet, run: Path, release: Callable[[], None] | None
) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """build_engines on rank 0 alone (export and the engine builds are serial); every rank waits
    for its engines, then reads the engine manifest it wrote."""
    exports: list[dict[str, Any]] = []
    if dist_info().main:
        with alone():
            exports, manifest = build_engines(ctx, qmodel, calib, run, release)
    elif release is not None:
        release()
    barrier()
    if not dist_info().main:
        if not (run / "engine" / "engine.json").is_file():
            raise FlowpressError(
                f"{run}: rank {dist_info().rank} cannot see the engines rank 0 built; put --runs on a file system "
                "every node shares"
            )
        manifest = json.loads((run / "engine" / "engine.json").read_text())
    return exports, manifest


def _calibrate(ctx: RunContext, run: Path, progress: bool) -> CalibrationSet:
    """The FP model's inputs along the calibration trajectories, saved into run/calibration/."""
    recipe = ctx.recipe
    calib = capture(
        ctx.fp,
        ctx.sampler,
        ctx.shape,
        ctx.calibration_cond(recipe.calibration.n_samples),
        recipe.calibration,
        recipe.sampling.guidance,
        ctx.null,
        progress,
    )
    if dist_info().main:
        (run / "calibration").mkdir()
        calib.save(run / "calibration" / "inputs.safetensors")
    return calib


def _run_manifest(
    ctx: RunContext, calib: CalibrationSet, qmodel: QuantizedModel, exports: list[dict[str, Any]],
    engine_manifest: dict[str, Any], search: Any, plan: MemoryPlan, released: bool,
) -> dict[str, Any]:  # fmt: skip
    """manifest.json of a quantize run, all but the hashes of its outputs."""
    recipe, timer = ctx.recipe, ctx.timer
    return {
        "recipe": to_dict(recipe),
        "versions": versions(),
        "schedule": ctx.sampler.as_dict(),
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
            **(
                {"lora": {Path(recipe.model.lora).name: sha256_file(Path(recipe.model.lora))}}
                if recipe.model.lora
                else {}
            ),
        },
        "stage_seconds": timer.seconds,
        "world_size": dist_info().world,
        "plan": {**plan.as_dict(), "large_bytes": large_bytes(), "released_before_engines": released},
        "stages": timer.as_dict(),
        "peak_rss_bytes": timer.peak_rss_bytes,
    }


def run_compare(recipe: Recipe, runs_root: str | Path = "runs", progress: bool = True) -> tuple[Path, Report]:
    """Re-run the compare stage on an existing run directory (staged, then swapped in); the run's
    files and the model checkpoint are checked against manifest.json first."""
    final_dir = Path(runs_root) / recipe.name
    fix = f"rerun `make quantize RECIPE=...` for {recipe.name} (its old report is left in place)"
    timer = Timer(announce=progress)
    with reported_failures(final_dir, lambda: timer.failed_in), run_lock(final_dir, "compare"):
        manifest = read_manifest(final_dir, fix)
        verify_run(final_dir, manifest, fix=fix)
        verify_inputs(manifest.get("inputs", {}).get("model", {}), Path(recipe.model.path), "model checkpoint", fix)
        with timer.stage("load"):
            ctx = RunContext.load(recipe, timer)
        built, wanted = manifest.get("schedule", {}), ctx.sampler.as_dict()
        if (built.get("n_steps"), built.get("method")) != (wanted["n_steps"], wanted["method"]):
            raise FlowpressError(
                f"{final_dir}: the run was built for the {built.get('n_steps')}-step {built.get('method')} schedule, "
                f"the recipe asks for {wanted['n_steps']}-step {wanted['method']}; {fix}"
            )
        with staged_run(final_dir) as run:
            shutil.copytree(final_dir, run, dirs_exist_ok=True)
            report = compare_stage(ctx, run, progress)
            assert report is not None  # one process: it reports
            manifest = record_outputs(run, manifest, REPORT_FILES)
            manifest["stage_seconds"] = {**manifest.get("stage_seconds", {}), **ctx.timer.seconds}
            write_json(run / "manifest.json", manifest)
    return final_dir, report


def summary_lines(report: Report) -> list[str]:
    """What `flowpress quantize` / `compare` print."""
    final, lat = report.final, report.latency_ms
    lines = [f"model: {report.model}"] if report.model else []
    lines.append(f"final PSNR vs FP {final['psnr_db']:.2f} dB, SSIM {final['ssim']:.4f}, rel L2 {final['rel_l2']:.4f}")
    if report.fp_samples:
        fp = report.fp_samples
        lines.append(
            f"FP samples: mean {fp['mean']:.3f}, std {fp['std']:.3f}, {100 * fp['outside_range']:.1f}% outside [-1, 1]"
        )
    for metric in sorted(report.quality["reference"]):
        ref, eng = report.quality["reference"][metric], report.quality["engine"][metric]
        lines.append(f"{metric}: FP {ref:.3f} / engine {eng:.3f}")
    lines.append("ms per forward b8: " + ", ".join(f"{k} {v['b8']:.2f}" for k, v in lat.items()))
    for check in report.gate["checks"]:
        status = "ok" if check["passed"] else "FAILED"
        lines.append(f"gate {check['name']} = {check['value']:.4g} {check['op']} {check['threshold']:g}: {status}")
    mixed = report.mixed_precision
    if mixed is not None:
        layers = ", ".join(mixed["fallback_layers"]) or "none"
        lines.append(f"mixed precision: {len(mixed['fallback_layers'])} layer(s) kept in full precision: {layers}")
        total = mixed["total_cost"]
        lines.append(
            f"mixed precision cost: engine +{total['size_bytes']:,} bytes, "
            + ", ".join(f"{b} {v:+.2f} ms" for b, v in total["latency_ms"].items())
        )
    lines.append("gate: PASSED" if report.passed else "gate: FAILED")
    if report.weight_forms:
        forms = report.weight_forms
        lines.append(
            "int8 weights: "
            + ", ".join(f"{bits} {f['final_psnr_db']:.2f} dB" for bits, f in forms["forms"].items())
            + f" (shipped: {forms['shipped']})"
        )
    for e in report.cpu_engines:
        scores = "".join(f", {m} {v:.3f}" for m, v in e["quality"].items())
        lines.append(
            f"cpu engine {e['engine']}: {e['final_psnr_db']:.2f} dB{scores}, {e['ms_b8']:.2f} ms b8, "
            f"gate {'pass' if e['gate_passed'] else 'FAIL'}"
        )
    for peer in report.peers or []:
        lines.append(f"peer {peer['peer']}: {peer['final_psnr_db']:.2f} dB (flowpress {peer['margin_db']:+.2f} dB)")
    if report.end_to_end_ms_per_image:
        lines.append(
            "end to end ms / image: " + ", ".join(f"{k} {v:.1f}" for k, v in report.end_to_end_ms_per_image.items())
        )
    rec = report.recommendation
    lines.append(f"recommended engine: {rec['engine'] or 'none'} ({rec['reason']})")
    return lines
