"""The whole chain on a tiny model through the CLI, as a user runs it."""

import json

import numpy as np
import pytest
import torch

from flowpress.cli import main
from flowpress.engines import OrtEngine
from flowpress.engines.isa import host_isa
from flowpress.errors import FlowpressError
from flowpress.sampling import Schedule

from .conftest import EVALUATOR

RECIPE = """
name: tiny-int8
model: {{path: {model}}}
sampling: {{steps: 4, guidance: 2.0}}
calibration: {{n_samples: 8}}
compare: {{n_samples: 20, batch_size: 10, latency_runs: 3}}
gate: {{min_final_psnr_db: {psnr}, metrics: {{classifier_acc: {{max_drop: 0.5}}}}}}
evaluator: {evaluator}
"""


def recipe_file(tmp_path, model, psnr=10.0, name="r.yaml"):
    path = tmp_path / name
    path.write_text(RECIPE.format(model=model, psnr=psnr, evaluator=EVALUATOR))
    return path


@pytest.fixture(scope="module")
def run(tiny_model_dir, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("e2e")
    code = main(["quantize", "--recipe", str(recipe_file(tmp, tiny_model_dir)), "--runs", str(tmp / "runs"), "--quiet"])
    return code, tmp / "runs" / "tiny-int8"


@pytest.mark.slow
def test_quantize_writes_the_run_directory_contract(run):
    code, run_dir = run
    assert code == 0
    for name in ["manifest.json", "calibration/inputs.safetensors", "model.onnx", "engine/model.opt.onnx",
                 "report.json", "report.md", "trajectory_error.png", "samples.png", "samples.npz"]:  # fmt: skip
        assert (run_dir / name).is_file(), name
    report = json.loads((run_dir / "report.json").read_text())
    assert report["gate"]["passed"] is True and report["gate"]["thresholds"]["min_final_psnr_db"] == 10.0
    assert [row["step"] for row in report["per_step"]] == [0, 1, 2, 3, 4]
    assert [row["t"] for row in report["per_step"]] == [1.0, 0.75, 0.5, 0.25, 0.0]
    # measured 0.031, 38.6 dB and SSIM 0.992 on this tiny random-weight UNet (7-bit weights on an
    # AVX2 host; 39.3 dB with 8-bit); the bounds only catch a broken engine
    assert 0 < report["per_step"][-1]["rel_l2"] < 0.5 and report["final"]["psnr_db"] > 20
    assert 0.9 < report["final"]["ssim"] <= 1.0
    assert 0 < report["final"]["worst_1pct_error_share"] <= 1 and report["final"]["psnr_db_median"] > 20
    assert "the median sample's is" in (run_dir / "report.md").read_text()
    for key in ("classifier_acc", "fd"):
        assert key in report["quality"]["reference"] and key in report["quality"]["engine"]
    for runtime in ("torch_fp32", "ort_fp32", "engine"):
        assert report["latency_ms"][runtime]["b1"] > 0 and report["latency_ms"][runtime]["b8"] > 0
    assert 0 < report["size_bytes"]["engine"] < report["size_bytes"]["fp32_onnx"]
    engines = {e["engine"]: e for e in report["cpu_engines"]}
    # openvino-qdq (OpenVINO on flowpress's own Q/DQ graph, 8-bit weights) only where int8 kernels are exact
    qdq = [] if host_isa().int8_saturates else ["openvino-qdq"]
    assert sorted(engines) == sorted(["openvino-bf16", "openvino-int8", "ort-int8", *qdq])
    if qdq:  # it runs OpenVINO's int8 kernels, not a float graph with fake quantizers (measured: all 29 convs u8)
        import openvino as ov

        compiled = ov.Core().compile_model(str(run_dir / "engine" / "openvino-qdq" / "model.xml"), "CPU")
        info = [op.get_rt_info() for op in compiled.get_runtime_model().get_ops()]
        convs = [i["runtimePrecision"].astype(str) for i in info if i["layerType"].astype(str) == "Convolution"]
        assert sum(p in ("u8", "i8") for p in convs) > len(convs) // 2, convs
    # measured 38.6 / 40.5 / 138 dB (ort, OV int8, OV bf16) on x86-avx2; 39.6 / 41.2 / 54.0 and
    # openvino-qdq 40.8 on x86-avx512-vnni (its bf16 runs bf16); broken lands far below
    for e in engines.values():
        assert e["final_psnr_db"] > 20 and e["size_bytes"] > 0 and e["ms_b8"] > 0
    shipped = engines[report["recommendation"]["engine"]]
    assert shipped["gate_passed"] and shipped["ms_b8"] == min(e["ms_b8"] for e in engines.values() if e["gate_passed"])
    samples = np.load(run_dir / "samples.npz")
    assert samples["fp"].shape == samples["engine"].shape == (20, 1, 16, 16)
    assert str(samples["engine_name"]) == report["recommendation"]["engine"]  # what the report ships
    for name in engines:  # every judged engine's samples, the recommended one's equal to `engine`
        assert samples[f"samples_{name}"].shape == (20, 1, 16, 16)
    assert np.array_equal(samples[f"samples_{samples['engine_name']}"], samples["engine"])
    assert samples["labels"].tolist() == [i % 10 for i in range(20)] and samples["seeds"].tolist() == list(range(20))
    weights = report["weight_forms"]  # both int8 weight ranges, whichever this host ships
    assert sorted(weights["forms"]) == ["7-bit", "8-bit"] and weights["shipped"] in weights["forms"]
    assert all(f["final_psnr_db"] > 20 for f in weights["forms"].values())
    manifest = json.loads((run_dir / "manifest.json").read_text())
    assert manifest["schedule"]["n_steps"] == 4 and manifest["outputs"]["model.onnx"]
    stages = report["stages"]  # wall time and peak resident memory per stage, the run's peak the largest
    chain = ["load", "calibrate", "quantize", "fp_reference", "export", "engine", "compare", "judge"]
    assert [name for name in stages if name in chain] == chain and "export_fp32" in stages
    assert manifest["plan"]["released_before_engines"] is False
    assert report["peak_rss_bytes"] >= max(s["peak_rss_bytes"] for s in stages.values()) > 100e6
    assert (
        manifest["peak_rss_bytes"] >= report["peak_rss_bytes"]
        and "Time and memory per stage" in (run_dir / "report.md").read_text()
    )
    assert not list(run_dir.parent.glob(".*"))  # no temporary siblings left behind


@pytest.mark.slow
def test_engine_refuses_a_step_outside_its_schedule(run):
    _, run_dir = run
    engine = OrtEngine(run_dir / "engine" / "model.opt.onnx", Schedule(4))
    x, labels = torch.zeros(1, 1, 16, 16), {"class_labels": torch.tensor([1])}
    with pytest.raises(FlowpressError, match="step 7 is outside its schedule"):
        engine(x, torch.tensor([7]), labels)
    with pytest.raises(FlowpressError, match="step -1 is outside its schedule"):
        engine(x, torch.tensor([-1]), labels)


@pytest.mark.slow
def test_failed_gate_exits_1_and_says_which_threshold(tiny_model_dir, tmp_path, capsys):
    code = main(
        [
            "quantize",
            "--recipe",
            str(recipe_file(tmp_path, tiny_model_dir, psnr=200.0)),
            "--runs",
            str(tmp_path / "runs"),
            "--quiet",
        ]
    )
    out = capsys.readouterr().out
    assert code == 1
    assert "gate final_psnr_db" in out and ">= 200: FAILED" in out
    assert "recommended engine: none" in out


def test_bad_checkpoint_exits_2_and_leaves_no_run(tmp_path, capsys):
    bad = tmp_path / "bad-model"
    bad.mkdir()
    (bad / "config.json").write_text('{"_class_name": "UNet2DModel"}')
    code = main(["quantize", "--recipe", str(recipe_file(tmp_path, bad)), "--runs", str(tmp_path / "runs"), "--quiet"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and len(err.splitlines()) == 1 and str(bad) in err
    assert not (tmp_path / "runs" / "tiny-int8").exists()


@pytest.mark.slow
def test_precisions_table_reads_finished_runs_and_names_the_missing(run, capsys):
    _, run_dir = run
    report = json.loads((run_dir / "report.json").read_text())
    from benchmarks.__main__ import main as harness
    from benchmarks.precisions import precision_table

    code = harness(["precisions", "--runs", str(run_dir.parent)])
    assert code == 2 and "none of digits-unet-int8" in capsys.readouterr().err  # the default names: none ran here

    out = precision_table(run_dir.parent, ("tiny-int8", "tiny-fp8"))
    rows = json.loads((out / "precisions.json").read_text())
    assert [r["run"] for r in rows["rows"]] == ["tiny-int8"] and rows["missing"] == ["tiny-fp8"]
    row = rows["rows"][0]
    assert row["final_psnr_db"] == report["final"]["psnr_db"] and row["engine_bytes"] == report["size_bytes"]["engine"]
    assert row["precision"].startswith("int8, ") and row["calibration"].startswith("all, 8 trajectories, amax")
    assert row["quality"] == report["quality"]["engine"]
    md = (out / "precisions.md").read_text()
    assert f"| tiny-int8 | {row['precision']} | {row['calibration']} | {row['final_psnr_db']:.2f} |" in md
    assert "Not run yet: tiny-fp8" in md


def test_error_spread_says_when_a_few_samples_own_the_error():
    from flowpress.validation.metrics import error_spread, psnr_db

    reference = torch.zeros(100, 1, 4, 4)
    test = reference + 0.01
    test[0] = 1.0  # one trajectory that tipped to another image
    spread = error_spread(reference, test)
    # 99 samples off by 0.01: the median's PSNR is 10 log10(4 / 1e-4) = 46.02 dB; the tipped one holds
    # 1 / (1 + 99e-4) of the squared error, and the PSNR of the mean (25.98 dB) is its
    assert spread["psnr_db_median"] == pytest.approx(46.02, abs=0.01)
    assert spread["worst_1pct_error_share"] == pytest.approx(1 / (1 + 99e-4), rel=1e-9)
    assert psnr_db(reference, test) == pytest.approx(25.98, abs=0.01)
