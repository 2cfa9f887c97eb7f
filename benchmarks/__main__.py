"""`python -m benchmarks ablate|bench|precisions`: the research harness's commands (the make targets
`ablate`, `bench`, `precisions` call them); exit codes and error lines as flowpress's own CLI."""

from __future__ import annotations

import argparse
import sys

from flowpress.cli import guarded


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m benchmarks", description="flowpress's research harness")
    sub = parser.add_subparsers(dest="command", required=True)
    a = sub.add_parser("ablate", help="every calibration strategy x temporal cache x setting beside the peers")
    a.add_argument("--recipe", default="examples/digits/recipes/ablation.yaml")
    a.add_argument("--runs", default="runs")
    a.add_argument("--results", default=None, help="also write the table into RESULTS/ablation.md")
    b = sub.add_parser("bench", help="every CPU engine (flowpress's and the peers') for speed and fidelity")
    b.add_argument("--recipe", default="recipes/bench.yaml")
    b.add_argument("--runs", default="runs")
    b.add_argument("--results", default=None, help="also write the table into RESULTS/bench.md")
    m = sub.add_parser("precisions", help="the precision x calibration table of the finished quantize runs")
    m.add_argument("--runs", default="runs")
    m.add_argument("--results", default=None, help="also write the table into RESULTS/precisions.md")
    for p in (a, b, m):
        p.add_argument("--quiet", action="store_true", help="no progress bars")
    return parser


def _run(args: argparse.Namespace) -> int:
    progress = not args.quiet
    if args.command == "precisions":
        from benchmarks.precisions import precision_table

        out = precision_table(args.runs, results_dir=args.results)
        print(f"[flowpress] {out}: precisions.json, precisions.md")
        print((out / "precisions.md").read_text())
        return 0
    if args.command == "ablate":
        from benchmarks.ablate import load_ablation_config, run_ablation

        out = run_ablation(load_ablation_config(args.recipe), args.runs, progress, results_dir=args.results)
        print(f"[flowpress] {out}: ablation.json, ablation.md, error_vs_step.png")
        return 0
    from benchmarks.bench import load_bench_config, run_bench

    out, bench = run_bench(load_bench_config(args.recipe), args.runs, progress, results_dir=args.results)
    print(f"[flowpress] {out}: bench.json, bench.md, frontier.png")
    for bar in bench["bars"]:
        status = {True: "passed", False: "FAILED", None: "-"}[bar["passed"]]
        print(f"[flowpress] {bar['model']}: {bar['bar']}: {status}")
    return 0


def main(argv: list[str] | None = None) -> int:
    return guarded(_run, _parser().parse_args(argv))


if __name__ == "__main__":
    sys.exit(main())
