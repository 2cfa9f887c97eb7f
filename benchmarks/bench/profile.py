"""Where an engine's time and memory go: its top operators, the onnxruntime graph it runs, RSS."""

from __future__ import annotations

import json
import tempfile
from pathlib import Path
from typing import Any

import torch

from flowpress.engines import Engine, OrtEngine, TorchEngine
from flowpress.engines.base import graph_feeds
from flowpress.engines.openvino import OpenVinoEngine
from flowpress.export import ort_session
from flowpress.validation.timing import ConditionFn

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


def reset_peak_rss() -> bool:
    """Reset VmHWM to the current RSS (Linux >= 4.0), so the next peak is this variant's."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def top_ops(
    engine: Engine, batch: int, shape: tuple[int, ...], condition: ConditionFn, runs: int
) -> list[dict[str, Any]]:
    """The engine's operator types that took time over `runs` forwards, most expensive first: [{op, ms, share}]."""
    x = torch.randn(batch, *shape, generator=torch.Generator().manual_seed(0))
    step = torch.zeros(batch, dtype=torch.int64)
    cond = condition(batch)
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
    ranked = sorted(totals.items(), key=lambda kv: -kv[1])
    # OpenVINO lists every node, the ones that take no time (constants, reshapes) too
    return [{"op": op, "ms": round(ms, 4), "share": round(ms / whole, 4)} for op, ms in ranked if round(ms, 4) > 0]


# kernels that multiply by a layer's weight (Linear / Conv), by runtime: OpenVINO node types,
# onnxruntime ops that only weight GEMMs become in flowpress's engines (a plain MatMul may be
# attention), torch's aten ops; the rest of an engine's time is attention, norms, activations, layout
WEIGHT_KERNELS = (
    "FullyConnected",
    "FullyConnectedQuantizedLegacy",
    "Convolution",
    "GroupConvolution",
    "MatMulIntegerToFloat",
    "QGemm",
    "Gemm",
    "QLinearConv",
    "ConvInteger",
    "Conv",
    "FusedConv",
    "aten::addmm",
    "aten::mm",
    "aten::mkldnn_convolution",
)


def weight_kernel_share(ops: list[dict[str, Any]]) -> float:
    """The share of an engine's operator time (top_ops) spent in weight-GEMM kernels."""
    return sum(o["share"] for o in ops if o["op"].split(" (")[0] in WEIGHT_KERNELS)


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
