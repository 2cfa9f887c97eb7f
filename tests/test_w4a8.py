"""W4A8 (brevitas, learned rounding): reconstruction gain, INT4 export round trip, size, parity."""

import numpy as np
import onnx
import pytest
import torch
from onnx import numpy_helper

from flowpress.compress import Int8Config, W4A8Config, quantize
from flowpress.compress.w4a8 import quantized_weight
from flowpress.errors import FlowpressError
from flowpress.export import ExportConfig, check_parity, export_onnx, ort_session
from flowpress.models import load_model
from flowpress.recipe import load_recipe

from .conftest import TINY_SCHEDULE, feeds_of, tiny_calibration

SCHEDULE = TINY_SCHEDULE
GROUP = 8
W4A8 = W4A8Config(
    weight_group_size=GROUP,
    table_dtype="float16",
    recon_iters=40,
    recon_samples=32,
    recon_batch_size=16,
    recon_lr=0.01,
    edge_weight_bits=8,
)


@pytest.fixture(scope="module")
def w4a8(tiny_model_dir):
    model = load_model(tiny_model_dir)
    calib = tiny_calibration(model)
    return model, quantize(model, W4A8, calib, SCHEDULE), calib


@pytest.mark.slow
def test_learned_rounding_reduces_block_output_error(w4a8):
    _, qmodel, _ = w4a8
    errors = qmodel.reconstruction
    assert len(errors) >= 8  # every block of the tiny UNet was reconstructed
    nearest = sum(e["nearest"] for e in errors.values())
    learned = sum(e["learned"] for e in errors.values())
    # measured on this tiny model (40 iterations per block, lr 0.01): learned / nearest = 0.86
    # (0.975 with AdaRound's lr 1e-3, too small a step for so few iterations)
    assert learned < 0.93 * nearest
    # a block whose hardened learned rounding lost to nearest went back to nearest (measured here:
    # one of 10, down_blocks.0.resnets.0 at 1.059x, behind the 8-bit conv_in); the rest kept theirs
    assert all(e["kept"] == ("learned" if e["learned"] <= e["nearest"] else "nearest") for e in errors.values())
    modules = dict(qmodel.module.model.named_modules())
    reverted = [
        n for n in qmodel.layers if any(n.startswith(b + ".") for b, e in errors.items() if e["kept"] == "nearest")
    ]
    for name in reverted:
        w_int, scale = quantized_weight(modules[name])
        qmax = 2 ** (qmodel.layers[name].weight_bits - 1) - 1
        assert torch.equal(w_int.float(), torch.round(modules[name].weight / scale).clamp(-qmax, qmax))


def test_per_group_int4_weights_round_trip_through_the_exported_graph(w4a8, tmp_path):
    _, qmodel, _ = w4a8
    path = export_onnx(qmodel.fp_module, tmp_path / "m.onnx", ExportConfig("ort-cpu", opset=21), qmodel)
    graph = onnx.load(str(path)).graph
    inits = {i.name: i for i in graph.initializer}
    dq = {n.name: n for n in graph.node if n.op_type == "DequantizeLinear"}
    grouped = [name for name, layer in qmodel.layers.items() if layer.group_size == GROUP]
    assert len(grouped) >= len(qmodel.layers) - 2  # all but the 8-bit input and output layers are per group
    edges = [name for name, layer in qmodel.layers.items() if layer.weight_bits == 8]
    assert edges == [n for n in qmodel.layers if n.endswith(("conv_in", "conv_out"))] and len(edges) == 2
    modules = dict(qmodel.module.model.named_modules())
    for name, layer in qmodel.layers.items():
        bits = layer.weight_bits
        w_init = inits[f"{name}.weight_int{bits}"]
        assert w_init.data_type == (onnx.TensorProto.INT4 if bits == 4 else onnx.TensorProto.INT8)
        assert f"{name}.weight_zero_point" not in inits  # symmetric: DequantizeLinear's default zero point
        w_int = numpy_helper.to_array(w_init).astype(np.float32)
        scale = numpy_helper.to_array(inits[f"{name}.weight_scale"])
        attrs = {a.name: onnx.helper.get_attribute_value(a) for a in dq[f"{name}.weight_DQ"].attribute}
        if layer.group_size is None:
            shape = [1] * w_int.ndim
            shape[attrs["axis"]] = -1
            dequant = w_int * scale.reshape(shape)
        else:
            assert attrs["block_size"] == GROUP
            dequant = w_int * np.repeat(scale, GROUP, axis=attrs["axis"])
        if layer.kind == "linear":
            dequant = dequant.T  # the graph multiplies by (C_in, C_out)
        expected = modules[name].quant_weight().value.detach().numpy()
        np.testing.assert_allclose(dequant, expected, rtol=0, atol=1e-6 * np.abs(expected).max())
        assert np.abs(w_int).max() <= 2 ** (bits - 1) - 1


def test_w4a8_graph_tracks_fake_quant_with_optimizations_on_and_off(w4a8, tmp_path):
    _, qmodel, calib = w4a8
    path = export_onnx(qmodel.fp_module, tmp_path / "m.onnx", ExportConfig("ort-cpu", opset=21), qmodel)
    results = check_parity(path, qmodel.module, feeds_of(calib), qmodel.fp_module)
    # measured 0.055 / 0.055 (off / on) for per-group W4A8 on this tiny model: int4 weight noise
    # dwarfs the 8-bit rounding flips; a wrong scale, axis or block lands above 1
    assert all(r.noise_ratio is not None and r.noise_ratio < 0.3 for r in results)


def _weight_bytes(path):
    """Bytes of the quantized layers' weights, scales and zero points in an onnxruntime-optimized graph."""
    return sum(len(i.raw_data) for i in onnx.load(str(path)).graph.initializer if ".weight_" in i.name)


def test_w4a8_weight_storage_is_at_most_60_percent_of_int8(w4a8, tmp_path):
    model, _, calib = w4a8
    sizes = {}
    configs = (
        ("int8", Int8Config(), 19),
        ("w4a8", W4A8Config(recon_iters=0, table_dtype="float16"), 21),
    )
    for tag, config, opset in configs:
        q = quantize(model, config, calib, SCHEDULE)
        path = export_onnx(q.fp_module, tmp_path / f"{tag}.onnx", ExportConfig("ort-cpu", opset=opset), q)
        engine = tmp_path / f"{tag}.opt.onnx"
        ort_session(path, "extended", optimized_path=str(engine))  # as the pipeline writes engine/model.opt.onnx
        sizes[tag] = _weight_bytes(engine)
    # measured 0.53 (per channel: INT4 stays INT4 through onnxruntime's optimizer). The whole
    # file is 0.88 here because node overhead dominates a 20k-weight model; the recipes measure
    # the engine file itself (README). Per group of 8 the fp32 scales bring it back to 0.99.
    assert sizes["w4a8"] <= 0.6 * sizes["int8"]


def test_w4a8_config_and_export_errors(w4a8, tmp_path):
    _, qmodel, _ = w4a8
    with pytest.raises(FlowpressError, match="weight_group_size must be >= 2"):
        W4A8Config(weight_group_size=1)
    # int8 has no weight groups: a recipe that asks for them is a one-line error naming the key
    recipe = tmp_path / "r.yaml"
    recipe.write_text("name: a\nmodel: {path: m}\nquantize: {precision: int8, weight_group_size: 32}\n")
    with pytest.raises(FlowpressError, match="quantize: unknown key 'weight_group_size'") as err:
        load_recipe(recipe)
    assert str(recipe) in str(err.value) and "\n" not in str(err.value)
    with pytest.raises(FlowpressError, match="opset"):
        export_onnx(qmodel.fp_module, tmp_path / "m.onnx", ExportConfig("ort-cpu", opset=19), qmodel)
