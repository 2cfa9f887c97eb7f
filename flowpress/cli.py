"""`flowpress` command line: one subcommand per user task.

Exit codes: 0 done (gate passed), 1 the gate failed, 2 bad input or a fault (one line on stderr:
what, where, how to fix; an unexpected exception names its stage and where its traceback was
written), 3 an engine that is not faithful on this host (parity).  Nothing else is exit 1."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Callable
from pathlib import Path

from flowpress.errors import EngineParityError, FlowpressError
from flowpress.launch import LAUNCHED, STOPPED
from flowpress.ranks import PeerStopped

# the defaults are the repository's digits example, wherever the command runs from
REPOSITORY = Path(__file__).resolve().parent.parent
DEFAULT_RECIPE = "examples/digits/recipes/digits-unet-int8.yaml"
DEFAULT_DISTILL_RECIPE = "examples/digits/recipes/digits-slimflow.yaml"


def default_recipe(relative: str = DEFAULT_RECIPE) -> Path:
    """The absolute path of a default recipe in the repository, or one line asking for --recipe
    (an installed flowpress carries no examples)."""
    path = REPOSITORY / relative
    if not path.is_file():
        raise FlowpressError(
            f"no --recipe given and the default recipe {relative} is not under {REPOSITORY} "
            "(flowpress installed without its examples): give --recipe (quantize also takes --model)"
        )
    return path


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="flowpress", description="Compress flow / diffusion image models into validated engines."
    )
    sub = parser.add_subparsers(dest="command", required=True)
    q = sub.add_parser("quantize", help="calibrate, quantize, export, build the engines and compare them with FP")
    q.add_argument(
        "--recipe", default=None, help=f"a recipe (default without --model: {DEFAULT_RECIPE} in the repository)"
    )
    q.add_argument("--runs", default="runs", help="parent directory of run directories")
    q.add_argument(
        "--model", default=None, help="no recipe: a diffusers pipeline or denoiser directory, defaults from its config"
    )
    q.add_argument("--prompts", default=None, help="with --model: calibration prompts, one per line")
    q.add_argument("--steps", type=int, default=None, help="with --model: sampler steps (default 20)")
    q.add_argument(
        "--scheduler", default=None, help="with --model: ddim, dpm-solver++, euler, ... (default: the model's own)"
    )
    q.add_argument("--prediction-type", default=None, choices=["epsilon", "v_prediction", "sample", "flow"])
    q.add_argument(
        "--precision", default=None, choices=["int8", "fp8", "w4a8", "w4a4"], help="with --model (default int8)"
    )
    q.add_argument("--guidance", type=float, default=None, help="with --model (default: the pipeline's usual)")
    q.add_argument(
        "--height", type=int, default=None, help="with --model: image height in pixels (default: the model's)"
    )
    q.add_argument("--width", type=int, default=None, help="with --model: image width in pixels (default: the model's)")
    q.add_argument("--samples", type=int, default=None, help="with --model: compare samples (default 100)")
    q.add_argument(
        "--calibration-samples", type=int, default=None, help="with --model: calibration trajectories (default 32)"
    )
    q.add_argument(
        "--batch", type=int, default=None, help="with --model: trajectories sampled at once (default 16 / 25)"
    )
    q.add_argument("--lora", default=None, help="with --model: a LoRA .safetensors fused into the pipeline first")
    q.add_argument("--lora-scale", type=float, default=1.0, help="with --lora: its weight (default 1.0)")
    q.add_argument("--out", default=None, help="with --model: the run directory (default runs/<model folder name>)")
    q.add_argument("--no-openvino", action="store_true", help="with --model: build the onnxruntime engine only")
    q.add_argument(
        "--modelopt-peer", action="store_true", help="with --model: also judge modelopt's default int8 recipe"
    )
    q.add_argument("--results", default=None, help="also write the report into RESULTS/quantize-<recipe>.md")
    q.add_argument(
        "--nproc-per-node", type=int, default=1, help="run on N processes of this host (torch.distributed, gloo)"
    )
    c = sub.add_parser("compare", help="re-run the FP-vs-engine comparison of an existing run")
    c.add_argument("--recipe", default=None, help=f"(default: {DEFAULT_RECIPE} in the repository)")
    c.add_argument("--runs", default="runs")
    c.add_argument("--model", default=None, help=argparse.SUPPRESS)
    e = sub.add_parser("engines", help="lint the tensorrt graph of a run; build and validate TensorRT on a GPU host")
    e.add_argument("--recipe", default=None, help=f"(default: {DEFAULT_RECIPE} in the repository)")
    e.add_argument("--runs", default="runs")
    g = sub.add_parser("bench-gpu", help="GPU latency of torch fp16, TensorRT fp16/int8/fp8 into the run's report.json")
    g.add_argument("--recipe", default=None, help=f"(default: {DEFAULT_RECIPE} in the repository)")
    g.add_argument("--runs", default="runs")
    d = sub.add_parser("distill", help="SlimFlow: distill the teacher into a small one-step student")
    d.add_argument("--recipe", default=None, help=f"(default: {DEFAULT_DISTILL_RECIPE} in the repository)")
    d.add_argument("--runs", default="runs")
    d.add_argument("--results", default=None, help="also write the report into RESULTS/distill.md")
    for p in (q, c, e, g, d):
        p.add_argument("--quiet", action="store_true", help="no progress bars")
    return parser


def _run(args: argparse.Namespace) -> int:
    progress = not args.quiet and os.environ.get("RANK", "0") == "0"  # under torchrun, rank 0 speaks
    if args.command in ("quantize", "compare"):
        from flowpress.recipe import load_recipe
        from flowpress.stages.chain import run_compare, run_quantize, summary_lines

        runs = args.runs
        if args.command == "quantize" and args.model is not None:
            from flowpress.defaults import recipe_for_model

            if args.recipe is not None:
                raise FlowpressError("--model and --recipe: give one (a recipe names its model)")
            from flowpress.context import Timer

            timer = Timer(announce=progress)
            recipe, runs, loaded = recipe_for_model(args, timer, progress)
            run_dir, report = run_quantize(recipe, runs, progress, loaded, timer)
        else:
            recipe = load_recipe(args.recipe or default_recipe())
            verb = run_quantize if args.command == "quantize" else run_compare
            run_dir, report = verb(recipe, runs, progress)
        if report is None:  # a torchrun rank other than 0: rank 0 reports
            return 0
        print(f"[flowpress] {run_dir}: report.json, report.md, samples.png, trajectory_error.png")
        for line in summary_lines(report):
            print(f"[flowpress] {line}")
        if args.command == "quantize" and args.results:
            from flowpress.results import write_quantize_result

            print(f"[flowpress] {write_quantize_result(args.results, run_dir, report)}")
        return 0 if report.passed else 1
    if args.command == "distill":
        from flowpress.recipe import load_distill_recipe
        from flowpress.stages.distill import run_distill
        from flowpress.stages.distill import summary_lines as distill_lines

        recipe_path = args.recipe or default_recipe(DEFAULT_DISTILL_RECIPE)
        distill_dir, distilled = run_distill(load_distill_recipe(recipe_path), args.runs, progress)
        if distill_dir is None:  # a non-zero torchrun rank: rank 0 writes and reports
            return 0
        print(f"[flowpress] {distill_dir}: distill.json, distill.md, distill.png; student {distilled['student']}")
        for line in distill_lines(distilled):
            print(f"[flowpress] {line}")
        if args.results:
            from flowpress.results import write_result

            body = (distill_dir / "distill.md").read_text().split("\n", 1)[1]
            print(f"[flowpress] {write_result(args.results, 'distill', 'make distill', 'flowpress distill', body)}")
        return 0 if all(b["passed"] for b in distilled["bars"].values()) else 1
    from flowpress.recipe import load_recipe
    from flowpress.stages import gpu

    recipe = load_recipe(args.recipe or default_recipe())
    if args.command == "engines":
        built = gpu.run_engines(recipe, args.runs, progress)
        for line in gpu.engines_lines(built):
            print(f"[flowpress] {line}")
        return 0 if built.passed else 1
    bench_gpu = gpu.run_bench_gpu(recipe, args.runs, progress)
    for line in gpu.bench_lines(bench_gpu):
        print(f"[flowpress] {line}")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    if getattr(args, "nproc_per_node", 1) != 1 and "WORLD_SIZE" not in os.environ:
        from flowpress.launch import launch

        rest, skip = [], False
        for arg in sys.argv[1:] if argv is None else argv:  # the ranks' own command line: without the flag
            if not skip and arg != "--nproc-per-node" and not arg.startswith("--nproc-per-node="):
                rest.append(arg)
            skip = arg == "--nproc-per-node"
        return guarded(lambda _args: launch(rest, args.nproc_per_node), args)
    return guarded(_run, args)


def guarded(run: Callable[[argparse.Namespace], int], args: argparse.Namespace) -> int:
    """`run(args)`'s exit code, or the exit code and one line on stderr for what it raised."""
    try:
        return run(args)
    except EngineParityError as err:
        print(f"flowpress: engine not faithful on this host: {err}", file=sys.stderr)
        return err.exit_code
    except FlowpressError as err:
        if isinstance(err, PeerStopped) and os.environ.get(LAUNCHED):
            return STOPPED  # another rank failed and said why (or the launcher does)
        print(f"flowpress: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("flowpress: interrupted; the run directory was not replaced", file=sys.stderr)
        return 130
    except Exception as err:  # outside a run's stages (those name theirs: rundir.reported_failures)
        from flowpress.rundir import write_error

        # a full disk or an unwritable runs directory, wherever the write was
        mapped = write_error(err, getattr(args, "runs", "the output directory")) if isinstance(err, OSError) else None
        if mapped is not None:
            print(f"flowpress: error: {mapped}", file=sys.stderr)
            return 2
        import tempfile
        import traceback

        with tempfile.NamedTemporaryFile("w", prefix="flowpress-error-", suffix=".log", delete=False) as log:
            log.write("".join(traceback.format_exception(err)))
        reason = (str(err).strip().splitlines() or [""])[0][:300]
        print(
            f"flowpress: error: {args.command} failed with {type(err).__name__} ({reason}); the traceback is in "
            f"{log.name}; report it with the command line",
            file=sys.stderr,
        )
        return 2


if __name__ == "__main__":
    sys.exit(main())
