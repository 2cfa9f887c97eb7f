"""Integer weights the quantizer chose itself (W4A8's learned rounding, W4A4's residual) as ONNX
initializers and their DequantizeLinear: INT4 (INT8 for an 8-bit edge layer), float32 scales per
output channel or per group of input channels, symmetric (no zero point)."""

from __future__ import annotations

from typing import Any

import numpy as np

from flowpress.compress import LayerQuant
from flowpress.errors import FlowpressError


def learned_axes(layer: LayerQuant, node) -> dict[str, Any]:  # noqa: ANN001
    """DequantizeLinear attributes of a learned weight: per channel along C_out, or blocked along
    C_in (Conv weights are (C_out, C_in, kh, kw); MatMul / Gemm weights here are (C_in, C_out))."""
    conv = node.op_type == "Conv"
    if layer.group_size is None:
        return {"axis": 0 if conv else 1}
    return {"axis": 1 if conv else 0, "block_size": layer.group_size}


def learned_dequantize(layer: LayerQuant, node, prefix: str):  # noqa: ANN001, ANN202
    """DequantizeLinear of a learned layer's integer weights (symmetric: no zero point)."""
    from onnx import helper

    return helper.make_node("DequantizeLinear", [int_name(layer, prefix), f"{prefix}.weight_scale"], [f"{prefix}.weight_dq"], name=f"{prefix}.weight_DQ", **learned_axes(layer, node))  # fmt: skip


def int_name(layer: LayerQuant, prefix: str) -> str:
    """A learned layer's integer weight initializer: INT4 (4-bit) or INT8 (an 8-bit edge layer)."""
    return f"{prefix}.weight_int{4 if layer.weight_bits == 4 else 8}"


def int_dtype(layer: LayerQuant) -> Any:
    import ml_dtypes

    return ml_dtypes.int4 if layer.weight_bits == 4 else np.int8


def learned_weight(layer: LayerQuant, node, graph_shape: tuple[int, ...], prefix: str) -> list:  # noqa: ANN001
    """Integer initializers of a learned layer's weights (INT4, INT8 for an 8-bit edge layer) and
    its float32 scales."""
    from onnx import numpy_helper

    assert layer.weight_int is not None and layer.weight_scale is not None
    w_int = layer.weight_int.numpy()
    scale = layer.weight_scale.numpy().astype(np.float32)
    if node.op_type != "Conv":  # torch Linear (C_out, C_in) -> graph (C_in, C_out)
        w_int = w_int.T
        scale = scale.T if scale.ndim == 2 else scale
    if tuple(w_int.shape) != tuple(graph_shape):
        raise FlowpressError(f"export: learned weight {prefix} has shape {w_int.shape}, the graph's is {graph_shape}")
    return [
        numpy_helper.from_array(np.ascontiguousarray(w_int).astype(int_dtype(layer)), int_name(layer, prefix)),
        numpy_helper.from_array(np.ascontiguousarray(scale), f"{prefix}.weight_scale"),
    ]
