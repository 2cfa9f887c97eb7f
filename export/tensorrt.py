"""Build a TensorRT plan from a tensorrt-flavour Q/DQ ONNX graph (TensorRT 10 Python API).

Written against TensorRT 10's documented API; `import tensorrt` happens only inside the
functions that need it, so CPU machines never trip on it.  The network is strongly typed:
the graph's Q/DQ nodes and dtypes decide every layer's precision (int8, or fp8 E4M3 on
compute capability >= 8.9), nothing is left to the builder's precision heuristics.
"""

from __future__ import annotations

import importlib.util
import json
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

from flowpress.errors import FlowpressError
from flowpress.export.graphfile import read_graph
from flowpress.export.lint import QDQ_OPS, BatchProfile, check_tensorrt, uses_fp8
from flowpress.files import sha256_file, staged_file
from flowpress.sampling import Sampler

Precision = Literal["qdq", "fp16"]
FP8_MIN_CAPABILITY = (8, 9)  # Ada / Hopper and newer have fp8 tensor cores
INSTALL_HINT = "pip install -e '.[gpu]' on a GPU host"


@dataclass(frozen=True)
class TensorRTConfig:
    """How to build one plan.

    precision: 'qdq' builds a strongly typed network (Q/DQ decide; the engine we ship);
    'fp16' builds a weakly typed network with BuilderFlag.FP16 from an FP graph (the fp16
    baseline of `bench-gpu`).  timing_cache: file reused across builds (loaded when present,
    saved after every build); None disables it.
    """

    profile: BatchProfile = field(default_factory=BatchProfile)
    precision: Precision = "qdq"
    optimization_level: int = 3
    workspace_mib: int = 2048
    timing_cache: str | None = None

    def __post_init__(self) -> None:
        if self.precision not in ("qdq", "fp16"):
            raise FlowpressError(f"tensorrt: precision must be 'qdq' or 'fp16', got {self.precision!r}")
        if not 0 <= self.optimization_level <= 5:
            raise FlowpressError(f"tensorrt: optimization_level must be 0..5, got {self.optimization_level}")
        if self.workspace_mib < 1:
            raise FlowpressError(f"tensorrt: workspace_mib must be >= 1, got {self.workspace_mib}")


@dataclass(frozen=True)
class GpuIdentity:
    """What a plan is bound to: TensorRT plans run only on the GPU model and TensorRT version that built them."""

    name: str
    compute_capability: tuple[int, int]
    tensorrt: str

    def as_dict(self) -> dict[str, Any]:
        major, minor = self.compute_capability
        return {"name": self.name, "compute_capability": f"{major}.{minor}", "tensorrt": self.tensorrt}


@dataclass(frozen=True)
class EngineBuild:
    """A written plan: `plan` (serialized engine), `manifest` (its JSON beside it), build time."""

    plan: Path
    manifest_path: Path
    manifest: dict[str, Any]
    seconds: float


def tensorrt_unavailable() -> str | None:
    """Why TensorRT cannot run here (one line), or None when the module and a CUDA GPU are present."""
    if importlib.util.find_spec("tensorrt") is None:
        return f"the tensorrt module is not installed ({INSTALL_HINT})"
    import torch

    if not torch.cuda.is_available():
        return "no CUDA GPU visible to torch"
    try:
        import tensorrt  # noqa: F401
    except Exception as err:  # a broken install (missing libnvinfer) raises OSError / ImportError
        return f"import tensorrt failed ({type(err).__name__}: {err})".splitlines()[0]
    return None


def current_gpu() -> GpuIdentity:
    """The GPU torch sees as current device, and the installed TensorRT version."""
    import tensorrt as trt
    import torch

    device = torch.cuda.current_device()
    major, minor = torch.cuda.get_device_capability(device)
    return GpuIdentity(torch.cuda.get_device_name(device), (int(major), int(minor)), str(trt.__version__))


def manifest_path(plan: str | Path) -> Path:
    """The engine manifest beside a plan: runs/<name>/engine/tensorrt/model.plan -> model.json."""
    return Path(plan).with_suffix(".json")


def _write_atomic(path: Path, data: Any) -> None:
    """Write bytes (or any buffer) to `path` through a temporary sibling and a rename."""
    with staged_file(path) as tmp, open(tmp, "wb") as handle:
        handle.write(data)


def _attach_timing_cache(trt: Any, builder_config: Any, path: Path | None) -> Any:
    """Load the timing cache from `path` when present (else start empty) and attach it."""
    data = path.read_bytes() if path is not None and path.is_file() else b""
    cache = builder_config.create_timing_cache(data)
    if not builder_config.set_timing_cache(cache, ignore_mismatch=False):
        # written by another GPU or TensorRT version: start a fresh one rather than mix tactics
        cache = builder_config.create_timing_cache(b"")
        builder_config.set_timing_cache(cache, ignore_mismatch=False)
    return cache


def _network(trt: Any, builder: Any, logger: Any, onnx_path: Path, precision: Precision) -> tuple[Any, Any]:
    """(network, parser) from the ONNX file; the parser must stay alive until the build is done."""
    strongly_typed = 1 << int(trt.NetworkDefinitionCreationFlag.STRONGLY_TYPED)
    network = builder.create_network(strongly_typed if precision == "qdq" else 0)
    parser = trt.OnnxParser(network, logger)
    parser.set_flag(trt.OnnxParserFlag.NATIVE_INSTANCENORM)  # GroupNorm exports as InstanceNormalization
    if not parser.parse_from_file(str(onnx_path)):
        errors = [parser.get_error(i).desc() for i in range(parser.num_errors)]
        first = errors[0] if errors else "no error reported"
        raise FlowpressError(
            f"{onnx_path}: TensorRT's ONNX parser failed ({len(errors)} error(s)); first: {first}".replace("\n", " ")
        )
    return network, parser


def _profile(builder: Any, network: Any, profile: BatchProfile) -> Any:
    """One optimization profile: each input's dim 0 spans min..max; every other dim is static (linted)."""
    shapes = builder.create_optimization_profile()
    for index in range(network.num_inputs):
        tensor = network.get_input(index)
        rest = tuple(int(d) for d in tuple(tensor.shape)[1:])
        shapes.set_shape(tensor.name, (profile.min, *rest), (profile.opt, *rest), (profile.max, *rest))
    return shapes


def _precision(proto: Any, precision: Precision, fp8: bool) -> str:
    """What the plan computes in: the Q/DQ type of a strongly typed graph, or the builder flag."""
    if precision == "fp16":
        return "fp16"
    if fp8:
        return "fp8"
    return "int8" if any(n.op_type in QDQ_OPS for n in proto.graph.node) else "fp32"


def plan_manifest(
    plan_path: Path, onnx_path: Path, precision: str, gpu: GpuIdentity, schedule: Sampler, config: TensorRTConfig
) -> dict[str, Any]:
    """What a plan was built from and for; engines.tensorrt.check_manifest refuses a plan whose GPU,
    TensorRT or schedule (the run's own sampler, whatever its scheduler) differs from the caller's."""
    return {
        "runtime": "tensorrt",
        "plan": plan_path.name,
        "plan_sha256": sha256_file(plan_path),
        "precision": precision,
        "strongly_typed": config.precision == "qdq",
        "tensorrt": gpu.tensorrt,
        "gpu": {"name": gpu.name, "compute_capability": gpu.as_dict()["compute_capability"]},
        "profile": config.profile.as_dict(),
        "optimization_level": config.optimization_level,
        "workspace_mib": config.workspace_mib,
        "schedule": schedule.as_dict(),
        "source": onnx_path.name,
        "onnx_sha256": sha256_file(onnx_path),
    }


def build_engine(
    onnx_path: str | Path,
    plan_path: str | Path,
    schedule: Sampler,
    config: TensorRTConfig = TensorRTConfig(),
    calibration_sha256: str | None = None,
) -> EngineBuild:
    """Lint, parse and build `onnx_path` into `plan_path` (+ manifest JSON beside it), both atomically."""
    import tensorrt as trt

    onnx_path, plan_path = Path(onnx_path), Path(plan_path)
    if not onnx_path.is_file():
        raise FlowpressError(f"{onnx_path}: ONNX file missing; run `make quantize` first")
    proto = read_graph(onnx_path).proto  # weights stay on disk; TensorRT's parser reads the file
    check_tensorrt(proto, config.profile, where=str(onnx_path))
    gpu = current_gpu()
    fp8 = uses_fp8(proto)
    if fp8 and gpu.compute_capability < FP8_MIN_CAPABILITY:
        raise FlowpressError(
            f"{onnx_path}: fp8 Q/DQ needs compute capability >= 8.9; {gpu.name} has "
            f"{gpu.as_dict()['compute_capability']}; build the int8 graph instead"
        )
    start = time.perf_counter()
    logger = trt.Logger(trt.Logger.WARNING)
    builder = trt.Builder(logger)
    network, _parser = _network(trt, builder, logger, onnx_path, config.precision)
    builder_config = builder.create_builder_config()
    builder_config.set_memory_pool_limit(trt.MemoryPoolType.WORKSPACE, config.workspace_mib << 20)
    builder_config.builder_optimization_level = config.optimization_level
    if config.precision == "fp16":
        builder_config.set_flag(trt.BuilderFlag.FP16)
    builder_config.add_optimization_profile(_profile(builder, network, config.profile))
    cache_path = Path(config.timing_cache) if config.timing_cache else None
    _attach_timing_cache(trt, builder_config, cache_path)
    serialized = builder.build_serialized_network(network, builder_config)
    if serialized is None:
        raise FlowpressError(
            f"{onnx_path}: TensorRT returned no engine (see the builder log above); "
            f"try a larger workspace than {config.workspace_mib} MiB or a smaller max batch than {config.profile.max}"
        )
    plan_path.parent.mkdir(parents=True, exist_ok=True)
    if cache_path is not None:
        cache_path.parent.mkdir(parents=True, exist_ok=True)
        _write_atomic(cache_path, builder_config.get_timing_cache().serialize())
    _write_atomic(plan_path, serialized)
    seconds = round(time.perf_counter() - start, 3)
    manifest = plan_manifest(plan_path, onnx_path, _precision(proto, config.precision, fp8), gpu, schedule, config)
    manifest |= {"calibration_sha256": calibration_sha256, "build_seconds": seconds}
    path = manifest_path(plan_path)
    _write_atomic(path, (json.dumps(manifest, indent=2) + "\n").encode())
    return EngineBuild(plan_path, path, manifest, seconds)
