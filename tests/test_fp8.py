"""fp8 (E4M3) W8A8: modelopt config, standard-domain FLOAT8E4M3FN Q/DQ export, and the
onnxruntime QDQ-propagation hazard on fp8 graphs."""

import json

import ml_dtypes
import numpy as np
import onnx
import pytest
import torch
from onnx import TensorProto, helper, numpy_helper

import flowpress.export.validate
from flowpress.cli import main
from flowpress.compress import Fp8Config, quantize
from flowpress.compress.amax import fake_quant
from flowpress.errors import FlowpressError
from flowpress.export import (
    ExportConfig,
    check_parity,
    export_onnx,
    insert_qdq,
    non_fp8_quantizers,
    ort_session,
    qdq_types,
    save_ort_engine,
)
from flowpress.export.graphfile import read_graph
from flowpress.export.lint import lint_tensorrt
from flowpress.models import load_model
from flowpress.recipe import load_recipe

from .conftest import DIGITS, EVALUATOR, TINY_SCHEDULE, feeds_of, tiny_calibration

SCHEDULE = TINY_SCHEDULE
QDQ = ("QuantizeLinear", "DequantizeLinear")


@pytest.fixture(scope="module")
def fp8(tiny_model_dir, tmp_path_factory):
    """(model, fp8 QuantizedModel, calib, exported fp8 graph path) of the tiny UNet."""
    model = load_model(tiny_model_dir)
    calib = tiny_calibration(model)
    qmodel = quantize(model, Fp8Config(), calib, SCHEDULE)
    path = tmp_path_factory.mktemp("fp8") / "model.onnx"
    export_onnx(qmodel.fp_module, path, ExportConfig("tensorrt"), qmodel)
    return model, qmodel, calib, path


def test_fp8_is_modelopt_e4m3_per_tensor_on_weights_and_inputs(fp8):
    _, qmodel, _, _ = fp8
    modules = dict(qmodel.module.model.named_modules())
    assert qmodel.layers and all(layer.precision == "fp8" for layer in qmodel.layers.values())
    for name, layer in qmodel.layers.items():
        module = modules[name]
        assert module.weight_quantizer.num_bits == (4, 3) and module.input_quantizer.num_bits == (4, 3)
        assert not module.output_quantizer.is_enabled and layer.output_amax is None
        # per tensor: one amax, repeated over the output channels for the exporter
        assert layer.weight_amax.shape == (module.weight.shape[0],)
        assert torch.all(layer.weight_amax == float(module.weight.detach().abs().max()))


def test_fp8_graph_is_standard_domain_e4m3_qdq_at_opset_19(fp8):
    _, qmodel, _, path = fp8
    proto = onnx.load(str(path))
    opset = next(e.version for e in proto.opset_import if e.domain in ("", "ai.onnx"))
    assert opset >= 19
    inits = {i.name: i for i in proto.graph.initializer}
    qdq = [n for n in proto.graph.node if n.op_type in QDQ]
    assert len(qdq) == 3 * len(qmodel.layers)  # input Q, input DQ, weight DQ: the tensorrt placement
    for node in qdq:
        assert node.domain in ("", "ai.onnx")
        # every Q/DQ carries an explicit E4M3 zero point of 0 (a DQ without one is what the
        # onnxruntime hazard below needs)
        assert len(node.input) == 3 and inits[node.input[2]].data_type == TensorProto.FLOAT8E4M3FN
        assert not numpy_helper.to_array(inits[node.input[2]]).astype(np.float32).any()
    assert qdq_types(path) == ["FLOAT8E4M3FN"] and non_fp8_quantizers(proto) == []
    assert lint_tensorrt(proto) == []


def test_fp8_weights_are_the_fake_quant_weights_bit_for_bit(fp8):
    """Weights go FP -> E4M3 once (not through the int8 grid as export.fp8.to_fp8 does)."""
    _, qmodel, _, path = fp8
    proto = onnx.load(str(path))
    inits = {i.name: numpy_helper.to_array(i) for i in proto.graph.initializer}
    modules = dict(qmodel.module.model.named_modules())
    for name in qmodel.layers:
        module = modules[name]
        with torch.no_grad():
            expected = module.weight_quantizer(module.weight).numpy()
        w_fp8, scale = inits[f"{name}.weight_fp8"].astype(np.float32), inits[f"{name}.weight_scale"]
        shape = [-1] + [1] * (w_fp8.ndim - 1) if module.weight.ndim == 4 else [1, -1]
        got = w_fp8 * scale.reshape(shape)
        got = got if module.weight.ndim == 4 else got.T  # MatMul weights are (in, out)
        np.testing.assert_allclose(got, expected, rtol=1e-6, atol=1e-9, err_msg=name)


def test_fp8_graph_tracks_fake_quant_with_optimizations_on_and_off(fp8):
    _, qmodel, calib, path = fp8
    feeds = feeds_of(calib)
    results = check_parity(path, qmodel.module, feeds, qmodel.fp_module)
    # measured 0.073 / 0.073 (off / on) on this tiny UNet: a broken scale lands above 2
    assert [r.optimization for r in results] == ["disabled", "all"]
    assert all(r.noise_ratio is not None and r.noise_ratio < 0.5 for r in results)
    with torch.no_grad():
        fake, fp = qmodel.module(*feeds.values()), qmodel.fp_module(*feeds.values())
    # E4M3 keeps 3 mantissa bits: measured rel L2 0.099 vs FP for the fake-quant model here
    assert 0.03 < float((fake - fp).norm() / fp.norm()) < 0.2


def test_fp8_fake_quant_matches_torch_e4m3_cast():
    values = torch.linspace(-3, 3, 1001)
    got = fake_quant(values, 2.0, e4m3=True)
    scale = 2.0 / 448
    assert torch.equal(
        got[values.abs() <= 2.0], ((values / scale).to(torch.float8_e4m3fn).float() * scale)[values.abs() <= 2.0]
    )
    assert float(got.abs().max()) == 2.0  # saturates at amax, no NaN


def test_fp8_needs_the_tensorrt_flavour_and_8_bits(fp8, tmp_path):
    _, qmodel, _, path = fp8
    graph = read_graph(path)
    with pytest.raises(FlowpressError, match="set export.flavour to 'tensorrt'"):
        insert_qdq(graph, qmodel.layers, "ort-cpu")
    shipped = (DIGITS / "recipes" / "digits-unet-fp8.yaml").read_text()
    bad = tmp_path / "r.yaml"
    bad.write_text(shipped.replace("precision: fp8 ", "precision: fp8\n  activation_bits: 6 "))
    with pytest.raises(FlowpressError, match="quantize.activation_bits: must be one of 8, got 6") as err:
        load_recipe(bad)
    assert str(bad) in str(err.value) and "\n" not in str(err.value)
    bad.write_text(shipped.replace("flavour: tensorrt", "flavour: ort-cpu"))
    with pytest.raises(FlowpressError, match="set export.flavour: tensorrt") as err:
        load_recipe(bad)
    assert str(bad) in str(err.value)


def test_shipped_fp8_recipes_load():
    for arch in ("unet", "dit"):
        recipe = load_recipe(DIGITS / "recipes" / f"digits-{arch}-fp8.yaml")
        assert isinstance(recipe.quantize, Fp8Config) and recipe.quantize.precision == "fp8"
        assert recipe.export.flavour == "tensorrt"
        assert recipe.export.opset >= 19 and recipe.compare.n_samples == 500


# ------------------------------------------------------------------ onnxruntime hazard


def hazard_graph() -> onnx.ModelProto:
    """x -> Q(fp8) -> DQ without zero point -> Reshape -> + y: legal at opset 19 (DQ takes the
    fp8 type from its input), and the pattern QDQPropagationTransformer rewrites."""
    inits = [
        numpy_helper.from_array(np.array(0.01, np.float32), "scale"),
        numpy_helper.from_array(np.array(0, ml_dtypes.float8_e4m3fn), "zero_point"),
        numpy_helper.from_array(np.array([2, 8], np.int64), "shape"),
    ]
    nodes = [
        helper.make_node("QuantizeLinear", ["x", "scale", "zero_point"], ["x_q"], name="x_Q"),
        helper.make_node("DequantizeLinear", ["x_q", "scale"], ["x_dq"], name="x_DQ"),
        helper.make_node("Reshape", ["x_dq", "shape"], ["x_r"], name="reshape"),
        helper.make_node("Add", ["x_r", "y"], ["out"], name="add"),
    ]
    graph = helper.make_graph(
        nodes,
        "hazard",
        [
            helper.make_tensor_value_info("x", TensorProto.FLOAT, [4, 4]),
            helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 8]),
        ],
        [helper.make_tensor_value_info("out", TensorProto.FLOAT, [2, 8])],
        inits,
    )
    return helper.make_model(graph, opset_imports=[helper.make_opsetid("", 19)])


HAZARD_FEEDS = {"x": np.linspace(-1, 1, 16, dtype=np.float32).reshape(4, 4), "y": np.zeros((2, 8), np.float32)}


@pytest.mark.parametrize("level", ["basic", "all"])
def test_onnxruntime_qdq_propagation_corrupts_an_unprotected_fp8_graph(tmp_path, level):
    """Documents the hazard: if onnxruntime fixes it (the first asserts fail), the protection
    may go; if the protected session ever differs, the protection no longer works."""
    path = tmp_path / "hazard.onnx"
    onnx.save(hazard_graph(), str(path))
    off = ort_session(path, "disabled").run(None, HAZARD_FEEDS)[0]
    optimized = tmp_path / "unprotected.opt.onnx"
    unprotected = ort_session(path, level, protect_fp8=False, optimized_path=str(optimized)).run(None, HAZARD_FEEDS)[0]
    # measured with onnxruntime 1.32: the inserted uint8 Q zeroes every negative value, max |error| 0.96
    assert np.abs(unprotected - off).max() > 0.5
    assert non_fp8_quantizers(onnx.load(str(optimized)))  # the detector sees the inserted uint8 Q
    protected = tmp_path / "protected.opt.onnx"
    np.testing.assert_array_equal(
        ort_session(path, level, optimized_path=str(protected)).run(None, HAZARD_FEEDS)[0], off
    )
    assert non_fp8_quantizers(onnx.load(str(protected))) == []


def test_engine_build_refuses_a_corrupted_fp8_engine(tmp_path, monkeypatch):
    path = tmp_path / "hazard.onnx"
    onnx.save(hazard_graph(), str(path))
    assert save_ort_engine(path, tmp_path / "ok.onnx")["disabled_optimizers"] == ["QDQPropagationTransformer"]
    monkeypatch.setattr(flowpress.export.validate, "FP8_DISABLED_OPTIMIZERS", ())
    with pytest.raises(FlowpressError, match="inserted 1 non-fp8 QuantizeLinear"):
        save_ort_engine(path, tmp_path / "bad.onnx")


def test_our_fp8_engine_is_the_same_with_optimizations_on_and_off(fp8, tmp_path):
    _, _, calib, path = fp8
    feeds = {k: v.numpy() for k, v in feeds_of(calib).items()}
    off = ort_session(path, "disabled").run(None, feeds)[0]
    engine = tmp_path / "model.opt.onnx"
    on = ort_session(path, "all", optimized_path=str(engine)).run(None, feeds)[0]
    # measured: identical (max |diff| 0.0) on this graph; 1e-5 of the output's scale leaves room
    # for float reassociation by fusions, far below a clamped sign (order 1)
    assert np.abs(on - off).max() <= 1e-5 * np.abs(off).max()
    assert non_fp8_quantizers(onnx.load(str(engine))) == []


# ------------------------------------------------------------------ end to end

RECIPE = """
name: tiny-fp8
model: {{path: {model}}}
sampling: {{steps: 4, guidance: 2.0}}
calibration: {{n_samples: 8}}
quantize: {{precision: fp8}}
export: {{flavour: tensorrt}}
compare: {{n_samples: 20, batch_size: 10, latency_runs: 3}}
gate: {{min_final_psnr_db: 10.0, metrics: {{classifier_acc: {{max_drop: 0.5}}}}}}
evaluator: {evaluator}
"""


@pytest.mark.slow
def test_quantize_fp8_end_to_end_reports_precision_and_qdq_type(tiny_model_dir, tmp_path):
    recipe = tmp_path / "fp8.yaml"
    recipe.write_text(RECIPE.format(model=tiny_model_dir, evaluator=EVALUATOR))
    code = main(["quantize", "--recipe", str(recipe), "--runs", str(tmp_path / "runs"), "--quiet"])
    run = tmp_path / "runs" / "tiny-fp8"
    assert code == 0
    report = json.loads((run / "report.json").read_text())
    assert report["precision"] == "fp8" and report["engine"] == "ort-fp8"
    # measured 34.0 dB on this tiny random-weight UNet (int8: 39.6); 20 dB only catches a broken engine
    assert report["final"]["psnr_db"] > 20
    manifest = json.loads((run / "manifest.json").read_text())
    assert manifest["precision"] == "fp8"
    assert manifest["ort_engine"]["qdq_types"] == ["FLOAT8E4M3FN"]
    assert manifest["ort_engine"]["disabled_optimizers"] == ["QDQPropagationTransformer"]
    assert [e["flavour"] for e in manifest["exports"]] == ["tensorrt"]
    assert not (run / "model.ort-cpu.onnx").exists()
