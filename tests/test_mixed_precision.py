"""Per-layer trajectory sensitivity and the gate-driven mixed-precision search, on the tiny UNet."""

import dataclasses

import pytest

from flowpress.cli import main
from flowpress.compress import Int8Config, SensitivityConfig, layer_sensitivity, quantize
from flowpress.context import RunContext
from flowpress.errors import FlowpressError
from flowpress.models import StepModel, load_model
from flowpress.recipe import load_recipe
from flowpress.stages.chain import run_quantize
from flowpress.stages.mixed import mixed_precision

from .conftest import EVALUATOR, TINY_SCHEDULE, for_this_host, labels_of, tiny_calibration

BROKEN = "net.mid_block.resnets.0.conv1"
CANDIDATES = '["net.conv_in", "net.mid_block.resnets.*", "net.conv_out"]'
RECIPE = """
name: {name}
model: {{path: {model}}}
sampling: {{steps: 4, guidance: 2.0}}
calibration: {{n_samples: 8}}
quantize:
  mixed_precision:
    enabled: true
    max_fallback: {max_fallback}
    sensitivity_samples: 4
    check_samples: 10
    candidates: {candidates}   # a few layers keep the test short (each costs one sampled trajectory set)
engine: {{candidates: false}}   # the search runs onnxruntime engines; OpenVINO candidates would only add time
compare: {{n_samples: 20, batch_size: 10, latency_runs: 3}}
gate: {{min_final_psnr_db: {psnr}, metrics: {{classifier_acc: {{max_drop: 0.5}}}}}}
evaluator: {evaluator}
"""


def recipe_file(tmp_path, model, psnr, max_fallback=2, name="tiny-gated", candidates=CANDIDATES):
    path = tmp_path / f"{name}.yaml"
    text = RECIPE.format(
        name=name, model=model, psnr=psnr, max_fallback=max_fallback, candidates=candidates, evaluator=EVALUATOR
    )
    path.write_text(text)
    return path


@pytest.fixture(scope="module")
def tiny(tiny_model_dir):
    model = load_model(tiny_model_dir)
    return model, tiny_calibration(model)


def broken_quant(model, calib):
    """The tiny UNet quantized W8A8, with BROKEN's input quantizer made 64x coarser (about 2 bits)."""
    qmodel = for_this_host(quantize(model, Int8Config(), calib, TINY_SCHEDULE))
    quantizer = dict(qmodel.module.model.named_modules())[BROKEN].input_quantizer
    quantizer.amax = quantizer.amax * 64
    qmodel.layers[BROKEN] = dataclasses.replace(qmodel.layers[BROKEN], input_amax=float(quantizer.amax))
    return qmodel


@pytest.mark.slow
def test_sensitivity_ranks_the_broken_layer_first(tiny):
    model, calib = tiny
    qmodel = broken_quant(model, calib)
    config = SensitivityConfig(TINY_SCHEDULE, labels_of(4), 4, 200000, 4, 2.0, model.null_condition())
    fp = StepModel(model, TINY_SCHEDULE)
    sensitivity = layer_sensitivity(fp, qmodel, config)
    assert sensitivity.order[0] == BROKEN and len(sensitivity.order) == len(qmodel.layers)
    first, second = sensitivity.layers[:2]
    # measured (8 samples): +13.2 dB for the broken layer, +0.4 dB for the next one
    assert first.gain_db > 6 and second.gain_db < 2
    # toggling restores every quantizer: the all-quantized error is measured again unchanged
    again = layer_sensitivity(fp, qmodel, config)
    assert again.baseline_mse == pytest.approx(sensitivity.baseline_mse, rel=1e-6)


@pytest.mark.slow
def test_search_falls_back_on_the_broken_layer_and_passes(tiny, tiny_model_dir, tmp_path):
    model, calib = tiny
    # measured on these 20 samples: ~27 dB with the broken layer, ~40 dB with it in full precision
    ctx = RunContext.load(load_recipe(recipe_file(tmp_path, tiny_model_dir, psnr=34.0)))
    qmodel = broken_quant(model, calib)
    run = tmp_path / "run"
    run.mkdir()
    _, _, report, search = mixed_precision(ctx, qmodel, calib, run, False)
    assert search.fallback_layers == [BROKEN] and BROKEN not in qmodel.layers
    mixed = report.mixed_precision
    assert mixed is not None and mixed["passed"] is True and report.passed is True
    assert mixed["fallback_layers"] == [BROKEN]
    assert [len(c["fallback_layers"]) for c in mixed["candidates"]] == [0, 1]
    assert mixed["candidates"][0]["check_passed"] is False and mixed["candidates"][1]["confirmed"] is True
    assert report.final["psnr_db"] >= 34.0
    cost = mixed["fallback_cost"][0]
    # one conv's int8 weights become fp32: the engine grows by about 3x its weight bytes
    weight = dict(model.named_modules())[BROKEN].weight
    assert weight.numel() <= cost["size_bytes"] <= 6 * weight.numel()
    assert set(cost["latency_ms"]) == {"b1", "b8"}
    assert "## Mixed precision (gated search)" in (run / "report.md").read_text()
    assert f"`{BROKEN}`" in (run / "report.md").read_text()
    assert not (run / ".search").exists()


@pytest.mark.slow
def test_no_passing_assignment_exits_nonzero_and_leaves_no_run(tiny_model_dir, tmp_path, capsys):
    runs = tmp_path / "runs"
    recipe = recipe_file(
        tmp_path, tiny_model_dir, psnr=200.0, max_fallback=1, name="tiny-impossible", candidates='["net.conv_out"]'
    )
    code = main(["quantize", "--recipe", str(recipe), "--runs", str(runs), "--quiet"])
    err = [line for line in capsys.readouterr().err.splitlines() if line.startswith("flowpress: error:")]
    assert code == 2
    assert len(err) == 1 and "no assignment with up to 1 layer(s) in full precision passes the gate" in err[0]
    assert not (runs / "tiny-impossible").exists() and not list(runs.glob(".*"))


def test_recipe_schema_rejects_unknown_and_invalid_mixed_precision_keys(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text("name: r\nmodel: {path: x}\nquantize: {mixed_precision: {enabled: true, max_fallbak: 3}}\n")
    with pytest.raises(FlowpressError, match="unknown key 'max_fallbak'"):
        load_recipe(path)
    path.write_text("name: r\nmodel: {path: x}\nquantize: {mixed_precision: {enabled: true, max_fallback: 0}}\n")
    with pytest.raises(FlowpressError, match="max_fallback must be >= 1"):
        load_recipe(path)


def test_openvino_engine_refuses_mixed_precision(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text(
        "name: r\nmodel: {path: x}\nquantize: {mixed_precision: {enabled: true}}\nengine: {runtime: openvino}\n"
    )
    with pytest.raises(FlowpressError, match="needs engine.runtime 'onnxruntime'"):
        run_quantize(load_recipe(path), tmp_path / "runs", progress=False)


def _fake_search(passing_from: int, confirm_from: int, max_fallback: int = 3):
    """gated_search on a two-layer stand-in: a check passes once `passing_from` layers fell
    back, the full compare once `confirm_from` did."""
    from torch import nn

    from flowpress.compress import LayerSensitivity, MixedPrecisionConfig, QuantizedModel, Sensitivity
    from flowpress.stages.mixed import Candidate, gated_search

    module = nn.Module()  # a step model's stand-in: layers are named inside its .model
    module.model = nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 2), nn.Linear(2, 2))
    qmodel = QuantizedModel(module, module, {"0": None, "1": None, "2": None}, Int8Config(), [])  # type: ignore[arg-type]
    ranking = Sensitivity(1.0, 6.0, tuple(LayerSensitivity(n, 0.5, 9.0, 3.0) for n in ("2", "0", "1")), 4)

    def check(_qmodel, fallback):
        k = len(fallback)
        checks = {"classifier_acc_drop": 0.0}
        return Candidate(fallback, 1000 + 10 * k, {"b1": 1.0 + k, "b8": 2.0}, 30.0 + k, checks, k >= passing_from, 4)

    confirmed = []

    def confirm(result):
        confirmed.append(len(result.candidates[-1].fallback_layers))
        return confirmed[-1] >= confirm_from

    config = MixedPrecisionConfig(enabled=True, max_fallback=max_fallback)
    return qmodel, gated_search(qmodel, ranking, config, check, confirm, lambda _line: None), confirmed


def test_gated_search_falls_back_in_sensitivity_order_and_stops_at_the_first_confirmed():
    qmodel, result, confirmed = _fake_search(passing_from=1, confirm_from=2)
    assert result.passed and result.fallback_layers == ["2", "0"] and sorted(qmodel.layers) == ["1"]
    assert confirmed == [1, 2]  # a passing check that the full compare rejects goes on to the next layer
    report = result.report()
    assert [c["layer"] for c in report["fallback_cost"]] == ["2", "0"]
    assert report["fallback_cost"][0]["size_bytes"] == 10 and report["fallback_cost"][0]["latency_ms"]["b1"] == 1.0
    assert report["total_cost"]["size_bytes"] == 20
    assert [c["confirmed"] for c in report["candidates"]] == [None, False, True]


def test_gated_search_gives_up_after_max_fallback():
    with pytest.raises(FlowpressError, match="no assignment with up to 2 layer"):
        _fake_search(passing_from=9, confirm_from=9, max_fallback=2)
