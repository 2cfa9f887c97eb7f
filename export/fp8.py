"""FP8 (E4M3) Q/DQ initializers, and the rewrite of a tensorrt-flavour int8 graph into FP8.

`export_onnx` places FP8 Q/DQ directly for a model quantized with precision 'fp8' (weights
rounded once, from FP, onto the E4M3 grid: what the fake-quant torch model computes), using
`e4m3_initializer`.  `to_fp8` serves int8 runs (bench-gpu's TensorRT fp8 row): the int8 graph carries scale = amax / 127 for every quantizer; the same calibrated amax
maps onto E4M3's largest finite value 448, so scale_fp8 = scale_int8 * 127 / 448 and
int8 weights w_q become w_q * 448 / 127 in E4M3 (the FP weight seen through the int8 grid).
Zero points become E4M3 zeros; the opset is raised to 19, the first with float8 Q/DQ.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from flowpress.errors import FlowpressError
from flowpress.export.lint import MIN_OPSET_FP8, QDQ_OPS

INT8_MAX = 127.0
E4M3_MAX = 448.0


def e4m3_initializer(values: np.ndarray, name: str) -> Any:
    """values (already divided by their scale) as a FLOAT8E4M3FN TensorProto, saturated at +-448
    and rounded to nearest even (as QuantizeLinear with saturate=1 and modelopt's fake quant do)."""
    import ml_dtypes
    from onnx import numpy_helper

    clipped = np.clip(values.astype(np.float32), -E4M3_MAX, E4M3_MAX)  # E4M3FN has no inf: saturate
    return numpy_helper.from_array(clipped.astype(ml_dtypes.float8_e4m3fn), name)


def to_fp8(model: Any, base: str = "") -> Any:
    """A copy of `model` (tensorrt-flavour int8 Q/DQ ModelProto; its external data relative to
    `base`) with every Q/DQ in FP8 E4M3."""
    import onnx
    from onnx import TensorProto, numpy_helper

    out = onnx.ModelProto()
    out.CopyFrom(model)
    graph = out.graph
    inits = {init.name: init for init in graph.initializer}
    weights: set[str] = set()
    scales: set[str] = set()
    zero_points: set[str] = set()
    for node in (n for n in graph.node if n.op_type in QDQ_OPS):
        if len(node.input) < 3 or node.input[2] not in inits or node.input[1] not in inits:
            raise FlowpressError(
                f"fp8: {node.name} needs constant scale and zero point initializers (tensorrt flavour)"
            )
        if inits[node.input[2]].data_type != TensorProto.INT8:
            raise FlowpressError(f"fp8: {node.name} is not int8 Q/DQ; rewrite the tensorrt-flavour graph")
        scales.add(node.input[1])
        zero_points.add(node.input[2])
        if node.op_type == "DequantizeLinear" and node.input[0] in inits:
            weights.add(node.input[0])
    if not scales:
        raise FlowpressError("fp8: the graph has no Q/DQ nodes; export it with a quantized model")
    replaced = {}
    for name in weights:
        w_q = numpy_helper.to_array(inits[name], base).astype(np.float32)
        replaced[name] = e4m3_initializer(w_q * (E4M3_MAX / INT8_MAX), name)
    for name in scales:
        scale = numpy_helper.to_array(inits[name]).astype(np.float32)
        replaced[name] = numpy_helper.from_array(scale * np.float32(INT8_MAX / E4M3_MAX), name)
    for name in zero_points:
        replaced[name] = e4m3_initializer(np.zeros(tuple(inits[name].dims), np.float32), name)
    for init in graph.initializer:
        if init.name in replaced:
            init.CopyFrom(replaced[init.name])
    for entry in out.opset_import:
        if entry.domain in ("", "ai.onnx") and entry.version < MIN_OPSET_FP8:
            entry.version = MIN_OPSET_FP8
    return out
