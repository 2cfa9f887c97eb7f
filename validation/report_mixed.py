"""The mixed-precision search in report.md: fallbacks, their cost, every assignment checked."""

from __future__ import annotations

from typing import Any


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
        "| layers in FP | check samples | final PSNR (dB) | other gate checks | engine bytes | check | full compare |",
        "|---|---|---|---|---|---|---|",
    ]
    for c in mixed["candidates"]:
        confirmed = {None: "-", True: "passed", False: "failed"}[c["confirmed"]]
        lines.append(
            f"| {len(c['fallback_layers'])} | {c['n_samples']} | {c['final_psnr_db']:.2f} | "
            f"{', '.join(f'{k} {v:.3g}' for k, v in c['checks'].items()) or '-'} | {c['engine_bytes']:,} | {'pass' if c['check_passed'] else 'fail'} | "
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
