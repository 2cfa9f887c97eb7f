"""Recipe schema: YAML -> frozen dataclasses, strict (unknown keys and wrong types are errors)."""

from __future__ import annotations

import dataclasses
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from calibration import CalibrationConfig
from compress import QuantConfig
from compress.distill import DistillConfig, PairConfig, ReflowConfig, StudentConfig
from engines import GateConfig
from export import ExportConfig
from export.openvino import OpenVinoConfig
from models.teacher import TeacherConfig
from sampling import FlowpressError, Schedule


@dataclass(frozen=True)
class ModelSection:
    """path: a diffusers UNet2DModel directory; teacher_recipe: trains it there when missing."""

    path: str
    time_scale: float | None = None
    teacher_recipe: str | None = None


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

    def schedule(self) -> Schedule:
        return Schedule(self.steps, self.method)


@dataclass(frozen=True)
class CompareSection:
    n_samples: int = 500
    seed_base: int = 0
    batch_size: int = 50
    latency_runs: int = 20


@dataclass(frozen=True)
class ClassifierSection:
    path: str = "checkpoints/digits-classifier"


@dataclass(frozen=True)
class EngineSection:
    """runtime: the engine compare and gate judge — 'onnxruntime' (the ort-cpu Q/DQ graph) or
    'openvino' (IR from the prepared FP graph; NNCF int8 on the calibration set, or bf16/f32).
    candidates: also build the other CPU engines (OpenVINO int8 and bf16), judge each on the
    same seeds and gate, and recommend the one to ship in the report.
    portable: int8 engines exact on every x86 host — 7-bit weights in onnxruntime, NNCF's
    overflow fix in OpenVINO (engines/isa.py says why); null (default) = portable exactly where
    this host's int8 kernels would saturate 8-bit weights (x86 without VNNI)."""

    runtime: Literal["onnxruntime", "openvino"] = "onnxruntime"
    openvino: OpenVinoConfig = field(default_factory=OpenVinoConfig)
    candidates: bool = True
    portable: bool | None = None


@dataclass(frozen=True)
class Recipe:
    name: str
    model: ModelSection
    sampling: SamplingSection = field(default_factory=SamplingSection)
    calibration: CalibrationConfig = field(default_factory=CalibrationConfig)
    quantize: QuantConfig = field(default_factory=QuantConfig)
    export: ExportConfig = field(default_factory=ExportConfig)
    engine: EngineSection = field(default_factory=EngineSection)
    compare: CompareSection = field(default_factory=CompareSection)
    gate: GateConfig = field(default_factory=GateConfig)
    classifier: ClassifierSection = field(default_factory=ClassifierSection)

    def __post_init__(self) -> None:
        if self.quantize.precision == "fp8":
            if self.export.flavour != "tensorrt":
                raise FlowpressError(
                    f"export.flavour is {self.export.flavour!r} but fp8 Q/DQ is symmetric E4M3: set export.flavour: tensorrt"
                )
            if self.engine.runtime != "onnxruntime":
                raise FlowpressError(
                    f"engine.runtime is {self.engine.runtime!r}; fp8 engines run in onnxruntime: set engine.runtime: onnxruntime"
                )


@dataclass(frozen=True)
class TeacherRecipe:
    name: str
    teacher: TeacherConfig = field(default_factory=TeacherConfig)
    classifier: ClassifierSection = field(default_factory=ClassifierSection)


@dataclass(frozen=True)
class EvalSection:
    """Samples per model for classifier accuracy / FD (seeds seed_base.., labels cycling 0..9) and
    latency: median wall time of a whole sampling call at batch 8 over latency_runs, per image."""

    n_samples: int = 500
    seed_base: int = 0
    batch_size: int = 250
    latency_runs: int = 10


@dataclass(frozen=True)
class DistillRecipe:
    """`flowpress distill`: teacher -> reflow pairs -> annealing reflow -> flow-guided distillation,
    plus the 2-rectified-flow + plain-distillation baseline on the same pairs and budget.
    sampling: how the teacher is evaluated (its default steps and guidance)."""

    name: str
    teacher: ModelSection
    sampling: SamplingSection = field(default_factory=lambda: SamplingSection(steps=20, guidance=2.0))
    pairs: PairConfig = field(default_factory=PairConfig)
    student: StudentConfig = field(default_factory=StudentConfig)
    reflow: ReflowConfig = field(default_factory=ReflowConfig)
    distill: DistillConfig = field(default_factory=DistillConfig)
    eval: EvalSection = field(default_factory=EvalSection)
    classifier: ClassifierSection = field(default_factory=ClassifierSection)


def _type_name(tp: Any) -> str:
    return getattr(tp, "__name__", None) or str(tp).replace("typing.", "")


def _coerce(value: Any, tp: Any, where: str) -> Any:
    """Check `value` against the annotation `tp`; return it converted (lists -> tuples)."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in (a for a in args if a is not type(None)):
            try:
                return _coerce(value, arg, where)
            except FlowpressError as err:
                errors.append(str(err))
        raise FlowpressError(errors[0] if errors else f"{where}: unexpected value {value!r}")
    if origin is Literal:
        if value not in args:
            raise FlowpressError(f"{where}: must be one of {', '.join(repr(a) for a in args)}, got {value!r}")
        return value
    if origin is tuple:
        if not isinstance(value, list | tuple):
            raise FlowpressError(f"{where}: must be a list, got {type(value).__name__} {value!r}")
        return tuple(_coerce(v, args[0], f"{where}[{i}]") for i, v in enumerate(value))
    if dataclasses.is_dataclass(tp):
        return from_dict(tp, value, where)
    if tp is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if tp in (int, float, str, bool) and (not isinstance(value, tp) or (tp is not bool and isinstance(value, bool))):
        raise FlowpressError(f"{where}: must be {_type_name(tp)}, got {type(value).__name__} {value!r}")
    return value


def from_dict(cls: Any, data: Any, where: str) -> Any:
    """Build dataclass `cls` from a mapping; unknown keys and wrong types raise FlowpressError."""
    if not isinstance(data, dict):
        raise FlowpressError(f"{where}: must be a mapping, got {type(data).__name__}")
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    unknown = sorted(set(data) - set(fields))
    if unknown:
        raise FlowpressError(f"{where}: unknown key {unknown[0]!r}; known keys: {', '.join(fields)}")
    kwargs = {}
    for name, f in fields.items():
        key = f"{where}.{name}"
        if name in data:
            kwargs[name] = _coerce(data[name], hints[name], key)
        elif f.default is dataclasses.MISSING and f.default_factory is dataclasses.MISSING:
            raise FlowpressError(f"{key}: required key is missing")
    try:
        return cls(**kwargs)
    except FlowpressError as err:
        raise FlowpressError(f"{where}: {err}") from None


def load_yaml(path: str | Path) -> dict[str, Any]:
    import yaml

    path = Path(path)
    if not path.is_file():
        raise FlowpressError(f"{path}: recipe not found; pass an existing file (see recipes/)")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as err:
        mark = getattr(err, "problem_mark", None)
        line = f" at line {mark.line + 1}" if mark is not None else ""
        raise FlowpressError(f"{path}: not valid YAML{line}") from None
    if not isinstance(data, dict):
        raise FlowpressError(f"{path}: a recipe must be a YAML mapping")
    return data


def load_recipe(path: str | Path) -> Recipe:
    return from_dict(Recipe, load_yaml(path), str(path))


def load_teacher_recipe(path: str | Path) -> TeacherRecipe:
    return from_dict(TeacherRecipe, load_yaml(path), str(path))


def load_distill_recipe(path: str | Path) -> DistillRecipe:
    return from_dict(DistillRecipe, load_yaml(path), str(path))


def to_dict(obj: Any) -> Any:
    """Dataclass -> plain JSON-able dict (tuples become lists)."""
    if dataclasses.is_dataclass(obj) and not isinstance(obj, type):
        return {f.name: to_dict(getattr(obj, f.name)) for f in dataclasses.fields(obj)}
    if isinstance(obj, tuple | list):
        return [to_dict(v) for v in obj]
    return obj
