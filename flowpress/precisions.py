"""The precision x calibration table: one row per finished quantize run (int8, fp8, W4A8,
gated mixed), read from the runs' report.json and manifest.json, into runs/precisions/."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from flowpress.rundir import run_lock, staged_run
from sampling import FlowpressError

RECIPES = (
    "digits-unet-int8",
    "digits-unet-fp8",
    "digits-unet-w4a8",
    "digits-unet-gated",
    "digits-dit-int8",
    "digits-dit-fp8",
    "digits-dit-w4a8",
)


def _row(run: Path) -> dict[str, Any]:
    report = json.loads((run / "report.json").read_text())
    manifest = json.loads((run / "manifest.json").read_text())
    quantize, calibration = manifest["recipe"]["quantize"], manifest["recipe"]["calibration"]
    mixed = report.get("mixed_precision")
    precision = quantize["precision"]
    if precision == "w4a8":
        precision += f" (group {quantize['weight_group_size']})" if quantize.get("weight_group_size") else " (channel)"
    if quantize.get("activation_bits", 8) != 8:
        precision = precision.replace("int8", f"W8A{quantize['activation_bits']}")
    if mixed is not None:
        precision += f" + {len(mixed['fallback_layers'])} FP layer(s)"
    quality = report["quality"]
    return {
        "run": run.name,
        "model": manifest["recipe"]["model"]["path"],
        "precision": precision,
        "calibration": f"{calibration['strategy']}, {calibration['n_samples']} trajectories, amax {quantize['amax']}, "
        f"temporal {quantize['temporal']}",
        "final_psnr_db": report["final"]["psnr_db"],
        "classifier_acc": quality["engine"]["classifier_acc"],
        "classifier_acc_fp": quality["reference"]["classifier_acc"],
        "fd": quality["engine"]["fd"],
        "fd_fp": quality["reference"]["fd"],
        "engine_bytes": report["size_bytes"]["engine"],
        "ms_b1": report["latency_ms"]["engine"]["b1"],
        "ms_b8": report["latency_ms"]["engine"]["b8"],
        "ort_fp32_ms_b8": report["latency_ms"]["ort_fp32"]["b8"],
        "gate_passed": report["gate"]["passed"],
        "fallback_layers": mixed["fallback_layers"] if mixed is not None else [],
    }


def precision_table(runs_root: str | Path = "runs", names: tuple[str, ...] = RECIPES) -> Path:
    """Collect the finished runs among `names` into runs/precisions/{precisions.json, precisions.md}."""
    runs_root = Path(runs_root)
    rows, missing = [], []
    for name in names:
        run = runs_root / name
        if (run / "report.json").is_file() and (run / "manifest.json").is_file():
            try:
                rows.append(_row(run))
            except (ValueError, KeyError, TypeError) as err:  # JSONDecodeError is a ValueError
                raise FlowpressError(
                    f"{run}: report.json / manifest.json unreadable or from another flowpress version ({err!r}); "
                    f"re-run `make quantize RECIPE=recipes/{name}.yaml`"
                ) from err
        else:
            missing.append(name)
    if not rows:
        raise FlowpressError(
            f"{runs_root}: none of {', '.join(names)} has a finished run; run `make precisions` "
            "(or `make quantize RECIPE=recipes/<name>.yaml`) first"
        )
    final = runs_root / "precisions"
    with run_lock(final), staged_run(final) as out:
        (out / "precisions.json").write_text(json.dumps({"rows": rows, "missing": missing}, indent=2) + "\n")
        (out / "precisions.md").write_text(precision_markdown(rows, missing))
    return final


def precision_markdown(rows: list[dict[str, Any]], missing: list[str]) -> str:
    lines = [
        "# Precision x calibration",
        "",
        "Each row is one `flowpress quantize` run (its report.json): final-sample PSNR against the FP "
        "trajectory on the same seeds, classifier accuracy and Frechet distance of the engine's samples "
        "(FP in brackets), the onnxruntime engine file and its median ms per forward.",
        "",
        "| run | precision | calibration | final PSNR (dB) | accuracy | FD | engine MB | ms b1 | ms b8 "
        "(ort fp32) | gate |",
        "|---|---|---|---|---|---|---|---|---|---|",
    ]
    for r in rows:
        lines.append(
            f"| {r['run']} | {r['precision']} | {r['calibration']} | {r['final_psnr_db']:.2f} | "
            f"{r['classifier_acc']:.3f} ({r['classifier_acc_fp']:.3f}) | {r['fd']:.1f} ({r['fd_fp']:.1f}) | "
            f"{r['engine_bytes'] / 1e6:.2f} | {r['ms_b1']:.2f} | {r['ms_b8']:.2f} ({r['ort_fp32_ms_b8']:.2f}) | "
            f"{'passed' if r['gate_passed'] else 'FAILED'} |"
        )
    for r in rows:
        if r["fallback_layers"]:
            lines += ["", f"{r['run']}: kept in full precision: " + ", ".join(f"`{n}`" for n in r["fallback_layers"])]
    if missing:
        lines += ["", "Not run yet: " + ", ".join(missing) + " (`make quantize RECIPE=recipes/<name>.yaml`)."]
    return "\n".join(lines) + "\n"
