"""The ONNX form of a W4A4 layer with its low-rank branch (compress/svdquant.py):

    s   = x * inv_smooth
    q   = DQ(Q(s))  int4, blocked: one dynamic scale amax / 7 per token and channel group
    y   = Conv / MatMul(q, DQ(W_int4)) [+ bias]  +  up(down(s))   (down / up float16, cast)

The activation scales are computed in the graph (Abs, ReduceMax), so onnxruntime runs opset 21's
blocked QuantizeLinear with a run-time scale; float kernels do the arithmetic (no speed claim).
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from flowpress.compress import LayerQuant
from flowpress.compress.svdquant import EPS, QMAX
from flowpress.export.learned import learned_dequantize, learned_weight

SHARED = "w4a4"  # the initializers every W4A4 layer shares: w4a4.qmax, w4a4.eps, w4a4.axis2, w4a4.axis3


# onnxruntime sessions of W4A4 graphs (export.validate.ort_session): their low-rank branch is
# float16, cast to float32 where it is used; onnxruntime's constant folding would store it as
# float32 in the engine file (a visibly larger engine on the digits UNet at rank 4); nothing
# else there needs folding (the exporter folded the shape arithmetic: fold_batch_shapes).  And
# onnxruntime fuses an INT4
# per-channel DequantizeLinear -> MatMul into MatMulNBits with accuracy level 4 by default,
# which re-quantizes the (already int4) activations to int8 per block of K: parity vs fake-quant
# an order of magnitude worse on the tiny test UNet (tests/test_w4a4.py); level 1 multiplies in float32.
W4A4_DISABLED_OPTIMIZER = "ConstantFolding"
W4A4_MATMUL_ACCURACY = "1"


def is_w4a4_graph(path: str | Path) -> bool:
    """True when the ONNX file at `path` has W4A4's dynamic int4 activation quantizers."""
    import onnx

    proto = onnx.load(str(path), load_external_data=False)
    return any(init.name == f"{SHARED}.qmax" for init in proto.graph.initializer)


def shared_initializers() -> list:
    """The constants of the dynamic activation quantizers, written once per graph."""
    from onnx import numpy_helper

    return [
        numpy_helper.from_array(np.array(QMAX, np.float32), f"{SHARED}.qmax"),
        numpy_helper.from_array(np.array(EPS, np.float32), f"{SHARED}.eps"),
        numpy_helper.from_array(np.array([2], np.int64), f"{SHARED}.axis2"),
        numpy_helper.from_array(np.array([3], np.int64), f"{SHARED}.axis3"),
    ]


def lowrank_nodes(
    layer: LayerQuant, node: Any, weight_shape: tuple[int, ...], prefix: str, index: int
) -> tuple[list, list]:
    """(nodes, initializers) replacing `node` (a Conv, MatMul or Gemm of a W4A4 layer).
    Initializers carry the layer's name; the intermediate tensors a short one (w4a4.<index>.*):
    ten of them per layer, and the engine file holds every name (the digits UNet: 100 layers)."""
    from onnx import TensorProto, helper, numpy_helper

    assert layer.inv_smooth is not None and layer.activation_group is not None
    conv = node.op_type == "Conv"
    p, t, g = prefix, f"{SHARED}.{index}", layer.activation_group
    inv_smooth = layer.inv_smooth.numpy().astype(np.float32)
    channels = inv_smooth.size
    smooth_shape: tuple[int, ...]
    if conv:
        smooth_shape, group_shape, axis = (1, channels, 1, 1), [0, channels // g, g, -1], 2
    else:
        smooth_shape, group_shape, axis = (channels,), [0, -1, channels // g, g], 3
    inits = [
        numpy_helper.from_array(inv_smooth.reshape(smooth_shape), f"{p}.inv_smooth"),
        numpy_helper.from_array(np.array(group_shape, np.int64), f"{p}.group_shape"),
        *learned_weight(layer, node, weight_shape, p),
    ]
    block: dict[str, Any] = {"axis": axis, "block_size": g}
    nodes = [
        helper.make_node("Mul", [node.input[0], f"{p}.inv_smooth"], [f"{t}.s"]),
        helper.make_node("Reshape", [f"{t}.s", f"{p}.group_shape"], [f"{t}.g"]),
        helper.make_node("Abs", [f"{t}.g"], [f"{t}.a"]),
        helper.make_node("ReduceMax", [f"{t}.a", f"{SHARED}.axis{axis}"], [f"{t}.m"], keepdims=1),
        helper.make_node("Div", [f"{t}.m", f"{SHARED}.qmax"], [f"{t}.r"]),
        helper.make_node("Max", [f"{t}.r", f"{SHARED}.eps"], [f"{t}.scale"]),
        helper.make_node(
            "QuantizeLinear",
            [f"{t}.g", f"{t}.scale"],
            [f"{t}.q"],
            name=f"{p}.input_Q",
            output_dtype=TensorProto.INT4,
            **block,
        ),
        helper.make_node("DequantizeLinear", [f"{t}.q", f"{t}.scale"], [f"{t}.dq"], name=f"{p}.input_DQ", **block),
        helper.make_node("Shape", [f"{t}.s"], [f"{t}.shape"]),
        helper.make_node("Reshape", [f"{t}.dq", f"{t}.shape"], [f"{p}.input_dq"]),
        learned_dequantize(layer, node, p),
    ]
    out = node.output[0]
    main = f"{t}.main" if layer.lowrank is not None else out
    if conv:
        nodes.append(helper.make_node("Conv", [f"{p}.input_dq", f"{p}.weight_dq", *node.input[2:]], [main], name=node.name))  # fmt: skip
        nodes[-1].attribute.extend(node.attribute)
    else:
        bias = list(node.input[2:3]) if node.op_type == "Gemm" else []
        product = f"{t}.mm" if bias else main
        nodes.append(helper.make_node("MatMul", [f"{p}.input_dq", f"{p}.weight_dq"], [product], name=f"{node.name}_MatMul"))  # fmt: skip
        if bias:
            nodes.append(helper.make_node("Add", [product, bias[0]], [main]))
    if layer.lowrank is None:
        return nodes, inits
    down, up = (w.numpy().astype(np.float16) for w in layer.lowrank)
    if not conv:  # torch Linear (out, in) -> graph (in, out)
        down, up = down.T, up.T
    inits += [
        numpy_helper.from_array(np.ascontiguousarray(down), f"{p}.lowrank_down"),
        numpy_helper.from_array(np.ascontiguousarray(up), f"{p}.lowrank_up"),
    ]
    op = "Conv" if conv else "MatMul"
    down_node = helper.make_node(op, [f"{t}.s", f"{t}.down"], [f"{t}.mid"], name=f"{p}.lowrank_down")
    if conv:  # down has the layer's kernel, strides, pads and dilations; up is 1x1
        down_node.attribute.extend(node.attribute)
    nodes += [
        helper.make_node("Cast", [f"{p}.lowrank_down"], [f"{t}.down"], to=TensorProto.FLOAT),
        helper.make_node("Cast", [f"{p}.lowrank_up"], [f"{t}.up"], to=TensorProto.FLOAT),
        down_node,
        helper.make_node(op, [f"{t}.mid", f"{t}.up"], [f"{t}.low"], name=f"{p}.lowrank_up"),
        helper.make_node("Add", [main, f"{t}.low"], [out]),
    ]
    return nodes, inits
