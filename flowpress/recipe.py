"""The recipe: what `flowpress quantize` / `distill` run, as frozen dataclasses read from YAML."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from flowpress.calibration import CalibrationConfig
from flowpress.compress import Int8Config, QuantConfig, backend_of
from flowpress.compress.pairs import PairConfig
from flowpress.compress.slimflow import DistillConfig, ReflowConfig, StudentConfig
from flowpress.errors import FlowpressError
from flowpress.export import ExportConfig
from flowpress.export.openvino import OpenVinoConfig
from flowpress.extras import need
from flowpress.sampling import Schedule
from flowpress.schema import load
from flowpress.validation import GateConfig


@dataclass(frozen=True)
class ModelSection:
    """path: what diffusers saves — a pipeline directory (model_index.json) or a denoiser directory
    (UNet2DModel, UNet2DConditionModel, DiT, SD3, PixArt), or a flowpress rectified flow.
    scheduler: null = the model's own (its pipeline's scheduler; flowpress's flow sampler for
    flowpress models), 'flow', or ddim | ddpm | dpm-solver++ | euler | euler-ancestral | heun |
    pndm | flow-euler built from the model's scheduler config.  prediction_type: overrides the
    scheduler's (a bare denoiser without a scheduler config must be given it with a scheduler).
    time_scale: network timestep = t * time_scale (flowpress models: from their flowpress.json).
    resolution: the image side in pixels the run samples and its engines take (square); null = the
    model's default (its config's sample size; Flux: its VAE's).  lora: a LoRA file (.safetensors,
    as diffusers saves one) fused into the pipeline at lora_scale before calibration (the run
    quantizes the model it makes; unfused LoRA would break Q/DQ fusion); its hash is in the manifest."""

    path: str
    time_scale: float | None = None
    scheduler: str | None = None
    prediction_type: Literal["epsilon", "v_prediction", "sample", "flow"] | None = None
    resolution: int | None = None
    lora: str | None = None
    lora_scale: float = 1.0

    def __post_init__(self) -> None:
        if self.resolution is not None and self.resolution < 1:
            raise FlowpressError(f"model.resolution must be >= 1 pixel, got {self.resolution}")
        if not math.isfinite(self.lora_scale):
            raise FlowpressError(f"model.lora_scale must be a finite number, got {self.lora_scale}")


@dataclass(frozen=True)
class PromptsSection:
    """Text-conditioned models: prompt files (one per line) for calibration and for the compare
    (keep them disjoint); null = flowpress's default lists.  Class and unconditional models ignore it."""

    calibration: str | None = None
    compare: str | None = None


@dataclass(frozen=True)
class SamplingSection:
    steps: int = 20
    method: Literal["euler", "heun"] = "euler"
    guidance: float = 1.0

    def __post_init__(self) -> None:
        Schedule(self.steps, self.method)  # checks steps and method
        if not self.guidance >= 0:
            raise FlowpressError(
                f"sampling.guidance must be >= 0 (1 = no classifier-free guidance), got {self.guidance}"
            )


@dataclass(frozen=True)
class CompareSection:
    """peers: other tools' recipes judged on the same model, schedule and seeds (flowpress/stages/peers.py):
    'module.path:function' plug-ins, or 'modelopt' — modelopt's default int8 recipe
    (INT8_DEFAULT_CFG, calibrated by running the whole sampler on 32 seeds, as its diffusers example
    does; fake-quant in torch, as a TensorRT GPU would run it exactly); modelopt_peer: true names it."""

    n_samples: int = 500
    seed_base: int = 0
    batch_size: int = 50
    latency_runs: int = 20
    modelopt_peer: bool = False
    peers: tuple[str, ...] = ()


@dataclass(frozen=True)
class EvaluatorSection:
    """name: 'module.path:Class' of an Evaluator (flowpress.engines.Evaluator), built with
    `options` as keyword arguments; none = the core metrics only (PSNR, SSIM, error per step)."""

    name: str | None = None
    options: dict[str, Any] = field(default_factory=dict)


@dataclass(frozen=True)
class EngineSection:
    """runtime: the engine compare and gate judge — 'onnxruntime' (the Q/DQ graph) or
    'openvino' (IR from the prepared FP graph; NNCF int8 on the calibration set, or bf16/f32).
    candidates: also build the other CPU engines (OpenVINO int8 and bf16), judge each on the
    same seeds and gate, and recommend the one to ship in the report.
    portable: int8 engines exact on every x86 host — 7-bit weights in onnxruntime, NNCF's
    overflow fix in OpenVINO (engines/isa.py says why); null (default) = portable exactly where
    this host's int8 kernels would saturate 8-bit weights (x86 without VNNI).
    portable_weights: how the portable onnxruntime engine stays exact — '7-bit' weights (u8 x s8
    kernels, the fastest) or 'u8u8': the 8-bit weights stored as uint8, which onnxruntime
    multiplies with its U8U8 kernels (the 8-bit form's fidelity; slower integer kernels on hosts
    without VNNI, docs/engines.md)."""

    runtime: Literal["onnxruntime", "openvino"] = "onnxruntime"
    openvino: OpenVinoConfig = field(default_factory=OpenVinoConfig)
    candidates: bool = True
    portable: bool | None = None
    portable_weights: Literal["7-bit", "u8u8"] = "7-bit"


@dataclass(frozen=True)
class Recipe:
    name: str
    model: ModelSection
    sampling: SamplingSection = field(default_factory=SamplingSection)
    calibration: CalibrationConfig = field(default_factory=CalibrationConfig)
    quantize: QuantConfig = field(default_factory=Int8Config)
    export: ExportConfig = field(default_factory=ExportConfig)
    engine: EngineSection = field(default_factory=EngineSection)
    compare: CompareSection = field(default_factory=CompareSection)
    gate: GateConfig = field(default_factory=GateConfig)
    evaluator: EvaluatorSection = field(default_factory=EvaluatorSection)
    prompts: PromptsSection = field(default_factory=PromptsSection)

    def __post_init__(self) -> None:
        backend = backend_of(self.quantize)
        if self.export.flavour not in backend.flavours:
            raise FlowpressError(
                f"export.flavour is {self.export.flavour!r} but {backend.name} Q/DQ is written in the "
                f"{' / '.join(backend.flavours)} flavour: set export.flavour: {backend.flavour}"
            )
        if self.engine.runtime not in backend.runtimes:
            raise FlowpressError(
                f"engine.runtime is {self.engine.runtime!r}; {backend.name} engines run in "
                f"{' / '.join(backend.runtimes)}: set engine.runtime: {backend.runtimes[0]}"
            )
        mixed = getattr(self.quantize, "mixed_precision", None)
        if mixed is not None and mixed.enabled and self.engine.runtime != "onnxruntime":
            raise FlowpressError(
                f"{self.name}: quantize.mixed_precision needs engine.runtime 'onnxruntime' (OpenVINO int8 engines "
                "are quantized by NNCF, not from flowpress's layers); disable one of them"
            )


@dataclass(frozen=True)
class EvalSection:
    """Samples per model for the evaluator's metrics (seeds seed_base.., classes cycling) and
    latency: median wall time of a whole sampling call at batch 8 over latency_runs, per image."""

    n_samples: int = 500
    seed_base: int = 0
    batch_size: int = 250
    latency_runs: int = 10


@dataclass(frozen=True)
class DistillBars:
    """What the distillation run is held to besides student.max_param_fraction: the one-step
    student at least min_speedup times the teacher's images per second, and better than the
    baseline (same pairs and budget) on each evaluator metric named in beat_baseline_on."""

    min_speedup: float = 10.0
    beat_baseline_on: tuple[str, ...] = ()


@dataclass(frozen=True)
class DistillRecipe:
    """`flowpress distill`: teacher -> reflow pairs -> annealing reflow -> flow-guided distillation,
    plus the 2-rectified-flow + plain-distillation baseline on the same pairs and budget.
    sampling: how the teacher is evaluated (its default steps and guidance)."""

    name: str
    teacher: ModelSection
    student: StudentConfig
    sampling: SamplingSection = field(default_factory=lambda: SamplingSection(steps=20, guidance=2.0))
    pairs: PairConfig = field(default_factory=PairConfig)
    reflow: ReflowConfig = field(default_factory=ReflowConfig)
    distill: DistillConfig = field(default_factory=DistillConfig)
    eval: EvalSection = field(default_factory=EvalSection)
    evaluator: EvaluatorSection = field(default_factory=EvaluatorSection)
    bars: DistillBars = field(default_factory=DistillBars)


def need_extras(engine: EngineSection, quantize: QuantConfig) -> None:
    """Before any work: the extras a run needs — its precision's (the backend's: [lowbit] for
    w4a8), and [openvino] when its engines include OpenVINO (engine.runtime: openvino, or
    engine.candidates, on by default, which builds OpenVINO int8 and bf16 beside onnxruntime)."""
    backend = backend_of(quantize)
    if backend.extra is not None:
        need(backend.extra[0], backend.extra[1], f"quantize.precision: {backend.name}")
    instead: str | None = None
    if engine.runtime == "openvino":
        what, int8 = "engine.runtime: openvino", engine.openvino.precision == "int8" or engine.candidates
    elif engine.candidates:
        what, int8 = "engine.candidates (the OpenVINO candidate engines)", True
        instead = "set engine.candidates: false (--no-openvino with --model) for the onnxruntime engine alone"
    else:
        return
    need("openvino", "openvino", what, instead)
    if int8:
        need("nncf", "openvino", f"{what} (NNCF's int8)", instead)


def load_recipe(path: str | Path) -> Recipe:
    recipe: Recipe = load(Recipe, path)
    return recipe


def load_distill_recipe(path: str | Path) -> DistillRecipe:
    recipe: DistillRecipe = load(DistillRecipe, path)
    return recipe
