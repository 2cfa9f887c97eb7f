"""FP vs engine from the same seeds and conditioning: per-step error, final fidelity, the
model's own quality (an Evaluator), and the gate."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Literal, Protocol, runtime_checkable

import torch
from torch import Tensor

from flowpress.engines.base import Engine
from flowpress.errors import FlowpressError
from flowpress.ranks import run_sharded, shard
from flowpress.sampling import Cond, Sampler, Trajectory, batch_cond, noise_for_seeds, sample
from flowpress.validation.metrics import cosine, error_spread, psnr_db, rel_l2, ssim

Direction = Literal["higher", "lower"]
Decode = Callable[[Tensor], Tensor]  # latents -> images in [-1, 1]


@runtime_checkable
class Evaluator(Protocol):
    """A model's own quality measure, plugged into compare (the digits example brings a
    classifier's accuracy and a Frechet distance).

    metrics: name -> which way is better ('higher' or 'lower'); score: (N, C, H, W) final images
    in [-1, 1] and their conditioning (N rows per engine input, plus 'prompts': the N prompts for a
    text-conditioned model) -> {metric: value}."""

    metrics: dict[str, Direction]

    def score(self, samples: Tensor, cond: dict[str, Any]) -> dict[str, float]: ...


@dataclass(frozen=True)
class MetricBound:
    """Bounds on one evaluator metric.  max_drop: how much worse than the FP reference the
    engine may score (reference - engine for 'higher', engine - reference for 'lower');
    max_ratio: engine / reference at most; min_reference / max_reference: the FP reference's own
    score must reach it — a setting that breaks the model then fails instead of passing by
    being consistently wrong."""

    max_drop: float | None = None
    max_ratio: float | None = None
    min_reference: float | None = None
    max_reference: float | None = None


@dataclass(frozen=True)
class GateConfig:
    """The engine passes when every bound holds (None disables one); metrics: evaluator
    metrics by name (e.g. classifier_acc: {max_drop: 0.01, min_reference: 0.9})."""

    min_final_psnr_db: float | None = 30.0
    min_final_ssim: float | None = None
    metrics: dict[str, MetricBound] = field(default_factory=dict)


@dataclass(frozen=True)
class CompareConfig:
    n_samples: int = 500
    seed_base: int = 0
    batch_size: int = 50
    guidance: float = 1.0
    gate: GateConfig = field(default_factory=GateConfig)

    def __post_init__(self) -> None:
        if self.n_samples < 2 or self.batch_size < 1:
            raise FlowpressError(
                f"compare: n_samples must be >= 2 and batch_size >= 1, got {self.n_samples}, {self.batch_size}"
            )

    @property
    def seeds(self) -> Tensor:
        return torch.arange(self.seed_base, self.seed_base + self.n_samples)


@dataclass
class Comparison:
    """Samples and errors of one FP-vs-engine run.

    fp / engine: (N, C, H, W) final images (decoded by the pipeline's VAE for latent models);
    cond: their conditioning; per_step: {step, t, rel_l2, cosine} of the state after each sampler
    step (step 0: the shared noise; latent space for latent models); final: psnr_db, ssim,
    rel_l2 of the images; quality: {reference, engine} evaluator scores; gate: the verdict;
    prompts: the prompt of each sample (text-conditioned models)."""

    fp: Tensor
    engine: Tensor
    cond: Cond
    seeds: Tensor
    per_step: list[dict[str, float]]
    final: dict[str, float]
    quality: dict[str, dict[str, float]]
    gate: dict[str, Any]
    prompts: tuple[str, ...] | None = None

    @property
    def fp_samples(self) -> dict[str, float]:
        """The FP model's own final samples: mean, std and the fraction outside [-1, 1] — a wrong
        time or prediction convention shows here even when the engine agrees with FP."""
        return sample_stats(self.fp)


def sample_stats(images: Tensor) -> dict[str, float]:
    values = images.double()
    return {
        "mean": float(values.mean()),
        "std": float(values.std()),
        "outside_range": float((values.abs() > 1.0).float().mean()),
    }


def final_metrics(reference: Tensor, test: Tensor) -> dict[str, float]:
    return {
        "psnr_db": psnr_db(reference, test),
        "ssim": ssim(reference, test),
        "rel_l2": float(rel_l2(reference, test).mean()),
        **error_spread(reference, test),
    }


def evaluate_gate(
    gate: GateConfig,
    final: dict[str, float],
    quality: dict[str, dict[str, float]],
    directions: dict[str, Direction] | None = None,
) -> dict[str, Any]:
    """{passed, thresholds, checks} of the gate on one comparison."""
    directions = directions or {}
    checks: list[tuple[str, float, str, float, bool]] = []
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
    if gate.min_final_ssim is not None:
        checks.append(("final_ssim", final["ssim"], ">=", gate.min_final_ssim, final["ssim"] >= gate.min_final_ssim))
    for name, bound in gate.metrics.items():
        if name not in directions:
            raise FlowpressError(
                f"gate.metrics.{name}: the recipe's evaluator measures {sorted(directions) or 'nothing'}; "
                "bound one of those or remove it"
            )
        ref, eng = quality["reference"][name], quality["engine"][name]
        higher = directions[name] == "higher"
        if bound.max_drop is not None:
            drop = ref - eng if higher else eng - ref
            checks.append((f"{name}_drop", drop, "<=", bound.max_drop, drop <= bound.max_drop))
        if bound.max_ratio is not None:
            ratio = eng / max(ref, 1e-12)
            checks.append((f"{name}_ratio", ratio, "<=", bound.max_ratio, ratio <= bound.max_ratio))
        if bound.min_reference is not None:
            checks.append((f"reference_{name}", ref, ">=", bound.min_reference, ref >= bound.min_reference))
        if bound.max_reference is not None:
            checks.append((f"reference_{name}", ref, "<=", bound.max_reference, ref <= bound.max_reference))
    thresholds: dict[str, Any] = {
        k: v
        for k, v in (("min_final_psnr_db", gate.min_final_psnr_db), ("min_final_ssim", gate.min_final_ssim))
        if v is not None
    }
    thresholds["metrics"] = {
        name: {k: v for k, v in vars(b).items() if v is not None} for name, b in gate.metrics.items()
    }
    return {
        "passed": all(c[4] for c in checks),
        "thresholds": thresholds,
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


def _scores(
    evaluator: Evaluator | None, samples: Tensor, cond: Cond, prompts: tuple[str, ...] | None
) -> dict[str, float]:
    if evaluator is None:
        return {}
    described: dict[str, Any] = {**cond, **({"prompts": list(prompts)} if prompts is not None else {})}
    return evaluator.score(samples, described)


def _images(latents: Tensor, decode: Decode | None) -> Tensor:
    return latents if decode is None else decode(latents)


def _sampled(
    sampler: Sampler, engine: Engine, chunk: Tensor, rows: Cond, shape: tuple[int, ...], config: CompareConfig,
    null: Cond | None,
) -> Trajectory:  # fmt: skip
    """`engine`'s trajectory from the noise of the seeds `chunk` (rows: their conditioning), checked finite."""
    seeds = chunk.tolist()
    trajectory = sample(sampler, engine, noise_for_seeds(seeds, shape), rows, config.guidance, null, seeds=seeds)
    check_finite(trajectory.final, engine, chunk)
    return trajectory


def _by_batch(
    config: CompareConfig, seeds: Tensor, cond: Cond, work: Callable[[Tensor, Cond], Any], desc: str = "",
    progress: bool = False,
) -> list[Any]:  # fmt: skip
    """work(seeds, conditioning) of each batch of config.batch_size samples, in seed order.  Under
    torchrun each rank runs its share of the batches and every rank gets them all (flowpress.ranks);
    the batches are the same whatever the number of ranks, so are the numbers."""
    from tqdm import tqdm

    starts = range(0, len(seeds), config.batch_size)

    def one(start: int) -> Any:
        chunk = seeds[start : start + config.batch_size]
        return work(chunk, batch_cond(cond, slice(start, start + len(chunk))))

    with tqdm(total=len(shard(starts)), desc=desc, disable=not progress) as bar:
        return run_sharded(starts, one, bar.update)


@dataclass
class FpReference:
    """The FP side of a compare, sampled once and kept (it is small; the FP model need not stay
    loaded while engines are built and judged).  states: (n_states, N, C, H, W) every state of
    every trajectory, the shared noise first (latent space for latent models); fp: (N, C, H, W)
    final images (decoded); cond / seeds / prompts: what the samples were drawn with; quality:
    {reference: the evaluator's scores of fp}; name: the reference runtime."""

    states: Tensor
    fp: Tensor
    cond: Cond
    seeds: Tensor
    quality: dict[str, dict[str, float]]
    name: str
    prompts: tuple[str, ...] | None = None


@torch.no_grad()
def fp_reference(
    reference: Engine,
    sampler: Sampler,
    config: CompareConfig,
    shape: tuple[int, ...],
    cond: Cond,
    null: Cond | None = None,
    evaluator: Evaluator | None = None,
    progress: bool = True,
    decode: Decode | None = None,
    prompts: tuple[str, ...] | None = None,
) -> FpReference:
    """`reference`'s trajectories from the compare's seeds (cond: n_samples rows), kept whole."""
    seeds = config.seeds

    def states_of(chunk: Tensor, rows: Cond) -> tuple[Tensor, Tensor]:
        trajectory = _sampled(sampler, reference, chunk, rows, shape, config, null)
        return torch.stack(list(trajectory.xs)), _images(trajectory.final, decode)

    batches = _by_batch(config, seeds, cond, states_of, "FP reference", progress)
    all_states = torch.cat([b[0] for b in batches], dim=1)
    fp = torch.cat([b[1] for b in batches])
    quality = {"reference": _scores(evaluator, fp, cond, prompts)}
    return FpReference(all_states, fp, cond, seeds, quality, reference.name, prompts)


@torch.no_grad()
def compare(
    reference: Engine | FpReference,
    engine: Engine,
    sampler: Sampler,
    config: CompareConfig,
    shape: tuple[int, ...],
    cond: Cond,
    null: Cond | None = None,
    evaluator: Evaluator | None = None,
    progress: bool = True,
    decode: Decode | None = None,
    prompts: tuple[str, ...] | None = None,
) -> Comparison:
    """Sample with `engine` from the noise and conditioning of the FP reference (cond: n_samples
    rows; `reference` an engine to sample it from, or its kept FpReference) and measure the gap
    step by step, at the end (on images: `decode` turns latents into them), and by the evaluator."""
    if not isinstance(reference, FpReference):
        reference = fp_reference(reference, sampler, config, shape, cond, null, evaluator, False, decode, prompts)
    seeds = reference.seeds
    n_states = sampler.n_steps + 1

    def states_of(chunk: Tensor, rows: Cond) -> tuple[Tensor, Tensor]:
        trajectory = _sampled(sampler, engine, chunk, rows, shape, config, null)
        return torch.stack(list(trajectory.xs)), _images(trajectory.final, decode)

    batches = _by_batch(config, seeds, reference.cond, states_of, f"compare {engine.name}", progress)
    rel_sum, cos_sum = torch.zeros(n_states, dtype=torch.float64), torch.zeros(n_states, dtype=torch.float64)
    for start, (states, _) in zip(range(0, config.n_samples, config.batch_size), batches, strict=True):
        fp_states = reference.states[:, start : start + states.shape[1]]
        for k in range(n_states):
            rel_sum[k] += rel_l2(fp_states[k], states[k]).sum()
            cos_sum[k] += cosine(fp_states[k], states[k]).sum()
    eng = torch.cat([b[1] for b in batches])
    times = sampler.state_times
    per_step = [
        {
            "step": k,
            "t": times[k],
            "rel_l2": float(rel_sum[k] / config.n_samples),
            "cosine": float(cos_sum[k] / config.n_samples),
        }
        for k in range(n_states)
    ]
    final = final_metrics(reference.fp, eng)
    quality = {"reference": reference.quality["reference"], "engine": _scores(evaluator, eng, cond, prompts)}
    directions = evaluator.metrics if evaluator is not None else {}
    gate = evaluate_gate(config.gate, final, quality, directions)
    return Comparison(reference.fp, eng, reference.cond, seeds, per_step, final, quality, gate, reference.prompts)


@torch.no_grad()
def judge(
    comparison: Comparison | FpReference,
    engine: Engine,
    sampler: Sampler,
    config: CompareConfig,
    shape: tuple[int, ...],
    null: Cond | None = None,
    evaluator: Evaluator | None = None,
    decode: Decode | None = None,
) -> dict[str, Any]:
    """Another engine on the comparison's seeds and conditioning, judged by the same gate against
    the same FP finals: {final, quality, gate, samples (images)}."""

    def images_of(chunk: Tensor, rows: Cond) -> Tensor:
        return _images(_sampled(sampler, engine, chunk, rows, shape, config, null).final, decode)

    eng = torch.cat(_by_batch(config, comparison.seeds, comparison.cond, images_of))
    final = final_metrics(comparison.fp, eng)
    engine_scores = _scores(evaluator, eng, comparison.cond, comparison.prompts)
    quality = {"reference": comparison.quality["reference"], "engine": engine_scores}
    directions = evaluator.metrics if evaluator is not None else {}
    return {
        "final": final,
        "quality": quality["engine"],
        "gate": evaluate_gate(config.gate, final, quality, directions),
        "samples": eng,
    }


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
