"""Write report.json / report.md / trajectory_error.png / samples.png / samples.npz."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from engines.compare import Comparison


def report_dict(
    comparison: Comparison,
    latency_ms: dict[str, dict[str, float]],
    size_bytes: dict[str, int],
    extra: dict[str, Any],
) -> dict[str, Any]:
    return {
        "gate": comparison.gate,
        "per_step": comparison.per_step,
        "final": comparison.final,
        "quality": comparison.quality,
        "latency_ms": latency_ms,
        "size_bytes": size_bytes,
        "n_samples": len(comparison.seeds),
        **extra,
    }


def write_report(run_dir: Path, comparison: Comparison, report: dict[str, Any], title: str) -> None:
    run_dir = Path(run_dir)
    (run_dir / "report.json").write_text(json.dumps(report, indent=2) + "\n")
    np.savez_compressed(
        run_dir / "samples.npz",
        fp=comparison.fp.numpy().astype(np.float32),
        engine=comparison.engine.numpy().astype(np.float32),
        labels=(comparison.labels if comparison.labels is not None else torch.zeros(0)).numpy().astype(np.int64),
        seeds=comparison.seeds.numpy().astype(np.int64),
    )
    plot_trajectory_error(comparison.per_step, run_dir / "trajectory_error.png", title)
    plot_samples(comparison, run_dir / "samples.png")
    (run_dir / "report.md").write_text(report_markdown(report, title))


def plot_trajectory_error(per_step: list[dict[str, float]], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [row["step"] for row in per_step[1:]]
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot(steps, [row["rel_l2"] for row in per_step[1:]], marker="o")
    ax.set_xlabel("sampler step (state after the step; t goes 1 -> 0)")
    ax.set_ylabel("relative L2 of x_t, engine vs FP")
    ax.set_yscale("log")
    ax.set_title(title)
    ax.grid(True, which="both", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _grid(images: Tensor, rows: int, cols: int) -> np.ndarray:
    pixels = ((images[: rows * cols].clamp(-1, 1) + 1) / 2).numpy()[:, 0]
    h, w = pixels.shape[1:]
    canvas = np.ones((rows * (h + 1), cols * (w + 1)))
    for i, image in enumerate(pixels):
        r, c = divmod(i, cols)
        canvas[r * (h + 1) : r * (h + 1) + h, c * (w + 1) : c * (w + 1) + w] = image
    return canvas


def plot_samples(comparison: Comparison, path: Path) -> None:
    """FP (left) and engine (right) samples of the same seeds; one column per class."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    n = min(100, len(comparison.seeds))
    cols = 10
    order = torch.arange(n)
    if comparison.labels is not None:  # columns = classes, rows = successive seeds of that class
        order = torch.argsort(comparison.labels[:n] * n + torch.arange(n), stable=True)
        order = order.reshape(-1, cols).T.reshape(-1) if n % cols == 0 else order
    rows = (n + cols - 1) // cols
    fig, axes = plt.subplots(1, 2, figsize=(10, 5.4))
    for ax, images, name in zip(axes, (comparison.fp, comparison.engine), ("FP (torch)", "engine"), strict=True):
        ax.imshow(_grid(images[order], rows, cols), cmap="gray", vmin=0, vmax=1)
        ax.set_title(name)
        ax.axis("off")
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def report_markdown(report: dict[str, Any], title: str) -> str:
    gate = report["gate"]
    lines = [f"# {title}", "", f"**Gate: {'PASSED' if gate['passed'] else 'FAILED'}**", ""]
    lines += ["| check | value | threshold | passed |", "|---|---|---|---|"]
    lines += [
        f"| {c['name']} | {c['value']:.4g} | {c['op']} {c['threshold']:g} | {'yes' if c['passed'] else 'NO'} |"
        for c in gate["checks"]
    ]
    q = report["quality"]
    lines += [
        "",
        f"Samples: {report['n_samples']} (same seeds and labels for FP and engine).",
        "",
        "| | classifier accuracy | Frechet distance to real digits |",
        "|---|---|---|",
        f"| FP torch | {q['reference']['classifier_acc']:.3f} | {q['reference']['fd']:.3f} |",
        f"| engine | {q['engine']['classifier_acc']:.3f} | {q['engine']['fd']:.3f} |",
        "",
        f"Final sample vs FP: PSNR {report['final']['psnr_db']:.2f} dB, relative L2 {report['final']['rel_l2']:.4f}.",
        "",
        "## Latency (ms per model forward, median)",
        "",
        "| runtime | batch 1 | batch 8 |",
        "|---|---|---|",
    ]
    for name, row in report["latency_ms"].items():
        lines.append(f"| {name} | {row['b1']:.2f} | {row['b8']:.2f} |")
    if report.get("cpu_engines"):
        rec = report["recommendation"]
        lines += [
            "",
            "## CPU engines for this model (same seeds, same gate)",
            "",
            "| engine | final PSNR dB | classifier acc | FD | ms b1 | ms b8 | size bytes | gate |",
            "|---|---|---|---|---|---|---|---|",
        ]
        for e in report["cpu_engines"]:
            lines.append(
                f"| {e['engine']} | {e['final_psnr_db']:.2f} | {e['classifier_acc']:.3f} | {e['fd']:.2f} | "
                f"{e['ms_b1']:.2f} | {e['ms_b8']:.2f} | {e['size_bytes']:,} | {'pass' if e['gate_passed'] else 'FAIL'} |"
            )
        lines += ["", f"**Recommendation: {rec['engine'] or 'none'}** — {rec['reason']}."]
    lines += ["", "## Size", "", "| file | bytes |", "|---|---|"]
    lines += [f"| {k} | {v:,} |" for k, v in report["size_bytes"].items()]
    if "mixed_precision" in report:
        lines += mixed_precision_markdown(report["mixed_precision"])
    lines += [
        "",
        "## Error along the trajectory",
        "",
        "![trajectory error](trajectory_error.png)",
        "",
        "| step | t | rel L2 | cosine |",
        "|---|---|---|---|",
    ]
    lines += [f"| {r['step']} | {r['t']:.3f} | {r['rel_l2']:.5f} | {r['cosine']:.6f} |" for r in report["per_step"]]
    lines += ["", "## Samples (FP left, engine right, same seeds)", "", "![samples](samples.png)", ""]
    return "\n".join(lines)


def mixed_precision_markdown(mixed: dict[str, Any]) -> list[str]:
    """The gated search: layers kept in full precision, what each cost, every assignment checked."""
    layers = mixed["fallback_layers"]
    lines = [
        "",
        "## Mixed precision (gated search)",
        "",
        f"**{'PASSED' if mixed['passed'] else 'FAILED'}** with {len(layers)} layer(s) kept in full precision"
        + (": " + ", ".join(f"`{name}`" for name in layers) if layers else "."),
        "",
    ]
    if mixed["fallback_cost"]:
        lines += [
            "Cost of each fallback, measured on the engine before and after it (latency: median ms per forward):",
            "",
            "| layer | sensitivity gain (dB) | engine bytes | latency b1 (ms) | latency b8 (ms) |",
            "|---|---|---|---|---|",
        ]
        lines += [
            f"| `{c['layer']}` | {c['sensitivity_gain_db']:+.2f} | {c['size_bytes']:+,} | "
            f"{c['latency_ms']['b1']:+.2f} | {c['latency_ms']['b8']:+.2f} |"
            for c in mixed["fallback_cost"]
        ]
        lines.append("")
    lines += [
        "Assignments checked on the onnxruntime engine (first seeds of the compare), then confirmed by the full compare:",
        "",
        "| layers in FP | check samples | final PSNR (dB) | accuracy drop | engine bytes | check | full compare |",
        "|---|---|---|---|---|---|---|",
    ]
    for c in mixed["candidates"]:
        confirmed = {None: "-", True: "passed", False: "failed"}[c["confirmed"]]
        lines.append(
            f"| {len(c['fallback_layers'])} | {c['n_samples']} | {c['final_psnr_db']:.2f} | "
            f"{c['classifier_acc_drop']:.3f} | {c['engine_bytes']:,} | {'pass' if c['check_passed'] else 'fail'} | "
            f"{confirmed} |"
        )
    sens = mixed["sensitivity"]
    lines += [
        "",
        f"Sensitivity ({sens['method']}, {sens['n_samples']} seeded samples; all layers quantized: "
        f"{sens['all_quantized_psnr_db']:.2f} dB), most sensitive first:",
        "",
        "| layer | final PSNR with only it in FP (dB) | gain (dB) |",
        "|---|---|---|",
    ]
    lines += [f"| `{s['name']}` | {s['final_psnr_db']:.2f} | {s['gain_db']:+.2f} |" for s in sens["layers"][:10]]
    return lines
