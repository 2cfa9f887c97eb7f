"""Gate-driven mixed precision: keep the most trajectory-sensitive layers in full precision,
one at a time, until the exported engine passes the recipe's gate.

Each assignment is first checked on the real onnxruntime engine with the first
`check_samples` compare seeds (cheap), and only an assignment that passes the check is
confirmed by the full compare on compare.n_samples; the full compare's gate decides.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from compress import MixedPrecisionConfig, QuantizedModel, Sensitivity, keep_full_precision
from engines import CompareConfig, EngineVelocity, OrtEngine, median_step_ms
from engines.compare import evaluate_gate, psnr_db, quality
from export import ExportConfig, export_onnx, ort_session
from models.classifier import DigitClassifier
from sampling import FlowpressError, Schedule, VelocityFn, noise_for_seeds, sample


@dataclass(frozen=True)
class Candidate:
    """One assignment as the real engine runs it: the first `n_samples` compare seeds.

    fallback_layers: layers in full precision, in the order they fell back; engine_bytes:
    the optimized onnxruntime graph; latency_ms: median per forward {'b1', 'b8'}.
    """

    fallback_layers: tuple[str, ...]
    engine_bytes: int
    latency_ms: dict[str, float]
    final_psnr_db: float
    classifier_acc_drop: float
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
                    "classifier_acc_drop": c.classifier_acc_drop,
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
    """Checks assignments on the exported onnxruntime engine against FP finals sampled once.

    x: the first `n_samples` compare seeds and labels, so a check is a subset of the full compare.
    """

    def __init__(
        self,
        reference: VelocityFn,
        compare: CompareConfig,
        n_samples: int,
        schedule: Schedule,
        classifier: DigitClassifier,
        real_features: np.ndarray,
        sample_shape: tuple[int, ...],
        num_classes: int,
        workdir: Path,
        latency_runs: int,
    ):
        self.compare, self.schedule, self.classifier = compare, schedule, classifier
        self.real_features, self.sample_shape, self.workdir = real_features, sample_shape, Path(workdir)
        self.latency_runs = latency_runs
        n = min(n_samples, compare.n_samples)
        self.seeds = list(range(compare.seed_base, compare.seed_base + n))
        self.labels = torch.arange(n) % num_classes
        self.fp = self._finals(reference)
        self.fp_quality = quality(classifier, self.fp, self.labels, real_features)

    @torch.no_grad()
    def _finals(self, velocity: VelocityFn) -> Tensor:
        finals = []
        size = self.compare.batch_size
        for start in range(0, len(self.seeds), size):
            noise = noise_for_seeds(self.seeds[start : start + size], self.sample_shape)
            cond = self.labels[start : start + size]
            traj = sample(velocity, noise, cond, self.schedule, self.compare.guidance, self.compare.null_label)
            finals.append(traj.final)
        return torch.cat(finals)

    def __call__(self, qmodel: QuantizedModel, fallback: tuple[str, ...]) -> Candidate:
        self.workdir.mkdir(parents=True, exist_ok=True)
        graph = self.workdir / "model.onnx"
        optimized = self.workdir / "model.opt.onnx"
        export_onnx(qmodel.fp_module, self.schedule, graph, ExportConfig("ort-cpu"), qmodel)  # type: ignore[arg-type]
        ort_session(graph, "extended", optimized_path=str(optimized))
        engine = OrtEngine(optimized, self.schedule, "ort-int8-check")
        engine_finals = self._finals(EngineVelocity(engine))
        final = {"psnr_db": psnr_db(self.fp, engine_finals)}
        quality_ = {
            "reference": self.fp_quality,
            "engine": quality(self.classifier, engine_finals, self.labels, self.real_features),
        }
        gate = evaluate_gate(self.compare.gate, final, quality_)
        latency = {f"b{b}": median_step_ms(engine, b, self.sample_shape, self.latency_runs) for b in (1, 8)}
        return Candidate(
            fallback_layers=fallback,
            engine_bytes=optimized.stat().st_size,
            latency_ms=latency,
            final_psnr_db=final["psnr_db"],
            classifier_acc_drop=quality_["reference"]["classifier_acc"] - quality_["engine"]["classifier_acc"],
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
            f"accuracy drop {candidate.classifier_acc_drop:.3f}, engine {candidate.engine_bytes:,} bytes: "
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
                f"(best check: {best.final_psnr_db:.2f} dB, accuracy drop {best.classifier_acc_drop:.3f} with "
                f"{len(best.fallback_layers)}); raise quantize.mixed_precision.max_fallback or relax the recipe's gate"
            )
        name = order[len(fallback)]
        keep_full_precision(qmodel, name)
        fallback = (*fallback, name)
