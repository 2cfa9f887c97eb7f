"""`flowpress` command line: one subcommand per user task; bad input exits 2 with one line."""

from __future__ import annotations

import argparse
import sys

from sampling import EngineParityError, FlowpressError

DEFAULT_RECIPE = "recipes/digits-unet-int8.yaml"
DEFAULT_TEACHER = "recipes/digits-teacher.yaml"


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="flowpress", description="Compress flow / diffusion image models into validated engines."
    )
    sub = parser.add_subparsers(dest="command", required=True)
    q = sub.add_parser("quantize", help="calibrate, quantize, export, build the engine and compare it with FP")
    q.add_argument("--recipe", default=DEFAULT_RECIPE)
    q.add_argument("--runs", default="runs", help="parent directory of run directories")
    c = sub.add_parser("compare", help="re-run the FP-vs-engine comparison of an existing run")
    c.add_argument("--recipe", default=DEFAULT_RECIPE)
    c.add_argument("--runs", default="runs")
    t = sub.add_parser("teacher", help="train the default teacher (and the digit classifier when missing)")
    t.add_argument("--recipe", default=DEFAULT_TEACHER)
    k = sub.add_parser("classifier", help="train the digit classifier used for quality metrics")
    k.add_argument("--out", default="checkpoints/digits-classifier")
    e = sub.add_parser("engines", help="lint the tensorrt graph of a run; build and validate TensorRT on a GPU host")
    e.add_argument("--recipe", default=DEFAULT_RECIPE)
    e.add_argument("--runs", default="runs")
    g = sub.add_parser("bench-gpu", help="GPU latency of torch fp16, TensorRT fp16/int8/fp8 into the run's report.json")
    g.add_argument("--recipe", default=DEFAULT_RECIPE)
    g.add_argument("--runs", default="runs")
    a = sub.add_parser("ablate", help="every calibration strategy x temporal cache x setting beside the peers")
    a.add_argument("--recipe", default="recipes/ablation.yaml")
    a.add_argument("--runs", default="runs")
    b = sub.add_parser("bench", help="every CPU engine (flowpress's and the peers') for speed and fidelity")
    b.add_argument("--recipe", default="recipes/bench.yaml")
    b.add_argument("--runs", default="runs")
    d = sub.add_parser("distill", help="SlimFlow: distill the teacher into a small one-step student")
    d.add_argument("--recipe", default="recipes/digits-slimflow.yaml")
    d.add_argument("--runs", default="runs")
    m = sub.add_parser("precisions", help="the precision x calibration table of the finished quantize runs")
    m.add_argument("--runs", default="runs")
    for p in (q, c, t, k, e, g, a, b, d, m):
        p.add_argument("--quiet", action="store_true", help="no progress bars")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    progress = not args.quiet
    try:
        from flowpress import pipeline
        from flowpress.recipe import load_recipe, load_teacher_recipe

        if args.command in ("quantize", "compare"):
            recipe = load_recipe(args.recipe)
            run = pipeline.run_quantize if args.command == "quantize" else pipeline.run_compare
            run_dir, report = run(recipe, args.runs, progress)
            print(f"[flowpress] {run_dir}: report.json, report.md, samples.png, trajectory_error.png")
            for line in pipeline.summary_lines(report):
                print(f"[flowpress] {line}")
            return 0 if report["gate"]["passed"] else 1
        if args.command == "teacher":
            pipeline.run_teacher(load_teacher_recipe(args.recipe), progress)
            return 0
        if args.command == "classifier":
            from models.classifier import ClassifierConfig, train_classifier

            out, accuracy = train_classifier(ClassifierConfig(out=args.out), progress)
            print(f"[flowpress] classifier {out}: held-out accuracy {accuracy:.2%}")
            return 0
        if args.command == "distill":
            from flowpress.distill import run_distill
            from flowpress.distill import summary_lines as distill_lines
            from flowpress.recipe import load_distill_recipe

            distill_dir, distilled = run_distill(load_distill_recipe(args.recipe), args.runs, progress)
            if distill_dir is None:  # a non-zero torchrun rank: rank 0 writes and reports
                return 0
            print(f"[flowpress] {distill_dir}: distill.json, distill.md, distill.png; student {distilled['student']}")
            for line in distill_lines(distilled):
                print(f"[flowpress] {line}")
            return 0 if all(b["passed"] for b in distilled["bars"].values()) else 1
        if args.command == "precisions":
            from flowpress.precisions import precision_table

            out = precision_table(args.runs)
            print(f"[flowpress] {out}: precisions.json, precisions.md")
            print((out / "precisions.md").read_text())
            return 0
        if args.command == "ablate":
            from flowpress.ablate import load_ablation_config, run_ablation

            out = run_ablation(load_ablation_config(args.recipe), args.runs, progress)
            print(f"[flowpress] {out}: ablation.json, ablation.md, error_vs_step.png")
            return 0
        if args.command == "bench":
            from flowpress.bench import load_bench_config, run_bench

            out = run_bench(load_bench_config(args.recipe), args.runs, progress)
            print(f"[flowpress] {out}: bench.json, bench.md, frontier.png")
            for line in (out / "bench.md").read_text().split("## Bars (batch 8)")[1].strip().splitlines():
                if line.startswith("- "):
                    print(f"[flowpress] {line[2:]}")
            return 0
        if args.command == "engines":
            from flowpress import gpu

            built = gpu.run_engines(load_recipe(args.recipe), args.runs, progress)
            for line in gpu.engines_lines(built):
                print(f"[flowpress] {line}")
            return 0 if built.passed else 1
        if args.command == "bench-gpu":
            from flowpress import gpu

            bench = gpu.run_bench_gpu(load_recipe(args.recipe), args.runs, progress)
            for line in gpu.bench_lines(bench):
                print(f"[flowpress] {line}")
            return 0
    except EngineParityError as err:
        print(f"flowpress: engine not faithful on this host: {err}", file=sys.stderr)
        return err.exit_code
    except FlowpressError as err:
        print(f"flowpress: error: {err}", file=sys.stderr)
        return 2
    except OSError as err:  # a full disk or an unwritable runs directory, wherever the write was
        from flowpress.rundir import write_error

        mapped = write_error(err, getattr(args, "runs", "the output directory"))
        if mapped is None:
            raise
        print(f"flowpress: error: {mapped}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("flowpress: interrupted; the run directory was not replaced", file=sys.stderr)
        return 130
    return 2


if __name__ == "__main__":
    sys.exit(main())
