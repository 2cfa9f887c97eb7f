"""ONNX translations of the torch operators the TorchScript exporter lacks at our opsets: the
denoisers call them (Flux's attention normalizes q and k with torch's RMSNorm: aten::rms_norm,
an ONNX operator only from opset 23)."""

from __future__ import annotations

from typing import Any

import torch

_REGISTERED: set[int] = set()


def _rms_norm(g: Any, x: Any, normalized_shape: Any, weight: Any, eps: Any) -> Any:
    """x / sqrt(mean(x², last dims) + eps) * weight, in opset-18 ReduceMean (axes as an input)."""
    from torch.onnx import symbolic_helper as helper

    dims = len(helper._get_const(normalized_shape, "is", "normalized_shape"))
    value = None if helper._is_none(eps) else helper._maybe_get_const(eps, "f")
    eps_value = float(torch.finfo(torch.float32).eps if value is None else value)
    axes = g.op("Constant", value_t=torch.tensor(list(range(-dims, 0)), dtype=torch.int64))
    mean = g.op("ReduceMean", g.op("Mul", x, x), axes, keepdims_i=1)
    scale = g.op("Sqrt", g.op("Add", mean, g.op("Constant", value_t=torch.tensor(eps_value, dtype=torch.float32))))
    normed = g.op("Div", x, scale)
    return normed if helper._is_none(weight) else g.op("Mul", normed, weight)


def register_symbolics(opset: int) -> None:
    """Register the translations for `opset` (once per opset and process)."""
    if opset in _REGISTERED:
        return
    torch.onnx.register_custom_op_symbolic("aten::rms_norm", _rms_norm, opset)
    _REGISTERED.add(opset)
