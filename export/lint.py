"""Lint a tensorrt-flavour Q/DQ graph on the CPU before any GPU sees it.

TensorRT's ONNX parser rejects, or silently runs in another precision, graphs that
onnxruntime accepts: asymmetric Q/DQ, per-tensor weights on the wrong axis, operators it
has no importer for, dynamic dimensions the one batch profile does not cover.  Each rule
below names what TensorRT needs; `lint_tensorrt` reports every violation as a LintIssue.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from flowpress.errors import FlowpressError

RULES = ("opset", "qdq-symmetric", "weight-per-channel", "unsupported-op", "dynamic-dim", "profile")
QDQ_OPS = ("QuantizeLinear", "DequantizeLinear")
MIN_OPSET_INT8 = 13  # per-axis QuantizeLinear / DequantizeLinear
MIN_OPSET_FP8 = 19  # float8 types in the standard-domain Q/DQ

# The operators our exported graphs use, plus common ones TensorRT 10's ONNX parser imports
# (onnx-tensorrt docs/operators.md).  An op outside this list is an issue even when a newer
# parser might take it: add it here once a TensorRT build has parsed it.
SUPPORTED_OPS = frozenset(
    {
        # in flowpress's UNet graphs (both flavours)
        "Add", "Cast", "Concat", "Constant", "ConstantOfShape", "Conv", "Cos", "DequantizeLinear", "Div",
        "Gather", "Gemm", "InstanceNormalization", "MatMul", "Mul", "QuantizeLinear", "Reshape", "Resize",
        "Shape", "Sigmoid", "Sin", "Slice", "Softmax", "Sqrt", "Transpose", "Unsqueeze",
        "And", "GreaterOrEqual", "Less", "Where",  # the step bounds check (export/onnx.py StepModel)
        # common in diffusion UNets / DiTs and supported by TensorRT 10
        "Abs", "AveragePool", "BatchNormalization", "Ceil", "Clip", "ConvTranspose", "Einsum", "Equal", "Erf",
        "Exp", "Expand", "Flatten", "Floor", "Gelu", "GlobalAveragePool", "Greater", "GroupNormalization",
        "Identity", "LayerNormalization", "LeakyRelu", "Log", "Max", "MaxPool", "Min", "Neg", "Not",
        "Pad", "Pow", "Range", "Reciprocal", "ReduceMax", "ReduceMean", "ReduceSum", "Relu", "Softplus",
        "Split", "Squeeze", "Sub", "Tanh", "Tile",
    }
)  # fmt: skip


@dataclass(frozen=True)
class LintIssue:
    """One violation: `rule` (one of RULES), the node or tensor it is about, and why."""

    rule: str
    node: str
    message: str

    def __str__(self) -> str:
        return f"[{self.rule}] {self.node or '<graph>'}: {self.message}"


@dataclass(frozen=True)
class BatchProfile:
    """The one optimization profile: every input's dim 0 spans min..max, kernels tuned for opt."""

    min: int = 1
    opt: int = 8
    max: int = 16

    def as_dict(self) -> dict[str, int]:
        return {"min": self.min, "opt": self.opt, "max": self.max}


def _float8_types() -> set[int]:
    from onnx import TensorProto

    names = ("FLOAT8E4M3FN", "FLOAT8E4M3FNUZ", "FLOAT8E5M2", "FLOAT8E5M2FNUZ")
    return {getattr(TensorProto, n) for n in names if hasattr(TensorProto, n)}


def _constants(graph: Any) -> dict[str, Any]:
    """Initializers and Constant-node outputs by name, as TensorProtos."""
    found = {init.name: init for init in graph.initializer}
    for node in graph.node:
        if node.op_type == "Constant":
            for attr in node.attribute:
                if attr.name == "value":
                    found[node.output[0]] = attr.t
    return found


def _elem_types(model: Any) -> set[int]:
    """Every element type the graph declares: initializers, constants, Cast targets, I/O, value_info."""
    graph = model.graph
    types = {t.data_type for t in _constants(graph).values()}
    types |= {info.type.tensor_type.elem_type for info in [*graph.input, *graph.output, *graph.value_info]}
    for node in graph.node:
        if node.op_type == "Cast":
            types |= {attr.i for attr in node.attribute if attr.name == "to"}
    return types


def uses_fp8(model: Any) -> bool:
    """True when any float8 type appears in the graph."""
    return bool(_elem_types(model) & _float8_types())


def _default_opset(model: Any) -> int | None:
    for entry in model.opset_import:
        if entry.domain in ("", "ai.onnx"):
            return int(entry.version)
    return None


def _check_opset(model: Any) -> list[LintIssue]:
    opset = _default_opset(model)
    if opset is None:
        return [LintIssue("opset", "", "no default-domain opset import; export with opset >= 13")]
    issues = []
    if opset < MIN_OPSET_INT8:
        issues.append(
            LintIssue("opset", "", f"opset {opset} < {MIN_OPSET_INT8}: per-channel int8 Q/DQ needs opset >= 13")
        )
    if uses_fp8(model) and opset < MIN_OPSET_FP8:
        issues.append(LintIssue("opset", "", f"opset {opset} < {MIN_OPSET_FP8}: float8 (E4M3) Q/DQ needs opset >= 19"))
    return issues


def _check_symmetric(graph: Any, constants: dict[str, Any]) -> list[LintIssue]:
    from onnx import TensorProto, numpy_helper

    allowed = {TensorProto.INT8, TensorProto.FLOAT8E4M3FN}
    issues = []
    for node in (n for n in graph.node if n.op_type in QDQ_OPS):
        has_zp = len(node.input) >= 3 and node.input[2] != ""
        if not has_zp:
            if node.op_type == "QuantizeLinear":
                issues.append(
                    LintIssue(
                        "qdq-symmetric",
                        node.name,
                        "QuantizeLinear without a zero point outputs uint8; give an int8 zero point of 0",
                    )
                )
            continue
        zero_point = constants.get(node.input[2])
        if zero_point is None:
            issues.append(LintIssue("qdq-symmetric", node.name, f"zero point {node.input[2]!r} is not a constant"))
            continue
        if zero_point.data_type not in allowed:
            dtype = TensorProto.DataType.Name(zero_point.data_type)
            issues.append(
                LintIssue(
                    "qdq-symmetric",
                    node.name,
                    f"zero point {node.input[2]!r} is {dtype}; TensorRT needs INT8 or FLOAT8E4M3FN",
                )
            )
            continue
        values = numpy_helper.to_array(zero_point).astype(np.float32)
        if np.any(values != 0):
            issues.append(
                LintIssue(
                    "qdq-symmetric",
                    node.name,
                    f"zero point {node.input[2]!r} is not all zero (max |zp| {float(np.abs(values).max()):g}); "
                    "TensorRT quantization is symmetric",
                )
            )
    return issues


def _expected_weight_axis(consumer: Any, rank: int) -> tuple[int, str] | None:
    """Output-channel axis of the weight a Conv / ConvTranspose / MatMul / Gemm consumes at input 1."""
    if consumer.op_type == "Conv":
        return 0, "Conv weight (out, in, kh, kw)"
    if consumer.op_type == "ConvTranspose":
        return 1, "ConvTranspose weight (in, out, kh, kw)"
    if consumer.op_type == "MatMul":
        return rank - 1, "MatMul weight (in, out)"
    if consumer.op_type == "Gemm":
        trans_b = next((a.i for a in consumer.attribute if a.name == "transB"), 0)
        return (0, "Gemm weight with transB=1 (out, in)") if trans_b else (1, "Gemm weight (in, out)")
    return None


def _check_weight_axes(graph: Any, constants: dict[str, Any]) -> list[LintIssue]:
    from onnx import numpy_helper

    consumers: dict[str, list[tuple[Any, int]]] = defaultdict(list)
    for node in graph.node:
        for index, name in enumerate(node.input):
            consumers[name].append((node, index))
    issues = []
    for node in graph.node:
        if node.op_type != "DequantizeLinear" or node.input[0] not in constants:
            continue
        weight_dims = list(constants[node.input[0]].dims)
        for consumer, index in consumers[node.output[0]]:
            expected = _expected_weight_axis(consumer, len(weight_dims)) if index == 1 else None
            if expected is None:
                continue
            axis, layout = expected
            scale = constants.get(node.input[1])
            if scale is None:
                issues.append(LintIssue("weight-per-channel", node.name, f"scale {node.input[1]!r} is not a constant"))
                continue
            scale_len = int(numpy_helper.to_array(scale).size)
            if len(scale.dims) == 0 or (scale_len == 1 and weight_dims[axis] != 1):
                issues.append(
                    LintIssue(
                        "weight-per-channel",
                        node.name,
                        f"per-tensor weight scale for {consumer.op_type} {consumer.name}; "
                        f"quantize per output channel (axis {axis} of the {layout}, {weight_dims[axis]} channels)",
                    )
                )
                continue
            given = next((a.i for a in node.attribute if a.name == "axis"), 1)
            given = given + len(weight_dims) if given < 0 else given
            if given != axis:
                issues.append(
                    LintIssue(
                        "weight-per-channel",
                        node.name,
                        f"axis {given} for {consumer.op_type} {consumer.name}; the output channel is axis {axis} of the {layout}",
                    )
                )
            elif scale_len != weight_dims[axis]:
                issues.append(
                    LintIssue(
                        "weight-per-channel",
                        node.name,
                        f"scale length {scale_len} != {weight_dims[axis]} output channels (axis {axis} of the {layout})",
                    )
                )
    return issues


def _check_ops(graph: Any) -> list[LintIssue]:
    issues = []
    for node in graph.node:
        if node.domain not in ("", "ai.onnx"):
            issues.append(
                LintIssue(
                    "unsupported-op",
                    node.name,
                    f"{node.domain}::{node.op_type} is outside the standard ONNX domain; TensorRT's parser has no importer for it",
                )
            )
        elif node.op_type not in SUPPORTED_OPS:
            issues.append(
                LintIssue(
                    "unsupported-op",
                    node.name,
                    f"{node.op_type} is not on the TensorRT allow-list (export/lint.py SUPPORTED_OPS)",
                )
            )
    return issues


def _check_dims(graph: Any, profile: BatchProfile | None) -> list[LintIssue]:
    issues = []
    for kind, values in (("input", graph.input), ("output", graph.output)):
        for info in values:
            dims = info.type.tensor_type.shape.dim
            for axis, dim in enumerate(dims):
                dynamic = dim.HasField("dim_param") or not dim.HasField("dim_value")
                if axis > 0 and dynamic:
                    label = dim.dim_param or "unknown"
                    issues.append(
                        LintIssue(
                            "dynamic-dim",
                            info.name,
                            f"{kind} dim {axis} is dynamic ({label!r}); only the batch dim 0 may be: export with fixed sizes",
                        )
                    )
            if profile is not None and kind == "input" and len(dims) > 0 and dims[0].HasField("dim_value"):
                static = dims[0].dim_value
                if (profile.min, profile.max) != (static, static):
                    issues.append(
                        LintIssue(
                            "profile",
                            info.name,
                            f"batch dim is static ({static}) but the profile spans {profile.min}..{profile.max}; "
                            "export with a dynamic batch",
                        )
                    )
    return issues


def _check_profile(profile: BatchProfile) -> list[LintIssue]:
    if 1 <= profile.min <= profile.opt <= profile.max:
        return []
    return [
        LintIssue(
            "profile",
            "",
            f"batch profile min {profile.min} / opt {profile.opt} / max {profile.max} must satisfy 1 <= min <= opt <= max",
        )
    ]


def lint_tensorrt(onnx_path_or_proto: str | Path | Any, profile: BatchProfile | None = None) -> list[LintIssue]:
    """Every reason TensorRT would refuse or misread this Q/DQ graph (empty list: clean)."""
    from flowpress.export.graphfile import read_graph

    model = onnx_path_or_proto
    if isinstance(model, str | Path):
        if not Path(model).is_file():
            raise FlowpressError(f"{model}: ONNX file missing; run `make quantize` first")
        model = read_graph(model).proto  # the weights stay on disk: lint reads shapes, scales and zero points
    graph = model.graph
    constants = _constants(graph)
    issues = _check_opset(model)
    issues += _check_symmetric(graph, constants)
    issues += _check_weight_axes(graph, constants)
    issues += _check_ops(graph)
    issues += _check_dims(graph, profile)
    if profile is not None:
        issues += _check_profile(profile)
    return issues


def check_tensorrt(onnx_path_or_proto: str | Path | Any, profile: BatchProfile | None = None, where: str = "") -> None:
    """lint_tensorrt, raising one FlowpressError that names the first issue and the count."""
    issues = lint_tensorrt(onnx_path_or_proto, profile)
    if issues:
        where = where or str(onnx_path_or_proto if isinstance(onnx_path_or_proto, str | Path) else "graph")
        more = f" (and {len(issues) - 1} more)" if len(issues) > 1 else ""
        raise FlowpressError(f"{where}: TensorRT lint failed: {issues[0]}{more}; fix the export before building")
