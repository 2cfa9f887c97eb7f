"""Gate-driven mixed precision: keep the most trajectory-sensitive layers in full precision,
one at a time, until the exported engine passes the recipe's gate.

Each assignment is first checked on the real onnxruntime engine with the first
`check_samples` compare seeds (cheap), and only an assignment that passes the check is
confirmed by the full compare on compare.n_samples; the full compare's gate decides.
"""

from __future__ import annotations

import tempfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from flowpress.calibration import CalibrationSet
from flowpress.compress import QuantizedModel, Sensitivity, SensitivityConfig, keep_full_precision, layer_sensitivity
from flowpress.compress.config import MixedPrecisionConfig
from flowpress.context import RunContext
from flowpress.engines import Engine, OrtEngine, TorchEngine
from flowpress.engines.build import build_ort
from flowpress.errors import FlowpressError
from flowpress.export.graphfile import graph_bytes
from flowpress.ranks import alone, barrier, dist_info
from flowpress.sampling import batch_cond, noise_for_seeds, sample
from flowpress.validation import evaluate_gate, median_step_ms
from flowpress.validation.compare import final_metrics
from flowpress.validation.report import Report


@dataclass(frozen=True)
class Candidate:
    """One assignment as the real engine runs it: the first `n_samples` compare seeds.

    fallback_layers: layers in full precision, in the order they fell back; engine_bytes:
    the optimized onnxruntime graph; latency_ms: median per forward {'b1', 'b8'}; checks: the
    gate's other checks (evaluator metrics) by name and value.
    """

    fallback_layers: tuple[str, ...]
    engine_bytes: int
    latency_ms: dict[str, float]
    final_psnr_db: float
    checks: dict[str, float]
    passed: bool
    n_samples: int


@dataclass
class SearchResult:
    """candidates: every assignment checked, in order; confirmed: {fallback count: passed}
    of the full compares run; passed: whether the last full compare passed."""

    sensitivity: Sensitivity
    candidates: list[Candidate] = field(default_factory=list)
    confirmed: dict[int, bool] = field(default_factory=dict)
    passed: bool = False

    @property
    def fallback_layers(self) -> list[str]:
        return list(self.candidates[-1].fallback_layers) if self.candidates else []

    def report(self) -> dict[str, Any]:
        """The report.json `mixed_precision` block."""
        base = self.candidates[0]
        costs = []
        for before, after in zip(self.candidates, self.candidates[1:], strict=False):
            layer = after.fallback_layers[-1]
            gain = next(s.gain_db for s in self.sensitivity.layers if s.name == layer)
            costs.append(
                {
                    "layer": layer,
                    "sensitivity_gain_db": gain,
                    "size_bytes": after.engine_bytes - before.engine_bytes,
                    "latency_ms": {b: after.latency_ms[b] - before.latency_ms[b] for b in before.latency_ms},
                    "check_final_psnr_db": after.final_psnr_db,
                }
            )
        return {
            "passed": self.passed,
            "fallback_layers": self.fallback_layers,
            "fallback_cost": costs,
            "total_cost": {
                "size_bytes": self.candidates[-1].engine_bytes - base.engine_bytes,
                "latency_ms": {b: self.candidates[-1].latency_ms[b] - v for b, v in base.latency_ms.items()},
            },
            "candidates": [
                {
                    "fallback_layers": list(c.fallback_layers),
                    "engine_bytes": c.engine_bytes,
                    "latency_ms": c.latency_ms,
                    "final_psnr_db": c.final_psnr_db,
                    "checks": c.checks,
                    "check_passed": c.passed,
                    "confirmed": self.confirmed.get(len(c.fallback_layers)),
                    "n_samples": c.n_samples,
                }
                for c in self.candidates
            ],
            "sensitivity": {
                "method": "final-sample error with only this layer in full precision (torch fake-quant)",
                "n_samples": self.sensitivity.n_samples,
                "all_quantized_psnr_db": self.sensitivity.baseline_psnr_db,
                "layers": [
                    {"name": s.name, "final_psnr_db": s.final_psnr_db, "gain_db": s.gain_db}
                    for s in self.sensitivity.layers
                ],
            },
        }


class EngineCheck:
    """Checks assignments on the exported onnxruntime engine against FP finals sampled once, on
    the first `check_samples` compare seeds (a subset of the full compare)."""

    def __init__(self, ctx: RunContext, calib: CalibrationSet, n_samples: int, workdir: Path):
        self.ctx, self.calib, self.workdir = ctx, calib, Path(workdir)
        self.config = ctx.compare_config
        n = min(n_samples, self.config.n_samples)
        self.seeds = list(range(self.config.seed_base, self.config.seed_base + n))
        conditions = ctx.conditions(n)
        self.cond, self.described = conditions.model, conditions.described()
        self.fp = self._finals(TorchEngine(ctx.fp, ctx.sampler, "torch-fp32"))
        self.fp_quality = ctx.evaluator.score(self.fp, self.described) if ctx.evaluator else {}

    @torch.no_grad()
    def _finals(self, engine: Engine) -> Tensor:
        finals = []
        size = self.config.batch_size
        for start in range(0, len(self.seeds), size):
            noise = noise_for_seeds(self.seeds[start : start + size], self.ctx.shape)
            rows = batch_cond(self.cond, slice(start, start + size))
            seeds = self.seeds[start : start + size]
            finals.append(
                sample(self.ctx.sampler, engine, noise, rows, self.config.guidance, self.ctx.null, seeds=seeds).final
            )
        latents = torch.cat(finals)
        return latents if self.ctx.source.decode is None else self.ctx.source.decode(latents)

    def __call__(self, qmodel: QuantizedModel, fallback: tuple[str, ...]) -> Candidate:
        ctx = self.ctx
        self.workdir.mkdir(parents=True, exist_ok=True)
        optimized = self.workdir / "model.opt.onnx"
        export = ctx.recipe.export
        build_ort(
            qmodel,
            self.calib,
            self.workdir / "model.onnx",
            optimized,
            export.flavour,
            export.opset,
            ctx.host,
            "mixed precision",
        )
        engine = OrtEngine(optimized, ctx.sampler, "ort-int8-check")
        engine_finals = self._finals(engine)
        final = final_metrics(self.fp, engine_finals)  # images: _finals decodes latents
        quality = {
            "reference": self.fp_quality,
            "engine": ctx.evaluator.score(engine_finals, self.described) if ctx.evaluator else {},
        }
        gate = evaluate_gate(self.config.gate, final, quality, ctx.evaluator.metrics if ctx.evaluator else {})
        runs = ctx.recipe.compare.latency_runs
        latency = {f"b{b}": median_step_ms(engine, b, ctx.shape, ctx.condition, runs) for b in (1, 8)}
        return Candidate(
            fallback_layers=fallback,
            engine_bytes=graph_bytes(optimized),
            latency_ms=latency,
            final_psnr_db=final["psnr_db"],
            checks={c["name"]: c["value"] for c in gate["checks"] if c["name"] != "final_psnr_db"},
            passed=bool(gate["passed"]),
            n_samples=len(self.seeds),
        )


def gated_search(
    qmodel: QuantizedModel,
    sensitivity: Sensitivity,
    config: MixedPrecisionConfig,
    check: Callable[[QuantizedModel, tuple[str, ...]], Candidate],
    confirm: Callable[[SearchResult], bool],
    log: Callable[[str], None] = print,
) -> SearchResult:
    """Fall back on sensitivity.order one layer at a time (in place on `qmodel`) until an
    assignment passes `check` and then `confirm` (the full compare); raises FlowpressError
    when max_fallback layers (or every layer) in full precision still fail."""
    result = SearchResult(sensitivity)
    order = [name for name in sensitivity.order if name in qmodel.layers]
    fallback: tuple[str, ...] = ()
    while True:
        candidate = check(qmodel, fallback)
        result.candidates.append(candidate)
        log(
            f"mixed precision: {len(fallback)} layer(s) in full precision"
            + (f" (+{fallback[-1]})" if fallback else "")
            + f": check on {candidate.n_samples} samples {candidate.final_psnr_db:.2f} dB, "
            + "".join(f"{k} {v:.3g}, " for k, v in candidate.checks.items())
            + f"engine {candidate.engine_bytes:,} bytes: "
            + ("passes" if candidate.passed else "fails")
        )
        if candidate.passed:
            result.passed = confirm(result)
            result.confirmed[len(fallback)] = result.passed
            log(f"mixed precision: full compare {'passes' if result.passed else 'fails'} the gate")
            if result.passed:
                return result
        if len(fallback) >= min(config.max_fallback, len(order)):
            best = max(result.candidates, key=lambda c: c.final_psnr_db)
            raise FlowpressError(
                f"mixed precision: no assignment with up to {len(fallback)} layer(s) in full precision passes the gate "
                f"(best check: {best.final_psnr_db:.2f} dB with {len(best.fallback_layers)}); "
                "raise quantize.mixed_precision.max_fallback or relax the recipe's gate"
            )
        name = order[len(fallback)]
        keep_full_precision(qmodel, name)
        fallback = (*fallback, name)


def mixed_precision(
    ctx: RunContext, qmodel: QuantizedModel, calib: CalibrationSet, run: Path, progress: bool
) -> tuple[list[dict[str, Any]], dict[str, Any], Report | None, SearchResult | None]:
    """Rank layers by trajectory sensitivity, then keep them in full precision one at a time
    until the gate passes; returns (exports, engine manifest, report, search) of the confirmed
    assignment and raises FlowpressError when none passes.  Under torchrun the ranks share the
    ranking by layer; rank 0 alone searches (the others return nothing)."""
    from flowpress.stages.build import build_engines
    from flowpress.stages.compare import compare_stage

    recipe = ctx.recipe
    config: MixedPrecisionConfig = recipe.quantize.mixed_precision  # type: ignore[union-attr]
    names = [name for name in qmodel.layers if config.allows(name)]
    if not names:
        raise FlowpressError(
            f"{recipe.name}: quantize.mixed_precision.candidates {list(config.candidates)} match no quantized layer; "
            "use module names as listed under quantized_layers in a run's manifest.json"
        )
    with ctx.timer.stage("sensitivity"):
        set_output = recipe.export.flavour == "ort-cpu"  # as the engine runs it
        from flowpress.compress import set_output_quant

        set_output_quant(qmodel, set_output)
        sensitivity = SensitivityConfig(
            ctx.sampler,
            ctx.cond(config.sensitivity_samples),
            config.sensitivity_samples,
            config.sensitivity_seed_base,
            recipe.compare.batch_size,
            recipe.sampling.guidance,
            ctx.null,
        )
        ranking = layer_sensitivity(ctx.fp, qmodel, sensitivity, progress, names)
        set_output_quant(qmodel, True)
    found: dict[str, Any] = {}
    if not dist_info().main:  # under torchrun the ranking was shared; rank 0 searches alone
        barrier()
        return [], {}, None, None
    with tempfile.TemporaryDirectory(prefix="flowpress-search-") as workdir, alone():
        check = EngineCheck(ctx, calib, config.check_samples, Path(workdir))

        def confirm(search: SearchResult) -> bool:
            found["exports"], found["engine"] = build_engines(ctx, qmodel, calib, run)

            def amend(report: Report) -> None:  # the assignment being confirmed: its gate is this compare's
                search.passed = report.passed
                search.confirmed[len(search.fallback_layers)] = search.passed
                report.mixed_precision = search.report()

            found["report"] = compare_stage(ctx, run, progress, amend)
            return bool(found["report"].passed)

        with ctx.timer.stage("mixed_precision"):
            search = gated_search(qmodel, ranking, config, check, confirm, lambda line: print(f"[flowpress] {line}"))
    barrier()
    return found["exports"], found["engine"], found["report"], search
