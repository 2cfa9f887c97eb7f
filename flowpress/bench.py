"""`flowpress bench`: every CPU engine flowpress builds beside what a user would build by hand.

Per model, the variants share one FP model, one sampler and one set of seeds.  Peers are the
hand-built engines (torch, onnxruntime fp32, onnxruntime quantize_static, OpenVINO's default,
NNCF's default preset fed random-step inputs); flowpress's variants use its trajectory
calibration set and temporal tables.  Every row says how fast (per step, whole loop) and how
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

from calibration import capture
from compress import quantize
from engines import Engine, EngineVelocity, OrtEngine, TorchEngine, psnr_db, step_times_ms
from engines.base import graph_feeds
from engines.openvino import OpenVinoEngine
from export import export_onnx, ort_session
from export.openvino import OpenVinoConfig, export_openvino
from flowpress.ablate import fp_reference, ort_quantize_static, sample_engine
from flowpress.pipeline import ensure_model, export_checked
from flowpress.recipe import from_dict, load_recipe, load_yaml
from flowpress.rundir import staged_run
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
OURS = ("flowpress-ort-int8", "flowpress-ov-int8", "flowpress-ov-bf16")
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


@dataclass(frozen=True)
class BenchConfig:
    name: str = "bench"
    models: tuple[BenchModel, ...] = ()
    variants: tuple[str, ...] = PEERS + OURS
    batches: tuple[int, ...] = (1, 8)
    runs: int = 30
    warmup: int = 5
    loops: int = 3
    threads: int = 2
    sample_batch: int = 50
    profile_runs: int = 10

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
        for key in ("warmup", "loops", "threads", "sample_batch", "profile_runs"):
            if getattr(self, key) < (0 if key == "warmup" else 1):
                raise FlowpressError(f"bench.{key} must be >= {0 if key == 'warmup' else 1}, got {getattr(self, key)}")


@dataclass
class Built:
    """One variant's engine and the files it ships as."""

    engine: Engine
    files: list[Path] = field(default_factory=list)


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


def loop_seconds(
    engine: Engine, batch: int, shape: tuple[int, ...], guidance: float, null: int | None, loops: int
) -> float:
    """Median seconds of one whole sampling loop (every step, guidance included) at `batch`."""
    noise, cond = _inputs(batch, shape)
    velocity = EngineVelocity(engine)
    times = []
    with torch.no_grad():
        for i in range(loops + 1):
            start = time.perf_counter()
            sample(velocity, noise, cond, engine.schedule, guidance, null)
            if i:
                times.append(time.perf_counter() - start)
    return float(np.median(times))


def forward_flops(model: DiffusersVelocity, batch: int) -> float:
    """Multiply-add FLOPs (2 per MAC) of one FP forward at `batch`, counted by torch."""
    from torch.utils.flop_counter import FlopCounterMode

    x = torch.zeros(batch, *model.sample_shape)
    t = torch.full((batch,), 0.5)
    cond = torch.zeros(batch, dtype=torch.int64)
    with FlopCounterMode(display=False) as counter, torch.no_grad():
        model(x, t, cond)
    return float(counter.get_total_flops())


def matmul_peaks(threads: int, size: int = 2048, runs: int = 10) -> dict[str, float]:
    """This machine's achieved GOP/s on one large square GEMM: fp32 (onnxruntime MatMul), int8
    (onnxruntime MatMulInteger, uint8 x int8: the x86 VNNI/AMX path) and bf16 (OpenVINO MatMul
    with the bf16 precision hint)."""
    import onnx
    import openvino as ov
    from onnx import TensorProto, helper, numpy_helper

    rng = np.random.default_rng(0)
    ops = 2.0 * size**3

    def graph(op: str, a_type: int, b: np.ndarray) -> Any:
        inputs = ["a", "b"] + (["a_zp", "b_zp"] if op == "MatMulInteger" else [])
        inits = [numpy_helper.from_array(b, "b")]
        if op == "MatMulInteger":
            inits += [
                numpy_helper.from_array(np.array(128, np.uint8), "a_zp"),
                numpy_helper.from_array(np.array(0, np.int8), "b_zp"),
            ]
        out_type = TensorProto.INT32 if op == "MatMulInteger" else TensorProto.FLOAT
        g = helper.make_graph(
            [helper.make_node(op, inputs, ["y"])],
            op,
            [helper.make_tensor_value_info("a", a_type, [size, size])],
            [helper.make_tensor_value_info("y", out_type, [size, size])],
            inits,
        )
        return helper.make_model(g, opset_imports=[helper.make_opsetid("", 19)])

    def timed(run: Any) -> float:
        run()
        times = []
        for _ in range(runs):
            start = time.perf_counter()
            run()
            times.append(time.perf_counter() - start)
        return ops / float(np.median(times)) / 1e9

    peaks = {}
    a32 = rng.standard_normal((size, size), dtype=np.float32)
    b32 = rng.standard_normal((size, size), dtype=np.float32)
    fp32_model = graph("MatMul", TensorProto.FLOAT, b32)
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.intra_op_num_threads = threads
    session = ort.InferenceSession(fp32_model.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    peaks["fp32"] = timed(lambda: session.run(None, {"a": a32}))
    a8 = rng.integers(0, 256, (size, size), dtype=np.uint8)
    b8 = rng.integers(-127, 128, (size, size), dtype=np.int8)
    int8_model = graph("MatMulInteger", TensorProto.UINT8, b8)
    session8 = ort.InferenceSession(int8_model.SerializeToString(), opts, providers=["CPUExecutionProvider"])
    peaks["int8"] = timed(lambda: session8.run(None, {"a": a8}))
    core = ov.Core()
    with tempfile.TemporaryDirectory() as tmp:
        onnx.save(fp32_model, f"{tmp}/matmul.onnx")
        ov_model = core.read_model(f"{tmp}/matmul.onnx")
    compiled = core.compile_model(
        ov_model, "CPU", {"INFERENCE_PRECISION_HINT": "bf16", "INFERENCE_NUM_THREADS": str(threads)}
    )
    peaks["bf16"] = timed(lambda: compiled({"a": a32}))
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
) -> dict[str, Any]:
    """Write every variant's engine files into workdir; returns loaders (name -> () -> Built)."""
    recipe = load_recipe(spec.recipe)
    null = model.null_label
    calib = capture(model, model.sample_shape, model.num_classes, schedule, recipe.calibration, guidance, null)
    # the peers calibrate on the same inputs, shuffled (every step equally often, as random-t
    # draws would): the rows then differ only in what each method does with them
    peer_calib = calib.subset(torch.randperm(len(calib), generator=torch.Generator().manual_seed(0)))
    qmodel = quantize(model, recipe.quantize, calib)
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
        qdq = workdir / "model.onnx"
        export_checked(qmodel, schedule, recipe.export.flavour, qdq, calib, recipe.export.opset)
        opt = workdir / "model.opt.onnx"
        ort_session(qdq, "extended", threads, optimized_path=str(opt))
        loaders["flowpress-ort-int8"] = lambda: Built(OrtEngine(opt, schedule, "flowpress-ort-int8", threads), [opt])
    if "flowpress-ov-int8" in want:
        ours = export_openvino(
            prepared,
            workdir / "ov-int8" / "model.xml",
            dataclasses.replace(recipe.engine.openvino, precision="int8"),
            calib,
        )
        hint = dataclasses.replace(recipe.engine.openvino, precision="int8").inference_hint
        loaders["flowpress-ov-int8"] = lambda: Built(
            OpenVinoEngine(ours, schedule, hint, "flowpress-ov-int8", threads), _ir_files(ours)
        )
    if "flowpress-ov-bf16" in want:
        ours_bf16 = export_openvino(prepared, workdir / "ov-bf16" / "model.xml", OpenVinoConfig("bf16"))
        loaders["flowpress-ov-bf16"] = lambda: Built(
            OpenVinoEngine(ours_bf16, schedule, "bf16", "flowpress-ov-bf16", threads), _ir_files(ours_bf16)
        )
    return {"loaders": loaders, "calib_inputs": len(calib)}


def _ir_files(xml: Path) -> list[Path]:
    return [xml, xml.with_suffix(".bin")]


# ---------------------------------------------------------------- one model


def bench_model(spec: BenchModel, config: BenchConfig, workdir: Path, progress: bool = True) -> dict[str, Any]:
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
    built_info = build_variants(model, spec, schedule, guidance, config, workdir)
    flops = {b: forward_flops(model, b) for b in config.batches}
    model_batch = 2 if guidance != 1.0 else 1  # classifier-free guidance runs [cond; uncond] as one batch
    rows, profiles, graphs = [], {}, {}
    bar = tqdm(total=len(built_info["loaders"]), desc=f"bench {spec.name}", disable=not progress)
    for variant, load in built_info["loaders"].items():
        gc.collect()
        resettable = _reset_peak_rss()
        built = load()
        with torch.no_grad():
            xs = (
                ref.xs[-1]
                if variant == "torch-fp32"
                else sample_engine(built.engine, ref, guidance, null, config.sample_batch)[-1]
            )
        final_psnr = None if variant == "torch-fp32" else psnr_db(ref.xs[-1], xs)
        hint = None
        if isinstance(built.engine, OpenVinoEngine):
            hint = built.engine.compiled_hint(max(config.batches))
        for batch in config.batches:
            times = step_times_ms(built.engine, batch, shape, config.runs, config.warmup)
            loop_s = loop_seconds(built.engine, batch, shape, guidance, null, config.loops)
            median = float(np.median(times))
            rows.append(
                {
                    "model": spec.name,
                    "variant": variant,
                    "peer": variant in PEERS,
                    "batch": batch,
                    "ms_per_step_median": median,
                    "ms_per_step_p90": float(np.percentile(times, 90)),
                    "runs": len(times),
                    "images_per_s": batch / loop_s,
                    "loop_ms_per_step": loop_s * 1000 / steps,
                    "model_batch_in_loop": batch * model_batch,
                    "size_bytes": sum(f.stat().st_size for f in built.files) if built.files else 4 * params,
                    "peak_rss_mb": _rss_mb("VmHWM"),
                    "peak_rss_scope": "variant" if resettable else "process",
                    "threads": config.threads,
                    "final_psnr_db": final_psnr,
                    "arithmetic": ARITHMETIC[variant],
                    "gop_per_forward": flops[batch] / 1e9,
                    "inference_precision": hint,
                }
            )
        profiles[variant] = top_ops(built.engine, max(config.batches), shape, config.profile_runs)
        if isinstance(built.engine, OrtEngine):
            graphs[variant] = ort_graph_ops(built.engine.path)
        del built
        bar.update()
    bar.close()
    return {
        "model": spec.name,
        "params": params,
        "steps": steps,
        "guidance": guidance,
        "n_samples": spec.n_samples,
        "calibration_inputs": built_info["calib_inputs"],
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
        "sampler_ms_per_step": loop_seconds(bound, 1, shape, guidance, null, config.loops * 3)
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
    peaks = matmul_peaks(config.threads)
    for spec in config.models:
        workdir = work_root / spec.name
        workdir.mkdir(parents=True)
        results.append(bench_model(spec, config, workdir, progress))
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
        "config": {"threads": config.threads, "batches": list(config.batches), "runs": config.runs},
        "machine": _machine(),
        "matmul_peak_gop_per_s": peaks,
        "rows": [row for r in results for row in r["rows"]],
        "models": [{k: v for k, v in r.items() if k != "rows"} for r in results],
        "python_overhead": overhead,
    }
    bench["bars"] = bars(bench["rows"])
    with staged_run(final) as out:
        (out / "bench.json").write_text(json.dumps(bench, indent=2, default=_json_default) + "\n")
        plot_frontier(bench["rows"], out / "frontier.png")
        (out / "bench.md").write_text(bench_markdown(bench))
    shutil.rmtree(work_root, ignore_errors=True)
    return final


def _json_default(value: Any) -> Any:
    if isinstance(value, np.bool_ | np.integer | np.floating):
        return value.item()
    raise TypeError(f"not JSON serialisable: {type(value).__name__}")


def _machine() -> dict[str, Any]:
    import platform

    cpu = "?"
    flags: set[str] = set()
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name") and cpu == "?":
            cpu = line.split(":", 1)[1].strip()
        if line.startswith("flags") and not flags:
            flags = set(line.split(":", 1)[1].split())
    isa = [f for f in ("avx2", "avx512f", "avx512_vnni", "avx512_bf16", "amx_int8", "amx_bf16") if f in flags]
    import os

    return {"cpu": cpu, "cores": os.cpu_count(), "isa": isa, "python": platform.python_version()}


def _row(rows: list[dict[str, Any]], model: str, variant: str, batch: int) -> dict[str, Any] | None:
    return next((r for r in rows if r["model"] == model and r["variant"] == variant and r["batch"] == batch), None)


def bars(rows: list[dict[str, Any]], batch: int = 8) -> list[dict[str, Any]]:
    """The issue's bars, evaluated on this run's rows at `batch`."""
    out = []
    for model in sorted({r["model"] for r in rows}):
        ours, peer = _row(rows, model, "flowpress-ov-int8", batch), _row(rows, model, "ov-nncf-default", batch)
        if ours and peer:
            out.append(
                {
                    "model": model,
                    "bar": "flowpress-ov-int8 vs ov-nncf-default: at least as fast, final PSNR >= 1 dB higher",
                    "speedup": peer["ms_per_step_median"] / ours["ms_per_step_median"],
                    "psnr_gain_db": ours["final_psnr_db"] - peer["final_psnr_db"],
                    "passed": ours["ms_per_step_median"] <= peer["ms_per_step_median"]
                    and ours["final_psnr_db"] - peer["final_psnr_db"] >= 1.0,
                }
            )
        fp = _row(rows, model, "ort-fp32", batch)
        candidates = [r for r in rows if r["model"] == model and r["batch"] == batch and not r["peer"]]
        if fp and candidates:
            best = min(candidates, key=lambda r: r["ms_per_step_median"])
            need = {"speed-dit": 5.0, "digits-unet": 3.0}.get(model)
            speedup = fp["ms_per_step_median"] / best["ms_per_step_median"]
            out.append(
                {
                    "model": model,
                    "bar": f"fastest flowpress engine ({best['variant']}) vs ort-fp32"
                    + (f": >= {need:g}x" if need else " (no bar)"),
                    "speedup": speedup,
                    "passed": speedup >= need if need else None,
                }
            )
        ours, peer = _row(rows, model, "flowpress-ort-int8", batch), _row(rows, model, "ort-quantize-static", batch)
        if ours and peer:
            speedup = peer["ms_per_step_median"] / ours["ms_per_step_median"]
            out.append(
                {
                    "model": model,
                    "bar": "flowpress-ort-int8 vs ort-quantize-static: >= 1.1x faster, final PSNR no lower",
                    "speedup": speedup,
                    "psnr_gain_db": ours["final_psnr_db"] - peer["final_psnr_db"],
                    "passed": speedup >= 1.1 and ours["final_psnr_db"] >= peer["final_psnr_db"],
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


def _fmt(value: float | None, spec: str) -> str:
    return "—" if value is None else format(value, spec)


def bench_markdown(bench: dict[str, Any]) -> str:
    m, peaks = bench["machine"], bench["matmul_peak_gop_per_s"]
    lines = [
        "# CPU engine bench",
        "",
        f"Machine: {m['cpu']}, {m['cores']} cores ({', '.join(m['isa'])}); {bench['config']['threads']} threads for "
        f"every runtime; {bench['config']['runs']} timed runs after warm-up per cell. Shared and noisy: compare within "
        "this file.",
        f"Matrix-multiply peak (one 2048^3 GEMM): fp32 {peaks['fp32']:.0f} GFLOP/s (onnxruntime), int8 "
        f"{peaks['int8']:.0f} GOP/s (onnxruntime MatMulInteger u8 x s8), bf16 {peaks['bf16']:.0f} GFLOP/s (OpenVINO).",
        "",
    ]
    for info in bench["models"]:
        name = info["model"]
        lines += [
            f"## {name}",
            "",
            f"{info['params'] / 1e6:.2f}M parameters, {info['steps']} Euler steps, guidance {info['guidance']:g}; final "
            f"PSNR against the FP (torch) trajectory over {info['n_samples']} fixed seeds; flowpress calibrates on "
            f"{info['calibration_inputs']} trajectory inputs, the peers on as many inputs at random steps.",
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
        gain = f", PSNR {bar['psnr_gain_db']:+.2f} dB" if "psnr_gain_db" in bar else ""
        lines.append(f"- {bar['model']}: {bar['bar']}: {bar['speedup']:.2f}x{gain}: {status}")
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
