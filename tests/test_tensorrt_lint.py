"""TensorRT lint on the CPU: a real tensorrt-flavour export lints clean, and each broken
variant of it (one rule broken at a time) is reported under that rule and no other."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper

from flowpress.errors import FlowpressError
from flowpress.export import ort_session
from flowpress.export.fp8 import to_fp8
from flowpress.export.lint import (
    BatchProfile,
    LintIssue,
    check_tensorrt,
    lint_tensorrt,
    uses_fp8,
)

PROFILE = BatchProfile(1, 20, 20)  # what `flowpress engines` derives for compare batch 10 under guidance


@pytest.fixture(scope="module")
def exported(tiny_tensorrt_export):
    """(tensorrt-flavour Q/DQ graph, fp32 graph path, feeds as numpy) of the tiny UNet."""
    path, fp32, feeds = tiny_tensorrt_export
    return onnx.load(str(path)), fp32, {k: v.numpy() for k, v in feeds.items()}


@pytest.fixture
def graph(exported):
    """A fresh copy of the real tensorrt-flavour graph, for one test to break."""
    copy = onnx.ModelProto()
    copy.CopyFrom(exported[0])
    return copy


def nodes(model, op_type):
    return [n for n in model.graph.node if n.op_type == op_type]


def initializer(model, name):
    return next(i for i in model.graph.initializer if i.name == name)


def replace_initializer(model, name, array):
    initializer(model, name).CopyFrom(numpy_helper.from_array(array, name))


def weight_dq(model, consumer_op):
    """The first weight DequantizeLinear that feeds a `consumer_op` node's input 1."""
    weights = {n.input[1] for n in nodes(model, consumer_op)}
    return next(n for n in nodes(model, "DequantizeLinear") if n.output[0] in weights)


def rules(issues: list[LintIssue]) -> set[str]:
    return {issue.rule for issue in issues}


def test_the_real_export_lints_clean(graph):
    assert nodes(graph, "QuantizeLinear") and nodes(graph, "DequantizeLinear")  # it is a Q/DQ graph
    assert lint_tensorrt(graph, PROFILE) == []


def test_nonzero_zero_point_is_named(graph):
    q = nodes(graph, "QuantizeLinear")[0]
    replace_initializer(graph, q.input[2], np.array(3, np.int8))
    issues = lint_tensorrt(graph)
    assert rules(issues) == {"qdq-symmetric"}
    # the Q and its DQ share the zero point: both are reported, by name
    assert q.name in {i.node for i in issues} and len(issues) == 2
    assert "not all zero" in issues[0].message


def test_uint8_zero_point_of_the_ort_cpu_flavour_is_named(graph):
    q = nodes(graph, "QuantizeLinear")[0]
    replace_initializer(graph, q.input[2], np.array(128, np.uint8))
    issues = lint_tensorrt(graph)
    assert rules(issues) == {"qdq-symmetric"} and "UINT8" in issues[0].message


@pytest.mark.parametrize(("consumer", "wrong_axis"), [("Conv", 1), ("MatMul", 0)])
def test_wrong_weight_axis_is_named(graph, consumer, wrong_axis):
    dq = weight_dq(graph, consumer)
    for attr in dq.attribute:
        if attr.name == "axis":
            attr.i = wrong_axis
    issues = lint_tensorrt(graph)
    assert rules(issues) == {"weight-per-channel"}
    assert [i.node for i in issues] == [dq.name]
    assert f"axis {wrong_axis} for {consumer}" in issues[0].message


def test_wrong_scale_length_is_named(graph):
    dq = weight_dq(graph, "Conv")
    scale = numpy_helper.to_array(initializer(graph, dq.input[1]))
    assert scale.size > 2
    replace_initializer(graph, dq.input[1], scale[:-1].copy())
    issues = lint_tensorrt(graph)
    assert rules(issues) == {"weight-per-channel"} and [i.node for i in issues] == [dq.name]
    assert f"scale length {scale.size - 1} != {scale.size} output channels" in issues[0].message


def test_per_tensor_weight_scale_is_named(graph):
    dq = weight_dq(graph, "Conv")
    scale = numpy_helper.to_array(initializer(graph, dq.input[1]))
    replace_initializer(graph, dq.input[1], np.array(scale.max(), np.float32))
    issues = lint_tensorrt(graph)
    assert rules(issues) == {"weight-per-channel"} and "per-tensor" in issues[0].message


@pytest.mark.parametrize(
    ("op_type", "domain", "named"),
    [("Hardmax", "", "Hardmax"), ("FusedConv", "com.microsoft", "com.microsoft::FusedConv")],
)
def test_unsupported_op_is_named(graph, op_type, domain, named):
    node = nodes(graph, "Softmax")[0]
    node.op_type, node.domain = op_type, domain
    issues = lint_tensorrt(graph)
    assert rules(issues) == {"unsupported-op"}
    assert [i.node for i in issues] == [node.name] and named in issues[0].message


def test_fp8_needs_opset_19(graph):
    fp8 = to_fp8(graph)
    assert uses_fp8(fp8) and lint_tensorrt(fp8, PROFILE) == []  # the rewrite itself is clean at opset 19
    for entry in fp8.opset_import:
        if entry.domain in ("", "ai.onnx"):
            entry.version = 17
    issues = lint_tensorrt(fp8)
    assert rules(issues) == {"opset"} and "opset 17 < 19" in issues[0].message
    assert lint_tensorrt(graph) == [] and not uses_fp8(graph)  # int8 at opset 19 is fine, and not fp8


def test_int8_needs_opset_13(graph):
    graph.opset_import[0].version = 12
    assert graph.opset_import[0].domain in ("", "ai.onnx")
    issues = lint_tensorrt(graph)
    assert rules(issues) == {"opset"} and "opset 12 < 13" in issues[0].message


def test_extra_dynamic_dimension_is_named(graph):
    x = next(i for i in graph.graph.input if i.name == "x")
    x.type.tensor_type.shape.dim[2].dim_param = "height"
    issues = lint_tensorrt(graph)
    assert rules(issues) == {"dynamic-dim"} and [i.node for i in issues] == ["x"]
    assert "dim 2 is dynamic ('height')" in issues[0].message


@pytest.mark.parametrize("profile", [BatchProfile(1, 16, 8), BatchProfile(4, 2, 8), BatchProfile(0, 1, 8)])
def test_bad_profile_is_named(graph, profile):
    issues = lint_tensorrt(graph, profile)
    assert rules(issues) == {"profile"} and "1 <= min <= opt <= max" in issues[0].message


def test_static_batch_against_a_ranged_profile_is_named(graph):
    for info in graph.graph.input:
        info.type.tensor_type.shape.dim[0].dim_value = 2  # clears dim_param "batch"
    issues = lint_tensorrt(graph, BatchProfile(1, 2, 8))
    assert rules(issues) == {"profile"} and {i.node for i in issues} == {"x", "step", "class_labels"}
    assert lint_tensorrt(graph, BatchProfile(2, 2, 2)) == []


def gemm_graph(trans_b: int, axis: int, channels: int = 3) -> onnx.ModelProto:
    """y = x @ DQ(w).T (transB=1, w: (out 3, in 4)) or x @ DQ(w) (transB=0, w: (in 4, out 3))."""
    shape = (3, 4) if trans_b else (4, 3)
    inits = [
        numpy_helper.from_array(np.ones(shape, np.int8), "w"),
        numpy_helper.from_array(np.full(channels, 0.1, np.float32), "w_scale"),
        numpy_helper.from_array(np.zeros(channels, np.int8), "w_zp"),
    ]
    graph = helper.make_graph(
        [
            helper.make_node("DequantizeLinear", ["w", "w_scale", "w_zp"], ["w_dq"], name="w_DQ", axis=axis),
            helper.make_node("Gemm", ["x", "w_dq"], ["y"], name="gemm", transB=trans_b),
        ],
        "gemm",
        [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["batch", 4])],
        [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["batch", 3])],
        inits,
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 19)])


def test_gemm_weight_axis_follows_trans_b():
    assert lint_tensorrt(gemm_graph(trans_b=1, axis=0)) == []
    assert lint_tensorrt(gemm_graph(trans_b=0, axis=1)) == []
    for trans_b, axis, layout in ((1, 1, "Gemm weight with transB=1 (out, in)"), (0, 0, "Gemm weight (in, out)")):
        issues = lint_tensorrt(gemm_graph(trans_b, axis))
        assert rules(issues) == {"weight-per-channel"}
        assert f"axis {axis} for Gemm gemm; the output channel is axis {1 - axis} of the {layout}" in issues[0].message


def test_check_raises_one_line_naming_the_first_issue(graph, tmp_path):
    graph.graph.input[0].type.tensor_type.shape.dim[3].dim_param = "width"
    path = tmp_path / "broken.onnx"
    onnx.save(graph, str(path))
    with pytest.raises(FlowpressError, match=r"TensorRT lint failed: \[dynamic-dim\] x: input dim 3") as err:
        check_tensorrt(path)
    assert "\n" not in str(err.value) and str(path) in str(err.value)


def test_fp8_rewrite_tracks_fp_like_int8_does(exported, graph):
    """FP8 E4M3 keeps the calibrated amax: its error vs FP is of the int8 graph's order (measured on
    this tiny random-weight UNet: rel L2 0.040 int8, 0.095 fp8); forgetting to rescale the
    weights by 448/127 measured 0.76 (weights 3.5x too small)."""
    _, fp32, feeds = exported
    fp8 = to_fp8(graph)
    zero_points = {n.input[2] for n in fp8.graph.node if n.op_type in ("QuantizeLinear", "DequantizeLinear")}
    assert {initializer(fp8, z).data_type for z in zero_points} == {TensorProto.FLOAT8E4M3FN}
    reference = ort_session(fp32).run(None, feeds)[0]

    def rel_l2(model):
        path = fp32.parent / f"graph-{id(model)}.onnx"
        onnx.save(model, str(path))
        got = ort_session(path).run(None, feeds)[0]
        return float(np.linalg.norm(got - reference) / np.linalg.norm(reference))

    int8_error, fp8_error = rel_l2(graph), rel_l2(fp8)
    assert 0 < int8_error < 0.1
    assert 0 < fp8_error < 0.2 and fp8_error < 4 * int8_error
