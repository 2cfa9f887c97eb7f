"""`make scale`: full-width pipelines of the field's architectures (benchmarks/scale_models.py)
through `flowpress quantize --model`, one at a time, each in its own process; results/scale.md
and runs/scale/scale.json from what the runs measured (report.json, manifest.json) and the
process's own peak resident memory (the kernel's ru_maxrss of the child).

    python -m benchmarks.scale [--models sd15,sdxl,...] [--steps 10] [--samples 8] [--results results]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import time
from pathlib import Path

from benchmarks.scale_models import BUILDERS, build

PROMPTS = (
    "a photo of a red car",
    "a green tree on the street",
    "a dog on the street",
    "a cat on a house",
    "a red house under the sky",
    "a photo of a green car",
    "a tree",
    "the street",
)


def _cpu() -> str:
    with open("/proc/cpuinfo") as cpuinfo:
        for line in cpuinfo:
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    return platform.processor() or "unknown"


def _run(name: str, model: Path, out: Path, args: argparse.Namespace, prompts: Path) -> dict:
    """One `flowpress quantize --model` in a child process; what it measured and printed."""
    command = [sys.executable, "-m", "flowpress", "quantize", "--model", str(model), "--prompts", str(prompts),
               "--steps", str(args.steps), "--samples", str(args.samples), "--out", str(out),
               *args.options.split()]  # fmt: skip
    log = out.with_name(f"{out.name}.log")
    log.parent.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    with open(log, "w") as handle:
        child = subprocess.Popen(command, stdout=handle, stderr=subprocess.STDOUT)
        _, status, usage = os.wait4(child.pid, 0)
    seconds = time.perf_counter() - start
    code = os.waitstatus_to_exitcode(status)
    row: dict = {"model": name, "exit": code, "seconds": round(seconds, 1), "peak_rss_bytes": usage.ru_maxrss * 1024}
    row["last_line"] = (log.read_text().strip().splitlines() or [""])[-1][:300]
    return _with_run(row, out)


def _with_run(row: dict, out: Path) -> dict:
    """`row` with what the run measured (its report and manifest), when it finished."""
    if (out / "report.json").is_file() and row["exit"] in (0, 1):
        report = json.loads((out / "report.json").read_text())
        manifest = json.loads((out / "manifest.json").read_text())
        row.update(
            final_psnr_db=report["final"]["psnr_db"],
            gate_passed=report["gate"]["passed"],
            stages=manifest.get("stages", {}),
            size_bytes=report["size_bytes"],
            denoiser=report.get("model"),
            plan=manifest.get("plan"),
            settings=_settings(manifest["recipe"]),
        )
        # the larger of the parent's measure and the run's own (a flowpress that reset the kernel's
        # peak per stage hid it from the parent's ru_maxrss)
        row["isa"] = report["host"]["isa"]["isa_class"]
        row["peak_rss_bytes"] = max(row["peak_rss_bytes"], manifest.get("peak_rss_bytes", 0))
    return row


def _settings(recipe: dict) -> str:
    """How a run was asked, from its own manifest's recipe."""
    openvino = "" if recipe["engine"]["candidates"] else ", no OpenVINO"
    return (
        f"{recipe['sampling']['steps']} steps, {recipe['calibration']['n_samples']} calibration / "
        f"{recipe['compare']['n_samples']} compare samples{openvino}"
    )


def _table(rows: list[dict], args: argparse.Namespace) -> str:
    lines = [
        "# Real-size models through `flowpress quantize --model`",
        "",
        f"Written by `make scale` (`python -m benchmarks.scale`) on {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime())}, "
        f"{_cpu()}, {os.cpu_count()} cores, {os.sysconf('SC_PAGE_SIZE') * os.sysconf('SC_PHYS_PAGES') / 2**30:.0f} GiB. "
        "Random weights at full width (benchmarks/scale_models.py), each run as its settings column says; host ISA class "
        f"{', '.join(sorted({r['isa'] for r in rows if 'isa' in r})) or 'unknown'}. Peak resident: the process's "
        "whole-run peak; the plan's estimate and the per-stage peaks are in each run's manifest.",
        "",
        "| model | settings | denoiser params | fp32 bytes | fp32 ONNX bytes | engine bytes | peak resident | "
        "peak / fp32 | wall s | final PSNR dB | gate | exit |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    for row in rows:
        plan = row.get("plan") or {}
        fp32 = plan.get("denoiser_fp32_bytes")
        size = row.get("size_bytes", {})
        ratio = f"{row['peak_rss_bytes'] / fp32:.2f}" if fp32 else "—"
        psnr = f"{row['final_psnr_db']:.2f}" if "final_psnr_db" in row else "—"
        gate = {True: "pass", False: "FAIL"}.get(row.get("gate_passed"), "—")  # type: ignore[arg-type]
        lines.append(
            f"| {row['model']} | {row.get('settings', '—')} | {plan.get('denoiser_parameters', 0) / 1e9:.3f} B | {fp32 or 0:,} | "
            f"{size.get('fp32_onnx', 0):,} | {size.get('engine', 0):,} | {row['peak_rss_bytes'] / 1e9:.2f} GB | "
            f"{ratio} | {row['seconds']:.0f} | {psnr} | {gate} | {row['exit']} |"
        )
    lines += ["", "Time (s) and peak resident memory (GB) per stage:", ""]
    for row in rows:
        stages = row.get("stages") or {}
        if stages:
            cells = ", ".join(
                f"{k} {v['seconds']:.0f} s / {v['peak_rss_bytes'] / 1e9:.1f} GB" for k, v in stages.items()
            )
            lines.append(f"- {row['model']}: {cells}")
        else:
            lines.append(f"- {row['model']}: no report (exit {row['exit']}): `{row['last_line']}`")
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.scale", description=__doc__.split("\n\n")[0])
    parser.add_argument("--models", default=",".join(BUILDERS), help=f"comma-separated: {', '.join(BUILDERS)}")
    parser.add_argument("--root", default="runs/scale", help="pipelines, runs and logs go here")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--samples", type=int, default=8)
    parser.add_argument("--latent", type=int, default=16, help="latent height and width of the built configs")
    parser.add_argument("--options", default="", help="more `flowpress quantize` options, e.g. '--no-openvino'")
    parser.add_argument("--results", default=None, help="also write RESULTS/scale.md")
    parser.add_argument("--table-only", action="store_true", help="rewrite the table from ROOT/scale.json's runs")
    args = parser.parse_args(argv)
    root = Path(args.root)
    if args.table_only:
        rows = [_with_run(row, root / "runs" / row["model"]) for row in json.loads((root / "scale.json").read_text())]
        return _write(rows, args, root)
    root.mkdir(parents=True, exist_ok=True)
    prompts = root / "prompts.txt"
    prompts.write_text("\n".join(PROMPTS) + "\n")
    rows = []
    for name in args.models.split(","):
        if name not in BUILDERS:
            print(f"scale: unknown model {name!r}; choose from {', '.join(BUILDERS)}", file=sys.stderr)
            return 2
        model = build(name, root / "models" / name, args.latent)
        print(f"[scale] {name}: quantize --model {model}", flush=True)
        rows.append(_run(name, model, root / "runs" / name, args, prompts))
        print(f"[scale] {name}: exit {rows[-1]['exit']}, {rows[-1]['seconds']:.0f} s, "
              f"peak {rows[-1]['peak_rss_bytes'] / 1e9:.2f} GB", flush=True)  # fmt: skip
    return _write(rows, args, root)


def _write(rows: list[dict], args: argparse.Namespace, root: Path) -> int:
    """scale.json / scale.md with `rows`, beside the rows of the models not run this time."""
    kept = json.loads((root / "scale.json").read_text()) if (root / "scale.json").is_file() else []
    ran = {row["model"] for row in rows}
    code = 0 if all(row["exit"] in (0, 1) for row in rows) else 2
    rows = [row for row in kept if row["model"] not in ran] + rows
    (root / "scale.json").write_text(json.dumps(rows, indent=2) + "\n")
    markdown = _table(rows, args)
    (root / "scale.md").write_text(markdown)
    if args.results:
        Path(args.results).mkdir(parents=True, exist_ok=True)
        (Path(args.results) / "scale.md").write_text(markdown)
    print(markdown)
    return code


if __name__ == "__main__":
    resource.setrlimit(resource.RLIMIT_CORE, (0, 0))
    sys.exit(main())
