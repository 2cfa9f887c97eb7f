import numpy as np
import onnx
import pytest
from onnx import numpy_helper

from flowpress.compress import Int8Config, quantize, set_output_quant, set_weight_bits, weight_form_of
from flowpress.errors import EngineParityError
from flowpress.export import (
    ExportConfig,
    check_parity,
    export_onnx,
    float_weight_ops,
    ort_session,
    save_ort_engine,
)
from flowpress.export.passes import SHAPE_PROBE_BATCHES, _batch_reshape_target
from flowpress.models import StepModel, load_model

from .conftest import TINY_SCHEDULE, feeds_of, for_this_host, tiny_calibration

SCHEDULE = TINY_SCHEDULE


@pytest.fixture(scope="module")
def quantized(tiny_model_dir):
    model = load_model(tiny_model_dir)
    calib = tiny_calibration(model)
    return model, for_this_host(quantize(model, Int8Config(), calib, SCHEDULE)), calib


def test_fp_export_matches_torch(quantized, tmp_path):
    model, _, calib = quantized
    step_model = StepModel(model, SCHEDULE)
    path = export_onnx(step_model, tmp_path / "fp32.onnx")
    results = check_parity(path, step_model, feeds_of(calib))
    assert all(r.min_cosine > 0.99999 for r in results)


@pytest.mark.parametrize("flavour", ["ort-cpu", "tensorrt"])
def test_qdq_export_tracks_fake_quant_with_optimizations_on_and_off(quantized, tmp_path, flavour):
    model, qmodel, calib = quantized
    path = export_onnx(qmodel.fp_module, tmp_path / f"{flavour}.onnx", ExportConfig(flavour), qmodel)
    set_output_quant(qmodel, flavour == "ort-cpu")
    results = check_parity(path, qmodel.module, feeds_of(calib), qmodel.fp_module)
    set_output_quant(qmodel, True)
    # measured on this tiny model: 0.09 / 1.05 (ort-cpu), 0.14 / 0.14 (tensorrt) for off / on
    assert [r.optimization for r in results] == ["disabled", "all"]
    assert all(r.noise_ratio is not None and r.noise_ratio < 2.0 for r in results)


def test_ort_cpu_flavour_runs_every_quantized_layer_on_integer_kernels(quantized, tmp_path):
    model, qmodel, _ = quantized
    path = export_onnx(qmodel.fp_module, tmp_path / "m.onnx", ExportConfig("ort-cpu"), qmodel)
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
    path = export_onnx(qmodel.fp_module, tmp_path / "m.onnx", ExportConfig("ort-cpu"), qmodel)
    unfused = tmp_path / "unfused.onnx"
    ort_session(path, "extended", optimized_path=str(unfused))
    facts = save_ort_engine(path, tmp_path / "engine.onnx")
    nodes = onnx.load(str(tmp_path / "engine.onnx")).graph.node
    with_bias = [n for n in nodes if n.op_type == "MatMulIntegerToFloat" and len(n.input) == 7]
    n_bias = sum(
        q.kind == "linear" and qmodel.fp_module.model.get_submodule(name).bias is not None
        for name, q in qmodel.layers.items()
    )
    assert facts["fused_bias_adds"] == len(with_bias) == n_bias > 0
    # q / k / v read one tensor: one QuantizeLinear serves all three (2 merged per attention block;
    # more where a split shortcut now reads its skip tensor directly: conv_skip's quantizer and
    # the downsampler's read that tensor, calibrated on the same data, and agree)
    n_attention = sum(name.endswith(".to_q") for name in qmodel.layers)
    assert facts["merged_quantizers"] >= 2 * n_attention > 0
    quantized_inputs = [n.input[0] for n in nodes if n.op_type == "QuantizeLinear"]
    assert len(quantized_inputs) == len(set(quantized_inputs))
    feeds = {k: v.numpy() for k, v in feeds_of(calib).items()}
    before = ort_session(unfused).run(None, feeds)[0]
    after = ort_session(tmp_path / "engine.onnx").run(None, feeds)[0]
    # every rewrite is exact: measured max |diff| 0.0 (|v| up to 1.5; 9 merged, 16 biases folded)
    np.testing.assert_allclose(after, before, rtol=0, atol=1e-5)


def test_engine_folds_shape_arithmetic_and_reads_split_shortcuts_from_the_concat_inputs(quantized, tmp_path):
    _, qmodel, calib = quantized
    path = export_onnx(qmodel.fp_module, tmp_path / "m.onnx", ExportConfig("ort-cpu"), qmodel)
    source_ops = [n.op_type for n in onnx.load(str(path)).graph.node]
    unfolded = tmp_path / "unfolded.onnx"
    ort_session(path, "extended", optimized_path=str(unfolded))
    facts = save_ort_engine(path, tmp_path / "engine.onnx")
    engine_ops = [n.op_type for n in onnx.load(str(tmp_path / "engine.onnx")).graph.node]
    # every Reshape target and the attention scale came from Shape chains; none is left
    # (measured on this tiny UNet: 49 Shape nodes in the export, none in the engine, 53 tensors folded)
    assert source_ops.count("Shape") > 0 and engine_ops.count("Shape") == 0
    assert facts["folded_shape_tensors"] > 0
    # each split shortcut's two slices of cat[h, skip] read h and skip themselves
    n_split = sum(name.endswith(".conv_shortcut.conv_h") for name in qmodel.layers)
    assert facts["bypassed_concat_slices"] == 2 * n_split > 0
    assert "Slice" in source_ops and not {"Slice", "Split"} & set(engine_ops)
    before, after = ort_session(unfolded), ort_session(tmp_path / "engine.onnx")
    for n in (1, 5, 16):  # batches other than the probes' (2, 3, 5) and one of them: measured max |diff| 0.0
        feeds = {k: v.numpy() for k, v in feeds_of(calib, n).items()}
        np.testing.assert_allclose(after.run(None, feeds)[0], before.run(None, feeds)[0], rtol=0, atol=1e-5)


def test_batch_reshape_target_copies_or_infers_the_batch_and_refuses_anything_else():
    probes = [np.array([b, 4, 8], dtype=np.int64) for b in SHAPE_PROBE_BATCHES]
    batch_first = [[np.zeros((b, 32)) for b in SHAPE_PROBE_BATCHES]]
    other_first = [[np.zeros((32, b)) for b in SHAPE_PROBE_BATCHES]]
    assert _batch_reshape_target(probes, batch_first).tolist() == [0, 4, 8]
    assert _batch_reshape_target(probes, other_first).tolist() == [-1, 4, 8]
    with_infer = [np.array([b, -1, 8], dtype=np.int64) for b in SHAPE_PROBE_BATCHES]
    assert _batch_reshape_target(with_infer, batch_first).tolist() == [0, -1, 8]
    assert _batch_reshape_target(with_infer, other_first) is None  # two -1: ambiguous
    times_heads = [np.array([2 * b, 4, 8], dtype=np.int64) for b in SHAPE_PROBE_BATCHES]
    assert _batch_reshape_target(times_heads, batch_first) is None  # not the batch itself


def test_tensorrt_flavour_is_symmetric_int8_per_output_channel(quantized, tmp_path):
    model, qmodel, _ = quantized
    path = export_onnx(qmodel.fp_module, tmp_path / "trt.onnx", ExportConfig("tensorrt"), qmodel)
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


def test_u8u8_weights_hold_the_8_bit_values_unsigned_and_keep_integer_kernels(quantized, tmp_path):
    model, qmodel, calib = quantized
    form = weight_form_of(qmodel)
    try:
        set_weight_bits(qmodel, 8)
        signed = export_onnx(qmodel.fp_module, tmp_path / "s8.onnx", ExportConfig("ort-cpu"), qmodel)
        set_weight_bits(qmodel, 8, unsigned=True)
        path = export_onnx(qmodel.fp_module, tmp_path / "u8.onnx", ExportConfig("ort-cpu"), qmodel)
        trt = export_onnx(qmodel.fp_module, tmp_path / "trt.onnx", ExportConfig("tensorrt"), qmodel)
        results = check_parity(path, qmodel.module, feeds_of(calib), qmodel.fp_module)
    finally:
        set_weight_bits(qmodel, *form)
    # U8U8 kernels are exact on every host: noise ratios measured 0.11 / 1.05 (off / on) on x86-avx2,
    # where the same weights signed saturate
    assert all(r.noise_ratio is not None and r.noise_ratio < 2.0 for r in results)
    weights = {}
    for name, file in (("s8", signed), ("u8", path), ("trt", trt)):
        weights[name] = {i.name: numpy_helper.to_array(i) for i in onnx.load(str(file)).graph.initializer}
    names = [n for n in weights["u8"] if n.endswith(".weight_int8")]
    assert len(names) == len(qmodel.layers)
    for name in names:
        u8, s8 = weights["u8"][name], weights["s8"][name]
        assert u8.dtype == np.uint8 and s8.dtype == np.int8 and weights["trt"][name].dtype == np.int8
        assert np.array_equal(u8.astype(np.int16) - 128, s8)  # the same 8-bit values, shifted
        assert (weights["u8"][name.replace(".weight_int8", ".weight_zero_point")] == 128).all()
    with_opt = tmp_path / "opt.onnx"
    ort_session(path, "extended", optimized_path=str(with_opt))
    ops = [n.op_type for n in onnx.load(str(with_opt)).graph.node]
    assert ops.count("QLinearConv") == sum(q.kind == "conv" for q in qmodel.layers.values())
    assert ops.count("MatMulIntegerToFloat") == sum(q.kind == "linear" for q in qmodel.layers.values())


def test_a_wrong_scale_is_caught(quantized, tmp_path):
    model, qmodel, calib = quantized
    path = export_onnx(qmodel.fp_module, tmp_path / "m.onnx", ExportConfig("ort-cpu"), qmodel)
    proto = onnx.load(str(path))
    for init in proto.graph.initializer:
        if init.name == "net.down_blocks.0.resnets.0.conv1.weight_scale":
            init.CopyFrom(numpy_helper.from_array(numpy_helper.to_array(init) * 4, init.name))
    onnx.save(proto, str(path))
    with pytest.raises(EngineParityError, match=r"optimizations disabled\) disagrees"):
        check_parity(path, qmodel.module, feeds_of(calib), qmodel.fp_module)


def test_seven_bit_weights_clipped_by_mse_lose_less_and_stay_in_range(tiny_model_dir, tmp_path):
    from flowpress.compress import PORTABLE_WEIGHT_BITS, set_weight_bits

    model = load_model(tiny_model_dir)
    calib = tiny_calibration(model)
    errors = {}
    for clip in ("max", "mse"):
        qmodel = quantize(model, Int8Config(weight_clip=clip), calib, SCHEDULE)
        set_weight_bits(qmodel, PORTABLE_WEIGHT_BITS)
        modules = dict(qmodel.module.model.named_modules())
        errors[clip] = sum(
            float((modules[n].weight_quantizer(modules[n].weight) - modules[n].weight).pow(2).sum())
            for n in qmodel.layers
        )
    # measured on the tiny UNet's random weights: squared weight error 0.01041 (max) vs 0.01004 (mse)
    assert errors["mse"] < 0.99 * errors["max"]
    path = export_onnx(qmodel.fp_module, tmp_path / "m.onnx", ExportConfig("ort-cpu"), qmodel)
    weights = [
        numpy_helper.to_array(i) for i in onnx.load(str(path)).graph.initializer if i.name.endswith(".weight_int8")
    ]
    assert weights and all(int(np.abs(w).max()) <= 63 for w in weights)  # exact on AVX2 (engines/isa.py)
    results = check_parity(path, qmodel.module, feeds_of(calib), qmodel.fp_module, levels=("disabled",))
    assert results[0].noise_ratio is not None and results[0].noise_ratio < 2.0
    set_weight_bits(qmodel, 8)  # back to 8 bits: the channel max again
    name, layer = next(iter(qmodel.layers.items()))
    assert layer.weight_bits == 8
    assert np.array_equal(layer.weight_amax.numpy(), modules[name].weight.detach().flatten(1).abs().amax(1).numpy())
