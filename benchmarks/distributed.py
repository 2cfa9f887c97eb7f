"""`make distributed`: one recipe through `flowpress quantize` with 1 process x 1 thread, then
with N processes x 1 thread (--nproc-per-node N): the wall time of each stage from both runs'
manifests, which stages the ranks share and which stay on rank 0, and whether the two runs wrote
the same engine bytes and report numbers.  results/distributed.md, runs/distributed/distributed.json.

    python -m benchmarks.distributed [--recipe R] [--nproc 2] [--results results]
"""

from __future__ import annotations

import argparse
import hashlib
import json
import os
import subprocess
import sys
import time
from pathlib import Path

from flowpress.results import write_result

# the stages whose work is split over the ranks by batch of seeds (or by layer); the others run on rank 0
PARALLEL = ("calibrate", "quantize", "fp_reference", "peers", "compare", "judge", "sensitivity")
NUMBERS = ("per_step", "final", "quality", "gate", "weight_forms")  # of report.json: equal in both runs
SKIPPED = ("report.json", "report.md", "manifest.json", "samples.png", "trajectory_error.png")  # times inside


def _run(recipe: Path, runs: Path, nproc: int) -> dict:
    """One quantize run, 1 thread per process; its exit code, wall time, manifest and report."""
    command = [sys.executable, "-m", "flowpress", "quantize", "--recipe", str(recipe), "--runs", str(runs), "--quiet"]
    if nproc > 1:
        command += ["--nproc-per-node", str(nproc)]
    start = time.perf_counter()
    done = subprocess.run(command, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if done.returncode not in (0, 1):
        tail = (done.stderr.strip().splitlines() or ["no message"])[-1]
        raise SystemExit(f"benchmarks.distributed: {nproc} process(es) exited {done.returncode}: {tail}")
    (run,) = [p for p in runs.iterdir() if p.is_dir() and not p.name.startswith(".")]
    manifest = json.loads((run / "manifest.json").read_text())
    files = {
        str(p.relative_to(run)): hashlib.sha256(p.read_bytes()).hexdigest()
        for p in sorted(run.rglob("*"))
        if p.is_file() and p.name not in SKIPPED
    }
    report = json.loads((run / "report.json").read_text())
    return {
        "exit": done.returncode,
        "seconds": round(seconds, 1),
        "world_size": manifest["world_size"],
        "stages": {name: s["seconds"] for name, s in manifest["stages"].items()},
        "files": files,
        "numbers": {key: report.get(key) for key in NUMBERS},
    }


def measure(recipe: Path, nproc: int, out: Path) -> dict:
    one = _run(recipe, out / "one", 1)
    many = _run(recipe, out / f"ranks{nproc}", nproc)
    parallel = {s: (one["stages"][s], many["stages"][s]) for s in PARALLEL if s in one["stages"]}
    serial = {s: (t, many["stages"].get(s, 0.0)) for s, t in one["stages"].items() if s not in PARALLEL}
    return {
        "recipe": str(recipe),
        "nproc": nproc,
        "one": {k: v for k, v in one.items() if k != "files"},
        "many": {k: v for k, v in many.items() if k != "files"},
        "same_files": one["files"] == many["files"],
        "different_files": sorted(k for k in one["files"] if one["files"][k] != many["files"].get(k)),
        "same_numbers": one["numbers"] == many["numbers"],
        "parallel": parallel,
        "serial": serial,
        "parallel_ratio": sum(m for _, m in parallel.values()) / max(sum(o for o, _ in parallel.values()), 1e-9),
    }


def markdown(found: dict) -> str:
    n, one, many = found["nproc"], found["one"], found["many"]
    lines = [
        f"`flowpress quantize --recipe {found['recipe']}` with 1 process x 1 thread, then `--nproc-per-node {n}`"
        f" ({n} processes x 1 thread, gloo), each run alone on the host.",
        "",
        f"- Engine and graph files, calibration set: **{'byte-identical' if found['same_files'] else 'DIFFERENT'}**"
        + ("" if found["same_files"] else f" ({', '.join(found['different_files'])})"),
        f"- Report numbers (per-step error, final fidelity, quality, gate, weight forms): "
        f"**{'equal' if found['same_numbers'] else 'DIFFERENT'}**",
        f"- Exit codes {one['exit']} / {many['exit']}; wall time {one['seconds']} s / {many['seconds']} s "
        "(process start, model load and imports included).",
        f"- Stages the ranks share: **{found['parallel_ratio']:.2f}x** the one-process time.",
        "",
        f"| stage | runs on | 1 process s | {n} processes s | ratio |",
        "|---|---|---|---|---|",
    ]
    for where, table in (("every rank", found["parallel"]), ("rank 0", found["serial"])):
        for stage, (a, b) in table.items():
            lines.append(f"| {stage} | {where} | {a:.1f} | {b:.1f} | {b / a if a else 0:.2f} |")
    lines += [
        "",
        "The ranks share the work by batch of seeds (the recipe's batch sizes), so a stage scales up to its number "
        "of batches; export, the engine builds, the latency timing and the host check run on rank 0 while the "
        "others wait (docs/distributed.md).",
    ]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.distributed")
    parser.add_argument("--recipe", default="examples/digits/recipes/digits-unet-quick.yaml")
    parser.add_argument("--nproc", type=int, default=2)
    parser.add_argument("--runs", default="runs/distributed")
    parser.add_argument("--results", default=None)
    args = parser.parse_args(argv)
    out = Path(args.runs)
    found = measure(Path(args.recipe), args.nproc, out)
    (out / "distributed.json").write_text(json.dumps(found, indent=1))
    body = markdown(found)
    print(body)
    if args.results:
        title = f"Data-parallel quantize: 1 vs {args.nproc} processes"
        print(write_result(args.results, "distributed", title, "make distributed", body))
    return 0 if found["same_files"] and found["same_numbers"] else 1


if __name__ == "__main__":
    sys.exit(main())
