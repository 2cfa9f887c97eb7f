"""GPU stages on an existing run: `engines` (lint, build, validate) and `bench-gpu` (latency).

Both start from runs/<name>/ as `make quantize` left it.  On a machine without TensorRT or
a CUDA GPU they do the CPU part (lint, the onnxruntime CPU engine) and say in one line why
the GPU part was skipped; nothing here imports tensorrt until a GPU is known to be present.
"""

from __future__ import annotations

import copy
import json
import shutil
import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from flowpress.context import RunContext
from flowpress.engines import TorchEngine
from flowpress.engines.portability import host_record
from flowpress.errors import FlowpressError
from flowpress.export.graphfile import graph_bytes
from flowpress.export.lint import BatchProfile, check_tensorrt
from flowpress.export.tensorrt import FP8_MIN_CAPABILITY, TensorRTConfig, tensorrt_unavailable
from flowpress.files import sha256_file
from flowpress.models import StepModel
from flowpress.recipe import Recipe
from flowpress.rundir import read_manifest, record_outputs, run_lock, verify_run, write_json
from flowpress.sampling import Cond, Sampler
from flowpress.validation import compare, median_step_ms
from flowpress.validation.report import Report, write_report

BENCH_RUNS = 50  # timed forwards per runtime (median reported)
BENCH_WARMUP = 10


@dataclass(frozen=True)
class EnginesResult:
    """What `flowpress engines` did: the linted graph, the CPU engine, and the TensorRT plan or why not."""

    run_dir: Path
    linted: Path
    ort_engine: Path
    skipped: str | None = None
    plan: Path | None = None
    report: Report | None = None

    @property
    def passed(self) -> bool:
        """Skipped counts as passed (exit 0): the CPU part is done; a built plan must pass the gate."""
        return self.skipped is not None or (self.report is not None and self.report.passed)


@dataclass(frozen=True)
class BenchResult:
    """`flowpress bench-gpu`: the gpu_bench dict written into report.json, or why it was skipped."""

    run_dir: Path
    skipped: str | None = None
    gpu_bench: dict[str, Any] = field(default_factory=dict)


# ---------------------------------------------------------------- the run directory


def _finished_run(recipe: Recipe, runs_root: str | Path) -> tuple[Path, dict[str, Any]]:
    """The run directory and its manifest, every recorded file checked against its sha256."""
    run_dir = Path(runs_root) / recipe.name
    fix = f"rerun `make quantize RECIPE=...` for {recipe.name}"
    manifest = read_manifest(run_dir, fix)
    verify_run(run_dir, manifest, fix=fix)
    built = manifest.get("schedule", {})
    wanted = (recipe.sampling.steps, recipe.sampling.method)
    if built.get("sampler", "flow") == "flow" and (built.get("n_steps"), built.get("method")) != wanted:
        raise FlowpressError(
            f"{run_dir}: the run was quantized for the {built.get('n_steps')}-step {built.get('method')} schedule, "
            f"the recipe asks for {wanted[0]}-step {wanted[1]}; rerun `make quantize`"
        )
    if built.get("sampler") == "diffusers" and built.get("n_steps") != recipe.sampling.steps:
        raise FlowpressError(
            f"{run_dir}: the run was quantized for {built.get('n_steps')} {built.get('scheduler')} steps, the recipe "
            f"asks for {recipe.sampling.steps}; rerun `make quantize`"
        )
    return run_dir, manifest


def tensorrt_onnx(recipe: Recipe, run_dir: Path) -> Path:
    """The tensorrt-flavour graph: model.onnx when the recipe exports that flavour, else model.tensorrt.onnx."""
    return run_dir / ("model.onnx" if recipe.export.flavour == "tensorrt" else "model.tensorrt.onnx")


def batch_profile(recipe: Recipe) -> BatchProfile:
    """Tuned for the sampler's forward (compare batch, doubled under classifier-free guidance);
    min 1 and max at least 8 so the b1 / b8 latency rows of the report fit too."""
    per_forward = recipe.compare.batch_size * (1 if recipe.sampling.guidance == 1.0 else 2)
    return BatchProfile(min=1, opt=per_forward, max=max(per_forward, 8))


# ---------------------------------------------------------------- engines


def run_engines(recipe: Recipe, runs_root: str | Path = "runs", progress: bool = True) -> EnginesResult:
    """Lint the tensorrt-flavour graph of a checked run and, on a GPU host, build + validate the plan."""
    with run_lock(Path(runs_root) / recipe.name, "engines"):
        run_dir, manifest = _finished_run(recipe, runs_root)
        linted = tensorrt_onnx(recipe, run_dir)
        profile = batch_profile(recipe)
        check_tensorrt(linted, profile, where=str(linted))
        ort_engine = run_dir / "engine" / "model.opt.onnx"
        reason = tensorrt_unavailable()
        if reason is not None:
            return EnginesResult(run_dir, linted, ort_engine, skipped=reason)
        plan, report = _build_and_validate(recipe, run_dir, linted, profile, progress)
        written = [str(p.relative_to(run_dir)) for p in (run_dir / "engine").rglob("*") if p.is_file()]
        write_json(run_dir / "manifest.json", record_outputs(run_dir, manifest, written))
    return EnginesResult(run_dir, linted, ort_engine, plan=plan, report=report)


def _build_and_validate(
    recipe: Recipe, run_dir: Path, onnx_path: Path, profile: BatchProfile, progress: bool
) -> tuple[Path, Report]:
    """Build engine/tensorrt/model.plan and compare it with FP exactly as the CPU engine was."""
    from flowpress.engines.tensorrt import TensorRTEngine
    from flowpress.export.tensorrt import build_engine

    ctx = RunContext.load(recipe)  # the run's own sampler: the plan records it, the engine checks it
    final = run_dir / "engine" / "tensorrt"
    staging = run_dir / "engine" / ".tensorrt.partial"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir(parents=True)
    try:
        calibration = run_dir / "calibration" / "inputs.safetensors"
        config = TensorRTConfig(profile=profile, timing_cache=str(run_dir / "engine" / "timing.cache"))
        build = build_engine(
            onnx_path,
            staging / "model.plan",
            ctx.sampler,
            config,
            sha256_file(calibration) if calibration.is_file() else None,
        )
        print(f"[flowpress] tensorrt: built {build.manifest['precision']} plan in {build.seconds:.1f} s")
        engine = TensorRTEngine(build.plan, ctx.sampler, f"tensorrt-{build.manifest['precision']}")
        reference = TorchEngine(ctx.fp, ctx.sampler, "torch-fp32")
        config_cmp = ctx.compare_config
        comparison = compare(
            reference,
            engine,
            ctx.sampler,
            config_cmp,
            ctx.shape,
            ctx.cond(config_cmp.n_samples),
            ctx.null,
            ctx.evaluator,
            progress,
        )
        # torch and onnxruntime CPU latency are in the run's own report.json already
        runs = recipe.compare.latency_runs
        latency = {"engine": {f"b{b}": median_step_ms(engine, b, ctx.shape, ctx.condition, runs) for b in (1, 8)}}
        here = host_record(ctx.host)  # the plan is validated on this host (report.md names its ISA class)
        report = Report(
            recipe=recipe.name,
            precision=recipe.quantize.precision,
            flavour="tensorrt",
            engine=engine.name,
            n_samples=config_cmp.n_samples,
            schedule={**ctx.sampler.as_dict(), "guidance": recipe.sampling.guidance},
            gate=comparison.gate,
            per_step=comparison.per_step,
            final=comparison.final,
            quality=comparison.quality,
            latency_ms=latency,
            latency_note="median wall ms of one forward from CPU tensors (host<->device copies included); "
            "`make bench-gpu` measures on-device latency with CUDA events",
            size_bytes={"fp32_onnx": graph_bytes(run_dir / "fp32.onnx"), "engine": build.plan.stat().st_size},
            cpu_engines=[],
            recommendation={
                "engine": engine.name if comparison.gate["passed"] else None,
                "reason": "the TensorRT plan",
            },
            host={"isa": here, "validated_on": here, "revalidated": None, "gpu": build.manifest.get("gpu")},
            extra={"engine_manifest": build.manifest},
        )
        write_report(
            staging, comparison, report, {engine.name: comparison.engine}, f"{recipe.name}: {engine.name} vs FP"
        )
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise
    old = run_dir / "engine" / ".tensorrt.old"
    shutil.rmtree(old, ignore_errors=True)
    if final.exists():
        final.rename(old)
    staging.rename(final)
    shutil.rmtree(old, ignore_errors=True)
    return final / "model.plan", report


def engines_lines(result: EnginesResult) -> list[str]:
    """What `flowpress engines` prints: exactly one line when TensorRT was skipped."""
    if result.skipped is not None:
        return [f"tensorrt: skipped: {result.skipped}"]
    from flowpress.stages.chain import summary_lines

    head = [
        f"{result.linted}: TensorRT lint clean",
        f"{result.plan}: validated against FP; report in {result.plan.parent if result.plan else ''}",
    ]
    return head + (summary_lines(result.report) if result.report is not None else [])


# ---------------------------------------------------------------- bench-gpu


def cuda_step_ms(
    forward: Callable[[Tensor, Tensor, Cond], Any],
    x: Tensor,
    step: Tensor,
    cond: Cond,
    runs: int = BENCH_RUNS,
    warmup: int = BENCH_WARMUP,
) -> float:
    """Median ms of forward(x, step, cond) on the current stream, timed with CUDA events after `warmup` calls."""
    with torch.inference_mode():
        for _ in range(warmup):
            forward(x, step, cond)
        torch.cuda.synchronize()
        times = []
        for _ in range(runs):
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            forward(x, step, cond)
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end))
    return float(np.median(times))


def _row(ms: float, batch: int, schedule: Sampler, guidance: float) -> dict[str, float]:
    """Per-step latency and the images/s of whole sampling runs it implies."""
    images_per_forward = batch if guidance == 1.0 else batch / 2
    seconds_per_image = schedule.n_evaluations * ms / 1000 / images_per_forward
    return {"ms_per_step": round(ms, 4), "images_per_s": round(1 / seconds_per_image, 2)}


def run_bench_gpu(recipe: Recipe, runs_root: str | Path = "runs", progress: bool = True) -> BenchResult:
    """Latency of torch fp16 and TensorRT fp16 / int8 / fp8 at the engine's profile, into report.json."""
    with run_lock(Path(runs_root) / recipe.name, "bench-gpu"):
        run_dir, manifest = _finished_run(recipe, runs_root)
        if "report.json" not in manifest["outputs"]:
            raise FlowpressError(f"{run_dir}: report.json missing; rerun `make quantize`")
        reason = tensorrt_unavailable()
        if reason is not None:
            return BenchResult(run_dir, skipped=reason)
        bench = _bench(recipe, run_dir, progress)
        report = json.loads((run_dir / "report.json").read_text())
        report["gpu_bench"] = bench
        write_json(run_dir / "report.json", report)
        write_json(run_dir / "manifest.json", record_outputs(run_dir, manifest, ["report.json", "engine/timing.cache"]))
    return BenchResult(run_dir, gpu_bench=bench)


def bench_lines(result: BenchResult) -> list[str]:
    """What `flowpress bench-gpu` prints: exactly one line when it was skipped."""
    if result.skipped is not None:
        return [f"bench-gpu: skipped: {result.skipped}"]
    bench = result.gpu_bench
    lines = [f"{result.run_dir / 'report.json'}: gpu_bench on {bench['gpu']['name']}, batch {bench['batch']}"]
    for name, row in bench["runtimes"].items():
        detail = row.get("skipped") or f"{row['ms_per_step']:.3f} ms per step, {row['images_per_s']:.1f} images/s"
        lines.append(f"{name}: {detail}")
    return lines


def _bench(recipe: Recipe, run_dir: Path, progress: bool) -> dict[str, Any]:
    from flowpress.engines.tensorrt import OrtGpuEngine, TensorRTEngine
    from flowpress.export import is_fp8_graph
    from flowpress.export.fp8 import to_fp8
    from flowpress.export.graphfile import Graph, read_graph, write_graph
    from flowpress.export.tensorrt import build_engine, current_gpu

    ctx = RunContext.load(recipe)
    schedule = ctx.sampler
    profile = batch_profile(recipe)
    gpu = current_gpu()
    model = ctx.model
    batch = profile.opt
    shape = tuple(model.sample_shape)
    device = torch.device("cuda", torch.cuda.current_device())
    generator = torch.Generator().manual_seed(0)
    x = torch.randn(batch, *shape, generator=generator).to(device)
    step = torch.full((batch,), schedule.n_steps // 2, dtype=torch.int64, device=device)
    cond = {k: v.to(device) for k, v in ctx.cond(batch).items()}
    rows: dict[str, dict[str, Any]] = {}

    fp16_model = StepModel(copy.deepcopy(model), schedule).eval().to(device).half()
    ms = cuda_step_ms(fp16_model.run, x.half(), step, cond)
    rows["torch_fp16"] = _row(ms, batch, schedule, recipe.sampling.guidance)
    fp16_model.cpu()

    cache = str(run_dir / "engine" / "timing.cache")
    with tempfile.TemporaryDirectory(prefix="flowpress-bench-") as tmp:
        qdq_graph = tensorrt_onnx(recipe, run_dir)
        fp8_run = is_fp8_graph(qdq_graph)  # quantize.precision: fp8 exports E4M3 Q/DQ directly
        sources = {"tensorrt_fp16": (run_dir / "fp32.onnx", "fp16")}
        if fp8_run:
            rows["tensorrt_int8"] = {"skipped": "this run is fp8 (quantize.precision: fp8); bench an int8 recipe"}
        else:
            sources["tensorrt_int8"] = (qdq_graph, "qdq")
        if gpu.compute_capability >= FP8_MIN_CAPABILITY:
            fp8_path = qdq_graph if fp8_run else Path(tmp) / "model.fp8.onnx"
            if not fp8_run:
                int8 = read_graph(qdq_graph)
                write_graph(Graph(to_fp8(int8.proto, str(int8.base)), int8.base), fp8_path)
            sources["tensorrt_fp8"] = (fp8_path, "qdq")
        else:
            rows["tensorrt_fp8"] = {"skipped": f"compute capability {gpu.as_dict()['compute_capability']} < 8.9"}
        for name, (onnx_path, precision) in sources.items():
            config = TensorRTConfig(profile=profile, precision=precision, timing_cache=cache)  # type: ignore[arg-type]
            build = build_engine(onnx_path, Path(tmp) / f"{name}.plan", schedule, config)
            engine = TensorRTEngine(build.plan, schedule, name)
            ms = cuda_step_ms(engine.execute, x, step, cond)
            rows[name] = {**_row(ms, batch, schedule, recipe.sampling.guidance), "build_seconds": build.seconds}
    try:
        ort_engine = OrtGpuEngine(tensorrt_onnx(recipe, run_dir), schedule, "onnxruntime_gpu_int8")
    except (FlowpressError, ImportError) as err:
        rows["onnxruntime_gpu_int8"] = {"skipped": str(err)}
    else:
        ms = cuda_step_ms(ort_engine.execute, x, step, cond)
        rows["onnxruntime_gpu_int8"] = {
            **_row(ms, batch, schedule, recipe.sampling.guidance),
            "providers": ort_engine.providers,
        }
    return {
        "gpu": gpu.as_dict(),
        "torch": torch.__version__,
        "profile": profile.as_dict(),
        "batch": batch,
        "runs": BENCH_RUNS,
        "warmup": BENCH_WARMUP,
        "note": "median ms of one model forward at the profile's opt batch on device-resident tensors (CUDA events); "
        "images/s = images per forward / (evaluations per sample x ms); guidance halves the images per forward",
        "runtimes": rows,
    }
