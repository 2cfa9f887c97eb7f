"""Temporal-feature cache, calibration strategies, per-step statistics, shortcut splitting."""

import onnx
import pytest
import torch

from flowpress.calibration import CachedStepModel, CalibrationConfig, discover_temporal, select
from flowpress.compress import Int8Config, quantize, split_shortcuts
from flowpress.errors import FlowpressError
from flowpress.export import export_onnx
from flowpress.export.onnx import _module_of
from flowpress.models import DiTSpec, StepModel, build_dit, load_model
from flowpress.sampling import Schedule

from .conftest import calibrate

SCHEDULE = Schedule(6)


@pytest.fixture(scope="module")
def unet(tiny_model_dir):
    return load_model(tiny_model_dir)


@pytest.fixture(scope="module")
def dit():
    torch.manual_seed(0)
    return build_dit(DiTSpec(layers=2, heads=2, head_dim=8), (1, 16, 16), 10).eval()


def test_discovery_finds_exactly_the_time_and_label_paths(unet, dit):
    names = discover_temporal(unet, SCHEDULE.model_times)
    projections = sorted(n for n, _ in unet.named_modules() if n.endswith("time_emb_proj"))
    assert projections and set(names) == {"net.time_proj", "net.time_embedding", "net.class_embedding", *projections}
    dit_names = discover_temporal(dit, SCHEDULE.model_times)
    per_block = {f"net.transformer_blocks.{b}.norm1.{m}" for b in range(2) for m in ("emb", "silu", "linear")}
    assert set(dit_names) == per_block | {"net.proj_out_1"}


@pytest.mark.parametrize("arch", ["unet", "dit"])
def test_cached_model_equals_the_model_on_the_schedule_and_refuses_steps_off_it(unet, dit, arch):
    model = unet if arch == "unet" else dit
    cached = CachedStepModel(model, SCHEDULE)
    step = torch.tensor([0, 2, 5, 4])
    x, cond = torch.randn(4, 1, 16, 16), {"class_labels": torch.tensor([0, 10, 3, 9])}
    with torch.no_grad():
        torch.testing.assert_close(
            cached.run(x, step, cond), StepModel(model, SCHEDULE).run(x, step, cond), rtol=0, atol=1e-5
        )
        # a negative step would wrap around the tables: that sample is NaN; one past the last step is an error
        off = cached.run(x, torch.tensor([0, -1, 5, 4]), cond)
        assert torch.isnan(off[1]).all() and torch.isfinite(off[[0, 2, 3]]).all()
        with pytest.raises(IndexError):
            cached.run(x, torch.tensor([0, 2, 5, 6]), cond)
    with pytest.raises(FlowpressError, match="no module depends only on"):
        CachedStepModel(model, SCHEDULE, [])


@pytest.mark.parametrize("arch", ["unet", "dit"])
def test_exported_engine_graph_has_no_time_embedding_mlp(unet, dit, arch, tmp_path):
    model = unet if arch == "unet" else dit
    cached = CachedStepModel(model, SCHEDULE)
    graph = onnx.load(str(export_onnx(cached, tmp_path / "m.onnx"))).graph
    ops = [n.op_type for n in graph.node]
    assert "Sin" not in ops and "Cos" not in ops and "Gemm" not in ops
    temporal = discover_temporal(model, SCHEDULE.model_times)
    weight_ops = [_module_of(n.name) for n in graph.node if n.op_type in ("MatMul", "Gemm", "Conv")]
    assert weight_ops and not [m for m in weight_ops if any(m == t or m.startswith(t + ".") for t in temporal)]
    # and the tables are there instead: one Gather per table the graph still needs
    assert sum(op == "Gather" for op in ops) >= (len(temporal) - 3 if arch == "unet" else 4)


def test_strategies_keep_the_budget_where_they_say(unet):
    full = calibrate(unet, Schedule(20), n_samples=40, guidance=2.0)
    assert len(full) == 20 * 80
    naive = select(full, CalibrationConfig(strategy="naive", budget=64), 20)
    assert len(naive) == 64 and set(naive.step.tolist()) == {0}
    uniform = select(full, CalibrationConfig(strategy="uniform", budget=60, uniform_steps=5), 20)
    counts = torch.bincount(uniform.step, minlength=20)
    assert torch.nonzero(counts).flatten().tolist() == [0, 5, 10, 14, 19] and set(counts[counts > 0].tolist()) == {12}
    ndtc = select(full, CalibrationConfig(strategy="ndtc", budget=600, ndtc_mean=0.4, ndtc_std=0.2), 20)
    assert len(ndtc) == 600 and abs(float(ndtc.step.float().mean()) - 8.0) < 0.6  # N(0.4 * 20, 0.2 * 20), few clamps
    spread = select(full, CalibrationConfig(strategy="all", budget=100), 20)
    assert torch.bincount(spread.step).tolist() == [5] * 20
    with pytest.raises(FlowpressError, match="raise calibration.n_samples"):
        select(full, CalibrationConfig(strategy="naive", budget=81), 20)


def test_per_step_max_reproduces_modelopt_max_and_mean_is_below_it(unet):
    calib = calibrate(unet, SCHEDULE, n_samples=8, guidance=2.0)
    by_max = quantize(unet, Int8Config(amax="max"), calib, SCHEDULE).layers
    by_step = quantize(unet, Int8Config(amax="perstep-max"), calib, SCHEDULE).layers
    by_mean = quantize(unet, Int8Config(amax="perstep-mean"), calib, SCHEDULE).layers
    for name, layer in by_max.items():
        assert by_step[name].input_amax == pytest.approx(layer.input_amax, rel=1e-6)
        assert by_mean[name].input_amax <= layer.input_amax + 1e-6
    assert sum(by_mean[n].input_amax < by_max[n].input_amax * 0.99 for n in by_max) > len(by_max) // 2


def test_shortcut_split_point_is_the_hidden_state_width(unet):
    """Record the real torch.cat operands inside each up block and check the split matches."""
    import copy

    model = copy.deepcopy(unet)
    widths = []
    real_cat = torch.cat

    def spy(tensors, dim=0, **kw):
        if dim == 1 and len(tensors) == 2:
            widths.append(tensors[0].shape[1])
        return real_cat(tensors, dim=dim, **kw)

    names = split_shortcuts(model)
    splits = [model.get_submodule(n).split for n in names]
    torch.cat = spy
    try:
        with torch.no_grad():
            unet(torch.zeros(1, 1, 16, 16), torch.tensor([0.5]), {"class_labels": torch.tensor([1])})
    finally:
        torch.cat = real_cat
    resnets = [r for block in unet.net.up_blocks for r in block.resnets]
    assert len(widths) == len(resnets)  # one cat([h, skip], dim=1) per decoder resnet
    assert names and splits == [w for w, r in zip(widths, resnets, strict=True) if r.conv_shortcut is not None]


def test_mse_search_clips_a_gaussian_where_theory_says():
    """Optimal uniform quantizer clipping for a unit Gaussian: ~2.5 sigma at 4 bits, ~4 sigma at 8."""
    from flowpress.compress.amax import mse_amax

    values = torch.randn(200_000, generator=torch.Generator().manual_seed(0))
    amax = float(values.abs().max())  # about 4.9 sigma
    assert 2.0 < mse_amax(values, amax, 4) < 3.0
    assert 3.2 < mse_amax(values, amax, 8) <= amax
