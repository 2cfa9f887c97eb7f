"""The precision x calibration table: one row per finished quantize run (int8, fp8, W4A8, W4A4,
gated mixed), read from the runs' report.json and manifest.json, into runs/precisions/."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from flowpress.errors import FlowpressError
from flowpress.rundir import read_manifest, run_lock, staged_run, verify_run
from flowpress.validation.report import Report

RECIPES = (
    "digits-unet-int8",
    "digits-unet-fp8",
    "digits-unet-w4a8",
    "digits-unet-w4a4",
    "digits-unet-gated",
    "digits-dit-int8",
    "digits-dit-fp8",
    "digits-dit-w4a8",
    "digits-dit-w4a4",
)


def _row(run: Path) -> dict[str, Any]:
    manifest = read_manifest(run)
    verify_run(run, manifest)
    report = Report.load(run / "report.json")
    quantize, calibration = manifest["recipe"]["quantize"], manifest["recipe"]["calibration"]
    mixed = report.mixed_precision
    precision = quantize["precision"]
    if precision in ("w4a8", "w4a4"):
        precision += f" (group {quantize['weight_group_size']})" if quantize.get("weight_group_size") else " (channel)"
    if precision.startswith("w4a4"):
        precision += f", rank {quantize['rank']}"
    if quantize.get("activation_bits", 8) != 8:
        precision = precision.replace("int8", f"W8A{quantize['activation_bits']}")
    # W4A4's activation scales are computed at run time: the recipe's amax key does not apply
    ranges = "activation scales dynamic" if quantize["precision"] == "w4a4" else f"amax {quantize['amax']}"
    if quantize.get("step_scales"):
        ranges += " + per step"
    if report.weight_forms:
        precision += f", {report.weight_forms['shipped']} weights"
    if mixed is not None:
        precision += f" + {len(mixed['fallback_layers'])} FP layer(s)"
    return {
        "run": run.name,
        "model": manifest["recipe"]["model"]["path"],
        "precision": precision,
        "calibration": f"{calibration['strategy']}, {calibration['n_samples']} trajectories, {ranges}, "
        f"temporal {quantize['temporal']}",
        "final_psnr_db": report.final["psnr_db"],
        "final_ssim": report.final.get("ssim"),
        "quality": report.quality["engine"],
        "quality_fp": report.quality["reference"],
        "engine_bytes": report.size_bytes["engine"],
        "ms_b1": report.latency_ms["engine"]["b1"],
        "ms_b8": report.latency_ms["engine"]["b8"],
        "ort_fp32_ms_b8": report.latency_ms["ort_fp32"]["b8"],
        "gate_passed": report.passed,
        "fallback_layers": mixed["fallback_layers"] if mixed is not None else [],
        "host": report.host["isa"]["isa_class"],
    }


def precision_table(
    runs_root: str | Path = "runs", names: tuple[str, ...] = RECIPES, results_dir: str | Path | None = None
) -> Path:
    """Collect the finished runs among `names` into runs/precisions/{precisions.json, precisions.md}."""
    runs_root = Path(runs_root)
    rows, missing = [], []
    for name in names:
        run = runs_root / name
        if (run / "report.json").is_file() and (run / "manifest.json").is_file():
            try:
                rows.append(_row(run))
            except (KeyError, TypeError) as err:
                raise FlowpressError(
                    f"{run}: report.json / manifest.json from another flowpress version ({err!r}); "
                    f"re-run `make quantize RECIPE=examples/digits/recipes/{name}.yaml`"
                ) from err
        else:
            missing.append(name)
    if not rows:
        raise FlowpressError(
            f"{runs_root}: none of {', '.join(names)} has a finished run; run `make precisions` "
            "(or `make quantize RECIPE=examples/digits/recipes/<name>.yaml`) first"
        )
    final = runs_root / "precisions"
    with run_lock(final), staged_run(final) as out:
        (out / "precisions.json").write_text(json.dumps({"rows": rows, "missing": missing}, indent=2) + "\n")
        (out / "precisions.md").write_text("# Precision x calibration\n\n" + precision_markdown(rows, missing))
    if results_dir is not None:
        from flowpress.results import write_result

        write_result(
            results_dir, "precisions", "Precision x calibration", "make precisions", precision_markdown(rows, missing)
        )
    return final


def precision_markdown(rows: list[dict[str, Any]], missing: list[str]) -> str:
    """The table body (results/precisions.md adds the machine / commit / date header)."""
    metrics = sorted(rows[0]["quality"]) if rows else []
    lines = [
        "Each row is one `flowpress quantize` run (its report.json): final-sample PSNR against the FP "
        "trajectory on the same seeds, the evaluator's metrics of the engine's samples (FP in brackets), "
        "the onnxruntime engine file and its median ms per forward.",
        "",
        "| run | precision | calibration | final PSNR (dB) | "
        + "".join(f"{m} | " for m in metrics)
        + "engine MB | ms b1 | ms b8 (ort fp32) | gate |",
        "|---|---|---|---|" + "---|" * len(metrics) + "---|---|---|---|",
    ]
    for r in rows:
        scores = "".join(f"{r['quality'][m]:.3f} ({r['quality_fp'][m]:.3f}) | " for m in metrics)
        lines.append(
            f"| {r['run']} | {r['precision']} | {r['calibration']} | {r['final_psnr_db']:.2f} | {scores}"
            f"{r['engine_bytes'] / 1e6:.2f} | {r['ms_b1']:.2f} | {r['ms_b8']:.2f} ({r['ort_fp32_ms_b8']:.2f}) | "
            f"{'passed' if r['gate_passed'] else 'FAILED'} |"
        )
    for r in rows:
        if r["fallback_layers"]:
            lines += ["", f"{r['run']}: kept in full precision: " + ", ".join(f"`{n}`" for n in r["fallback_layers"])]
    if missing:
        lines += [
            "",
            "Not run yet: " + ", ".join(missing) + " (`make quantize RECIPE=examples/digits/recipes/<name>.yaml`).",
        ]
    return "\n".join(lines) + "\n"
