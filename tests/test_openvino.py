"""OpenVINO engines: f32 IR matches torch; NNCF int8 on the trajectory calibration set stays close."""

import pytest
import torch

from flowpress.compress import Int8Config, prepare
from flowpress.engines import TorchEngine
from flowpress.engines.openvino import OpenVinoEngine
from flowpress.errors import FlowpressError
from flowpress.export import cosine_per_sample, export_onnx
from flowpress.export.openvino import OpenVinoConfig, export_openvino
from flowpress.models import load_model
from flowpress.sampling import Schedule, batch_cond

from .conftest import calibrate

SCHEDULE = Schedule(4)


@pytest.fixture(scope="module")
def prepared(tiny_model_dir, tmp_path_factory):
    model = load_model(tiny_model_dir)
    calib = calibrate(model, SCHEDULE, n_samples=16, guidance=2.0)
    fp_module, _ = prepare(model, Int8Config(), SCHEDULE)
    onnx_path = export_onnx(fp_module, tmp_path_factory.mktemp("ov") / "prepared.onnx")
    return model, fp_module, calib, onnx_path


def test_f32_ir_matches_torch_at_any_batch(prepared, tmp_path):
    model, fp_module, calib, onnx_path = prepared
    xml = export_openvino(onnx_path, tmp_path / "ir" / "model.xml", OpenVinoConfig(precision="f32"))
    engine = OpenVinoEngine(xml, SCHEDULE, "f32")
    reference = TorchEngine(fp_module, SCHEDULE)
    for batch in (1, 8):  # each batch size compiles its own static-shape model
        x, step, cond = calib.x[:batch], calib.step[:batch], batch_cond(calib.cond, slice(0, batch))
        assert float(cosine_per_sample(engine(x, step, cond), reference(x, step, cond)).min()) > 0.99999
    assert sorted(engine.compiled) == [1, 8]
    with pytest.raises(FlowpressError, match="outside its schedule"):
        engine(calib.x[:1], torch.tensor([9]), batch_cond(calib.cond, slice(0, 1)))


@pytest.mark.slow
def test_nncf_int8_on_the_calibration_set_stays_near_fp(prepared, tmp_path):
    model, fp_module, calib, onnx_path = prepared
    xml = export_openvino(onnx_path, tmp_path / "ir" / "model.xml", OpenVinoConfig(precision="int8"), calib)
    engine = OpenVinoEngine(xml, SCHEDULE, "f32")
    x, step, cond = calib.feeds(32)
    got, expected = engine(x, step, cond), TorchEngine(fp_module, SCHEDULE)(x, step, cond)
    rel = float((got - expected).norm() / expected.norm())
    # measured 0.064 on this tiny random-weight UNet (int8 really ran: a float graph gives ~1e-7);
    # a graph quantized with wrong ranges lands near 1
    assert 1e-4 < rel < 0.2


@pytest.mark.slow
def test_smooth_quant_is_the_recipes_to_turn_off(prepared, tmp_path):
    # NNCF's SmoothQuant rescales MatMul inputs into their weights: model-dependent (results of the
    # digits SD recipe, which turns it off); off, the int8 IR is another graph, still near FP
    model, fp_module, calib, onnx_path = prepared
    x, step, cond = calib.feeds(32)
    expected = TorchEngine(fp_module, SCHEDULE)(x, step, cond)
    got = {}
    for alpha in (0.95, None):
        config = OpenVinoConfig(precision="int8", smooth_quant=alpha)
        xml = export_openvino(onnx_path, tmp_path / str(alpha) / "model.xml", config, calib)
        got[alpha] = OpenVinoEngine(xml, SCHEDULE, "f32")(x, step, cond)
        # measured 0.030 either way on this tiny random-weight UNet (Zen 4); wrong ranges land near 1
        assert float((got[alpha] - expected).norm() / expected.norm()) < 0.2, alpha
    # the two IRs differ (measured: largest difference 0.041, 0.023 of the output's norm); no effect
    # would leave them equal
    assert not torch.allclose(got[0.95], got[None], atol=1e-4)
    with pytest.raises(FlowpressError, match=r"openvino.smooth_quant must be in \(0, 1\] or null"):
        OpenVinoConfig(precision="int8", smooth_quant=1.5)


@pytest.mark.slow
def test_the_recipes_excluded_layers_stay_float_in_the_int8_ir(prepared, tmp_path):
    """quantize.exclude holds for the OpenVINO int8 engine too: NNCF leaves those layers' inputs
    and weights in float (before, it quantized every layer whatever the recipe kept)."""
    import openvino as ov

    from flowpress.export.openvino import float_ops

    _, _, calib, onnx_path = prepared
    exclude = ("*conv_in", "*conv_out")
    config = OpenVinoConfig(precision="int8")
    xml = export_openvino(onnx_path, tmp_path / "ir" / "model.xml", config, calib, exclude=exclude)
    kept = float_ops(ov.Core().read_model(str(onnx_path)), exclude)
    assert sorted(name.split("/")[3] for name in kept) == ["conv_in", "conv_out"]

    def fed_by_fake_quantize(op) -> bool:  # noqa: ANN001 - an openvino Node
        return any(node.get_source_output().get_node().get_type_name() == "FakeQuantize" for node in op.inputs())

    convs = {
        op.get_friendly_name(): op
        for op in ov.Core().read_model(str(xml)).get_ops()
        if op.get_type_name() == "Convolution"
    }
    assert all(not fed_by_fake_quantize(convs[name]) for name in kept)
    # every other conv stays int8 (measured: 27 of this UNet's 29)
    assert sum(fed_by_fake_quantize(op) for op in convs.values()) == len(convs) - len(kept)
    with pytest.raises(FlowpressError, match=r"quantize.exclude \['\*no_such_layer'\] names no Conv / Linear layer"):
        export_openvino(onnx_path, tmp_path / "bad" / "model.xml", config, calib, exclude=("*no_such_layer",))
