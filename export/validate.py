"""Check exported graphs as onnxruntime runs them: parity with torch, integer kernels."""

from __future__ import annotations

import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn

from flowpress.errors import EngineParityError, FlowpressError
from flowpress.export.graphfile import (
    beside,
    engine_data_options,
    read_graph,
    write_graph,
)
from flowpress.export.passes import (
    bypass_concat_slices,
    fold_batch_shapes,
    fuse_integer_matmul_bias,
    merge_twin_quantizers,
)
from flowpress.models import rows_by_step
from flowpress.ranks import runtime_threads

OPT_LEVELS = ("disabled", "all")
WEIGHT_OPS = ("Conv", "MatMul", "Gemm", "FusedConv", "FusedGemm", "FusedMatMul")
# onnxruntime's QDQPropagationTransformer (level BASIC and above) copies a DequantizeLinear past
# Reshape / Transpose / ... as a new Q -> DQ pair.  At opset < 21 a DQ without a zero point gives
# that Q no type but the default: uint8, which clamps every negative fp8 value to 0 (measured:
# max |error| 0.96 on values in [-1, 1], tests/test_fp8.py; microsoft/onnxruntime#27845).
# fp8 has no CPU kernels to fuse, so the pass buys nothing there: it stays off for fp8 graphs.
FP8_DISABLED_OPTIMIZERS = ("QDQPropagationTransformer",)


def is_fp8_graph(path: str | Path) -> bool:
    """True when the ONNX file at `path` carries any float8 tensor (weights not loaded)."""
    import onnx

    from flowpress.export.lint import uses_fp8

    return uses_fp8(onnx.load(str(path), load_external_data=False))


def ort_session(  # noqa: ANN201
    path: str | Path,
    optimization: str = "all",
    threads: int = 0,
    optimized_path: str | None = None,
    protect_fp8: bool = True,
):
    """An onnxruntime CPU session; fp8 graphs run without FP8_DISABLED_OPTIMIZERS unless
    `protect_fp8` is False (only to measure the hazard)."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.graph_optimization_level = {
        "disabled": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
        "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
        "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
        "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
    }[optimization]
    opts.intra_op_num_threads = threads or runtime_threads()
    opts.log_severity_level = 3
    if optimized_path:
        opts.optimized_model_filepath = optimized_path
        engine_data_options(read_graph(path), opts, optimized_path)
    disabled = list(FP8_DISABLED_OPTIMIZERS) if protect_fp8 and is_fp8_graph(path) else []
    from flowpress.export.lowrank import W4A4_DISABLED_OPTIMIZER, W4A4_MATMUL_ACCURACY, is_w4a4_graph

    if is_w4a4_graph(path):
        disabled.append(W4A4_DISABLED_OPTIMIZER)
        opts.add_session_config_entry("session.qdq_matmulnbits_accuracy_level", W4A4_MATMUL_ACCURACY)
    return ort.InferenceSession(str(path), opts, providers=["CPUExecutionProvider"], disabled_optimizers=disabled)


def _quantized_type(node, constants: dict) -> int:  # noqa: ANN001
    """The element type a QuantizeLinear outputs: its zero point's, else output_dtype, else uint8."""
    from onnx import TensorProto

    zero_point = constants.get(node.input[2]) if len(node.input) > 2 and node.input[2] else None
    if zero_point is not None:
        return int(zero_point.data_type)
    output_dtype = next((a.i for a in node.attribute if a.name == "output_dtype"), TensorProto.UNDEFINED)
    return int(output_dtype) if output_dtype != TensorProto.UNDEFINED else TensorProto.UINT8


def non_fp8_quantizers(proto) -> list[str]:  # noqa: ANN001
    """QuantizeLinear nodes of a graph whose output is not float8 (uint8 when a Q has neither
    zero point nor output_dtype).  An fp8 graph that onnxruntime optimized without
    FP8_DISABLED_OPTIMIZERS can gain such nodes; ours must have none."""
    from flowpress.export.lint import _constants, _float8_types

    constants = _constants(proto.graph)
    float8 = _float8_types()
    return [
        n.name
        for n in proto.graph.node
        if n.op_type == "QuantizeLinear" and _quantized_type(n, constants) not in float8
    ]


def qdq_types(path: str | Path) -> list[str]:
    """The element types a graph quantizes to (its Q outputs and constant DQ inputs), e.g.
    ['FLOAT8E4M3FN'] or ['INT8', 'UINT8']."""
    import onnx
    from onnx import TensorProto

    from flowpress.export.lint import _constants

    graph = onnx.load(str(path), load_external_data=False).graph
    constants = _constants(graph)
    types = {_quantized_type(n, constants) for n in graph.node if n.op_type == "QuantizeLinear"}
    types |= {
        constants[n.input[0]].data_type
        for n in graph.node
        if n.op_type == "DequantizeLinear" and n.input[0] in constants
    }
    return sorted(TensorProto.DataType.Name(t) for t in types)


def save_ort_engine(source: str | Path, engine_path: str | Path) -> dict[str, object]:
    """Save `source` as onnxruntime optimizes it (level extended) to `engine_path`, its shape
    arithmetic folded and concat slices bypassed first; an fp8 engine is refused if it gained a
    non-fp8 QuantizeLinear; then twin quantizers are merged and Linear biases folded into the
    integer matmuls.  Returns the engine manifest's facts: qdq_types (of the engine file), the
    optimizers kept off and the four rewrites' counts."""
    fp8 = is_fp8_graph(source)
    shapes = read_graph(source)
    folded = fold_batch_shapes(shapes)
    bypassed = bypass_concat_slices(shapes)
    if folded or bypassed:
        with beside(shapes, "folded") as folded_graph:
            ort_session(folded_graph, "extended", optimized_path=str(engine_path))
    else:
        ort_session(source, "extended", optimized_path=str(engine_path))
    del shapes
    if fp8:
        corrupted = non_fp8_quantizers(read_graph(engine_path).proto)
        if corrupted:
            raise FlowpressError(
                f"{engine_path}: onnxruntime inserted {len(corrupted)} non-fp8 QuantizeLinear nodes into the fp8 "
                f"engine (first: {corrupted[0]}); an optimizer besides {', '.join(FP8_DISABLED_OPTIMIZERS) or 'none'} "
                "rewrites fp8 Q/DQ: add it to export.validate.FP8_DISABLED_OPTIMIZERS"
            )
    engine = read_graph(engine_path)
    merged = merge_twin_quantizers(engine)
    fused = fuse_integer_matmul_bias(engine.proto.graph)
    if merged or fused:  # written aside, then renamed over: never a half-written engine file
        write_graph(engine, engine_path)
    return {
        "qdq_types": qdq_types(engine_path),
        "disabled_optimizers": list(FP8_DISABLED_OPTIMIZERS) if fp8 else [],
        "folded_shape_tensors": folded,
        "bypassed_concat_slices": bypassed,
        "merged_quantizers": merged,
        "fused_bias_adds": fused,
    }


def cosine_per_sample(a: Tensor, b: Tensor) -> Tensor:
    """(B,) cosine similarity between a[i] and b[i], flattened."""
    return torch.nn.functional.cosine_similarity(a.flatten(1).double(), b.flatten(1).double(), dim=1)


@dataclass(frozen=True)
class Parity:
    """min_cosine: worst per-sample cosine(ORT, reference); noise_ratio: mean over samples of
    ||ORT - fake-quant|| / ||fake-quant - FP|| (None for FP graphs)."""

    optimization: str
    min_cosine: float
    noise_ratio: float | None


def check_parity(
    path: str | Path,
    reference: nn.Module,
    feeds: dict[str, Tensor],
    fp_reference: nn.Module | None = None,
    max_noise_ratio: float = 2.0,
    min_cosine: float = 0.99999,
    levels: tuple[str, ...] = OPT_LEVELS,
) -> list[Parity]:
    """Run the graph with onnxruntime optimizations off and on and compare every forward.

    reference: a StepModel (x, step[, class_labels]) -> v.  For a Q/DQ graph pass the fake-quant
    model as `reference` and the FP model as `fp_reference`: rounding flips amplify through
    chained 8-bit quantizers, so the graph need not match fake-quant bit for bit, only stay
    within `max_noise_ratio` times the quantization noise itself.  FP graphs need `min_cosine`.
    Optimizations off run Q/DQ graphs on float kernels (the quantized math, exactly); on, on the
    host's integer kernels.  Raises EngineParityError (with .results so far) at the first level
    that disagrees.
    """
    with torch.no_grad():
        expected = reference(*feeds.values())
        fp = None if fp_reference is None else fp_reference(*feeds.values())
    results = []
    for level in levels:
        session = ort_session(path, level)
        got = torch.empty_like(expected)
        for rows in rows_by_step(feeds["step"]):  # graphs with per-step scales take one step per batch
            got[rows] = torch.from_numpy(session.run(None, {k: v[rows].numpy() for k, v in feeds.items()})[0])
        del session  # before the next level's: two sessions of a large graph at once are two copies of its weights
        cos = float(cosine_per_sample(got, expected).min())
        ratio = None
        if fp is not None:
            noise = (expected - fp).flatten(1).norm(dim=1).clamp_min(1e-12)
            ratio = float(((got - expected).flatten(1).norm(dim=1) / noise).mean())
        results.append(Parity(level, cos, ratio))
        broken = (ratio is not None and not ratio <= max_noise_ratio) or (ratio is None and not cos >= min_cosine)
        if broken:
            measure = (
                f"noise ratio {ratio:.3f} > {max_noise_ratio}"
                if ratio is not None
                else f"min cosine {cos:.6f} < {min_cosine}"
            )
            raise EngineParityError(
                f"{path}: onnxruntime (optimizations {level}) disagrees with the torch model ({measure})",
                tuple(results),
            )
    return results


def float_weight_ops(path: str | Path) -> list[str]:
    """Names of float Conv / MatMul / Gemm nodes whose weight is a constant (or a dequantized
    constant) in the graph onnxruntime runs; activation x activation MatMuls are not counted."""

    with tempfile.TemporaryDirectory() as tmp:
        out = str(Path(tmp) / "optimized.onnx")
        ort_session(path, "extended", optimized_path=out)
        graph = read_graph(out).proto.graph
    constants = {init.name for init in graph.initializer}
    constants |= {
        o for n in graph.node if n.op_type == "DequantizeLinear" and n.input[0] in constants for o in n.output
    }
    return [n.name for n in graph.node if n.op_type in WEIGHT_OPS and len(n.input) > 1 and n.input[1] in constants]
