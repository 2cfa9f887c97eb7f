"""The compare stage of a run: the gate's engine against FP step by step, every other CPU engine
on the same seeds, latencies timed interleaved, the int8 weight forms, the report."""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from flowpress.calibration import CalibrationSet
from flowpress.context import RunContext
from flowpress.engines import Engine, OrtEngine, TorchEngine
from flowpress.engines.build import parity_feeds
from flowpress.engines.portability import check_engine_host, host_record
from flowpress.export.graphfile import graph_bytes
from flowpress.ranks import alone, barrier, dist_info
from flowpress.stages.build import cpu_engines, main_engine
from flowpress.stages.peers import run_peers
from flowpress.validation import (
    Comparison,
    FpReference,
    compare,
    fp_reference,
    interleaved_step_times,
    judge,
    recommend,
)
from flowpress.validation.report import Report, write_report

# the CPU engines' latency: interleaved rounds of LATENCY_SETTLE untimed + LATENCY_BLOCK timed
# forwards per runtime (validation/timing.py says why rounds must be long)
LATENCY_BLOCK, LATENCY_SETTLE = 10, 3
EXACT_ON = {
    "8-bit": "x86 with VNNI or AMX, ARM with dot-product",
    "7-bit": "every x86 host",
    "8-bit u8u8": "every host (onnxruntime's U8U8 kernels)",
}


def _weight_forms(
    ctx: RunContext, engine_manifest: dict[str, Any], run: Path, comparison: Comparison
) -> dict[str, Any] | None:
    """The int8 engine's final fidelity with 8-bit weights (exact on VNNI / AMX / ARM dot-product
    hosts) beside 7-bit (exact on every x86 host): the shipped form as its engine ran, the other
    as its Q/DQ graph computes on float kernels (the quantized math, exactly, on any host)."""
    shipped = engine_manifest.get("int8_weights")
    others = sorted(run.glob("model.w*.onnx"))
    if shipped is None or not others:
        return None
    other = others[0]
    other_bits = f"{other.stem[len('model.w') :]}-bit"
    emulated = OrtEngine(other, ctx.sampler, f"ort-int8-{other_bits}", optimization="disabled")
    judged = judge(
        comparison, emulated, ctx.sampler, ctx.compare_config, ctx.shape, ctx.null, ctx.evaluator, ctx.source.decode
    )
    return {
        "shipped": shipped,
        "forms": {
            shipped: {
                "final_psnr_db": comparison.final["psnr_db"],
                "exact_on": EXACT_ON[shipped],
                "measured": "the shipped onnxruntime engine on this host",
            },
            other_bits: {
                "final_psnr_db": judged["final"]["psnr_db"],
                "exact_on": EXACT_ON[other_bits],
                "measured": f"{other.name} on float kernels (onnxruntime optimizations off)",
            },
        },
    }


E2E_BATCH = 4


@dataclass
class TorchSide:
    """What the compare needs of the torch FP model, measured once before the engines are built
    (a large model is released then: its engines are built and judged without it in memory).
    fp: the FP reference trajectories; latency_ms: {b1, b8} torch fp32 ms per forward;
    end_to_end_ms: torch's ms per image of a pipeline call (pipelines only); peers: the recipe's
    peers (flowpress/stages/peers.py) judged against fp, without their margin."""

    fp: FpReference
    latency_ms: dict[str, float]
    end_to_end_ms: float | None
    peers: list[dict[str, Any]]


def measure_torch_side(ctx: RunContext, progress: bool) -> TorchSide:
    """The FP reference trajectories on the compare's seeds, torch fp32's latency, its end-to-end
    time and the peers: everything of the compare that runs the torch model."""
    recipe, sampler, config = ctx.recipe, ctx.sampler, ctx.compare_config
    reference = TorchEngine(ctx.fp, sampler, "torch-fp32")
    conditions = ctx.conditions(config.n_samples)
    with ctx.timer.stage("fp_reference"):
        fp = fp_reference(
            reference, sampler, config, ctx.shape, conditions.model, ctx.null, ctx.evaluator, progress,
            ctx.source.decode, conditions.prompts,
        )  # fmt: skip
    latency, end_to_end = {}, None
    if dist_info().main:  # under torchrun, rank 0 alone times (the others wait)
        with ctx.timer.stage("latency_fp"), alone():
            for batch in (1, 8):
                times = interleaved_step_times(
                    {"torch_fp32": reference}, batch, ctx.shape, ctx.condition, recipe.compare.latency_runs, 3,
                    LATENCY_BLOCK, LATENCY_SETTLE,
                )  # fmt: skip
                latency[f"b{batch}"] = float(np.median(times["torch_fp32"]))
            if ctx.source.pipe is not None:
                end_to_end = _end_to_end(ctx, {"torch_fp32": reference})["torch_fp32"]
    barrier()  # the other ranks start their next share once the timing is done
    with ctx.timer.stage("peers"):
        peers = run_peers(ctx, fp)
    return TorchSide(fp, latency, end_to_end, peers)


def _release(engine: Engine) -> None:
    """Free what a runtime holds in memory (it loads again when called)."""
    release = getattr(engine, "release", None)
    if release is not None:
        release()


@torch.no_grad()
def _end_to_end(
    ctx: RunContext, engines: dict[str, Engine], done: Callable[[Engine], None] = lambda _engine: None
) -> dict[str, float]:
    """ms per image of what a pipeline call does: conditioning (the text encoder), the denoising
    loop, the VAE decode — for each of `engines` (FP torch and onnxruntime, the run's engine, the
    recommended one), batch E2E_BATCH, median of 3."""
    from flowpress.sampling import noise_for_seeds, sample

    found = {}
    for name, engine in engines.items():
        times = []
        for _ in range(3):
            start = time.perf_counter()
            conditions = ctx.conditions(E2E_BATCH)
            noise = noise_for_seeds(range(E2E_BATCH), ctx.shape)
            seeds = list(range(E2E_BATCH))
            final = sample(
                ctx.sampler, engine, noise, conditions.model, ctx.recipe.sampling.guidance, ctx.null, seeds=seeds
            ).final
            if ctx.source.decode is not None:
                ctx.source.decode(final)
            times.append((time.perf_counter() - start) * 1000 / E2E_BATCH)
        found[name] = float(np.median(times))
        done(engine)
    return found


Candidates = dict[str, tuple[Engine, list[Path]]]


def compare_stage(
    ctx: RunContext,
    run: Path,
    progress: bool,
    amend: Callable[[Report], None] | None = None,
    torch_side: TorchSide | None = None,
    one_at_a_time: bool = False,
) -> Report | None:
    """Compare, time, judge and report the engines of `run` (report files written into it; under
    torchrun every rank samples its share, rank 0 alone times, writes and returns the report);
    torch_side: what was measured of the torch model before (measured here when None, the model
    loaded); `amend` may add to the report before it is written (the mixed-precision search does);
    one_at_a_time (large models): each engine is loaded only while it is used and timed alone."""
    recipe, timer, sampler = ctx.recipe, ctx.timer, ctx.sampler
    config = ctx.compare_config
    if torch_side is None:
        torch_side = measure_torch_side(ctx, progress)
    candidates = cpu_engines(ctx, run, one_at_a_time)
    done = _release if one_at_a_time else (lambda _engine: None)
    main = main_engine(ctx)
    engine, engine_files = candidates[main]
    engine_manifest = json.loads((run / "engine" / "engine.json").read_text())
    speaks = dist_info().main  # under torchrun the ranks share the sampling; rank 0 times and reports
    revalidated = None
    if speaks:
        with timer.stage("host_check"), alone():
            revalidated = _host_check(ctx, run, engine_manifest, candidates)
    with timer.stage("compare"):
        fp = torch_side.fp
        comparison = compare(
            fp, engine, sampler, config, ctx.shape, fp.cond, ctx.null, ctx.evaluator, progress, ctx.source.decode,
            fp.prompts,
        )  # fmt: skip
        done(engine)
    latency: dict[str, dict[str, float]] = {}
    if speaks:
        with timer.stage("latency"), alone():
            latency = _latency(ctx, run, torch_side, engine, main, candidates, one_at_a_time)
    barrier()  # as above
    with timer.stage("judge"):
        judged, samples = _judge_all(ctx, comparison, candidates, main, done)
        forms = _weight_forms(ctx, engine_manifest, run, comparison)
        peers = [{**p, "margin_db": comparison.final["psnr_db"] - p["final_psnr_db"]} for p in torch_side.peers]
    if not speaks:
        return None
    engines, recommendation, end_to_end = _ranked(ctx, run, torch_side, judged, candidates, main, latency, done)
    report = Report(
        recipe=recipe.name,
        precision=recipe.quantize.precision,
        flavour=recipe.export.flavour,
        engine=engine.name,
        n_samples=config.n_samples,
        schedule={**sampler.as_dict(), "guidance": recipe.sampling.guidance},
        gate=comparison.gate,
        per_step=comparison.per_step,
        final=comparison.final,
        quality=comparison.quality,
        latency_ms=latency,
        latency_note=_latency_note(recipe.compare.latency_runs),
        size_bytes={"fp32_onnx": graph_bytes(run / "fp32.onnx"), "engine": sum(f.stat().st_size for f in engine_files)},
        cpu_engines=engines,
        recommendation=recommendation,
        host={
            "isa": host_record(ctx.host),
            "validated_on": engine_manifest["validated_on"],
            "revalidated": revalidated,
        },
        weight_forms=forms,
        fp_samples=comparison.fp_samples,
        model=ctx.source.kind,
        peers=peers or None,
        end_to_end_ms_per_image=end_to_end,
    )
    if amend is not None:
        amend(report)
    report.stages, report.peak_rss_bytes = timer.as_dict(), timer.peak_rss_bytes
    write_report(run, comparison, report, _detached(samples), f"{recipe.name}: {engine.name} vs FP")
    return report


def _ranked(
    ctx: RunContext, run: Path, torch_side: TorchSide, judged: dict[str, dict[str, Any]], candidates: Candidates,
    main: str, latency: dict[str, dict[str, float]], done: Callable[[Engine], None],
) -> tuple[list[dict[str, Any]], dict[str, Any], dict[str, float] | None]:  # fmt: skip
    """(the CPU engines' rows, the recommendation, the pipeline's end-to-end ms per image or None)."""
    engines = [
        _engine_row(name, judged[name], files, latency["engine" if name == main else name.replace("-", "_")])
        for name, (_, files) in candidates.items()
    ]
    recommendation = recommend(engines)
    end_to_end = None
    if ctx.source.pipe is not None:  # a pipeline call's whole cost, text encoder and VAE included
        with ctx.timer.stage("end_to_end"), alone():
            engine = candidates[main][0]
            end_to_end = _pipeline_cost(ctx, run, torch_side, engine, candidates, recommendation["engine"], done)
    return engines, recommendation, end_to_end


def _latency_note(runs: int) -> str:
    return (
        "median ms of one model forward at batch 1 / 8 (the sampler runs 2x batch under guidance), "
        f"{runs} runs after warm-up, the runtimes timed interleaved (rounds of {LATENCY_SETTLE} untimed + "
        f"{LATENCY_BLOCK} timed forwards each), {torch.get_num_threads()} torch threads"
    )


def _pipeline_cost(
    ctx: RunContext, run: Path, torch_side: TorchSide, engine: Engine, candidates: Candidates,
    recommended: str | None, done: Callable[[Engine], None],
) -> dict[str, float]:  # fmt: skip
    """ms per image of a whole pipeline call with torch fp32, onnxruntime fp32, the judged engine
    and the engine the report tells the user to ship."""
    timed = {"ort_fp32": OrtEngine(run / "fp32.onnx", ctx.sampler, "ort-fp32"), "engine": engine}
    if recommended is not None and recommended != engine.name:
        timed[recommended] = candidates[recommended][0]
    return {"torch_fp32": torch_side.end_to_end_ms or 0.0, **_end_to_end(ctx, timed, done)}


def _host_check(
    ctx: RunContext, run: Path, engine_manifest: dict[str, Any], candidates: Candidates
) -> dict[str, Any] | None:
    """The engines' parity on this host when it is of another ISA class than the one they were
    validated on (None when it is the same): engines.portability.check_engine_host."""
    return check_engine_host(
        engine_manifest,
        {name: e for name, (e, _) in candidates.items()},
        OrtEngine(run / "fp32.onnx", ctx.sampler, "ort-fp32", optimization="disabled"),
        lambda: parity_feeds(CalibrationSet.load(run / "calibration" / "inputs.safetensors")),
        f"{ctx.recipe.name}: engine/",
    )


def _latency(
    ctx: RunContext, run: Path, torch_side: TorchSide, engine: Engine, main: str, candidates: Candidates,
    one_at_a_time: bool,
) -> dict[str, dict[str, float]]:  # fmt: skip
    """Median ms per forward at batch 1 and 8 of onnxruntime fp32, the judged engine and every
    other candidate: interleaved, so that a slow spell of the host does not pick the
    recommendation; one at a time (large models), each alone and released after."""
    sampler, recipe = ctx.sampler, ctx.recipe
    done = _release if one_at_a_time else (lambda _engine: None)
    runtimes: dict[str, Engine] = {"ort_fp32": OrtEngine(run / "fp32.onnx", sampler, "ort-fp32"), "engine": engine}
    runtimes.update({name.replace("-", "_"): e for name, (e, _) in candidates.items() if name != main})
    done(runtimes["ort_fp32"])
    latency: dict[str, dict[str, float]] = {"torch_fp32": torch_side.latency_ms, **{name: {} for name in runtimes}}
    groups = [{name: e} for name, e in runtimes.items()] if one_at_a_time else [runtimes]
    for group in groups:
        for batch in (1, 8):
            times = interleaved_step_times(
                group, batch, ctx.shape, ctx.condition, recipe.compare.latency_runs, 3, LATENCY_BLOCK, LATENCY_SETTLE
            )
            for name, t in times.items():
                latency[name][f"b{batch}"] = float(np.median(t))
        for e in group.values():
            done(e)
    return latency


def _judge_all(
    ctx: RunContext, comparison: Comparison, candidates: Candidates, main: str, done: Callable[[Engine], None]
) -> tuple[dict[str, dict[str, Any]], dict[str, Tensor]]:
    """({engine: its final fidelity, quality and gate}, {engine: its samples}) of every CPU engine:
    the judged engine's from `comparison`, every other candidate's sampled on the same seeds."""
    judged: dict[str, dict[str, Any]] = {}
    samples = {main: comparison.engine}
    for name, (candidate, _) in candidates.items():
        if name == main:
            judged[name] = {"final": comparison.final, "quality": comparison.quality["engine"], "gate": comparison.gate}
        else:
            judged[name] = judge(
                comparison, candidate, ctx.sampler, ctx.compare_config, ctx.shape, ctx.null, ctx.evaluator,
                ctx.source.decode,
            )  # fmt: skip
            samples[name] = judged[name]["samples"]
            done(candidate)
    return judged, samples


def _engine_row(name: str, judged: dict[str, Any], files: list[Path], ms: dict[str, float]) -> dict[str, Any]:
    """The report's row of one CPU engine: fidelity, quality, speed, size, gate."""
    return {
        "engine": name,
        "final_psnr_db": judged["final"]["psnr_db"],
        "final_ssim": judged["final"]["ssim"],
        "quality": judged["quality"],
        "ms_b1": ms["b1"],
        "ms_b8": ms["b8"],
        "size_bytes": sum(f.stat().st_size for f in files),
        "gate_passed": judged["gate"]["passed"],
    }


def _detached(samples: dict[str, Tensor]) -> dict[str, Tensor]:
    return {name: value.detach().cpu() for name, value in samples.items()}
