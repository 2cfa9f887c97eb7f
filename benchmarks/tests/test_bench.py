"""`python -m benchmarks bench` on the tiny UNet."""

import numpy as np
import pytest

from benchmarks.bench import load_bench_config
from benchmarks.bench.bars import bars
from benchmarks.bench.config import BenchBars, BenchConfig, BenchModel, Int8PeakBar, RandomDit
from benchmarks.bench.models import build_random_dit, forward_flops
from benchmarks.bench.peaks import machine_record
from benchmarks.bench.report import portable_cost
from benchmarks.bench.run import bench_model
from flowpress.errors import FlowpressError
from flowpress.export.openvino import cpu_has_bf16
from flowpress.schema import from_dict
from tests.conftest import ROOT

RECIPE = """
name: tiny-bench
model: {{path: {model}}}
sampling: {{steps: {steps}, guidance: {guidance}}}
calibration: {{n_samples: 8}}
quantize: {{{quantize}}}
export: {{{export}}}
"""
RECIPES = {  # name: (steps, guidance, quantize, export)
    "tiny": (4, 2.0, "amax: perstep-mean", "flavour: ort-cpu"),
    "fp8": (4, 2.0, "precision: fp8, amax: max", "flavour: tensorrt"),
    "w4a8": (4, 2.0, "precision: w4a8, recon_iters: 5, recon_samples: 16", "flavour: ort-cpu, opset: 21"),
    # the tiny UNet itself stands in for a distilled student: one step, no guidance
    "student": (1, 1.0, "amax: mse", "flavour: ort-cpu"),
}


def _tiny_bench(spec: BenchModel, variants: tuple[str, ...], tmp_path, **timing):
    """bench_model on one tiny model with few timed runs; returns (its config, its result)."""
    config = BenchConfig(
        models=(spec,),
        variants=variants,
        runs=30,
        loops=1,
        sample_batch=10,
        bars=BenchBars(int8_peak_fraction=Int8PeakBar(model="tiny")),
        **timing,
    )
    (tmp_path / "work").mkdir()
    return config, bench_model(spec, config, tmp_path / "work", progress=False)


def test_bench_rows_on_the_tiny_unet(tiny_model_dir, tmp_path, monkeypatch):
    # an AVX2 host whatever this one is: flowpress's int8 engines take the portable form there
    monkeypatch.setenv("FLOWPRESS_ISA", "x86-avx2")
    paths = {}
    for name, (steps, guidance, quantize, export) in RECIPES.items():
        paths[name] = tmp_path / f"{name}.yaml"
        paths[name].write_text(
            RECIPE.format(
                model=tiny_model_dir,
                steps=steps,
                guidance=guidance,
                quantize=quantize,
                export=export,
            )
        )
    variants = (
        "torch-fp32",
        "ort-fp32",
        "ov-nncf-default",
        "flowpress-ort-int8",
        "flowpress-ov-int8",
        "flowpress-fp8",
        "flowpress-w4a8",
        "student",
    )
    spec = BenchModel(
        name="tiny",
        recipe=str(paths["tiny"]),
        n_samples=10,
        fp8_recipe=str(paths["fp8"]),
        w4a8_recipe=str(paths["w4a8"]),
        student_recipe=str(paths["student"]),
        portable_weights="u8u8",  # the entry's override of the recipe's 7-bit default
    )
    config, result = _tiny_bench(spec, variants, tmp_path, passes=2, profile_runs=2)
    rows = {(r["variant"], r["batch"]): r for r in result["rows"]}
    assert sorted(rows) == sorted((v, b) for v in variants for b in (1, 8))
    for row in rows.values():
        assert row["runs"] == 30 and row["passes"] == 2 and len(row["ms_per_step_passes"]) == 2
        assert row["ms_per_step_median"] == pytest.approx(float(np.median(row["ms_per_step_passes"])))
        assert 0 < row["ms_per_step_median"] <= row["ms_per_step_p90"]
        assert row["images_per_s"] > 0 and row["size_bytes"] > 0 and row["peak_rss_mb"] > 0
    # built as `make quantize` builds them on an AVX2 host: portable (here the entry's U8U8 8-bit
    # weights), NNCF's overflow fix; the peers as a user builds them, and fp8 / W4A8 have no int8 weights
    assert (result["isa_class"], result["emulated"], result["portable"]) == ("x86-avx2", True, True)
    assert result["int8_weights"] == "8-bit u8u8" and result["overflow_fix"] == "enable"
    portable = {v: rows[(v, 8)]["portable"] for v in variants}
    assert portable == {
        "torch-fp32": None,
        "ort-fp32": None,
        "ov-nncf-default": None,
        "flowpress-ort-int8": True,
        "flowpress-ov-int8": True,
        "flowpress-fp8": None,
        "flowpress-w4a8": None,
        "student": True,
    }
    assert rows[("torch-fp32", 8)]["final_psnr_db"] is None  # the reference itself
    assert rows[("ort-fp32", 8)]["final_psnr_db"] > 80  # fp32 vs fp32: rounding only (measured 138.6 dB)
    # int8 on this random-weight tiny UNet: measured 38.6 (flowpress-ort-int8), 42.8 (flowpress-ov-int8)
    # and 37.6 dB (NNCF default); a broken engine lands near 0-10 dB
    for variant in ("ov-nncf-default", "flowpress-ort-int8", "flowpress-ov-int8"):
        assert 20 < rows[(variant, 8)]["final_psnr_db"] < 80, variant
    # E4M3 and int4 weights cost fidelity (measured 33.8 and 27.9 dB here); broken: near 0-10 dB
    assert 20 < rows[("flowpress-fp8", 8)]["final_psnr_db"] < rows[("flowpress-ort-int8", 8)]["final_psnr_db"]
    assert 15 < rows[("flowpress-w4a8", 8)]["final_psnr_db"] < rows[("flowpress-ort-int8", 8)]["final_psnr_db"]
    # the stand-in student: one step without guidance against the 4-step guided trajectory
    student = rows[("student", 8)]
    assert student["steps"] == 1 and student["model_batch_in_loop"] == 8
    assert rows[("flowpress-ov-int8", 8)]["steps"] == 4 and rows[("flowpress-ov-int8", 8)]["model_batch_in_loop"] == 16
    assert 15 < student["final_psnr_db"] < rows[("flowpress-ov-int8", 8)]["final_psnr_db"]  # measured 23.6
    # the explicit hint (float parts in bf16 where the CPU has it), recorded as compiled
    assert rows[("flowpress-ov-int8", 8)]["inference_precision"] == ("bf16" if cpu_has_bf16() else "f32")
    graph = result["graph_ops"]["flowpress-ort-int8"]
    assert graph.get("QLinearConv", 0) > 0  # integer convs after onnxruntime's fusion
    for variant, ops in result["profiles"].items():
        assert ops and all(o["ms"] > 0 for o in ops), variant
        # every operator type, each share rounded to 4 decimals
        assert sum(o["share"] for o in ops) == pytest.approx(1.0, abs=5e-5 * len(ops)), variant
    judged = bars(result["rows"], config.bars, {"int8": 1.0}, profiles={"tiny": result["profiles"]})
    checks = {b["bar"].split(":")[0]: b for b in judged}
    assert "flowpress-ov-int8 vs ov-nncf-default" in checks
    (peak,) = [b for b in checks.values() if "fraction_of_int8_peak" in b]
    assert peak["passed"] is not None and peak["fraction_of_int8_peak"] > 0  # the tiny model carries the bar here
    # the fastest engine's profile names its weight-GEMM kernels (convs, on this tiny UNet)
    assert 0 < peak["weight_gemm_time_share"] <= 1
    fastest = peak["bar"].split("(")[1].split(")")[0]
    timed = [r for r in result["rows"] if r["variant"] == fastest]  # the bar's batch: its rate is the bar's
    (best,) = [
        r for r in timed if r["gop_per_forward"] / (r["ms_per_step_median"] / 1000) == peak["achieved_gop_per_s"]
    ]
    engine_ms = best["ms_per_step_median"]
    # the rest is the engine's time outside its weight GEMMs
    assert peak["rest_ms"] == pytest.approx(engine_ms * (1 - peak["weight_gemm_time_share"]), rel=1e-6)
    assert not any("(student)" in bar for bar in checks)  # another network: never the fastest engine


@pytest.mark.parametrize("isa", ["x86-avx512-vnni", "x86-avx2"])
def test_portable_twins_only_where_int8_kernels_are_exact(isa, tiny_model_dir, tmp_path, monkeypatch):
    # on a VNNI host the 7-bit / NNCF-overflow-fix form that is exact on every x86 host is built
    # beside the full-range one, so the bench shows what portability costs there; on AVX2
    # flowpress's engines are that form already and no twin is built
    monkeypatch.setenv("FLOWPRESS_ISA", isa)
    recipe = tmp_path / "tiny.yaml"
    recipe.write_text(RECIPE.format(model=tiny_model_dir, steps=4, guidance=2.0, quantize="amax: max", export=""))
    # make quantize's openvino-qdq (signed 8-bit weights) likewise only where they are exact
    variants = ("ort-fp32", "flowpress-ort-int8-portable", "flowpress-ov-int8-portable", "flowpress-ov-qdq")
    spec = BenchModel(name="tiny", recipe=str(recipe), n_samples=10)
    _, result = _tiny_bench(spec, variants, tmp_path, passes=1, profile_runs=1, batches=(8,))
    rows = {r["variant"]: r for r in result["rows"]}
    if isa == "x86-avx2":
        assert sorted(rows) == ["ort-fp32"] and result["portable"] is True
        return
    assert sorted(rows) == sorted(variants) and result["portable"] is False
    assert [rows[v]["portable"] for v in variants] == [None, True, True, False]
    # 7-bit weights: every int8 weight of the onnxruntime twin within [-63, 63]
    import onnx
    from onnx import numpy_helper

    graph = onnx.load(tmp_path / "work" / "portable.opt.onnx").graph
    weights = [numpy_helper.to_array(t) for t in graph.initializer if t.data_type == onnx.TensorProto.INT8]
    assert weights and max(int(np.abs(w.astype(np.int32)).max()) for w in weights) <= 63
    # both twins and the Q/DQ engine run the same network within int8 error of FP (tiny random UNet,
    # emulated VNNI on a Zen 4 host: measured 39.0 onnxruntime, 41.7 OpenVINO, 41.4 Q/DQ on OpenVINO; broken: near 0-10 dB)
    for variant in variants[1:]:
        assert 20 < rows[variant]["final_psnr_db"] < 80, variant


def test_the_portable_cost_sentence_compares_each_twin_with_its_full_range_engine():
    rows = [
        _row("m", "flowpress-ort-int8", 10.0, 50.0),
        _row("m", "flowpress-ort-int8-portable", 12.5, 48.0),
        _row("m", "flowpress-ov-int8", 8.0, 49.0),
    ]
    (sentence,) = [line for line in portable_cost(rows, "m") if line]
    assert "12.50 vs 10.00 ms" in sentence and "(1.25x the time)" in sentence and "48.00 vs 50.00 dB" in sentence
    assert portable_cost(rows[:1], "m") == []


def test_the_bench_records_the_emulated_host(monkeypatch):
    monkeypatch.setenv("FLOWPRESS_ISA", "x86-avx2")
    machine = machine_record()
    assert machine["cpu"] and machine["cores"] >= 1
    host = machine["host"]
    assert (host["isa_class"], host["int8_saturates"], host["emulated"]) == ("x86-avx2", True, True)
    assert host["onnxruntime"] != "missing" and host["openvino"] != "missing"


def _row(model, variant, ms, psnr=None, gop=8.0, linear_gop=None):
    return {
        "linear_gop_per_forward": gop if linear_gop is None else linear_gop,
        "model": model,
        "variant": variant,
        "peer": variant in ("ort-fp32", "ov-nncf-default", "ort-quantize-static"),
        "batch": 8,
        "ms_per_step_median": ms,
        "final_psnr_db": psnr,
        "gop_per_forward": gop,
    }


def test_the_bench_recipe_carries_the_bars_and_passes():
    config = load_bench_config(ROOT / "recipes" / "bench.yaml")
    assert config.passes == 3 and config.bars == BenchBars()  # the recipe's thresholds are the defaults
    assert config.bars.int8_peak_fraction.model == "speed-dit" and config.bars.int8_peak_fraction.min == 0.75
    assert {m.name: m.portable_weights for m in config.models}["speed-dit"] == "7-bit"  # its fastest exact form
    assert config.bars.ov_int8_vs_nncf.min_psnr_gain_db == 1.0
    assert config.bars.ort_int8_vs_quantize_static.min_speedup == 1.1
    models = [{"name": "speed-dit", "recipe": "examples/digits/recipes/digits-dit-int8.yaml"}]
    with pytest.raises(FlowpressError, match="unknown key 'int8_peak'"):
        from_dict(BenchConfig, {"models": models, "bars": {"int8_peak": {"min": 0.75}}}, "bench.yaml")
    with pytest.raises(FlowpressError, match=r"min must be in \(0, 1\]"):
        from_dict(BenchConfig, {"models": models, "bars": {"int8_peak_fraction": {"min": 75}}}, "bench.yaml")
    with pytest.raises(FlowpressError, match="'digits-unet' is not a bench model"):
        from_dict(BenchConfig, {"models": models, "bars": {"int8_peak_fraction": {"model": "digits-unet"}}}, "b")


@pytest.mark.parametrize("fraction, passed", [(0.80, True), (0.70, False)])
def test_the_int8_peak_bar(fraction, passed):
    thresholds = load_bench_config(ROOT / "recipes" / "bench.yaml").bars
    peaks = {"int8": 100.0}  # GOP/s: 8 GOP per forward at 100 ms runs at 80 GOP/s
    ms = 8.0 / (fraction * 100.0) * 1000
    rows = [
        _row("speed-dit", "ort-fp32", 400.0),
        _row("speed-dit", "flowpress-ov-int8", ms),
        _row("speed-dit", "flowpress-ort-int8", ms * 1.5),
        _row("speed-dit", "student", 10.0, gop=1.0),  # another network, faster: never the one judged
        _row("digits-unet", "flowpress-ov-int8", ms),
    ]
    found = {b["model"]: b for b in bars(rows, thresholds, peaks) if "fraction_of_int8_peak" in b}
    bar = found["speed-dit"]
    assert "(flowpress-ov-int8)" in bar["bar"] and bar["fraction_of_int8_peak"] == pytest.approx(fraction)
    assert bar["passed"] is passed and bar["speedup_vs_ort_fp32"] == pytest.approx(400.0 / ms)
    assert found["digits-unet"]["passed"] is None  # reported, no bar
    assert not any("fraction_of_int8_peak" in b for b in bars(rows, thresholds))  # no peak measured: no bar
    assert "weight_gemm_time_share" not in bar  # no profile: no breakdown


def test_the_int8_peak_bar_says_where_the_fastest_engines_time_goes():
    thresholds = load_bench_config(ROOT / "recipes" / "bench.yaml").bars
    rows = [_row("speed-dit", "flowpress-ov-int8", 160.0, gop=8.0, linear_gop=7.2)]
    ops = [  # an OpenVINO profile: weight GEMMs 60% of the time, attention and the rest 40%
        {"op": "FullyConnectedQuantizedLegacy (brgemm_avx512_i8)", "ms": 50.0, "share": 0.5},
        {"op": "Subgraph (jit_avx512_i8)", "ms": 30.0, "share": 0.3},
        {"op": "FullyConnected (brgemm_avx512_I8)", "ms": 10.0, "share": 0.1},
        {"op": "MVN (jit_avx512_bf16)", "ms": 10.0, "share": 0.1},
    ]
    (bar,) = bars(rows, thresholds, {"int8": 100.0}, profiles={"speed-dit": {"flowpress-ov-int8": ops}})
    assert bar["weight_gemm_time_share"] == pytest.approx(0.6)
    assert bar["weight_gemm_gop_per_s"] == pytest.approx(7.2 / 0.096)  # 7.2 GOP in 60% of 160 ms
    assert bar["rest_ms"] == pytest.approx(64.0)
    # 75% of 100 GOP/s runs the forward's 8 GOP in 106.7 ms, 96 of them in the weight GEMMs
    assert bar["rest_ms_allowed"] == pytest.approx(8.0 / 75.0 * 1000 - 96.0)


def test_the_bench_counts_attention_flops():
    # torch's counter has no entry for the CPU attention kernel; the bench adds it
    dit = build_random_dit(RandomDit(layers=2, heads=2, head_dim=8, sample_size=8, patch_size=2, num_classes=4))
    flops = forward_flops(dit, 3)
    tokens = (8 // 2) ** 2
    attention = 2 * 2 * (2 * 3 * 2 * tokens * tokens * 8)  # layers x (QK^T, AV) x 2 B H S S D
    assert flops["total"] - flops["linear"] == attention
    assert flops["linear"] > 0


@pytest.mark.parametrize(
    "ours_ms, ours_psnr, passed",
    [(100.0, 41.0, True), (95.0, 40.5, False), (101.0, 45.0, False)],  # 1 dB better and as fast; 0.5 dB; slower
)
def test_the_ov_int8_against_nncf_bar(ours_ms, ours_psnr, passed):
    thresholds = load_bench_config(ROOT / "recipes" / "bench.yaml").bars
    rows = [
        _row("digits-dit", "ov-nncf-default", 100.0, 40.0),
        _row("digits-dit", "flowpress-ov-int8", ours_ms, ours_psnr),
    ]
    (bar,) = bars(rows, thresholds)
    assert bar["bar"].startswith("flowpress-ov-int8 vs ov-nncf-default")
    assert bar["passed"] is passed
    assert bar["speedup"] == pytest.approx(100.0 / ours_ms) and bar["psnr_gain_db"] == pytest.approx(ours_psnr - 40.0)


def test_the_ort_int8_against_quantize_static_bar():
    thresholds = BenchBars()
    peer = _row("digits-unet", "ort-quantize-static", 111.0, 38.0)
    (fast,) = bars([peer, _row("digits-unet", "flowpress-ort-int8", 100.0, 38.0)], thresholds)
    (slow,) = bars([peer, _row("digits-unet", "flowpress-ort-int8", 105.0, 39.0)], thresholds)
    (worse,) = bars([peer, _row("digits-unet", "flowpress-ort-int8", 90.0, 37.9)], thresholds)
    assert (fast["passed"], slow["passed"], worse["passed"]) == (True, False, False)
