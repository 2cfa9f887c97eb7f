"""`flowpress ablate`: every calibration strategy x temporal cache x setting, beside the peers.

One model, one input budget, the same sampler and seeds for every row; each row is the mean
over several calibration seeds, measured against the same FP trajectories.
"""

from __future__ import annotations

import copy
import json
import tempfile
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from calibration import CalibrationConfig, CalibrationSet, capture, select
from calibration.capture import Strategy
from compress import QuantConfig, QuantizedModel, layer_quants, quantize
from compress.quantize import Amax
from engines import Engine, EngineVelocity, OrtEngine, TorchEngine, median_step_ms, psnr_db, quality, rel_l2
from export import ExportConfig, export_onnx, ort_session
from flowpress.pipeline import ensure_classifier, ensure_model
from flowpress.recipe import Recipe, from_dict, load_recipe, load_yaml
from flowpress.rundir import run_lock, staged_run
from models import DiffusersVelocity, load_digits
from models.classifier import DigitClassifier
from sampling import FlowpressError, Schedule, noise_for_seeds, sample

# method -> (calibration strategy, scale selection).  The step-selection strategies use the
# MSE scale search, as PTQ4DM and Q-Diffusion do, so the rows differ only in which states
# they calibrate on; per-step rows use every step and reduce per-step abs-max over steps.
METHODS: dict[str, tuple[Strategy, Amax]] = {
    "naive": ("naive", "mse"),
    "uniform": ("uniform", "mse"),
    "ndtc": ("ndtc", "mse"),
    "perstep-max": ("all", "perstep-max"),
    "perstep-mean": ("all", "perstep-mean"),
    "perstep-percentile": ("all", "perstep-percentile"),
}
PEERS = ("modelopt-default", "ort-quantize-static")


@dataclass(frozen=True)
class AblationConfig:
    """recipes: one per architecture (model, sampler, guidance); budget: calibration inputs per
    row; trajectories: FP trajectories captured per calibration seed to draw them from."""

    name: str = "ablation"
    recipes: tuple[str, ...] = ("recipes/digits-unet-int8.yaml", "recipes/digits-dit-int8.yaml")
    methods: tuple[str, ...] = ("naive", "uniform", "ndtc", "perstep-max", "perstep-mean")
    settings: tuple[str, ...] = ("w8a8", "hard")
    hard_activation_bits: int = 6
    calibration_seeds: tuple[int, ...] = (100_000, 200_000, 300_000)
    budget: int = 256
    trajectories: int = 128
    compare_samples: int = 100
    batch_size: int = 100
    peers: tuple[str, ...] = PEERS

    def __post_init__(self) -> None:
        unknown = sorted(set(self.methods) - set(METHODS)) + sorted(set(self.peers) - set(PEERS))
        if unknown:
            raise FlowpressError(f"ablation: unknown method {unknown[0]!r}; known: {', '.join([*METHODS, *PEERS])}")
        if set(self.settings) - {"w8a8", "hard"}:
            raise FlowpressError(f"ablation.settings must be among w8a8, hard; got {list(self.settings)}")


@dataclass
class Reference:
    """FP trajectories of the compare seeds: xs (n+1, N, C, H, W), labels (N,)."""

    xs: Tensor
    labels: Tensor
    noise: Tensor


def fp_reference(model: DiffusersVelocity, schedule: Schedule, guidance: float, n: int, batch: int) -> Reference:
    """FP trajectories of seeds 0..n-1, labels cycling through the classes, in chunks of `batch`."""
    labels = torch.arange(n) % (model.num_classes or 1)
    noise = noise_for_seeds(range(n), model.sample_shape)
    chunks = [
        sample(
            model,
            noise[s : s + batch],
            labels[s : s + batch],
            schedule,
            guidance,
            model.null_label,
        ).xs
        for s in range(0, n, batch)
    ]
    return Reference(torch.cat(chunks, dim=1), labels, noise)


def sample_engine(engine: Engine, ref: Reference, guidance: float, null: int | None, batch: int) -> Tensor:
    velocity = EngineVelocity(engine)
    chunks = [
        sample(velocity, ref.noise[s : s + batch], ref.labels[s : s + batch], engine.schedule, guidance, null).xs
        for s in range(0, len(ref.labels), batch)
    ]
    return torch.cat(chunks, dim=1)


def _row_metrics(xs: Tensor, ref: Reference, classifier: DigitClassifier, real_features: np.ndarray) -> dict[str, Any]:
    q = quality(classifier, xs[-1], ref.labels, real_features)
    return {
        "final_psnr_db": psnr_db(ref.xs[-1], xs[-1]),
        "classifier_acc": q["classifier_acc"],
        "fd": q["fd"],
        "per_step_rel_l2": [float(rel_l2(ref.xs[k], xs[k]).mean()) for k in range(1, len(xs))],
    }


def _ort_int8_engine(qmodel: QuantizedModel, schedule: Schedule, workdir: Path, flavour: str = "ort-cpu") -> OrtEngine:
    path = export_onnx(qmodel.fp_module, schedule, workdir / "model.onnx", ExportConfig(flavour), qmodel)  # type: ignore[arg-type]
    engine_path = workdir / "engine.onnx"
    ort_session(path, "extended", optimized_path=str(engine_path))
    return OrtEngine(engine_path, schedule, "ort-int8")


def _modelopt_default(
    model: DiffusersVelocity, schedule: Schedule, guidance: float, seed: int, budget: int
) -> QuantizedModel:
    """modelopt's own recipe: INT8_DEFAULT_CFG, calibrated by running the whole sampler (its
    diffusers example does this on prompts) on as many trajectories as the input budget allows."""
    import modelopt.torch.quantization as mtq

    qmodule = copy.deepcopy(model)
    n_traj = max(1, budget // (schedule.n_steps * (2 if guidance != 1.0 else 1)))
    labels = torch.arange(n_traj) % (model.num_classes or 1)
    noise = noise_for_seeds(range(seed, seed + n_traj), model.sample_shape)

    def forward_loop(m: torch.nn.Module) -> None:
        sample(m, noise, labels, schedule, guidance, model.null_label)

    mtq.quantize(qmodule, copy.deepcopy(mtq.INT8_DEFAULT_CFG), forward_loop)
    return QuantizedModel(qmodule, model, layer_quants(qmodule), QuantConfig(temporal="int8"), [])


def ort_quantize_static(
    model: DiffusersVelocity,
    schedule: Schedule,
    full: CalibrationSet,
    seed: int,
    budget: int,
    workdir: Path,
    op_types: tuple[str, ...] | None = None,
) -> OrtEngine:
    """onnxruntime's quantize_static (MinMax, QDQ, U8S8, per channel) on `budget` inputs drawn at
    random steps of the captured FP trajectories; op_types limits what it quantizes (None: its default)."""
    from onnxruntime.quantization import (
        CalibrationDataReader,
        CalibrationMethod,
        QuantFormat,
        QuantType,
        quantize_static,
    )

    fp = export_onnx(model, schedule, workdir / "fp32.onnx")
    index = torch.randperm(len(full), generator=torch.Generator().manual_seed(seed))[:budget]
    picked = full.subset(index)

    class Reader(CalibrationDataReader):
        def __init__(self) -> None:
            self.rows = iter(range(0, len(picked), 32))

        def get_next(self) -> dict[str, np.ndarray] | None:
            start = next(self.rows, None)
            if start is None:
                return None
            feeds = {"x": picked.x[start : start + 32].numpy(), "step": picked.step[start : start + 32].numpy()}
            if picked.cond is not None:
                feeds["class_labels"] = picked.cond[start : start + 32].numpy()
            return feeds

    out = workdir / "ort_static.onnx"
    quantize_static(
        str(fp), str(out), Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
        activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8, calibrate_method=CalibrationMethod.MinMax,
        op_types_to_quantize=list(op_types) if op_types else None,
    )  # fmt: skip
    return OrtEngine(out, schedule, "ort-quantize-static")


def _summarise(rows: list[dict[str, Any]]) -> dict[str, Any]:
    psnr = [r["final_psnr_db"] for r in rows]
    ms = [r["engine_ms_b8"] for r in rows if r["engine_ms_b8"] is not None]
    return {
        "final_psnr_db": float(np.mean(psnr)),
        "final_psnr_db_std": float(np.std(psnr, ddof=1)) if len(psnr) > 1 else 0.0,
        "final_psnr_db_per_seed": [float(p) for p in psnr],  # in calibration_seeds order: rows pair by seed
        "classifier_acc": float(np.mean([r["classifier_acc"] for r in rows])),
        "fd": float(np.mean([r["fd"] for r in rows])),
        "per_step_rel_l2": [float(v) for v in np.mean([r["per_step_rel_l2"] for r in rows], axis=0)],
        "engine_ms_b8": float(np.median(ms)) if ms else None,
        "n_seeds": len(rows),
    }


def run_model(recipe: Recipe, config: AblationConfig, progress: bool = True) -> list[dict[str, Any]]:
    """All rows for one model (architecture)."""
    from tqdm import tqdm

    model = ensure_model(recipe, progress)
    classifier = ensure_classifier(recipe.classifier.path, progress)
    schedule, guidance, null = recipe.sampling.schedule(), recipe.sampling.guidance, model.null_label
    with torch.no_grad():
        real_features = torch.cat([classifier.embed(c) for c in load_digits("all").images.split(256)]).numpy()
        ref = fp_reference(model, schedule, guidance, config.compare_samples, config.batch_size)
    jobs = [(s, m, c) for s in config.settings for m in config.methods for c in (True, False)]
    jobs += [("w8a8", p, False) for p in config.peers if "w8a8" in config.settings]
    per_job: dict[tuple[str, str, bool], list[dict[str, Any]]] = {job: [] for job in jobs}
    bar = tqdm(
        total=len(jobs) * len(config.calibration_seeds), desc=f"ablate {model.architecture}", disable=not progress
    )
    for seed in config.calibration_seeds:
        capture_cfg = CalibrationConfig(n_samples=config.trajectories, seed_base=seed)
        full = capture(model, model.sample_shape, model.num_classes, schedule, capture_cfg, guidance, null)
        for setting, method, cache in jobs:
            with tempfile.TemporaryDirectory() as tmp, torch.no_grad():
                workdir = Path(tmp)
                engine: Engine
                if method == "modelopt-default":
                    engine = _ort_int8_engine(
                        _modelopt_default(model, schedule, guidance, seed, config.budget), schedule, workdir, "tensorrt"
                    )
                elif method == "ort-quantize-static":
                    engine = ort_quantize_static(model, schedule, full, seed, config.budget, workdir)
                else:
                    strategy, amax = METHODS[method]
                    calib = select(
                        full, replace(capture_cfg, strategy=strategy, budget=config.budget), schedule.n_steps
                    )
                    bits = 8 if setting == "w8a8" else config.hard_activation_bits
                    # Q/DQ on inputs and weights only, as modelopt's export and TensorRT place
                    # them, so every row compares calibration on the same placement.
                    qconfig = QuantConfig(
                        temporal="cache" if cache else "int8", amax=amax, activation_bits=bits, conv_output_quant=False
                    )
                    qmodel = quantize(model, qconfig, calib)
                    # 8-bit rows run in onnxruntime (tensorrt-flavour Q/DQ); no runtime executes
                    # 6-bit activations, so the hard setting runs the torch fake-quant model.
                    engine = (
                        _ort_int8_engine(qmodel, schedule, workdir, "tensorrt")
                        if bits == 8
                        else TorchEngine(qmodel.module, schedule, "fake-quant")
                    )
                xs = sample_engine(engine, ref, guidance, null, config.batch_size)
                row = _row_metrics(xs, ref, classifier, real_features)
                row["engine_ms_b8"] = (
                    median_step_ms(engine, 8, model.sample_shape, 20) if isinstance(engine, OrtEngine) else None
                )
                per_job[(setting, method, cache)].append(row)
            bar.update()
    bar.close()
    return [
        {
            "method": m,
            "architecture": model.architecture,
            "setting": s,
            "temporal_cache": c,
            "model": recipe.name,
            **_summarise(rows),
        }
        for (s, m, c), rows in per_job.items()
    ]


def run_ablation(config: AblationConfig, runs_root: str | Path = "runs", progress: bool = True) -> Path:
    rows: list[dict[str, Any]] = []
    for path in config.recipes:
        rows += run_model(load_recipe(path), config, progress)
    final = Path(runs_root) / config.name
    with run_lock(final), staged_run(final) as out:
        (out / "ablation.json").write_text(json.dumps(rows, indent=2) + "\n")
        plot_error(rows, out / "error_vs_step.png")
        (out / "ablation.md").write_text(ablation_markdown(rows, config))
    return final


def load_ablation_config(path: str | Path) -> AblationConfig:
    return from_dict(AblationConfig, load_yaml(path), str(path))


def best_rows(rows: list[dict[str, Any]]) -> dict[tuple[str, str], dict[str, Any]]:
    """Best flowpress row (highest mean final PSNR) per (architecture, setting)."""
    best: dict[tuple[str, str], dict[str, Any]] = {}
    for row in rows:
        if row["method"] in PEERS:
            continue
        key = (row["architecture"], row["setting"])
        if key not in best or row["final_psnr_db"] > best[key]["final_psnr_db"]:
            best[key] = row
    return best


def plot_error(rows: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    panels = sorted({(r["architecture"], r["setting"]) for r in rows})
    fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 4), squeeze=False)
    for ax, (arch, setting) in zip(axes[0], panels, strict=True):
        for row in (r for r in rows if r["architecture"] == arch and r["setting"] == setting):
            label = f"{row['method']}{' +cache' if row['temporal_cache'] else ''}"
            style = "--" if row["method"] in PEERS else "-"
            ax.plot(range(1, len(row["per_step_rel_l2"]) + 1), row["per_step_rel_l2"], style, label=label)
        ax.set_yscale("log")
        ax.set_title(f"{arch}, {setting}")
        ax.set_xlabel("sampler step")
        ax.set_ylabel("relative L2 of x_t vs FP")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=6)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def ablation_markdown(rows: list[dict[str, Any]], config: AblationConfig) -> str:
    lines = [
        "# Calibration ablation",
        "",
        f"Budget: {config.budget} network inputs per row, drawn from {config.trajectories} FP trajectories per "
        f"calibration seed; every row is the mean over {len(config.calibration_seeds)} calibration seeds "
        f"({', '.join(map(str, config.calibration_seeds))}); {config.compare_samples} compare samples with fixed seeds.",
        "",
        "Settings: `w8a8` = int8 weights per output channel and int8 activations per tensor, Q/DQ on the inputs "
        "and weights of every Conv/Linear (the placement modelopt exports and TensorRT runs; the peers use it too), "
        "executed by onnxruntime on the CPU; "
        f"`hard` = the same with {config.hard_activation_bits}-bit "
        "activations, measured on the torch fake-quant model (no runtime executes 6-bit activations). "
        "`temporal_cache` = the (t, class)-only modules gathered from FP tables; without it they are quantized. "
        "naive / uniform / ndtc choose which states to calibrate on and share the MSE scale search (as PTQ4DM "
        "and Q-Diffusion do); perstep-<reducer> uses every step and reduces each activation's per-step abs-max.",
        "Peers (w8a8 only): `modelopt-default` = INT8_DEFAULT_CFG calibrated by running the whole sampler, exported "
        "with Q/DQ on inputs and weights; `ort-quantize-static` = onnxruntime quantize_static, MinMax, QDQ U8S8, "
        "per channel, the same number of inputs drawn at random steps.",
        "",
        "| architecture | setting | method | temporal cache | final PSNR dB (± std) | classifier acc | FD | engine ms b8 |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for row in sorted(rows, key=lambda r: (r["architecture"], r["setting"], -r["final_psnr_db"])):
        ms = f"{row['engine_ms_b8']:.2f}" if row["engine_ms_b8"] is not None else "—"
        lines.append(
            f"| {row['architecture']} | {row['setting']} | {row['method']} | {'yes' if row['temporal_cache'] else 'no'} | "
            f"{row['final_psnr_db']:.2f} ± {row['final_psnr_db_std']:.2f} | {row['classifier_acc']:.3f} | {row['fd']:.2f} | {ms} |"
        )
    lines += ["", "![error vs step](error_vs_step.png)", ""]
    best = best_rows(rows)
    for (arch, setting), row in sorted(best.items()):
        lines.append(
            f"- best flowpress configuration, {arch} {setting}: {row['method']}, temporal cache {'on' if row['temporal_cache'] else 'off'} ({row['final_psnr_db']:.2f} dB)"
        )
    lines.append("")
    return "\n".join(lines)
