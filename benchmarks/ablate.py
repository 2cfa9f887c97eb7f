"""`python -m benchmarks ablate`: every calibration strategy x temporal cache x setting, beside the peers.

One model, one input budget, the same sampler and seeds for every row; each row is the mean
over several calibration seeds, measured against the same FP trajectories.  Quality is the
recipe's evaluator's (its metrics become columns); flowpress's int8 engines are built by the
one engine builder (flowpress.engines.build) in this host's int8 weight form; the peers
(benchmarks.peers) are built as their users build them.
"""

from __future__ import annotations

import json
import tempfile
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from benchmarks.common import Reference, fp_reference, sample_engine
from benchmarks.peers import (
    EXAMPLE_PEERS,
    modelopt_default,
    modelopt_engine,
    modelopt_example,
    ort_static_engine,
)
from flowpress.calibration import CalibrationConfig, CalibrationSet, capture, select
from flowpress.calibration.capture import Strategy
from flowpress.compress import (
    Int8Config,
    QuantConfig,
    QuantizedModel,
    quantize,
    set_weight_bits,
)
from flowpress.compress.config import Amax
from flowpress.context import RunContext
from flowpress.engines import Engine, OrtEngine, TorchEngine
from flowpress.engines.build import build_ort
from flowpress.engines.isa import HostIsa
from flowpress.engines.portability import int8_weight_form
from flowpress.errors import FlowpressError
from flowpress.export.graphfile import graph_bytes
from flowpress.recipe import Recipe, load_recipe
from flowpress.results import write_result
from flowpress.rundir import run_lock, staged_run
from flowpress.sampling import Sampler
from flowpress.schema import from_dict, load, to_dict
from flowpress.validation import Evaluator, median_step_ms, psnr_db, rel_l2
from flowpress.validation.compare import Decode

__all__ = [
    "METHODS",
    "PEERS",
    "AblationConfig",
    "Reference",
    "ablation_markdown",
    "best_rows",
    "fp_reference",
    "load_ablation_config",
    "run_ablation",
    "run_model",
    "sample_engine",
]

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
W8A8_PEERS = ("modelopt-default", "ort-quantize-static")
PEERS = (*W8A8_PEERS, *EXAMPLE_PEERS)
# quantize_static's op types: the layers every other row quantizes (its default also takes the
# step model's bounds check, whose NaN branch its calibrator cannot range)
STATIC_OP_TYPES = ("Conv", "MatMul", "Gemm")
# what a row holds besides the evaluator's metrics
ROW_FIELDS = (
    "method", "architecture", "setting", "temporal_cache", "model", "weight_bits", "final_psnr_db",
    "final_psnr_db_std", "final_psnr_db_per_seed", "per_step_rel_l2", "engine_ms_b8", "engine_bytes", "n_seeds",
)  # fmt: skip


@dataclass(frozen=True)
class AblationConfig:
    """recipes: quantize recipes, one per architecture (model, sampler, guidance, evaluator,
    engine.portable); budget: calibration inputs per row; trajectories: FP trajectories
    captured per calibration seed to draw them from; variants: int8 / fp8 / W4A8 / W4A4 rows (setting
    the recipe's precision), each a name and the keys it changes in its recipe's `quantize:`
    section, e.g. {nearest: {recon_iters: 0}}; fp8 / W4A8 / W4A4 rows are measured on the torch
    fake-quant model, a W4A4 row also builds its onnxruntime engine (parity-checked) and records
    its bytes; an int8 row is measured on its onnxruntime engine (the recipe's ort-cpu form)."""

    name: str = "ablation"
    recipes: tuple[str, ...] = ()
    methods: tuple[str, ...] = ("naive", "uniform", "ndtc", "perstep-max", "perstep-mean")
    settings: tuple[str, ...] = ("w8a8", "hard")
    hard_activation_bits: int = 6
    calibration_seeds: tuple[int, ...] = (100_000, 200_000, 300_000)
    budget: int = 256
    trajectories: int = 128
    compare_samples: int = 100
    batch_size: int = 100
    peers: tuple[str, ...] = W8A8_PEERS
    variants: dict[str, dict[str, Any]] = field(default_factory=dict)

    def __post_init__(self) -> None:
        unknown = sorted(set(self.methods) - set(METHODS)) + sorted(set(self.peers) - set(PEERS))
        if unknown:
            raise FlowpressError(f"ablation: unknown method {unknown[0]!r}; known: {', '.join([*METHODS, *PEERS])}")
        if set(self.settings) - {"w8a8", "hard"}:
            raise FlowpressError(f"ablation.settings must be among w8a8, hard; got {list(self.settings)}")
        if not self.recipes or not self.calibration_seeds:
            raise FlowpressError("ablation: list at least one quantize recipe (recipes) and one calibration seed")


def _row_metrics(xs: Tensor, ref: Reference, evaluator: Evaluator | None, decode: Decode | None) -> dict[str, Any]:
    """Final PSNR and the evaluator's scores on images (a latent model's decoded by its VAE, as
    `make quantize` judges them); the error at each step on the sampler's own state."""
    final_ref, final = (ref.xs[-1], xs[-1]) if decode is None else (decode(ref.xs[-1]), decode(xs[-1]))
    return {
        "final_psnr_db": psnr_db(final_ref, final),
        **(evaluator.score(final, ref.described()) if evaluator is not None else {}),
        "per_step_rel_l2": [float(rel_l2(ref.xs[k], xs[k]).mean()) for k in range(1, len(xs))],
    }


def _summarise(rows: list[dict[str, Any]], metrics: list[str]) -> dict[str, Any]:
    psnr = [r["final_psnr_db"] for r in rows]
    ms = [r["engine_ms_b8"] for r in rows if r["engine_ms_b8"] is not None]
    sizes = [r["engine_bytes"] for r in rows if r.get("engine_bytes") is not None]
    return {
        "weight_bits": rows[0]["weight_bits"],
        "final_psnr_db": float(np.mean(psnr)),
        "final_psnr_db_std": float(np.std(psnr, ddof=1)) if len(psnr) > 1 else 0.0,
        "final_psnr_db_per_seed": [float(p) for p in psnr],  # in calibration_seeds order: rows pair by seed
        **{m: float(np.mean([r[m] for r in rows])) for m in metrics},
        "per_step_rel_l2": [float(v) for v in np.mean([r["per_step_rel_l2"] for r in rows], axis=0)],
        "engine_ms_b8": float(np.median(ms)) if ms else None,
        "engine_bytes": int(np.median(sizes)) if sizes else None,
        "n_seeds": len(rows),
    }


def _variant_config(recipe: Recipe, name: str, overrides: dict[str, Any]) -> QuantConfig:
    """The recipe's quantize section with a variant's keys changed (checked like a recipe)."""
    kind = type(recipe.quantize)
    config: QuantConfig = from_dict(kind, {**to_dict(recipe.quantize), **overrides}, f"ablation.variants.{name}")
    return config


def _flowpress_engine(
    qmodel: QuantizedModel, calib: CalibrationSet, sampler: Sampler, workdir: Path, host: HostIsa, name: str
) -> OrtEngine:
    """export + parity + onnxruntime engine (tensorrt-flavour Q/DQ: inputs and weights only)."""
    graph, engine = workdir / "model.onnx", workdir / "model.opt.onnx"
    build_ort(qmodel, calib, graph, engine, "tensorrt", 19, host, f"ablation {name}")
    return OrtEngine(engine, sampler, name)


def run_model(recipe: Recipe, config: AblationConfig, progress: bool = True) -> list[dict[str, Any]]:
    """All rows for one model (architecture)."""
    from tqdm import tqdm

    ctx = RunContext.load(recipe)  # the model as `make quantize` loads it: its own scheduler, conditioning, VAE
    model, sampler, fp, evaluator, host, null = ctx.model, ctx.sampler, ctx.fp, ctx.evaluator, ctx.host, ctx.null
    metrics = list(evaluator.metrics) if evaluator is not None else []
    guidance = recipe.sampling.guidance
    weight_form = int8_weight_form(recipe.engine.portable, recipe.engine.portable_weights, host)
    ref = fp_reference(
        model,
        sampler,
        guidance,
        config.compare_samples,
        config.batch_size,
        ctx.conditions(config.compare_samples),
        null,
    )
    jobs = [(s, m, c) for s in config.settings for m in config.methods for c in (True, False)]
    jobs += [("w8a8", p, False) for p in config.peers if p in W8A8_PEERS and "w8a8" in config.settings]
    jobs += [(EXAMPLE_PEERS[p][1], p, False) for p in config.peers if p in EXAMPLE_PEERS]
    variants = {v: _variant_config(recipe, v, o) for v, o in config.variants.items()}
    jobs += [(c.precision, v, c.temporal == "cache") for v, c in variants.items()]
    per_job: dict[tuple[str, str, bool], list[dict[str, Any]]] = {job: [] for job in jobs}
    bar = tqdm(
        total=len(jobs) * len(config.calibration_seeds), desc=f"ablate {model.architecture}", disable=not progress
    )
    for seed in config.calibration_seeds:
        capture_cfg = CalibrationConfig(n_samples=config.trajectories, seed_base=seed)
        cond = ctx.calibration_cond(config.trajectories)
        full = capture(fp, sampler, model.sample_shape, cond, capture_cfg, guidance, null)
        for setting, method, cache in jobs:
            with tempfile.TemporaryDirectory(prefix="flowpress-ablate-") as tmp, torch.no_grad():
                workdir = Path(tmp)
                engine: Engine
                timed: Engine | None = None  # where the engine timed is not the one measured
                bits: int | None = 8  # the peers' weights: 8-bit, as their users get them
                size = None
                if method == "modelopt-default":
                    qmodel = modelopt_default(model, sampler, guidance, seed, config.budget, ctx.calibration_cond, null)
                    engine = modelopt_engine(qmodel, sampler, workdir)
                    if host.int8_saturates:  # its 8-bit weights saturate this host's int8 kernels: its
                        # fidelity is its fake-quant model's, its speed its onnxruntime engine's
                        timed, engine = engine, TorchEngine(qmodel.module, sampler, "fake-quant")
                elif method in EXAMPLE_PEERS:  # fake-quant, as modelopt's example leaves them
                    fake = modelopt_example(
                        model, sampler, guidance, seed, config.budget, method, ctx.calibration_cond, null
                    )
                    engine = TorchEngine(fake, sampler, "fake-quant")
                    bits = 8 if setting == "w8a8" else 4
                elif method == "ort-quantize-static":
                    engine = ort_static_engine(model, sampler, full, seed, config.budget, workdir, STATIC_OP_TYPES)
                elif setting == "int8":  # the recipe's own engine (ort-cpu flavour, this host's weight bits)
                    calib = select(full, replace(capture_cfg, strategy="all", budget=config.budget), sampler.n_steps)
                    qmodel = quantize(model, variants[method], calib, sampler)
                    set_weight_bits(qmodel, *weight_form)
                    bits = weight_form[0]  # U8U8 holds the same 8-bit values
                    built = workdir / "model.opt.onnx"
                    build_ort(qmodel, calib, workdir / "model.onnx", built, "ort-cpu", 19, host, method)
                    engine, size = OrtEngine(built, sampler, method), graph_bytes(built)
                elif setting in ("fp8", "w4a8", "w4a4"):  # on the torch model (the engine passes parity with it)
                    calib = select(full, replace(capture_cfg, strategy="all", budget=config.budget), sampler.n_steps)
                    qmodel = quantize(model, variants[method], calib, sampler)
                    engine = TorchEngine(qmodel.module, sampler, "fake-quant")
                    bits = 8 if setting == "fp8" else 4
                    if setting == "w4a4":  # its size: the parity-checked onnxruntime engine file
                        built = workdir / "model.opt.onnx"
                        build_ort(qmodel, calib, workdir / "model.onnx", built, "ort-cpu", 21, host, method)
                        size = graph_bytes(built)
                else:
                    strategy, amax = METHODS[method]
                    calib = select(full, replace(capture_cfg, strategy=strategy, budget=config.budget), sampler.n_steps)
                    activation_bits = 8 if setting == "w8a8" else config.hard_activation_bits
                    # Q/DQ on inputs and weights only, as modelopt's export and TensorRT place
                    # them, so every row compares calibration on the same placement.
                    qconfig = Int8Config(
                        temporal="cache" if cache else "int8",
                        amax=amax,
                        activation_bits=activation_bits,
                        conv_output_quant=False,
                    )
                    qmodel = quantize(model, qconfig, calib, sampler)
                    set_weight_bits(qmodel, *weight_form)
                    bits = weight_form[0]  # U8U8 holds the same 8-bit values
                    # 8-bit rows run in onnxruntime; no runtime executes 6-bit activations, so
                    # the hard setting runs the torch fake-quant model.
                    engine = (
                        _flowpress_engine(qmodel, calib, sampler, workdir, host, f"{method}-int8")
                        if activation_bits == 8
                        else TorchEngine(qmodel.module, sampler, "fake-quant")
                    )
                xs = sample_engine(engine, ref, guidance, null, config.batch_size)
                row = _row_metrics(xs, ref, evaluator, ctx.source.decode)
                row["weight_bits"] = bits
                row["engine_bytes"] = size
                timed = timed or engine
                row["engine_ms_b8"] = (
                    median_step_ms(timed, 8, model.sample_shape, model.example_condition, 20)
                    if isinstance(timed, OrtEngine)
                    else None
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
            **_summarise(rows, metrics),
        }
        for (s, m, c), rows in per_job.items()
    ]


def run_ablation(
    config: AblationConfig,
    runs_root: str | Path = "runs",
    progress: bool = True,
    results_dir: str | Path | None = None,
) -> Path:
    """runs/<name>/{ablation.json, ablation.md, error_vs_step.png}; with results_dir, also
    results_dir/ablation.md (the table under a machine / commit / date header)."""
    rows: list[dict[str, Any]] = []
    for path in config.recipes:
        rows += run_model(load_recipe(path), config, progress)
    final = Path(runs_root) / config.name
    markdown = ablation_markdown(rows, config)
    with run_lock(final), staged_run(final) as out:
        (out / "ablation.json").write_text(json.dumps(rows, indent=2) + "\n")
        plot_error(rows, out / "error_vs_step.png")
        (out / "ablation.md").write_text(markdown)
    if results_dir is not None:
        body = markdown.split("\n", 1)[1]  # the header replaces the title
        picture = "![error vs step](error_vs_step.png)"
        body = body.replace(picture, f"Error vs step: {final}/error_vs_step.png (not committed).")
        write_result(results_dir, config.name, "make ablate", "python -m benchmarks ablate", body)
    return final


def load_ablation_config(path: str | Path) -> AblationConfig:
    config: AblationConfig = load(AblationConfig, path)
    return config


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


def quality_metrics(rows: list[dict[str, Any]]) -> list[str]:
    """The evaluator metrics the rows carry, in their order (the union: each recipe's evaluator
    may measure others)."""
    return list(dict.fromkeys(k for row in rows for k in row if k not in ROW_FIELDS))


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
    metrics = quality_metrics(rows)
    lines = [
        "# Calibration ablation",
        "",
        f"Budget: {config.budget} network inputs per row, drawn from {config.trajectories} FP trajectories per "
        f"calibration seed; every row is the mean over {len(config.calibration_seeds)} calibration seeds "
        f"({', '.join(map(str, config.calibration_seeds))}); {config.compare_samples} compare samples with fixed seeds.",
        "",
        *(
            [
                "Settings: `w8a8` = int8 weights per output channel and int8 activations per tensor, Q/DQ on the "
                "inputs and weights of every Conv/Linear (the placement modelopt exports and TensorRT runs; the peers "
                "use it too), executed by onnxruntime on the CPU, flowpress's engines built and parity-checked by its "
                "one engine builder in this host's int8 weight form (`weight bits`: 7 where this host's int8 kernels "
                f"saturate 8-bit weights); `hard` = the same with {config.hard_activation_bits}-bit activations, "
                "measured on the torch fake-quant model (no runtime executes 6-bit activations). `temporal_cache` = "
                "the (t, class)-only modules gathered from FP tables; without it they are quantized. naive / uniform "
                "/ ndtc choose which states to calibrate on and share the MSE scale search (as PTQ4DM and Q-Diffusion "
                "do); perstep-<reducer> uses every step and reduces each activation's per-step abs-max."
            ]
            if config.settings and config.methods
            else []
        ),
        *(
            [
                "Peers (w8a8 only), built as their users build them (8-bit weights, no parity check): "
                "`modelopt-default` = INT8_DEFAULT_CFG calibrated by running the whole sampler, exported with Q/DQ on "
                "inputs and weights (where this host's int8 kernels saturate 8-bit weights, x86 without VNNI, its "
                "PSNR is its torch fake-quant model's, since its onnxruntime engine there is wrong rather than "
                "miscalibrated, and its ms its onnxruntime engine's); `ort-quantize-static` = onnxruntime "
                "quantize_static, MinMax, QDQ U8S8, per channel, on Conv / MatMul / Gemm, the same number of inputs "
                "drawn at random steps."
            ]
            if set(config.peers) & set(W8A8_PEERS) and "w8a8" in config.settings
            else []
        ),
        *(
            [
                "Peers as modelopt's diffusers example runs its configs: calibrated as `modelopt-default` is (whole-sampler "
                "trajectories from the calibration seed, as many as the budget allows), with the layers its "
                "diffusers example skips (filter_func_default: conv_in / conv_out, time and class embeddings, "
                "pos_embed, norm_out ...) left in full precision, measured on the torch fake-quant model: "
                + "; ".join(
                    f"`{p}` = {EXAMPLE_PEERS[p][0]} (setting {EXAMPLE_PEERS[p][1]})"
                    for p in config.peers
                    if p in EXAMPLE_PEERS
                )
                + ". NVFP4 needs CUDA in modelopt 0.47 (a GPU host's row)."
            ]
            if set(config.peers) & set(EXAMPLE_PEERS)
            else []
        ),
        *(
            [
                "Variant rows (setting = the recipe's precision): its quantize section with the named keys changed ("
                + "; ".join(f"`{name}`: {json.dumps(keys)}" for name, keys in config.variants.items())
                + f"), calibrated on {config.budget} inputs spread over every step; `fp8` / `w4a8` / `w4a4` rows measured "
                "on the torch fake-quant model (`make quantize` checks the exported graph against that model), a "
                "`w4a4` row's engine MB is its parity-checked onnxruntime engine file (median over seeds); `int8` "
                "rows measured on their parity-checked onnxruntime engine (the recipe's ort-cpu form, this host's "
                "weight bits), engine ms at batch 8 median over seeds.",
            ]
            if config.variants
            else []
        ),
        "",
        "| architecture | setting | method | temporal cache | weight bits | final PSNR dB (± std) | "
        + "".join(f"{m} | " for m in metrics)
        + "engine ms b8 | engine MB |",
        "|---|---|---|---|---|---|" + "---|" * len(metrics) + "---|---|",
    ]
    for row in sorted(rows, key=lambda r: (r["architecture"], r["setting"], -r["final_psnr_db"])):
        ms = f"{row['engine_ms_b8']:.2f}" if row["engine_ms_b8"] is not None else "—"
        size = f"{row['engine_bytes'] / 1e6:.3f}" if row.get("engine_bytes") is not None else "—"
        scores = "".join(f"{row[m]:.3f} | " if m in row else "— | " for m in metrics)
        lines.append(
            f"| {row['architecture']} | {row['setting']} | {row['method']} | {'yes' if row['temporal_cache'] else 'no'} | "
            f"{row['weight_bits']} | {row['final_psnr_db']:.2f} ± {row['final_psnr_db_std']:.2f} | {scores}{ms} | {size} |"
        )
    lines += ["", "![error vs step](error_vs_step.png)", ""]
    for (arch, setting), row in sorted(best_rows(rows).items()):
        lines.append(
            f"- best flowpress configuration, {arch} {setting}: {row['method']}, temporal cache "
            f"{'on' if row['temporal_cache'] else 'off'} ({row['final_psnr_db']:.2f} dB)"
        )
    lines.append("")
    return "\n".join(lines)
