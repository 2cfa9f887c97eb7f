"""`python -m benchmarks bench`: every CPU engine flowpress builds beside what a user would build by hand.

Per model, the variants share one FP model, one sampler and one set of seeds.  Peers are the
hand-built engines (torch, onnxruntime fp32, onnxruntime quantize_static, OpenVINO's default,
NNCF's default preset fed random-step inputs); flowpress's variants use its trajectory
calibration set and temporal tables, and are built as `make quantize` builds them on this host
(portable int8 weights where its int8 kernels saturate: engines/isa.py).  Every row says how fast
(per step, whole loop) and how faithful (final PSNR against the FP trajectory from the same
seeds) one engine is.
"""

from __future__ import annotations

import gc
import json
import shutil
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from benchmarks.bench.bars import bars
from benchmarks.bench.config import ARITHMETIC, PEERS, BenchConfig, BenchModel
from benchmarks.bench.models import forward_flops, load_bench_model
from benchmarks.bench.peaks import machine_record, matmul_peaks
from benchmarks.bench.profile import ort_graph_ops, reset_peak_rss, top_ops
from benchmarks.bench.report import bench_markdown, plot_frontier, results_body
from benchmarks.bench.timing import interleaved_loop_seconds, model_batch
from benchmarks.bench.variants import Built, build_variants
from benchmarks.common import fp_reference, sample_engine
from flowpress.context import resident_bytes
from flowpress.engines import OrtEngine
from flowpress.engines.base import graph_feeds
from flowpress.engines.isa import HostIsa, host_isa
from flowpress.engines.openvino import OpenVinoEngine
from flowpress.models import DiffusersDenoiser
from flowpress.recipe import Recipe, load_recipe
from flowpress.results import write_result
from flowpress.rundir import run_lock, staged_run
from flowpress.sampling import Schedule
from flowpress.schema import to_dict
from flowpress.validation import interleaved_step_times, psnr_db, step_times_ms


def schedule_of(spec: BenchModel, recipe: Recipe) -> tuple[Schedule, float]:
    """The model's sampler and guidance: the recipe's, with the bench entry's overrides."""
    schedule = Schedule(spec.steps or recipe.sampling.steps, recipe.sampling.method)
    return schedule, recipe.sampling.guidance if spec.guidance is None else spec.guidance


def bench_model(
    spec: BenchModel,
    config: BenchConfig,
    workdir: Path,
    progress: bool = True,
    host: HostIsa | None = None,
    model: DiffusersDenoiser | None = None,
) -> dict[str, Any]:
    """Every variant of one model (default: loaded from `spec`) on `host` (default: this one):
    rows per (variant, batch), the step timing repeated in config.passes interleaved passes."""
    from tqdm import tqdm

    recipe = load_recipe(spec.recipe)
    model = (model or load_bench_model(spec, recipe)).eval()
    schedule, guidance = schedule_of(spec, recipe)
    null, condition, shape = model.null_condition(), model.example_condition, model.sample_shape
    params = sum(p.numel() for p in model.parameters())
    ref = fp_reference(model, schedule, guidance, spec.n_samples, config.sample_batch)
    built_info = build_variants(model, spec, schedule, guidance, config, workdir, host)
    flops = {b: forward_flops(model, b) for b in config.batches}
    student_flops = built_info["student_flops"]
    loaders = built_info["loaders"]
    # one variant at a time: fidelity, size, peak memory, profile
    facts: dict[str, dict[str, Any]] = {}
    profiles, graphs = {}, {}
    bar = tqdm(total=len(loaders), desc=f"bench {spec.name}", disable=not progress)
    for variant, load in loaders.items():
        gc.collect()
        resettable = reset_peak_rss()
        built = load()
        own_guidance = guidance if built.guidance is None else built.guidance
        with torch.no_grad():
            final = (
                ref.xs[-1]
                if variant == "torch-fp32"
                else sample_engine(built.engine, ref, own_guidance, null, config.sample_batch)[-1]
            )
            for batch in config.batches:  # compile / allocate every timed shape inside this variant's peak
                step_times_ms(built.engine, batch, shape, condition, 1, 0)
        facts[variant] = {
            "final_psnr_db": None if variant == "torch-fp32" else psnr_db(ref.xs[-1], final),
            "size_bytes": sum(f.stat().st_size for f in built.files) if built.files else 4 * params,
            "peak_rss_mb": resident_bytes()[1] / 2**20,
            "peak_rss_scope": "variant" if resettable else "process",
            "portable": built_info["portable_of"].get(variant),  # None: a peer, or no int8 weights
            "inference_precision": built.engine.compiled_hint(max(config.batches))
            if isinstance(built.engine, OpenVinoEngine)
            else None,
        }
        profiles[variant] = top_ops(built.engine, max(config.batches), shape, condition, config.profile_runs)
        if isinstance(built.engine, OrtEngine):
            graphs[variant] = ort_graph_ops(built.engine.path)
        del built
        bar.update()
    bar.close()
    # then every variant at once, timed in interleaved rounds: a slow spell of the shared host
    # lands on all of them instead of on whichever variant happened to be timed then
    engines = {variant: load() for variant, load in loaders.items()}
    rows = []
    for batch in config.batches:
        passes = [
            interleaved_step_times(
                {v: b.engine for v, b in engines.items()},
                batch,
                shape,
                condition,
                config.runs,
                config.warmup,
                config.block,
                config.settle,
            )
            for _ in range(config.passes)
        ]
        loops = interleaved_loop_seconds(engines, batch, shape, condition, guidance, null, config.loops, config.settle)
        for variant, built in engines.items():
            steps_in_loop = built.engine.schedule.n_steps
            own_guidance = guidance if built.guidance is None else built.guidance
            counted = student_flops if variant == "student" else flops
            medians = [float(np.median(times[variant])) for times in passes]
            every = np.concatenate([times[variant] for times in passes])
            rows.append(
                {
                    "model": spec.name,
                    "variant": variant,
                    "peer": variant in PEERS,
                    "batch": batch,
                    "ms_per_step_median": float(np.median(medians)),  # the median of the passes' medians
                    "ms_per_step_passes": medians,
                    "ms_per_step_p90": float(np.percentile(every, 90)),  # over every timed forward
                    "runs": len(passes[0][variant]),  # per pass
                    "passes": len(passes),
                    "images_per_s": batch / loops[variant],
                    "loop_ms_per_step": loops[variant] * 1000 / steps_in_loop,
                    "steps": steps_in_loop,
                    "model_batch_in_loop": model_batch(batch, own_guidance, condition(batch)),
                    "threads": config.threads,
                    "arithmetic": ARITHMETIC[variant],
                    "gop_per_forward": counted[batch]["total"] / 1e9,
                    "linear_gop_per_forward": counted[batch]["linear"] / 1e9,
                    **facts[variant],
                }
            )
    del engines
    return {
        "model": spec.name,
        "params": params,
        "steps": schedule.n_steps,
        "guidance": guidance,
        "n_samples": spec.n_samples,
        "calibration_inputs": built_info["calib_inputs"],
        **built_info["int8"],
        "null_label": model.null_label,
        "rows": rows,
        "profiles": profiles,
        "graph_ops": graphs,
    }


def python_overhead(spec: BenchModel, config: BenchConfig, workdir: Path, model: DiffusersDenoiser) -> dict[str, Any]:
    """Per-step cost around the runtime at batch 1 (the runtime sees batch 2 under guidance): the
    raw runtime call, the engine call (feeds, checks, conversion) with plain run() and with I/O
    binding, and one whole sampler step (guidance, step lookup, Euler update)."""
    schedule, guidance = schedule_of(spec, load_recipe(spec.recipe))
    path = workdir / "model.opt.onnx"
    condition, shape = model.example_condition, model.sample_shape
    rows = model_batch(1, guidance, condition(1))
    bound = OrtEngine(path, schedule, "io-binding", config.threads, io_binding=True)
    plain = OrtEngine(path, schedule, "run", config.threads, io_binding=False)
    x = torch.randn(rows, *shape, generator=torch.Generator().manual_seed(0))
    feeds = graph_feeds(bound, path, bound.input_names, x, torch.zeros(rows, dtype=torch.int64), condition(rows))
    runs = config.runs * 3
    raw = []
    for i in range(config.warmup + runs):
        start = time.perf_counter()
        bound.session.run(None, feeds)
        if i >= config.warmup:
            raw.append((time.perf_counter() - start) * 1000)
    loop = interleaved_loop_seconds(
        {"io": Built(bound)}, 1, shape, condition, guidance, model.null_condition(), config.loops * 3
    )
    return {
        "model": spec.name,
        "engine": "flowpress-ort-int8",
        "batch": 1,
        "model_batch": rows,
        "raw_session_run_ms": float(np.median(raw)),
        "engine_call_run_ms": float(np.median(step_times_ms(plain, rows, shape, condition, runs, config.warmup))),
        "engine_call_io_binding_ms": float(
            np.median(step_times_ms(bound, rows, shape, condition, runs, config.warmup))
        ),
        "sampler_ms_per_step": loop["io"] * 1000 / schedule.n_steps,
    }


def run_bench(
    config: BenchConfig,
    runs_root: str | Path = "runs",
    progress: bool = True,
    results_dir: str | Path | None = None,
) -> tuple[Path, dict[str, Any]]:
    """Bench every model of `config` into runs_root/<name>/{bench.json, bench.md, frontier.png}
    (and results_dir/bench.md when given); returns (that directory, the bench record)."""
    torch.set_num_threads(config.threads)
    final = Path(runs_root) / config.name
    work_root = Path(runs_root) / f".{config.name}.work"
    shutil.rmtree(work_root, ignore_errors=True)
    results = []
    overhead = []
    host = host_isa()
    peaks = matmul_peaks(config.threads)
    for spec in config.models:
        workdir = work_root / spec.name
        workdir.mkdir(parents=True)
        model = load_bench_model(spec, load_recipe(spec.recipe))
        results.append(bench_model(spec, config, workdir, progress, host, model))
        if "flowpress-ort-int8" in config.variants:
            overhead.append(python_overhead(spec, config, workdir, model))
        del model
        shutil.rmtree(workdir, ignore_errors=True)
    for result in results:
        for row in result["rows"]:
            peak = peaks[row["arithmetic"]]
            achieved = row["gop_per_forward"] / (row["ms_per_step_median"] / 1000)
            row["achieved_gop_per_s"] = achieved
            row["fraction_of_peak"] = achieved / peak
    bench: dict[str, Any] = {
        "config": {
            "threads": config.threads,
            "batches": list(config.batches),
            "runs": config.runs,
            "passes": config.passes,
            "block": config.block,
            "settle": config.settle,
            "bars": to_dict(config.bars),
        },
        "machine": machine_record(host),
        "matmul_peak_gop_per_s": peaks,
        "rows": [row for r in results for row in r["rows"]],
        "models": [{k: v for k, v in r.items() if k != "rows"} for r in results],
        "python_overhead": overhead,
    }
    # the profiles run at the largest batch: they explain the bars' batch-8 times only at that batch
    profiles = {r["model"]: r["profiles"] for r in results} if max(config.batches) == 8 else None
    bench["bars"] = bars(bench["rows"], config.bars, peaks, profiles=profiles)
    with run_lock(final), staged_run(final) as out:
        (out / "bench.json").write_text(json.dumps(bench, indent=2, default=_json_default) + "\n")
        plot_frontier(bench["rows"], out / "frontier.png")
        (out / "bench.md").write_text(bench_markdown(bench))
    if results_dir is not None:
        write_result(results_dir, config.name, "make bench", "python -m benchmarks bench", results_body(bench, final))
    shutil.rmtree(work_root, ignore_errors=True)
    return final, bench


def _json_default(value: Any) -> Any:
    if isinstance(value, np.bool_ | np.integer | np.floating):
        return value.item()
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")
