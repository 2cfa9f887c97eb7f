"""`flowpress bench`: every CPU engine flowpress builds beside what a user would build by hand.

Per model, the variants share one FP model, one sampler and one set of seeds.  Peers are the
hand-built engines (torch, onnxruntime fp32, onnxruntime quantize_static, OpenVINO's default,
NNCF's default preset fed random-step inputs); flowpress's variants use its trajectory
calibration set and temporal tables, and are built as `make quantize` builds them on this host
(portable int8 weights where its int8 kernels saturate: engines/isa.py).  Every row says how fast (per step, whole loop) and how
faithful (final PSNR against the FP trajectory from the same seeds) one engine is.
"""

from __future__ import annotations

import dataclasses
import gc
import json
import shutil
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor

from calibration import CalibrationSet, capture
from compress import PORTABLE_WEIGHT_BITS, QuantizedModel, quantize, set_weight_bits, weight_bits_of
from engines import (
    Engine,
    EngineVelocity,
    OrtEngine,
    TorchEngine,
    interleaved_step_times,
    psnr_db,
    step_times_ms,
)
from engines.base import graph_feeds
from engines.isa import ISA_ENV, HostIsa, host_isa
from engines.openvino import OpenVinoEngine
from engines.portability import host_record, resolve_portable
from export import export_onnx, ort_session
from export.openvino import OpenVinoConfig, export_openvino, overflow_fix
from export.validate import build_ort_engine
from flowpress.ablate import fp_reference, ort_quantize_static, sample_engine
from flowpress.pipeline import ensure_model, export_checked
from flowpress.recipe import Recipe, from_dict, load_recipe, load_yaml, to_dict
from flowpress.rundir import run_lock, staged_run
from models import DiffusersVelocity
from sampling import FlowpressError, Schedule, sample

# operators bench.md counts in each onnxruntime engine: integer vs float compute, and Q/DQ left
GRAPH_OPS = (
    "QLinearConv",
    "MatMulIntegerToFloat",
    "QLinearMatMul",
    "QGemm",
    "Conv",
    "FusedConv",
    "MatMul",
    "FusedMatMul",
    "Gemm",
    "QuantizeLinear",
    "DequantizeLinear",
    "DQ->Q",
)
PEERS = ("torch-fp32", "ort-fp32", "ort-quantize-static", "ov-bf16", "ov-nncf-default")
OURS = ("flowpress-ort-int8", "flowpress-ov-int8", "flowpress-ov-bf16", "flowpress-fp8", "flowpress-w4a8", "student")
# a different (one-step) network: its rows show what distillation buys, not what an engine of the
# same network runs at, so it is left out of the per-step int8-peak bar
NOT_THE_SAME_NETWORK = ("student",)
# which matrix-multiply peak a variant's arithmetic runs against
ARITHMETIC = {
    "torch-fp32": "fp32",
    "ort-fp32": "fp32",
    "ort-quantize-static": "int8",
    "ov-bf16": "bf16",
    "ov-nncf-default": "int8",
    "flowpress-ort-int8": "int8",
    "flowpress-ov-int8": "int8",
    "flowpress-ov-bf16": "bf16",
    "flowpress-fp8": "fp32",  # emulated on CPU: fp8 Q/DQ around float Conv / MatMul
    "flowpress-w4a8": "fp32",  # int4 weights dequantized into float Conv / MatMul on CPU
    "student": "int8",
}


@dataclass(frozen=True)
class RandomDit:
    """A DiTTransformer2DModel with seeded random weights: speed needs no training."""

    layers: int = 10
    heads: int = 6
    head_dim: int = 64
    channels: int = 4
    sample_size: int = 32
    patch_size: int = 2
    num_classes: int = 10
    seed: int = 0


@dataclass(frozen=True)
class BenchModel:
    """recipe: sampler, calibration and quantization settings (and the model, unless random_dit);
    steps / guidance override the recipe's; n_samples: seeds for final PSNR."""

    name: str
    recipe: str
    random_dit: RandomDit | None = None
    steps: int | None = None
    guidance: float | None = None
    n_samples: int = 500
    fp8_recipe: str | None = None  # flowpress-fp8 / flowpress-w4a8 quantize with these recipes'
    w4a8_recipe: str | None = None  # settings; a model without one has no such row
    student_recipe: str | None = None  # the distilled student of this model (its own sampler)

    def __post_init__(self) -> None:
        for key, precision in (("fp8_recipe", "fp8"), ("w4a8_recipe", "w4a8")):
            path = getattr(self, key)
            found = load_recipe(path).quantize.precision if path else precision
            if found != precision:
                raise FlowpressError(
                    f"bench model {self.name}: {key} {path} quantizes to {found}, not {precision}; "
                    f"name a {precision} recipe (e.g. recipes/digits-unet-{precision}.yaml)"
                )


@dataclass(frozen=True)
class Int8PeakBar:
    """The fastest flowpress engine of `model` (same network: not the student) runs its forward
    at >= `min` of this host's int8 GEMM peak (GOP/s); null model: no such bar."""

    model: str | None = "speed-dit"
    min: float = 0.75

    def __post_init__(self) -> None:
        if not 0 < self.min <= 1:
            raise FlowpressError(f"bars.int8_peak_fraction.min must be in (0, 1], got {self.min}")


@dataclass(frozen=True)
class OvInt8VsNncfBar:
    """flowpress-ov-int8 against ov-nncf-default: speed ratio and final PSNR gain at least these."""

    min_speedup: float = 1.0
    min_psnr_gain_db: float = 1.0

    def __post_init__(self) -> None:
        if not self.min_speedup > 0:
            raise FlowpressError(f"bars.ov_int8_vs_nncf.min_speedup must be > 0, got {self.min_speedup}")


@dataclass(frozen=True)
class OrtInt8VsStaticBar:
    """flowpress-ort-int8 against ort-quantize-static: speed ratio and final PSNR gain at least these."""

    min_speedup: float = 1.1
    min_psnr_gain_db: float = 0.0

    def __post_init__(self) -> None:
        if not self.min_speedup > 0:
            raise FlowpressError(f"bars.ort_int8_vs_quantize_static.min_speedup must be > 0, got {self.min_speedup}")


@dataclass(frozen=True)
class BenchBars:
    """The bench's bars (batch 8, ms_per_step_median: the median of the passes' medians)."""

    int8_peak_fraction: Int8PeakBar = field(default_factory=Int8PeakBar)
    ov_int8_vs_nncf: OvInt8VsNncfBar = field(default_factory=OvInt8VsNncfBar)
    ort_int8_vs_quantize_static: OrtInt8VsStaticBar = field(default_factory=OrtInt8VsStaticBar)


@dataclass(frozen=True)
class BenchConfig:
    name: str = "bench"
    models: tuple[BenchModel, ...] = ()
    variants: tuple[str, ...] = PEERS + OURS
    batches: tuple[int, ...] = (1, 8)
    runs: int = 30  # timed forwards per cell per pass
    passes: int = 3  # interleaved timing passes per batch; a row's median is the median of theirs
    warmup: int = 5
    block: int = 10  # timed forwards per engine per interleaved round
    settle: int = 3  # untimed forwards per engine before its block (and before each timed loop)
    loops: int = 3
    threads: int = 2
    sample_batch: int = 50
    profile_runs: int = 10
    bars: BenchBars = field(default_factory=BenchBars)

    def __post_init__(self) -> None:
        unknown = sorted(set(self.variants) - set(PEERS + OURS))
        if unknown:
            raise FlowpressError(f"bench.variants: unknown {unknown[0]!r}; known: {', '.join(PEERS + OURS)}")
        if not self.models:
            raise FlowpressError("bench.models: list at least one model (name, recipe)")
        if self.runs < 30:
            raise FlowpressError(f"bench.runs must be >= 30 for a stable p90, got {self.runs}")
        if not self.batches or min(self.batches) < 1:
            raise FlowpressError(f"bench.batches must list batch sizes >= 1, got {list(self.batches)}")
        for key in ("passes", "warmup", "block", "settle", "loops", "threads", "sample_batch", "profile_runs"):
            if getattr(self, key) < (0 if key == "warmup" else 1):
                raise FlowpressError(f"bench.{key} must be >= {0 if key == 'warmup' else 1}, got {getattr(self, key)}")
        names = [m.name for m in self.models]
        peak_model = self.bars.int8_peak_fraction.model
        if peak_model is not None and peak_model not in names:
            raise FlowpressError(
                f"bench.bars.int8_peak_fraction.model: {peak_model!r} is not a bench model; "
                f"name one of {', '.join(names)} or null"
            )


@dataclass
class Built:
    """One variant's engine and the files it ships as."""

    engine: Engine
    files: list[Path] = field(default_factory=list)
    guidance: float | None = None  # None: the model's; a student samples with its own


def build_random_dit(spec: RandomDit) -> DiffusersVelocity:
    from diffusers import DiTTransformer2DModel

    torch.manual_seed(spec.seed)
    net = DiTTransformer2DModel(
        num_attention_heads=spec.heads,
        attention_head_dim=spec.head_dim,
        in_channels=spec.channels,
        out_channels=spec.channels,
        num_layers=spec.layers,
        sample_size=spec.sample_size,
        patch_size=spec.patch_size,
        num_embeds_ada_norm=spec.num_classes,
        norm_type="ada_norm_zero",
    )
    return DiffusersVelocity(net.eval(), 1000.0, spec.num_classes)  # type: ignore[attr-defined]


# ---------------------------------------------------------------- measurements


def _rss_mb(field_name: str) -> float:
    """VmRSS / VmHWM of this process in MB (Linux)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field_name + ":"):
            return int(line.split()[1]) / 1024
    return float("nan")


def _reset_peak_rss() -> bool:
    """Reset VmHWM to the current RSS (Linux >= 4.0), so the next peak is this variant's."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def _inputs(batch: int, shape: tuple[int, ...]) -> tuple[Tensor, Tensor]:
    x = torch.randn(batch, *shape, generator=torch.Generator().manual_seed(0))
    return x, torch.zeros(batch, dtype=torch.int64)


def interleaved_loop_seconds(
    built: dict[str, Built],
    batch: int,
    shape: tuple[int, ...],
    guidance: float,
    null: int | None,
    loops: int,
    settle: int = 0,
) -> dict[str, float]:
    """Median seconds of one whole sampling loop per engine (its own steps and guidance), one
    loop of each engine per round after an untimed round; `settle` untimed forwards at the
    loop's batch warm an engine before each of its loops."""
    noise, cond = _inputs(batch, shape)
    times: dict[str, list[float]] = {name: [] for name in built}
    with torch.no_grad():
        for i in range(loops + 1):
            for name, b in built.items():
                own_guidance = guidance if b.guidance is None else b.guidance
                doubled = 2 if own_guidance != 1.0 else 1
                for _ in range(settle):
                    b.engine(
                        noise.repeat(doubled, *([1] * len(shape))),
                        torch.zeros(batch * doubled, dtype=torch.int64),
                        cond.repeat(doubled),
                    )
                start = time.perf_counter()
                sample(EngineVelocity(b.engine), noise, cond, b.engine.schedule, own_guidance, null)
                if i:
                    times[name].append(time.perf_counter() - start)
    return {name: float(np.median(t)) for name, t in times.items()}


def forward_flops(model: DiffusersVelocity, batch: int) -> float:
    """Multiply-add FLOPs (2 per MAC) of one FP forward at `batch`, counted by torch."""
    from torch.utils.flop_counter import FlopCounterMode

    x = torch.zeros(batch, *model.sample_shape)
    t = torch.full((batch,), 0.5)
    cond = torch.zeros(batch, dtype=torch.int64)
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model(x, t, cond)
    return float(counter.get_total_flops())


def matmul_peaks(threads: int, sizes: tuple[int, ...] = (1024, 2048), chain: int = 4, runs: int = 5) -> dict[str, Any]:
    """This machine's matrix-multiply peak per arithmetic, in GOP/s: the best of square GEMMs of
    `sizes`, `chain` of them in one graph (so per-call input conversion and dispatch are shared),
    on every runtime that runs that arithmetic: fp32 (onnxruntime MatMul, OpenVINO f32), int8
    (onnxruntime MatMulInteger u8 x s8, OpenVINO int8 from Q/DQ), bf16 (OpenVINO bf16 hint).
    Returns {arithmetic: best} plus "measured": every (arithmetic, runtime, size) figure."""
    import onnx
    import onnxruntime as ort
    import openvino as ov
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    measured: list[dict[str, Any]] = []

    def float_graph(size: int, qdq: bool) -> Any:
        """x -> (MatMul W)^chain; with qdq every MatMul reads Q/DQ u8 activations and a DQ s8
        weight.  Without, W is float: OpenVINO runs a MatMul on DQ int8 weights in int8 even
        under the f32 hint (it quantizes the activations on the fly; measured)."""
        if qdq:
            w = rng.integers(-127, 128, (size, size)).astype(np.int8)
            inits = [
                numpy_helper.from_array(w, "w8"),
                numpy_helper.from_array(np.array(1.0 / size, np.float32), "w_scale"),
                numpy_helper.from_array(np.array(0.05, np.float32), "a_scale"),
                numpy_helper.from_array(np.array(128, np.uint8), "a_zp"),
            ]
            nodes = [helper.make_node("DequantizeLinear", ["w8", "w_scale"], ["w"])]
        else:
            inits = [numpy_helper.from_array(rng.standard_normal((size, size), dtype=np.float32) / size, "w")]
            nodes = []
        x = "x"
        for i in range(chain):
            if qdq:
                nodes += [
                    helper.make_node("QuantizeLinear", [x, "a_scale", "a_zp"], [f"q{i}"]),
                    helper.make_node("DequantizeLinear", [f"q{i}", "a_scale", "a_zp"], [f"dq{i}"]),
                ]
                x = f"dq{i}"
            nodes.append(helper.make_node("MatMul", [x, "w"], [f"y{i}"]))
            x = f"y{i}"
        io = [helper.make_tensor_value_info(n, TensorProto.FLOAT, [size, size]) for n in ("x", x)]
        g = helper.make_graph(nodes, "gemm", [io[0]], [io[1]], inits)
        return helper.make_model(g, opset_imports=[helper.make_opsetid("", 19)])

    def int_graph(size: int) -> Any:
        w = rng.integers(-127, 128, (size, size)).astype(np.int8)
        inits = [
            numpy_helper.from_array(w, "w"),
            numpy_helper.from_array(np.array(128, np.uint8), "a_zp"),
            numpy_helper.from_array(np.array(0, np.int8), "w_zp"),
        ]
        nodes = [helper.make_node("MatMulInteger", ["x", "w", "a_zp", "w_zp"], [f"y{i}"]) for i in range(chain)]
        g = helper.make_graph(
            nodes,
            "gemm",
            [helper.make_tensor_value_info("x", TensorProto.UINT8, [size, size])],
            [helper.make_tensor_value_info(f"y{i}", TensorProto.INT32, [size, size]) for i in range(chain)],
            inits,
        )
        return helper.make_model(g, opset_imports=[helper.make_opsetid("", 19)])

    def record(arithmetic: str, runtime: str, size: int, run: Any) -> None:
        run()
        times = []
        for _ in range(runs):
            start = time.perf_counter()
            run()
            times.append(time.perf_counter() - start)
        gops = chain * 2.0 * size**3 / float(np.median(times)) / 1e9
        measured.append({"arithmetic": arithmetic, "runtime": runtime, "size": size, "gop_per_s": gops})

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    core = ov.Core()
    for size in sizes:
        x = rng.standard_normal((size, size), dtype=np.float32)
        x8 = rng.integers(0, 256, (size, size), dtype=np.uint8)
        plain, quantized = float_graph(size, qdq=False), float_graph(size, qdq=True)
        session = ort.InferenceSession(plain.SerializeToString(), opts, providers=["CPUExecutionProvider"])
        record("fp32", "onnxruntime MatMul", size, lambda s=session, x=x: s.run(None, {"x": x}))
        session = ort.InferenceSession(int_graph(size).SerializeToString(), opts, providers=["CPUExecutionProvider"])
        record("int8", "onnxruntime MatMulInteger u8 x s8", size, lambda s=session, x8=x8: s.run(None, {"x": x8}))
        with tempfile.TemporaryDirectory() as tmp:
            for name, graph in (("plain", plain), ("qdq", quantized)):
                onnx.save(graph, f"{tmp}/{name}.onnx")
            for arithmetic, name, hint in (("fp32", "plain", "f32"), ("bf16", "plain", "bf16"), ("int8", "qdq", "f32")):
                compiled = core.compile_model(
                    core.read_model(f"{tmp}/{name}.onnx"),
                    "CPU",
                    {"INFERENCE_PRECISION_HINT": hint, "INFERENCE_NUM_THREADS": str(threads)},
                )
                record(arithmetic, f"OpenVINO {arithmetic}", size, lambda c=compiled, x=x: c({"x": x}))
    peaks: dict[str, Any] = {
        a: max(m["gop_per_s"] for m in measured if m["arithmetic"] == a) for a in ("fp32", "int8", "bf16")
    }
    peaks["measured"] = measured
    return peaks


def top_ops(engine: Engine, batch: int, shape: tuple[int, ...], runs: int, n: int = 6) -> list[dict[str, Any]]:
    """The engine's most expensive operator types over `runs` forwards: [{op, ms, share}]."""
    x, cond = _inputs(batch, shape)
    step = torch.zeros(batch, dtype=torch.int64)
    totals: dict[str, float] = {}
    if isinstance(engine, OrtEngine):
        import onnxruntime as ort

        opts = ort.SessionOptions()
        opts.enable_profiling = True
        opts.intra_op_num_threads = engine.session.get_session_options().intra_op_num_threads
        opts.profile_file_prefix = str(engine.path.with_suffix(""))
        session = ort.InferenceSession(str(engine.path), opts, providers=["CPUExecutionProvider"])
        feeds = graph_feeds(engine, engine.path, engine.input_names, x, step, cond)
        for _ in range(runs):
            session.run(None, feeds)
        trace = Path(session.end_profiling())
        for event in json.loads(trace.read_text()):
            if event.get("cat") == "Node" and event["name"].endswith("_kernel_time"):
                op = event["args"].get("op_name", "?")
                totals[op] = totals.get(op, 0.0) + event["dur"] / 1000 / runs
        trace.unlink()
    elif isinstance(engine, OpenVinoEngine):
        profiled = OpenVinoEngine(
            engine.path, engine.schedule, engine.precision_hint, threads=engine.threads, perf_counters=True
        )
        request = profiled._compiled(batch).create_infer_request()
        feeds = graph_feeds(profiled, profiled.path, profiled.input_names, x, step, cond)
        for _ in range(runs):
            request.infer(feeds)
        for info in request.profiling_info:
            key = f"{info.node_type} ({info.exec_type})"
            totals[key] = totals.get(key, 0.0) + info.real_time.total_seconds() * 1000
    elif isinstance(engine, TorchEngine):
        from torch.profiler import ProfilerActivity, profile

        with profile(activities=[ProfilerActivity.CPU]) as prof, torch.no_grad():
            for _ in range(runs):
                engine(x, step, cond)
        for event in prof.key_averages():
            if event.key.startswith("aten::") and event.key not in ("aten::empty", "aten::to"):
                totals[event.key] = event.self_cpu_time_total / 1000 / runs
    whole = sum(totals.values()) or 1.0
    ranked = sorted(totals.items(), key=lambda kv: -kv[1])[:n]
    return [{"op": op, "ms": round(ms, 4), "share": round(ms / whole, 4)} for op, ms in ranked]


def ort_graph_ops(path: Path) -> dict[str, int]:
    """Operator counts of an onnxruntime engine as it runs: the graph after onnxruntime's
    (extended, hardware-independent) optimizations."""
    import onnx

    counts: dict[str, int] = {}
    with tempfile.TemporaryDirectory() as tmp:
        ort_session(path, "extended", optimized_path=f"{tmp}/opt.onnx")
        graph = onnx.load(f"{tmp}/opt.onnx", load_external_data=False).graph
    consumers: dict[str, list[str]] = {}
    for node in graph.node:
        counts[node.op_type] = counts.get(node.op_type, 0) + 1
        for name in node.input:
            consumers.setdefault(name, []).append(node.op_type)
    # DequantizeLinear straight into QuantizeLinear: an int8 -> float -> int8 round trip (ping-pong)
    counts["DQ->Q"] = sum(
        consumers.get(node.output[0], []).count("QuantizeLinear")
        for node in graph.node
        if node.op_type == "DequantizeLinear"
    )
    return dict(sorted(counts.items(), key=lambda kv: -kv[1]))


# ---------------------------------------------------------------- variants


def build_variants(
    model: DiffusersVelocity,
    spec: BenchModel,
    schedule: Schedule,
    guidance: float,
    config: BenchConfig,
    workdir: Path,
    host: HostIsa | None = None,
) -> dict[str, Any]:
    """Write every variant's engine files into workdir; returns loaders (name -> () -> Built) and
    the int8 weight form flowpress's engines took on `host` (default: this one).  The peers stay
    as a user builds them: NNCF's and quantize_static's defaults, never portable."""
    host = host or host_isa()
    recipe = load_recipe(spec.recipe)
    null = model.null_label
    calib = capture(model, model.sample_shape, model.num_classes, schedule, recipe.calibration, guidance, null)
    # the peers calibrate on the same inputs, shuffled (every step equally often, as random-t
    # draws would): the rows then differ only in what each method does with them
    peer_calib = calib.subset(torch.randperm(len(calib), generator=torch.Generator().manual_seed(0)))
    qmodel = quantize(model, recipe.quantize, calib)
    portable = _int8_form(qmodel, recipe, host)
    int8 = recipe.quantize.precision == "int8"
    # variant -> portable, for flowpress's engines with int8 weights
    portable_of: dict[str, bool] = {}
    fp32 = export_onnx(model, schedule, workdir / "fp32.onnx")
    prepared = export_onnx(qmodel.fp_module, schedule, workdir / "prepared_fp32.onnx")
    threads = config.threads
    loaders: dict[str, Any] = {}
    want = set(config.variants)
    if "torch-fp32" in want:
        loaders["torch-fp32"] = lambda: Built(TorchEngine(model, schedule, "torch-fp32"))
    if "ort-fp32" in want:
        loaders["ort-fp32"] = lambda: Built(OrtEngine(fp32, schedule, "ort-fp32", threads), [fp32])
    if "ort-quantize-static" in want:
        static = ort_quantize_static(
            model, schedule, peer_calib, 0, len(peer_calib), workdir, op_types=("Conv", "MatMul", "Gemm")
        ).path
        loaders["ort-quantize-static"] = lambda: Built(
            OrtEngine(static, schedule, "ort-quantize-static", threads), [static]
        )
    if "ov-bf16" in want:
        ov_plain = export_openvino(fp32, workdir / "ov-default" / "model.xml", OpenVinoConfig("f32"))
        loaders["ov-bf16"] = lambda: Built(
            OpenVinoEngine(ov_plain, schedule, None, "ov-bf16", threads), _ir_files(ov_plain)
        )
    if "ov-nncf-default" in want:
        nncf_default = export_openvino(
            fp32, workdir / "ov-nncf-default" / "model.xml", OpenVinoConfig("int8", transformer=False), peer_calib
        )
        loaders["ov-nncf-default"] = lambda: Built(
            OpenVinoEngine(nncf_default, schedule, None, "ov-nncf-default", threads), _ir_files(nncf_default)
        )
    if "flowpress-ort-int8" in want:
        opt = _ours_ort(qmodel, schedule, recipe, calib, workdir, "model")
        if int8:
            portable_of["flowpress-ort-int8"] = portable
        loaders["flowpress-ort-int8"] = lambda: Built(OrtEngine(opt, schedule, "flowpress-ort-int8", threads), [opt])
    for variant, other_recipe in (("flowpress-fp8", spec.fp8_recipe), ("flowpress-w4a8", spec.w4a8_recipe)):
        if variant in want and other_recipe:
            other = load_recipe(other_recipe)
            other_calib = (
                calib
                if other.calibration == recipe.calibration
                else capture(model, model.sample_shape, model.num_classes, schedule, other.calibration, guidance, null)
            )
            other_qmodel = quantize(model, other.quantize, other_calib)
            _int8_form(other_qmodel, other, host)  # fp8 / w4a8 keep their weights: a no-op
            path = _ours_ort(other_qmodel, schedule, other, other_calib, workdir, variant)
            loaders[variant] = lambda path=path, variant=variant: Built(
                OrtEngine(path, schedule, variant, threads), [path]
            )
    student_flops = {}
    if "student" in want and spec.student_recipe:
        loaders["student"], student, portable_of["student"] = _student(
            spec.student_recipe, model, threads, workdir / "student", host
        )
        student_flops = {b: forward_flops(student, b) for b in config.batches}
    if "flowpress-ov-int8" in want:
        ours = export_openvino(
            prepared,
            workdir / "ov-int8" / "model.xml",
            dataclasses.replace(recipe.engine.openvino, precision="int8"),
            calib,
            portable,
        )
        portable_of["flowpress-ov-int8"] = portable
        hint = dataclasses.replace(recipe.engine.openvino, precision="int8").inference_hint
        loaders["flowpress-ov-int8"] = lambda: Built(
            OpenVinoEngine(ours, schedule, hint, "flowpress-ov-int8", threads), _ir_files(ours)
        )
    if "flowpress-ov-bf16" in want:
        ours_bf16 = export_openvino(prepared, workdir / "ov-bf16" / "model.xml", OpenVinoConfig("bf16"))
        loaders["flowpress-ov-bf16"] = lambda: Built(
            OpenVinoEngine(ours_bf16, schedule, "bf16", "flowpress-ov-bf16", threads), _ir_files(ours_bf16)
        )
    return {
        "loaders": loaders,
        "calib_inputs": len(calib),
        "student_flops": student_flops,
        "portable_of": portable_of,
        "int8": {
            "isa_class": host.isa_class,
            "emulated": host.emulated,
            "portable": portable,
            "int8_weights": f"{weight_bits_of(qmodel)}-bit" if int8 else None,
            "overflow_fix": overflow_fix(portable),
        },
    }


def _int8_form(qmodel: QuantizedModel, recipe: Recipe, host: HostIsa) -> bool:
    """Give `qmodel` the int8 weight bits `make quantize` gives it on `host` (7 where portable,
    a no-op for fp8 / w4a8); returns whether the recipe's engines are portable there."""
    portable = resolve_portable(recipe.engine.portable, host)
    set_weight_bits(qmodel, PORTABLE_WEIGHT_BITS if portable else 8)
    return portable


def _ir_files(xml: Path) -> list[Path]:
    return [xml, xml.with_suffix(".bin")]


def _ours_ort(
    qmodel: QuantizedModel, schedule: Schedule, recipe: Recipe, calib: CalibrationSet, workdir: Path, stem: str
) -> Path:
    """The onnxruntime engine `make quantize` builds from `recipe`: parity-checked Q/DQ export,
    saved as onnxruntime optimizes it (fp8 graphs with the Q/DQ-rewriting optimizers off)."""
    qdq = workdir / f"{stem}.onnx"
    export_checked(qmodel, schedule, recipe.export.flavour, qdq, calib, recipe.export.opset)
    opt = workdir / f"{stem}.opt.onnx"
    build_ort_engine(qdq, opt)
    return opt


def _student(
    recipe_path: str, teacher: DiffusersVelocity, threads: int, workdir: Path, host: HostIsa
) -> tuple[Any, DiffusersVelocity, bool]:
    """The distilled student as flowpress ships it: its own recipe's calibration (one-step
    inputs) into OpenVINO int8 (portable as its recipe resolves on `host`), sampled with its own
    schedule and guidance.  Returns (loader, student, portable)."""
    recipe = load_recipe(recipe_path)
    student = ensure_model(recipe, progress=False).eval()
    if (student.sample_shape, student.num_classes) != (teacher.sample_shape, teacher.num_classes):
        raise FlowpressError(
            f"bench student_recipe {recipe_path}: its model takes {student.sample_shape} with "
            f"{student.num_classes} classes, the teacher {teacher.sample_shape} with {teacher.num_classes}; "
            "name the student distilled from this model (`make distill`)"
        )
    schedule = recipe.sampling.schedule()
    calib = capture(
        student,
        student.sample_shape,
        student.num_classes,
        schedule,
        recipe.calibration,
        recipe.sampling.guidance,
        student.null_label,
    )
    qmodel = quantize(student, recipe.quantize, calib)
    portable = _int8_form(qmodel, recipe, host)
    workdir.mkdir(parents=True, exist_ok=True)
    prepared = export_onnx(qmodel.fp_module, schedule, workdir / "prepared_fp32.onnx")
    config = dataclasses.replace(recipe.engine.openvino, precision="int8")
    xml = export_openvino(prepared, workdir / "ov-int8" / "model.xml", config, calib, portable)
    loader = lambda: Built(  # noqa: E731
        OpenVinoEngine(xml, schedule, config.inference_hint, "student", threads),
        _ir_files(xml),
        recipe.sampling.guidance,
    )
    return loader, student, portable


# ---------------------------------------------------------------- one model


def bench_model(
    spec: BenchModel, config: BenchConfig, workdir: Path, progress: bool = True, host: HostIsa | None = None
) -> dict[str, Any]:
    """Every variant of one model on `host` (default: this one): rows per (variant, batch), the
    step timing repeated in config.passes interleaved passes."""
    from tqdm import tqdm

    recipe = load_recipe(spec.recipe)
    model = build_random_dit(spec.random_dit) if spec.random_dit else ensure_model(recipe, progress)
    model.eval()
    steps = spec.steps or recipe.sampling.steps
    schedule = Schedule(steps, recipe.sampling.method)
    guidance = recipe.sampling.guidance if spec.guidance is None else spec.guidance
    null = model.null_label
    shape = model.sample_shape
    params = sum(p.numel() for p in model.parameters())
    with torch.no_grad():
        ref = fp_reference(model, schedule, guidance, spec.n_samples, config.sample_batch)
    built_info = build_variants(model, spec, schedule, guidance, config, workdir, host)
    flops = {b: forward_flops(model, b) for b in config.batches}
    student_flops = built_info["student_flops"]
    loaders = built_info["loaders"]
    # one variant at a time: fidelity, size, peak memory, profile
    facts: dict[str, dict[str, Any]] = {}
    profiles, graphs = {}, {}
    bar = tqdm(total=len(loaders), desc=f"bench {spec.name}", disable=not progress)
    for variant, load in loaders.items():
        gc.collect()
        resettable = _reset_peak_rss()
        built = load()
        own_guidance = guidance if built.guidance is None else built.guidance
        with torch.no_grad():
            xs = (
                ref.xs[-1]
                if variant == "torch-fp32"
                else sample_engine(built.engine, ref, own_guidance, null, config.sample_batch)[-1]
            )
            for batch in config.batches:  # compile / allocate every timed shape inside this variant's peak
                step_times_ms(built.engine, batch, shape, 1, 0)
        facts[variant] = {
            "final_psnr_db": None if variant == "torch-fp32" else psnr_db(ref.xs[-1], xs),
            "size_bytes": sum(f.stat().st_size for f in built.files) if built.files else 4 * params,
            "peak_rss_mb": _rss_mb("VmHWM"),
            "peak_rss_scope": "variant" if resettable else "process",
            "portable": built_info["portable_of"].get(variant),  # None: a peer, or no int8 weights
            "inference_precision": built.engine.compiled_hint(max(config.batches))
            if isinstance(built.engine, OpenVinoEngine)
            else None,
        }
        profiles[variant] = top_ops(built.engine, max(config.batches), shape, config.profile_runs)
        if isinstance(built.engine, OrtEngine):
            graphs[variant] = ort_graph_ops(built.engine.path)
        del built
        bar.update()
    bar.close()
    # then every variant at once, timed in interleaved rounds: a slow spell of the shared host
    # lands on all of them instead of on whichever variant happened to be timed then
    engines = {variant: load() for variant, load in loaders.items()}
    rows = []
    for batch in config.batches:
        passes = [
            interleaved_step_times(
                {v: b.engine for v, b in engines.items()},
                batch,
                shape,
                config.runs,
                config.warmup,
                config.block,
                config.settle,
            )
            for _ in range(config.passes)
        ]
        loops = interleaved_loop_seconds(engines, batch, shape, guidance, null, config.loops, config.settle)
        for variant, built in engines.items():
            steps_in_loop = built.engine.schedule.n_steps
            own_guidance = guidance if built.guidance is None else built.guidance
            medians = [float(np.median(times[variant])) for times in passes]
            every = np.concatenate([times[variant] for times in passes])
            rows.append(
                {
                    "model": spec.name,
                    "variant": variant,
                    "peer": variant in PEERS,
                    "batch": batch,
                    "ms_per_step_median": float(np.median(medians)),  # the median of the passes' medians
                    "ms_per_step_passes": medians,
                    "ms_per_step_p90": float(np.percentile(every, 90)),  # over every timed forward
                    "runs": len(passes[0][variant]),  # per pass
                    "passes": len(passes),
                    "images_per_s": batch / loops[variant],
                    "loop_ms_per_step": loops[variant] * 1000 / steps_in_loop,
                    "steps": steps_in_loop,
                    "model_batch_in_loop": batch * (2 if own_guidance != 1.0 else 1),
                    "threads": config.threads,
                    "arithmetic": ARITHMETIC[variant],
                    "gop_per_forward": (student_flops if variant == "student" else flops)[batch] / 1e9,
                    **facts[variant],
                }
            )
    del engines
    return {
        "model": spec.name,
        "params": params,
        "steps": steps,
        "guidance": guidance,
        "n_samples": spec.n_samples,
        "calibration_inputs": built_info["calib_inputs"],
        **built_info["int8"],
        "null_label": null,
        "rows": rows,
        "profiles": profiles,
        "graph_ops": graphs,
    }


def python_overhead(spec: BenchModel, config: BenchConfig, workdir: Path, null: int | None) -> dict[str, Any]:
    """Per-step cost around the runtime at batch 1 (the runtime sees batch 2 under guidance): the
    raw runtime call, the engine call (feeds, checks, conversion) with plain run() and with I/O
    binding, and one whole sampler step (guidance, t -> step lookup, Euler update)."""
    recipe = load_recipe(spec.recipe)
    path = workdir / "model.opt.onnx"
    schedule = Schedule(spec.steps or recipe.sampling.steps, recipe.sampling.method)
    guidance = recipe.sampling.guidance if spec.guidance is None else spec.guidance
    model_batch = 2 if guidance != 1.0 else 1
    bound = OrtEngine(path, schedule, "io-binding", config.threads, io_binding=True)
    plain = OrtEngine(path, schedule, "run", config.threads, io_binding=False)
    shape = tuple(int(d) for d in bound.session.get_inputs()[0].shape[1:])
    x, cond = _inputs(model_batch, shape)
    feeds = graph_feeds(bound, path, bound.input_names, x, torch.zeros_like(cond), cond)
    runs = config.runs * 3
    raw = []
    for i in range(config.warmup + runs):
        start = time.perf_counter()
        bound.session.run(None, feeds)
        if i >= config.warmup:
            raw.append((time.perf_counter() - start) * 1000)
    return {
        "model": spec.name,
        "engine": "flowpress-ort-int8",
        "batch": 1,
        "model_batch": model_batch,
        "raw_session_run_ms": float(np.median(raw)),
        "engine_call_run_ms": float(np.median(step_times_ms(plain, model_batch, shape, runs, config.warmup))),
        "engine_call_io_binding_ms": float(np.median(step_times_ms(bound, model_batch, shape, runs, config.warmup))),
        "sampler_ms_per_step": interleaved_loop_seconds(
            {"io": Built(bound)}, 1, shape, guidance, null, config.loops * 3
        )["io"]
        * 1000
        / schedule.n_steps,
    }


# ---------------------------------------------------------------- the whole bench


def run_bench(config: BenchConfig, runs_root: str | Path = "runs", progress: bool = True) -> Path:
    torch.set_num_threads(config.threads)
    final = Path(runs_root) / config.name
    work_root = Path(runs_root) / f".{config.name}.work"
    shutil.rmtree(work_root, ignore_errors=True)
    results = []
    overhead = []
    host = host_isa()
    peaks = matmul_peaks(config.threads)
    for spec in config.models:
        workdir = work_root / spec.name
        workdir.mkdir(parents=True)
        results.append(bench_model(spec, config, workdir, progress, host))
        if "flowpress-ort-int8" in config.variants:
            overhead.append(python_overhead(spec, config, workdir, results[-1]["null_label"]))
        shutil.rmtree(workdir, ignore_errors=True)
    for result in results:
        for row in result["rows"]:
            peak = peaks[row["arithmetic"]]
            achieved = row["gop_per_forward"] / (row["ms_per_step_median"] / 1000)
            row["achieved_gop_per_s"] = achieved
            row["fraction_of_peak"] = achieved / peak
    bench: dict[str, Any] = {
        "config": {
            "threads": config.threads,
            "batches": list(config.batches),
            "runs": config.runs,
            "passes": config.passes,
            "block": config.block,
            "settle": config.settle,
            "bars": to_dict(config.bars),
        },
        "machine": machine_record(host),
        "matmul_peak_gop_per_s": peaks,
        "rows": [row for r in results for row in r["rows"]],
        "models": [{k: v for k, v in r.items() if k != "rows"} for r in results],
        "python_overhead": overhead,
    }
    bench["bars"] = bars(bench["rows"], config.bars, peaks)
    with run_lock(final), staged_run(final) as out:
        (out / "bench.json").write_text(json.dumps(bench, indent=2, default=_json_default) + "\n")
        plot_frontier(bench["rows"], out / "frontier.png")
        (out / "bench.md").write_text(bench_markdown(bench))
    shutil.rmtree(work_root, ignore_errors=True)
    return final


def _json_default(value: Any) -> Any:
    if isinstance(value, np.bool_ | np.integer | np.floating):
        return value.item()
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


def machine_record(host: HostIsa | None = None) -> dict[str, Any]:
    """The CPU's model name and cores, and `host` (default: this one) as engines record it:
    ISA class, whether int8 saturates, flags, emulated, runtime versions."""
    import os
    import platform

    cpu = "?"
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            cpu = line.split(":", 1)[1].strip()
            break
    return {"cpu": cpu, "cores": os.cpu_count(), "python": platform.python_version(), "host": host_record(host)}


def _row(rows: list[dict[str, Any]], model: str, variant: str, batch: int) -> dict[str, Any] | None:
    return next((r for r in rows if r["model"] == model and r["variant"] == variant and r["batch"] == batch), None)


def bars(
    rows: list[dict[str, Any]],
    thresholds: BenchBars | None = None,
    peaks: dict[str, Any] | None = None,
    batch: int = 8,
) -> list[dict[str, Any]]:
    """The bench's bars on this run's rows at `batch` against `thresholds` (default: BenchBars());
    the int8-peak bar needs the host's GEMM peaks (matmul_peaks)."""
    thresholds = thresholds or BenchBars()
    out = []
    for model in sorted({r["model"] for r in rows}):
        peak_bar = thresholds.int8_peak_fraction
        candidates = [
            r
            for r in rows
            if r["model"] == model
            and r["batch"] == batch
            and not r["peer"]
            and r["variant"] not in NOT_THE_SAME_NETWORK
        ]
        if peaks and candidates:
            best = min(candidates, key=lambda r: r["ms_per_step_median"])
            achieved = best["gop_per_forward"] / (best["ms_per_step_median"] / 1000)
            need = peak_bar.min if model == peak_bar.model else None
            entry = {
                "model": model,
                "bar": f"fastest flowpress engine ({best['variant']}) vs this host's int8 GEMM peak"
                + (f": >= {100 * need:g}%" if need else " (no bar)"),
                "achieved_gop_per_s": achieved,
                "int8_peak_gop_per_s": peaks["int8"],
                "fraction_of_int8_peak": achieved / peaks["int8"],
                "passed": achieved / peaks["int8"] >= need if need else None,
            }
            fp = _row(rows, model, "ort-fp32", batch)
            if fp:
                entry["speedup_vs_ort_fp32"] = fp["ms_per_step_median"] / best["ms_per_step_median"]
            out.append(entry)
        for ours_name, peer_name, bar in (
            ("flowpress-ov-int8", "ov-nncf-default", thresholds.ov_int8_vs_nncf),
            ("flowpress-ort-int8", "ort-quantize-static", thresholds.ort_int8_vs_quantize_static),
        ):
            ours, peer = _row(rows, model, ours_name, batch), _row(rows, model, peer_name, batch)
            if not (ours and peer):
                continue
            speedup = peer["ms_per_step_median"] / ours["ms_per_step_median"]
            gain = ours["final_psnr_db"] - peer["final_psnr_db"]
            out.append(
                {
                    "model": model,
                    "bar": f"{ours_name} vs {peer_name}: speedup >= {bar.min_speedup:g}x, final PSNR gain "
                    f">= {bar.min_psnr_gain_db:g} dB",
                    "speedup": speedup,
                    "psnr_gain_db": gain,
                    "passed": speedup >= bar.min_speedup and gain >= bar.min_psnr_gain_db,
                }
            )
    return out


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
        student, teacher = (_row(bench["rows"], name, v, 8) for v in ("student", "flowpress-ov-int8"))
        if student and teacher:
            lines += [
                "",
                f"The distilled student (one step, no guidance) makes {student['images_per_s']:.0f} images/s at batch 8 "
                f"against the teacher's {teacher['images_per_s']:.0f} in flowpress-ov-int8 ({teacher['steps']} steps): "
                f"{student['images_per_s'] / teacher['images_per_s']:.0f}x; its final PSNR is against the teacher's "
                "trajectory (another network: it is left out of the int8-peak bar).",
            ]
        lines += ["", "Top operators per engine (batch 8, share of the engine's operator time):", ""]
        for variant, ops in info["profiles"].items():
            lines.append(f"- {variant}: " + ", ".join(f"{o['op']} {100 * o['share']:.0f}%" for o in ops))
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


def load_bench_config(path: str | Path) -> BenchConfig:
    return from_dict(BenchConfig, load_yaml(path), str(path))
