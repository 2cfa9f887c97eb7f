import numpy as np
import onnx
import pytest
import torch
from onnx import numpy_helper

from calibration import CalibrationConfig, capture
from compress import QuantConfig, quantize, set_output_quant
from export import (
    ExportConfig,
    StepModel,
    build_ort_engine,
    check_parity,
    export_onnx,
    float_weight_ops,
    ort_session,
)
from models import load_model
from sampling import FlowpressError, Schedule

SCHEDULE = Schedule(4)


@pytest.fixture(scope="module")
def quantized(tiny_model_dir):
    model = load_model(tiny_model_dir)
    calib = capture(
        model, model.sample_shape, model.num_classes, SCHEDULE, CalibrationConfig(n_samples=8), 2.0, model.null_label
    )
    return model, quantize(model, QuantConfig(), calib), calib


def feeds_of(calib, n=16):
    index = torch.linspace(0, len(calib) - 1, n).long()
    return {"x": calib.x[index], "step": calib.step[index], "class_labels": calib.cond[index]}


def test_fp_export_matches_torch(quantized, tmp_path):
    model, _, calib = quantized
    path = export_onnx(model, SCHEDULE, tmp_path / "fp32.onnx")
    results = check_parity(path, StepModel(model, SCHEDULE), feeds_of(calib))
    assert all(r.min_cosine > 0.99999 for r in results)


@pytest.mark.parametrize("flavour", ["ort-cpu", "tensorrt"])
def test_qdq_export_tracks_fake_quant_with_optimizations_on_and_off(quantized, tmp_path, flavour):
    model, qmodel, calib = quantized
    path = export_onnx(qmodel.fp_module, SCHEDULE, tmp_path / f"{flavour}.onnx", ExportConfig(flavour), qmodel)
    set_output_quant(qmodel, flavour == "ort-cpu")
    results = check_parity(
        path, StepModel(qmodel.module, SCHEDULE), feeds_of(calib), StepModel(qmodel.fp_module, SCHEDULE)
    )
    set_output_quant(qmodel, True)
    # measured on this tiny model: 0.09 / 1.05 (ort-cpu), 0.14 / 0.14 (tensorrt) for off / on
    assert [r.optimization for r in results] == ["disabled", "all"]
    assert all(r.noise_ratio is not None and r.noise_ratio < 2.0 for r in results)


def test_ort_cpu_flavour_runs_every_quantized_layer_on_integer_kernels(quantized, tmp_path):
    model, qmodel, _ = quantized
    path = export_onnx(qmodel.fp_module, SCHEDULE, tmp_path / "m.onnx", ExportConfig("ort-cpu"), qmodel)
    # the temporal layers are gathered from tables, everything else is quantized: no float weight op
    assert float_weight_ops(path) == []
    with_opt = tmp_path / "opt.onnx"
    ort_session(path, "extended", optimized_path=str(with_opt))
    ops = [n.op_type for n in onnx.load(str(with_opt)).graph.node]
    n_conv = sum(q.kind == "conv" for q in qmodel.layers.values())
    n_linear = sum(q.kind == "linear" for q in qmodel.layers.values())
    assert ops.count("QLinearConv") == n_conv
    assert ops.count("MatMulIntegerToFloat") == n_linear


def test_engine_merges_twin_quantizers_and_folds_linear_bias_without_changing_its_output(quantized, tmp_path):
    _, qmodel, calib = quantized
    path = export_onnx(qmodel.fp_module, SCHEDULE, tmp_path / "m.onnx", ExportConfig("ort-cpu"), qmodel)
    unfused = tmp_path / "unfused.onnx"
    ort_session(path, "extended", optimized_path=str(unfused))
    facts = build_ort_engine(path, tmp_path / "engine.onnx")
    nodes = onnx.load(str(tmp_path / "engine.onnx")).graph.node
    with_bias = [n for n in nodes if n.op_type == "MatMulIntegerToFloat" and len(n.input) == 7]
    n_bias = sum(
        q.kind == "linear" and qmodel.fp_module.get_submodule(name).bias is not None
        for name, q in qmodel.layers.items()
    )
    assert facts["fused_bias_adds"] == len(with_bias) == n_bias > 0
    # q / k / v read one tensor: one QuantizeLinear serves all three (2 merged per attention block)
    n_attention = sum(name.endswith(".to_q") for name in qmodel.layers)
    assert facts["merged_quantizers"] == 2 * n_attention > 0
    quantized_inputs = [n.input[0] for n in nodes if n.op_type == "QuantizeLinear"]
    assert len(quantized_inputs) == len(set(quantized_inputs))
    feeds = {k: v.numpy() for k, v in feeds_of(calib).items()}
    before = ort_session(unfused).run(None, feeds)[0]
    after = ort_session(tmp_path / "engine.onnx").run(None, feeds)[0]
    # both rewrites are exact: measured max |diff| 0.0 (|v| up to 1.5; 8 merged, 16 biases folded)
    np.testing.assert_allclose(after, before, rtol=0, atol=1e-5)


def test_tensorrt_flavour_is_symmetric_int8_per_output_channel(quantized, tmp_path):
    model, qmodel, _ = quantized
    path = export_onnx(qmodel.fp_module, SCHEDULE, tmp_path / "trt.onnx", ExportConfig("tensorrt"), qmodel)
    graph = onnx.load(str(path)).graph
    inits = {i.name: numpy_helper.to_array(i) for i in graph.initializer}
    qdq = [n for n in graph.node if n.op_type in ("QuantizeLinear", "DequantizeLinear")]
    assert len(qdq) == 3 * len(qmodel.layers)  # input Q, input DQ, weight DQ; no output Q/DQ
    for node in qdq:
        zero_point = inits[node.input[2]]
        assert zero_point.dtype == np.int8 and not zero_point.any()
    for node in (n for n in graph.node if n.name.endswith("weight_DQ")):
        weight, scale = inits[node.input[0]], inits[node.input[1]]
        axis = next(a.i for a in node.attribute if a.name == "axis")
        assert weight.dtype == np.int8 and scale.shape == (weight.shape[axis],)


def test_a_wrong_scale_is_caught(quantized, tmp_path):
    model, qmodel, calib = quantized
    path = export_onnx(qmodel.fp_module, SCHEDULE, tmp_path / "m.onnx", ExportConfig("ort-cpu"), qmodel)
    proto = onnx.load(str(path))
    for init in proto.graph.initializer:
        if init.name == "net.down_blocks.0.resnets.0.conv1.weight_scale":
            init.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(init) * 4, init.name))
    onnx.save(proto, str(path))
    with pytest.raises(FlowpressError, match="export is broken"):
        check_parity(path, StepModel(qmodel.module, SCHEDULE), feeds_of(calib), StepModel(qmodel.fp_module, SCHEDULE))
