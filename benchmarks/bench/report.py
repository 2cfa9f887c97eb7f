"""bench.md and the speed-vs-fidelity frontier plot from a finished bench's record."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from benchmarks.bench.bars import find_row
from benchmarks.bench.config import PORTABLE_TWINS
from benchmarks.bench.profile import GRAPH_OPS
from flowpress.engines.isa import ISA_ENV


def plot_frontier(rows: list[dict[str, Any]], path: Path, batch: int = 8) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    models = sorted({r["model"] for r in rows})
    fig, axes = plt.subplots(1, len(models), figsize=(5 * len(models), 4), squeeze=False)
    for ax, model in zip(axes[0], models, strict=True):
        for row in (r for r in rows if r["model"] == model and r["batch"] == batch and r["final_psnr_db"] is not None):
            marker = "o" if row["peer"] else "*"
            ax.scatter(row["ms_per_step_median"], row["final_psnr_db"], marker=marker, s=60 if row["peer"] else 120)
            ax.annotate(row["variant"], (row["ms_per_step_median"], row["final_psnr_db"]), fontsize=7)
        ax.set_xscale("log")
        ax.set_xlabel(f"ms per step, batch {batch} (median)")
        ax.set_ylabel("final PSNR vs FP (dB)")
        ax.set_title(f"{model}: o peers, * flowpress")
        ax.grid(True, which="both", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def _peak_sizes(peaks: dict[str, Any]) -> str:
    return "/".join(str(n) for n in sorted({m["size"] for m in peaks["measured"]}))


def _peak_source(peaks: dict[str, Any], arithmetic: str) -> str:
    best = max((m for m in peaks["measured"] if m["arithmetic"] == arithmetic), key=lambda m: m["gop_per_s"])
    return f"{best['runtime']}, {best['size']}"


def _fmt(value: float | None, spec: str) -> str:
    return "—" if value is None else format(value, spec)


def bench_markdown(bench: dict[str, Any]) -> str:
    m, peaks, config = bench["machine"], bench["matmul_peak_gop_per_s"], bench["config"]
    host = m["host"]
    int8_note = (
        "its int8 kernels saturate 8-bit weights, so flowpress's int8 engines are portable here (7-bit weights, NNCF "
        "overflow fix) and the peers are not"
        if host["int8_saturates"]
        else "its int8 kernels are exact with 8-bit weights"
    )
    lines = [
        "# CPU engine bench",
        "",
        f"Machine: {m['cpu']}, {m['cores']} cores, ISA class {host['isa_class']}"
        + (f" (emulated: {ISA_ENV})" if host["emulated"] else f" ({', '.join(host['flags']) or 'no flags read'})")
        + f": {int8_note}; onnxruntime {host['onnxruntime']}, "
        f"OpenVINO {host['openvino']}; {config['threads']} threads for every runtime; {config['passes']} passes of "
        f"{config['runs']} timed runs after warm-up per cell, the variants of a model timed interleaved (rounds of "
        f"{config['settle']} untimed and {config['block']} timed forwards each, order rotating), so a slow spell of "
        "the shared host lands on all of them; the median is the median of the passes' medians, p90 over every "
        "run. Compare within this file.",
        f"Matrix-multiply peak (best of square GEMMs {_peak_sizes(peaks)}, chained 4 per call, on each runtime): "
        + ", ".join(f"{a} {peaks[a]:.0f} GOP/s ({_peak_source(peaks, a)})" for a in ("fp32", "bf16", "int8"))
        + f". The int8 peak is {peaks['int8'] / peaks['fp32']:.1f}x the fp32 one. Measured once, before the models: "
        "a variant above 100% ran while the host was faster than then.",
        "",
    ]
    for info in bench["models"]:
        name = info["model"]
        lines += [
            f"## {name}",
            "",
            f"{info['params'] / 1e6:.2f}M parameters, {info['steps']} Euler steps, guidance {info['guidance']:g}; final "
            f"PSNR against the FP (torch) trajectory over {info['n_samples']} fixed seeds; flowpress calibrates on "
            f"{info['calibration_inputs']} trajectory inputs, the peers on as many inputs at random steps. flowpress's "
            f"int8 engines: {info['int8_weights'] or 'no int8'} weights in onnxruntime, NNCF overflow fix "
            f"'{info['overflow_fix']}' in OpenVINO ({'portable' if info['portable'] else 'not portable'} on "
            f"{info['isa_class']}).",
            "",
            "| variant | batch | ms/step median | p90 | images/s (loop) | final PSNR dB | size MB | peak RSS MB | "
            "% of peak | precision |",
            "|---|---|---|---|---|---|---|---|---|---|",
        ]
        for row in (r for r in bench["rows"] if r["model"] == name):
            tag = row["variant"] if row["peer"] else f"**{row['variant']}**"
            lines.append(
                f"| {tag} | {row['batch']} | {row['ms_per_step_median']:.2f} | {row['ms_per_step_p90']:.2f} | "
                f"{row['images_per_s']:.1f} | {_fmt(row['final_psnr_db'], '.2f')} | {row['size_bytes'] / 1e6:.2f} | "
                f"{row['peak_rss_mb']:.0f} | {100 * row['fraction_of_peak']:.1f} ({row['arithmetic']}) | "
                f"{row['inference_precision'] or row['arithmetic']} |"
            )
        student, teacher = (find_row(bench["rows"], name, v, 8) for v in ("student", "flowpress-ov-int8"))
        if student and teacher:
            lines += [
                "",
                f"The distilled student (one step, no guidance) makes {student['images_per_s']:.0f} images/s at batch 8 "
                f"against the teacher's {teacher['images_per_s']:.0f} in flowpress-ov-int8 ({teacher['steps']} steps): "
                f"{student['images_per_s'] / teacher['images_per_s']:.0f}x; its final PSNR is against the teacher's "
                "trajectory (another network: it is left out of the int8-peak bar).",
            ]
        lines += portable_cost(bench["rows"], name)
        lines += ["", "Top operators per engine (batch 8, share of the engine's operator time):", ""]
        for variant, ops in info["profiles"].items():
            lines.append(f"- {variant}: " + ", ".join(f"{o['op']} {100 * o['share']:.0f}%" for o in ops[:6]))
        for variant, ops in info["graph_ops"].items():
            compute = {k: v for k, v in ops.items() if k in GRAPH_OPS}
            lines.append(
                f"- {variant} graph after onnxruntime's optimizations: "
                + ", ".join(f"{k} {v}" for k, v in compute.items())
            )
        lines.append("")
    lines += ["![speed vs fidelity](frontier.png)", "", "## Bars (batch 8)", ""]
    for bar in bench["bars"]:
        status = {True: "passed", False: "FAILED", None: "—"}[bar["passed"]]
        if "fraction_of_int8_peak" in bar:
            measured = (
                f"{100 * bar['fraction_of_int8_peak']:.0f}% ({bar['achieved_gop_per_s']:.0f} of "
                f"{bar['int8_peak_gop_per_s']:.0f} GOP/s"
                + (f"; {bar['speedup_vs_ort_fp32']:.2f}x ort-fp32" if "speedup_vs_ort_fp32" in bar else "")
                + ")"
            )
            if "weight_gemm_time_share" in bar:
                measured += (
                    f"; its weight-GEMM kernels (Linear / Conv, with their fused post-ops) "
                    f"{100 * bar['weight_gemm_time_share']:.0f}% of its time at {bar['weight_gemm_gop_per_s']:.0f} GOP/s "
                    f"({100 * bar['weight_gemm_gop_per_s'] / bar['int8_peak_gop_per_s']:.0f}% of peak), the rest "
                    f"(attention, norms, activations, layout) {bar['rest_ms']:.1f} ms"
                    + (f", where the bar leaves it {bar['rest_ms_allowed']:.1f} ms" if "rest_ms_allowed" in bar else "")
                )
        else:
            measured = f"{bar['speedup']:.2f}x, PSNR {bar['psnr_gain_db']:+.2f} dB"
        lines.append(f"- {bar['model']}: {bar['bar']}: {measured}: {status}")
    if bench["python_overhead"]:
        lines += [
            "",
            "## Around the runtime (flowpress-ort-int8, batch 1, ms per sampler step)",
            "",
            "| model | runtime batch | raw session.run | engine call, run() | engine call, I/O binding | one sampler step |",
            "|---|---|---|---|---|---|",
        ]
        for o in bench["python_overhead"]:
            lines.append(
                f"| {o['model']} | {o['model_batch']} | {o['raw_session_run_ms']:.3f} | {o['engine_call_run_ms']:.3f} | "
                f"{o['engine_call_io_binding_ms']:.3f} | {o['sampler_ms_per_step']:.3f} |"
            )
    lines.append("")
    return "\n".join(lines)


def portable_cost(rows: list[dict[str, Any]], model: str, batch: int = 8) -> list[str]:
    """A sentence per portable twin: what the form exact on every x86 host costs on this host."""
    out = []
    for twin, full in PORTABLE_TWINS.items():
        a, b = find_row(rows, model, twin, batch), find_row(rows, model, full, batch)
        if a and b:
            out.append(
                f"{twin} (the form exact on every x86 host) against {full} (8-bit weights, exact here) at batch "
                f"{batch}: {a['ms_per_step_median']:.2f} vs {b['ms_per_step_median']:.2f} ms per step "
                f"({a['ms_per_step_median'] / b['ms_per_step_median']:.2f}x the time), final PSNR "
                f"{_fmt(a['final_psnr_db'], '.2f')} vs {_fmt(b['final_psnr_db'], '.2f')} dB."
            )
    return ["", *out] if out else []


def results_body(bench: dict[str, Any], run_dir: Path) -> str:
    """bench.md for results/bench.md: without its title (results' header replaces it) and with the
    frontier plot, which stays in the run, named instead of embedded."""
    body = bench_markdown(bench).split("\n", 1)[1]
    lines = [line for line in body.splitlines() if not line.startswith("![")]
    return "\n".join(lines).rstrip() + f"\n\nSpeed vs fidelity plot: {run_dir}/frontier.png (not committed).\n"
