"""FP vs engine from the same seeds and labels: per-step error, final fidelity, quality, gate."""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch
from torch import Tensor

from engines.base import Engine, EngineVelocity
from models.classifier import DigitClassifier
from sampling import FlowpressError, noise_for_seeds, sample


@dataclass(frozen=True)
class GateConfig:
    """The engine passes when every threshold holds (None disables one)."""

    min_final_psnr_db: float | None = 30.0
    max_classifier_acc_drop: float | None = 0.02  # absolute, in accuracy (0.02 = 2 points)
    max_fd_ratio: float | None = None  # engine FD / reference FD
    # the FP reference itself must be sane: a setting that breaks the model (a negative guidance,
    # a wrong time convention) would otherwise pass by being consistently wrong
    min_reference_classifier_acc: float | None = None


@dataclass(frozen=True)
class CompareConfig:
    n_samples: int = 500
    seed_base: int = 0
    batch_size: int = 50
    guidance: float = 1.0
    null_label: int | None = None
    gate: GateConfig = field(default_factory=GateConfig)

    def __post_init__(self) -> None:
        if self.n_samples < 2 or self.batch_size < 1:
            raise FlowpressError(
                f"compare: n_samples must be >= 2 and batch_size >= 1, got {self.n_samples}, {self.batch_size}"
            )


@dataclass
class Comparison:
    """Samples and errors of one FP-vs-engine run; `report()` gives the report.json fields."""

    fp: Tensor  # (N, C, H, W) final FP samples
    engine: Tensor  # (N, C, H, W) final engine samples
    labels: Tensor | None
    seeds: Tensor
    per_step: list[dict[str, float]]
    final: dict[str, float]
    quality: dict[str, dict[str, float]]
    gate: dict[str, Any]


def psnr_db(reference: Tensor, test: Tensor) -> float:
    """PSNR over the [-1, 1] data range (peak-to-peak 2), both clamped to it."""
    mse = float((reference.clamp(-1, 1) - test.clamp(-1, 1)).double().pow(2).mean())
    return float("inf") if mse == 0 else 10 * np.log10(4.0 / mse)


def rel_l2(reference: Tensor, test: Tensor) -> Tensor:
    """(B,) ||test - ref|| / ||ref|| per sample."""
    ref = reference.flatten(1).double()
    return (test.flatten(1).double() - ref).norm(dim=1) / ref.norm(dim=1).clamp_min(1e-12)


def frechet_distance(features_a: np.ndarray, features_b: np.ndarray) -> float:
    """Frechet distance between Gaussians fitted to two (N, D) feature sets."""
    from scipy import linalg

    mu_a, mu_b = features_a.mean(0), features_b.mean(0)
    # ReLU features have dead dimensions: a tiny ridge keeps the covariances invertible.
    ridge = 1e-6 * np.eye(features_a.shape[1])
    cov_a, cov_b = np.cov(features_a, rowvar=False) + ridge, np.cov(features_b, rowvar=False) + ridge
    covmean = np.real(linalg.sqrtm(cov_a @ cov_b))
    return float(((mu_a - mu_b) ** 2).sum() + np.trace(cov_a + cov_b - 2 * covmean))


@torch.no_grad()
def quality(
    classifier: DigitClassifier, samples: Tensor, labels: Tensor, real_features: np.ndarray
) -> dict[str, float]:
    """classifier_acc: fraction recognised as the requested class; fd: vs real digits' features."""
    logits = torch.cat([classifier(chunk.clamp(-1, 1)) for chunk in samples.split(256)])
    features = torch.cat([classifier.embed(chunk.clamp(-1, 1)) for chunk in samples.split(256)]).numpy()
    return {
        "classifier_acc": float((logits.argmax(1) == labels).float().mean()),
        "fd": frechet_distance(features.astype(np.float64), real_features.astype(np.float64)),
    }


def evaluate_gate(gate: GateConfig, final: dict[str, float], quality_: dict[str, dict[str, float]]) -> dict[str, Any]:
    checks = []
    ref, eng = quality_["reference"], quality_["engine"]
    if gate.min_final_psnr_db is not None:
        checks.append(
            (
                "final_psnr_db",
                final["psnr_db"],
                ">=",
                gate.min_final_psnr_db,
                final["psnr_db"] >= gate.min_final_psnr_db,
            )
        )
    if gate.max_classifier_acc_drop is not None:
        drop = ref["classifier_acc"] - eng["classifier_acc"]
        checks.append(
            ("classifier_acc_drop", drop, "<=", gate.max_classifier_acc_drop, drop <= gate.max_classifier_acc_drop)
        )
    if gate.min_reference_classifier_acc is not None:
        floor = gate.min_reference_classifier_acc
        acc = ref["classifier_acc"]
        checks.append(("reference_classifier_acc", acc, ">=", floor, acc >= floor))
    if gate.max_fd_ratio is not None:
        ratio = eng["fd"] / max(ref["fd"], 1e-12)
        checks.append(("fd_ratio", ratio, "<=", gate.max_fd_ratio, ratio <= gate.max_fd_ratio))
    return {
        "passed": all(c[4] for c in checks),
        "thresholds": {k: v for k, v in asdict(gate).items() if v is not None},
        "checks": [
            {"name": n, "value": v, "op": op, "threshold": th, "passed": bool(ok)} for n, v, op, th, ok in checks
        ],
    }


def check_finite(samples: Tensor, engine: Engine, seeds: Tensor) -> None:
    """One line when an engine's samples hold NaN / Inf (a corrupt engine, or one that overflows)."""
    bad = ~torch.isfinite(samples.flatten(1)).all(dim=1)
    if bool(bad.any()):
        seed = int(seeds[int(bad.nonzero()[0])])
        raise FlowpressError(
            f"compare: engine {engine.name} produced NaN / Inf for seed {seed} ({int(bad.sum())} of {len(seeds)} "
            "samples in the batch); the engine file is corrupt or overflows: rebuild it with `make quantize`"
        )


def compare(
    reference: Engine,
    engine: Engine,
    config: CompareConfig,
    classifier: DigitClassifier,
    real_features: np.ndarray,
    sample_shape: tuple[int, ...],
    num_classes: int | None,
    progress: bool = True,
) -> Comparison:
    """Sample with `reference` and `engine` from identical noise and labels; measure the gap."""
    from tqdm import tqdm

    if reference.schedule != engine.schedule:
        raise FlowpressError(
            f"compare: engine schedule {engine.schedule} differs from the reference's {reference.schedule}"
        )
    schedule = engine.schedule
    seeds = torch.arange(config.seed_base, config.seed_base + config.n_samples)
    labels = torch.arange(config.n_samples) % num_classes if num_classes else None
    n_grid = schedule.n_steps + 1
    rel_sum, cos_sum = torch.zeros(n_grid, dtype=torch.float64), torch.zeros(n_grid, dtype=torch.float64)
    finals_fp, finals_engine = [], []
    ref_v, eng_v = EngineVelocity(reference), EngineVelocity(engine)
    starts = range(0, config.n_samples, config.batch_size)
    for start in tqdm(starts, desc=f"compare {engine.name}", disable=not progress):
        chunk = seeds[start : start + config.batch_size]
        noise = noise_for_seeds(chunk.tolist(), sample_shape)
        cond = None if labels is None else labels[start : start + len(chunk)]
        traj_fp = sample(ref_v, noise, cond, schedule, config.guidance, config.null_label)
        traj_engine = sample(eng_v, noise, cond, schedule, config.guidance, config.null_label)
        check_finite(traj_fp.final, reference, chunk)
        check_finite(traj_engine.final, engine, chunk)
        for k in range(n_grid):
            rel_sum[k] += rel_l2(traj_fp.xs[k], traj_engine.xs[k]).sum()
            cos_sum[k] += torch.nn.functional.cosine_similarity(
                traj_fp.xs[k].flatten(1).double(), traj_engine.xs[k].flatten(1).double(), dim=1
            ).sum()
        finals_fp.append(traj_fp.final)
        finals_engine.append(traj_engine.final)
    fp, eng = torch.cat(finals_fp), torch.cat(finals_engine)
    times = schedule.times.tolist()
    per_step = [
        {
            "step": k,
            "t": times[k],
            "rel_l2": float(rel_sum[k] / config.n_samples),
            "cosine": float(cos_sum[k] / config.n_samples),
        }
        for k in range(n_grid)
    ]
    final = {"psnr_db": psnr_db(fp, eng), "rel_l2": float(rel_l2(fp, eng).mean())}
    if labels is None:
        raise FlowpressError("compare: quality metrics need a class-conditional model (digits classifier)")
    quality_ = {
        "reference": quality(classifier, fp, labels, real_features),
        "engine": quality(classifier, eng, labels, real_features),
    }
    gate = evaluate_gate(config.gate, final, quality_)
    return Comparison(fp, eng, labels, seeds, per_step, final, quality_, gate)


@torch.no_grad()
def judge(
    comparison: Comparison,
    engine: Engine,
    config: CompareConfig,
    classifier: DigitClassifier,
    real_features: np.ndarray,
    sample_shape: tuple[int, ...],
) -> dict[str, Any]:
    """Another engine on the comparison's seeds and labels, judged by the same gate against the
    same FP finals: {final, quality, gate}."""
    finals = []
    velocity = EngineVelocity(engine)
    for start in range(0, len(comparison.seeds), config.batch_size):
        chunk = comparison.seeds[start : start + config.batch_size]
        cond = None if comparison.labels is None else comparison.labels[start : start + len(chunk)]
        noise = noise_for_seeds(chunk.tolist(), sample_shape)
        finals.append(sample(velocity, noise, cond, engine.schedule, config.guidance, config.null_label).final)
        check_finite(finals[-1], engine, chunk)
    eng = torch.cat(finals)
    final = {"psnr_db": psnr_db(comparison.fp, eng), "rel_l2": float(rel_l2(comparison.fp, eng).mean())}
    if comparison.labels is None:
        raise FlowpressError("compare: quality metrics need a class-conditional model (digits classifier)")
    quality_ = {
        "reference": comparison.quality["reference"],
        "engine": quality(classifier, eng, comparison.labels, real_features),
    }
    return {"final": final, "quality": quality_["engine"], "gate": evaluate_gate(config.gate, final, quality_)}


def recommend(candidates: list[dict[str, Any]]) -> dict[str, Any]:
    """The engine to ship: the fastest at batch 8 among those that pass the gate."""
    passing = [c for c in candidates if c["gate_passed"]]
    if not passing:
        return {"engine": None, "reason": "no CPU engine passes the gate; ship none (see the gate checks)"}
    best = min(passing, key=lambda c: c["ms_b8"])
    fastest = min(candidates, key=lambda c: c["ms_b8"])
    reason = f"fastest at batch 8 ({best['ms_b8']:.2f} ms per forward) among the engines that pass the gate"
    if fastest is not best:
        reason += f"; {fastest['engine']} is faster ({fastest['ms_b8']:.2f} ms) but fails the gate"
    return {"engine": best["engine"], "reason": reason}


def step_times_ms(engine: Engine, batch: int, sample_shape: tuple[int, ...], runs: int, warmup: int) -> np.ndarray:
    """Wall ms of `runs` engine forwards at `batch` after `warmup`, cycling through the steps."""
    x = torch.randn(batch, *sample_shape, generator=torch.Generator().manual_seed(0))
    cond = torch.zeros(batch, dtype=torch.int64)
    times = []
    with torch.no_grad():
        for i in range(warmup + runs):
            step = torch.full((batch,), i % engine.schedule.n_steps, dtype=torch.int64)
            start = time.perf_counter()
            engine(x, step, cond)
            if i >= warmup:
                times.append((time.perf_counter() - start) * 1000)
    return np.array(times)


def interleaved_step_times(
    engines: dict[str, Engine], batch: int, shape: tuple[int, ...], runs: int, warmup: int, block: int, settle: int
) -> dict[str, np.ndarray]:
    """Wall ms of `runs` forwards per engine at `batch`, timed in rounds: each round gives every
    engine `settle` untimed forwards and then `block` timed ones; the engine order rotates each
    round.  Measured on the digits DiT: after a switch of runtime an engine's first forwards run
    cold (OpenVINO int8 b8 median: 2.7-3.4 ms timed alone, 5.1-6.4 with 1 settle + 5 timed per
    round, 3.2-3.4 with 3 + 10), so a round must be long enough to be measured warm."""
    x = torch.randn(batch, *shape, generator=torch.Generator().manual_seed(0))
    cond = torch.zeros(batch, dtype=torch.int64)
    names = list(engines)
    times: dict[str, list[float]] = {name: [] for name in names}
    counts = dict.fromkeys(names, 0)

    def forward(name: str) -> float:
        engine = engines[name]
        step = torch.full((batch,), counts[name] % engine.schedule.n_steps, dtype=torch.int64)
        counts[name] += 1
        start = time.perf_counter()
        engine(x, step, cond)
        return (time.perf_counter() - start) * 1000

    with torch.no_grad():
        for name in names:
            for _ in range(warmup):
                forward(name)
        rounds = -(-runs // block)
        for r in range(rounds):
            for name in names[r % len(names) :] + names[: r % len(names)]:
                for _ in range(settle):
                    forward(name)
                times[name] += [forward(name) for _ in range(min(block, runs - len(times[name])))]
    return {name: np.array(t) for name, t in times.items()}


def median_step_ms(engine: Engine, batch: int, sample_shape: tuple[int, ...], runs: int = 20, warmup: int = 3) -> float:
    """Median wall time of one engine forward at `batch` over `runs` timed calls after warm-up."""
    return float(np.median(step_times_ms(engine, batch, sample_shape, runs, warmup)))
