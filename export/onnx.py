"""torch -> ONNX: the engine-facing graph (x, step, *conditioning) -> v, with Q/DQ flavours."""

from __future__ import annotations

import tempfile
import warnings
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Literal

import numpy as np
import torch

from flowpress.compress import LayerQuant, QuantizedModel, backend_named
from flowpress.compress.model import UNSIGNED_ZERO_POINT
from flowpress.errors import FlowpressError
from flowpress.export.graphfile import Graph, check_graph, read_graph, write_graph
from flowpress.export.learned import learned_dequantize, learned_weight
from flowpress.export.symbolics import register_symbolics
from flowpress.models import StepModel

if TYPE_CHECKING:
    from onnx import NodeProto

Flavour = Literal["ort-cpu", "tensorrt"]
WRAPPED = "model"  # StepModel's attribute holding the denoiser: layer names are relative to it
# what torch's TorchScript exporter says on every export of these graphs (checked to be harmless:
# the parity checks compare every exported graph with the torch model)
EXPORTER_NOTICES = (
    r"Converting a tensor to a Python (boolean|integer) might cause the trace to be incorrect",  # shape arithmetic in diffusers / torch, constant per export
    r"You are using the legacy TorchScript-based ONNX export",  # dynamo=False on purpose (modelopt's quantizers)
    r"The feature will be removed\. Please remove usage of this function",  # the same exporter, internally
    r"Exporting to ONNX opset version 21 is not supported",  # W4A8's INT4 DequantizeLinear: torch writes opset 20 ops, we add the 21 ones
)


@dataclass(frozen=True)
class ExportConfig:
    """flavour: 'ort-cpu' (uint8 activations, zero-point 128; int8 per-channel weights, or uint8
    with zero-point 128 where the layer says weight_unsigned; Conv
    outputs quantized so onnxruntime fuses QLinearConv) or 'tensorrt' (all int8, zero-point 0;
    or, for a model quantized with precision 'fp8', all FLOAT8E4M3FN with zero-point 0, opset >= 19)."""

    flavour: Flavour = "ort-cpu"
    opset: int = 19

    def __post_init__(self) -> None:
        if self.flavour not in ("ort-cpu", "tensorrt"):
            raise FlowpressError(f"export: flavour must be 'ort-cpu' or 'tensorrt', got {self.flavour!r}")


def export_onnx(
    model: StepModel,
    path: str | Path,
    config: ExportConfig = ExportConfig(),
    quant: QuantizedModel | None = None,
    source: Path | None = None,
) -> Path:
    """Write the FP graph of a step model to `path` (inputs x, step, *cond_names; output v), with
    Q/DQ when `quant` is given.

    Q/DQ nodes are placed from quant.layers (modelopt's calibrated amax values) on the
    full-precision graph, so placement is ours and the same for every backend.  source: the same
    step model's FP graph, written by export_onnx at config.opset: the Q/DQ graph is placed on it
    instead of tracing the model again (a large model's tracing costs minutes and a copy of its weights).
    """
    path = Path(path)
    with tempfile.TemporaryDirectory(prefix=f".{path.name}.export-", dir=path.parent) as scratch:
        graph = read_graph(source) if source is not None else _traced(model, Path(scratch), config.opset)
        if quant is not None:
            if config.opset < 21 and any(layer.weight_bits == 4 for layer in quant.layers.values()):
                raise FlowpressError(
                    f"export: int4 weights need ONNX opset >= 21, got export.opset {config.opset}; set it to 21"
                )
            insert_qdq(graph, quant.layers, config.flavour)
        written = write_graph(graph, path)
    try:
        check_graph(path)
    except Exception:
        for file in written:
            file.unlink(missing_ok=True)
        raise
    return path


def _traced(model: StepModel, scratch: Path, opset: int) -> Graph:
    """The FP graph of a step model, traced by torch's exporter into `scratch` (a graph over 2 GB
    is written as one file per tensor there, beside the target: write_graph consolidates it)."""
    step_model, raw = model.eval(), scratch / "exported.onnx"
    names = ["x", "step", *step_model.cond_names]
    register_symbolics(opset)
    with warnings.catch_warnings():
        for message in EXPORTER_NOTICES:
            warnings.filterwarnings("ignore", message=message)
        torch.onnx.export(
            step_model, tuple(step_model.example_inputs(2)), str(raw), input_names=names, output_names=["v"],
            dynamic_axes={name: {0: "batch"} for name in [*names, "v"]}, opset_version=opset, dynamo=False,
        )  # fmt: skip
    graph = read_graph(raw)
    resolve_shape_ifs(graph)
    dims = graph.proto.graph.output[0].type.tensor_type.shape.dim[1:]
    for dim, size in zip(dims, step_model.sample_shape, strict=True):  # v has x's shape; the exporter loses it
        dim.Clear()  # through the step bounds check's broadcast
        dim.dim_value = size
    return graph


def resolve_shape_ifs(graph: Graph) -> int:
    """Inline the If nodes torch's exporter writes for a squeeze of a dimension it could not size
    (If(Equal(Gather(Shape(t), k), c)) -> Squeeze / Identity; PixArt's output does this): where
    shape inference knows t's dim k, the branch it selects replaces the If.  onnxruntime refuses to
    load such a graph otherwise (it type-checks the branch that never runs).  Returns how many."""
    import onnx
    from onnx import helper, numpy_helper

    proto = graph.proto
    ifs = [i for i, n in enumerate(proto.graph.node) if n.op_type == "If"]
    if not ifs:
        return 0
    inferred = onnx.shape_inference.infer_shapes(proto).graph
    dims = {
        v.name: [d.dim_value if d.HasField("dim_value") else None for d in v.type.tensor_type.shape.dim]
        for v in [*inferred.value_info, *inferred.input, *inferred.output]
    }
    producers = {o: n for n in proto.graph.node for o in n.output}
    constants = graph.constants()
    for node in proto.graph.node:
        if node.op_type == "Constant":
            constants[node.output[0]] = numpy_helper.to_array(node.attribute[0].t)
    replaced: dict[int, list] = {}
    for index in ifs:
        node = proto.graph.node[index]
        equal = producers.get(node.input[0])
        if equal is None or equal.op_type != "Equal" or equal.input[1] not in constants:
            continue
        gather = producers.get(equal.input[0])
        if gather is None or gather.op_type != "Gather" or gather.input[1] not in constants:
            continue
        shape = producers.get(gather.input[0])
        if shape is None or shape.op_type != "Shape":
            continue
        axis_value, compared = constants[gather.input[1]], constants[equal.input[1]]
        if axis_value.size != 1 or compared.size != 1:
            continue
        axis, value = int(axis_value.reshape(-1)[0]), int(compared.reshape(-1)[0])
        size = (dims.get(shape.input[0]) or [None] * (axis + 1))[axis]
        if size is None:
            continue
        branch = next(a.g for a in node.attribute if a.name == ("then_branch" if size == value else "else_branch"))
        nodes = list(branch.node)
        for out, inner in zip(node.output, branch.output, strict=True):
            nodes.append(helper.make_node("Identity", [inner.name], [out], name=f"{node.name}/resolved"))
        replaced[index] = nodes
    if replaced:
        kept = []
        for i, n in enumerate(proto.graph.node):
            kept.extend(replaced.get(i, [n]))
        del proto.graph.node[:]
        proto.graph.node.extend(kept)
    return len(replaced)


def _module_of(node_name: str) -> str:
    """'/model/net/down_blocks.0/resnets.0/conv1/Conv' -> 'net.down_blocks.0.resnets.0.conv1'."""
    scope = node_name.strip("/").split("/")[:-1]
    if scope and scope[0] == WRAPPED:
        scope = scope[1:]
    return ".".join(scope)


def _check_fp8(proto, layers: dict[str, LayerQuant], flavour: Flavour) -> bool:  # noqa: ANN001
    """True when the layers are fp8; fp8 needs the tensorrt flavour and opset >= 19."""
    from flowpress.export.lint import MIN_OPSET_FP8

    e4m3 = {backend_named(layer.precision).e4m3 for layer in layers.values()}
    if e4m3 != {True}:
        if True in e4m3:
            raise FlowpressError("export: int8 and fp8 layers in one model; quantize with one precision")
        return False
    if flavour != "tensorrt":
        raise FlowpressError(f"export: fp8 Q/DQ is symmetric E4M3: set export.flavour to 'tensorrt' (got {flavour!r})")
    opset = next((e.version for e in proto.opset_import if e.domain in ("", "ai.onnx")), 0)
    if opset < MIN_OPSET_FP8:
        raise FlowpressError(f"export: fp8 Q/DQ needs opset >= {MIN_OPSET_FP8}; set export.opset (got {opset})")
    return True


def _shifted_bias(node, shift, graph: Graph, inits, consumers, rewired, prefix: str):  # noqa: ANN001, ANN202
    """The layer's bias plus its bias-correction shift as a new initializer `<prefix>.bias`, wired
    in place of the bias it replaces: a Conv's / Gemm's third input, a MatMul's following Add."""
    from onnx import numpy_helper

    if node.op_type in ("Conv", "Gemm") and len(node.input) > 2 and node.input[2] in inits:
        owner, index = node, 2
    else:
        adds = [
            (n, i)
            for n in consumers.get(node.output[0], [])
            if n.op_type == "Add"
            for i, name in enumerate(n.input)
            if name in inits and tuple(inits[name].dims) == tuple(shift.shape)
        ]
        if node.op_type != "MatMul" or len(adds) != 1:
            raise FlowpressError(f"export: no bias found for {node.name} to apply its bias correction to")
        owner, index = adds[0]
    bias = graph.array(inits[owner.input[index]]).astype(np.float32) + shift.numpy().astype(np.float32)
    name = f"{prefix}.bias"
    if owner is node:
        node.input[index] = name  # the rewritten node copies node.input[2:]
    else:
        rewired[id(owner)] = (index, name)
    return numpy_helper.from_array(bias.astype(np.float32), name)


def insert_qdq(qdq_graph: Graph, layers: dict[str, LayerQuant], flavour: Flavour) -> None:
    """Rewrite every Conv / MatMul / Gemm of a quantized layer into DQ(W) and Q/DQ(x): int8 W
    (and uint8 or int8 x by flavour), or, for fp8 layers, FLOAT8E4M3FN W and x.  Float weights
    are read one at a time (from the data file when the graph has one)."""
    from onnx import helper

    proto, graph = qdq_graph.proto, qdq_graph.proto.graph
    inits = {init.name: init for init in graph.initializer}
    fp8 = _check_fp8(proto, layers, flavour)
    new_nodes = []
    new_inits = []
    found: set[str] = set()
    consumers: dict[str, list] = {}
    for node in graph.node:
        for name in node.input:
            consumers.setdefault(name, []).append(node)
    rewired: dict[int, tuple[int, str]] = {}  # id(node) -> (input index, corrected bias) for a MatMul's bias Add
    for node in graph.node:
        name = _module_of(node.name)
        layer = layers.get(name)
        if layer is None or node.op_type not in ("Conv", "MatMul", "Gemm") or node.input[1] not in inits:
            new_nodes.append(node)
            continue
        found.add(name)
        weight = qdq_graph.array(inits[node.input[1]]).astype(np.float32)
        if node.op_type == "Gemm":
            attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute}
            if attrs.get("transA", 0) or attrs.get("alpha", 1.0) != 1.0 or attrs.get("beta", 1.0) != 1.0:
                raise FlowpressError(f"export: Gemm {node.name} has transA/alpha/beta; cannot place Q/DQ on it")
            if attrs.get("transB", 0):
                weight = weight.T
        if backend_named(layer.precision).low_rank:
            from flowpress.export.lowrank import lowrank_nodes

            nodes, inits_w4a4 = lowrank_nodes(layer, node, weight.shape, name, len(found))
            new_nodes += nodes
            new_inits += inits_w4a4
            continue
        new_nodes += _operand_qdq(layer, node, weight, name, flavour, fp8, new_inits)
        if layer.bias_shift is not None:
            new_inits.append(_shifted_bias(node, layer.bias_shift, qdq_graph, inits, consumers, rewired, name))
        new_nodes += _quantized_op(layer, node, name, flavour, new_inits)
    for node in new_nodes:
        if id(node) in rewired:
            index, name = rewired[id(node)]
            node.input[index] = name
    if any(backend_named(layer.precision).low_rank for layer in layers.values()):
        from flowpress.export.lowrank import shared_initializers

        new_inits += shared_initializers()
    if any(n.op_type == "Gather" and n.input[1] == STEP_INDEX for n in new_nodes):
        new_nodes, extra = _one_step_per_batch(graph, new_nodes)
        new_inits += extra
    missing = sorted(set(layers) - found)
    if missing:
        raise FlowpressError(f"export: quantized layers not found in the ONNX graph: {', '.join(missing[:5])}")
    del graph.node[:]
    graph.node.extend(new_nodes)
    used = {i for n in graph.node for i in n.input}
    kept = [init for init in graph.initializer if init.name in used]
    del graph.initializer[:]
    graph.initializer.extend(kept + new_inits)


def _operand_qdq(
    layer: LayerQuant, node: NodeProto, weight: np.ndarray, prefix: str, flavour: Flavour, fp8: bool, inits: list
) -> list[NodeProto]:
    """Q/DQ(x) into `<prefix>.input_dq` and DQ(W) into `<prefix>.weight_dq`, initializers appended to `inits`:
    x per tensor (or per step); W (float, as the graph has it) symmetric per output channel, or W4A8's integers."""
    from onnx import helper, numpy_helper

    from flowpress.export.fp8 import E4M3_MAX, e4m3_initializer

    act_dtype, act_zp = (np.uint8, 128) if flavour == "ort-cpu" else (np.int8, 0)
    qmax = E4M3_MAX if fp8 else 127.0
    nodes = []
    if flavour == "ort-cpu" and layer.input_amax_steps is not None:
        nodes.append(_scale_by_step(f"{prefix}.input_scale", layer.input_amax_steps, qmax, inits))
        input_scale = []
    else:
        scale = np.array(max(float(layer.input_amax), 1e-12) / qmax, np.float32)
        input_scale = [numpy_helper.from_array(scale, f"{prefix}.input_scale")]
    input_zp = numpy_helper.from_array(np.array(act_zp, act_dtype), f"{prefix}.input_zero_point")
    if layer.weight_int is not None:  # learned W4A8 weights, (C_in, C_out) for MatMul / Gemm as the graph has them
        inits += [*learned_weight(layer, node, weight.shape, prefix), *input_scale, input_zp]
        weight_dq = learned_dequantize(layer, node, prefix)
    else:
        axis = 0 if node.op_type == "Conv" else 1  # MatMul weights are (in, out)
        w_qmax = qmax if fp8 else float(2 ** (layer.weight_bits - 1) - 1)
        w_scale = np.maximum(layer.weight_amax.numpy().astype(np.float32), 1e-12) / w_qmax
        bshape = [-1 if dim == axis else 1 for dim in range(weight.ndim)]
        w_name = f"{prefix}.weight_fp8" if fp8 else f"{prefix}.weight_int8"
        if fp8:
            w_q = e4m3_initializer(weight / w_scale.reshape(bshape), w_name)
            w_zp = e4m3_initializer(np.zeros_like(w_scale), f"{prefix}.weight_zero_point")
            input_zp = e4m3_initializer(np.zeros((), np.float32), f"{prefix}.input_zero_point")
        else:
            # symmetric, as the torch quantizer (narrow range): a clipped range puts weights beyond it
            w_int = np.clip(np.round(weight / w_scale.reshape(bshape)), -w_qmax, w_qmax)
            zero_point = np.zeros_like(w_scale, dtype=np.int8)
            if flavour == "ort-cpu" and layer.weight_unsigned:  # the same values, U8U8 kernels
                w_int = w_int + UNSIGNED_ZERO_POINT
                zero_point = np.full(w_scale.shape, UNSIGNED_ZERO_POINT, np.uint8)
            w_q = numpy_helper.from_array(w_int.astype(zero_point.dtype), w_name)
            w_zp = numpy_helper.from_array(zero_point, f"{prefix}.weight_zero_point")
        inits += [w_q, numpy_helper.from_array(w_scale, f"{prefix}.weight_scale"), w_zp, *input_scale, input_zp]
        weight_dq = helper.make_node("DequantizeLinear", [w_name, f"{prefix}.weight_scale", f"{prefix}.weight_zero_point"], [f"{prefix}.weight_dq"], name=f"{prefix}.weight_DQ", axis=axis)  # fmt: skip
    return [
        *nodes,
        helper.make_node("QuantizeLinear", [node.input[0], f"{prefix}.input_scale", f"{prefix}.input_zero_point"], [f"{prefix}.input_q"], name=f"{prefix}.input_Q"),
        helper.make_node("DequantizeLinear", [f"{prefix}.input_q", f"{prefix}.input_scale", f"{prefix}.input_zero_point"], [f"{prefix}.input_dq"], name=f"{prefix}.input_DQ"),
        weight_dq,
    ]  # fmt: skip


def _quantized_op(layer: LayerQuant, node: NodeProto, prefix: str, flavour: Flavour, inits: list) -> list[NodeProto]:
    """The layer's op on `<prefix>.input_dq` and `<prefix>.weight_dq` (a Gemm as MatMul + Add), its output
    through Q/DQ where 'ort-cpu' has the layer's output amax (those initializers appended to `inits`)."""
    from onnx import helper, numpy_helper

    out = node.output[0]
    amax = layer.output_amax if flavour == "ort-cpu" else None
    y = out if amax is None else f"{prefix}.output_float"
    operands = [f"{prefix}.input_dq", f"{prefix}.weight_dq"]
    if node.op_type == "Gemm":
        bias = list(node.input[2:3])
        mm_out = f"{prefix}.matmul_out" if bias else y
        nodes = [helper.make_node("MatMul", operands, [mm_out], name=node.name + "_MatMul")]
        if bias:
            nodes.append(helper.make_node("Add", [mm_out, bias[0]], [y], name=node.name + "_Add"))
    else:
        nodes = [helper.make_node(node.op_type, [*operands, *node.input[2:]], [y], name=node.name, domain=node.domain)]
        nodes[-1].attribute.extend(node.attribute)
    if amax is not None:
        inits += [
            numpy_helper.from_array(np.array(_act_scale(amax), np.float32), f"{prefix}.output_scale"),
            numpy_helper.from_array(np.array(128, np.uint8), f"{prefix}.output_zero_point"),  # 'ort-cpu': uint8, 128
        ]
        nodes += [
            helper.make_node("QuantizeLinear", [y, f"{prefix}.output_scale", f"{prefix}.output_zero_point"], [f"{prefix}.output_q"], name=f"{prefix}.output_Q"),
            helper.make_node("DequantizeLinear", [f"{prefix}.output_q", f"{prefix}.output_scale", f"{prefix}.output_zero_point"], [out], name=f"{prefix}.output_DQ"),
        ]  # fmt: skip
    return nodes


STEP_INDEX = "flowpress.step_index"  # the batch's step (the first row's), scalar: per-step scales gather by it


def _scale_by_step(name: str, amax_steps: torch.Tensor, qmax: float, inits: list) -> NodeProto:
    """The node that gathers a per-step activation scale (amax / qmax per step) into `name`."""
    from onnx import helper, numpy_helper

    table = (amax_steps.double().clamp_min(1e-12) / qmax).float().numpy()
    inits.append(numpy_helper.from_array(table, f"{name}s_by_step"))
    return helper.make_node("Gather", [f"{name}s_by_step", STEP_INDEX], [name], name=f"{name}_by_step", axis=0)


def _one_step_per_batch(graph, nodes: list) -> tuple[list, list]:  # noqa: ANN001
    """Nodes that take the batch's step index from step[0] (first) and add NaN to the output of a
    batch whose rows hold different steps (last): per-step scales are per tensor, so such a batch
    must run one step at a time (rows_by_step).  Returns (nodes, their initializers)."""
    from onnx import helper, numpy_helper

    out = graph.output[0].name
    unguarded = f"{out}_before_step_check"
    for node in nodes:
        node.output[:] = [unguarded if o == out else o for o in node.output]
    inits = [
        numpy_helper.from_array(np.array(0, np.int64), "flowpress.zero_index"),
        numpy_helper.from_array(np.array(0.0, np.float32), "flowpress.zero"),
        numpy_helper.from_array(np.array(np.nan, np.float32), "flowpress.nan"),
    ]
    first = [helper.make_node("Gather", ["step", "flowpress.zero_index"], [STEP_INDEX], name="step_index", axis=0)]
    check = [
        helper.make_node("ReduceMin", ["step"], ["flowpress.step_min"], name="step_min", keepdims=0),
        helper.make_node("ReduceMax", ["step"], ["flowpress.step_max"], name="step_max", keepdims=0),
        helper.make_node("Equal", ["flowpress.step_min", "flowpress.step_max"], ["flowpress.one_step"], name="one_step"),
        helper.make_node("Where", ["flowpress.one_step", "flowpress.zero", "flowpress.nan"], ["flowpress.step_guard"], name="step_guard"),
        helper.make_node("Add", [unguarded, "flowpress.step_guard"], [out], name="one_step_per_batch"),
    ]  # fmt: skip
    return first + nodes + check, inits


def _act_scale(amax: float) -> float:
    return max(float(amax), 1e-12) / 127.0
