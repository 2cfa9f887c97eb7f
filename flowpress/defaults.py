"""`flowpress quantize --model PATH`: a recipe from the model's own config, for a first try."""

from __future__ import annotations

import argparse
from dataclasses import replace
from pathlib import Path

from flowpress.calibration import CalibrationConfig
from flowpress.compress import PRECISIONS, backend_named
from flowpress.context import Timer
from flowpress.errors import FlowpressError
from flowpress.export import ExportConfig
from flowpress.models import LoadedModel, load_source
from flowpress.plan import check_memory, plan_memory
from flowpress.recipe import (
    CompareSection,
    EngineSection,
    ModelSection,
    PromptsSection,
    Recipe,
    SamplingSection,
    need_extras,
)

# classifier-free guidance the pipelines of each conditioning use by default
# (a guidance-distilled Flux takes its scale as an input: no classifier-free guidance)
GUIDANCE = {"text": 7.5, "class": 4.0, "none": 1.0, "flow": 2.0, "distilled": 1.0}


def _resolution(height: int | None, width: int | None) -> int | None:
    """The square image side --height / --width ask for (one alone is the other too)."""
    if height is not None and width is not None and height != width:
        raise FlowpressError(
            f"--height {height} --width {width}: non-square images are not supported yet; give one side for both"
        )
    side = height if height is not None else width
    if side is not None and side < 1:
        raise FlowpressError(f"--height / --width {side}: give the image side in pixels, >= 1")
    return side


def recipe_for_model(args: argparse.Namespace, timer: Timer, progress: bool = True) -> tuple[Recipe, Path, LoadedModel]:
    """(recipe, runs root, the loaded model) for --model and its options (the model loaded in
    `timer`'s 'load' stage, after its memory plan is checked, printed when `progress`); the run is
    --out (default runs/<folder>)."""
    path = Path(args.model)
    if not path.exists():
        raise FlowpressError(f"--model {path}: no such directory; give a diffusers pipeline or denoiser directory")
    backend = backend_named(args.precision or "int8")
    need_extras(EngineSection(candidates=not args.no_openvino), backend.config())  # before the load
    plan = plan_memory(path, openvino=not args.no_openvino)
    if progress:
        print(f"[flowpress] {plan.line()}", flush=True)
    check_memory(plan, path)  # before the first load
    resolution = _resolution(args.height, args.width)
    with timer.stage("load"):
        source = load_source(path, None, args.scheduler, args.prediction_type, resolution, args.lora, args.lora_scale)
    denoiser = source.denoiser
    kind = "text" if denoiser.text_conditioned else "class" if denoiser.num_classes else "none"
    if denoiser.architecture == "flux":
        kind = "distilled"
    if source.kind.startswith("flowpress"):
        kind = "flow" if denoiser.num_classes else "none"
    out = Path(args.out) if args.out else Path(args.runs) / path.resolve().name
    quantize = PRECISIONS[backend.name]()
    if denoiser.architecture in ("unet", "unet-cond") and not source.kind.startswith("flowpress"):
        quantize = replace(quantize, exclude=backend.first_try_float_layers)  # scheduler-driven UNets
    export = ExportConfig(flavour=backend.flavour, opset=backend.opset)
    guidance = args.guidance if args.guidance is not None else GUIDANCE[kind]
    samples = args.samples if args.samples is not None else 100
    calibration = args.calibration_samples if args.calibration_samples is not None else 32
    recipe = Recipe(
        name=out.name,
        model=ModelSection(
            str(path),
            scheduler=args.scheduler,
            prediction_type=args.prediction_type,
            resolution=resolution,
            lora=args.lora,
            lora_scale=args.lora_scale,
        ),  # fmt: skip
        sampling=SamplingSection(steps=args.steps if args.steps is not None else 20, guidance=guidance),
        calibration=CalibrationConfig(
            n_samples=calibration, batch_size=min(calibration, 16) if args.batch is None else args.batch
        ),
        quantize=quantize,
        export=export,
        engine=EngineSection(candidates=not args.no_openvino),
        compare=CompareSection(
            n_samples=samples,
            batch_size=min(samples, 25) if args.batch is None else args.batch,
            latency_runs=10,
            modelopt_peer=args.modelopt_peer,
        ),
        prompts=PromptsSection(calibration=args.prompts),
    )
    return recipe, out.parent, source
