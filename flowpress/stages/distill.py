"""`flowpress distill`: the SlimFlow stage chain and its report (runs/<name>/distill.json, distill.md).

teacher -> reflow pairs -> annealing reflow -> flow-guided one-step distillation (the student),
and the baseline on the same pairs and budget: 2-rectified flow -> plain one-step distillation.
Intermediate pairs and checkpoints (safetensors, no pickle) live in runs/<name>-work/ under names
hashed from everything that shaped them, so an interrupted run resumes and a changed recipe starts afresh.
"""

from __future__ import annotations

import copy
import dataclasses
import json
import platform
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from functools import partial
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from flowpress.compress.distributed import config_hash, device
from flowpress.compress.pairs import Pairs, generate_pairs, load_pairs
from flowpress.compress.slimflow import build_student, count_params, distill, reflow
from flowpress.compress.train_state import TrainState
from flowpress.errors import FlowpressError
from flowpress.evaluator import load_evaluator
from flowpress.models import DiffusersDenoiser, StepModel, load_model, save_model
from flowpress.ranks import Dist, init_distributed
from flowpress.recipe import DistillRecipe
from flowpress.rundir import run_lock, staged_run, tree_hashes
from flowpress.sampling import Schedule, batch_cond, noise_for_seeds, sample
from flowpress.schema import to_dict
from flowpress.validation import Evaluator

ENTRIES = ("teacher", "student_1step", "student_2step", "baseline_1step")
NOT_SCORES = ("steps", "method", "guidance", "params", "ms_per_image_b8", "model")


@dataclasses.dataclass(frozen=True)
class Evaluated:
    """One model at one sampler setting: its samples (N, C, H, W) and the distill.json entry."""

    samples: Tensor
    entry: dict[str, Any]


@torch.no_grad()
def _sample_all(model: DiffusersDenoiser, schedule: Schedule, guidance: float, seeds: Tensor, batch: int) -> Tensor:
    step_model, cond, out = StepModel(model, schedule), model.cycling_condition(len(seeds)), []
    for start in range(0, len(seeds), batch):
        chunk = slice(start, start + batch)
        noise = noise_for_seeds(seeds[chunk].tolist(), model.sample_shape)
        out.append(
            sample(schedule, step_model.run, noise, batch_cond(cond, chunk), guidance, model.null_condition()).final
        )
    return torch.cat(out)


@torch.no_grad()
def ms_per_image(model: DiffusersDenoiser, schedule: Schedule, guidance: float, runs: int, batch: int = 8) -> float:
    """Median wall time of one whole sampling call (all steps, guidance included) at `batch`, per image."""
    noise = torch.randn(batch, *model.sample_shape, generator=torch.Generator().manual_seed(0))
    step_model, cond = StepModel(model, schedule), model.cycling_condition(batch)
    times = []
    for i in range(runs + 2):
        start = time.perf_counter()
        sample(schedule, step_model.run, noise, cond, guidance, model.null_condition())
        if i >= 2:
            times.append((time.perf_counter() - start) * 1000 / batch)
    return float(np.median(times))


def evaluate(
    model: DiffusersDenoiser,
    schedule: Schedule,
    guidance: float,
    recipe: DistillRecipe,
    evaluator: Evaluator | None,
    note: str,
) -> Evaluated:
    seeds = torch.arange(recipe.eval.seed_base, recipe.eval.seed_base + recipe.eval.n_samples)
    samples = _sample_all(model, schedule, guidance, seeds, recipe.eval.batch_size)
    scores = evaluator.score(samples, model.cycling_condition(len(seeds))) if evaluator is not None else {}
    entry = {
        "steps": schedule.n_steps,
        "method": schedule.method,
        "guidance": guidance,
        "params": count_params(model),
        **scores,
        "ms_per_image_b8": ms_per_image(model, schedule, guidance, recipe.eval.latency_runs),
        "model": note,
    }
    return Evaluated(samples, entry)


def _plot_grid(results: dict[str, Evaluated], path: Path) -> None:
    """One panel per model: columns = classes 0..9, rows = the first seeds of each class."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = 4
    fig, axes = plt.subplots(1, len(results), figsize=(3.2 * len(results), 1.6 + 1.3 * rows / 2))
    for ax, (name, result) in zip(np.atleast_1d(axes), results.items(), strict=True):
        images = ((result.samples[: rows * 10].clamp(-1, 1) + 1) / 2).numpy()[:, 0]
        h, w = images.shape[1:]
        canvas = np.ones((rows * (h + 1), 10 * (w + 1)))
        for i, image in enumerate(images):
            r, c = divmod(i, 10)  # classes cycle, so with 10 classes column c holds class c
            canvas[r * (h + 1) : r * (h + 1) + h, c * (w + 1) : c * (w + 1) + w] = image
        ax.imshow(canvas, cmap="gray", vmin=0, vmax=1)
        entry = result.entry
        scores = ", ".join(f"{k} {entry[k]:.3g}" for k in entry if k not in NOT_SCORES)
        ax.set_title(f"{name}\n{entry['steps']} step(s), {scores}", fontsize=9)
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def bars(
    entries: dict[str, dict[str, Any]], recipe: DistillRecipe, evaluator: Evaluator | None
) -> dict[str, dict[str, Any]]:
    """What the run is held to (recipe.bars, student.max_param_fraction), each with its measured value."""
    teacher, student, baseline = entries["teacher"], entries["student_1step"], entries["baseline_1step"]
    param_ratio = student["params"] / teacher["params"]
    speedup = teacher["ms_per_image_b8"] / student["ms_per_image_b8"]
    fraction, need = recipe.student.max_param_fraction, recipe.bars.min_speedup
    found = {
        "student_params_fraction": {
            "value": param_ratio,
            "op": "<=",
            "threshold": fraction,
            "passed": param_ratio <= fraction,
        },
        "latency_speedup": {"value": speedup, "op": ">=", "threshold": need, "passed": speedup >= need},
    }
    directions = evaluator.metrics if evaluator is not None else {}
    for metric in recipe.bars.beat_baseline_on:
        if metric not in directions:
            raise FlowpressError(
                f"bars.beat_baseline_on: the evaluator measures {sorted(directions) or 'nothing'}, not {metric!r}"
            )
        higher = directions[metric] == "higher"
        better = student[metric] > baseline[metric] if higher else student[metric] < baseline[metric]
        found[f"student_{metric}_vs_baseline"] = {
            "value": student[metric],
            "op": ">" if higher else "<",
            "threshold": baseline[metric],
            "passed": better,
        }
    return found


def distill_markdown(report: dict[str, Any]) -> str:
    """distill.md (results/distill.md adds the machine / commit / date header)."""
    entries, budget = report["entries"], report["budget"]
    scores = [k for k in next(iter(entries.values())) if k not in NOT_SCORES]
    lines = [
        f"# {report['recipe']}: SlimFlow one-step student",
        "",
        f"Pairs: {budget['pairs']} (teacher {budget['pair_steps']} "
        f"{budget['pair_method']} steps, guidance {budget['pair_guidance']}); reflow {budget['reflow_iterations']} "
        f"and distillation {budget['distill_iterations']} iterations for both the student and the baseline. "
        f"Distance: {budget['distance']}. Wall time {report['seconds']['total']:.0f} s ({report['machine']}).",
        "",
        "| entry | model | steps | params | " + " | ".join(scores) + (" | " if scores else "") + "ms / image (b8) |",
        "|---|---|---:|---:|" + "---:|" * len(scores) + "---:|",
    ]
    for name, e in entries.items():
        values = "".join(f"{e[k]:.3f} | " for k in scores)
        lines.append(f"| {name} | {e['model']} | {e['steps']} | {e['params']:,} | {values}{e['ms_per_image_b8']:.3f} |")
    lines += ["", "| bar | value | threshold | passed |", "|---|---:|---:|---|"]
    for name, b in report["bars"].items():
        lines.append(
            f"| {name} | {b['value']:.4g} | {b['op']} {b['threshold']:.4g} | {'yes' if b['passed'] else 'NO'} |"
        )
    lines += [
        "",
        f"Distance from the teacher: {teacher_gap(report)}.",
        "",
        f"Scores by the recipe's evaluator over {report['eval']['n_samples']} samples (seeds "
        f"{report['eval']['seed_base']}.., classes cycling).",
        "",
        "![samples](distill.png)",
        "",
    ]
    return "\n".join(lines)


def run_distill(
    recipe: DistillRecipe, runs_root: str | Path = "runs", progress: bool = True
) -> tuple[Path | None, dict]:
    """The whole SlimFlow chain; returns (run dir, distill.json dict) on rank 0, (None, {}) elsewhere.
    Rank 0 holds the run's lock throughout (its work directory is the run's too)."""
    dist = init_distributed()
    with ExitStack() as held:
        if dist.main:
            held.enter_context(run_lock(Path(runs_root) / recipe.name, "distill"))
        return _run_distill(recipe, runs_root, progress, dist)


@contextmanager
def _timed(seconds: dict[str, float], stage: str) -> Iterator[None]:
    """Record the block's wall time as seconds[stage], rounded to tenths of a second (distill.json's "seconds")."""
    began = time.perf_counter()
    yield
    seconds[stage] = round(time.perf_counter() - began, 1)


def _baseline_recipe(recipe: DistillRecipe) -> DistillRecipe:
    """The baseline: the same pairs and budget, reflow without annealing (2-rectified flow), distillation unguided."""
    reflow_config = dataclasses.replace(recipe.reflow, anneal_steps=0)
    distill_config = dataclasses.replace(recipe.distill, guide_weight=0.0)
    return dataclasses.replace(recipe, reflow=reflow_config, distill=distill_config)


def _work_paths(recipe: DistillRecipe, runs_root: str | Path, world: int) -> dict[str, Path]:
    """The pairs directory and each stage's checkpoint in runs/<name>-work/ (created), named by what shaped them."""
    pairs_key = config_hash(recipe.pairs, tree_hashes(Path(recipe.teacher.path)))
    work, base = Path(runs_root) / f"{recipe.name}-work", _baseline_recipe(recipe)
    work.mkdir(parents=True, exist_ok=True)
    key = partial(config_hash, pairs_key, recipe.student)  # a stage's hash: its pairs, the student, its configs
    return {
        "pairs": work / f"pairs-{pairs_key}",
        "reflow": work / f"reflow-{key(recipe.reflow)}.state.safetensors",
        "baseline_reflow": work / f"baseline-reflow-{key(base.reflow)}.state.safetensors",
        "distill": work / f"distill-{key(recipe.reflow, recipe.distill, world)}.state.safetensors",
        "baseline_distill": work / f"baseline-distill-{key(base.reflow, base.distill, world)}.state.safetensors",
    }


def _train(
    recipe: DistillRecipe,
    teacher: DiffusersDenoiser,
    pairs: Pairs,
    paths: dict[str, Path],
    features: Callable[[Tensor], Tensor] | None,
    progress: bool,
    seconds: dict[str, float],
) -> dict[str, TrainState]:
    """Train the student's two stages, then the baseline's (resumable, timed); returns each stage's TrainState."""
    base = _baseline_recipe(recipe)
    torch.manual_seed(recipe.reflow.seed)  # the student and the baseline start from the same weights
    student = build_student(recipe.student, teacher).to(device())
    baseline = copy.deepcopy(student)
    states: dict[str, TrainState] = {}
    with _timed(seconds, "annealing_reflow"):
        states["annealing_reflow"] = reflow(student, pairs, recipe.reflow, paths["reflow"], progress)
        reflowed = states["annealing_reflow"].ema
    with _timed(seconds, "flow_guided_distill"):
        one_step = copy.deepcopy(reflowed).requires_grad_(True)
        states["flow_guided_distill"] = distill(
            one_step, reflowed, pairs, recipe.distill, paths["distill"], progress, features=features
        )
    with _timed(seconds, "baseline_reflow"):
        states["baseline_reflow"] = reflow(baseline, pairs, base.reflow, paths["baseline_reflow"], progress)
    with _timed(seconds, "baseline_distill"):
        base_one = copy.deepcopy(states["baseline_reflow"].ema).requires_grad_(True)
        states["baseline_distill"] = distill(
            base_one, None, pairs, base.distill, paths["baseline_distill"], progress, features=features
        )
    return states


def _save_student(student: DiffusersDenoiser, recipe: DistillRecipe) -> Path:
    """Save the one-step student to student.out, its flowpress.json noting how to sample it and where it came from."""
    out = save_model(student.cpu(), recipe.student.out)
    meta = json.loads((out / "flowpress.json").read_text())
    meta["params"] = count_params(student)
    meta["sampling"] = {"steps": 1, "method": "euler", "guidance": 1.0}
    meta["distilled_from"] = {"teacher": recipe.teacher.path, "recipe": recipe.name}
    (out / "flowpress.json").write_text(json.dumps(meta, indent=2) + "\n")
    return out


def _evaluate_all(
    recipe: DistillRecipe, teacher: DiffusersDenoiser, states: dict[str, TrainState], evaluator: Evaluator | None
) -> dict[str, Evaluated]:
    """The teacher, the student and the baseline (ENTRIES), and the ablations, on the same seeds."""
    reflowed, distilled = states["annealing_reflow"].ema, states["flow_guided_distill"].ema
    rectified2, base_distilled = states["baseline_reflow"].ema, states["baseline_distill"].ema
    s = recipe.sampling
    models = {
        "teacher": (teacher, Schedule(s.steps, s.method), s.guidance, "teacher"),
        "student_1step": (distilled.cpu(), Schedule(1), 1.0, "annealing reflow + flow-guided distillation"),
        "student_2step": (reflowed.cpu(), Schedule(2), 1.0, "annealing reflow (the guide), 2 Euler steps"),
        "baseline_1step": (base_distilled.cpu(), Schedule(1), 1.0, "2-rectified flow + one-step distillation"),
        "student_distilled_2step": (distilled.cpu(), Schedule(2), 1.0, "the one-step student run for 2 Euler steps"),
        "reflow_1step": (reflowed.cpu(), Schedule(1), 1.0, "annealing reflow, no distillation"),
        "baseline_reflow_1step": (rectified2.cpu(), Schedule(1), 1.0, "2-rectified flow, no distillation"),
    }
    return {name: evaluate(m, sched, g, recipe, evaluator, note) for name, (m, sched, g, note) in models.items()}


def _distill_report(
    recipe: DistillRecipe,
    entries: dict[str, dict[str, Any]],
    evaluator: Evaluator | None,
    states: dict[str, TrainState],
    seconds: dict[str, float],
    student_dir: Path,
    dist: Dist,
) -> dict[str, Any]:
    """distill.json: the entries, the bars they are held to, the budget, the timings and the last losses."""
    return {
        "recipe": recipe.name,
        "machine": f"{platform.processor() or platform.machine()}, {torch.get_num_threads()} torch threads, "
        f"{dist.world} process(es), {'cuda' if device().type == 'cuda' else 'cpu'}",
        "entries": entries,
        "bars": bars(entries, recipe, evaluator),
        "budget": {
            "pairs": recipe.pairs.n_pairs,
            "pair_steps": recipe.pairs.steps,
            "pair_method": recipe.pairs.method,
            "pair_guidance": recipe.pairs.guidance,
            "reflow_iterations": recipe.reflow.iterations,
            "distill_iterations": recipe.distill.iterations,
            "distance": recipe.distill.distance,
            "world_size": dist.world,
        },
        "eval": to_dict(recipe.eval),
        "seconds": seconds,
        "student": str(student_dir),
        "recipe_full": to_dict(recipe),
        "loss_last_50": {k: float(np.mean(st.losses[-50:])) if st.losses else None for k, st in states.items()},
    }


def _write_run(run_dir: Path, report: dict[str, Any], results: dict[str, Evaluated], cond: dict[str, Tensor]) -> None:
    """distill.json, distill.png, distill.md and samples.npz, staged: the run directory is whole or as it was."""
    with staged_run(run_dir) as run:
        (run / "distill.json").write_text(json.dumps(report, indent=2) + "\n")
        _plot_grid({k: results[k] for k in ENTRIES}, run / "distill.png")
        (run / "distill.md").write_text(distill_markdown(report))
        arrays: dict[str, Any] = {k: r.samples.numpy() for k, r in results.items()}
        arrays.update({f"cond_{k}": v.numpy() for k, v in cond.items()})
        np.savez_compressed(run / "samples.npz", **arrays)  # (N, C, H, W) in [-1, 1] per entry


def _run_distill(recipe: DistillRecipe, runs_root: str | Path, progress: bool, dist: Dist) -> tuple[Path | None, dict]:
    """run_distill under its lock: pairs and training on every rank; rank 0 then saves, evaluates and writes."""
    start = time.perf_counter()
    seconds: dict[str, float] = {}
    teacher = load_model(recipe.teacher.path, recipe.teacher.time_scale)
    evaluator = load_evaluator(recipe.evaluator)
    paths = _work_paths(recipe, runs_root, dist.world)
    with _timed(seconds, "pairs"):
        generate_pairs(teacher.to(device()), recipe.pairs, paths["pairs"], progress)
        pairs = load_pairs(paths["pairs"], recipe.pairs, teacher.sample_shape, teacher.num_classes or 1)
    teacher = teacher.cpu()
    states = _train(recipe, teacher, pairs, paths, getattr(evaluator, "features", None), progress, seconds)
    if dist.world > 1:  # training is done: rank 0 alone saves and evaluates
        torch.distributed.destroy_process_group()
    if not dist.main:
        return None, {}
    out = _save_student(states["flow_guided_distill"].ema, recipe)
    with _timed(seconds, "evaluate"):
        results = _evaluate_all(recipe, teacher, states, evaluator)
    seconds["total"] = round(time.perf_counter() - start, 1)
    entries = {name: r.entry for name, r in results.items()}
    report = _distill_report(recipe, entries, evaluator, states, seconds, out, dist)
    _write_run(Path(runs_root) / recipe.name, report, results, teacher.cycling_condition(recipe.eval.n_samples))
    return Path(runs_root) / recipe.name, report


def teacher_gap(report: dict[str, Any]) -> str:
    """How far the one-step student is from the teacher at its default step count."""
    teacher, student = report["entries"]["teacher"], report["entries"]["student_1step"]
    gaps = [
        f"{k} {student[k]:.3g} vs {teacher[k]:.3g} ({student[k] - teacher[k]:+.3g})"
        for k in student
        if k not in NOT_SCORES
    ]
    return (
        f"student (1 step) vs teacher ({teacher['steps']} steps): "
        + "".join(f"{g}, " for g in gaps)
        + f"{teacher['ms_per_image_b8'] / student['ms_per_image_b8']:.0f}x less time per image at b8"
    )


def summary_lines(report: dict[str, Any]) -> list[str]:
    lines = []
    for name, e in report["entries"].items():
        scores = "".join(f", {k} {e[k]:.3f}" for k in e if k not in NOT_SCORES)
        lines.append(
            f"{name}: {e['steps']} step(s), {e['params']:,} params{scores}, {e['ms_per_image_b8']:.3f} ms/image (b8)"
        )
    lines.append(teacher_gap(report))
    for name, b in report["bars"].items():
        lines.append(
            f"bar {name} = {b['value']:.4g} {b['op']} {b['threshold']:.4g}: {'ok' if b['passed'] else 'FAILED'}"
        )
    return lines
