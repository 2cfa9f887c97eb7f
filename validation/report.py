"""report.json's schema (Report) and the files a compare writes: report.json, report.md,
samples.npz, samples.png, trajectory_error.png."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from flowpress.errors import FlowpressError
from flowpress.files import write_json, write_text
from flowpress.validation.compare import Comparison


@dataclass
class Report:
    """What a compare concluded; report.json is this, and `precisions`, the bench and the Python
    API read it back through Report.load.

    gate: {passed, thresholds, checks}; per_step: [{step, t, rel_l2, cosine}]; final: {psnr_db,
    ssim, rel_l2}; quality: {reference, engine} evaluator scores; latency_ms: {runtime: {b1, b8}}
    median ms per forward; size_bytes: {fp32_onnx, engine}; cpu_engines: every CPU engine judged
    on the same seeds [{engine, final_psnr_db, final_ssim, quality, ms_b1, ms_b8, size_bytes,
    gate_passed}]; recommendation: {engine, reason}; host: {isa, validated_on, revalidated};
    stages: {stage: {seconds, peak_rss_bytes}} of the run up to the report; peak_rss_bytes: the
    run's peak resident memory up to the report."""

    recipe: str
    precision: str
    flavour: str
    engine: str
    n_samples: int
    schedule: dict[str, Any]
    gate: dict[str, Any]
    per_step: list[dict[str, float]]
    final: dict[str, float]
    quality: dict[str, dict[str, float]]
    latency_ms: dict[str, dict[str, float]]
    latency_note: str
    size_bytes: dict[str, int]
    cpu_engines: list[dict[str, Any]]
    recommendation: dict[str, Any]
    host: dict[str, Any]
    weight_forms: dict[str, Any] | None = None
    fp_samples: dict[str, float] | None = None
    model: str | None = None
    peers: list[dict[str, Any]] | None = None
    end_to_end_ms_per_image: dict[str, float] | None = None
    mixed_precision: dict[str, Any] | None = None
    gpu_bench: dict[str, Any] | None = None
    stages: dict[str, dict[str, float]] | None = None
    peak_rss_bytes: int | None = None
    extra: dict[str, Any] = field(default_factory=dict)

    @property
    def passed(self) -> bool:
        return bool(self.gate["passed"])

    def as_dict(self) -> dict[str, Any]:
        data = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name != "extra"}
        data = {k: v for k, v in data.items() if v is not None}
        return {**data, **self.extra}

    @classmethod
    def from_dict(cls, data: dict[str, Any], where: str) -> Report:
        names = {f.name for f in dataclasses.fields(cls)} - {"extra"}
        required = {f.name for f in dataclasses.fields(cls) if f.default is dataclasses.MISSING and f.name != "extra"}
        missing = sorted(required - set(data))
        if missing:
            raise FlowpressError(
                f"{where}: report.json lacks {', '.join(missing)}; it is from an older flowpress: rerun `make compare`"
            )
        known = {k: v for k, v in data.items() if k in names}
        return cls(**known, extra={k: v for k, v in data.items() if k not in names})

    @classmethod
    def load(cls, path: str | Path) -> Report:
        path = Path(path)
        try:
            data = json.loads(path.read_text())
        except FileNotFoundError:
            raise FlowpressError(f"{path}: no report; run `make quantize` first") from None
        except (json.JSONDecodeError, UnicodeDecodeError) as err:
            raise FlowpressError(f"{path}: not valid JSON ({err}); rerun `make compare`") from None
        if not isinstance(data, dict):
            raise FlowpressError(f"{path}: not a report (a JSON object); rerun `make compare`")
        return cls.from_dict(data, str(path))


def write_report(run_dir: Path, comparison: Comparison, report: Report, samples: dict[str, Tensor], title: str) -> None:
    """report.json, report.md, samples.npz (FP and every judged engine's final samples),
    trajectory_error.png, samples.png (FP beside the engine the report recommends, else the main one)."""
    run_dir = Path(run_dir)
    write_json(run_dir / "report.json", report.as_dict())
    shown = report.recommendation.get("engine") or report.engine
    arrays = {
        "fp": comparison.fp.numpy().astype(np.float32),
        "engine": samples.get(shown, comparison.engine).numpy().astype(np.float32),
        "engine_name": np.array(shown),
        "seeds": comparison.seeds.numpy().astype(np.int64),
        **{f"cond_{name}": value.numpy() for name, value in comparison.cond.items() if value[0].numel() <= 16},
        **{f"samples_{name}": value.numpy().astype(np.float32) for name, value in samples.items()},
    }
    if "class_labels" in comparison.cond:
        arrays["labels"] = comparison.cond["class_labels"].numpy().astype(np.int64)
    if comparison.prompts is not None:
        arrays["prompts"] = np.array(comparison.prompts)
    np.savez_compressed(run_dir / "samples.npz", **arrays)  # type: ignore[arg-type]
    plot_trajectory_error(comparison.per_step, run_dir / "trajectory_error.png", title)
    plot_samples(
        comparison.fp,
        samples.get(shown, comparison.engine),
        comparison.cond.get("class_labels"),
        run_dir / "samples.png",
        shown,
    )
    write_text(run_dir / "report.md", report_markdown(report, title))


def plot_trajectory_error(per_step: list[dict[str, float]], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [row["step"] for row in per_step[1:]]
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot(steps, [row["rel_l2"] for row in per_step[1:]], marker="o")
    ax.set_xlabel("sampler step (state after the step)")
    ax.set_ylabel("relative L2 of x_t, engine vs FP")
    ax.set_yscale("log")
    ax.set_title(title)
    ax.grid(True, which="both", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _grid(images: Tensor, rows: int, cols: int) -> np.ndarray:
    pixels = ((images[: rows * cols].clamp(-1, 1) + 1) / 2).numpy()
    pixels = pixels[:, 0] if pixels.shape[1] == 1 else pixels[:, :3].transpose(0, 2, 3, 1)
    h, w = pixels.shape[1:3]
    canvas = np.ones((rows * (h + 1), cols * (w + 1), *pixels.shape[3:]))
    for i, image in enumerate(pixels):
        r, c = divmod(i, cols)
        canvas[r * (h + 1) : r * (h + 1) + h, c * (w + 1) : c * (w + 1) + w] = image
    return canvas


def plot_samples(fp: Tensor, engine: Tensor, labels: Tensor | None, path: Path, name: str) -> None:
    """FP (left) and engine (right) samples of the same seeds; one column per class."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = min(100, len(fp))
    cols = 10
    order = torch.arange(n)
    if labels is not None:  # columns = classes, rows = successive seeds of that class
        order = torch.argsort(labels[:n] * n + torch.arange(n), stable=True)
        order = order.reshape(-1, cols).T.reshape(-1) if n % cols == 0 else order
    rows = (n + cols - 1) // cols
    fig, axes = plt.subplots(1, 2, figsize=(10, 5.4))
    for ax, images, title in zip(axes, (fp, engine), ("FP (torch)", name), strict=True):
        ax.imshow(_grid(images[order], rows, cols), cmap="gray", vmin=0, vmax=1)
        ax.set_title(title)
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _quality_table(report: Report) -> list[str]:
    metrics = sorted(report.quality["reference"])
    if not metrics:
        return []
    lines = ["| | " + " | ".join(metrics) + " |", "|---|" + "---|" * len(metrics)]
    for label, key in (("FP torch", "reference"), ("engine", "engine")):
        lines.append(f"| {label} | " + " | ".join(f"{report.quality[key][m]:.3f}" for m in metrics) + " |")
    return ["", *lines]


def _gate_section(report: Report, title: str) -> list[str]:
    """The title, the verdict and one row per gate check: what a reader needs first."""
    gate = report.gate
    lines = [f"# {title}", "", f"**Gate: {'PASSED' if gate['passed'] else 'FAILED'}**", ""]
    lines += ["| check | value | threshold | passed |", "|---|---|---|---|"]
    lines += [
        f"| {c['name']} | {c['value']:.4g} | {c['op']} {c['threshold']:g} | {'yes' if c['passed'] else 'NO'} |"
        for c in gate["checks"]
    ]
    return lines


def _samples_section(report: Report) -> list[str]:
    """How many samples, their evaluator scores, the FP samples' sanity figures and the final sample vs FP."""
    final = report.final
    lines = [
        "",
        f"Samples: {report.n_samples} (same seeds and conditioning for FP and engine).",
        *_quality_table(report),
    ]
    if report.fp_samples:
        fp = report.fp_samples
        lines += [
            "",
            f"The FP model's own samples: mean {fp['mean']:.3f}, std {fp['std']:.3f}, {100 * fp['outside_range']:.1f}% of "
            "values outside [-1, 1] (many there, or a std far from the data's, say the sampler's convention is wrong).",
        ]
    lines += [
        "",
        f"Final sample vs FP: PSNR {final['psnr_db']:.2f} dB, SSIM {final['ssim']:.4f}, relative L2 {final['rel_l2']:.4f}."
        + (
            f" The PSNR is of the mean squared error; the median sample's is {final['psnr_db_median']:.2f} dB, and the "
            f"worst 1% of samples hold {100 * final['worst_1pct_error_share']:.0f}% of the error (a large share: a few "
            "trajectories tipped to another image, and the mean moves with how many)."
            if "psnr_db_median" in final
            else ""
        ),
    ]
    return lines


def _latency_section(report: Report) -> list[str]:
    """Median ms per model forward at batch 1 and 8, one row per runtime."""
    lines = ["", "## Latency (ms per model forward, median)", "", "| runtime | batch 1 | batch 8 |", "|---|---|---|"]
    lines += [f"| {name} | {row['b1']:.2f} | {row['b8']:.2f} |" for name, row in report.latency_ms.items()]
    return lines


def _cpu_engines_section(report: Report) -> list[str]:
    """Every CPU engine judged on the same seeds and gate, then the recommended one; empty when none was judged."""
    if not report.cpu_engines:
        return []
    metrics = sorted(report.cpu_engines[0]["quality"])
    lines = [
        "",
        "## CPU engines for this model (same seeds, same gate)",
        "",
        "| engine | final PSNR dB | SSIM | "
        + " | ".join(metrics)
        + (" | " if metrics else "")
        + "ms b1 | ms b8 | size bytes | gate |",
        "|---|---|---|" + "---|" * len(metrics) + "---|---|---|---|",
    ]
    for e in report.cpu_engines:
        scores = "".join(f"{e['quality'][m]:.3f} | " for m in metrics)
        lines.append(
            f"| {e['engine']} | {e['final_psnr_db']:.2f} | {e['final_ssim']:.4f} | {scores}{e['ms_b1']:.2f} | "
            f"{e['ms_b8']:.2f} | {e['size_bytes']:,} | {'pass' if e['gate_passed'] else 'FAIL'} |"
        )
    rec = report.recommendation
    return [*lines, "", f"**Recommendation: {rec['engine'] or 'none'}** — {rec['reason']}."]


def _peers_section(report: Report) -> list[str]:
    """Other quantizers on the same seeds and flowpress's PSNR margin over each; empty without peers."""
    if not report.peers:
        return []
    lines = [
        "",
        "## Peers on the same seeds",
        "",
        "| peer | final PSNR dB | SSIM | gate | flowpress margin dB |",
        "|---|---|---|---|---|",
    ]
    for p in report.peers:
        lines.append(
            f"| {p['peer']} | {p['final_psnr_db']:.2f} | {p['final_ssim']:.4f} | {'pass' if p['gate_passed'] else 'FAIL'} | "
            f"{p['margin_db']:+.2f} |"
        )
    return lines


def _end_to_end_section(report: Report) -> list[str]:
    """Whole-pipeline ms per image per runtime; empty when not measured."""
    if not report.end_to_end_ms_per_image:
        return []
    e2e = report.end_to_end_ms_per_image
    return ["", "End to end (conditioning, denoising loop, decode), ms per image: "
            + ", ".join(f"{k} {v:.1f}" for k, v in e2e.items()) + "."]  # fmt: skip


def _weight_forms_section(report: Report) -> list[str]:
    """The int8 weight forms tried, the shipped one marked; empty when none were compared."""
    if not report.weight_forms:
        return []
    forms = report.weight_forms
    lines = ["", "## int8 weight forms", "", "| weights | final PSNR dB | exact on | measured |", "|---|---|---|---|"]
    for bits, form in forms["forms"].items():
        shipped = " (shipped)" if bits == forms["shipped"] else ""
        lines.append(f"| {bits}{shipped} | {form['final_psnr_db']:.2f} | {form['exact_on']} | {form['measured']} |")
    return lines


def _host_and_size_section(report: Report) -> list[str]:
    """The host's ISA against the one the engines were validated on, then the size of each file."""
    host = report.host
    lines = ["", f"Host: {host['isa']['isa_class']}; engines validated on {host['validated_on']['isa_class']}."]
    lines += ["", "## Size", "", "| file | bytes |", "|---|---|"]
    lines += [f"| {k} | {v:,} |" for k, v in report.size_bytes.items()]
    return lines


def _stages_section(report: Report) -> list[str]:
    """Seconds and peak resident memory per stage, then the run's peak; empty when not recorded."""
    if not report.stages:
        return []
    lines = ["", "## Time and memory per stage", "", "| stage | seconds | peak resident GB |", "|---|---|---|"]
    lines += [f"| {k} | {v['seconds']:.1f} | {v['peak_rss_bytes'] / 1e9:.2f} |" for k, v in report.stages.items()]
    if report.peak_rss_bytes:
        lines += ["", f"Peak resident memory of the run: {report.peak_rss_bytes / 1e9:.2f} GB."]
    return lines


def _mixed_precision_section(report: Report) -> list[str]:
    """The gated mixed-precision search (report_mixed.py, imported only when there is one); else empty."""
    if not report.mixed_precision:
        return []
    from flowpress.validation.report_mixed import mixed_precision_markdown

    return mixed_precision_markdown(report.mixed_precision)


def _trajectory_section(report: Report) -> list[str]:
    """The error plot and one row per sampler step: where along the trajectory the engine drifts from FP."""
    lines = [
        "",
        "## Error along the trajectory",
        "",
        "![trajectory error](trajectory_error.png)",
        "",
        "| step | t | rel L2 | cosine |",
        "|---|---|---|---|",
    ]
    lines += [f"| {r['step']} | {r['t']:.3f} | {r['rel_l2']:.5f} | {r['cosine']:.6f} |" for r in report.per_step]
    return lines


def report_markdown(report: Report, title: str) -> str:
    """report.md: the sections in reading order, verdict first; optional sections are empty when absent."""
    lines = [
        *_gate_section(report, title),
        *_samples_section(report),
        *_latency_section(report),
        *_cpu_engines_section(report),
        *_peers_section(report),
        *_end_to_end_section(report),
        *_weight_forms_section(report),
        *_host_and_size_section(report),
        *_stages_section(report),
        *_mixed_precision_section(report),
        *_trajectory_section(report),
        *["", "## Samples (FP left, engine right, same seeds)", "", "![samples](samples.png)", ""],
    ]
    return "\n".join(lines)
