"""Graph passes on onnxruntime engines and exported graphs: shape arithmetic folded to constants,
concat slices bypassed, twin quantizers merged, integer matmul biases fused.  Each rewrites a
graph's structure in place and returns how many rewrites it made; the weights stay on disk."""

from __future__ import annotations

from typing import TYPE_CHECKING

from flowpress.export.graphfile import Graph, beside

if TYPE_CHECKING:
    import numpy as np


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
    import onnx
    from onnx import numpy_helper

    graph = source.proto.graph
    if any(a.type in (onnx.AttributeProto.GRAPH, onnx.AttributeProto.GRAPHS) for n in graph.node for a in n.attribute):
        return 0  # control flow: its subgraphs read outer shapes; not worth following
    frontier = _shape_frontier(graph)
    if not frontier:
        return 0
    folded = _folded_constants(graph, frontier, _probe_shapes(source, frontier))
    if not folded:
        return 0
    for name, value in folded.items():
        constant = f"{name}__folded"
        graph.initializer.append(numpy_helper.from_array(value, constant))
        for index, slot in frontier[name]:
            graph.node[index].input[slot] = constant
    _prune_dead_nodes(graph)
    return len(folded)


def _shape_frontier(graph) -> dict[str, list[tuple[int, int]]]:  # noqa: ANN001
    """The tensors computed only from tensor shapes and constants (Shape / Size and what follows
    from them) that other nodes read: tensor -> (node index, input slot) of each such read."""
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
    return frontier


def _probe_shapes(source: Graph, frontier: dict[str, list[tuple[int, int]]]) -> dict[str, list[np.ndarray]]:
    """The values of the frontier tensors, and of the tensors their Reshapes reshape, at each batch of
    SHAPE_PROBE_BATCHES (zero inputs): the graph run unoptimized by onnxruntime with them as extra
    outputs.  Tensors of unknown element type are left out."""
    import numpy as np
    import onnx
    import onnxruntime as ort
    from onnx import helper

    model = source.proto
    graph = model.graph
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
        fetched = [n for n in names if n not in feeds]  # a Reshape of a graph input (Flux's packing) reads the feed
        got = dict(zip(fetched, session.run(fetched, feeds), strict=True))
        for name in names:
            values[name].append(np.asarray(feeds[name] if name in feeds else got[name]))
    return values


def _folded_constants(
    graph,  # noqa: ANN001
    frontier: dict[str, list[tuple[int, int]]],
    values: dict[str, list[np.ndarray]],
) -> dict[str, np.ndarray]:
    """The constant each frontier tensor folds to: its value where every probe agrees, else a
    Reshape target with 0 or -1 at the batch (_batch_reshape_target).  Tensors over
    MAX_FOLDED_ELEMENTS, unprobed, or of neither form are left out (they stay computed)."""
    import numpy as np

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
    return folded


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
