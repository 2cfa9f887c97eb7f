"""The bench's bars: pass / fail of this run's rows against recipes/bench.yaml's thresholds."""

from __future__ import annotations

from typing import Any

from benchmarks.bench.config import NOT_THE_SAME_NETWORK, BenchBars
from benchmarks.bench.profile import weight_kernel_share


def find_row(rows: list[dict[str, Any]], model: str, variant: str, batch: int) -> dict[str, Any] | None:
    return next((r for r in rows if r["model"] == model and r["variant"] == variant and r["batch"] == batch), None)


def bars(
    rows: list[dict[str, Any]],
    thresholds: BenchBars | None = None,
    peaks: dict[str, Any] | None = None,
    batch: int = 8,
    profiles: dict[str, dict[str, list[dict[str, Any]]]] | None = None,
) -> list[dict[str, Any]]:
    """The bench's bars on this run's rows at `batch` against `thresholds` (default: BenchBars());
    the int8-peak bar needs the host's GEMM peaks (matmul_peaks).  With the engines' operator
    profiles at `batch` (model -> variant -> top_ops), the int8-peak entry also says where the
    fastest engine's time goes: its weight-GEMM kernels' share and rate, and what time the bar
    leaves the rest (attention, norms, activations, layout) at that rate."""
    thresholds = thresholds or BenchBars()
    out = []
    for model in sorted({r["model"] for r in rows}):
        peak_bar = thresholds.int8_peak_fraction
        candidates = [
            r
            for r in rows
            if r["model"] == model
            and r["batch"] == batch
            and not r["peer"]
            and r["variant"] not in NOT_THE_SAME_NETWORK
        ]
        if peaks and candidates:
            best = min(candidates, key=lambda r: r["ms_per_step_median"])
            achieved = best["gop_per_forward"] / (best["ms_per_step_median"] / 1000)
            need = peak_bar.min if model == peak_bar.model else None
            entry = {
                "model": model,
                "bar": f"fastest flowpress engine ({best['variant']}) vs this host's int8 GEMM peak"
                + (f": >= {100 * need:g}%" if need else " (no bar)"),
                "achieved_gop_per_s": achieved,
                "int8_peak_gop_per_s": peaks["int8"],
                "fraction_of_int8_peak": achieved / peaks["int8"],
                "passed": achieved / peaks["int8"] >= need if need else None,
            }
            ops = (profiles or {}).get(model, {}).get(best["variant"])
            share = weight_kernel_share(ops) if ops else 0.0
            if share > 0:
                ms = best["ms_per_step_median"]
                entry["weight_gemm_time_share"] = share
                entry["weight_gemm_gop_per_s"] = best["linear_gop_per_forward"] / (share * ms / 1000)
                entry["rest_ms"] = (1 - share) * ms
                if need:  # the rest may take this long for the bar to pass, the weight GEMMs as they run
                    entry["rest_ms_allowed"] = 1000 * best["gop_per_forward"] / (need * peaks["int8"]) - share * ms
            fp = find_row(rows, model, "ort-fp32", batch)
            if fp:
                entry["speedup_vs_ort_fp32"] = fp["ms_per_step_median"] / best["ms_per_step_median"]
            out.append(entry)
        for ours_name, peer_name, bar in (
            ("flowpress-ov-int8", "ov-nncf-default", thresholds.ov_int8_vs_nncf),
            ("flowpress-ort-int8", "ort-quantize-static", thresholds.ort_int8_vs_quantize_static),
        ):
            ours, peer = find_row(rows, model, ours_name, batch), find_row(rows, model, peer_name, batch)
            if not (ours and peer):
                continue
            speedup = peer["ms_per_step_median"] / ours["ms_per_step_median"]
            gain = ours["final_psnr_db"] - peer["final_psnr_db"]
            out.append(
                {
                    "model": model,
                    "bar": f"{ours_name} vs {peer_name}: speedup >= {bar.min_speedup:g}x, final PSNR gain "
                    f">= {bar.min_psnr_gain_db:g} dB",
                    "speedup": speedup,
                    "psnr_gain_db": gain,
                    "passed": speedup >= bar.min_speedup and gain >= bar.min_psnr_gain_db,
                }
            )
    return out
