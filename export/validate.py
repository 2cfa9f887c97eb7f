"""Check exported graphs as onnxruntime runs them: parity with torch, integer kernels."""

from __future__ import annotations

import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor, nn

from flowpress.errors import EngineParityError, FlowpressError
from flowpress.export.graphfile import (
    Graph,
    beside,
    engine_data_options,
    large_bytes,
    read_graph,
    tensor_bytes,
    write_graph,
)
from flowpress.models import rows_by_step

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
    prepack: bool = True,
):
    """An onnxruntime CPU session; fp8 graphs run without FP8_DISABLED_OPTIMIZERS unless
    `protect_fp8` is False (only to measure the hazard).  prepack False: weights are not copied
    into the kernels' packed layouts (one copy of a large graph's weights, slower forwards)."""
    import onnxruntime as ort

    opts = ort.SessionOptions()
    opts.graph_optimization_level = {
        "disabled": ort.GraphOptimizationLevel.ORT_DISABLE_ALL,
        "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
        "extended": ort.GraphOptimizationLevel.ORT_ENABLE_EXTENDED,
        "all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
    }[optimization]
    opts.intra_op_num_threads = threads
    opts.log_severity_level = 3
    if not prepack:
        opts.add_session_config_entry("session.disable_prepacking", "1")
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


def build_ort_engine(source: str | Path, engine_path: str | Path) -> dict[str, object]:
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


def _drop_nodes(graph, dropped: set[int]) -> None:  # noqa: ANN001
    """Remove nodes by index (protobuf hands out fresh wrappers: never key nodes by id())."""
    kept = [n for i, n in enumerate(graph.node) if i not in dropped]
    del graph.node[:]
    graph.node.extend(kept)


def merge_twin_quantizers(engine: Graph) -> int:
    """Merge QuantizeLinear nodes that quantize the same tensor with equal scale and zero point
    (the q / k / v projections of an attention block read one tensor, and their input
    quantizers, calibrated on the same data, agree): the first one's output feeds every
    consumer.  Rewrites the graph in place; returns how many were merged."""
    import onnx

    graph = engine.proto.graph
    constants = engine.constants()
    outputs = {o.name for o in graph.output}

    def key(node) -> tuple | None:  # noqa: ANN001
        if any(i not in constants for i in node.input[1:]) or node.output[0] in outputs:
            return None
        values = tuple((str(constants[i].dtype), constants[i].tobytes()) for i in node.input[1:])
        attributes = tuple(sorted((a.name, onnx.helper.get_attribute_value(a)) for a in node.attribute))
        return node.input[0], values, attributes

    kept: dict[tuple, str] = {}
    renamed: dict[str, str] = {}
    dropped = set()
    for index, node in enumerate(graph.node):
        if node.op_type != "QuantizeLinear" or (k := key(node)) is None:
            continue
        if k in kept:
            renamed[node.output[0]] = kept[k]
            dropped.add(index)
        else:
            kept[k] = node.output[0]
    for node in graph.node:
        for i, name in enumerate(node.input):
            if name in renamed:
                node.input[i] = renamed[name]
    _drop_nodes(graph, dropped)
    return len(renamed)


def fuse_integer_matmul_bias(graph) -> int:  # noqa: ANN001
    """Move each constant bias Add behind a MatMulIntegerToFloat into the op's optional bias input
    (onnxruntime's QDQ fusion leaves it a separate Add: one more pass over every Linear's
    output).  Rewrites `graph` in place; returns how many were fused."""
    from onnx import TensorProto

    constants = {t.name: t for t in graph.initializer}
    consumers: dict[str, list[int]] = {}
    for index, node in enumerate(graph.node):
        for name in node.input:
            consumers.setdefault(name, []).append(index)
    outputs = {o.name for o in graph.output}
    dropped = set()
    for node in graph.node:
        if node.op_type != "MatMulIntegerToFloat" or len(node.input) > 6 or node.output[0] in outputs:
            continue
        users = consumers.get(node.output[0], [])
        if len(users) != 1 or graph.node[users[0]].op_type != "Add":
            continue
        add = graph.node[users[0]]
        bias = next((constants[i] for i in add.input if i != node.output[0] and i in constants), None)
        n_out = constants[node.input[1]].dims[-1] if node.input[1] in constants else None
        if bias is None or bias.data_type != TensorProto.FLOAT or list(bias.dims) != [n_out]:
            continue
        node.input.extend([""] * (6 - len(node.input)) + [bias.name])
        node.output[0] = add.output[0]
        dropped.add(users[0])
    _drop_nodes(graph, dropped)
    return len(dropped)


SHAPE_PROBE_BATCHES = (2, 3, 5)
MAX_FOLDED_ELEMENTS = 1 << 16


def fold_batch_shapes(source: Graph) -> int:
    """Replace the shape arithmetic of a batch-dynamic graph with constants.

    torch's exporter computes every Reshape target (and the attention scale) from Shape ->
    Gather -> Unsqueeze -> Concat chains: hundreds of tiny nodes onnxruntime runs each forward.
    Each tensor computed only from tensor shapes and constants is evaluated at batches
    SHAPE_PROBE_BATCHES: one that never changes becomes a constant; a Reshape target that
    changes only where it equals the batch becomes a constant with 0 or -1 there (see
    _batch_reshape_target).  Anything else stays computed.  Rewrites the graph in place (dead
    nodes pruned); returns how many tensors were folded."""
    import numpy as np
    import onnx
    import onnxruntime as ort
    from onnx import helper, numpy_helper

    model = source.proto
    graph = model.graph
    if any(a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS) for n in graph.node for a in n.attribute):
        return 0  # control flow: its subgraphs read outer shapes; not worth following
    static = {t.name for t in graph.initializer} | {""}
    derived: set[str] = set()
    for node in graph.node:
        if node.op_type == "Constant":
            static.update(node.output)
        elif node.op_type in ("Shape", "Size") or (
            all(i in static or i in derived for i in node.input) and any(i in derived for i in node.input)
        ):
            derived.update(node.output)
    frontier: dict[str, list[tuple[int, int]]] = {}  # tensor -> (node index, input slot) outside the chains
    for index, node in enumerate(graph.node):
        if not set(node.output) <= derived:
            for slot, name in enumerate(node.input):
                if name in derived:
                    frontier.setdefault(name, []).append((index, slot))
    if not frontier:
        return 0

    inferred = onnx.shape_inference.infer_shapes(model).graph
    types = {v.name: v.type.tensor_type.elem_type for v in [*inferred.value_info, *graph.input, *graph.output]}
    reshaped = [
        graph.node[i].input[0] for uses in frontier.values() for i, _ in uses if graph.node[i].op_type == "Reshape"
    ]
    names = [n for n in dict.fromkeys([*frontier, *reshaped]) if types.get(n)]
    probe = onnx.ModelProto()
    probe.CopyFrom(model)
    outputs = {o.name for o in graph.output} | {i.name for i in graph.input}
    probe.graph.output.extend(helper.make_tensor_value_info(n, types[n], None) for n in names if n not in outputs)
    options = ort.SessionOptions()
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_DISABLE_ALL
    options.log_severity_level = 3
    with beside(Graph(probe, source.base), "shape-probe") as probe_path:
        session = ort.InferenceSession(str(probe_path), options, providers=["CPUExecutionProvider"])
    del probe
    initializers = {t.name for t in graph.initializer}
    values: dict[str, list[np.ndarray]] = {n: [] for n in names}
    for batch in SHAPE_PROBE_BATCHES:
        feeds = {}
        for graph_input in graph.input:
            if graph_input.name in initializers:
                continue
            tensor_type = graph_input.type.tensor_type
            shape = [d.dim_value if d.HasField("dim_value") else batch for d in tensor_type.shape.dim]
            feeds[graph_input.name] = np.zeros(shape, helper.tensor_dtype_to_np_dtype(tensor_type.elem_type))
        got = session.run(names, feeds)
        for name, value in zip(names, got, strict=True):
            values[name].append(np.asarray(value))

    folded: dict[str, np.ndarray] = {}
    for name in frontier:
        if name not in values or values[name][0].size > MAX_FOLDED_ELEMENTS:
            continue
        first, *rest = values[name]
        if all(v.shape == first.shape and v.dtype == first.dtype and np.array_equal(v, first) for v in rest):
            folded[name] = first
        elif all(graph.node[i].op_type == "Reshape" and slot == 1 for i, slot in frontier[name]):
            data = [values.get(graph.node[i].input[0]) for i, _ in frontier[name]]
            target = None if any(d is None for d in data) else _batch_reshape_target(values[name], data)
            if target is not None:
                folded[name] = target
    if not folded:
        return 0
    for name, value in folded.items():
        constant = f"{name}__folded"
        graph.initializer.append(numpy_helper.from_array(value, constant))
        for index, slot in frontier[name]:
            graph.node[index].input[slot] = constant
    _prune_dead_nodes(graph)
    return len(folded)


def bypass_concat_slices(source: Graph) -> int:
    """Read each slice of a Concat that is exactly one of its inputs from that input.

    Split shortcuts (compress/shortcut.py) slice the decoder's cat[h, skip] back into h and
    skip; the slices copy what the Concat just copied.  Rewrites the graph in place (the Slice
    nodes pruned when nothing else reads them); returns how many slices were bypassed."""
    import onnx
    from onnx import numpy_helper

    model = source.proto
    graph = model.graph
    constants = source.constants()
    constants |= {
        n.output[0]: numpy_helper.to_array(n.attribute[0].t)
        for n in graph.node
        if n.op_type == "Constant" and n.attribute and n.attribute[0].name == "value"
    }
    inferred = onnx.shape_inference.infer_shapes(model).graph
    dims: dict[str, list[int | None]] = {}
    for value in [*inferred.value_info, *graph.input]:
        shape = value.type.tensor_type.shape.dim
        dims[value.name] = [d.dim_value if d.HasField("dim_value") else None for d in shape]
    producers = {o: n for n in graph.node for o in n.output}
    renamed: dict[str, str] = {}
    for node in graph.node:
        concat = producers.get(node.input[0]) if node.op_type == "Slice" else None
        if concat is None or concat.op_type != "Concat" or len(node.input) < 4:
            continue
        params = [int(p.item()) for name in node.input[1:5] if (p := constants.get(name)) is not None and p.size == 1]
        if len(params) != len(node.input) - 1 or params[3:] not in ([], [1]):
            continue  # starts, ends, axes (and steps) must be single constants, steps 1
        start, end, axis = params[:3]
        concat_axis = next(a.i for a in concat.attribute if a.name == "axis")
        rank = len(dims.get(concat.output[0], []))
        if rank == 0 or axis % rank != concat_axis % rank:
            continue
        offset = 0
        for name in concat.input:
            width = (dims.get(name) or [None] * rank)[axis % rank]
            if width is None:
                break
            if start == offset and end >= offset + width and (end == offset + width or name == concat.input[-1]):
                renamed[node.output[0]] = name
                break
            offset += width
    for node in graph.node:
        for i, name in enumerate(node.input):
            if name in renamed:
                node.input[i] = renamed[name]
    if renamed:
        _prune_dead_nodes(graph)
    return len(renamed)


def _batch_reshape_target(values, data):  # noqa: ANN001, ANN202
    """A Reshape target probed at SHAPE_PROBE_BATCHES (`values`; `data`: the reshaped tensors,
    per consumer, per batch) that differs between them only at one position, holding the batch
    there: that target with 0 there (copy the input's dim) where every input has the batch at
    that position too, else with -1 (the element count is the batch times the rest).  None when
    it is not of that form, or has another 0 / -1 that would make either ambiguous."""
    import numpy as np

    if any(v.ndim != 1 or v.dtype != np.int64 or v.shape != values[0].shape for v in values):
        return None
    stacked = np.stack(values)
    varying = np.flatnonzero((stacked != stacked[0]).any(axis=0))
    if len(varying) != 1 or list(stacked[:, varying[0]]) != list(SHAPE_PROBE_BATCHES):
        return None
    at = int(varying[0])
    target = values[0].copy()
    rest = np.delete(target, at)
    if (rest == 0).any() or (rest < -1).any():
        return None
    batch_in_place = all(
        tensor.ndim > at and tensor.shape[at] == batch
        for tensors in data
        for tensor, batch in zip(tensors, SHAPE_PROBE_BATCHES, strict=True)
    )
    if batch_in_place:
        target[at] = 0
    elif (rest == -1).any():
        return None
    else:
        target[at] = -1
    return target


def _prune_dead_nodes(graph) -> None:  # noqa: ANN001
    """Drop nodes none of whose outputs reach a graph output."""
    live = {o.name for o in graph.output}
    dropped = set()
    for index in range(len(graph.node) - 1, -1, -1):
        node = graph.node[index]
        if any(o in live for o in node.output):
            live.update(node.input)
        else:
            dropped.add(index)
    _drop_nodes(graph, dropped)
    used = {i for n in graph.node for i in n.input} | {i.name for i in graph.input}
    kept = [t for t in graph.initializer if t.name in used]
    del graph.initializer[:]
    graph.initializer.extend(kept)


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
    prepack = tensor_bytes(read_graph(path)) <= large_bytes()  # a large graph's check holds one copy of it
    for level in levels:
        session = ort_session(path, level, prepack=prepack)
        got = torch.empty_like(expected)
        for rows in rows_by_step(feeds["step"]):  # graphs with per-step scales take one step per batch
            got[rows] = torch.from_numpy(session.run(None, {k: v[rows].numpy() for k, v in feeds.items()})[0])
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
